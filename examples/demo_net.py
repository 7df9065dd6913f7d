"""The demo's built-in network: a small VGG-style CNN with BatchNorm and a residual block."""
import torch
from torch import nn


class DemoNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()

        def block(c_in, c_out):
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())

        self.stem = block(3, 32)
        self.stage1 = nn.Sequential(block(32, 64), nn.MaxPool2d(2))
        self.res = nn.Sequential(block(64, 64), block(64, 64))
        self.stage2 = nn.Sequential(block(64, 128), nn.MaxPool2d(2), block(128, 128))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, classes)

    def forward(self, x):
        x = self.stage1(self.stem(x))
        x = x + self.res(x)
        x = self.pool(self.stage2(x))
        return self.fc(torch.flatten(x, 1))


def build() -> nn.Module:
    """Seeded random weights with non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    net = DemoNet()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()

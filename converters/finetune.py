"""Fine-tune what BasisConv leaves learnable: the 1D combine weights (and, when asked, biases,
BatchNorm, the classifier), with the fixed bases and everything else frozen.

Frozen BatchNorm layers stay in eval mode while training, so their running statistics do not
move either: after fine-tuning with train=("combine",) only combine weights have changed.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .basis_layers import BasisConv2d, BasisLinear
from engine.errors import InputError

PARTS = ("combine", "bias", "bn", "classifier", "all")


def _bn(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


def trainable_parameters(model: nn.Module, train=("combine",)) -> list[nn.Parameter]:
    """The parameters `train` selects: "combine" (BasisConv2d / BasisLinear 1D weights), "bias"
    (biases of conv / linear / basis layers), "bn" (BatchNorm weight and bias), "classifier"
    (every parameter of the last Linear / BasisLinear), "all"."""
    unknown = set(train) - set(PARTS)
    if unknown:
        raise InputError(f"train: unknown part(s) {sorted(unknown)}; choose from {PARTS}")
    if "all" in train:
        return list(model.parameters())
    chosen: dict[int, nn.Parameter] = {}
    heads = [m for m in model.modules() if isinstance(m, (nn.Linear, BasisLinear))]
    for m in model.modules():
        params = []
        if "combine" in train and isinstance(m, (BasisConv2d, BasisLinear)):
            params.append(m.combine)
        if "bias" in train and isinstance(m, (nn.Conv2d, nn.Linear, BasisConv2d, BasisLinear)):
            params.append(m.bias)
        if "bn" in train and _bn(m):
            params += [m.weight, m.bias]
        if "classifier" in train and heads and m is heads[-1]:
            params += list(m.parameters())
        chosen.update((id(p), p) for p in params if p is not None)
    return list(chosen.values())


@torch.no_grad()
def accuracy(model: nn.Module, loader) -> float:
    """Top-1 accuracy (fraction) of `model` in eval mode over (inputs, labels) batches."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += (model(x).argmax(1) == y).sum().item()
        total += y.numel()
    model.train(was_training)
    return correct / max(total, 1)


def finetune(model: nn.Module, train_loader, *, epochs: int, lr: float, train=("combine",),
             val_loader=None, weight_decay: float = 0.0, progress: bool = True) -> dict:
    """Train the parts `train` selects (see trainable_parameters) with Adam and cross-entropy.

    Returns {"acc_before", "acc_after" (on val_loader, else train_loader), "trainable_params",
    "losses" (mean training loss per epoch)}. The model is modified in place and left in eval mode.
    """
    from tqdm.auto import tqdm
    params = trainable_parameters(model, train)
    if not params:
        raise InputError(f"train={tuple(train)} selects no parameter of this model "
                         "(no BasisConv2d / BasisLinear? run converters.to_basis first)")
    ids = {id(p) for p in params}
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    eval_loader = val_loader if val_loader is not None else train_loader
    result = {"acc_before": accuracy(model, eval_loader), "trainable_params": sum(p.numel() for p in params),
              "losses": []}
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    try:
        for epoch in range(epochs):
            model.train()
            if "bn" not in train and "all" not in train:
                for m in model.modules():
                    if _bn(m):
                        m.eval()  # frozen BN: keep the running statistics too
            total, n = 0.0, 0
            bar = tqdm(train_loader, desc=f"fine-tune {epoch + 1}/{epochs}", leave=False, disable=not progress)
            for x, y in bar:
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total, n = total + loss.item() * y.numel(), n + y.numel()
                bar.set_postfix(loss=f"{total / n:.4f}")
            result["losses"].append(total / max(n, 1))
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.eval()
    result["acc_after"] = accuracy(model, eval_loader)
    return result

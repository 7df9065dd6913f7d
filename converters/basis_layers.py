"""BasisConv as PyTorch modules, for fine-tuning and training from scratch, and `to_basis`, which
turns a model's Conv2d / Linear layers into them.

BasisConv2d: stage 1 convolves the input with the fixed basis (a buffer, never trained) using the
original layer's stride, padding, dilation and groups; stage 2 is a grouped 1x1 conv with the
trainable combine weights and bias. BasisLinear: x @ basis.T @ combine.T + bias. Both export as
one node each (basis_conv2d / basis_linear, registered in torch_export.LEAF_EXPORTERS).
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .basis import BasisReport, LayerSpec, decompose, scratch_basis, svd_basis
from .torch_export import LEAF_EXPORTERS, _weights, eval_mode, register_leaf
from engine.errors import InputError

_TORCH_PAD = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


def _f32(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, np.float32)).clone()


def _factors(layer: nn.Module, rank: int, from_scratch: bool, seed: int):
    """(basis, combine) of one dense layer: its SVD factors, or a random orthonormal basis and a
    fresh combine."""
    groups = getattr(layer, "groups", 1)
    if from_scratch:
        return scratch_basis(tuple(layer.weight.shape), groups, rank, np.random.default_rng(seed))
    return svd_basis(layer.weight.detach().cpu().numpy(), groups, rank)


def padded_conv2d(x, weight, bias, stride, padding, dilation, groups, padding_mode):
    """F.conv2d with padding [t, l, b, r] in padding_mode: zero padding the conv itself takes
    (the same on both sides) stays in the conv, so that an exported ONNX graph has no Pad node
    of its own (ORT ran each as a separate op, ~1 ms a layer at batch 16); other padding goes
    through F.pad first."""
    t, l, b, r = padding
    if padding_mode == "zeros" and t == b and l == r:
        return F.conv2d(x, weight, bias, stride, (t, l), dilation, groups)
    if t or l or b or r:
        x = F.pad(x, (l, r, t, b), mode=_TORCH_PAD[padding_mode])
    return F.conv2d(x, weight, bias, stride, 0, dilation, groups)


class BasisConv2d(nn.Module):
    """Conv2d as M fixed basis filters per group and an (N, M) trainable combine."""

    def __init__(self, basis, combine, bias=None, *, stride=(1, 1), padding=(0, 0, 0, 0),
                 dilation=(1, 1), groups: int = 1, padding_mode: str = "zeros"):
        super().__init__()
        if padding_mode not in _TORCH_PAD:
            raise InputError(f"padding_mode must be one of {sorted(_TORCH_PAD)}, got {padding_mode!r}")
        self.register_buffer("basis", _f32(basis))      # (G*M, C/G, kh, kw) fixed basis filters
        self.combine = nn.Parameter(_f32(combine))      # (N, M) 1D combine weights
        self.bias = None if bias is None else nn.Parameter(_f32(bias))  # (N)
        self.stride, self.dilation = tuple(stride), tuple(dilation)
        self.padding = tuple(padding)                   # (top, left, bottom, right)
        self.groups, self.padding_mode = int(groups), padding_mode
        if self.basis.shape[0] != self.groups * self.rank or self.combine.shape[0] % self.groups:
            raise InputError(f"basis {tuple(self.basis.shape)} / combine {tuple(self.combine.shape)} "
                             f"do not fit groups={self.groups}")

    @property
    def rank(self) -> int:
        return self.combine.shape[1]

    def file_attrs(self) -> dict:
        """The basis_conv2d node's attributes (docs/FORMAT.md)."""
        return {"stride": list(self.stride), "padding": list(self.padding), "dilation": list(self.dilation),
                "groups": self.groups, "padding_mode": self.padding_mode, "rank": self.rank}

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, basis, combine) -> "BasisConv2d":
        """Take a Conv2d's geometry and bias, with the given basis and combine."""
        _, attrs, _ = LEAF_EXPORTERS[nn.Conv2d](conv)   # stride, padding [t, l, b, r], ... as exported
        return cls(basis, combine, None if conv.bias is None else conv.bias.detach().cpu().numpy(), **attrs)

    @classmethod
    def decomposed(cls, conv: nn.Conv2d, rank: int, *, from_scratch: bool = False,
                   seed: int = 0) -> "BasisConv2d":
        """A Conv2d as `rank` SVD basis filters per group, or (from_scratch) as `rank` random
        orthonormal ones with a fresh combine. to_basis does this for a whole model."""
        return cls.from_conv(conv, *_factors(conv, rank, from_scratch, seed))

    def forward(self, x):
        s = padded_conv2d(x, self.basis, None, self.stride, self.padding, self.dilation,
                          self.groups, self.padding_mode)                      # (B, G*M, H', W')
        N, M = self.combine.shape
        return F.conv2d(s, self.combine.view(N, M, 1, 1), self.bias, groups=self.groups)

    def extra_repr(self) -> str:
        return (f"{self.basis.shape[1] * self.groups}, {self.combine.shape[0]}, rank={self.rank}, "
                f"kernel={tuple(self.basis.shape[2:])}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, groups={self.groups}, padding_mode={self.padding_mode}")


class BasisLinear(nn.Module):
    """Linear as M fixed basis rows and an (out, M) trainable combine."""

    def __init__(self, basis, combine, bias=None):
        super().__init__()
        self.register_buffer("basis", _f32(basis))      # (M, in) fixed basis rows
        self.combine = nn.Parameter(_f32(combine))      # (out, M) 1D combine weights
        self.bias = None if bias is None else nn.Parameter(_f32(bias))  # (out)

    @property
    def rank(self) -> int:
        return self.combine.shape[1]

    @classmethod
    def from_linear(cls, linear: nn.Linear, basis, combine) -> "BasisLinear":
        return cls(basis, combine, None if linear.bias is None else linear.bias.detach().cpu().numpy())

    @classmethod
    def decomposed(cls, linear: nn.Linear, rank: int, *, from_scratch: bool = False,
                   seed: int = 0) -> "BasisLinear":
        """A Linear as `rank` SVD basis rows, or (from_scratch) random orthonormal ones."""
        return cls.from_linear(linear, *_factors(linear, rank, from_scratch, seed))

    def forward(self, x):
        return F.linear(F.linear(x, self.basis), self.combine, self.bias)

    def extra_repr(self) -> str:
        return f"{self.basis.shape[1]}, {self.combine.shape[0]}, rank={self.rank}"


@register_leaf(BasisConv2d)
def _export_basis_conv2d(m: BasisConv2d):
    return "basis_conv2d", m.file_attrs(), _weights(m, "basis", "combine", "bias")


@register_leaf(BasisLinear)
def _export_basis_linear(m: BasisLinear):
    return "basis_linear", {"rank": m.rank}, _weights(m, "basis", "combine", "bias")


def _positions(model: nn.Module, paths: list[str], example_input) -> dict[str, int]:
    """Output positions per sample (H'W' of a conv, leading non-batch dims of a linear) of the
    modules at `paths` on one forward pass of example_input (their last call, if called twice)."""
    seen, hooks = {}, []
    for p in paths:
        def hook(mod, inp, out, p=p):
            seen[p] = int(np.prod(out.shape[2:] if isinstance(mod, nn.Conv2d) else out.shape[1:-1]))
        hooks.append(model.get_submodule(p).register_forward_hook(hook))
    try:
        with eval_mode(model), torch.no_grad():
            model(*example_input) if isinstance(example_input, (tuple, list)) else model(example_input)
    finally:
        for h in hooks:
            h.remove()
    return seen


def to_basis(model: nn.Module, *, energy=None, rank=None, mac_budget: float | None = None,
             example_input=None, layers=None, force: bool = False, seed: int = 0,
             from_scratch: bool = False) -> tuple[nn.Module, BasisReport]:
    """A copy of `model` with its Conv2d / Linear layers replaced by BasisConv2d / BasisLinear,
    and the report of what was done per layer.

    energy / rank: one value or a dict by module path; mac_budget: fraction of the dense MACs of
    all conv / linear layers (needs example_input); exactly one of them. layers: module paths to
    consider (default all). force: decompose even where the basis form costs more MACs than
    dense. from_scratch: fixed random orthonormal bases (QR of a Gaussian, seeded) with freshly
    initialised combines, for training from scratch (needs rank).
    """
    paths = [p for p, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    positions = _positions(model, paths, example_input) if example_input is not None else {}
    specs = []
    for p in paths:
        m = model.get_submodule(p)
        specs.append(LayerSpec(p, "conv2d" if isinstance(m, nn.Conv2d) else "linear",
                               m.weight.detach().cpu().numpy(), getattr(m, "groups", 1),
                               m.bias is not None, positions.get(p, 0 if positions else 1)))
    report, parts = decompose(specs, energy=energy, rank=rank, mac_budget=mac_budget, layers=layers,
                              force=force, seed=seed, from_scratch=from_scratch,
                              per_position=example_input is None)
    new = copy.deepcopy(model)
    for i, (basis, combine) in parts.items():
        old = new.get_submodule(specs[i].path)
        layer = (BasisConv2d.from_conv(old, basis, combine) if isinstance(old, nn.Conv2d)
                 else BasisLinear.from_linear(old, basis, combine))
        layer = layer.to(old.weight.device).train(old.training)
        if specs[i].path:
            new.set_submodule(specs[i].path, layer)
        else:
            new = layer  # the model is itself one Conv2d / Linear
    return new, report

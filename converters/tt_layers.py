"""Tensor-train layers as PyTorch modules, for fine-tuning after TT-SVD and for training from
scratch, and `to_tt`, which turns a model's Conv2d / Linear layers into them.

TTConv2d: the (kh kw C) x S kernel matrix as a spatial core (1, kh kw, 1, r_0) and channel cores
(r_{k-1}, c_k, s_k, r_k); TTLinear: the (in x out) matrix W.T as cores (r_{k-1}, in_k, out_k, r_k)
(docs/FORMAT.md). Every core is trainable (nn.ParameterList). The forward pass rebuilds the dense
kernel from the cores and runs one conv / linear: at these sizes that is cheaper in torch than
the contraction chain, and autograd carries the gradient to the cores. As in the paper, keep the
BatchNorm after each TT layer (the model's own BN stays where it is).
NaiveTTConv2d is the paper's baseline: the kernel (S, C, kh, kw) as a plain 4D TT-tensor; it
exports as a dense conv2d with the rebuilt kernel.
TTConv2d / TTLinear export as single tt_conv2d / tt_linear nodes (LEAF_EXPORTERS).
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .basis_layers import _TORCH_PAD, _f32, padded_conv2d
from .torch_export import LEAF_EXPORTERS, _np, _weights, register_leaf
from .tt import Factorization, TTReport, factorize_layers
from engine.errors import InputError


def tt_full(cores) -> torch.Tensor:
    """The (prod in_k, prod out_k) matrix of cores [(r_{k-1}, in_k, out_k, r_k)]."""
    m = cores[0].new_ones(1, 1, 1)                          # (rows so far, cols so far, r_k)
    for g in cores:
        m = torch.einsum("ijr,rnms->injms", m, g).flatten(0, 1).flatten(1, 2)
    return m[:, :, 0]


def _scratch_cores(shapes, fan_in: int, generator=None) -> list[np.ndarray]:
    """Gaussian cores whose product has He variance 2 / fan_in per kernel entry: each of the D
    cores gets std (2 / fan_in / prod inner ranks) ** (1 / 2D)."""
    inner = math.prod(s[-1] for s in shapes[:-1])
    std = (2.0 / fan_in / inner) ** (1.0 / (2 * len(shapes)))
    return [std * torch.randn(s, generator=generator).numpy() for s in shapes]


def _chain_shapes(in_modes, out_modes, ranks) -> list[tuple]:
    r = [1, *ranks, 1]
    return [(r[k], i, o, r[k + 1]) for k, (i, o) in enumerate(zip(in_modes, out_modes))]


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(x) for x in v)


def _pads(padding) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) from an int, (ph, pw) or the 4-tuple itself."""
    p = _pair(padding) if isinstance(padding, int) or len(padding) == 2 else tuple(padding)
    return tuple(int(v) for v in (p * 2 if len(p) == 2 else p))


def _cores(cores, ndim: int) -> nn.ParameterList:
    """Trainable float32 cores after checking that they chain: ranks match, outer ranks 1."""
    arrays = [np.asarray(g) for g in cores]
    ranks = [g.shape[0] for g in arrays] + [1]
    if not arrays or any(g.ndim != ndim for g in arrays) or ranks[0] != 1 \
            or any(g.shape[-1] != r for g, r in zip(arrays, ranks[1:])):
        raise InputError(f"cores {[g.shape for g in arrays]} do not form a TT chain of {ndim}-D "
                         "cores (r_{k-1}, ..., r_k) with outer ranks 1")
    return nn.ParameterList([nn.Parameter(_f32(g)) for g in arrays])


class _KernelConv(nn.Module):
    """Conv2d whose kernel (S, C, kh, kw) comes from kernel(): geometry, bias and forward."""

    def __init__(self, bias, *, stride=1, padding=0, dilation=1, padding_mode: str = "zeros"):
        super().__init__()
        if padding_mode not in _TORCH_PAD:
            raise InputError(f"padding_mode must be one of {sorted(_TORCH_PAD)}, got {padding_mode!r}")
        self.bias = None if bias is None else nn.Parameter(_f32(bias))  # (S)
        self.stride, self.dilation = _pair(stride), _pair(dilation)
        self.padding = _pads(padding)                   # (top, left, bottom, right)
        self.padding_mode = padding_mode

    def geometry(self) -> dict:
        """stride, padding [t, l, b, r], dilation and padding_mode as the file's attributes."""
        return {"stride": list(self.stride), "padding": list(self.padding),
                "dilation": list(self.dilation), "padding_mode": self.padding_mode}

    def kernel(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x):
        return padded_conv2d(x, self.kernel(), self.bias, self.stride, self.padding,
                             self.dilation, 1, self.padding_mode)


def _geometry_of(conv: nn.Conv2d) -> dict:
    _, attrs, _ = LEAF_EXPORTERS[nn.Conv2d](conv)       # stride, padding [t, l, b, r], ... as exported
    return {k: attrs[k] for k in ("stride", "padding", "dilation", "padding_mode")}


def _bias_of(m: nn.Module):
    return None if m.bias is None else m.bias.detach().cpu().numpy()


class TTConv2d(_KernelConv):
    """TT-conv (Garipov et al. 2016): spatial core, then d channel cores; C = prod c_k, S = prod s_k."""

    def __init__(self, cores, bias=None, *, kernel_size, **geometry):
        super().__init__(bias, **geometry)
        self.kernel_size = _pair(kernel_size)
        # core0 (1, kh kw, 1, r_0) spatial core; core k (r_{k-1}, c_k, s_k, r_k) channel core k
        self.cores = _cores(cores, 4)
        kh, kw = self.kernel_size
        if len(self.cores) < 2 or tuple(self.cores[0].shape[:3]) != (1, kh * kw, 1):
            raise InputError(f"expected a spatial core (1, {kh * kw}, 1, r_0) and channel cores, "
                             f"got {[tuple(g.shape) for g in self.cores]}")

    @classmethod
    def scratch(cls, in_modes, out_modes, ranks, kernel_size, *, bias: bool = True, generator=None,
                **geometry) -> "TTConv2d":
        """Random cores for training from scratch; ranks r_0..r_{d-1} (r_0 after the spatial core)."""
        kh, kw = _pair(kernel_size)
        shapes = _chain_shapes([kh * kw, *in_modes], [1, *out_modes], ranks)
        fan_in = kh * kw * math.prod(in_modes)
        return cls(_scratch_cores(shapes, fan_in, generator),
                   np.zeros(math.prod(out_modes)) if bias else None, kernel_size=(kh, kw), **geometry)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, f: Factorization) -> "TTConv2d":
        return cls(f.cores, _bias_of(conv), kernel_size=conv.kernel_size, **_geometry_of(conv))

    def attrs(self) -> dict:
        """The tt_conv2d node's attributes (docs/FORMAT.md)."""
        return {**self.geometry(), "kernel_size": list(self.kernel_size),
                "in_modes": [g.shape[1] for g in self.cores[1:]],
                "out_modes": [g.shape[2] for g in self.cores[1:]],
                "ranks": [g.shape[-1] for g in self.cores[:-1]]}

    def kernel(self):
        m = tt_full(list(self.cores))                    # (kh kw C, S), rows (y, x, c)
        return m.reshape(*self.kernel_size, -1, m.shape[1]).permute(3, 2, 0, 1)

    def extra_repr(self) -> str:
        a = self.attrs()
        return (f"in_modes={a['in_modes']}, out_modes={a['out_modes']}, ranks={a['ranks']}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, padding_mode={self.padding_mode}")


class NaiveTTConv2d(_KernelConv):
    """The paper's naive baseline: the kernel (S, C, kh, kw) as a 4D TT-tensor."""

    def __init__(self, cores, bias=None, **geometry):
        super().__init__(bias, **geometry)
        # core k (r_{k-1}, n_k, r_k) over the kernel's dims (S, C, kh, kw)
        self.cores = _cores(cores, 3)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, f: Factorization) -> "NaiveTTConv2d":
        return cls(f.cores, _bias_of(conv), **_geometry_of(conv))

    def kernel(self):
        return tt_full([g.unsqueeze(2) for g in self.cores]).reshape([g.shape[1] for g in self.cores])


class TTLinear(nn.Module):
    """TT-FC (Novikov et al. 2015): y = x @ W + bias with W (prod in_k, prod out_k) in TT form."""

    def __init__(self, cores, bias=None):
        super().__init__()
        # core k (r_{k-1}, in_k, out_k, r_k)
        self.cores = _cores(cores, 4)
        self.bias = None if bias is None else nn.Parameter(_f32(bias))  # (prod out_k)

    @classmethod
    def scratch(cls, in_modes, out_modes, ranks, *, bias: bool = True, generator=None) -> "TTLinear":
        """Random cores for training from scratch; ranks r_1..r_{d-1}."""
        shapes = _chain_shapes(in_modes, out_modes, ranks)
        return cls(_scratch_cores(shapes, math.prod(in_modes), generator),
                   np.zeros(math.prod(out_modes)) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, f: Factorization) -> "TTLinear":
        return cls(f.cores, _bias_of(linear))

    def attrs(self) -> dict:
        """The tt_linear node's attributes (docs/FORMAT.md)."""
        return {"in_modes": [g.shape[1] for g in self.cores], "out_modes": [g.shape[2] for g in self.cores],
                "ranks": [g.shape[-1] for g in self.cores[:-1]]}

    def forward(self, x):
        return F.linear(x, tt_full(list(self.cores)).T, self.bias)

    def extra_repr(self) -> str:
        a = self.attrs()
        return f"in_modes={a['in_modes']}, out_modes={a['out_modes']}, ranks={a['ranks']}"


def _core_weights(m: nn.Module, first: int) -> dict[str, np.ndarray]:
    return {**{f"core{k + first}": _np(g) for k, g in enumerate(m.cores)}, **_weights(m, "bias")}


@register_leaf(TTConv2d)
def _export_tt_conv2d(m: TTConv2d):
    return "tt_conv2d", m.attrs(), _core_weights(m, 0)


@register_leaf(TTLinear)
def _export_tt_linear(m: TTLinear):
    return "tt_linear", m.attrs(), _core_weights(m, 1)


@register_leaf(NaiveTTConv2d)
def _export_naive_tt_conv2d(m: NaiveTTConv2d):
    with torch.no_grad():
        w = {"weight": _np(m.kernel()), **_weights(m, "bias")}
    return "conv2d", {**m.geometry(), "groups": 1}, w


def to_tt(model: nn.Module, *, max_rank=None, eps=None, layers=None, modes=None,
          naive: bool = False) -> tuple[nn.Module, list[TTReport]]:
    """A copy of `model` with its groups=1 Conv2d / Linear layers as TTConv2d / TTLinear, each
    initialised by TT-SVD of the trained kernel, and one report per layer considered.

    max_rank: an int for every bond, per-bond ranks, or a dict module path -> either; eps: relative
    error bound per layer (see converters.tt). layers: module paths to replace (default: every
    eligible layer where TT has fewer parameters). modes: dict module path -> (in_modes,
    out_modes) over channels / features (default balanced). naive: convs become NaiveTTConv2d.
    """
    kernels = {p: m.weight.detach().cpu().numpy() for p, m in model.named_modules()
               if type(m) is nn.Linear or (type(m) is nn.Conv2d and m.groups == 1)}
    done = factorize_layers(kernels, max_rank=max_rank, eps=eps, layers=layers, modes=modes, naive=naive)
    new = copy.deepcopy(model)
    for path, f in done.items():
        if f.report.replaced:
            old = new.get_submodule(path)
            kind = {"tt_conv2d": TTConv2d, "naive_tt_conv2d": NaiveTTConv2d}.get(f.report.op)
            layer = kind.from_conv(old, f) if kind else TTLinear.from_linear(old, f)
            new.set_submodule(path, layer.to(old.weight.device))
    return new, [f.report for f in done.values()]

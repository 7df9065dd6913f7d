"""Activations: relu, clip, leaky_relu, prelu, sigmoid, tanh, silu, hardswish, softmax, log_softmax.

`apply_act(y, act)` applies a fusable activation in place; conv2d_fast / linear_fast call it
after their bias add, and the activation ops apply it to a copy of their input, so fused and
unfused results are identical. An activation op's `act(node)` gives its fusion tuple.

Fast path: NumPy ufuncs are already vectorised, so run = reference for every op here.
Cost and counted: other = 1 per output element for relu, clip, leaky_relu, prelu, sigmoid, tanh,
silu and hardswish (one function evaluation, whatever its inner arithmetic); 4 per element for
softmax / log_softmax (max compare, exp of the shifted value, sum add, divide or subtract the log
of the sum), plus log_softmax's one log per reduced row.
"""
from __future__ import annotations

import numpy as np

from . import Cost, Op, PerElement, attr, mismatch, numel, register
from .shape import check_axis, int_min


def _sigmoid(y: np.ndarray) -> np.ndarray:
    """In place y = 1 / (1 + exp(-y)) (exp may overflow to inf for y < -88: gives 0, as torch)."""
    np.negative(y, out=y)
    with np.errstate(over="ignore"):
        np.exp(y, out=y)
    y += 1
    return np.reciprocal(y, out=y)


def residual_then_act(y: np.ndarray, residual=None, act=None) -> np.ndarray:
    """y + residual (NumPy broadcasting, a new array), then `act` in place: a fused add and
    activation applied after a kernel, in the unfused ops' order."""
    if residual is not None:
        y = np.add(y, residual)
    if act is not None:
        apply_act(y, act)
    return y


def apply_act(y: np.ndarray, act: tuple) -> np.ndarray:
    """Apply activation `act` to float32 `y` in place; act: ("relu",), ("clip", lo, hi),
    ("leaky_relu", slope), ("sigmoid",), ("tanh",), ("silu",) or ("hardswish",)."""
    kind = act[0]
    if kind == "relu":
        np.maximum(y, 0, out=y)
    elif kind == "clip":
        np.clip(y, act[1], act[2], out=y)
    elif kind == "leaky_relu":
        np.multiply(y, np.float32(act[1]), out=y, where=y < 0)
    elif kind == "sigmoid":
        _sigmoid(y)
    elif kind == "tanh":
        np.tanh(y, out=y)
    elif kind == "silu":
        y *= _sigmoid(y.copy())
    elif kind == "hardswish":
        t = np.clip(y + 3, 0, 6)  # relu6(y + 3)
        y *= t
        y /= 6
    else:
        raise ValueError(f"unknown activation {act!r}")
    return y


class _Act(PerElement):
    """An elementwise activation given entirely by its fusion tuple."""

    def check_attrs(self, node):
        self.act(node)

    def act(self, node) -> tuple:
        """The ("name", params...) tuple for apply_act; reads and checks the attributes."""
        return (self.name,)

    def reference(self, node, x):
        return apply_act(x.copy(), self.act(node))


@register
class Relu(_Act):
    name = "relu"


@register
class Sigmoid(_Act):
    name = "sigmoid"


@register
class Tanh(_Act):
    name = "tanh"


@register
class Silu(_Act):
    name = "silu"


@register
class Hardswish(_Act):
    name = "hardswish"


@register
class Clip(_Act):
    name = "clip"

    def act(self, node):
        return ("clip", attr(node, "min", float), attr(node, "max", float))


@register
class LeakyRelu(_Act):
    name = "leaky_relu"

    def act(self, node):
        return ("leaky_relu", attr(node, "negative_slope", float))


@register
class Prelu(PerElement):
    """y = x if x > 0 else w * x, w one slope (1) or one per channel (C) of dim 1."""
    name = "prelu"
    weights = ("weight",)

    def infer(self, node, in_shapes):
        x = tuple(in_shapes[0])
        w = node.weights.get("weight")
        allowed = [(1,)] + ([(x[1],)] if len(x) >= 2 else [])
        if w is None or w.dtype != np.float32 or w.shape not in allowed:
            got = "none" if w is None else f"{w.dtype} {w.shape}"
            raise mismatch(node, f"expected weight float32 {' or '.join(map(str, allowed))} "
                                 f"for input {x}, got {got}")
        return x

    def reference(self, node, x):
        w = node.weights["weight"]
        w = w.reshape((1, -1) + (1,) * (x.ndim - 2)) if w.size > 1 else w  # broadcast over dim 1
        return np.where(x > 0, x, w * x)


class _Softmax(Op):
    """Softmax family over attribute `axis`, shifted by the max for stability."""
    per_row = 0                                             # ops once per reduced row

    def check_attrs(self, node):
        int_min(node, "axis", 0)

    def infer(self, node, in_shapes):
        x = tuple(in_shapes[0])
        check_axis(node, x, "axis", node.attrs["axis"])
        return x

    def cost(self, node, in_shapes, out_shape):
        n = numel(out_shape)
        return Cost(other=4 * n + self.per_row * n // out_shape[node.attrs["axis"]])

    def counted(self, node, x):
        """4 passes over the elements of x, per_row ops for each of its rows along the axis."""
        rows = x.size // x.shape[node.attrs["axis"]]
        return self.reference(node, x), Cost(other=4 * x.size + self.per_row * rows)


@register
class Softmax(_Softmax):
    name = "softmax"

    def reference(self, node, x):
        axis = node.attrs["axis"]
        e = np.exp(x - x.max(axis=axis, keepdims=True))
        e /= e.sum(axis=axis, keepdims=True)
        return e


@register
class LogSoftmax(_Softmax):
    name = "log_softmax"
    per_row = 1                                             # the log of each row's sum

    def reference(self, node, x):
        axis = node.attrs["axis"]
        z = x - x.max(axis=axis, keepdims=True)
        z -= np.log(np.exp(z).sum(axis=axis, keepdims=True))
        return z

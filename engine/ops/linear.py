"""linear: y = x @ W.T + b over the last dim of an input of any rank.

Fast path `linear_fast`: gemm.linear_gemm, the sgemm of x viewed as (rows, in) against the
transposed weight view (no copy) split over Numba tasks with the bias add, then the fused
residual add and activation; a plan step sets it up once per input shape (`launcher`).
Cost: macs = rows*in*out (rows = product of the leading dims); other = rows*out (the bias add)
when there is a bias.
Counted: `linear_counted`, the counting conv kernel on x viewed as (rows, in, 1, 1).
"""
from __future__ import annotations

import numpy as np

from . import Cost, Op, mismatch, numel, per_shape, register
from .conv import check_weight, conv2d_counted
from .gemm import linear_gemm, prepare_linear


def linear_fast(x, weight, bias, act=None, residual=None):
    """x (..., in) @ weight (out, in).T + bias (out) or None, + residual, then activation `act`:
    gemm.linear_gemm (the sgemm in Numba tasks, single-threaded BLAS each)."""
    return linear_gemm(np.ascontiguousarray(x), weight, bias, act, residual)


def linear_counted(x, weight, bias):
    """(linear output, Cost executed): x (..., in) as a batch of 1x1 images through the counting
    conv kernel, so every row x output x input multiply-add is counted once."""
    out, inp = weight.shape
    y, cost = conv2d_counted(x.reshape(-1, inp, 1, 1), weight.reshape(out, inp, 1, 1), bias,
                             (1, 1), (0, 0, 0, 0), (1, 1), 1, "zeros")
    return y.reshape(x.shape[:-1] + (out,)), cost


@register
class Linear(Op):
    name = "linear"
    arena_output = True
    weights = ("weight",)
    optional_weights = ("bias",)

    def infer(self, node, in_shapes):
        x = tuple(in_shapes[0])
        w = node.weights.get("weight")
        if not x or w is None or w.ndim != 2:
            raise mismatch(node, f"expected input (..., in) and weight (out, in), got input {x} "
                                 f"and weight {None if w is None else w.shape}")
        check_weight(node, "weight", (w.shape[0], x[-1]))
        if "bias" in node.weights:
            check_weight(node, "bias", (w.shape[0],))
        return x[:-1] + (w.shape[0],)

    def reference(self, node, x):
        y = np.matmul(x, node.weights["weight"].T)
        if "bias" in node.weights:
            y += node.weights["bias"]
        return y

    def run(self, node, x):
        return linear_fast(x, node.weights["weight"], node.weights.get("bias"))

    def run_fused(self, node, xs, act=None, residual=None):
        return linear_fast(xs[0], node.weights["weight"], node.weights.get("bias"), act, residual)

    def launcher(self, node, act):
        """Set up once per input shape (gemm.prepare_linear)."""
        w, b = node.weights["weight"], node.weights.get("bias")
        return per_shape(lambda x_shape, residual: prepare_linear(x_shape, w, b, act))

    def cost(self, node, in_shapes, out_shape):
        out, inp = node.weights["weight"].shape
        rows = numel(out_shape[:-1])
        return Cost(macs=rows * inp * out, other=rows * out if "bias" in node.weights else 0)

    def counted(self, node, x):
        return linear_counted(x, node.weights["weight"], node.weights.get("bias"))

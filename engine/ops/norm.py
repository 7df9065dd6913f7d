"""batch_norm (eval): y = (x - running_mean) / sqrt(running_var + eps) * weight + bias over dim 1.

weight and bias are optional (absent: 1 and 0, as torch's affine=False), so a non-affine BN
stores no learnable parameters.

Computed as torch does, x * alpha + beta with per-channel alpha = weight / sqrt(var + eps) and
beta = bias - mean * alpha. A BN the plan cannot fold into its producer (after a contracted TT
conv, a pooling, an input) runs as a Numba kernel over planes with a following residual add and
activation fused, in the unfused ops' float32 rounding (TT VGG-16 at batch 16: BN and ReLU as
NumPy passes took 1.4 + 1.0 ms on each 32x32 layer).
Cost and counted: other = 1 per output element (x * alpha + beta as one op).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..buffers import empty
from ..errors import FormatError
from . import PerElement, attr, mismatch, register
from .activation import residual_then_act
from .conv import check_weight
from .gemm import _finish_in_place, act_code, threads


@njit(cache=True, parallel=True)
def _affine(x, alpha, beta, res, has_res, act, a0, a1, out, T):
    """out (B, C, P) = act(x * alpha[c] + beta[c] (+ res)), rounded as the unfused ops (the
    epilogue's act codes: gemm._finish_in_place); a run of (image, channel) planes per thread,
    indexed unsigned so that the loops vectorize."""
    B, C, P = x.shape
    xf = x.ravel()
    of = out.ravel()
    rf = res.ravel()
    for t in prange(T):
        for q in range(B * C * t // T, B * C * (t + 1) // T):
            a = alpha[q % C]
            for i in range(P):
                of[np.uintp(q * P + i)] = xf[np.uintp(q * P + i)] * a
            _finish_in_place(of, q * P, P, beta[q % C], rf, q * P, has_res, act, a0, a1)


@register
class BatchNorm(PerElement):
    name = "batch_norm"
    arena_output = True
    weights = ("running_mean", "running_var")
    optional_weights = ("weight", "bias")               # affine part; absent: 1 and 0
    fixed_weights = ("running_mean", "running_var")    # statistics, not trained by gradient

    def check_attrs(self, node):
        if attr(node, "eps", float) < 0:
            raise FormatError(f"node '{node.name}' (batch_norm): eps must be >= 0, "
                              f"got {node.attrs['eps']}")

    def infer(self, node, in_shapes):
        x = tuple(in_shapes[0])
        if len(x) < 2:
            raise mismatch(node, f"expected input (B, C, ...), got {x}")
        for name in self.weights + tuple(w for w in self.optional_weights if w in node.weights):
            check_weight(node, name, (x[1],))
        if not (node.weights["running_var"] + np.float32(node.attrs["eps"]) > 0).all():
            raise FormatError(f"node '{node.name}' ({node.op}): running_var + eps must be > 0")
        return x

    @staticmethod
    def affine(node) -> tuple[np.ndarray, np.ndarray]:
        """(gamma, beta), each (C): the stored weight and bias, or 1 and 0 when absent."""
        w = node.weights
        C = w["running_mean"].shape[0]
        return w.get("weight", np.ones(C, np.float32)), w.get("bias", np.zeros(C, np.float32))

    def scale_shift(self, node) -> tuple[np.ndarray, np.ndarray]:
        """(alpha, beta), each (C): y = x * alpha + beta."""
        w = node.weights
        gamma, beta0 = self.affine(node)
        alpha = gamma / np.sqrt(w["running_var"] + np.float32(node.attrs["eps"]))  # (C)
        return alpha, beta0 - w["running_mean"] * alpha

    def reference(self, node, x):
        alpha, beta = self.scale_shift(node)
        shape = (1, -1) + (1,) * (x.ndim - 2)  # broadcast over dim 1
        return x * alpha.reshape(shape) + beta.reshape(shape)

    def run(self, node, x):
        return self.run_fused(node, [x])

    def run_fused(self, node, xs, act=None, residual=None):
        """The Numba kernel, with a residual of the output's shape and a simple activation in
        it; others after it (activation.residual_then_act)."""
        x = np.ascontiguousarray(xs[0], np.float32)
        alpha, beta = self.scale_shift(node)          # (C) each
        B, C = x.shape[0], x.shape[1]
        out = empty(x.shape)                          # the step's arena memory (buffers.py)
        code, a0, a1, done = act_code(act)
        fused = residual is not None and residual.shape == x.shape and residual.dtype == np.float32
        if residual is not None and not fused:      # NumPy broadcasts it, then the activation
            done = False
        res = np.ascontiguousarray(residual) if fused else out
        _affine(x.reshape(B, C, -1), alpha, beta, res.reshape(B, C, -1), fused,
                code if done else 0, a0, a1, out.reshape(B, C, -1), threads())
        return residual_then_act(out, None if fused else residual, None if done else act)

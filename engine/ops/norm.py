"""batch_norm (eval): y = (x - running_mean) / sqrt(running_var + eps) * weight + bias over dim 1.

weight and bias are optional (absent: 1 and 0, as torch's affine=False), so a non-affine BN
stores no learnable parameters.

Computed as torch does, x * alpha + beta with per-channel alpha = weight / sqrt(var + eps) and
beta = bias - mean * alpha. NumPy is the fast path (run = reference).
Cost and counted: other = 1 per output element (x * alpha + beta as one op).
"""
from __future__ import annotations

import numpy as np

from ..errors import FormatError
from . import PerElement, attr, mismatch, register
from .conv import check_weight


@register
class BatchNorm(PerElement):
    name = "batch_norm"
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

    def reference(self, node, x):
        w = node.weights
        gamma, beta0 = self.affine(node)
        alpha = gamma / np.sqrt(w["running_var"] + np.float32(node.attrs["eps"]))  # (C)
        beta = beta0 - w["running_mean"] * alpha  # (C)
        shape = (1, -1) + (1,) * (x.ndim - 2)  # broadcast over dim 1
        return x * alpha.reshape(shape) + beta.reshape(shape)

"""add, mul: two inputs with NumPy (= PyTorch) broadcasting, or one input and attribute scalar.

NumPy ufuncs are the fast path (run = reference).
Cost and counted: other = 1 per output element (broadcasting included).
"""
from __future__ import annotations

import numpy as np

from ..errors import FormatError
from . import PerElement, attr, mismatch, register


class _Binary(PerElement):
    n_inputs = None
    ufunc = None  # the NumPy ufunc of the op

    def check_attrs(self, node):
        if len(node.inputs) == 1:
            attr(node, "scalar", float)
        elif len(node.inputs) != 2 or "scalar" in node.attrs:
            raise FormatError(f"node '{node.name}' ({node.op}): expected two inputs, or one input "
                              f"and attribute scalar; got {len(node.inputs)} inputs and "
                              f"attributes {sorted(node.attrs)}")

    def infer(self, node, in_shapes):
        try:
            return tuple(np.broadcast_shapes(*map(tuple, in_shapes)))
        except ValueError:
            raise mismatch(node, f"expected broadcastable inputs, got {in_shapes}") from None

    def reference(self, node, *xs):
        if len(xs) == 1:
            return self.ufunc(xs[0], np.float32(node.attrs["scalar"]))
        return self.ufunc(*xs)


@register
class Add(_Binary):
    name = "add"
    ufunc = np.add


@register
class Mul(_Binary):
    name = "mul"
    ufunc = np.multiply

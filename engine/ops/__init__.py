"""Op registry. One module per op family; each op holds its shape check, its plain NumPy
reference kernel, its fast kernel and its operation count together.

An op is an `Op` subclass instance registered under its file-format name with `@register`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import FormatError, ShapeMismatch
from ..graph import Node

OPS: dict[str, "Op"] = {}


@dataclass(frozen=True)
class Cost:
    """Operations one node executes for one call, by kind (never mixed).

    macs:  multiply-accumulates of conv / linear / basis / TT contractions (1 MAC = 1 mul + 1 add).
    other: everything else, one per output element op: bias adds, BN, activations, pooling
           compares/adds, elementwise add/mul, softmax terms.
    """
    macs: int = 0
    other: int = 0


class Op:
    """Base of every op type. Subclasses set `name`, `weights`, and override what differs."""
    name: str = ""
    n_inputs: int | None = 1               # None: one or more
    weights: tuple[str, ...] = ()           # required weight names
    optional_weights: tuple[str, ...] = ()  # weights that may be absent (e.g. "bias")
    fixed_weights: tuple[str, ...] = ()     # stored but not learnable (BN statistics, a fixed basis)

    # --- validation -----------------------------------------------------------------------
    def check_attrs(self, node: Node) -> None:
        """Raise FormatError if an attribute is missing, mistyped or out of range."""

    def infer(self, node: Node, in_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        """Output shape for these input shapes; raise ShapeMismatch when they do not fit.

        Also checks every weight's shape against the attributes and inputs, so that after a
        successful infer the kernels' memory accesses are in bounds.
        """
        return tuple(in_shapes[0])

    # --- kernels --------------------------------------------------------------------------
    def reference(self, node: Node, *xs: np.ndarray) -> np.ndarray:
        """Plain NumPy definition of the op: the specification the fast kernel is held to."""
        raise NotImplementedError

    def run(self, node: Node, *xs: np.ndarray) -> np.ndarray:
        """Fast kernel (Numba / BLAS); by default the reference."""
        return self.reference(node, *xs)

    # --- counting -------------------------------------------------------------------------
    def cost(self, node: Node, in_shapes: list[tuple[int, ...]], out_shape: tuple[int, ...]) -> Cost:
        return Cost()


def register(cls):
    op = cls()
    OPS[op.name] = op
    return cls


# helpers for op modules ---------------------------------------------------------------------

def attr(node: Node, key: str, kind, length: int | None = None, default=...):
    """Read and type-check attribute `key` of `node` (kind: int, float, bool, str, list-of-int...)."""
    if key not in node.attrs:
        if default is not ...:
            return default
        raise FormatError(f"node '{node.name}' ({node.op}): missing attribute '{key}'")
    v = node.attrs[key]
    if length is not None:
        if not isinstance(v, list) or len(v) != length or not all(_is(x, kind) for x in v):
            raise FormatError(f"node '{node.name}' ({node.op}): attribute '{key}' must be a list of "
                              f"{length} {kind.__name__}, got {v!r}")
        return [kind(x) for x in v]
    if not _is(v, kind):
        raise FormatError(f"node '{node.name}' ({node.op}): attribute '{key}' must be "
                          f"{kind.__name__}, got {v!r}")
    return kind(v)


def _is(v, kind) -> bool:
    if kind is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if kind is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return isinstance(v, kind)


def mismatch(node: Node, what: str) -> ShapeMismatch:
    return ShapeMismatch(f"node '{node.name}' ({node.op}): {what}")


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def load_all() -> None:
    """Import every op family so that OPS is complete."""
    from . import activation, conv, elementwise, linear, norm, pool, shape  # noqa: F401

"""Op registry. One module per op family; each op holds its shape check, its plain NumPy
reference kernel, its fast kernel, its operation count (`cost`, from shapes) and its counting
kernel (`counted`, which counts what it executes) together. Counting rules: docs/COUNTING.md.

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
    other: everything else, one per element operation: bias adds, BN, activations, pooling
           compares / adds / divides, elementwise add / mul, softmax terms (docs/COUNTING.md).
    """
    macs: int = 0
    other: int = 0

    def __add__(self, o: "Cost") -> "Cost":
        return Cost(self.macs + o.macs, self.other + o.other)


class Op:
    """Base of every op type. Subclasses set `name`, `weights`, and override what differs."""
    name: str = ""
    n_inputs: int | None = 1               # None: one or more
    weights: tuple[str, ...] = ()           # required weight names
    optional_weights: tuple[str, ...] = ()  # weights that may be absent (e.g. "bias")
    fixed_weights: tuple[str, ...] = ()     # stored but not learnable (BN statistics, a fixed basis)
    view: bool = False                      # the output is a view of input 0 (no buffer of its own)
    arena_output: bool = False              # the output is new memory from buffers.empty, never a
                                            # view of an input: a plan may lay it out in the arena

    # --- validation -----------------------------------------------------------------------
    def check_attrs(self, node: Node) -> None:
        """Raise FormatError if an attribute is missing, mistyped or out of range."""

    def infer(self, node: Node, in_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        """Output shape for these input shapes; raise ShapeMismatch when they do not fit.

        Also checks every weight's shape against the attributes and inputs, so that after a
        successful infer the kernels' memory accesses are in bounds.
        """
        return tuple(in_shapes[0])

    def workspace(self, node: Node, in_shapes: list[tuple[int, ...]], out_shape: tuple[int, ...]) -> int:
        """Scratch elements the kernels allocate besides the output (checked against the limits)."""
        return 0

    # --- kernels --------------------------------------------------------------------------
    def reference(self, node: Node, *xs: np.ndarray) -> np.ndarray:
        """Plain NumPy definition of the op: the specification the fast kernel is held to."""
        raise NotImplementedError

    def run(self, node: Node, *xs: np.ndarray) -> np.ndarray:
        """Fast kernel (Numba / BLAS); by default the reference."""
        return self.reference(node, *xs)

    def run_fused(self, node: Node, xs: list, act: tuple | None = None,
                  residual: np.ndarray | None = None) -> np.ndarray:
        """What a plan step executes: run, then + residual (a fused add) and the activation
        `act` (activation.apply_act), the unfused ops' arithmetic in their order. Ops whose
        kernels apply these in their epilogue override it."""
        return residual_then_act(self.run(node, *xs), residual, act)

    def lowered(self, node: Node) -> Node:
        """The node a plan runs in this one's place (default: itself), before it fuses
        neighbours into it: a TT layer run dense becomes the conv2d / linear of its rebuilt
        kernel."""
        return node

    def launcher(self, node: Node, act: tuple | None):
        """What a plan step calls, launch(xs, residual) -> output: run_fused with the node and
        activation bound. Ops with per-shape set-up worth doing once (the GEMM convs) override
        it."""
        return lambda xs, residual: self.run_fused(node, xs, act, residual)

    # --- counting -------------------------------------------------------------------------
    def cost(self, node: Node, in_shapes: list[tuple[int, ...]], out_shape: tuple[int, ...]) -> Cost:
        """Operations of one call, from the shapes alone (the analytic count)."""
        return Cost()

    def counted(self, node: Node, *xs: np.ndarray) -> tuple[np.ndarray, Cost]:
        """(output, operations executed): a counting kernel that computes the reference's output
        and counts what it executes as it runs (MACs one by one in a loop kernel; other ops from
        the arrays it processes), so that `cost` can be checked against an execution."""
        raise NotImplementedError(f"op '{self.name}' has no counting kernel")

    def count_details(self, node: Node, in_shapes: list[tuple[int, ...]],
                      out_shape: tuple[int, ...]) -> dict:
        """Extra per-op fields of a count row (e.g. a basis layer's rank and break-even rank)."""
        return {}


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


class PerElement(Op):
    """An op costing one other op per output element (activations, BN, add, mul)."""

    def cost(self, node, in_shapes, out_shape):
        return Cost(other=numel(out_shape))

    def counted(self, node, *xs):
        """The reference output, one other op per element of it."""
        y = self.reference(node, *xs)
        return y, Cost(other=y.size)


def residual_key(residual):
    """What a prepared launch depends on of a residual: its (shape, dtype), or None."""
    return None if residual is None else (residual.shape, residual.dtype)


def per_shape(prepare):
    """A plan step's launch(xs, residual) -> output (Op.launcher) that calls
    prepare(x_shape, residual's (shape, dtype) or None) once per input shape and residual and
    then the launch(x, residual) it returned, so that per-shape set-up runs once."""
    launches = {}

    def launch(xs, residual):
        x = xs[0]
        key = (x.shape, residual_key(residual))
        run = launches.get(key)
        if run is None:
            if len(launches) >= 64:
                launches.clear()
            run = launches[key] = prepare(*key)
        return run(x, residual)
    return launch


def per_shape_then_act(setup, apply, act):
    """per_shape for ops with no epilogue of their own (pooling, views): setup(x_shape) once
    per input shape, then residual_then_act(apply(x, what setup returned), residual, act)."""
    def prepare(x_shape, residual):
        done = setup(x_shape)
        return lambda x, r: residual_then_act(apply(x, done), r, act)
    return per_shape(prepare)


def load_all() -> None:
    """Import every op family so that OPS is complete."""
    from . import activation, basis, conv, elementwise, linear, norm, pool, shape, tt  # noqa: F401


# last: activation imports the names above (a per-call import in run_fused cost ~2 us a step)
from .activation import residual_then_act  # noqa: E402

"""Load-time lowering of a Graph into a Plan: validate every node, fold BatchNorm into the
producing conv/linear, fuse a residual add and a following activation into the producer's
epilogue, and order the steps with each tensor freed after its last use. A Plan is immutable after construction, so one Plan serves many threads.

Validation is what makes the kernels safe (they do no bounds checks): attribute values as JSON
can hold them, each op's check_attrs and infer, then for every input shape a run sees: every
tensor non-empty and within the limits, each kernel's scratch buffers (Op.workspace) too, and
what one call holds at once; at load, the ops of a batch-1 run.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace

import numpy as np

from . import buffers
from .errors import FormatError, InputError, LimitError, ShapeMismatch, UnsupportedOpError
from .format import Limits
from .graph import Graph, Node
from .ops import OPS, load_all, mismatch, numel

load_all()

# ops whose output channel is axis 0 of the named weight and that take an optional "bias":
# a following eval BatchNorm folds into them
BN_FOLDABLE = {"conv2d": "weight", "linear": "weight", "basis_conv2d": "combine", "basis_linear": "combine"}
LAST_AXIS_OUTPUTS = {"linear", "basis_linear"}
ACT_TARGETS = set(BN_FOLDABLE) | {"batch_norm"}    # ops that take a residual add and act fused
FLOAT32_MAX = float(np.finfo(np.float32).max)
MAX_ATTR_DEPTH = 8


def validate(graph: Graph, limits: Limits) -> dict[str, tuple[int, ...]]:
    """Check every node's op, attributes and weights against the declared input shapes (batch 1).

    Returns every tensor's shape at batch 1. Raises UnsupportedOpError / FormatError / LimitError.
    """
    for n in graph.nodes:
        if n.op not in OPS:
            raise UnsupportedOpError(f"node '{n.name}' (module '{n.module}'): op '{n.op}' is not "
                                     f"supported by this engine (known: {', '.join(sorted(OPS))})")
        op = OPS[n.op]
        if op.n_inputs is not None and len(n.inputs) != op.n_inputs:
            raise FormatError(f"node '{n.name}' ({n.op}): expected {op.n_inputs} input(s), got {len(n.inputs)}")
        if op.n_inputs is None and not n.inputs:
            raise FormatError(f"node '{n.name}' ({n.op}): expected at least one input")
        missing = [w for w in op.weights if w not in n.weights]
        extra = [w for w in n.weights if w not in op.weights + op.optional_weights]
        if missing or extra:
            raise FormatError(f"node '{n.name}' ({n.op}): weights expected {list(op.weights)} "
                              f"(+ optional {list(op.optional_weights)}), got {list(n.weights)}")
        for key, value in n.attrs.items():
            _check_value(n, key, value, 0)
        op.check_attrs(n)
    try:
        shapes = infer_shapes(graph, {t.name: tuple(1 if s is None else s for s in t.shape)
                                      for t in graph.inputs}, limits)
    except ShapeMismatch as e:
        raise FormatError(str(e)) from None
    for n in graph.nodes:  # the shapes the file claims must be the ones the graph makes
        if n.shape is not None and (len(n.shape) != len(shapes[n.name])
                                    or list(n.shape[1:]) != list(shapes[n.name][1:])):
            raise FormatError(f"node '{n.name}' ({n.op}): the file says output shape {n.shape}, "
                              f"the graph makes {shapes[n.name]} at batch 1")
    ops = 0
    for n in graph.nodes:
        cost = OPS[n.op].cost(n, [shapes[i] for i in n.inputs], shapes[n.name])
        ops += cost.macs + cost.other
        if ops > limits.max_ops:
            raise LimitError(f"node '{n.name}' ({n.op}): a batch-1 run needs more than max_ops "
                             f"{limits.max_ops} operations by this node")
    return shapes


def _check_value(node: Node, key: str, value, depth: int) -> None:
    """Attribute values as JSON holds them: ints within int64, finite floats within float32's
    range, nesting at most MAX_ATTR_DEPTH deep (the ops check types and ranges)."""
    bad = None
    if depth > MAX_ATTR_DEPTH:
        bad = f"nested more than {MAX_ATTR_DEPTH} deep"
    elif isinstance(value, (list, tuple, dict)):
        for v in value.values() if isinstance(value, dict) else value:
            _check_value(node, key, v, depth + 1)
    elif isinstance(value, (bool, np.bool_)) or value is None or isinstance(value, str):
        pass
    elif isinstance(value, (int, np.integer)):
        if not -(1 << 63) <= value < 1 << 63:
            bad = f"holds {value}, beyond int64"
    elif isinstance(value, (float, np.floating)):
        if not abs(value) <= FLOAT32_MAX:
            bad = f"holds {value}, not a finite float32 value"
    else:
        bad = f"holds a {type(value).__name__}, not a JSON value"
    if bad:
        raise FormatError(f"node '{node.name}' ({node.op}): attribute '{key}' {bad}")


def infer_shapes(graph: Graph, input_shapes: dict[str, tuple], limits: Limits) -> dict[str, tuple]:
    """Every tensor's shape for these input shapes. Raises ShapeMismatch (a node rejects its
    inputs, or a tensor is empty) or LimitError (a tensor's rank or size, or a node's scratch
    buffers, over the limits)."""
    shapes = {}
    for name, shape in input_shapes.items():
        shapes[name] = _tensor(f"input '{name}'", tuple(int(s) for s in shape), limits)
    for n in graph.nodes:
        op = OPS[n.op]
        ins = [shapes[i] for i in n.inputs]
        out = tuple(int(s) for s in op.infer(n, ins))
        if min(out, default=1) < 1:
            raise mismatch(n, f"empty output {out} for input(s) {ins}")
        shapes[n.name] = _tensor(f"node '{n.name}' ({n.op})", out, limits)
        if op.workspace(n, ins, out) > limits.max_activation_elements:
            raise LimitError(f"node '{n.name}' ({n.op}): scratch buffers for input(s) {ins} exceed "
                             f"max_activation_elements {limits.max_activation_elements}")
    return shapes


def _tensor(where: str, shape: tuple, limits: Limits) -> tuple:
    """`shape`, unless its rank or element count is over the limits (LimitError)."""
    if len(shape) > limits.max_dims or numel(shape) > limits.max_activation_elements:
        raise LimitError(f"{where}: shape {shape} over limits (max_dims {limits.max_dims}, "
                         f"max_activation_elements {limits.max_activation_elements})")
    return shape


@dataclass(frozen=True)
class Step:
    node: Node                 # the node to run (weights possibly folded)
    act: tuple | None          # activation fused into its output, or None
    output: str                # tensor name it produces (the last fused node's name)
    frees: tuple[str, ...]     # tensors dead after this step
    residual: str | None = None  # tensor added to its output before `act` (a fused add), or None
    covers: tuple[str, ...] = ()  # the file's nodes it runs: its own, then the BN, add and
                                  # activation fused into it


class Plan:
    """What runs on each call: steps over fused nodes, with per-input-shape checks cached."""

    def __init__(self, graph: Graph, limits: Limits | None = None):
        self.graph = graph
        self.limits = limits or Limits()
        self.shapes = validate(graph, self.limits)      # batch-1 shapes, for inspect/count
        self.steps = _lower(graph, self.shapes)
        # what run() executes: per step the op's launch and the names it reads and writes
        self._program = tuple((OPS[st.node.op].launcher(st.node, st.act), tuple(st.node.inputs),
                               st.residual, st.output, st.frees) for st in self.steps)
        self._checked: dict[tuple, tuple] = {}
        self._lock = threading.Lock()
        self._arenas = buffers.ArenaPool()      # calls' memory (engine/buffers.py)
        self._check({t.name: self.shapes[t.name] for t in graph.inputs}, keep_all=False)

    def check_inputs(self, xs: dict[str, np.ndarray], keep_all: bool = False) -> dict[str, tuple]:
        """Shapes of every tensor for these inputs (arrays, or anything with a .shape). InputError
        if a node rejects them; LimitError if a call would hold too much at once: the fused
        plan's peak, or with keep_all every tensor (Model.activations)."""
        return self._check({k: tuple(x.shape) for k, x in xs.items()}, keep_all)[0]

    def _check(self, input_shapes: dict[str, tuple], keep_all: bool) -> tuple:
        """(shapes, layout) for these input shapes, worked out once for each (see check_inputs
        and _layout)."""
        key = tuple(input_shapes.values())
        hit = self._checked.get(key)
        if hit is None:
            try:
                shapes = infer_shapes(self.graph, input_shapes, self.limits)
            except ShapeMismatch as e:
                got = ", ".join(f"'{k}' {s}" for k, s in input_shapes.items())
                raise InputError(f"input shape(s) {got} do not fit the model: {e}") from None
            hit = (shapes, self._layout(shapes), self.peak_elements(shapes),
                   sum(map(numel, shapes.values())))
            with self._lock:
                if len(self._checked) > 64:
                    self._checked.clear()
                self._checked[key] = hit
        shapes, layout, peak, total = hit
        held = total if keep_all else peak
        if held > self.limits.max_live_elements:
            raise LimitError(f"a call on input(s) {list(key)} would hold {held} values at once"
                             f"{' (every node kept)' if keep_all else ''}, over max_live_elements "
                             f"{self.limits.max_live_elements}")
        return shapes, layout

    def _layout(self, shapes: dict[str, tuple]) -> tuple:
        """Per step, (offset, shape) of its output in a call's activation block, or None where
        the step's memory is not the arena's: ops not marked Op.arena_output (their output may
        be a view of an input, or NumPy's new array) and outputs the caller gets (a graph output
        or anything it may view). An output is alive from its step to the last step reading it
        or a tensor that may view it. Outputs alive at once go to different slots, and each
        output lies centred in its slot (buffers.centred): the first half of the images at the
        same addresses in every step, so that with two threads each touches its own memory."""
        # within: tensor -> the steps whose output it may view; last: step -> its last reader
        within = {t.name: () for t in self.graph.inputs}
        last = {}
        for i, st in enumerate(self.steps):
            reads = [*st.node.inputs, *([st.residual] if st.residual else [])]
            for t in reads:
                last.update(dict.fromkeys(within[t], i))
            within[st.output] = ((i,) if OPS[st.node.op].arena_output else
                                 tuple({b for t in reads for b in within[t]}))
            last.setdefault(i, i)
        callers = {b for _, t in self.graph.outputs for b in within[t]}
        slots, until, slot_of = [], [], {}      # per slot: values, the last step reading it now
        for i, st in enumerate(self.steps):
            if not OPS[st.node.op].arena_output or i in callers:
                continue
            n = buffers.align(numel(shapes[st.output]))
            free = [j for j in range(len(slots)) if until[j] < i]
            fits = [j for j in free if slots[j] >= n]
            j = (min(fits, key=slots.__getitem__) if fits else
                 max(free, key=slots.__getitem__) if free else len(slots))
            if j == len(slots):
                slots.append(0)
                until.append(0)
            slots[j], until[j], slot_of[i] = max(slots[j], n), last[i], j
        return tuple((buffers.centred(slots, slot_of[i], numel(shapes[st.output])),
                      shapes[st.output]) if i in slot_of else None
                     for i, st in enumerate(self.steps))

    def peak_elements(self, shapes: dict[str, tuple]) -> int:
        """Most values alive at once while the fused steps run (inputs and outputs included).
        A view op's output (Op.view) lives in its input's buffer, freed with the last tensor
        in it; kernels' scratch buffers are not included."""
        buffer = {t.name: t.name for t in self.graph.inputs}   # live tensor -> its buffer
        size = {t.name: numel(shapes[t.name]) for t in self.graph.inputs}  # buffer -> values
        tensors = dict.fromkeys(size, 1)                        # buffer -> live tensors in it
        held = peak = sum(size.values())
        for step in self.steps:
            b = buffer[step.node.inputs[0]] if OPS[step.node.op].view else step.output
            if b not in size:
                size[b] = numel(shapes[step.output])
                held += size[b]
                peak = max(peak, held)
            buffer[step.output] = b
            tensors[b] = tensors.get(b, 0) + 1
            for t in step.frees:
                b = buffer.pop(t)
                tensors[b] -= 1
                if not tensors[b]:
                    held -= size.pop(b)
        return peak

    def run(self, xs: dict[str, np.ndarray], timings: list | None = None) -> dict[str, np.ndarray]:
        """Run the fused steps; returns the graph outputs by node name. Each step's output is
        its planned range of the call's arena where it has one (engine/buffers.py). timings (a
        list): each step's seconds appended to it, in order (Model.profile)."""
        input_shapes = {k: tuple(x.shape) for k, x in xs.items()}
        _, layout = self._check(input_shapes, keep_all=False)
        env = dict(xs)
        token, arena = buffers.using(self._arenas)
        try:
            for (launch, inputs, residual, output, frees), out in zip(
                    self._program, arena.outputs(tuple(input_shapes.values()), layout)):
                arena.out = out
                start = time.perf_counter() if timings is not None else 0.0
                env[output] = launch([env[i] for i in inputs],
                                     None if residual is None else env[residual])
                if timings is not None:
                    timings.append(time.perf_counter() - start)
                for t in frees:
                    del env[t]
        finally:
            buffers.done(token)
        return {n: env[n] for _, n in self.graph.outputs}


def _lower(graph: Graph, shapes: dict) -> list[Step]:
    users = graph.consumers()
    by_name = {n.name: n for n in graph.nodes}
    absorbed: set[str] = set()
    available = {t.name for t in graph.inputs}           # tensors produced by earlier steps
    fused: list[tuple[Node, tuple | None, str, str | None, tuple]] = []
    for n in graph.nodes:
        if n.name in absorbed:
            continue
        node, act, out, residual = OPS[n.op].lowered(n), None, n.name, None
        covers = [n.name]
        if node.op in ACT_TARGETS:
            nxt = _sole_consumer(out, users, by_name)
            # BN normalises axis 1: foldable when that is the producer's output-channel axis
            # (linear ops write their outputs along the last axis: only rank-2 outputs qualify)
            if (nxt is not None and nxt.op == "batch_norm" and node.op in BN_FOLDABLE
                    and (node.op not in LAST_AXIS_OUTPUTS or len(shapes[n.name]) == 2)):
                node = _fold_bn(node, nxt, BN_FOLDABLE[node.op])
                absorbed.add(nxt.name)
                out = nxt.name
                covers.append(out)
                nxt = _sole_consumer(out, users, by_name)
            # a residual add out + r (r computed by an earlier step, same shape): into the epilogue
            if nxt is not None and nxt.op == "add" and len(nxt.inputs) == 2 and "scalar" not in nxt.attrs:
                other = nxt.inputs[1] if nxt.inputs[0] == out else nxt.inputs[0]
                if other != out and other in available and shapes[other] == shapes[out]:
                    residual = other
                    absorbed.add(nxt.name)
                    out = nxt.name
                    covers.append(out)
                    nxt = _sole_consumer(out, users, by_name)
            act_of = getattr(OPS[nxt.op], "act", None) if nxt is not None else None  # activations
            if act_of is not None:
                act = act_of(nxt)
                absorbed.add(nxt.name)
                out = nxt.name
                covers.append(out)
        fused.append((node, act, out, residual, tuple(covers)))
        available.add(out)
    # free each tensor after the step that reads it last (graph outputs are never freed)
    keep = {n for _, n in graph.outputs}
    last_use: dict[str, int] = {}
    for i, (node, _, _, residual, _) in enumerate(fused):
        for t in [*node.inputs, *([residual] if residual else [])]:
            last_use[t] = i
    frees: list[list[str]] = [[] for _ in fused]
    for t, i in last_use.items():
        if t not in keep:
            frees[i].append(t)
    return [Step(node, act, out, tuple(fr), residual, covers)
            for (node, act, out, residual, covers), fr in zip(fused, frees)]


def _sole_consumer(tensor: str, users: dict, by_name: dict) -> Node | None:
    """The node reading `tensor` when it is the only reader and `tensor` is no graph output."""
    u = users.get(tensor, [])
    return by_name[u[0]] if len(u) == 1 and u[0] else None


def _fold_bn(node: Node, bn: Node, weight_name: str) -> Node:
    """Fold eval BatchNorm y = (x - mean) / sqrt(var + eps) * gamma + beta into node's output channels."""
    w = bn.weights
    gamma, beta = OPS["batch_norm"].affine(bn)
    scale = gamma.astype(np.float64) / np.sqrt(w["running_var"].astype(np.float64) + float(bn.attrs["eps"]))
    weights = dict(node.weights)
    kernel = weights[weight_name]                       # (N, ...) output channels first
    if kernel.shape[0] != scale.shape[0]:
        raise FormatError(f"node '{bn.name}' (batch_norm): {scale.shape[0]} channels after "
                          f"node '{node.name}' with {kernel.shape[0]} outputs")
    weights[weight_name] = (kernel * scale.reshape((-1,) + (1,) * (kernel.ndim - 1))).astype(np.float32)
    bias = weights.get("bias", np.zeros(kernel.shape[0], np.float32)).astype(np.float64)
    weights["bias"] = ((bias - w["running_mean"]) * scale + beta).astype(np.float32)
    return replace(node, weights=weights)

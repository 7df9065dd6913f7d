"""Per-node operation counts: MACs, FLOPs, parameters (stored and learnable), bytes, and the
peak activation memory of a run under the engine's buffer plan. What is counted: docs/COUNTING.md.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .ops import OPS, numel
from .plan import infer_shapes

BYTES_PER_VALUE = 4  # float32


@dataclass
class CountRow:
    name: str
    op: str
    output_shape: tuple
    macs: int               # multiply-accumulates (conv, linear, basis, TT contractions)
    flops: int              # 2 x macs
    other_ops: int          # non-MAC ops: bias adds, BN, activations, pooling, elementwise
    params: int             # values stored in the file for this node
    learnable_params: int   # of those, the ones training updates (fixed basis / BN stats excluded)
    weight_bytes: int
    activation_bytes: int   # this node's output


@dataclass
class CountReport:
    input_shape: dict
    nodes: list[CountRow] = field(default_factory=list)
    total: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"input_shape": self.input_shape, "nodes": [asdict(r) for r in self.nodes],
                "total": self.total}


def count(model, input_shape=None, *, executed: bool = False) -> CountReport:
    """Count every node of the file's graph for `input_shape` (default: reference input, batch 1)."""
    graph = model.graph
    shapes_in = _input_shapes(model, input_shape)
    shapes = infer_shapes(graph, shapes_in, model.plan.limits)
    report = CountReport({k: list(v) for k, v in shapes_in.items()})
    for n in graph.nodes:
        op = OPS[n.op]
        cost = op.cost(n, [shapes[i] for i in n.inputs], shapes[n.name])
        params = sum(w.size for w in n.weights.values())
        fixed = sum(n.weights[w].size for w in op.fixed_weights if w in n.weights)
        report.nodes.append(CountRow(n.name, n.op, shapes[n.name], cost.macs, 2 * cost.macs, cost.other,
                                     params, params - fixed, params * BYTES_PER_VALUE,
                                     numel(shapes[n.name]) * BYTES_PER_VALUE))
    keys = ("macs", "flops", "other_ops", "params", "learnable_params", "weight_bytes", "activation_bytes")
    report.total = {k: sum(getattr(r, k) for r in report.nodes) for k in keys}
    report.total["peak_activation_bytes"] = _peak_bytes(model.plan, shapes)
    return report


def _input_shapes(model, input_shape) -> dict[str, tuple]:
    inputs = model.graph.inputs
    if input_shape is None:
        if model.references.runs:
            return {t.name: (1,) + model.references.runs[0].inputs[t.name].shape[1:] for t in inputs}
        return {t.name: tuple(1 if s is None else s for s in t.shape) for t in inputs}
    shapes = [input_shape] if len(inputs) == 1 else list(input_shape)
    return {t.name: tuple(int(s) for s in sh) for t, sh in zip(inputs, shapes)}


def _peak_bytes(plan, shapes) -> int:
    """Largest sum of live tensors while the fused plan runs (inputs and outputs included)."""
    live = {t.name: numel(shapes[t.name]) for t in plan.graph.inputs}
    peak = sum(live.values())
    for step in plan.steps:
        live[step.output] = numel(shapes[step.output])
        peak = max(peak, sum(live.values()))
        for t in step.frees:
            live.pop(t, None)
    return peak * BYTES_PER_VALUE

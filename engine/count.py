"""Per-node operation counts: MACs, FLOPs, other ops, parameters (stored and learnable), bytes,
the peak activation memory of a run under the engine's buffer plan; optionally the counts the
counting kernels execute (`executed=True`), and reduction factors against a dense model.
What is counted, exactly: docs/COUNTING.md.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field, fields
from types import SimpleNamespace

import numpy as np

from .errors import InputError
from .ops import OPS, Cost, numel

BYTES_PER_VALUE = 4  # float32
SUMMED = ("macs", "flops", "other_ops", "params", "learnable_params", "weight_bytes", "activation_bytes")
REDUCED = ("macs", "params", "learnable_params", "weight_bytes")   # the --against factors


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
    details: dict = field(default_factory=dict)  # per-op fields (Op.count_details)
    executed_macs: int | None = None             # counted by the counting kernels (executed=True)
    executed_other: int | None = None

    @property
    def mismatch(self) -> bool:
        """The counting kernels executed something else than the analytic count says."""
        return self.executed_macs is not None and \
            (self.executed_macs, self.executed_other) != (self.macs, self.other_ops)

    def to_dict(self) -> dict:
        """Flat dict: the fields, the per-op details, and the executed ones when counted."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "details"}
        d["output_shape"] = list(self.output_shape)
        d.update(self.details)
        if self.executed_macs is None:
            del d["executed_macs"], d["executed_other"]
        else:
            d["mismatch"] = self.mismatch
        return d


@dataclass
class CountReport:
    input_shape: dict                   # input name -> shape counted
    nodes: list[CountRow] = field(default_factory=list)
    total: dict = field(default_factory=dict)

    @property
    def executed(self) -> bool:
        return any(r.executed_macs is not None for r in self.nodes)

    @property
    def mismatches(self) -> list[CountRow]:
        return [r for r in self.nodes if r.mismatch]

    def to_dict(self, against: "CountReport | None" = None) -> dict:
        """{"input_shape", "nodes", "total"}; with `against`, "<key>_reduction" fields (dense /
        this, None where undefined) on every node matched by name and on the total."""
        nodes, total = [r.to_dict() for r in self.nodes], dict(self.total)
        if against is not None:
            per_node, overall = reductions(self, against)
            for d in nodes:
                d.update({f"{k}_reduction": v for k, v in per_node.get(d["name"], {}).items()})
            total.update({f"{k}_reduction": v for k, v in overall.items()})
        return {"input_shape": self.input_shape, "nodes": nodes, "total": total}


def count(model, input_shape=None, *, executed: bool = False) -> CountReport:
    """Count every node of the file's graph (unfused) for `input_shape`: one shape, or one per
    input for multi-input models (default: the stored reference input at batch 1). With
    executed, also run the graph through every op's counting kernel (Op.counted) and record
    what they execute next to the analytic counts."""
    graph = model.graph
    shapes_in = _input_shapes(model, input_shape)
    stand_ins = {k: SimpleNamespace(shape=s) for k, s in shapes_in.items()}  # shapes, no data
    shapes = model.plan.check_inputs(stand_ins, keep_all=executed)  # InputError, LimitError
    report = CountReport({k: list(v) for k, v in shapes_in.items()})
    for n in graph.nodes:
        op = OPS[n.op]
        ins = [shapes[i] for i in n.inputs]
        cost = op.cost(n, ins, shapes[n.name])
        params = sum(w.size for w in n.weights.values())
        fixed = sum(n.weights[w].size for w in op.fixed_weights if w in n.weights)
        report.nodes.append(CountRow(n.name, n.op, shapes[n.name], cost.macs, 2 * cost.macs, cost.other,
                                     params, params - fixed, params * BYTES_PER_VALUE,
                                     numel(shapes[n.name]) * BYTES_PER_VALUE,
                                     op.count_details(n, ins, shapes[n.name])))
    report.total = {k: sum(getattr(r, k) for r in report.nodes) for k in SUMMED}
    report.total["plan_other_ops"] = _plan_other_ops(model.plan, shapes)
    report.total["peak_activation_bytes"] = model.plan.peak_elements(shapes) * BYTES_PER_VALUE
    if executed:  # seeded random inputs: no count depends on the values
        rng = np.random.default_rng(0)
        _, done = execute(model, {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes_in.items()})
        for r in report.nodes:
            r.executed_macs, r.executed_other = done[r.name].macs, done[r.name].other
        report.total["executed_macs"] = sum(r.executed_macs for r in report.nodes)
        report.total["executed_other"] = sum(r.executed_other for r in report.nodes)
        report.total["mismatches"] = len(report.mismatches)
    return report


def execute(model, xs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, Cost]]:
    """Run the unfused graph on float32 inputs `xs` (by input name, shapes the model takes) with
    every op's counting kernel: (each node's output, each node's executed Cost), by node name."""
    env, done = dict(xs), {}
    for n in model.graph.nodes:
        env[n.name], done[n.name] = OPS[n.op].counted(n, *[env[i] for i in n.inputs])
    return {n.name: env[n.name] for n in model.graph.nodes}, done


def _plan_other_ops(plan, shapes) -> int:
    """Other ops of the fused plan as it runs: each step's node (a folded BatchNorm became its
    bias add) plus one per output element of a fused activation and of a fused residual add."""
    total = 0
    for step in plan.steps:
        n = step.node
        total += OPS[n.op].cost(n, [shapes[i] for i in n.inputs], shapes[n.name]).other
        if step.act is not None:
            total += numel(shapes[step.output])
        if step.residual is not None:
            total += numel(shapes[step.output])
    return total


def reference_input_shapes(model, batch: int = 1) -> dict[str, tuple]:
    """Input name -> the stored reference input's shape (else the declared one) at `batch`."""
    runs = model.references.runs
    return {t.name: (batch,) + (runs[0].inputs[t.name].shape[1:] if runs else
                                tuple(1 if s is None else s for s in t.shape[1:]))
            for t in model.graph.inputs}


def _input_shapes(model, input_shape) -> dict[str, tuple]:
    inputs = model.graph.inputs
    if input_shape is None:
        return reference_input_shapes(model)
    if not isinstance(input_shape, (tuple, list)):
        raise InputError(f"input_shape must be a shape like (1, 3, 32, 32) or a tuple of them, got {input_shape!r}")
    one = not any(isinstance(s, (tuple, list)) for s in input_shape)
    shapes = [input_shape] if one else list(input_shape)
    if len(shapes) != len(inputs):
        raise InputError(f"model takes {len(inputs)} input(s) ({', '.join(t.name for t in inputs)}), "
                         f"got {len(shapes)} shape(s)")
    for t, s in zip(inputs, shapes):
        sizes_ok = isinstance(s, (tuple, list)) and all(
            isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 1 for d in s)
        if not sizes_ok or len(s) != len(t.shape):
            raise InputError(f"input '{t.name}': expected a shape of rank {len(t.shape)} with sizes "
                             f">= 1, got {tuple(s)}")
    return {t.name: tuple(int(d) for d in s) for t, s in zip(inputs, shapes)}


# --- against a dense model ------------------------------------------------------------------

def reductions(report: CountReport, dense: CountReport) -> tuple[dict, dict]:
    """Reduction factors dense / compressed for MACs, stored and learnable params and weight
    bytes: per node present in both (matched by name), and over the whole networks. A factor
    is None where the compressed count is 0."""
    by_name = {r.name: r for r in dense.nodes}
    per_node = {r.name: {k: _ratio(getattr(by_name[r.name], k), getattr(r, k)) for k in REDUCED}
                for r in report.nodes if r.name in by_name}
    return per_node, {k: _ratio(dense.total[k], report.total[k]) for k in REDUCED}


def _ratio(dense: int, compressed: int) -> float | None:
    return dense / compressed if compressed else None


# --- output ---------------------------------------------------------------------------------

COLUMNS = (("macs", "MACs"), ("other_ops", "other ops"), ("params", "params"),
           ("learnable_params", "learnable"), ("weight_bytes", "weight B"),
           ("activation_bytes", "output B"))


def format_table(report: CountReport, against: CountReport | None = None) -> str:
    """The report as a text table, one line per node, then the totals; with `against`, the
    reduction factors (dense / this); executed counts and mismatches when counted."""
    per_node, overall = reductions(report, against) if against is not None else ({}, {})
    head = [f"{'node':<28} {'op':<20}"] + [f"{t:>13}" for _, t in COLUMNS]
    if report.executed:
        head += [f"{'executed MACs':>13}", f"{'exec. other':>13}", "     "]
    if against is not None:
        head += [f"{'x MACs':>7}", f"{'x params':>8}", f"{'x learn':>8}", f"{'x bytes':>8}"]
    lines = [f"input {report.input_shape}", " ".join(head + ["notes"])]
    for r in report.nodes:
        cells = [f"{r.name:<28} {r.op:<20}"] + [f"{getattr(r, k):>13,}" for k, _ in COLUMNS]
        if report.executed:
            cells += [f"{r.executed_macs:>13,}", f"{r.executed_other:>13,}", "DIFF " if r.mismatch else "  =  "]
        if against is not None:
            red = per_node.get(r.name)
            cells += [_factor(red[k] if red else None, w) for k, w in zip(REDUCED, (7, 8, 8, 8))]
        lines.append(" ".join(cells + [_notes(r.details)]))
    t = report.total
    cells = [f"{'total':<49}"] + [f"{t[k]:>13,}" for k, _ in COLUMNS]
    if report.executed:
        cells += [f"{t['executed_macs']:>13,}", f"{t['executed_other']:>13,}",
                  "DIFF " if t["mismatches"] else "  =  "]
    if against is not None:
        cells += [_factor(overall[k], w) for k, w in zip(REDUCED, (7, 8, 8, 8))]
    lines.append(" ".join(cells))
    lines.append(f"FLOPs (2 x MACs) {t['flops']:,}; other ops as the engine's fused plan runs them "
                 f"(BN folded, activations fused) {t['plan_other_ops']:,}; peak activation memory "
                 f"under the plan {t['peak_activation_bytes']:,} bytes")
    if against is not None:
        lines.append("against the dense model: " + ", ".join(
            f"{name} {_factor(overall[k], 0).strip()} fewer" for k, name in
            zip(REDUCED, ("MACs", "stored params", "learnable params", "weight bytes"))))
    if report.executed:
        bad = report.mismatches
        lines.append(f"executed counts differ from the analytic ones on {len(bad)} node(s): "
                     + ", ".join(r.name for r in bad) if bad else
                     "executed counts (counting kernels) equal the analytic counts on every node")
    return "\n".join(lines)


def _factor(value: float | None, width: int) -> str:
    return f"{'-' if value is None else f'{value:.2f}x':>{width}}"


def _notes(details: dict) -> str:
    """A count row's per-op fields in words."""
    if "break_even_rank" in details:
        return f"M={details['rank']} (break-even M {details['break_even_rank']:.1f})"
    if "strategy" in details:
        return (f"TT runs {details['strategy']} (MACs contract {details['macs_contract']:,}, "
                f"dense {details['macs_dense']:,})")
    return ""


def to_csv(report: CountReport, against: CountReport | None = None) -> str:
    """One CSV row per node (the to_dict fields; the columns of every node kind), no total."""
    rows = report.to_dict(against)["nodes"]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({**row, "output_shape": "x".join(map(str, row["output_shape"]))} for row in rows)
    return out.getvalue()


def plot_macs(report: CountReport, path, against: CountReport | None = None, title: str = "") -> None:
    """Bar chart of MACs per node that has any (log scale), next to the dense model's when given."""
    from .cli import need
    plt = need("matplotlib.pyplot")
    dense = {r.name: r.macs for r in against.nodes} if against is not None else {}
    rows = [r for r in report.nodes if r.macs or dense.get(r.name)]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(rows) + 2), 5))
    if against is not None:
        ax.bar(x - 0.2, [dense.get(r.name, 0) for r in rows], 0.4, label="dense")
        ax.bar(x + 0.2, [r.macs for r in rows], 0.4, label="compressed")
        ax.legend()
    else:
        ax.bar(x, [r.macs for r in rows], 0.6)
    ax.set_yscale("log")
    ax.set_xticks(x, [r.name for r in rows], rotation=90, fontsize=7)
    ax.set_ylabel("MACs per call")
    ax.set_title(title or "MACs per layer")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""Compare a model's run against the references stored in its file, node by node."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Row:
    run: int            # index of the stored reference input
    name: str           # node name; "<node> (planned)" rows check the fused plan's outputs
    op: str
    max_abs: float      # max |engine - reference|
    rel: float          # max_abs / max |reference| (max_abs itself when the reference is all 0)
    ok: bool


@dataclass
class VerifyReport:
    rows: list[Row] = field(default_factory=list)
    rtol: float = 1e-5
    source: str = ""    # where the references came from, e.g. "pytorch 2.13.0+cpu"

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r.ok for r in self.rows)

    @property
    def first_failure(self) -> Row | None:
        return next((r for r in self.rows if not r.ok), None)

    def summary(self) -> str:
        if not self.rows:
            return "no stored references to compare against"
        worst = max(self.rows, key=lambda r: r.rel)
        runs = len({r.run for r in self.rows})
        head = (f"{'OK' if self.ok else 'FAILED'}: {len(self.rows)} checks over {runs} reference "
                f"input(s) against {self.source}, rtol {self.rtol:g}; worst {worst.name} rel {worst.rel:.2e}")
        f = self.first_failure
        return head if f is None else head + (f"\nfirst failure: run {f.run} node '{f.name}' ({f.op}) "
                                              f"max_abs {f.max_abs:.3e} rel {f.rel:.3e}")


def compare(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """(max abs error, error relative to max |want|); shape mismatch or NaN gives inf."""
    if got.shape != want.shape:
        return float("inf"), float("inf")
    if got.size == 0:
        return 0.0, 0.0
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    same_nonfinite = ~np.isfinite(want) & ((got == want) | (np.isnan(got) & np.isnan(want)))
    diff[same_nonfinite] = 0.0
    max_abs = float(np.nan_to_num(diff, nan=np.inf).max())
    scale = float(np.abs(want[np.isfinite(want)]).max(initial=0.0))
    return max_abs, (max_abs / scale if scale > 0 else max_abs)


def verify(model, rtol: float = 1e-5) -> VerifyReport:
    """Every stored node of every stored reference input, unfused, then the fused outputs."""
    refs = model.references
    report = VerifyReport(rtol=rtol, source=f"{refs.source} {refs.source_version}".strip())
    ops = {n.name: n.op for n in model.graph.nodes}
    for i, run in enumerate(refs.runs):
        xs = tuple(run.inputs[t.name] for t in model.graph.inputs)
        acts = model.activations(xs)
        for name, want in run.nodes.items():
            max_abs, rel = compare(acts[name], want)
            report.rows.append(Row(i, name, ops[name], max_abs, rel, rel <= rtol))
        planned = model.plan.run(dict(zip((t.name for t in model.graph.inputs), xs)))
        for name, got in planned.items():
            max_abs, rel = compare(got, run.nodes[name])
            report.rows.append(Row(i, f"{name} (planned)", ops[name], max_abs, rel, rel <= rtol))
    return report

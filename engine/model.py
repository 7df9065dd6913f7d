"""Model: a loaded file ready to run, inspect, verify against its references, and count."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import format as fmt
from .errors import FormatError, InputError
from .ops import OPS
from .plan import Plan


class Model:
    """Run with Model(x). One Model may be called from many threads at once."""

    def __init__(self, graph, references: fmt.References, limits: fmt.Limits | None = None,
                 path: str = ""):
        self.graph = graph
        self.references = references
        self.path = path
        self.plan = Plan(graph, limits)
        self._check_references()

    # --- running ------------------------------------------------------------------------------
    def __call__(self, x):
        outs = self.plan.run(self._inputs(x))
        return self._pack([outs[n] for _, n in self.graph.outputs])

    def activations(self, x, *, kernels: str = "fast") -> dict[str, np.ndarray]:
        """Every node's output as the file defines it (unfused). kernels: "fast" | "reference"."""
        if kernels not in ("fast", "reference"):
            raise ValueError(f"kernels must be 'fast' or 'reference', got {kernels!r}")
        env = self._inputs(x, keep_all=True)
        acts = {}
        for n in self.graph.nodes:
            op = OPS[n.op]
            run = op.run if kernels == "fast" else op.reference
            acts[n.name] = env[n.name] = run(n, *[env[i] for i in n.inputs])
        return acts

    def _inputs(self, x, keep_all: bool = False) -> dict[str, np.ndarray]:
        """The inputs as C-contiguous float32 arrays by name, after every check on their shapes
        (nothing is converted before: a broadcast view may claim any size)."""
        specs = self.graph.inputs
        xs = x if isinstance(x, (tuple, list)) else (x,)
        if len(xs) != len(specs):
            raise InputError(f"model takes {len(specs)} input(s) ({', '.join(t.name for t in specs)}), "
                             f"got {len(xs)}")
        for spec, a in zip(specs, xs):
            if not isinstance(a, np.ndarray):
                raise InputError(f"input '{spec.name}': expected a numpy.ndarray, got {type(a).__name__}")
            if a.dtype.kind != "f":
                raise InputError(f"input '{spec.name}': expected a floating dtype, got {a.dtype}")
            if a.ndim != len(spec.shape):
                raise InputError(f"input '{spec.name}': expected rank {len(spec.shape)} "
                                 f"(shape {format_shape(spec.shape)}), got shape {a.shape}")
            if a.size == 0:
                raise InputError(f"input '{spec.name}': empty batch or dimension (shape {a.shape})")
        self.plan.check_inputs(dict(zip((t.name for t in specs), xs)), keep_all)
        return {spec.name: np.ascontiguousarray(a, dtype=np.float32) for spec, a in zip(specs, xs)}

    def _check_references(self) -> None:
        """Each stored run must fit the graph: its inputs taken as a call's, every stored node
        shaped as the graph makes it; so verify() cannot fail on the file's own data."""
        for i, run in enumerate(self.references.runs):
            try:
                xs = self._inputs(tuple(run.inputs[t.name] for t in self.graph.inputs), keep_all=True)
            except InputError as e:
                raise FormatError(f"reference run {i}: {e}") from None
            shapes = self.plan.check_inputs(xs, keep_all=True)
            for name, arr in run.nodes.items():
                if arr.shape != shapes[name]:
                    raise FormatError(f"reference run {i}: node '{name}' stored with shape {arr.shape}, "
                                      f"the graph makes {shapes[name]}")

    def _pack(self, arrays):
        if self.graph.output_kind == "tensor":
            return arrays[0]
        if self.graph.output_kind == "tuple":
            return tuple(arrays)
        return {name: a for (name, _), a in zip(self.graph.outputs, arrays)}

    # --- checking -----------------------------------------------------------------------------
    def verify(self, rtol: float = 1e-5) -> "VerifyReport":
        from .verify import verify
        return verify(self, rtol)

    def count(self, input_shape=None, *, executed: bool = False):
        from .count import count
        return count(self, input_shape, executed=executed)

    def profile(self, x, calls: int = 20, against: "Model | None" = None,
                rounds: int = 4) -> list[dict]:
        """Where a call's time goes: per plan step (a conv with the BN, add and activation
        fused into it, ...) its median time over `calls` calls on x, its share of their sum, the
        file's nodes it runs, its output shape, their MACs (the engine's count) and the
        effective GFLOP/s (2 x MACs / time).
        against: another model of the same inputs (the dense original of a compressed one),
        timed in alternating rounds with this one so that a shared machine's phases fall on
        both; each row then also holds, under "against", the steps of that model running the
        same nodes (matched by name; None where they run others too): their time and MACs, how
        many times this step's they are (the speedup, and the MAC reduction it had to turn into
        time) and the speedup's share of that reduction. rounds: the alternations (with
        against), each model's calls split evenly over them."""
        import statistics

        models = [self] if against is None else [self, against]
        rounds = 1 if against is None else rounds
        per_round = -(-calls // rounds)
        runs = [(m, m._inputs(x), [[] for _ in m.plan.steps]) for m in models]
        for r in range(rounds):
            for m, inputs, times in runs[r % 2:] + runs[:r % 2]:     # the order alternated
                m.plan.run(inputs)              # after the other model: caches refilled
                for _ in range(per_round):
                    timings = []
                    m.plan.run(inputs, timings)
                    for per_step, t in zip(times, timings):
                        per_step.append(t)
        rows = [m._profile_rows(inputs, [statistics.median(t) for t in times], rounds * per_round)
                for m, inputs, times in runs]
        if against is not None:
            for row in rows[0]:
                row["against"] = _matching(row, rows[1])
        return rows[0]

    def _profile_rows(self, inputs: dict, medians: list, calls: int) -> list[dict]:
        """profile's rows, from each plan step's median time over `calls` calls."""
        in_shapes = [a.shape for a in inputs.values()]
        counted = self.count(in_shapes if len(in_shapes) > 1 else in_shapes[0])
        macs = {r.name: r.macs for r in counted.nodes}
        shapes = self.plan.check_inputs(inputs)
        total = sum(medians)
        rows = []
        for i, (st, med) in enumerate(zip(self.plan.steps, medians)):
            m = sum(macs[n] for n in st.covers)
            rows.append({"step": i, "op": st.node.op, "nodes": list(st.covers),
                         "output_shape": list(shapes[st.output]), "median_ms": med * 1e3,
                         "share": med / total, "macs": m,
                         "gflops": 2 * m / med / 1e9 if med else 0.0, "calls": calls})
        return rows


def _matching(row: dict, others: list[dict]) -> dict | None:
    """The steps of `others` (profile rows of another model) that run the nodes of `row`, if
    they run no others: their summed time and MACs, their ratios to row's (the speedup, the
    MAC reduction; None without MACs) and the speedup's share of the reduction."""
    nodes = set(row["nodes"])
    same = [o for o in others if nodes & set(o["nodes"])]
    if not same or set().union(*(o["nodes"] for o in same)) != nodes:
        return None
    ms, macs = sum(o["median_ms"] for o in same), sum(o["macs"] for o in same)
    speedup = ms / row["median_ms"] if row["median_ms"] else 0.0
    return {"steps": [o["step"] for o in same], "median_ms": ms, "macs": macs, "speedup": speedup,
            **mac_reduction(speedup, row["macs"], macs)}


def mac_reduction(speedup: float, macs: int, dense_macs: int) -> dict:
    """How many times dense_macs is macs ("mac_reduction") and the share of that a speedup
    is ("of_mac_reduction"); both None when either count is 0 (nothing to reduce)."""
    if not macs or not dense_macs:
        return {"mac_reduction": None, "of_mac_reduction": None}
    return {"mac_reduction": dense_macs / macs, "of_mac_reduction": speedup * macs / dense_macs}


def format_shape(shape) -> str:
    """(B, 3, 32, 32) for a declared shape whose batch is free."""
    return "(" + ", ".join("B" if s is None else str(s) for s in shape) + ")"


def load(path, *, limits: fmt.Limits | None = None, tt_strategy: str | None = None) -> Model:
    """Read, validate and plan a model file. Raises FormatError, LimitError, UnsupportedOpError.

    tt_strategy: how tensor-train layers run: "auto" (the way with fewer MACs, a TT conv's
    contraction MACs counted 2.5 times; the default), "contract" (the core chain) or "dense"
    (the kernel rebuilt once); see docs/FORMAT.md.
    """
    graph, refs = fmt.load(path, limits)
    if tt_strategy is not None:
        from .ops.tt import set_strategy
        set_strategy(graph, tt_strategy)
    return Model(graph, refs, limits, str(Path(path)))

"""BasisConv decomposition in NumPy (never torch), after Tayyab & Mahalanobis, "BasisConv: A method
for compressed representation and learning in CNNs".

A conv layer's filters, flattened to H (N x d), d = (C/G)*kh*kw, are replaced by M basis filters
F (the top right singular vectors of H, float64 SVD, no centring) and 1D combine weights w = H F^T
(N x M); the bias moves to the combine stage. With G groups each group is decomposed alone, all
with the same M. Linear layers are the case kh = kw = 1.

Here: the SVD / random orthonormal basis, the choice of M (energy, rank, or a MAC budget for the
whole network), the per-layer report, and torch-free compression of an engine Graph / model file
(`compress_graph`, `compress_file`, behind `basisconv compress`). converters/basis_layers.py
builds the PyTorch modules from the same arrays.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field, replace

import numpy as np

from engine import __version__ as ENGINE_VERSION
from engine.errors import FormatError, InputError
from engine.format import Limits, Reference, References
from engine.graph import Graph
from engine.ops.basis import basis_macs, break_even_rank
from engine.spectrum import energy_curve, filter_matrices, rank_for_energy, singular_values

DENSE_OPS = {"conv2d": "basis_conv2d", "linear": "basis_linear"}


# --- the math ---------------------------------------------------------------------------------

def svd_basis(weight: np.ndarray, groups: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-group SVD basis of a conv weight (N, C/G, kh, kw) or linear weight (out, in).

    Returns basis (G*M, C/G, kh, kw) (linear: (M, in)), the top-M right singular vectors of every
    group's filter matrix, and combine (N, M) = H_g F_g^T, both float32 (computed in float64).
    """
    H = filter_matrices(weight, groups)                       # (G, N/G, d)
    if not 1 <= rank <= min(H.shape[1:]):
        raise InputError(f"rank must be 1..{min(H.shape[1:])} (min(N/G, d)) for weight "
                         f"{weight.shape} with groups={groups}, got {rank}")
    _, _, vt = np.linalg.svd(H, full_matrices=False)          # vt: (G, r, d)
    F = vt[:, :rank]                                          # (G, M, d) basis rows per group
    w = H @ F.transpose(0, 2, 1)                              # (G, N/G, M) combine per group
    return (F.reshape((groups * rank,) + weight.shape[1:]).astype(np.float32),
            w.reshape(weight.shape[0], rank).astype(np.float32))


def random_basis(d: int, rank: int, rng: np.random.Generator) -> np.ndarray:
    """(M, d) random orthonormal rows: Q of the QR of a Gaussian d x M, signs fixed by R's
    diagonal so the basis is uniformly (Haar) distributed."""
    if not 1 <= rank <= d:
        raise InputError(f"a random orthonormal basis of {d}-vectors has 1..{d} rows, got rank {rank}")
    q, r = np.linalg.qr(rng.standard_normal((d, rank)))
    return (q * np.sign(np.diag(r))).T


def scratch_basis(weight_shape: tuple, groups: int, rank: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Fixed random orthonormal basis (G*M, C/G, kh, kw) and a fresh combine (N, M) drawn like
    PyTorch's default layer init, U(-1/sqrt(M), 1/sqrt(M)): with orthonormal basis rows the
    effective filters then have the norm a default-initialised dense layer's would."""
    N, d = weight_shape[0], math.prod(weight_shape[1:])
    basis = np.concatenate([random_basis(d, rank, rng) for _ in range(groups)])  # (G*M, d)
    combine = rng.uniform(-1, 1, (N, rank)) / math.sqrt(rank)                  # (N, M)
    return (basis.reshape((groups * rank,) + tuple(weight_shape[1:])).astype(np.float32),
            combine.astype(np.float32))


# --- layers and the report --------------------------------------------------------------------

@dataclass
class LayerSpec:
    """A dense conv / linear layer as the decomposition sees it."""
    path: str               # module path (graph nodes: the node's module, else its name)
    kind: str               # "conv2d" | "linear"
    weight: np.ndarray      # (N, C/G, kh, kw) conv filters or (out, in) linear weights
    groups: int
    has_bias: bool
    positions: int = 1      # output positions per sample at the example size (H'W'; linear: rows)
    name: str = ""          # graph node name ("" for torch modules)

    @property
    def N(self) -> int:
        return self.weight.shape[0]

    @property
    def d(self) -> int:
        return math.prod(self.weight.shape[1:])

    @property
    def full_rank(self) -> int:
        return min(self.N // self.groups, self.d)

    def dense_macs(self) -> int:
        return self.positions * self.N * self.d

    def basis_macs(self, rank: int) -> int:
        return self.positions * basis_macs(self.N, self.d, self.groups, rank)


@dataclass
class LayerRecord:
    """What happened to one layer: its rank, the energy kept, and the costs before and after."""
    path: str
    kind: str
    N: int
    d: int
    groups: int
    rank: int | None          # M per group; None when left dense
    energy: float             # fraction of sum s^2 kept (1 when dense, nan for a random basis)
    macs_dense: int           # at the example size (per output position without one)
    macs_after: int
    params_before: int        # learnable: weight + bias
    params_after: int         # learnable: combine + bias (the basis is fixed)
    skipped: str = ""         # why the layer stays dense ("" when decomposed)
    name: str = ""            # graph node name, for graph compression


@dataclass
class BasisReport:
    records: list[LayerRecord] = field(default_factory=list)
    per_position: bool = False   # MACs counted per output position (no example input given)

    @property
    def decomposed(self) -> list[LayerRecord]:
        return [r for r in self.records if r.rank is not None]

    @property
    def skipped(self) -> list[LayerRecord]:
        return [r for r in self.records if r.rank is None]

    def totals(self) -> dict:
        """Sums over all conv / linear layers (dense ones included), and reduction factors."""
        t = {k: sum(getattr(r, k) for r in self.records)
             for k in ("macs_dense", "macs_after", "params_before", "params_after")}
        t["macs_factor"] = t["macs_dense"] / max(t["macs_after"], 1)
        t["params_factor"] = t["params_before"] / max(t["params_after"], 1)
        return t

    def __str__(self) -> str:
        macs = "MACs/pos" if self.per_position else "MACs"
        lines = [f"{'layer':<30} {'kind':<7} {'N':>5} {'d':>6} {'G':>3} {'M':>5} {'energy':>7} "
                 f"{macs + ' dense':>13} {macs + ' after':>13} {'params':>9} {'after':>9}  note"]
        for r in self.records:
            rank = "-" if r.rank is None else str(r.rank)
            energy = "-" if math.isnan(r.energy) else f"{r.energy:.4f}"
            lines.append(f"{r.path or r.name or '<root>':<30} {r.kind:<7} {r.N:>5} {r.d:>6} {r.groups:>3} {rank:>5} "
                         f"{energy:>7} {r.macs_dense:>13,} {r.macs_after:>13,} {r.params_before:>9,} "
                         f"{r.params_after:>9,}  {r.skipped}")
        t = self.totals()
        dense, after = ("", "") if self.per_position else (f"{t['macs_dense']:,}", f"{t['macs_after']:,}")
        lines.append(f"{'total (conv/linear layers)':<69} {dense:>13} {after:>13} {t['params_before']:>9,} "
                     f"{t['params_after']:>9,}")
        summary = f"{len(self.decomposed)} of {len(self.records)} layers decomposed; learnable params " \
                  f"/{t['params_factor']:.2f}"
        if not self.per_position:
            summary += f"; MACs /{t['macs_factor']:.2f}"
        return "\n".join(lines + [summary])


# --- choosing M and decomposing ---------------------------------------------------------------

def _per_layer(value, spec: LayerSpec):
    """A global value, or the entry of a dict keyed by module path (or graph node name)."""
    if not isinstance(value, dict):
        return value
    for key in (spec.path, spec.name):
        if key and key in value:
            return value[key]
    return None


def _check_keys(value, specs: list[LayerSpec], what: str) -> None:
    if isinstance(value, dict):
        known = {s.path for s in specs} | {s.name for s in specs if s.name}
        unknown = sorted(set(value) - known)
        if unknown:
            raise InputError(f"{what}: no conv / linear layer named {', '.join(map(repr, unknown))} "
                             f"(layers: {', '.join(sorted(s.path or s.name for s in specs))})")


def decompose(specs: list[LayerSpec], *, energy=None, rank=None, mac_budget: float | None = None,
              layers=None, force: bool = False, seed: int = 0, from_scratch: bool = False,
              per_position: bool = False) -> tuple[BasisReport, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """Choose M for every layer and decompose it.

    energy / rank: one value or a dict by module path; mac_budget: fraction of the dense MACs of
    all layers in `specs`; exactly one of the three. layers: the paths to consider (default all).
    A layer whose basis form would cost at least the dense MACs stays dense unless force;
    depthwise layers (C/G = 1) always stay dense. from_scratch: random orthonormal basis with a
    fresh combine (needs rank). Returns the report and {index in specs: (basis, combine)}.
    """
    if sum(v is not None for v in (energy, rank, mac_budget)) != 1:
        raise InputError("give exactly one of energy=, rank= or mac_budget=")
    if from_scratch and rank is None:
        raise InputError("from_scratch needs rank= (energies of random weights mean nothing)")
    if mac_budget is not None and per_position:
        raise InputError("mac_budget needs the layers' output sizes: pass example_input")
    if mac_budget is not None and not 0 < mac_budget:
        raise InputError(f"mac_budget must be a positive fraction of the dense MACs, got {mac_budget}")
    _check_keys(energy, specs, "energy")
    _check_keys(rank, specs, "rank")
    if layers is not None:
        _check_keys(dict.fromkeys(layers), specs, "layers")
    selected = None if layers is None else set(layers)

    spectra = [None if from_scratch else singular_values(s.weight, s.groups) for s in specs]
    ranks: list[int | None] = [None] * len(specs)
    reasons = [""] * len(specs)
    for i, s in enumerate(specs):
        if selected is not None and s.path not in selected and s.name not in selected:
            reasons[i] = "not selected (layers=)"
        elif s.kind == "conv2d" and s.groups > 1 and s.weight.shape[1] == 1:
            reasons[i] = "depthwise (C/G = 1): one input channel per group leaves nothing to share"
        elif mac_budget is None:
            e, m = _per_layer(energy, s), _per_layer(rank, s)
            if e is None and m is None:
                reasons[i] = "no energy / rank given for this layer"
            elif m is not None:
                if not isinstance(m, (int, np.integer)) or m < 1:
                    raise InputError(f"rank for layer '{s.path or s.name}' must be an int >= 1, got {m!r}")
                ranks[i] = min(int(m), s.full_rank if not from_scratch else s.d)
            else:
                if not 0 < e <= 1:
                    raise InputError(f"energy for layer '{s.path or s.name}' must be in (0, 1], got {e}")
                ranks[i] = rank_for_energy(spectra[i], e)
            if ranks[i] is not None and not force and \
                    basis_macs(s.N, s.d, s.groups, ranks[i]) >= s.N * s.d:  # per position
                reasons[i] = (f"dense: M={ranks[i]} >= break-even {break_even_rank(s.N, s.d, s.groups):.1f} "
                              f"(basis {basis_macs(s.N, s.d, s.groups, ranks[i]):,} vs dense {s.N * s.d:,} "
                              f"MACs per position; force=True to decompose anyway)")
                ranks[i] = None
    if mac_budget is not None:
        _allocate(specs, spectra, ranks, reasons, mac_budget, force)

    rng = np.random.default_rng(seed)
    report, parts = BasisReport(per_position=per_position), {}
    for i, s in enumerate(specs):
        params = s.weight.size + (s.N if s.has_bias else 0)
        M = ranks[i]
        if M is None:
            report.records.append(LayerRecord(s.path, s.kind, s.N, s.d, s.groups, None, 1.0, s.dense_macs(),
                                              s.dense_macs(), params, params, reasons[i], s.name))
            continue
        if from_scratch:
            parts[i] = scratch_basis(s.weight.shape, s.groups, M, rng)
            kept = math.nan
        else:
            parts[i] = svd_basis(s.weight, s.groups, M)
            kept = float(energy_curve(spectra[i])[M - 1])
        report.records.append(LayerRecord(s.path, s.kind, s.N, s.d, s.groups, M, kept, s.dense_macs(),
                                          s.basis_macs(M), params, s.N * M + (s.N if s.has_bias else 0),
                                          "", s.name))
    return report, parts


def _allocate(specs, spectra, ranks, reasons, fraction: float, force: bool) -> None:
    """Ranks under a MAC budget (fraction of the dense MACs of all layers), in place.

    Every candidate starts at M = 1; then, greedily, the step with the most per-layer-normalised
    energy gained per MAC spent is taken while it fits: M -> M + 1, or (without force) basis ->
    dense once M + 1 reaches the break-even, which keeps all the energy for what remains. Energy
    curves are concave, so each layer's steps come in decreasing value, as greedy wants.
    """
    budget = fraction * sum(s.dense_macs() for s in specs)
    cand = [i for i, s in enumerate(specs) if not reasons[i]]
    used = sum(specs[i].dense_macs() for i in range(len(specs)) if reasons[i])
    curves = {i: energy_curve(spectra[i]) for i in cand}

    def cost(i, m):            # m = 0 stands for dense
        return specs[i].dense_macs() if m == 0 else specs[i].basis_macs(m)

    def kept(i, m):
        return 1.0 if m == 0 else float(curves[i][m - 1])

    def next_step(i, m):
        """(value, next m) of layer i's next step from rank m, or None at the end."""
        if m == 0:
            return None
        s, nxt = specs[i], m + 1
        if nxt > s.full_rank or (not force and s.basis_macs(nxt) >= s.dense_macs()):
            if force:
                return None
            nxt = 0
        extra = cost(i, nxt) - cost(i, m)
        gain = kept(i, nxt) - kept(i, m)
        return (gain / extra if extra > 0 else math.inf), nxt

    for i in cand:
        ranks[i] = 1 if force or specs[i].basis_macs(1) < specs[i].dense_macs() else 0
        used += cost(i, ranks[i])
    if used > budget:
        raise InputError(f"mac_budget {fraction:g} ({budget:,.0f} MACs) is below the smallest "
                         f"possible network, {used:,} MACs = {used / (budget / fraction):.3f} of dense "
                         "(every decomposable layer at M = 1)")
    heap = []
    for i in cand:
        step = next_step(i, ranks[i])
        if step is not None:
            heapq.heappush(heap, (-step[0], i, step[1]))
    while heap:
        _, i, nxt = heapq.heappop(heap)
        extra = cost(i, nxt) - cost(i, ranks[i])
        if used + extra > budget:
            continue  # later steps of this layer cost at least as much: it stays where it is
        used += extra
        ranks[i] = nxt
        step = next_step(i, nxt)
        if step is not None:
            heapq.heappush(heap, (-step[0], i, step[1]))
    for i in cand:
        if ranks[i] == 0:
            ranks[i] = None
            reasons[i] = ("dense: even M=1 costs as many MACs as dense" if cost(i, 1) >= cost(i, 0) else
                          "dense: the budget affords the dense layer (break-even reached)")


# --- torch-free compression of engine graphs and files ----------------------------------------

def graph_layers(graph: Graph) -> list[LayerSpec]:
    """A LayerSpec for every conv2d / linear node, positions at the graph's stored input size."""
    from engine.plan import validate
    shapes = validate(graph, Limits())
    specs = []
    for n in graph.nodes:
        if n.op in DENSE_OPS:
            w = n.weights["weight"]
            out = shapes[n.name]
            positions = math.prod(out[2:]) if n.op == "conv2d" else math.prod(out[1:-1])
            specs.append(LayerSpec(n.module or n.name, n.op, w, int(n.attrs.get("groups", 1)),
                                   "bias" in n.weights, positions, n.name))
    return specs


def compress_graph(graph: Graph, *, energy=None, rank=None, mac_budget: float | None = None,
                   layers=None, force: bool = False) -> tuple[Graph, BasisReport]:
    """A copy of `graph` with its conv2d / linear nodes replaced by basis_conv2d / basis_linear
    (same node names, modules and shapes), and the report. Arguments as `decompose`."""
    specs = graph_layers(graph)
    report, parts = decompose(specs, energy=energy, rank=rank, mac_budget=mac_budget, layers=layers,
                              force=force)
    new = {}
    for i, (basis, combine) in parts.items():
        n = graph.node(specs[i].name)
        weights = {"basis": basis, "combine": combine}  # (G*M, C/G, kh, kw) fixed; (N, M) 1D weights
        if "bias" in n.weights:
            weights["bias"] = n.weights["bias"]          # (N)
        new[n.name] = replace(n, op=DENSE_OPS[n.op], attrs={**n.attrs, "rank": combine.shape[1]},
                              weights=weights)
    nodes = [new.get(n.name, n) for n in graph.nodes]
    meta = {**graph.meta, "producer": f"basisconv-compress {ENGINE_VERSION}", "torch_version": ""}
    return replace(graph, nodes=nodes, meta=meta), report


def engine_references(graph: Graph, refs: References) -> References:
    """References for `graph` recomputed by the engine's NumPy reference kernels on the inputs
    stored in `refs` (same `stored` mode)."""
    from engine.model import Model
    model = Model(graph, References(runs=[]))
    out = References(stored=refs.stored, source="engine-reference", source_version=f"basisconv-engine {ENGINE_VERSION}")
    keep = None if refs.stored == "all" else {n for _, n in graph.outputs}
    for run in refs.runs:
        acts = model.activations(tuple(run.inputs[t.name] for t in graph.inputs), kernels="reference")
        out.runs.append(Reference(dict(run.inputs),
                                  {k: v for k, v in acts.items() if keep is None or k in keep}))
    return out


def compress_file(src, dst, **kwargs) -> BasisReport:
    """Dense model file -> BasisConv model file with engine-reference references; no torch.
    kwargs: as compress_graph."""
    from engine import format as fmt
    graph, refs = fmt.load(src)
    if not any(n.op in DENSE_OPS for n in graph.nodes):
        raise FormatError(f"{src}: no conv2d or linear node to compress")
    new, report = compress_graph(graph, **kwargs)
    fmt.save(dst, new, engine_references(new, refs))
    return report

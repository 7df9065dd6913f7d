"""Tensor-train factorization in NumPy (no torch): TT-SVD, the TT-FC and TT-conv forms of a dense
layer (core convention and index order: docs/FORMAT.md, "Compressed ops: tensor-train"), the
paper's naive 4D TT of a conv kernel, and `compress_graph_tt` on an engine Graph.

Truncation (Oseledets' TT-SVD): with eps each of the (cores - 1) SVDs drops the smallest singular
values whose norm stays within eps ||A||_F / sqrt(cores - 1), which guarantees
||A - TT||_F <= eps ||A||_F; max_rank (one int for every bond, or one per bond) caps the ranks
on top, and then only the error reached (always measured and reported) says how close it is.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from engine import format as fmt
from engine.errors import InputError
from engine.graph import Graph, Node
from engine.ops import numel
from engine.ops.tt import chain_macs, conv_kernel, tt_matrix

from .basis import ENGINE_VERSION, engine_references

DEFAULT_CORES = 3   # channel / feature cores when modes are chosen automatically (the paper's)


def tt_svd(a: np.ndarray, *, max_rank=None, eps: float | None = None) -> list[np.ndarray]:
    """TT cores [(r_{k-1}, n_k, r_k)] of the tensor `a` (n_1, ..., n_D), outer ranks 1.

    max_rank: None, an int for every bond, or D - 1 ints. eps: relative Frobenius error bound
    (None: no eps truncation, exact up to round-off unless max_rank caps).
    """
    dims = a.shape
    caps = _caps(max_rank, len(dims) - 1)
    if eps is not None and not eps >= 0:
        raise InputError(f"eps must be >= 0, got {eps}")
    delta = 0.0 if eps is None else eps * np.linalg.norm(a) / np.sqrt(max(len(dims) - 1, 1))
    cores, r = [], 1
    rest = np.asarray(a, np.float64)
    for k, n in enumerate(dims[:-1]):
        u, s, vt = np.linalg.svd(rest.reshape(r * n, -1), full_matrices=False)
        tails = np.sqrt(np.cumsum((s ** 2)[::-1])[::-1])    # tails[j] = ||s[j:]||
        keep = len(s) if eps is None else max(1, int(np.sum(tails > delta)))
        keep = min(keep, caps[k])
        cores.append(u[:, :keep].reshape(r, n, keep))
        rest = s[:keep, None] * vt[:keep]
        r = keep
    cores.append(rest.reshape(r, dims[-1], 1))
    return cores


def _caps(max_rank, bonds: int) -> list[int]:
    if max_rank is None:
        return [np.iinfo(np.int64).max] * bonds
    if isinstance(max_rank, (int, np.integer)):
        caps = [int(max_rank)] * bonds
    else:
        caps = [int(r) for r in max_rank]
        if len(caps) != bonds:
            raise InputError(f"max_rank: expected {bonds} per-bond ranks, got {list(max_rank)}")
    if min(caps, default=1) < 1:
        raise InputError(f"max_rank must be >= 1, got {max_rank}")
    return caps


def tt_matrix_svd(m: np.ndarray, in_modes, out_modes, **trunc) -> list[np.ndarray]:
    """TT-matrix cores [(r_{k-1}, in_k, out_k, r_k)] of m (prod in_k, prod out_k)."""
    d = len(in_modes)
    t = m.reshape(*in_modes, *out_modes)
    t = t.transpose([i for k in range(d) for i in (k, d + k)])   # (in_1, out_1, in_2, out_2, ...)
    cores = tt_svd(t.reshape([i * o for i, o in zip(in_modes, out_modes)]), **trunc)
    return [g.reshape(g.shape[0], i, o, g.shape[-1]) for g, i, o in zip(cores, in_modes, out_modes)]


def conv_matrix(weight: np.ndarray) -> np.ndarray:
    """The (kh kw C) x S matrix of a conv kernel (S, C, kh, kw): row (y kw + x) C + c."""
    S, C, kh, kw = weight.shape
    return weight.transpose(2, 3, 1, 0).reshape(kh * kw * C, S)


def prime_factors(n: int) -> list[int]:
    """Prime factors of n >= 1 with multiplicity, ascending."""
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    return out + ([n] if n > 1 else [])


def balanced_modes(n: int, d: int) -> list[int]:
    """n as d factors, as equal as possible (each prime factor, largest first, joins the smallest)."""
    parts = [1] * d
    for q in reversed(prime_factors(n)):
        parts[parts.index(min(parts))] *= q
    return sorted(parts)


def auto_modes(n_in: int, n_out: int) -> tuple[list[int], list[int]]:
    """Balanced in / out modes over min(DEFAULT_CORES, prime factors of either) cores."""
    d = max(1, min(DEFAULT_CORES, len(prime_factors(n_in)), len(prime_factors(n_out))))
    return balanced_modes(n_in, d), balanced_modes(n_out, d)


# --- one layer ------------------------------------------------------------------------------------

@dataclass
class TTReport:
    """One layer's factorization: what it became and what that costs."""
    name: str                 # module path (to_tt) or node name (compress_graph_tt)
    op: str                   # "tt_conv2d" | "tt_linear" | "naive_tt_conv2d"
    in_modes: list            # channel / feature modes (tt_conv2d: the spatial mode kh*kw not included)
    out_modes: list
    ranks: list               # inner ranks as in the op's attrs
    params_dense: int         # kernel values of the dense layer (bias excluded: unchanged)
    params_tt: int            # core values
    rel_error: float          # ||W - TT||_F / ||W||_F reached
    macs_dense: int           # per output position (pixel or row)
    macs_contract: int | None  # per output position by contraction (None: naive, rebuilt only)
    replaced: bool = True     # False: kept dense, TT would not have fewer parameters

    @property
    def ratio(self) -> float:
        return self.params_dense / self.params_tt


@dataclass
class Factorization:
    cores: list = field(repr=False)   # tt_conv2d / tt_linear: (r_{k-1}, in_k, out_k, r_k) float32;
    report: TTReport                  # naive: (r_{k-1}, n_k, r_k) over (S, C, kh, kw)


def factorize(name: str, weight: np.ndarray, *, modes=None, max_rank=None, eps=None,
              naive: bool = False) -> Factorization:
    """TT form of a dense conv (S, C, kh, kw) or linear (out, in) kernel.

    modes: (in_modes, out_modes) over channels / features (default: balanced, auto_modes).
    naive (convs only): the 4D TT of the kernel tensor (S, C, kh, kw) itself.
    """
    w = np.asarray(weight, np.float64)
    conv = w.ndim == 4
    if naive:
        if not conv:
            raise InputError(f"layer '{name}': the naive 4D TT is for conv kernels, got {w.shape}")
        cores = tt_svd(w, max_rank=max_rank, eps=eps)
        rebuilt = tt_matrix([g[:, :, None, :] for g in cores]).reshape(w.shape)
        in_modes, out_modes, macs_contract = list(w.shape), [1] * 4, None
    else:
        S, C = w.shape[:2]
        n_in = C if conv else w.shape[1]
        in_modes, out_modes = ([[int(m) for m in ms] for ms in modes] if modes is not None
                               else auto_modes(n_in, S))
        if numel(in_modes) != n_in or numel(out_modes) != S \
                or len(in_modes) != len(out_modes):
            raise InputError(f"layer '{name}': modes {in_modes} x {out_modes} do not factor "
                             f"kernel {w.shape}")
        if conv:
            lead = [w.shape[2] * w.shape[3]]
            cores = tt_matrix_svd(conv_matrix(w), lead + in_modes, [1] + out_modes,
                                  max_rank=max_rank, eps=eps)
            rebuilt = conv_kernel(cores, w.shape[2:])
        else:
            lead = []
            cores = tt_matrix_svd(w.T, in_modes, out_modes, max_rank=max_rank, eps=eps)
            rebuilt = tt_matrix(cores).T
        full_ranks = [g.shape[0] for g in cores] + [1]
        macs_contract = chain_macs(lead + in_modes, [1] * len(lead) + out_modes, full_ranks)
    report = TTReport(
        name=name, op="naive_tt_conv2d" if naive else "tt_conv2d" if conv else "tt_linear",
        in_modes=in_modes, out_modes=out_modes, ranks=[g.shape[-1] for g in cores[:-1]],
        params_dense=w.size, params_tt=sum(g.size for g in cores),
        rel_error=float(np.linalg.norm(rebuilt - w) / max(np.linalg.norm(w), np.finfo(float).tiny)),
        macs_dense=w.size, macs_contract=macs_contract)   # dense per position: S C kh kw, out in
    return Factorization([g.astype(np.float32) for g in cores], report)


def factorize_layers(kernels: dict, *, max_rank=None, eps=None, layers=None, modes=None,
                     naive: bool = False) -> dict[str, Factorization]:
    """Factorize the kernels {layer name: (S, C, kh, kw) or (out, in)} that `layers` names.

    layers: names to factorize, each replaced (default: all, each replaced only where TT has
    fewer parameters: report.replaced). max_rank: an int, per-bond ranks, or a dict name ->
    either. modes: dict name -> (in_modes, out_modes). naive: 4D TT for the conv kernels.
    """
    wanted = list(kernels) if layers is None else list(layers)
    bad = [name for name in wanted if name not in kernels]
    if bad:
        raise InputError(f"layers {bad}: not groups=1 conv or linear layers of the model "
                         f"(those are: {list(kernels)})")
    out = {}
    for name in wanted:
        w = kernels[name]
        f = factorize(name, w, modes=_per_layer(modes, name), max_rank=_per_layer(max_rank, name),
                      eps=eps, naive=naive and w.ndim == 4)
        f.report.replaced = layers is not None or f.report.params_tt < f.report.params_dense
        out[name] = f
    return out


def _per_layer(option, name: str):
    return option.get(name) if isinstance(option, dict) else option


# --- an engine graph, without torch -----------------------------------------------------------------

def compress_graph_tt(graph: Graph, *, max_rank=None, eps=None, layers=None,
                      modes=None) -> tuple[Graph, list[TTReport]]:
    """A copy of `graph` with its groups=1 conv2d / linear nodes as tt_conv2d / tt_linear (same
    names, inputs, modules and shapes; the input graph is unchanged), and one report per layer
    considered. Options as factorize_layers, by node name. The references must be recomputed
    for the new graph (converters.basis.engine_references; compress_file_tt does it)."""
    kernels = {n.name: n.weights["weight"] for n in graph.nodes
               if n.op == "linear" or (n.op == "conv2d" and n.attrs.get("groups") == 1)}
    done = factorize_layers(kernels, max_rank=max_rank, eps=eps, layers=layers, modes=modes)
    nodes = [tt_node(n, done[n.name]) if n.name in done and done[n.name].report.replaced else n
             for n in graph.nodes]
    meta = {**graph.meta, "producer": f"basisconv-compress-tt {ENGINE_VERSION}", "torch_version": ""}
    return replace(graph, nodes=nodes, meta=meta), [f.report for f in done.values()]


def tt_node(node: Node, f: Factorization) -> Node:
    """The tt_conv2d / tt_linear node replacing dense `node` (same name, inputs, module, bias)."""
    r = f.report
    attrs = {"in_modes": r.in_modes, "out_modes": r.out_modes, "ranks": r.ranks}
    first = 1
    if r.op == "tt_conv2d":
        attrs.update({k: node.attrs[k] for k in ("stride", "padding", "dilation", "padding_mode")},
                     kernel_size=list(node.weights["weight"].shape[2:]))
        first = 0
    weights = {f"core{k + first}": g for k, g in enumerate(f.cores)}
    if "bias" in node.weights:
        weights["bias"] = node.weights["bias"]           # (S) unchanged
    return replace(node, op=r.op, attrs=attrs, weights=weights)


def compress_file_tt(src, dst, **kwargs) -> list[TTReport]:
    """Dense model file -> TT model file with engine-reference references; no torch.
    kwargs: as compress_graph_tt."""
    graph, refs = fmt.load(src)
    new, reports = compress_graph_tt(graph, **kwargs)
    if not any(r.replaced for r in reports):
        raise InputError(f"{src}: no conv2d / linear node has fewer parameters as TT at these "
                         "settings (raise eps or lower max_rank)")
    fmt.save(dst, new, engine_references(new, refs))
    return reports


def report_table(reports: list[TTReport]) -> str:
    """The per-layer reports as a text table."""
    rows = [f"{'layer':<24} {'op':<16} {'modes in x out':<24} {'ranks':<14} {'params':>17} "
            f"{'ratio':>6} {'rel err':>8} {'MACs/pos dense':>14} {'contract':>9}"]
    for r in reports:
        op = r.op if r.replaced else "kept dense"
        rows.append(f"{r.name:<24} {op:<16} {str(r.in_modes) + 'x' + str(r.out_modes):<24} "
                    f"{str(r.ranks):<14} {r.params_dense:>8,}->{r.params_tt:<8,} {r.ratio:>5.2f}x "
                    f"{r.rel_error:>8.4f} {r.macs_dense:>14,} "
                    + (f"{r.macs_contract:>9,}" if r.macs_contract else f"{'-':>9}"))
    return "\n".join(rows)

"""Singular-value spectra of a model's conv / linear layers: how much of a layer's filter energy
M basis filters keep, and where the basis form stops paying (the break-even M).

The NumPy here is also what the BasisConv decomposition (converters/basis.py) builds on, so the
energies `basisconv inspect --spectrum` shows are the ones `compress --energy` uses.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .graph import Graph
from .ops.basis import break_even_rank


def filter_matrices(weight: np.ndarray, groups: int) -> np.ndarray:
    """(G, N/G, d) float64: each group's filters flattened to rows, d = (C/G)*kh*kw (linear: in)."""
    N = weight.shape[0]
    return weight.astype(np.float64).reshape(groups, N // groups, -1)


def singular_values(weight: np.ndarray, groups: int) -> np.ndarray:
    """(G, min(N/G, d)) singular values of every group's filter matrix, descending."""
    return np.linalg.svd(filter_matrices(weight, groups), compute_uv=False)


def energy_curve(s: np.ndarray) -> np.ndarray:
    """(r,) fraction of the whole layer's energy sum s^2 kept by the top M = 1..r singular
    vectors of every group (s: (G, r)); all ones for an all-zero layer."""
    e = (s ** 2).sum(axis=0)
    total = e.sum()
    return np.cumsum(e) / total if total > 0 else np.ones_like(e)


def rank_for_energy(s: np.ndarray, t: float) -> int:
    """Smallest M with sum_{i<=M} s_i^2 / sum s^2 >= t in every group (s: (G, r)): the max of
    what each group needs, as all groups share one M."""
    e = s ** 2
    total = e.sum(axis=1, keepdims=True)
    cum = np.cumsum(e, axis=1) / np.where(total > 0, total, 1.0)
    cum[total[:, 0] == 0] = 1.0
    # 1e-12 absorbs the rounding of the cumulative sum, so t = 1 gives the numerical rank
    need = (cum < t - 1e-12).sum(axis=1) + 1
    return int(min(need.max(), s.shape[1]))


@dataclass
class LayerSpectrum:
    name: str            # node name
    op: str              # conv2d | linear | basis_conv2d | basis_linear
    N: int               # output channels / features
    d: int               # filter length (C/G)*kh*kw (linear: in)
    groups: int
    s: np.ndarray        # (G, r) singular values per group
    break_even: float    # the basis form saves MACs only for M below this
    rank: int | None     # the stored M of a basis node (its spectrum is of combine @ basis)

    @property
    def energy(self) -> np.ndarray:
        """(r,) energy kept at M = 1..r."""
        return energy_curve(self.s)

    def rank_for(self, t: float) -> int:
        return rank_for_energy(self.s, t)


def effective_weight(node) -> tuple[np.ndarray, int]:
    """A conv2d / linear / basis node's dense filters (N, d...) and groups; a basis node's are
    combine_g @ basis_g per group, of rank <= M."""
    w = node.weights
    G = int(node.attrs.get("groups", 1))
    if node.op in ("conv2d", "linear"):
        return w["weight"], G
    N, M = w["combine"].shape
    basis = w["basis"].astype(np.float64).reshape(G, M, -1)           # (G, M, d)
    combine = w["combine"].astype(np.float64).reshape(G, N // G, M)   # (G, N/G, M)
    return (combine @ basis).reshape(N, -1), G


def layer_spectra(graph: Graph) -> list[LayerSpectrum]:
    """One LayerSpectrum per conv2d / linear / basis_conv2d / basis_linear node, in graph order."""
    out = []
    for n in graph.nodes:
        if n.op not in ("conv2d", "linear", "basis_conv2d", "basis_linear"):
            continue
        weight, G = effective_weight(n)
        N, d = weight.shape[0], int(np.prod(weight.shape[1:]))
        out.append(LayerSpectrum(n.name, n.op, N, d, G, singular_values(weight, G),
                                 break_even_rank(N, d, G), n.attrs.get("rank")))
    return out


def spectrum_table(spectra: list[LayerSpectrum]) -> str:
    """Per layer: size, the M keeping 90 / 95 / 99 % of the energy, and the break-even M."""
    lines = [f"{'node':<28} {'op':<13} {'N':>5} {'d':>6} {'G':>4} {'M90':>5} {'M95':>5} {'M99':>5} "
             f"{'full':>5} {'break-even':>10} {'stored M':>8}"]
    for s in spectra:
        lines.append(f"{s.name:<28} {s.op:<13} {s.N:>5} {s.d:>6} {s.groups:>4} {s.rank_for(0.90):>5} "
                     f"{s.rank_for(0.95):>5} {s.rank_for(0.99):>5} {s.energy.size:>5} "
                     f"{s.break_even:>10.1f} {s.rank if s.rank is not None else '-':>8}")
    return "\n".join(lines)


def plot_spectra(spectra: list[LayerSpectrum], path, title: str = "") -> None:
    """Cumulative energy vs M per layer (log M axis, colour by depth), break-even M marked x."""
    from .cli import need
    plt = need("matplotlib.pyplot")
    fig, ax = plt.subplots(figsize=(11, 5.5))
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, max(len(spectra), 1)))
    for s, color in zip(spectra, colors):
        m = np.arange(1, s.energy.size + 1)
        groups = f"/G{s.groups}" if s.groups > 1 else ""
        ax.plot(m, s.energy, lw=1.2, color=color, label=f"{s.name} ({s.N}x{s.d}{groups})")
        be = int(np.floor(s.break_even))
        if 1 <= be <= s.energy.size:
            ax.plot([be], [s.energy[be - 1]], "x", color=color, ms=8, mew=2)
    ax.set_xscale("log")
    ax.set_xlabel("basis filters M per group")
    ax.set_ylabel("energy kept  sum(s_i^2, i <= M) / sum(s^2)")
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title or "BasisConv spectrum (x: break-even M; beyond it the basis form costs more MACs)")
    if len(spectra) <= 40:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 + len(spectra) // 21)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

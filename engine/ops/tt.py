"""Tensor-train ops: tt_conv2d (Garipov et al. 2016) and tt_linear (Novikov et al. 2015).

A TT layer stores its kernel matrix M (rows x cols) as a chain of cores G_k of shape
(r_{k-1}, in_k, out_k, r_k), outer ranks 1:
    M[(i_1..i_D), (j_1..j_D)] = G_1[:, i_1, j_1, :] @ ... @ G_D[:, i_D, j_D, :]
with i_1 (j_1) the most significant digit of the flattened row (column) index (docs/FORMAT.md).
tt_linear: M = weight.T (in x out), cores core1..cored.
tt_conv2d: M is the (kh kw C) x S matrix of the kernel (S, C, kh, kw), row (y kw + x) C + c; its
chain is the spatial core core0 (1, kh kw, 1, r_0) then the channel cores core1..cored.

Two ways to run one layer, both counted (MACs per output position: pixel or row):
  contract  the TT chain: every input channel convolved with the spatial core (a depthwise conv,
            C -> C r_0 channels, with the layer's stride / padding / dilation), then one BLAS
            matmul per core; sum_k r_{k-1} r_k (out_1..out_k)(in_k..in_D) MACs.
  dense     rebuild the kernel (once per node, cached) and run conv2d_fast / linear_fast:
            prod(in) prod(out) MACs. A plan runs such a node as that conv2d / linear
            (`lowered`), so a following BatchNorm folds into the kernel and a residual add and
            activation go into its epilogue (separate BN steps cost TT VGG-16 6% at batch 1).
The attribute `strategy` picks the way: "auto" (default; the fewer MACs, dense on a tie, a
conv's contraction MACs counted 2.5 times: they ran 1.3-4x slower than the rebuilt conv's),
"contract" or "dense". `set_strategy(graph, s)` sets it on every TT node: a load option.
The reference (plain einsum over the chain) is the same for every strategy.
Counted (`counted(node, x, strategy=None)`, either way): contract = the spatial stage by the
counting conv kernel, then `_core_counted` (plain loops) core by core; dense = the counting conv /
linear kernel with the rebuilt kernel (the rebuild itself is load-time work, not counted).
"""
from __future__ import annotations

import threading
import weakref

import numpy as np
from numba import njit, prange

from ..buffers import empty
from ..errors import FormatError, InputError
from ..graph import Graph, Node
from . import Cost, Op, attr, mismatch, numel, register
from .conv import Conv2d, check_weight, conv2d_counted, conv2d_fast
from .gemm import matmul  # single-threaded sgemm in Numba tasks (docs/ARCHITECTURE.md, Threading)
from .linear import linear_counted, linear_fast
from .shape import ints

STRATEGIES = ("auto", "contract", "dense")
TT_OPS = ("tt_conv2d", "tt_linear")
MAX_CORES = 16   # cores after the spatial one: bounds the weight names; more never pays
_CONV = Conv2d()


def tt_matrix(cores) -> np.ndarray:
    """The (prod in_k, prod out_k) float64 matrix of cores [(r_{k-1}, in_k, out_k, r_k)]."""
    m = np.ones((1, 1, 1))                                  # (rows so far, cols so far, r_k)
    for g in cores:
        m = np.einsum("ijr,rnms->injms", m, g.astype(np.float64))
        m = m.reshape(m.shape[0] * m.shape[1], m.shape[2] * m.shape[3], m.shape[4])
    return m[:, :, 0]


def conv_kernel(cores, kernel_size) -> np.ndarray:
    """The float64 kernel (S, C, kh, kw) of a tt_conv2d chain (spatial core first)."""
    m = tt_matrix(cores)                                    # (kh kw C, S), rows (y, x, c)
    return m.reshape(*kernel_size, -1, m.shape[1]).transpose(3, 2, 0, 1)


def chain_macs(in_modes, out_modes, ranks) -> int:
    """MACs per output position of the contraction chain (ranks with the outer 1s, D + 1)."""
    return sum(ranks[k] * ranks[k + 1] * numel(out_modes[:k + 1]) * numel(in_modes[k:])
               for k in range(len(in_modes)))


def set_strategy(graph: Graph, strategy: str) -> None:
    """Load option: run every TT node of `graph` by `strategy` ("auto" | "contract" | "dense")."""
    if strategy not in STRATEGIES:
        raise InputError(f"tt_strategy must be one of {STRATEGIES}, got {strategy!r}")
    for n in graph.nodes:
        if n.op in TT_OPS:
            n.attrs["strategy"] = strategy


class _KernelCache:
    """Rebuilt dense kernels, one per node: built once under a lock, dropped with the node,
    rebuilt if the node's core arrays are replaced."""

    def __init__(self):
        self._lock = threading.Lock()
        self._kernels: dict[int, tuple[tuple, np.ndarray]] = {}  # id(node) -> (cores, kernel)

    def get(self, node: Node, cores: tuple, build) -> np.ndarray:
        hit = self._kernels.get(id(node))
        if hit is None or any(a is not b for a, b in zip(hit[0], cores)):
            with self._lock:
                hit = self._kernels.get(id(node))
                if hit is None or any(a is not b for a, b in zip(hit[0], cores)):
                    if hit is None:
                        weakref.finalize(node, self._kernels.pop, id(node), None)
                    hit = self._kernels[id(node)] = (cores, build())
        return hit[1]


_KERNELS = _KernelCache()


_SCRATCH = threading.local()


def _scratch(n: int) -> np.ndarray:
    """This thread's flat float32 scratch of at least n values (grown, never shrunk), where the
    chain's intermediates live: as fresh arrays of up to 8 MB, glibc handed them back to the OS
    after each call and the next call page-faulted on them (3,300 faults per call on TT VGG-16
    at batch 16)."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.size < n:
        buf = _SCRATCH.buf = np.empty(n, np.float32)
    return buf


@njit(cache=True, parallel=True)
def _transpose(src, m, dst):
    """dst (n, m) flat = src (m, n) flat transposed, in blocks of 1024 columns per task (src
    rows read in order, dst written within a block that stays in cache); NumPy's copy of the
    transposed view ran on one thread and took 3x longer where the scratch got no huge pages."""
    n = src.size // m
    for blk in prange(-(-n // 1024)):
        q0 = blk * 1024
        q1 = min(n, q0 + 1024)
        for k in range(m):
            s = k * n
            for q in range(q0, q1):
                dst[np.uintp(q * m + k)] = src[np.uintp(s + q)]


def _contract(t: np.ndarray, cores) -> np.ndarray:
    """Fast chain: t laid out (r_0, in_1..in_D, P) -> (P, prod out_k), one matmul per core.
    Returns a view of this thread's scratch: the caller copies it out before the next chain."""
    half = size = t.size                                    # the largest intermediate
    for r, n, m, r2 in (g.shape for g in cores):
        size = size // (r * n) * m * r2
        half = max(half, size)
    buf = _scratch(2 * half)
    products, inputs = buf[:half], buf[half:2 * half]      # a matmul's output, the next input
    if not t.flags.c_contiguous:
        dst = inputs[:t.size].reshape(t.shape)
        np.copyto(dst, t)
        t = dst
    for g in cores:                                         # (r_{k-1}, in_k, out_k, r_k)
        r, n, m, r2 = g.shape
        cols = t.size // (r * n)
        y = products[:m * r2 * cols].reshape(m * r2, cols)  # (out_k, r_k, in_k+1.., P, out_1..)
        matmul(g.reshape(r * n, m * r2).T, t.reshape(r * n, cols), y)
        t = inputs[:y.size].reshape(-1, m)                  # (r_k, in_k+1.., P, out_1..out_k)
        _transpose(y.ravel(), m, t.ravel())
    return t.reshape(-1, numel(g.shape[2] for g in cores))


def _einsum_core(t: np.ndarray, g: np.ndarray) -> np.ndarray:
    """One core of the plain chain: t (P, outs done, in_k, ins left, r_{k-1}) x g (r_{k-1}, in_k,
    out_k, r_k) -> (P, outs done, out_k, ins left, r_k)."""
    return np.einsum("psnca,anmb->psmcb", t, g)


def _contract_reference(t: np.ndarray, cores, product=_einsum_core) -> np.ndarray:
    """Plain chain: t (P, prod in_k, r_0) -> (P, prod out_k), one `product` per core."""
    P, n_in, r = t.shape
    t = t.reshape(P, 1, n_in, r)                            # (P, outs done, ins left, rank)
    for g in cores:                                         # (r_{k-1}, in_k, out_k, r_k)
        _, n, m, r2 = g.shape
        left = t.shape[2] // n
        t = product(t.reshape(P, t.shape[1], n, left, r), g)
        t = t.reshape(P, -1, left, r2)
        r = r2
    return t.reshape(P, -1)


@njit(cache=True)
def _core_counted(t, g, out):
    """out[p, s, m, c, b] = sum over (n, a) of t[p, s, n, c, a] * g[a, n, m, b]: one core of the
    chain by plain loops, one count per multiply-add. Returns the count."""
    P, S, N, L, R = t.shape
    M, R2 = g.shape[2], g.shape[3]
    macs = 0
    for p in range(P):
        for s in range(S):
            for m in range(M):
                for c in range(L):
                    for b in range(R2):
                        acc = 0.0
                        for n in range(N):
                            for a in range(R):
                                acc += t[p, s, n, c, a] * g[a, n, m, b]
                                macs += 1
                        out[p, s, m, c, b] = acc
    return macs


def _contract_counted(t: np.ndarray, cores) -> tuple[np.ndarray, int]:
    """The plain chain with every core contracted by `_core_counted`: (output, MACs executed)."""
    macs = 0

    def product(t5, g):
        nonlocal macs
        out = np.empty(t5.shape[:2] + (g.shape[2],) + t5.shape[3:4] + (g.shape[3],), np.float32)
        macs += _core_counted(np.ascontiguousarray(t5), g, out)
        return out
    return _contract_reference(t, cores, product), macs


class _TT(Op):
    """What both TT ops share: the chain of cores, its checks, the strategies and the counts."""
    n_inputs = 1
    arena_output = True
    spatial = False                                         # a spatial core0 leads the chain
    contract_cost = 1.0     # "auto": a contraction MAC's time in the dense op's MACs (below)

    def core_names(self, node) -> list[str]:
        return [f"core{k}" for k in range(0 if self.spatial else 1, len(node.attrs["in_modes"]) + 1)]

    def chain(self, node) -> tuple[list, list, list]:
        """(in modes, out modes, ranks with the outer 1s) of the node's whole chain of cores."""
        a = node.attrs
        lead = [numel(a["kernel_size"])] if self.spatial else []
        return (lead + a["in_modes"], [1] * len(lead) + a["out_modes"], [1] + a["ranks"] + [1])

    def cores(self, node) -> tuple:
        return tuple(node.weights[k] for k in self.core_names(node))

    def check_attrs(self, node):
        in_modes = ints(node, "in_modes", 1)
        if not 1 <= len(in_modes) <= MAX_CORES:
            raise FormatError(f"node '{node.name}' ({node.op}): expected 1..{MAX_CORES} in_modes, "
                              f"got {in_modes}")
        ints(node, "out_modes", 1, len(in_modes))
        ints(node, "ranks", 1, len(in_modes) - 1 + self.spatial)
        if attr(node, "strategy", str, default="auto") not in STRATEGIES:
            raise FormatError(f"node '{node.name}' ({node.op}): strategy must be one of "
                              f"{STRATEGIES}, got {node.attrs['strategy']!r}")
        want = self.core_names(node)
        if sorted(k for k in node.weights if k != "bias") != sorted(want):
            raise FormatError(f"node '{node.name}' ({node.op}): expected weights {want} "
                              f"(+ optional bias) for {len(in_modes)} modes, got {list(node.weights)}")

    def check_cores(self, node) -> None:
        """Every core (r_{k-1}, in_k, out_k, r_k) and the bias (prod out) exactly as the attrs say."""
        ins, outs, ranks = self.chain(node)
        for k, name in enumerate(self.core_names(node)):
            check_weight(node, name, (ranks[k], ins[k], outs[k], ranks[k + 1]))
        if "bias" in node.weights:
            check_weight(node, "bias", (numel(outs),))

    def macs_per_position(self, node) -> dict:
        """MACs per output position (pixel or row) both ways: {"contract": ..., "dense": ...}."""
        ins, outs, ranks = self.chain(node)
        return {"contract": chain_macs(ins, outs, ranks), "dense": numel(ins) * numel(outs)}

    def strategy(self, node) -> str:
        """The way this node runs: its `strategy` attribute, "auto" resolved by MACs, each
        contraction MAC counted contract_cost times."""
        s = node.attrs.get("strategy", "auto")
        if s == "auto":
            per = self.macs_per_position(node)
            s = "contract" if per["contract"] * self.contract_cost < per["dense"] else "dense"
        return s

    def positions(self, out_shape) -> int:
        """Output positions (pixels or rows) the chain runs at."""
        raise NotImplementedError

    def costs(self, node, in_shapes, out_shape) -> dict:
        """MACs of one call both ways: {"contract": ..., "dense": ...} (the rebuild is at load)."""
        p = self.positions(out_shape)
        return {k: p * v for k, v in self.macs_per_position(node).items()}

    def cost(self, node, in_shapes, out_shape):
        macs = self.costs(node, in_shapes, out_shape)[self.strategy(node)]
        return Cost(macs=macs, other=numel(out_shape) if "bias" in node.weights else 0)

    def workspace(self, node, in_shapes, out_shape):
        """Scratch elements of the way the node runs. contract: the chain's largest intermediate
        twice (a matmul's output and its transposed copy), plus the stage-1 scratch of
        tt_conv2d; dense: the cached kernel and its float64 rebuild (intermediates of up to
        prod(in_1..in_k) prod(out_1..out_k) r_k values, two at a time), plus the dense kernel's
        own scratch."""
        ins, outs, ranks = self.chain(node)
        D = len(ins)
        if self.strategy(node) == "contract":
            inter = max(ranks[k] * numel(ins[k:]) * numel(outs[:k]) for k in range(D + 1))
            return 2 * self.positions(out_shape) * inter + self.stage_workspace(node, in_shapes, out_shape)
        rebuild = max(numel(ins[:k + 1]) * numel(outs[:k + 1]) * ranks[k + 1] for k in range(D))
        return numel(ins) * numel(outs) + 4 * rebuild + self.dense_workspace(node, in_shapes, out_shape)

    def stage_workspace(self, node, in_shapes, out_shape) -> int:
        return 0

    def dense_workspace(self, node, in_shapes, out_shape) -> int:
        return 0

    def count_details(self, node, in_shapes, out_shape):
        costs = self.costs(node, in_shapes, out_shape)
        return {"strategy": self.strategy(node), "macs_contract": costs["contract"],
                "macs_dense": costs["dense"]}

    def lowered(self, node):
        """Run dense: the conv2d / linear of the rebuilt kernel, so that a plan folds a
        following BatchNorm into it and fuses a residual add and activation as for any conv.
        The kernel is rebuilt here, not cached: the plan's node holds it (the op's cache fills
        only if the node itself runs, for activations)."""
        if self.strategy(node) != "dense":
            return node
        return self.dense_node(node, self.dense_kernel(node))

    def kernel(self, node) -> np.ndarray:
        """The rebuilt dense kernel of `node`, built once and cached."""
        return _KERNELS.get(node, self.cores(node), lambda: self.dense_kernel(node))

    def run(self, node, x):
        if self.strategy(node) == "dense":
            return self.run_dense(node, x, self.kernel(node))
        return self.run_contract(node, x)

    def counted(self, node, x, strategy=None):
        """(output, Cost executed) the way `strategy` says (default: the node's, as run)."""
        if (strategy or self.strategy(node)) == "dense":
            return self.counted_dense(node, x, self.dense_kernel(node))
        out, cost = self.counted_contract(node, x)
        return out, cost + Cost(other=out.size if "bias" in node.weights else 0)


@register
class TTConv2d(_TT):
    name = "tt_conv2d"
    spatial = True
    # The chain (a depthwise conv, then small matmuls over the activations) ran at 1/1.3-1/4.1
    # of the rebuilt conv's rate on TT VGG-16's layers (AVX2, 2 threads; 8x8 to 2x2, batch 1
    # and 16): its 512-channel layers, at 0.74 of the dense MACs, took 1.4-3x as long.
    contract_cost = 2.5
    weights = ("core0", "core1")
    optional_weights = tuple(f"core{k}" for k in range(2, MAX_CORES + 1)) + ("bias",)

    def check_attrs(self, node):
        super().check_attrs(node)
        ints(node, "kernel_size", 1, 2)
        _CONV.check_attrs(Node(node.name, node.op, node.inputs, dict(node.attrs, groups=1), {}))

    def spatial_node(self, node, C: int) -> Node:
        """The depthwise conv2d of stage 1: channel c * r_0 + a = input channel c convolved with
        filter a of the spatial core."""
        a = node.attrs
        kh, kw = a["kernel_size"]
        r0 = a["ranks"][0]
        w = node.weights["core0"][0, :, 0, :].T.reshape(r0, 1, kh, kw)  # (r_0, 1, kh, kw) filters
        attrs = {k: a[k] for k in ("stride", "padding", "dilation", "padding_mode")}
        return Node(node.name, node.op, node.inputs, dict(attrs, groups=C),
                    {"weight": np.tile(w, (C, 1, 1, 1))})               # (C r_0, 1, kh, kw)

    def infer(self, node, in_shapes):
        self.check_cores(node)
        x = tuple(in_shapes[0])
        C, S = numel(node.attrs["in_modes"]), numel(node.attrs["out_modes"])
        if len(x) != 4 or x[1] != C:
            raise mismatch(node, f"expected input (B, C={C}, H, W) for in_modes "
                                 f"{node.attrs['in_modes']}, got {x}")
        B, _, ho, wo = _CONV.infer(self.spatial_node(node, C), [x])
        return (B, S, ho, wo)

    def positions(self, out_shape):
        return numel(out_shape) // out_shape[1]

    def stage_workspace(self, node, in_shapes, out_shape):
        """The depthwise stage's output (B, C r_0, H', W') and its conv scratch."""
        C = in_shapes[0][1]
        sp = self.spatial_node(node, C)
        s = (out_shape[0], C * node.attrs["ranks"][0]) + tuple(out_shape[2:])
        return numel(s) + _CONV.workspace(sp, in_shapes, s)

    def dense_workspace(self, node, in_shapes, out_shape):
        kernel = np.broadcast_to(np.float32(0), (out_shape[1], in_shapes[0][1], *node.attrs["kernel_size"]))
        attrs = dict(node.attrs, groups=1)  # the rebuilt kernel is an ungrouped conv
        dense = Node(node.name, node.op, node.inputs, attrs, {"weight": kernel})  # shape only
        return _CONV.workspace(dense, in_shapes, out_shape)

    def _finish(self, node, y, B, ho, wo) -> np.ndarray:
        """(B H' W', S) chain output -> (B, S, H', W') plus bias."""
        out = empty((B, y.shape[-1], ho * wo))                 # (B, S, H'W')
        np.copyto(out, y.reshape(B, ho * wo, -1).transpose(0, 2, 1))
        if "bias" in node.weights:
            out += node.weights["bias"][:, None]
        return out.reshape(B, -1, ho, wo)

    def chain_input(self, s, C: int) -> np.ndarray:
        """Stage-1 responses s (B, C r_0, H', W') as the chain's input (B H' W', C, r_0)."""
        B, _, ho, wo = s.shape
        return s.reshape(B, C, -1, ho * wo).transpose(0, 3, 1, 2).reshape(B * ho * wo, C, -1)

    def reference(self, node, x):
        B, C = x.shape[:2]
        s = _CONV.reference(self.spatial_node(node, C), x)     # (B, C r_0, H', W')
        y = _contract_reference(self.chain_input(s, C), self.cores(node)[1:])
        return self._finish(node, y, B, *s.shape[2:])

    def counted_contract(self, node, x):
        B, C = x.shape[:2]
        s, cost = _CONV.counted(self.spatial_node(node, C), x)
        y, macs = _contract_counted(self.chain_input(s, C), self.cores(node)[1:])
        return self._finish(node, y, B, *s.shape[2:]), cost + Cost(macs=macs)

    def run_contract(self, node, x):
        a = node.attrs
        B, C = x.shape[:2]
        sp = self.spatial_node(node, C)
        s = conv2d_fast(x, sp.weights["weight"], None, a["stride"], a["padding"], a["dilation"],
                        C, a["padding_mode"])                  # (B, C r_0, H', W')
        _, _, ho, wo = s.shape
        t = s.reshape(B, C, -1, ho * wo).transpose(2, 1, 0, 3)  # (r_0, C, B, H'W')
        return self._finish(node, _contract(t, self.cores(node)[1:]), B, ho, wo)

    def dense_kernel(self, node) -> np.ndarray:
        kernel = conv_kernel(self.cores(node), node.attrs["kernel_size"])
        return np.ascontiguousarray(kernel, np.float32)        # (S, C, kh, kw)

    def dense_node(self, node, kernel) -> Node:
        a = node.attrs
        attrs = {k: a[k] for k in ("stride", "padding", "dilation", "padding_mode")}
        weights = {"weight": kernel, **{k: v for k, v in node.weights.items() if k == "bias"}}
        return Node(node.name, "conv2d", node.inputs, dict(attrs, groups=1), weights)

    def run_dense(self, node, x, kernel):
        a = node.attrs
        return conv2d_fast(x, kernel, node.weights.get("bias"), a["stride"], a["padding"],
                           a["dilation"], 1, a["padding_mode"])

    def counted_dense(self, node, x, kernel):
        a = node.attrs
        return conv2d_counted(x, kernel, node.weights.get("bias"), a["stride"], a["padding"],
                              a["dilation"], 1, a["padding_mode"])


@register
class TTLinear(_TT):
    name = "tt_linear"
    # contract_cost 1: a large layer's dense matrix streams from memory (4096 x 4096, batch 1:
    # 22 ms dense, 0.3 ms contracted), so fewer MACs is the faster way, or close to it
    weights = ("core1",)
    optional_weights = tuple(f"core{k}" for k in range(2, MAX_CORES + 1)) + ("bias",)

    def infer(self, node, in_shapes):
        self.check_cores(node)
        x = tuple(in_shapes[0])
        n_in = numel(node.attrs["in_modes"])
        if not x or x[-1] != n_in:
            raise mismatch(node, f"expected input (..., in={n_in}) for in_modes "
                                 f"{node.attrs['in_modes']}, got {x}")
        return x[:-1] + (numel(node.attrs["out_modes"]),)

    def positions(self, out_shape):
        return numel(out_shape[:-1])

    def _finish(self, node, y, x) -> np.ndarray:
        if "bias" in node.weights:
            y += node.weights["bias"]
        return y.reshape(x.shape[:-1] + (-1,))

    def reference(self, node, x):
        t = x.reshape(-1, x.shape[-1], 1)                      # (P, in, r_0 = 1)
        return self._finish(node, _contract_reference(t, self.cores(node)), x)

    def counted_contract(self, node, x):
        y, macs = _contract_counted(x.reshape(-1, x.shape[-1], 1), self.cores(node))
        return self._finish(node, y, x), Cost(macs=macs)

    def run_contract(self, node, x):
        t = x.reshape(-1, x.shape[-1]).T                       # (in, P): r_0 = 1 leads
        y = _contract(t, self.cores(node))                     # (P, out), in the scratch
        out = empty(y.shape)                                   # (P, out)
        np.copyto(out, y)
        return self._finish(node, out, x)

    def dense_kernel(self, node) -> np.ndarray:
        return np.ascontiguousarray(tt_matrix(self.cores(node)).T, np.float32)  # (out, in)

    def dense_node(self, node, kernel) -> Node:
        weights = {"weight": kernel, **{k: v for k, v in node.weights.items() if k == "bias"}}
        return Node(node.name, "linear", node.inputs, {}, weights)

    def run_dense(self, node, x, kernel):
        return linear_fast(x, kernel, node.weights.get("bias"))

    def counted_dense(self, node, x, kernel):
        return linear_counted(x, kernel, node.weights.get("bias"))

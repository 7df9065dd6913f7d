"""GEMM-shaped fast kernels: conv2d and basis conv and linear, with the bias add, a residual add
and a simple activation fused into one epilogue, run as Numba-parallel tasks that each call a
single-threaded GEMM: the engine's own (ops/sgemm.py), or BLAS for GEMMs narrower than its
register tile (`_gemm`).

Threading (docs/ARCHITECTURE.md, "Threading"): one pool per call, Numba's. Where BLAS is called,
it is from inside a prange task through Numba's BLAS helper (`numba_xxgemm`, the sgemm that
scipy.linalg.cython_blas exports), and that BLAS is set to one thread at import
(`single_threaded_blas`), so OpenBLAS never starts threads of its own that would spin-wait
against Numba's. NumPy's own BLAS is left as the user set it; the engine does not call it on
any hot path.

Ways to run a conv (`prepare_conv`, `plan_conv`), P = H'W' output positions per image:
  direct      (one group, K = C*kh*kw >= DIRECT_MIN_K, tiles wasting little; by tiles only
              where direct_beats_packed: with AVX2 at stride 1 on wide images)
              `_conv_direct`: no im2col. Register tiles of a few output rows x 4 (or 2)
              adjacent columns x NR channels, each summed over all of K from the input read in
              place through a table of tap offsets (sgemm's direct micro-kernel: input values
              broadcast, weights as NR-wide panels), transposed in registers into a stage whose
              rows get the epilogue. Work in blocks of output rows, each task copying its
              block's zero-padded input (split by stride phase; 8 channels interleaved on large
              planes) into its own scratch; a thread done with its run of blocks takes the
              others' last ones. A basis conv runs its stages there
              too: the block's basis responses, then the combine as a 1x1 conv over them. Few
              filters (basis M = 12 or 25; convs with K < DIRECT_MIN_K at stride 1) run over
              the input grid (of a stride phase) instead ("grid1": the GEMM micro-kernel,
              filters broadcast, NR window corners as the vectors).
  packed      (one group, B*P >= NR; not for basis convs whose stage 1 is kn2row per image)
              `_conv_packed`: weights packed once (sgemm.pack_rows); the output positions cut
              into chunks sized for L2; per chunk the im2col columns are gathered KC rows at a
              time straight into the micro-kernel's panels (`_pack_cols`, in runs of 8 or 4
              values, consecutive or every other one, where the columns allow), or at stride 1 on
              wide images read in place ("grid", `plan_conv`); the micro-kernel writes a C chunk
              whose epilogue goes to the output. Split by chunks, or by output rows when a
              layer has fewer columns than rows (weight-bound). On small padded images the
              columns are sorted by the taps that read inside the input, and each tile skips
              the others (`column_order`; the input then padded channels-last).
  streamed    (basis convs of one group, NR/2 < B*P <= STREAMED_TILES*NR: batch 1 at 8x8, up
              to 4 at 4x4) `_basis_streamed`: weight-bound, so split by weights in two phases:
              stage 1 by K (each thread pads its input channels, gathers their im2col rows KC
              at a time and multiplies them by its rows of the basis into partial responses),
              then the combine and epilogue by output row panels over the partials' sum.
  split_k     (basis convs of one group whose B*H' output rows and W' columns fit in one
              direct tile: batch 1 at 2x2 and below) `_basis_split_k`: stage 1 split by K
              (each thread pads its channels and sums their taps' responses, by the direct
              micro-kernel reading the padded input in place), the threads' partial responses
              added up, then the combine split by output panels.
  per image   (P >= PER_IMAGE_MIN) tasks are (image, band of output rows), in contiguous runs
              per thread; each task im2cols its band into its thread's scratch, runs the
              GEMM(s) straight into the output and applies the epilogue there, in cache.
  batched     (small P: grouped convs, batch 1) the whole batch's columns (K, B*P) in one matrix
              (a prange over (image, channel) fills it), then one GEMM split over the threads
              by output channels when B*P < N (each thread reads half the weights: these layers
              are weight-bound) or else by columns, the epilogue scattering (N, B*P) back to
              (B, N, P). Batches whose column matrix would pass BATCH_COLS_CAP values run in
              groups of images.
A basis conv runs both stages in the same tasks: the basis responses of a task's columns stay in
its scratch and are combined at once (batched: a second GEMM phase after a barrier). With stride
1 and fewer basis filters than input channels per group, stage 1 is kn2row instead of im2col: one
GEMM of every tap's filters (kh*kw*M rows) against the input itself, then shifted adds
(`_kn2row_image`, `_kn2row_batched`).
1x1 stride-1 unpadded convs skip im2col in the per-image split (the image is the column matrix).
Also here: `linear_gemm` (linear, output features split) and `matmul` (the TT chain).
im2col of stride-1 'same' convs is one shifted copy per row (`_im2col`). Short inner loops index
the flat arrays with unsigned offsets (np.uintp): without wrap-around checks LLVM vectorizes them
(signed indices: 7x slower shifted adds), and no view is set up per row (slower on short rows).
Copies and adds of short rows between two arrays (kn2row's shifted adds, a padded plane's rows,
the gather's runs) go through explicit vector loads and stores (`sgemm._vector_op`, `_run`):
LLVM's own loop ran them scalar below 32 values (its vector body, behind an overlap check), so
BasisConv VGG-16 at batch 16 was 9% slower.

Each thread takes a contiguous run of every kernel's tasks (images, chunks of columns, blocks of
rows), so that it reads mostly what it wrote in the layer before: touching data the other core
wrote costs far more here (dealt round-robin, BasisConv VGG-16 and ResNet-18 at batch 16 were
6% slower). A thread done with its run takes the others' last tasks (`_take`), so that a core
slowed by the machine holds the call up less.
Work is cut by shapes and the start-up thread count (`threads()`), never by the threads a call
gets, so results are bit-identical under numba.set_num_threads (dataset runs rely on it).

Epilogue, per output element: v = acc + bias[n], then v += residual[b, n, p] when fused, then the
activation act (0 none, 1 relu, 2 clip a0..a1, 3 leaky_relu slope a0), in float32, the order and
rounding of the unfused ops (conv, add, activation); NaN propagates as in NumPy. As whole
vectors of 8 (`_epilogue_op`; LLVM left rows of up to 32 values scalar), in `_finish` inlined
into each kernel (it is called per row, often of 16 values or fewer): with both, BasisConv
VGG-16's layers at batch 16 took 0.80-0.81 of the time at 2x2, 0.87-0.92 at 4x4, 0.93-0.97 at
8x8, the net 0.95.
"""
from __future__ import annotations

import functools
import os
import threading
import weakref
from typing import NamedTuple

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic
from numba.np.linalg import ensure_blas

from ..buffers import empty, scratch
from .activation import residual_then_act
from .sgemm import (CHANNEL_BLOCK, DIRECT_NARROW_COST, DIRECT_TILES, KC, MR, NR, _activated,
                    _direct_narrow, _direct_narrow_grouped, _direct_narrow_streamed, _direct_wide,
                    _direct_wide_grouped, _direct_wide_streamed, _evens4, _evens8, _micro,
                    _micro_finish, _run, _splat, _transposed8, _vec4, _vec8, _vector_ptr,
                    pack_cols, pack_rows, pack_size, sgemm)

PER_IMAGE_MIN = 256          # output positions per image from which images are split, not batched
COLS_CAP = 1 << 20           # values of one task's im2col scratch (4 MB): bands are cut to fit
BATCH_COLS_CAP = 1 << 22     # values of the batched column matrix (16 MB): larger batches go in groups
PACKED_CHUNK_VALUES = 1 << 17  # values of one packed task's scratch (512 KB: L2)
STREAMED_TILES = 4           # most register tiles of output positions for the streamed path
GRID_WASTE = 1.1             # most columns computed per output for the packed path's grid mode
DIRECT_WASTE = 1.25          # most outputs computed per output for the direct conv
DIRECT_MIN_K = 64            # fewest im2col rows (C*kh*kw) for the direct conv
DIRECT_STREAMED = 64         # direct conv whatever its waste up to this many outputs per channel
DIRECT_BLOCK_VALUES = 1 << 17  # input values a direct conv block reads (512 KB: half of L2)
STREAMED_PANEL_TILES = 16    # a direct conv block's tiles per weight panel up to which it streams
BLOCKED_PLANE = 256          # ... when its padded planes have at least this many values
TAPS_SKIPPED_MIN = 0.05       # packed path: columns sorted by their taps where that skips this much
PACKED_TAPS_MAX = 0.75        # ... and run packed whatever else fits, where it computes this little
ACT_CODES = {"relu": 1, "clip": 2, "leaky_relu": 3}


def single_threaded_blas() -> list[str]:
    """Set the BLAS library that scipy.linalg.cython_blas (hence Numba's np.dot and these
    kernels) calls to one thread; returns the paths limited. NumPy's bundled BLAS is left alone
    unless SciPy shares it (then it is the same library)."""
    import scipy
    from threadpoolctl import ThreadpoolController
    ensure_blas()                                   # imports scipy.linalg.cython_blas
    here = os.path.dirname(os.path.realpath(scipy.__file__))
    roots = (here + os.sep, os.path.join(os.path.dirname(here), "scipy.libs") + os.sep)
    blas = [c for c in ThreadpoolController().lib_controllers if c.user_api == "blas"]
    mine = [c for c in blas if os.path.realpath(c.filepath).startswith(roots)]
    if not mine:   # SciPy links a BLAS outside its package (system / conda): that one
        import numpy
        npdir = os.path.dirname(os.path.realpath(numpy.__file__))
        mine = [c for c in blas if not os.path.realpath(c.filepath).startswith(
            (npdir + os.sep, os.path.join(os.path.dirname(npdir), "numpy.libs") + os.sep))]
    for c in mine:
        c.set_num_threads(1)
    return [c.filepath for c in mine]


LIMITED_BLAS = single_threaded_blas()

_F32P = types.CPointer(types.float32)
_xxgemm = types.ExternalFunction("numba_xxgemm", types.intc(
    types.char, types.char, types.char, types.intp, types.intp, types.intp,
    _F32P, _F32P, types.intp, _F32P, types.intp, _F32P, _F32P, types.intp))


@njit(cache=True)
def _gemm(tb, m, n, k, a, oa, lda, b, ob, ldb, c, oc, ldc, pack, packed_a=None):
    """Row-major C = A @ B over flat float32 arrays, single-threaded:
    c[oc + i*ldc + j] = sum_l a[oa + i*lda + l] * B[l, j] for i < m, j < n, where B[l, j] is
    b[ob + l*ldb + j], or b[ob + j*ldb + l] when tb (B stored transposed). The engine's own
    sgemm.sgemm (pack: its scratch, pack_size(m, n, k) values; packed_a: A as pack_rows made
    it, read instead of a), except with fewer columns than its register tile (late layers at
    batch 1), where BLAS's wastes less."""
    if n >= NR:
        sgemm(tb, m, n, k, a, oa, lda, b, ob, ldb, c, oc, ldc, pack, packed_a)
        return
    if m <= 0 or n <= 0:
        return
    s = np.empty(2, np.float32)
    s[0] = 1.0
    s[1] = 0.0
    # column-major view: C^T (n x m) = op(B)^T (n x k) @ A^T (k x m)
    _xxgemm(115, 116 if tb else 110, 110, n, m, k, s[0:].ctypes, b[ob:].ctypes, ldb,
            a[oa:].ctypes, lda, s[1:].ctypes, c[oc:].ctypes, ldc)


@njit(inline="always")
def _activation(v, act, lo, hi):
    """act(v) by the epilogue's code (0 none, 1 relu, 2 clip lo..hi, 3 leaky_relu slope lo),
    NaN propagating. None is tested first: last, it cost the packed path's per-value epilogue
    three compares a value (an 8x8 basis layer without activation 6-8% slower)."""
    if act == 0:
        return v
    if act == 1:
        return np.float32(0.0) if v < 0 else v
    if act == 2:
        return lo if v < lo else (hi if v > hi else v)
    if act == 3:
        return v * lo if v < 0 else v
    return v


def _epilogue_op(lanes, with_res):
    """An intrinsic f(dst, od, src, os, bv, res, orr, act, lo, hi): the epilogue of `lanes`
    values as whole vectors, dst[od + q] = act(src[os + q] + bv (+ res[orr + q] when with_res))
    by _activation's rule (sgemm._activated: NaN propagates the same way). As a
    loop over values LLVM kept rows of up to 32 scalar (its vector body behind an overlap
    check): about a cycle a value, 10% of a 32x32 basis layer's time."""
    @intrinsic
    def op(typingctx, dst_t, od_t, src_t, os_t, bv_t, res_t, orr_t, act_t, lo_t, hi_t):
        sig = types.void(dst_t, types.intp, src_t, types.intp, bv_t, res_t, types.intp, act_t,
                         lo_t, hi_t)

        def codegen(context, builder, signature, args):
            dst, od, src, os_, bv, res, orr, act, lo, hi = args

            def at(arr_t, arr, offset):
                return _vector_ptr(context, builder, arr_t, arr, offset, lanes)

            def splat(value, value_t):
                return _splat(builder, context.cast(builder, value, value_t, types.float32), lanes)
            v = builder.fadd(builder.load(at(src_t, src, os_), align=4), splat(bv, bv_t))
            if with_res:
                v = builder.fadd(v, builder.load(at(res_t, res, orr), align=4))
            out = _activated(builder, v, context.cast(builder, act, act_t, types.intp),
                             splat(lo, lo_t), splat(hi, hi_t))
            builder.store(out, at(dst_t, dst, od), align=4)
            return context.get_dummy_value()
        return sig, codegen
    return op


_epilogue8, _epilogue8_res = _epilogue_op(8, False), _epilogue_op(8, True)


@njit(inline="always")
def _finish_row(dst, od, src, os_, n, bv, res, orr, has_res, act, lo, hi):
    """dst[od + q] = act(src[os_ + q] + bv (+ res[orr + q])) for q < n, in one pass: vectors
    of 8, then values (inlined with _finish wherever an epilogue runs: vectors of 4 as well,
    two more intrinsics there, made the cold compile 12 s longer)."""
    q = 0
    while q + 8 <= n:
        if has_res:
            _epilogue8_res(dst, od + q, src, os_ + q, bv, res, orr + q, act, lo, hi)
        else:
            _epilogue8(dst, od + q, src, os_ + q, bv, res, orr, act, lo, hi)
        q += 8
    for u in range(q, n):
        v = src[np.uintp(os_ + u)] + bv
        if has_res:
            v = v + res[np.uintp(orr + u)]
        dst[np.uintp(od + u)] = _activation(v, act, lo, hi)


@njit(cache=True, inline="always")
def _finish(dst, od, src, os_, n, bv, res, orr, has_res, act, a0, a1, rows=1, ldd=0, lds=0):
    """dst[od + r*ldd + q] = act(src[os_ + r*lds + q] + bv (+ res[orr + r*ldd + q])) for q < n,
    r < rows; dst is not src (in place: _finish_in_place). Unsigned indices (no wrap-around
    checks) and no views (their set-up costs more than a short row), so that the loops
    vectorize; inlined (called per row of 16 values or fewer, the call cost 2 ns a value:
    BasisConv VGG-16's 4x4 layers at batch 16 took 1.1-1.15x as long)."""
    for r in range(rows):
        _finish_row(dst, od + r * ldd, src, os_ + r * lds, n, bv, res, orr + r * ldd, has_res,
                    act, np.float32(a0), np.float32(a1))


@njit(cache=True)
def _finish_in_place(dst, od, n, bv, res, orr, has_res, act, a0, a1):
    """_finish of dst[od:od + n] into itself. Inlined with one array and index, the loop
    vectorizes; through _finish, with dst also passed as src, LLVM's run-time overlap check
    sent it to its scalar version, 3-4x slower."""
    _finish_row(dst, od, dst, od, n, bv, res, orr, has_res, act, np.float32(a0), np.float32(a1))


@njit(cache=True)
def _im2col(x, b, c0, c1, kh, kw, sh, sw, dh, dw, pt, pl, oy0, oy1, wo, cols, base, ld):
    """cols[base + r*ld + (oy - oy0)*wo + ox] = x[b, c, oy*sh - pt + i*dh, ox*sw - pl + j*dw]
    (0 where that falls outside x: zero padding) for r = ((c - c0)*kh + i)*kw + j,
    c0 <= c < c1, oy0 <= oy < oy1, ox < wo. Stride 1 with H' rows as wide as the input's (the
    'same' convs): one shifted copy per row r, then the few columns that wrapped are zeroed."""
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    xf = x.ravel()
    same = sh == 1 and sw == 1 and wo == W
    for c in range(c0, c1):
        plane = (b * C + c) * H * W
        for i in range(kh):
            # output rows whose input row oy*sh - pt + i*dh lies inside x: [ya, yb)
            ya = min(oy1, max(oy0, (pt - i * dh + sh - 1) // sh))
            yb = max(ya, min(oy1, (H - 1 + pt - i * dh) // sh + 1))
            for j in range(kw):
                r = ((c - c0) * kh + i) * kw + j
                off = j * dw - pl                        # ox reads input column ox*sw + off
                lo = min(wo, max(0, (sw - 1 - off) // sw))
                hi = max(lo, min(wo, (W - 1 - off) // sw + 1))
                d0 = base + r * ld
                cols[d0:d0 + (ya - oy0) * wo] = 0.0
                cols[d0 + (yb - oy0) * wo:d0 + (oy1 - oy0) * wo] = 0.0
                if same:
                    if hi <= lo:                    # the tap reads padding only
                        cols[d0 + (ya - oy0) * wo:d0 + (yb - oy0) * wo] = 0.0
                    if yb == ya or hi <= lo:
                        continue
                    s0 = plane + (ya - pt + i * dh) * W + off
                    d = d0 + (ya - oy0) * wo
                    n = (yb - ya) * wo
                    # the copy reads from s0 + lo to s0 + n - (wo - hi): inside the plane
                    cols[d + lo:d + n - (wo - hi)] = xf[s0 + lo:s0 + n - (wo - hi)]
                    for oy in range(ya, yb):
                        e = d + (oy - ya) * wo
                        cols[e:e + lo] = 0.0
                        if hi < wo:
                            cols[e + hi:e + wo] = 0.0
                    continue
                for oy in range(ya, yb):
                    d = d0 + (oy - oy0) * wo
                    cols[d:d + lo] = 0.0
                    s0 = plane + (oy * sh - pt + i * dh) * W + off
                    if sw == 1:
                        cols[d + lo:d + hi] = xf[s0 + lo:s0 + hi]
                    elif hi > lo:
                        dv = cols[d + lo:d + hi]
                        xv = xf[s0 + lo * sw:s0 + (hi - 1) * sw + 1:sw]
                        for q in range(hi - lo):
                            dv[q] = xv[q]
                    cols[d + hi:d + wo] = 0.0


@njit(cache=True, parallel=True)
def _per_image(x, w1, w2, two, bias, res, has_res, act, a0, a1, kh, kw, sh, sw, dh, dw, pt, pl,
               ho, wo, groups, nsplit, direct, out, ws, packs):
    """Conv (two=False: w1 (N, K)) or basis conv (two=True: w1 (G*M, K) basis, w2 (N, M)
    combine) of x (B, C, H, W) into out (B, N, H'*W'), K = C/G*kh*kw. Task (b, s) = image b,
    output rows [H' s / nsplit, H' (s+1) / nsplit); each row of ws (one per thread: im2col
    columns, then the basis responses) takes a contiguous run of tasks, then the others' last
    ones (_take), packs[t] its sgemm scratch. direct: 1x1, stride 1, no padding: the image is
    its own column matrix."""
    B, C = x.shape[0], x.shape[1]
    N, P = out.shape[1], out.shape[2]
    Cg = C // groups
    K = Cg * kh * kw
    M1 = w1.shape[0] // groups            # stage-1 rows per group (N/G for a conv, M for basis)
    Ng = N // groups
    T = ws.shape[0]
    tasks = B * nsplit
    xf = x.ravel()
    of = out.ravel()
    rf = res.ravel()
    w1f = w1.ravel()
    w2f = w2.ravel()
    taken = _unclaimed(tasks)
    for t in prange(T):
        buf = ws[t]
        for i in range(tasks):
            task = _take(taken, t, T, i)
            if task < 0:
                continue
            b = task // nsplit
            s = task % nsplit
            oy0 = ho * s // nsplit
            oy1 = ho * (s + 1) // nsplit
            n_col = (oy1 - oy0) * wo
            if n_col == 0:
                continue
            p0 = oy0 * wo
            sbase = K * n_col if not direct else 0    # basis responses after the columns
            for g in range(groups):
                if direct:
                    src, so, ld = xf, (b * C + g * Cg) * P + p0, P
                else:
                    _im2col(x, b, g * Cg, (g + 1) * Cg, kh, kw, sh, sw, dh, dw, pt, pl, oy0, oy1,
                            wo, buf, 0, n_col)
                    src, so, ld = buf, 0, n_col
                dst = (b * N + g * Ng) * P + p0
                if two:
                    _gemm(False, M1, n_col, K, w1f, g * M1 * K, K, src, so, ld, buf, sbase, n_col,
                          packs[t])
                    _gemm(False, Ng, n_col, M1, w2f, g * Ng * M1, M1, buf, sbase, n_col, of, dst,
                          P, packs[t])
                else:
                    _gemm(False, Ng, n_col, K, w1f, g * Ng * K, K, src, so, ld, of, dst, P,
                          packs[t])
            for n in range(N):
                o = (b * N + n) * P + p0
                _finish_in_place(of, o, n_col, bias[n], rf, o, has_res, act, a0, a1)


@njit(cache=True)
def _split(s, T, rows, cols, by_rows):
    """Slice s of T of a rows x cols GEMM output: (r0, r1, c0, c1)."""
    if by_rows:
        return rows * s // T, rows * (s + 1) // T, 0, cols
    return 0, rows, cols * s // T, cols * (s + 1) // T


@njit(cache=True)
def _grouped_gemm(w, k_w, groups, r0, r1, c0, c1, src, ld_src, k_src, dst, ld_dst, pack):
    """Rows [r0, r1) x columns [c0, c1) of dst (R, ld_dst) = blockdiag over groups of
    w (R, k_w) @ src (groups*k_src, ld_src): row r of group r // (R/G) reads src rows
    [g*k_src, (g+1)*k_src) (k_w == k_src). pack: sgemm's scratch."""
    R = w.shape[0]
    Rg = R // groups
    wf = w.ravel()
    for g in range(groups):
        a = max(r0, g * Rg)
        z = min(r1, (g + 1) * Rg)
        if z > a and c1 > c0:
            _gemm(False, z - a, c1 - c0, k_w, wf, a * k_w, k_w, src, g * k_src * ld_src + c0,
                  ld_src, dst, a * ld_dst + c0, ld_dst, pack)


@njit(cache=True, parallel=True)
def _batched(x, w1, w2, two, bias, res, has_res, act, a0, a1, kh, kw, sh, sw, dh, dw, pt, pl,
             ho, wo, groups, split1, split2, out, cols, s_buf, tmp, packs):
    """Conv / basis conv (as _per_image) of the whole batch as one GEMM: cols (C*kh*kw, B*P)
    <- im2col (prange over (image, channel)); [basis: s_buf (G*M, B*P) = basis @ cols, split
    over T slices by rows (split1) or columns]; tmp (N, B*P) = w @ cols or combine @ s_buf,
    split by split2, and the epilogue of each slice scatters it to out (B, N, P); packs[s]:
    slice s's sgemm scratch (T, ...)."""
    B, C = x.shape[0], x.shape[1]
    N, P = out.shape[1], out.shape[2]
    BP = B * P
    Cg = C // groups
    K = Cg * kh * kw
    T = packs.shape[0]
    cf = cols.ravel()
    sf = s_buf.ravel()
    tf = tmp.ravel()
    of = out.ravel()
    rf = res.ravel()
    for t in prange(B * C):
        b = t // C
        c = t % C
        _im2col(x, b, c, c + 1, kh, kw, sh, sw, dh, dw, pt, pl, 0, ho, wo, cf, c * kh * kw * BP + b * P, BP)
    if two:
        M1 = w1.shape[0] // groups
        for s in prange(T):
            r0, r1, c0, c1 = _split(s, T, w1.shape[0], BP, split1)
            _grouped_gemm(w1, K, groups, r0, r1, c0, c1, cf, BP, K, sf, BP, packs[s])
        for s in prange(T):
            r0, r1, c0, c1 = _split(s, T, N, BP, split2)
            _grouped_gemm(w2, M1, groups, r0, r1, c0, c1, sf, BP, M1, tf, BP, packs[s])
            _scatter(tf, of, rf, bias, has_res, act, a0, a1, r0, r1, c0, c1, N, P)
    else:
        for s in prange(T):
            r0, r1, c0, c1 = _split(s, T, N, BP, split2)
            _grouped_gemm(w1, K, groups, r0, r1, c0, c1, cf, BP, K, tf, BP, packs[s])
            _scatter(tf, of, rf, bias, has_res, act, a0, a1, r0, r1, c0, c1, N, P)


@njit(cache=True)
def _steps(n, step):
    """[0, step, ..., (n - 1)*step]: row offsets for the parallel kernels, built out here because
    an array expression in a parallel kernel becomes a parallel region of its own (a thread
    wake-up per call: 5-15 us)."""
    return np.arange(n) * step


@njit(cache=True)
def _unclaimed(units):
    """A kernel's claim flags (_take), all clear (out of the kernel for the reason of _steps)."""
    return np.zeros(units, np.int32)


@njit(cache=True)
def _tap_offsets(C, kh, kw, dh, dw, Hp, Wp, taps_first=False, channels_last=False):
    """Each im2col row (c*kh + i)*kw + j's tap offset in a zero-padded input (C, Hp, Wp), or
    row (i*kw + j)*C + c's when taps_first (the packed path's order: a tap's rows adjacent);
    in an input (Hp, Wp, C) when channels_last. (Loops, not divisions: dividing each row's
    index took 40 us for K = 4608, a 4x4 layer's gather and more.)"""
    delta = np.empty(C * kh * kw, np.intp)
    for c in range(C):
        for i in range(kh):
            for j in range(kw):
                k = (i * kw + j) * C + c if taps_first else (c * kh + i) * kw + j
                delta[k] = ((i * dh * Wp + j * dw) * C + c if channels_last
                            else (c * Hp + i * dh) * Wp + j * dw)
    return delta


@njit(cache=True)
def _phase_tap_offsets(koff, C, kh, kw, dh, dw, sh, sw, Hb, Wq, cb):
    """koff[k] = the offset of the direct conv's tap k, in the order (channel // cb, tap i, j,
    channel % cb), from a window corner in an input copied by _pad_planes (Hb x Wq planes per
    stride phase, cb channels interleaved). Loops, not divisions of k (as _tap_offsets)."""
    k = 0
    for g in range(C // cb):
        for i0 in range(kh):
            i = i0 * dh
            for j0 in range(kw):
                j = j0 * dw
                plane = (g * sh + i % sh) * sw + j % sw         # (channels, stride phase)
                base = ((plane * Hb + i // sh) * Wq + j // sw) * cb
                for u in range(cb):
                    koff[k] = base + u
                    k += 1


@njit(cache=True)
def _window_corners(colbase, q0, nq, P, C, Hp, Wp, wo, sh, sw, order=None, channels_last=False):
    """colbase[q] = the window corner in a zero-padded input (B, C, Hp, Wp), or (B, Hp, Wp, C)
    when channels_last, of output column q0 + q of the batch's B*P (P = H'*W' per image),
    which is output position order[q0 + q] (b*P + p) when given; entries past nq repeat the
    last column."""
    for q in range(colbase.size):
        g = q0 + min(q, nq - 1)
        if order is not None:
            g = order[g]
        b = g // P
        p = g - b * P
        if channels_last:
            colbase[q] = ((b * Hp + p // wo * sh) * Wp + p % wo * sw) * C
        else:
            colbase[q] = (b * C * Hp + p // wo * sh) * Wp + p % wo * sw


@njit(cache=True)
def _pad_channels(x, c0, c1, pt, pl, Hp, Wp, xpf):
    """Channels [c0, c1) of every image of x (B, C, H, W), zero-padded into their planes of
    xpf (B, C, Hp, Wp) flat: a thread's share when a kernel splits by channels."""
    B, C = x.shape[0], x.shape[1]
    plane = Hp * Wp
    for b in range(B):
        t0 = b * C + c0
        _pad_planes(x, t0, t0 + c1 - c0, 0, Hp, pt, pl, 1, 1, Wp,
                    xpf[t0 * plane:(t0 + c1 - c0) * plane])


@njit(cache=True)
def _sum_partials(resp, n):
    """The first n values of the threads' partial sums resp (T, ...) added up in thread order
    (so the result does not depend on which thread finished first)."""
    summed = np.empty(n, np.float32)
    for q in range(n):
        v = resp[0, q]
        for u in range(1, resp.shape[0]):
            v += resp[u, q]
        summed[q] = v
    return summed


@njit(cache=True, parallel=True)
def _basis_streamed(x, kh, kw, sh, sw, dh, dw, pt, pl, Hp, Wp, ho, wo, wp, cp, bias, res,
                    has_res, act, a0, a1, out, xpf, cols, resp, tmp, T):
    """Basis conv (wp = pack_rows(basis (M, K)), cp = pack_rows(combine (N, M), k_pad=Mp)) of
    at most STREAMED_TILES*NR output positions in all (weight-bound: batch 1 at 8x8, up to 4 at
    4x4), in two phases. Stage 1 split by K, so that each thread touches only what it wrote or
    streams once: by channels, each thread zero-pads its channels of x into xpf (B, C, Hp, Wp)
    and, KC rows at a time, gathers its rows of the im2col panels into cols[t] (tiles, KC, NR)
    (columns past B*H'*W' repeat the last) and multiplies them by its rows of every basis panel
    into its partial responses resp[t] (tiles, Mp, NR). Then by output row panels, each thread
    adds up the threads' partial responses (in order), tmp (Np, tiles*NR) = combine @ them and
    the epilogue into out (B, N, H'*W'). (Split by basis row panels instead, after the whole
    im2col matrix was gathered, each core read the half the other had gathered: BasisConv
    ResNet-18 at batch 1 took 1.1x as long, its 8x8 and 4x4 layers up to 1.4x.)"""
    B, C = x.shape[0], x.shape[1]
    N, P = out.shape[1], out.shape[2]
    K = C * kh * kw
    tiles = -(-B * P // NR)
    ld = tiles * NR                         # tmp's row
    Mp = resp.shape[1] // ld
    Np = tmp.size // ld
    colbase = np.empty(ld, np.intp)
    _window_corners(colbase, 0, B * P, P, C, Hp, Wp, wo, sh, sw)
    delta = _tap_offsets(C, kh, kw, dh, dw, Hp, Wp)
    of = out.ravel()
    rf = res.ravel()
    for t in prange(T):
        c0, c1 = C * t // T, C * (t + 1) // T
        _pad_channels(x, c0, c1, pt, pl, Hp, Wp, xpf)
        if c0 == c1:                        # no channels (C < T): no part of the sum
            for q in range(Mp * ld):
                resp[t, q] = 0.0
        for k0 in range(c0 * kh * kw, c1 * kh * kw, KC):
            kc = min(KC, c1 * kh * kw - k0)
            _pack_cols(xpf, colbase, delta, k0, kc, B * P, cols[t], _column_run(sw, wo),
                       sw)
            _strip_tiles(kc, wp, k0 * MR, K * MR, 0, Mp // MR, cols[t], 0, kc * NR, tiles,
                         None, 0, resp[t], 0, NR, Mp * NR, k0 > c0 * kh * kw)
    for t in prange(T):
        summed = _sum_partials(resp, Mp * ld)      # (tiles, Mp, NR)
        s0, s1 = Np // MR * t // T, Np // MR * (t + 1) // T
        _strip_tiles(Mp, cp, 0, Mp * MR, s0, s1, summed, 0, Mp * NR, tiles, None, 0, tmp, 0,
                     ld, NR, False)
        for n in range(s0 * MR, min(N, s1 * MR)):
            for b in range(B):
                o = (b * N + n) * P
                _finish(of, o, tmp, n * ld + b * P, P, bias[n], rf, o, has_res, act, a0, a1)


@njit(cache=True, parallel=True)
def _basis_split_k(x, kh, kw, sh, sw, dh, dw, pt, pl, Hp, Wp, ho, wo, wt, ct, narrow, bias, res,
                   has_res, act, a0, a1, out, xpf, resp, tmp, T):
    """Basis conv (wt = pack_cols(basis (M, K)), ct = pack_cols(combine (N, M))) whose B*H'
    output rows and W' columns fit in one direct tile (DIRECT_TILES[narrow]; batch 1 at 2x2 and
    below), weight-bound even more than the streamed path's, so stage 1 is split by K: by
    channels, each thread zero-pads its channels of x into xpf (B, C, Hp, Wp, then a zero
    margin) and sums their taps' basis responses into its own resp[t] (Mq, NY*TX) by the direct
    micro-kernel, the input read in place; then by output panels, each thread adds up the
    threads' responses (in order), combines them into its panels of tmp (Nq, NY*TX) and applies
    the epilogue into out (B, N, H'*W'). Column y*TX + u of resp and tmp: output row y (image
    y // H', row y % H'), column u."""
    B, C = x.shape[0], x.shape[1]
    N, P = out.shape[1], out.shape[2]
    NY, TX = DIRECT_TILES[1] if narrow else DIRECT_TILES[0]
    ld = NY * TX
    K = C * kh * kw
    panels = -(-N // NR)
    M = ct.size // (panels * NR)
    koff = _tap_offsets(C, kh, kw, dh, dw, Hp, Wp)
    roff = np.empty(NY, np.intp)       # each tile row's window corner (past the last: the last)
    for y in range(NY):
        q = min(y, B * ho - 1)
        roff[y] = (q // ho * C * Hp + q % ho * sh) * Wp
    koff1 = _steps(M, ld)              # stage 2: response m's row
    roff1 = _steps(NY, TX)
    of = out.ravel()
    rf = res.ravel()
    for t in prange(T):
        c0, c1 = C * t // T, C * (t + 1) // T
        _pad_channels(x, c0, c1, pt, pl, Hp, Wp, xpf)
        k0, k1 = c0 * kh * kw, c1 * kh * kw
        for pb in range(wt.size // (K * NR)):
            _direct_row(narrow, True, False, k1 - k0, xpf, sw, koff[k0:], roff, wt,
                        (pb * K + k0) * NR, resp[t], pb * NR * ld, ld, TX, TX)
    for t in prange(T):
        summed = _sum_partials(resp, M * ld)       # (Mq, NY*TX)
        for panel in range(panels * t // T, panels * (t + 1) // T):
            _direct_row(narrow, True, False, M, summed, 1, koff1, roff1, ct, panel * M * NR,
                        tmp, panel * NR * ld, ld, TX, TX)
            for n in range(panel * NR, min(N, panel * NR + NR)):
                for y in range(B * ho):
                    o = (y // ho * N + n) * P + y % ho * wo
                    _finish(of, o, tmp, n * ld + y * TX, wo, bias[n], rf, o, has_res, act, a0,
                            a1)


@njit(cache=True)
def _scatter(tf, of, rf, bias, has_res, act, a0, a1, r0, r1, c0, c1, N, P):
    """Epilogue of rows [r0, r1) x columns [c0, c1) of tmp (N, B*P) into out (B, N, P)."""
    BP = tf.shape[0] // N
    if c1 <= c0:
        return
    for n in range(r0, r1):
        for b in range(c0 // P, (c1 - 1) // P + 1):
            q0 = max(c0, b * P)
            q1 = min(c1, (b + 1) * P)
            o = (b * N + n) * P + q0 - b * P
            _finish(of, o, tf, n * BP + q0, q1 - q0, bias[n], rf, o, has_res, act, a0, a1)


# --- packed path: im2col straight into the micro-kernel's panels, weights packed once ---------------
#
# Dense convs and basis convs with one group: the batch's output positions (columns b*P + p) are
# cut into chunks of nch; a task (chunk, part) builds the chunk's im2col columns KC rows at a time
# straight into B micro-panels (`_pack_cols`, in L2), multiplies them by the weights packed once
# per weight array (sgemm.pack_rows) into a chunk of C, and applies the epilogue to the chunk.
# A basis conv keeps its chunk of basis responses as the combine's B panels. Parts split the
# output rows when there are fewer chunks than threads.


@njit(cache=True)
def _column_run(sw, wo):
    """The aligned groups of output columns whose window corners are sw apart in one row
    (_pack_cols): 8 or 4 at stride 1 or 2 when W' is a multiple of it, else 1."""
    if sw > 2:
        return 1
    return 8 if wo % 8 == 0 else 4 if wo % 4 == 0 else 1


@njit(cache=True)
def _strip_tiles(k, a, oa, lda, s0, s1, src, ob, step, tiles, boff, obf, c, oc, ldc, ldt, add):
    """The GEMM micro-kernel over a's MR-row panels s0 <= s < s1 (panel s at oa + s*lda) by
    `tiles` NR-column tiles of B (tile t at src[ob + t*step], its rows as _micro's: boff None
    for a packed micro-panel) into c[oc + s*MR*ldc + t*ldt] (+= when add)."""
    for s in range(s0, s1):
        for t in range(tiles):
            _micro(k, a, oa + s * lda, src, ob + t * step, boff, obf, c,
                   oc + s * MR * ldc + t * ldt, ldc, add)


@njit(inline="always")
def _tap_run(rows, g, i, k0, kc):
    """[a, b): tile g's i-th run of im2col rows (rows[g]: first, step, count, length; see
    column_order) within the block [k0, k0 + kc); empty when a >= b."""
    a = rows[g, 0] + i * rows[g, 1]
    return max(k0, a), min(k0 + kc, a + rows[g, 3])


@njit(inline="always")
def _pack_row(xpf, cb, dl, bp, o, grouped, sw):
    """bp[o + l] = xpf[cb[l] + dl] for l < NR: a row of a tile's B micro-panel (_pack_cols),
    by vectors of `grouped` values where its columns allow."""
    if grouped == 8:
        for j in range(0, NR, 8):
            if sw == 2:
                _evens8(bp, o + j, xpf, cb[j] + dl, False)
            else:
                _vec8(bp, o + j, xpf, cb[j] + dl, False)
    elif grouped == 4:
        for j in range(0, NR, 4):
            if sw == 2:
                _evens4(bp, o + j, xpf, cb[j] + dl, False)
            else:
                _vec4(bp, o + j, xpf, cb[j] + dl, False)
    else:
        for l in range(NR):
            bp[np.uintp(o + l)] = xpf[np.uintp(cb[l] + dl)]


@njit(cache=True)
def _pack_cols(xpf, colbase, delta, k0, kc, nq, bp, run, sw, rows=None, g0=0, by8=False):
    """B micro-panels of rows [k0, k0 + kc) of the im2col matrix of nq columns (in tiles of NR,
    the last one's columns past nq repeating column nq - 1), gathered from the padded input
    xpf (flat): bp[(t*kc + r)*NR + l] = xpf[colbase[t*NR + l] + delta[k0 + r]], colbase: a
    column's window corner, delta: a row's tap offset. rows (given): only tile t's runs of
    rows, rows[g0 + t] (_tap_run), are gathered (the others read padding alone). by8: rows
    come in runs of 8 adjacent values (a channels-last input, C a multiple of 8), gathered as
    vectors and transposed (sgemm._transposed8). run (8 or 4, else 1): every aligned group of
    that many columns has corners sw apart (stride sw <= 2, W' a multiple of it), so a row of a
    whole tile is copied as vectors (value by value it took several times as long, and LLVM
    kept an unrolled copy of runs scalar: `sgemm._vector_op`); at stride 2 each vector from
    twice its values loaded, while those lie in xpf. (Through sgemm._run's loop over any
    length, the gather took 1.6-5.7x as long.)
    Unsigned indices (no negative-index wrap), so that the loops vectorize."""
    far = delta[k0:k0 + kc].max()          # the block's tap furthest from a corner
    for t in range(-(-nq // NR)):
        cb = colbase[t * NR:(t + 1) * NR]
        grouped = run if (t + 1) * NR <= nq else 1
        if sw == 2 and cb[NR - grouped] + far + 2 * grouped > xpf.size:
            grouped = 1
        for i in range(1 if rows is None else rows[g0 + t, 2]):
            a, b = (k0, k0 + kc) if rows is None else _tap_run(rows, g0 + t, i, k0, kc)
            r = a - k0
            while by8 and r < b - k0:
                for h in range(0, NR, 8):
                    _transposed8(bp, (t * kc + r) * NR + h, NR, xpf, delta[k0 + r], colbase,
                                 t * NR + h)
                r += 8
            for r in range(r, b - k0):
                _pack_row(xpf, cb, delta[k0 + r], bp, (t * kc + r) * NR, grouped, sw)


@njit(cache=True)
def _pad_planes(x, t0, t1, u0, Hb, pt, pl, sh, sw, Wq, dst, cb=1):
    """Rows [u0, u0 + Hb) of the zero-padded input's planes t = b*C + c in [t0, t1), split
    into their sh*sw stride phases of Wq columns, the planes of cb channels in a row
    interleaved: dst[(((((t - t0)//cb*sh + i)*sw + j)*Hb + u - u0)*Wq + v)*cb + (t - t0)%cb]
    = x[b, c, u*sh + i - pt, v*sw + j - pl], 0 outside x. Split, an output row's window
    corners at stride s are adjacent values (the direct conv reads them in place); with stride
    1 and cb 1 just the padded input. Interleaved, the direct conv's taps (cb channels of one
    position in a row) share a cache line."""
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    xf = x.ravel()
    for q in range((t1 - t0) * sh * sw * Hb * Wq):   # zeros, then x's values over them: on
        dst[np.uintp(q)] = 0.0          # small planes 2-4x faster than row by row around them
    for t in range(t0, t1):             # (unsigned indices: no wrap checks, vectorizes)
        for i in range(sh):
            for j in range(sw):
                o = (((t - t0) // cb * sh + i) * sw + j) * Hb * Wq * cb + (t - t0) % cb
                v0 = min(Wq, max(0, -((j - pl) // sw)))   # columns v: 0 <= v*sw + j - pl < W
                v1 = max(v0, min(Wq, (W - 1 + pl - j) // sw + 1))
                for u in range(u0, u0 + Hb):
                    y = u * sh + i - pt
                    if 0 <= y < H:
                        d = o + (u - u0) * Wq * cb
                        s = (t * H + y) * W + j - pl
                        if sw <= 2 and cb == 1:
                            _run(dst, d + v0, xf, s + v0 * sw, v1 - v0, False, sw)
                        else:
                            for v in range(v0, v1):
                                dst[np.uintp(d + v * cb)] = xf[np.uintp(s + v * sw)]


@njit(cache=True, parallel=True)
def _pad_input(x, pt, pl, Hp, Wp, xq, T, channels_last=False):
    """xq (B, C, Hp, Wp) flat = x zero-padded (_pad_planes at stride 1), a run of planes per
    thread (per plane: 4x the time on batch-1 4x4 layers); or xq (B, Hp, Wp, C) when
    channels_last, a run of rows per thread: in 8 x 8 blocks transposed in registers where C
    and the row's width allow (sgemm._transposed8; value by value, at batch 16 the 8x8 and
    16x16 layers' inputs took 2.2x as long: 6-10% of a basis layer's time), else column by
    column, its channels stored in order (channel by channel, strided stores: 4x4 and 2x2
    inputs at batch 16 took 1.8-2.5x as long)."""
    B, C, H, W = x.shape
    P = B * (Hp if channels_last else C)
    xf = x.ravel()
    channel_rows = _steps(8, H * W)         # 8 channels' rows, from the first one's
    for t in prange(T):
        t0, t1 = t * P // T, (t + 1) * P // T
        if not channels_last:
            _pad_planes(x, t0, t1, 0, Hp, pt, pl, 1, 1, Wp, xq[t0 * Hp * Wp:t1 * Hp * Wp])
            continue
        v0, v1 = max(0, -pl), min(W, Wp - pl)   # the columns of x inside the padded row
        by8 = C % 8 == 0 and (v1 - v0) % 8 == 0
        for r in range(t0, t1):             # padded row u of image b
            b, u = r // Hp, r % Hp
            row = xq[r * Wp * C:(r + 1) * Wp * C]
            row[:] = 0.0
            y = u - pt
            if 0 <= y < H:
                if by8:
                    for c in range(0, C, 8):
                        for v in range(v0, v1, 8):
                            _transposed8(xq, (r * Wp + v + pl) * C + c, C, xf,
                                         ((b * C + c) * H + y) * W + v, channel_rows, 0)
                    continue
                for v in range(v0, v1):     # each column's channels, stored in order
                    src = (b * C * H + y) * W + v
                    for c in range(C):
                        row[np.uintp((v + pl) * C + c)] = xf[np.uintp(src + c * H * W)]


@njit(cache=True, parallel=True)
def _conv_packed(xpf, C, Hp, Wp, kh, kw, dh, dw, wp, cp, two, bias, res, has_res, act, a0, a1,
                 sh, sw, ho, wo, grid, order, rows, nch, parts, by_taps, out, ws):
    """Conv (two False: wp = pack_rows(weight (N, K))) or basis conv (two True:
    wp = pack_rows(basis (M, K)), cp = pack_rows(combine (N, M), k_pad=Mp)), one group, of the
    zero-padded input xpf (B, C, Hp, Wp) flat into out (B, N, H'*W'), K = C*kh*kw in (tap,
    channel) order (blocked_k with cb = C), Mp = M rounded up to MR.
    Columns: gather (grid False) the B*H'*W' output positions, their B panels gathered
    (_pack_cols); by_taps in the order `order`, each tile of NR columns only its runs of K rows
    (rows: the taps inside the input for one of its columns at least; column_order), from xpf
    (B, Hp, Wp, C), so that a column's rows are adjacent values (gathered 8 at a time where C
    is a multiple of 8); in place (grid True, stride 1) per image the H' x Wp grid of window
    corners, whose B rows the micro-kernel reads straight from xpf (NR consecutive corners of a
    tap are NR consecutive values; the Wp - W' columns past each output row are computed and
    dropped).
    K runs in blocks of up to KC rows within one row of taps: a tile's rows in a block are then
    one run, summed as the whole block would be (the skipped rows add exact zeros), so that
    results do not depend on which taps a tile skips, hence on the batch's other images.
    Task (chunk, part): nch columns (not crossing images when grid), output row panels
    [part/parts, (part+1)/parts) of all; contiguous runs of tasks to the rows of ws (one per
    thread; then the others' last ones, _take): B panels (KC*nch, gather only) | basis
    responses (Mp*nch, two only) | C chunk (Np*nch)."""
    N, P = out.shape[1], out.shape[2]
    B = out.shape[0]
    K = C * kh * kw
    R1 = wp.size // K                       # stage-1 rows: Np, or Mp for a basis conv
    Np = cp.size // R1 if two else R1       # output rows rounded up to MR
    delta = _tap_offsets(C, kh, kw, dh, dw, Hp, Wp, True, by_taps)
    span = ho * Wp if grid else B * P       # columns per image (grid) or in all
    per = (span + nch - 1) // nch           # chunks of each
    tasks = (B if grid else 1) * per * parts
    run = _column_run(sw, wo)
    T = ws.shape[0]
    of = out.ravel()
    rf = res.ravel()
    taken = _unclaimed(tasks)
    for t in prange(T):
        buf = ws[t]
        sb = 0 if grid else min(KC, K) * nch    # basis responses, (tiles, Mp, NR)
        cb = sb + (R1 * nch if two else 0)      # C chunk, (Np, nch)
        colbase = np.empty(nch + NR, np.intp)   # gather: each column's window corner in xpf
        run_col = np.empty(nch, np.intp)        # the chunk's runs of output positions
        run_out = np.empty(nch, np.intp)
        run_len = np.empty(nch, np.intp)
        column_out = np.empty(nch, np.intp)     # by_taps: each column's offset in out
        for i in range(tasks):
            task = _take(taken, t, T, i)
            if task < 0:
                continue
            chunk = task // parts
            part = task % parts
            q0 = chunk % per * nch
            nq = min(nch, span - q0)
            tiles = (nq + NR - 1) // NR
            img = chunk // per * C * Hp * Wp + q0   # grid: xpf offset of the chunk's corner 0
            s0 = Np // MR * part // parts
            s1 = Np // MR * (part + 1) // parts
            # stage 1's row panels and where their tiles go: the responses, or the C chunk
            r0, r1, o1, ld1, lt1 = (0, R1 // MR, sb, NR, R1 * NR) if two else (s0, s1, cb, nch, NR)
            g0 = q0 // NR                       # gather: the chunk's first tile
            if by_taps:
                _window_corners(colbase[:tiles * NR], q0, nq, P, C, Hp, Wp, wo, sh, sw, order,
                                True)
                for u in range(tiles):          # tiles reading padding alone: responses 0
                    if rows[g0 + u, 2] == 0:
                        for s in range(r0, r1):
                            for y in range(MR):
                                o = o1 + s * MR * ld1 + u * lt1 + y * ld1
                                buf[o:o + NR] = 0.0
            elif not grid:
                _window_corners(colbase[:tiles * NR], q0, nq, P, C, Hp, Wp, wo, sh, sw)
            for ky in range(kh):                # K's blocks: up to KC rows of a row of taps
                for k0 in range(ky * kw * C, (ky + 1) * kw * C, KC):
                    kc = min(KC, (ky + 1) * kw * C - k0)
                    if grid:
                        _strip_tiles(kc, wp, k0 * MR, K * MR, r0, r1, xpf, img, NR, tiles,
                                     delta, k0, buf, o1, ld1, lt1, k0 > 0)
                        continue
                    if by_taps:
                        _pack_cols(xpf, colbase, delta, k0, kc, nq, buf, 1, sw, rows, g0,
                                   C % 8 == 0)
                    else:
                        _pack_cols(xpf, colbase, delta, k0, kc, nq, buf, run, sw)
                    for s in range(r0, r1):
                        for u in range(tiles):
                            g = g0 + u          # (by_taps) its runs of rows in the block
                            for v in range(rows[g, 2] if by_taps else 1):
                                a, b = _tap_run(rows, g, v, k0, kc) if by_taps else (k0, k0 + kc)
                                if a < b:
                                    _micro(b - a, wp, (s * K + a) * MR, buf,
                                           (u * kc + a - k0) * NR, None, 0, buf,
                                           o1 + s * MR * ld1 + u * lt1, ld1,
                                           a > (rows[g, 0] if by_taps else 0))
            if two:
                _strip_tiles(R1, cp, 0, R1 * MR, s0, s1, buf, sb, R1 * NR, tiles, None, 0, buf, cb,
                             nch, NR, False)
            # where the chunk's columns go in out's channel 0: each column (by_taps), or its
            # runs of consecutive output positions of one image (first column, offset, length)
            nr, q = 0, 0
            if by_taps:
                for j in range(nq):
                    column_out[j] = order[q0 + j] // P * N * P + order[q0 + j] % P
            else:
                while q < nq:
                    if grid:   # the rest of a grid row's output columns, then skip to the next
                        oy = (q0 + q) // Wp
                        ox = q0 + q - oy * Wp
                        if ox >= wo:
                            q += Wp - ox
                            continue
                        b, p, m = chunk // per, oy * wo + ox, min(wo - ox, nq - q)
                    else:
                        b = (q0 + q) // P
                        p = q0 + q - b * P
                        m = min(P - p, nq - q)
                    run_col[nr], run_out[nr], run_len[nr] = q, b * N * P + p, m
                    nr += 1
                    q += m
            for n in range(s0 * MR, min(N, s1 * MR)):
                if by_taps:    # runs of 1-6 positions: value by value (one core, 3x3 basis
                    # layer at 8x8, batch 16: 0.97-0.98 of the time by runs; a run's set-up)
                    bn, lo, hi = bias[n], np.float32(a0), np.float32(a1)
                    for j in range(nq):
                        o = column_out[j] + n * P
                        v = buf[np.uintp(cb + n * nch + j)] + bn
                        if has_res:
                            v += rf[np.uintp(o)]
                        of[np.uintp(o)] = _activation(v, act, lo, hi)
                    continue
                for j in range(nr):
                    o = run_out[j] + n * P
                    _finish(of, o, buf, cb + n * nch + run_col[j], run_len[j], bias[n], rf, o,
                            has_res, act, a0, a1)


# The direct conv: the output in register tiles of NY rows x TX adjacent columns x NR channels,
# each accumulated over all of K at once from the input read in place (no im2col) and the
# weights packed as NR-wide panels (sgemm.pack_cols), written channel-major into a stage of NR
# channels x NY rows x the output width, whose rows get the epilogue on their way out. Work is
# cut into blocks of output rows (whole images, or a band of one image) whose zero-padded input
# each task copies into its own scratch first, so that it is read from cache, written and read
# by one thread (data another core wrote or is reading costs far more to touch here).


@intrinsic
def _claim(typingctx, taken_t, i_t):
    """Atomically mark unit i taken (taken[i] = 1, an int32 array); True if this call took it."""
    sig = types.boolean(taken_t, types.intp)

    def codegen(context, builder, signature, args):
        taken, i = args
        cell = builder.gep(context.make_array(taken_t)(context, builder, taken).data, [i])
        i32 = ir.IntType(32)
        old = builder.atomic_rmw("xchg", cell, ir.Constant(i32, 1), "acq_rel")
        return builder.icmp_signed("==", old, ir.Constant(i32, 0))
    return sig, codegen


@njit(inline="always")
def _take(taken, t, T, i):
    """The i-th unit thread t of T tries (_unit), or -1 if another thread has claimed it."""
    u = _unit(t, T, taken.size, i)
    return u if _claim(taken, u) else -1


@njit(inline="always")
def _unit(t, T, units, i):
    """The i-th unit thread t of T tries (i < units): its own contiguous run in order, then the
    other threads' runs from their ends backwards, so that a thread slowed by the machine is
    relieved of its last units."""
    lo, hi = t * units // T, (t + 1) * units // T
    if i < hi - lo:
        return lo + i
    i -= hi - lo
    for d in range(1, T):
        s = (t + d) % T
        a, b = s * units // T, (s + 1) * units // T
        if i < b - a:
            return b - 1 - i
        i -= b - a
    return -1


@njit(cache=True)
def _streamed(narrow, per_block, wo):
    """Whether the direct conv's weight panels stream (its tiles prefetch them): the tiles of a
    block of per_block output rows of W' columns read each panel at most STREAMED_PANEL_TILES
    times."""
    NY, TX = DIRECT_TILES[narrow]
    return -(-per_block // NY) * -(-wo // TX) <= STREAMED_PANEL_TILES


@njit(cache=True)
def _direct_row(narrow, streamed, grouped, k, src, xs, koff, roff, w, ow, c, oc, ldj, ldc, ld):
    """A row of register tiles across ld output columns: c[oc + j*ldj + y*ldc + x] = sum_p
    src[koff[p] + roff[y] + x*xs] * w[ow + p*NR + j] (the direct micro-kernel every TX
    columns; xs: the input's step between columns). streamed: the tiles prefetch the weights;
    grouped: koff's taps come in runs of CHANNEL_BLOCK adjacent values (_direct_micro)."""
    for x0 in range(0, ld, DIRECT_TILES[narrow][1]):
        a = (k, src, x0 * xs, xs, koff, roff, w, ow, c, oc + x0, ldj, ldc)
        if narrow:
            if streamed:
                _direct_narrow_streamed(*a)
            elif grouped:
                _direct_narrow_grouped(*a)
            else:
                _direct_narrow(*a)
        elif streamed:
            _direct_wide_streamed(*a)
        elif grouped:
            _direct_wide_grouped(*a)
        else:
            _direct_wide(*a)


@njit(cache=True)
def _grid_corners(tiles, per_row, ld_row):
    """grid1's tiles' first window corners in a block's input: tile g's are the (g % per_row)-th
    NR of row g // per_row, rows ld_row apart. One row a tile when W' is a multiple of NR (only
    the output's corners computed, in its order), else per_row = tiles: the tiles run across
    the grid's rows of Wq corners, the Wq - W' past each row computed and dropped."""
    g = np.arange(tiles)
    return g // per_row * ld_row + g % per_row * NR


@njit(cache=True)
def _grid_tiles(k, strips, a, oa, src, ld_src, toff, boff, c, oc, ldc, images, ld_c, tiles):
    """The GEMM micro-kernel over each image's tiles of window corners (the direct conv's grid1):
    c[oc + (s*MR + i)*ldc + img*ld_c + g*NR + j] = sum_p a[oa + (s*k + p)*MR + i] *
    src[img*ld_src + toff[g] + boff[p] + j] for s < strips (MR-row panels of a), img < images,
    i < MR, g < tiles, j < NR (toff: tile g's first corner). Past KC taps, in blocks of KC,
    each block over every tile's strips in turn: a tile's taps are then read from L1 for its
    next strip and the next tile (all K at once per strip, from L2: M = 12 at 32x32, 85 -> 97
    GFLOP/s a thread); up to KC, over every strip's tiles in turn, so that a strip's rows of c
    are written in order (first layers: 1.1-1.25x faster)."""
    by_tile = k > KC
    for img in range(images):
        for k0 in range(0, k, KC):
            for u in range(tiles if by_tile else strips):
                for v in range(strips if by_tile else tiles):
                    g, s = (u, v) if by_tile else (v, u)
                    _micro(min(KC, k - k0), a, oa + (s * k + k0) * MR, src,
                           img * ld_src + toff[g], boff, k0, c,
                           oc + s * MR * ldc + img * ld_c + g * NR, ldc, k0 > 0)


@njit(cache=True)
def _grid_strip_out(k, a, oa, src, os_, toff, boff, tiles, out, oo, P, bias, n0, res, has_res,
                    act, a0, a1):
    """One MR-row strip of grid1's tiles (k <= KC) straight into out with the epilogue
    (sgemm._micro_finish): out[oo + i*P + g*NR + j] = act(sum_p a[oa + p*MR + i] *
    src[os_ + toff[g] + boff[p] + j] + bias[n0 + i] (+ res at out's offset)), i < MR,
    g < tiles, j < NR: output channels n0.. of an image's (or band's) W'-aligned positions."""
    for g in range(tiles):
        _micro_finish(k, a, oa, src, os_ + toff[g], boff, 0, out, oo + g * NR, P, bias, n0,
                      res, has_res, act, np.float32(a0), np.float32(a1))


@njit(cache=True, parallel=True)
def _conv_direct(x, kh, kw, sh, sw, dh, dw, pt, pl, Hq, Wq, wt, ct, two, bias, res, has_res, act,
                 a0, a1, ho, wo, narrow, per_block, parts, copy, grid1, cb, out, ws):
    """Conv (two False: wt = pack_cols(blocked_k(weight (N, K), cb, kh*kw))) or basis conv
    (two True: wt = the same of basis (M, K), ct = pack_cols(combine (N, M))) of x (B, C, H, W),
    K = C*kh*kw, zero padding top pt and left pl to planes of Hq x Wq per stride phase, into
    out (B, N, H'*W'). Tiles: DIRECT_TILES[narrow], prefetching the weights where a block's
    tiles read each panel at most STREAMED_PANEL_TILES times (_direct_micro). Work units: a
    block of output rows (per_block rows: whole images when >= H', else a band of one image) by
    one of `parts` ranges of the NR-channel output panels (parts > 1 only when there are fewer
    blocks than threads), dealt to the threads in contiguous runs of blocks, so that a thread
    reads the images that it wrote in the layer before; a thread done with its run takes the
    last units of the others (_unit, _claim). A unit copies its block's input rows (_pad_planes;
    cb channels interleaved) into its thread's scratch, or reads x itself (copy False: stride 1,
    unpadded, W' a multiple of TX). A basis conv first writes the block's basis responses
    (Mp, RB, ld), then combines them by the same micro-kernel (a 1x1 conv of M channels over
    them). grid1 (copy): the responses by the GEMM micro-kernel instead (wt =
    pack_rows(basis)), MR basis filters x NR adjacent window corners of the block's input grid
    (the first stride phase's; _grid_corners), so that a few filters (M = 12) fill the tile:
    the vectors run along the image, not the filters; the combine then runs over the grid too
    (ct = pack_rows(combine)), MR output channels at a time. A conv with grid1 (wt =
    pack_rows(weight)) is the first stage alone (K < DIRECT_MIN_K: first layers). Where the
    grid is the output's positions (W' a multiple of NR) and a strip sums one tile's taps
    (<= KC), each whole strip of MR output channels goes straight into out with the epilogue
    (_grid_strip_out: 32x32 basis layers at batch 16 0.92-0.96 of the time, first convs
    0.70-0.72); else into the stage (MR, S1), whose rows get the epilogue.
    ws: a row per thread: the stage (NR, NY, ld), ld = W' rounded up to TX, or with grid1
    (MR, S1); the responses (two or grid1): (Mp, RB, ld), RB = per_block rounded up to NY, or
    with grid1 (Mp, S1), S1 = images x G, G = an image's grid rows x W' (or x Wq rounded up to
    NR: _grid_corners); the block's input and a zero margin (copy only)."""
    B, C = x.shape[0], x.shape[1]
    N, P = out.shape[1], out.shape[2]
    NY, TX = DIRECT_TILES[1] if narrow else DIRECT_TILES[0]
    K = C * kh * kw
    R1 = wt.size // K                   # stage-1 rows: N or M, rounded up to NR (MR: grid1)
    M = ct.size // (-(-N // (MR if grid1 else NR)) * (MR if grid1 else NR)) if two else 0
    # (the combine's panels are M rows deep)
    ld = -(-wo // TX) * TX
    RB = -(-per_block // NY) * NY
    streamed = _streamed(narrow, per_block, wo)
    grouped = cb == CHANNEL_BLOCK
    rows = B * ho
    halo = (kh - 1) * dh // sh          # phase-plane rows a window reaches below its corner
    bands = -(-ho // per_block)         # blocks per image, when bands
    compact = wo % NR == 0              # grid1: the output's positions alone (_grid_corners)
    row = wo if compact else Wq         # grid1: window corners per output row
    G = -(-min(ho, per_block) * row // NR) * NR         # grid1: an image's responses
    # grid1 strips written straight into out with the epilogue (_grid_strip_out): the whole
    # ones, where the grid is the output's positions and a strip's sum is one tile's (<= KC)
    whole = N // MR if compact and (M if two else K) <= KC else 0
    S1 = (per_block // ho * G if per_block >= ho else G) if grid1 else RB * ld  # per filter
    blocks = -(-rows // per_block) if per_block >= ho else B * bands
    panels = -(-N // NR)
    units = blocks * parts
    T = ws.shape[0]
    xf = x.ravel()
    of = out.ravel()
    rf = res.ravel()
    tiles1 = G // NR if grid1 else 0   # grid1's tiles an image (0: empty tables below)
    # grid1: each tile's first window corner in the input, and in the responses
    corners = _grid_corners(tiles1, wo // NR if compact else tiles1, Wq)
    flat = _steps(tiles1, NR)
    taken = _unclaimed(units)
    for t in prange(T):
        st = MR * S1 if grid1 else NR * NY * ld
        stage = ws[t, :st]
        s1 = ws[t, st:st + (R1 * S1 if two or grid1 else 0)]
        xb = ws[t, st + (R1 * S1 if two or grid1 else 0):] if copy else xf
        roff = np.empty(NY, np.intp)     # tile rows' window corners (past the last: the last)
        koff = np.empty(K, np.intp)      # tap (c, i, j)'s offset from a window corner
        roff1 = np.empty(NY, np.intp)    # two: the tile rows in the responses
        koff1 = _steps(M, S1)            # two: response m's offset
        for i in range(units):
            unit = _take(taken, t, T, i)
            if unit < 0:
                continue
            blk = unit // parts
            part = unit % parts
            if per_block >= ho:
                r0 = blk * per_block
                r1 = min(rows, r0 + per_block)
                u0, Hb = 0, Hq
            else:
                r0 = blk // bands * ho + blk % bands * per_block
                r1 = min(r0 - r0 % ho + ho, r0 + per_block)
                u0 = r0 % ho
                Hb = min(Hq - u0, r1 - r0 + halo)
            b0 = r0 // ho
            if copy:
                b1 = (r1 - 1) // ho + 1
                _pad_planes(x, b0 * C, b1 * C, u0, Hb, pt, pl, sh, sw, Wq, xb, cb)
                end = (b1 - b0) * C * sh * sw * Hb * Wq
                xb[end:end + (NR + Wq) * cb] = 0.0  # the last tile's spare columns read past it
            else:
                u0, Hb, b0 = 0, Hq, 0
            image = C * sh * sw * Hb * Wq       # an image's values in xb
            _phase_tap_offsets(koff, C, kh, kw, dh, dw, sh, sw, Hb, Wq, cb)
            images, cols = -(-(r1 - r0) // ho), min(ho, r1 - r0) * row  # grid1: per image
            tiles = -(-cols // NR)
            if grid1:                    # the block's basis responses over its input grid (a
                s0 = 0 if two else whole    # conv's strips not written straight into out)
                _grid_tiles(K, R1 // MR - s0, wt, s0 * K * MR, xb, image, corners, koff, s1,
                            s0 * MR * S1, S1, images, G, tiles)
            elif two:                    # the block's basis responses, each basis panel reused
                for pb in range(R1 // NR):
                    for r in range(r0, r1, NY):
                        for y in range(NY):
                            q = min(r + y, r1 - 1)
                            roff[y] = (q // ho - b0) * image + (q % ho - u0) * Wq * cb
                        _direct_row(narrow, streamed, grouped, K, xb, cb, koff, roff, wt,
                                    pb * K * NR, s1, (pb * NR * RB + r - r0) * ld, RB * ld, ld,
                                    ld)
            if grid1:                    # MR output channels at a time over the grid: a
                for s in range(-(-N // MR)):     # conv's responses, or their combine in stage
                    if s < whole:
                        for img in range(images):
                            q = r0 + img * ho
                            o = (q // ho * N + s * MR) * P + q % ho * wo
                            if two:
                                _grid_strip_out(M, ct, s * M * MR, s1, img * G, flat, koff1,
                                                tiles, of, o, P, bias, s * MR, rf, has_res, act,
                                                a0, a1)
                            else:
                                _grid_strip_out(K, wt, s * K * MR, xb, img * image, corners,
                                                koff, tiles, of, o, P, bias, s * MR, rf, has_res,
                                                act, a0, a1)
                        continue
                    if two:
                        _grid_tiles(M, 1, ct, s * M * MR, s1, G, flat, koff1, stage, 0, S1,
                                    images, G, tiles)
                    src, so = (stage, 0) if two else (s1, s * MR * S1)
                    for i in range(min(MR, N - s * MR)):
                        n = s * MR + i
                        for img in range(images):
                            q = r0 + img * ho    # the image's (or band's) first output row
                            o = (q // ho * N + n) * P + q % ho * wo
                            _finish(of, o, src, so + i * S1 + img * G, wo, bias[n], rf, o,
                                    has_res, act, a0, a1, cols // row, wo, row)
                continue
            for panel in range(part * panels // parts, (part + 1) * panels // parts):
                for r in range(r0, r1, NY):
                    for y in range(NY):
                        q = min(r + y, r1 - 1)
                        roff[y] = (q // ho - b0) * image + (q % ho - u0) * Wq * cb
                        roff1[y] = (q - r0) * ld
                    if two:
                        _direct_row(narrow, streamed, False, M, s1, 1, koff1, roff1, ct,
                                    panel * M * NR, stage, 0, NY * ld, ld, ld)
                    else:
                        _direct_row(narrow, streamed, grouped, K, xb, cb, koff, roff, wt,
                                    panel * K * NR, stage, 0, NY * ld, ld, ld)
                    ny = min(NY, r1 - r)
                    for j in range(min(NR, N - panel * NR)):
                        n = panel * NR + j
                        y = 0
                        while y < ny:    # runs of rows of one image (one row of values
                            q = r + y    # when ld == W': adjacent in the stage too)
                            run = min(ny - y, ho - q % ho)
                            o = (q // ho * N + n) * P + q % ho * wo
                            whole = ld == wo
                            _finish(of, o, stage, (j * NY + y) * ld, run * wo if whole else wo,
                                    bias[n], rf, o, has_res, act, a0, a1, 1 if whole else run,
                                    wo, ld)
                            y += run


# --- Python side --------------------------------------------------------------------------------

_NO_RES = np.zeros((1, 1, 1), np.float32)
_NO_W2 = np.zeros((1, 1), np.float32)
_NO_BIAS = np.zeros(1, np.float32)
_NO_ORDER = (np.zeros(0, np.intp), np.zeros((0, 4), np.intp), 1.0)  # packed, not by taps


class _Derived:
    """Weights rearranged for a kernel, built once per weight array (identity-checked, so a
    replaced array is rebuilt; entries die with their array's last user)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._map: dict[int, tuple] = {}

    def get(self, w: np.ndarray, key, build) -> np.ndarray:
        hit = self._map.get((id(w), key))
        if hit is None or hit[0]() is not w:
            with self._lock:
                hit = self._map.get((id(w), key))
                if hit is None or hit[0]() is not w:
                    if hit is None:
                        weakref.finalize(w, self._map.pop, (id(w), key), None)
                    hit = self._map[(id(w), key)] = (weakref.ref(w), build())
        return hit[1]


_DERIVED = _Derived()


def kn2row_weights(basis: np.ndarray, groups: int) -> np.ndarray:
    """(G*kh*kw*M, C/G): row (g*kh*kw + i*kw + j)*M + m = basis[g*M + m, :, i, j]."""
    GM, Cg, kh, kw = basis.shape
    M = GM // groups

    def build():
        w = basis.reshape(groups, M, Cg, kh, kw).transpose(0, 3, 4, 1, 2)
        return np.ascontiguousarray(w.reshape(groups * kh * kw * M, Cg))
    return _DERIVED.get(basis, ("kn2row", groups), build)


def per_group_rows(w: np.ndarray, groups: int) -> np.ndarray:
    """(G, ...): each group's rows of w (G*m, k) as pack_rows lays them out."""
    return np.stack([pack_rows(part) for part in np.split(w, groups)])


def blocked_k(w: np.ndarray, cb: int, taps: int) -> np.ndarray:
    """w (n, K), K = C*taps in (channel, tap) order, with K reordered to (channel // cb, tap,
    channel % cb): the direct conv's order over an input copied with cb channels interleaved."""
    n, K = w.shape
    return w.reshape(n, K // (cb * taps), cb, taps).transpose(0, 1, 3, 2).reshape(n, K)


def use_kn2row(Cg, M, stride) -> bool:
    """Basis stage 1 by kn2row: stride 1 and fewer basis filters than input channels per group
    (Y then holds fewer values per position than the im2col columns)."""
    return tuple(stride) == (1, 1) and M is not None and M < Cg


def act_code(act) -> tuple[int, float, float, bool]:
    """(code, a0, a1, done) of a fusable activation tuple for the epilogue; done False when
    the epilogue cannot apply it (the caller applies it after with apply_act)."""
    if act is None:
        return 0, 0.0, 0.0, True
    code = ACT_CODES.get(act[0])
    if code is None:
        return 0, 0.0, 0.0, False
    return code, float(act[1]) if len(act) > 1 else 0.0, float(act[2]) if len(act) > 2 else 0.0, True


def round_up(v: int, r: int = NR) -> int:
    """v rounded up to a multiple of r (register tiles' rows MR or columns NR)."""
    return -(-v // r) * r


def threads() -> int:
    """How many slices the kernels cut parallel work into: Numba's thread count at start-up
    (NUMBA_NUM_THREADS, default the cores), not numba.get_num_threads(): the cut, hence every
    sgemm call and its rounding, stays the same whatever threads a call gets, so results do not
    depend on set_num_threads (bench: as fast; dataset runs are byte-identical)."""
    return numba.config.NUMBA_NUM_THREADS


def _taps_inside(n_out, size, k, stride, dilation, pad):
    """(first, end) of the taps of each of n_out output positions along one axis that read
    inside the input (size values, `pad` before it): taps first <= i < end; (k, 0) if none."""
    o = np.arange(n_out) * stride - pad         # each position's first tap, in the input
    first = np.clip(-(o // dilation), 0, k)     # o + i*dilation >= 0
    end = np.clip((size - 1 - o) // dilation + 1, 0, k)  # o + i*dilation < size
    none = end <= first
    return np.where(none, k, first), np.where(none, 0, end)


def taps_inside(H, W, ho, wo, kh, kw, stride, padding, dilation) -> float:
    """The fraction of a conv's taps that read inside the input (not its padding): the least a
    tile of column_order can multiply (large images: no need to sort them)."""
    inside = [(end - first).clip(0).sum() / (n * k) for end, first, n, k in (
        (*_taps_inside(ho, H, kh, stride[0], dilation[0], padding[0])[::-1], ho, kh),
        (*_taps_inside(wo, W, kw, stride[1], dilation[1], padding[1])[::-1], wo, kw))]
    return float(inside[0] * inside[1])


@functools.lru_cache(maxsize=64)
def column_order(B, H, W, C, ho, wo, kh, kw, stride, padding, dilation, groups=1):
    """The packed path's gather by taps: (order, rows, fraction), skipping the taps that read
    zero padding alone (31% of a 3x3 conv's MACs at 4x4, 56% at 2x2).
    order (B*P,): column q of the im2col matrix is output position order[q] = b*P + y*W' + x,
    sorted by the set of taps that read inside the input (then in order), so that whole tiles
    of NR columns share it, within `groups` runs of the images (the threads' shares when the
    chunks of columns are theirs: each thread then reads the input it padded and writes the
    output its next layer reads; sorted over all images, 3x3 basis layers at 4x4 took 1.5x as
    long). rows (tiles, 4): each tile's im2col rows in (tap, channel) order, the taps read
    inside the input by one of its columns at least (a rectangle of taps), as `count` runs of
    `length` rows `step` apart from `first`: (first, step, count, length), count 0 when none.
    fraction: the rows gathered and multiplied, of all tiles' K rows. Arrays read-only,
    remembered for the last 64 shapes (plan_conv sorts small images only: taps_inside)."""
    P = ho * wo
    ky0, ky1 = _taps_inside(ho, H, kh, stride[0], dilation[0], padding[0])
    kx0, kx1 = _taps_inside(wo, W, kw, stride[1], dilation[1], padding[1])
    box = np.stack(np.broadcast_arrays(ky0[:, None], ky1[:, None], kx0, kx1), -1).reshape(P, 4)
    box[(box[:, 0] >= box[:, 1]) | (box[:, 2] >= box[:, 3])] = (kh, 0, kw, 0)   # no tap
    key = ((box[:, 0] * (kh + 1) + box[:, 1]) * (kw + 1) + box[:, 2]) * (kw + 1) + box[:, 3]
    group = np.repeat(np.arange(B) * groups // B, P)
    order = np.lexsort((np.tile(key, B), group)).astype(np.intp)
    starts = np.arange(0, B * P, NR)
    tile_box = box[order % P]
    y0, x0 = np.minimum.reduceat(tile_box[:, [0, 2]], starts).T
    y1, x1 = np.maximum.reduceat(tile_box[:, [1, 3]], starts).T
    count = np.where((y1 > y0) & (x1 > x0), y1 - y0, 0)
    whole = (x0 == 0) & (x1 == kw)              # whole rows of taps: one run
    rows = np.stack([(y0 * kw + x0) * C, np.where(whole, 0, kw * C),
                     np.where(whole, count > 0, count), np.where(whole, count * kw, x1 - x0) * C],
                    -1).astype(np.intp)
    fraction = float((count * (x1 - x0)).sum()) / (len(starts) * kh * kw)
    for a in (order, rows):
        a.setflags(write=False)
    return order, rows, fraction


def plan_packed(B, cols, K, Np, Mp, T, grid):
    """(nch, parts, scratch per thread) of _conv_packed: cols columns per image (grid) or in the
    batch, K im2col rows, Np output rows and Mp basis rows (0 for a conv), both rounded up to
    MR. Chunks of nch columns whose B panels (gather only), basis responses and C fit in
    ~512 KB (L2), as many as a multiple of T; when there are fewer chunks than threads, parts
    split the output rows. Weight-bound layers (columns <= rows) are split by rows."""
    per_column = (0 if grid else min(KC, K)) + Mp + Np
    nch = max(NR, PACKED_CHUNK_VALUES // per_column // NR * NR)
    if grid:
        per = max(-(-cols // nch), -(-T // B))
        nch = -(-cols // (per * NR)) * NR
        chunks = B * -(-cols // nch)
    else:
        by_rows = not Mp and cols <= Np
        rounds = -(-cols // (nch * (1 if by_rows else T)))
        nch = min(nch, -(-cols // (rounds * (1 if by_rows else T) * NR)) * NR)
        chunks = -(-cols // nch)
    parts = min(Np // MR, -(-T // chunks)) if chunks < T else 1
    return nch, parts, per_column * nch


def plan_direct(B, C, ho, wo, N, K, kh, dh, sh, sw, Hq, Wq, padded, T, M=None, tiles=True):
    """(narrow, rows per block, panel parts, copy, grid1, channel block, scratch per thread,
    MACs computed per MAC needed: rows, columns and channels rounded up to whole tiles) of
    _conv_direct, Hq x Wq the planes of one stride phase, padded: any zero padding, M the basis
    rank (None: a conv).
    Blocks: a thread's share of the images when the layer has more weights than input values
    (weight-bound: late layers; its thread then streams the weights once); else whole images,
    as many as fit DIRECT_BLOCK_VALUES, or else bands of one image that do; as many blocks as a
    multiple of T where that splits evenly, and the panels split too when there are fewer
    blocks than threads (batch 1). Splitting by channels instead (each thread all of the input,
    half of the weights) made dense VGG-16 at batch 16 8% slower: the input then crosses
    between the cores.
    Tile: the shape computing fewest MACs (a block's last tile repeats rows), the narrow one's
    counted DIRECT_NARROW_COST times (sgemm: measured per register count).
    Copy: a task copies its block's input unless x can be read in place (stride 1, unpadded,
    W' a multiple of TX); read by tiles, the copy interleaves CHANNEL_BLOCK channels (where C
    is a multiple), the weights' K in that order (blocked_k): a tile's taps then run along
    cache lines, not across planes (AVX2: 5-6% faster at 32x32, 16x16 and stride 2; neutral
    to 2% slower on smaller planes, hence BLOCKED_PLANE).
    Grid1: the basis responses, or a conv's output, over the
    input grid (filters rounded up to MR, Wq corners per output row) where that computes fewer
    MACs than the tiles (filters rounded up to NR), or always when the tiles may not be used
    (tiles False: a conv with K < DIRECT_MIN_K); its blocks are sized with the responses, and
    its bands split an image evenly by rows, not by whole tiles (at batch 1 on 2 threads 32
    rows went as 18 + 14, the grid rounded 18 x 34 corners up to 624). Priced at Wq corners a
    row even where the kernel computes only the W' of the output (W' a multiple of NR): priced
    at W', grid1 took BasisConv VGG-16's and ResNet-18's 16x16 layers of M = 25 from kn2row,
    which at batch 16 were then 1.1-1.3x slower (at batch 1 0.88-1.0 of the time)."""
    image = C * sh * sw * Hq * Wq               # values of one image's padded input
    halo = (kh - 1) * dh // sh
    need = K * N if M is None else (K + N) * M  # weights = MACs needed per position
    per_row = K * round_up(N) if M is None else M * round_up(N)  # MACs computed per tile position
    per_row1 = 0 if M is None else K * round_up(M)               # stage 1's, when by tiles
    best = None
    for narrow, grid1 in [(n, g) for n in (0, 1) for g in (False, True)
                          if (tiles or g)]:
        NY, TX = DIRECT_TILES[narrow]
        # values a block holds per image: its input, and with grid1 its responses too
        grid_row = round_up(N if M is None else M, MR) * Wq if grid1 else 0  # responses per row
        held = image + (round_up(ho * grid_row) if grid1 else 0)
        if need > B * image or (held <= DIRECT_BLOCK_VALUES and B >= T):
            per = (-(-B // T) if need > B * image
                   else min(B, max(1, DIRECT_BLOCK_VALUES // held)))
            per = next((p for p in range(per, 0, -1) if B % p == 0 and B // p % T == 0), per)
            per_block, blocks, rows_in = per * ho, -(-B // per), min(B, per) * Hq
            sizes = [per * ho] * (B // per) + ([B % per * ho] if B % per else [])
        else:
            band = max(NY, (DIRECT_BLOCK_VALUES // (C * sh * sw * Wq + grid_row) - halo)
                       // NY * NY)
            nb = -(-ho // band)                 # bands per image; at batch 1 a multiple of T
            if B < T:
                nb = -(-nb // -(-T // B)) * -(-T // B)
            unit = 1 if grid1 else NY            # even bands (of whole tiles)
            per_block = -(-ho // (nb * unit)) * unit
            # (a band as tall as the image is a whole image to the kernel: all Hq rows copied)
            blocks = B * -(-ho // per_block)
            rows_in = Hq if per_block >= ho else min(Hq, per_block + halo)
            sizes = [per_block] * (ho // per_block) + ([ho % per_block] if ho % per_block else [])
            sizes = sizes * B
        ld = -(-wo // TX) * TX
        tiled = sum(-(-r // NY) * NY for r in sizes) * ld
        G = round_up(min(ho, per_block) * Wq)   # grid1: an image's (or band's) responses
        if grid1:                               # (and the combine over the grid too)
            R1 = round_up(N if M is None else M, MR)     # rows of the grid's responses
            grids = sum(-(-r // ho) * round_up(min(ho, r) * Wq) for r in sizes)  # corners
            computed = grids * (K * R1 + (0 if M is None else M * round_up(N, MR)))
            S1 = per_block // ho * G if per_block >= ho else G
            stage, responses = MR * S1, R1 * S1
        else:
            computed = tiled * (per_row + per_row1)
            stage = NR * NY * ld
            responses = 0 if M is None else round_up(M) * -(-per_block // NY) * NY * ld
        cost = computed * (DIRECT_NARROW_COST if narrow else 1.0)
        if best is None or cost < best[0]:
            copy = bool(padded or sh * sw > 1 or wo % TX or grid1)
            cb = (CHANNEL_BLOCK if copy and not grid1 and C % CHANNEL_BLOCK == 0
                  and sh * sw * Hq * Wq >= BLOCKED_PLANE else 1)
            scratch = stage + responses + (C * sh * sw * rows_in * Wq + (NR + Wq) * cb
                                           if copy else 0)
            parts = -(-T // blocks) if grid1 else min(-(-N // NR), -(-T // blocks))
            best = (cost, (narrow, per_block, parts, copy, grid1, cb, scratch,
                           computed / (B * ho * wo * need)))
    return best[1]


class ConvPlan(NamedTuple):
    """How prepare_conv runs a conv's shapes (plan_conv)."""
    how: str          # "direct" (_conv_direct), "packed" (_conv_packed), "streamed"
                      # (_basis_streamed), "split_k" (_basis_split_k), "image" (per image)
                      # or "batched" (whole batch)
    kn2row: bool      # basis stage 1 by kn2row (image / batched)
    grid: bool        # packed: the input read in place
    split: tuple      # direct: (narrow, rows per block, parts, copy, grid1, channel block);
                      # packed: (nch, parts, by_taps: column_order); image: (bands per image,);
                      # batched: (images per group,); streamed: (); split_k: (narrow,)
    scratch: int      # kernel scratch values per thread (direct, packed, image), per group
                      # (batched) or in all (streamed, split_k)
    padded: int       # packed: values of the zero-padded input copy, margin included
    pack: int = 0     # image, batched: sgemm's packing scratch per thread (sgemm.pack_size)

    @property
    def workspace(self) -> int:
        """Scratch values prepare_conv's launch allocates (at most, over thread counts)."""
        return (threads() * self.pack
                + (self.scratch if self.how in ("batched", "streamed", "split_k")
                   else threads() * self.scratch + self.padded))


def plan_conv(x_shape, N, kh, kw, ho, wo, stride, padding, dilation, groups, M=None) -> ConvPlan:
    """How prepare_conv runs a conv of x (B, C, H, W) into N channels of H' x W' with zero padding
    [t, l, b, r]; M: basis rank (None for a plain conv). Measured choices (VGG-16, batch 16):
      direct   convs and basis convs of one group with K >= DIRECT_MIN_K and a kernel at
               least as large as the stride (a 1x1 strided conv would copy 4x the input it
               reads: 2-3x slower than packed), whose tiles compute at most DIRECT_WASTE times
               the MACs needed (plain convs with at most DIRECT_STREAMED outputs per channel:
               whatever they compute), by tiles only where direct_beats_packed (the
               register count decides). AVX-512: 440-490 GFLOP/s on VGG's 3x3 layers from
               32x32 to 4x4, where the packed path ran at 330-410 (no gather, no row-panel
               waste, the epilogue on stage rows in cache); basis convs 1.1-1.5x faster than
               packed at batch 16 (8x8, 4x4, and 32x32 at stride 2). Over the input grid
               (grid1): basis convs with few filters (M = 12 at 32x32: 1.9x faster than kn2row)
               and convs at stride 1 with K < DIRECT_MIN_K (VGG's first conv 3 -> 64 at 32x32,
               batch 16: 0.46 -> 0.22 ms), when there are at least as many blocks as threads.
      packed   one group, at least NR columns, except basis convs whose stage 1 runs by kn2row
               per image (P >= PER_IMAGE_MIN): kn2row reads each input value once where im2col
               gathers it kh*kw times, which with few basis filters costs more than the multiply
               (kn2row 1.1-1.9x faster there; the packed path 1.1x faster at 8x8 and below).
               Its columns sorted by the taps they read inside the input where its tiles then
               skip TAPS_SKIPPED_MIN of the MACs or more; before all others where they compute
               at most PACKED_TAPS_MAX of them (2x2 at batch 16, 512 -> 512: 0.52-0.60 of the
               direct conv's time; basis, 512 -> 102 -> 512: 0.84-0.91 of the streamed path's).
      grid     packed at stride 1 with K >= KC when the grid of window corners, H' rows of Wp
               (rounded up to register tiles), is at most GRID_WASTE times the H'W' outputs
               (1.27x faster than gathering at 32x32 with K = 576; 10% slower at 16x16, which
               computes 12.5% more, and with K = 27).
      streamed basis convs of one group with NR/2 < B*H'*W' <= STREAMED_TILES*NR output
               positions in all (batch 1 at 8x8, up to 4 at 4x4): weight-bound, so each stage's
               weights are split over the threads, stage 1's by K (the packed path split only
               the combine, each thread computing all of stage 1: 4x4, 512 -> 102 -> 512 took
               1.5-1.8x as long at batch 1, 1.05-1.45x at batch 2, 1.03-1.18x at batch 3-4;
               8x8 at batch 1 1.06-1.3x). With at most NR/2 positions (2x2 at batch 1) the
               tile's waste lost to batched BLAS.
      split_k  basis convs of one group whose B*H' output rows and W' columns fit in one direct
               tile (one_tile; before all others): stage 1 split by K halves each thread's
               share of the basis, and nothing is gathered (2x2, 512 -> 102 -> 512 at batch 1:
               190 -> 115 us against batched kn2row; 1x1: 150 -> 110 us).
      image    P >= PER_IMAGE_MIN, else batched."""
    B, C, H, W = x_shape
    T = threads()
    P = ho * wo
    Kg = C // groups * kh * kw
    kn2row = use_kn2row(C // groups, M, stride)
    Hp, Wp = H + padding[0] + padding[2], W + padding[1] + padding[3]
    tile = one_tile(B, ho, wo)
    packed, skipped = None, 1.0         # the packed path's plan where it may run, the MACs it
    if groups == 1 and B * P >= NR and not (kn2row and P >= PER_IMAGE_MIN):  # computes then
        grid = (tuple(stride) == (1, 1) and Kg >= KC
                and -(-ho * Wp // NR) * NR <= GRID_WASTE * P)
        nch, parts, scratch = plan_packed(B, ho * Wp if grid else B * P, Kg, round_up(N, MR),
                                          0 if M is None else round_up(M, MR), T, grid)
        if not grid and any(padding) and taps_inside(H, W, ho, wo, kh, kw, stride, padding,
                                                     dilation) <= 1 - TAPS_SKIPPED_MIN:
            skipped = column_order(B, H, W, C, ho, wo, kh, kw, tuple(stride), tuple(padding),
                                   tuple(dilation), T if parts == 1 else 1)[2]
        # grid: B rows are read up to NR + (kw-1)*dw < NR + Wp past the last plane
        padded = B * C * Hp * Wp + (NR + Wp if grid else 0) if grid or any(padding) else 0
        packed = ConvPlan("packed", False, grid, (nch, parts, skipped <= 1 - TAPS_SKIPPED_MIN),
                          scratch, padded)
    if skipped <= PACKED_TAPS_MAX:
        return packed
    if M is not None and groups == 1 and tile is not None:
        NY, TX = DIRECT_TILES[tile]
        scratch = (B * C * Hp * Wp + (TX - 1) * stride[1]
                   + (T * round_up(M) + round_up(N)) * NY * TX)
        return ConvPlan("split_k", False, False, (tile,), scratch, 0)
    if M is not None and groups == 1 and NR // 2 < B * P <= STREAMED_TILES * NR:
        scratch = (B * C * Hp * Wp
                   + round_up(B * P) * (T * (KC + 2 * round_up(M, MR)) + round_up(N, MR)))
        return ConvPlan("streamed", False, False, (), scratch, 0)
    if (groups == 1 and kh >= stride[0] and kw >= stride[1]
            and (Kg >= DIRECT_MIN_K or tuple(stride) == (1, 1))):
        sh, sw = stride
        dh = dilation[0]
        Hq, Wq = -(-Hp // sh), -(-Wp // sw)
        *split, scratch, waste = plan_direct(B, C, ho, wo, N, Kg, kh, dh, sh, sw, Hq, Wq,
                                             any(padding), T, M, Kg >= DIRECT_MIN_K)
        # A conv's waste is cheap where each weight meets few outputs (the weights' stream sets
        # the time; not so for basis convs: batched kn2row 1.6x faster at 2x2, batch 2). Basis
        # convs with fewer blocks than threads would repeat stage 1 in each part: 1.2-1.8x
        # slower than the other paths at batch 1, also when run as two direct convs.
        streamed = M is None and B * P <= DIRECT_STREAMED
        if ((waste <= DIRECT_WASTE or streamed)
                and (M is None and not split[4] or split[2] == 1)
                and (split[4] or streamed or direct_beats_packed(B, wo, stride, T))):
            # (grid1 does not split panels: it needs as many blocks as threads)
            return ConvPlan("direct", False, False, tuple(split), scratch, 0)
    if packed is not None:
        return packed
    dh = dilation[0]
    rows = kh * kw * M if kn2row else Kg        # scratch rows per position of stage 1
    # the GEMMs' largest sides (stage 1 then combine, per group): rows, and depth
    m_gemm = max(N // groups, rows if kn2row else M or 0)
    k_gemm = max(C // groups if kn2row else Kg, M or 0)
    if P >= PER_IMAGE_MIN:
        nsplit = max(1, -(-T // B) if B < T else 1, -(-rows * P // COLS_CAP))
        nsplit = min(nsplit, ho)
        band = -(-ho // nsplit)
        band_in = min(H, band + (kh - 1) * dh) * W if kn2row else 0   # kn2row: input positions
        if kn2row:
            scratch = rows * band_in + M * band * wo
        else:
            scratch = Kg * band * wo + (0 if M is None else M * band * wo)
        return ConvPlan("image", kn2row, False, (nsplit,), scratch, 0,
                        pack_size(m_gemm, max(band * wo, band_in), k_gemm))
    if kn2row:
        per_image = C * H * W + groups * rows * H * W + groups * M * P + N * P
    else:
        per_image = (C * kh * kw + N + (0 if M is None else groups * M)) * P
    per = min(B, max(1, BATCH_COLS_CAP // per_image))
    return ConvPlan("batched", kn2row, False, (per,), per * per_image, 0,
                    pack_size(m_gemm, per * (H * W if kn2row else P), k_gemm))


def one_tile(B, ho, wo):
    """The direct tile (0 wide, 1 narrow: DIRECT_TILES) holding all B*H' output rows and W'
    columns, the one of more positions if both do (MR of them: their accumulators hide the
    FMA latency best); None if neither does."""
    fits = [n for n in (0, 1) if B * ho <= DIRECT_TILES[n][0] and wo <= DIRECT_TILES[n][1]]
    return max(fits, key=lambda n: DIRECT_TILES[n][0] * DIRECT_TILES[n][1], default=None)


def direct_beats_packed(B, wo, stride, T) -> bool:
    """Whether a conv or basis conv runs faster by the direct conv's tiles than by the packed
    path (measured on VGG-16's and ResNet-18's 3x3 layers, batch 16 and 1): with AVX-512's 32
    registers (MR 12) everywhere, 1.1-1.5x; with 16 (AVX2, Zen 3) only at stride 1 from 16
    output columns (32 at batch 1): there 1.04-1.14x, while the packed path was 1.14-1.21x
    faster on 8x8 and 4x4 layers, strided ones, and 16x16 at batch 1 (the packed path's
    register tile holds 6 filters x 16 positions over K blocked in L1; the direct tile's
    weight panel spans all of K). Basis convs likewise on AVX2 at batch 16: the packed path
    1.05x faster at 8x8, 1.1-1.15x at 4x4, 1.25x at 2x2 (BasisConv VGG-16 7-10% faster)."""
    return MR == 12 or (tuple(stride) == (1, 1) and wo >= (32 if B < T else 16))


@functools.lru_cache(maxsize=4096)
def planned(*args) -> ConvPlan:
    """plan_conv(*args), remembered (its arithmetic took 9-18 us a call: 10% of a batch-1
    BasisConv VGG-16); args hashable. Tests that change the plan's caps clear it."""
    return plan_conv(*args)


def prepare_conv(x_shape, w1, bias, stride, padding, dilation, groups, ho, wo, w2=None, act=None,
                 residual=None):
    """conv2d (w2 None: w1 (N, C/G, kh, kw)) or basis conv (w1 basis (G*M, C/G, kh, kw),
    w2 combine (N, M)) of float32 C-contiguous inputs (B, C, H, W) = x_shape, zero padding
    [t, l, b, r] (other modes: pad first), then + bias (N or None), + residual and activation
    `act`, set up for that input shape and residual ((shape, dtype), or None): the way to run
    it, packed weights, epilogue codes and scratch shapes chosen once. Returns
    launch(x, residual) -> output (B, N, H', W'), which takes the output and scratch and calls
    the kernel. A plan step keeps one per input shape (that set-up was 6-14 us a call).
    Shapes must have passed the op's infer."""
    B, C, H, W = x_shape
    GM, Cg, kh, kw = w1.shape
    two = w2 is not None
    N = w2.shape[0] if two else GM
    M = GM // groups if two else None
    P = ho * wo
    out_shape = (B, N, P)                           # (B, N, H'W'): the kernels' view of it
    code, a0, a1, done = act_code(act)
    has_res = residual is not None and residual == ((B, N, ho, wo), np.float32)
    add_after = residual is not None and not has_res   # broadcasting add: NumPy, after
    if add_after:                                   # ... then the activation
        done = False
    if not done:
        code = 0
    act_after = None if done else act
    if bias is None:
        bias = np.zeros(N, np.float32)
    sh, sw = stride
    dh, dw = dilation
    pt, pl = padding[0], padding[1]
    w1m = w1.reshape(GM, Cg * kh * kw)
    w2m = w2 if two else _NO_W2
    T = threads()
    plan = planned(x_shape, N, kh, kw, ho, wo, tuple(stride), tuple(padding), tuple(dilation),
                   groups, M)
    Hp, Wp = H + padding[0] + padding[2], W + padding[1] + padding[3]
    if plan.how == "direct":
        Hq, Wq = -(-Hp // sh), -(-Wp // sw)
        grid1, cb = plan.split[4], plan.split[5]
        wt = (_DERIVED.get(w1, "packed", lambda: pack_rows(w1m)) if grid1 else
              _DERIVED.get(w1, ("direct", cb), lambda: pack_cols(blocked_k(w1m, cb, kh * kw))))
        ct = (_DERIVED.get(w2, "grid1", lambda: pack_rows(w2)) if two and grid1 else
              _DERIVED.get(w2, "direct", lambda: pack_cols(w2)) if two else wt)

        def run(x, res3, out):
            ws, = scratch((T, plan.scratch))
            _conv_direct(x, kh, kw, sh, sw, dh, dw, pt, pl, Hq, Wq, wt, ct, two, bias, res3,
                         has_res, code, a0, a1, ho, wo, *plan.split, out, ws)
    elif plan.how == "packed":
        wp = _DERIVED.get(w1, "packed taps", lambda: pack_rows(blocked_k(w1m, Cg, kh * kw)))
        cp = _DERIVED.get(w2, "packed", lambda: pack_rows(w2, round_up(M, MR))) if two else wp
        order, rows, _ = (column_order(B, H, W, Cg, ho, wo, kh, kw, tuple(stride),
                                       tuple(padding), tuple(dilation),
                                       T if plan.split[1] == 1 else 1)
                          if plan.split[2] else _NO_ORDER)

        def run(x, res3, out):
            ws, xpf = scratch((T, plan.scratch), (plan.padded,))  # xpf: (B, C, Hp, Wp), margin
            if plan.padded:
                xpf[B * C * Hp * Wp:] = 0.0
                _pad_input(x, pt, pl, Hp, Wp, xpf, T, plan.split[2])
            else:
                xpf = x.ravel()
            _conv_packed(xpf, C, Hp, Wp, kh, kw, dh, dw, wp, cp, two, bias, res3, has_res, code,
                         a0, a1, sh, sw, ho, wo, plan.grid, order, rows, *plan.split, out, ws)
    elif plan.how == "streamed":
        Mp = round_up(M, MR)
        wp = _DERIVED.get(w1, "packed", lambda: pack_rows(w1m))
        cp = _DERIVED.get(w2, "packed", lambda: pack_rows(w2, Mp))
        ncols = round_up(B * P)                              # tiles * NR

        def run(x, res3, out):
            xpf, cols, resp, tmp = scratch((B * C * Hp * Wp,),        # (B, C, Hp, Wp)
                                           (T, KC * ncols),          # (T, tiles, KC, NR)
                                           (T, Mp * ncols),          # (T, tiles, Mp, NR)
                                           (round_up(N, MR) * ncols,))  # (Np, tiles * NR)
            _basis_streamed(x, kh, kw, sh, sw, dh, dw, pt, pl, Hp, Wp, ho, wo, wp, cp, bias,
                            res3, has_res, code, a0, a1, out, xpf, cols, resp, tmp, T)
    elif plan.how == "split_k":
        NY, TX = DIRECT_TILES[plan.split[0]]
        wt = _DERIVED.get(w1, ("direct", 1), lambda: pack_cols(w1m))
        ct = _DERIVED.get(w2, "direct", lambda: pack_cols(w2))

        def run(x, res3, out):
            xpf, resp, tmp = scratch((B * C * Hp * Wp + (TX - 1) * sw,),  # (B, C, Hp, Wp), margin
                                     (T, round_up(M) * NY * TX),          # (T, Mq, NY*TX)
                                     (round_up(N) * NY * TX,))            # (Nq, NY*TX)
            xpf[B * C * Hp * Wp:] = 0.0
            _basis_split_k(x, kh, kw, sh, sw, dh, dw, pt, pl, Hp, Wp, ho, wo, wt, ct,
                           plan.split[0], bias, res3, has_res, code, a0, a1, out, xpf, resp, tmp,
                           T)
    elif plan.kn2row and plan.how == "image":
        wk = kn2row_weights(w1, groups)
        wkp = _DERIVED.get(w1, ("kn2row packed", groups), lambda: per_group_rows(wk, groups))
        w2p = _DERIVED.get(w2, ("packed per group", groups), lambda: per_group_rows(w2, groups))

        def run(x, res3, out):
            ws, packs = scratch((T, max(plan.scratch, 1)), (T, plan.pack))
            _kn2row_image(x, wk, w2, wkp, w2p, bias, res3, has_res, code, a0, a1, kh, kw, dh,
                          dw, pt, pl, ho, wo, groups, plan.split[0], out, ws, packs)
    elif plan.kn2row:
        wk = kn2row_weights(w1, groups)

        def run(x, res3, out):
            for b0 in range(0, B, plan.split[0]):
                b1 = min(B, b0 + plan.split[0])
                nb = b1 - b0
                xcols, Y, s_buf, tmp, packs = scratch(
                    (C, nb * H * W), (groups * kh * kw * M, nb * H * W), (GM, nb * P),
                    (N, nb * P), (T, plan.pack))
                _kn2row_batched(x[b0:b1], wk, w2, bias, res3[b0:b1] if has_res else res3,
                                has_res, code, a0, a1, kh, kw, dh, dw, pt, pl, ho, wo, groups,
                                nb * H * W < Y.shape[0], nb * P < N, out[b0:b1], xcols, Y, s_buf,
                                tmp, packs)
    elif plan.how == "image":
        direct = kh == kw == 1 and sh == sw == 1 and not any(padding)

        def run(x, res3, out):
            ws, packs = scratch((T, max(plan.scratch, 1)), (T, plan.pack))
            _per_image(x, w1m, w2m, two, bias, res3, has_res, code, a0, a1, kh, kw, sh, sw, dh,
                       dw, pt, pl, ho, wo, groups, plan.split[0], direct, out, ws, packs)
    else:
        def run(x, res3, out):
            for b0 in range(0, B, plan.split[0]):
                b1 = min(B, b0 + plan.split[0])
                BP = (b1 - b0) * P
                cols, s_buf, tmp, packs = scratch((C * kh * kw, BP), (GM, BP) if two else (1, 1),
                                                  (N, BP), (T, plan.pack))
                _batched(x[b0:b1], w1m, w2m, two, bias, res3[b0:b1] if has_res else res3,
                         has_res, code, a0, a1, kh, kw, sh, sw, dh, dw, pt, pl, ho, wo, groups,
                         BP < GM, BP < N, out[b0:b1], cols, s_buf, tmp, packs)

    def launch(x, residual):
        out = empty((B, N, ho, wo))                 # the step's memory in a plan (buffers.py)
        run(x, np.ascontiguousarray(residual).reshape(out_shape) if has_res else _NO_RES,
            out.reshape(out_shape))
        return residual_then_act(out, residual if add_after else None, act_after)
    return launch


@njit(cache=True, parallel=True)
def _linear(x, w, bias, has_bias, out, packs):
    """out (R, O) = x (R, I) @ w (O, I).T (+ bias (O) when has_bias, rounded as NumPy's add),
    output features split over T slices (packs (T, ...): their sgemm scratch)."""
    R, I = x.shape
    O = w.shape[0]
    T = packs.shape[0]
    xf = x.ravel()
    wf = w.ravel()
    of = out.ravel()
    for s in prange(T):
        n0 = O * s // T
        n1 = O * (s + 1) // T
        _gemm(True, R, n1 - n0, I, xf, 0, I, wf, n0 * I, I, of, n0, O, packs[s])
        if has_bias:
            for r in range(R):
                for o in range(n0, n1):
                    of[r * O + o] += bias[o]


def linear_gemm(x, weight, bias=None, act=None, residual=None):
    """x (..., in) @ weight (out, in).T + bias, + residual, then activation `act`."""
    return prepare_linear(x.shape, weight, bias, act)(x, residual)


def prepare_linear(x_shape, weight, bias=None, act=None):
    """linear_gemm set up for one input shape: returns launch(x, residual) -> output, the sgemm
    in Numba tasks (BLAS below its register tile) with the bias added in them, the residual and
    activation in NumPy (rows x out values)."""
    I, O = x_shape[-1], weight.shape[0]
    R = int(np.prod(x_shape[:-1]))
    T = threads() if O >= 64 * threads() else 1
    pack = (T, pack_size(R, -(-O // T), I))
    w = np.ascontiguousarray(weight)                # (out, in)
    b = _NO_BIAS if bias is None else bias          # (out)
    out_shape = tuple(x_shape[:-1]) + (O,)

    def launch(x, residual):
        y = empty((R, O))                           # (rows, out)
        packs, = scratch(pack)
        _linear(np.ascontiguousarray(x).reshape(R, I), w, b, bias is not None, y, packs)
        return residual_then_act(y.reshape(out_shape), residual, act)
    return launch


# --- basis stage 1 by kn2row: one GEMM over the taps, then shifted adds ---------------------------
#
# With few basis filters (M < C/G) and stride 1, stage 1 skips im2col: Y = Wk (kh*kw*M, C/G) @ x
# (C/G, input positions) gives every tap's response at every input position, and
# s[m, oy, ox] = sum_ij Y[(i*kw + j)*M + m, oy - pt + i*dh, ox - pl + j*dw] (taps inside x).
# Y holds kh*kw*M values per position against im2col's C/G*kh*kw, and the GEMM is taller.


@njit(cache=True)
def _shift_add(Y, oY, ldY, iy0, W, M, kh, kw, dh, dw, pt, pl, oy0, oy1, wo, H, s, os_, lds,
               m0=0, m1=-1):
    """s[os_ + m*lds + (oy - oy0)*wo + ox] = sum over taps (i, j) inside the input of
    Y[oY + ((i*kw + j)*M + m)*ldY + (oy - pt + i*dh - iy0)*W + ox - pl + j*dw], for
    m0 <= m < m1 (default all M), oy0 <= oy < oy1, ox < wo (Y's columns are input rows iy0..
    of width W)."""
    if m1 < 0:
        m1 = M
    n = (oy1 - oy0) * wo
    for m in range(m0, m1):
        s[os_ + m * lds:os_ + m * lds + n] = 0.0
    for i in range(kh):
        ya = min(oy1, max(oy0, pt - i * dh))
        yb = max(ya, min(oy1, H + pt - i * dh))
        for j in range(kw):
            off = j * dw - pl
            lo = min(wo, max(0, -off))
            hi = max(lo, min(wo, W - off))
            L = hi - lo
            for m in range(m0, m1):
                src = oY + ((i * kw + j) * M + m) * ldY + (ya - pt + i * dh - iy0) * W + off + lo
                dst = os_ + m * lds + (ya - oy0) * wo + lo
                for oy in range(yb - ya):     # rows of W' values: vectors of 8 (_run)
                    _run(s, dst + oy * wo, Y, src + oy * W, L, True)


@njit(cache=True, parallel=True)
def _kn2row_image(x, wk, w2, wkp, w2p, bias, res, has_res, act, a0, a1, kh, kw, dh, dw, pt, pl,
                  ho, wo, groups, nsplit, out, ws, packs):
    """Basis conv, stride 1, per-image tasks as _per_image: stage 1 by kn2row from the input
    rows a band needs, wk (G*kh*kw*M, C/G) the taps' basis filters, w2 (N, M) the combine,
    wkp and w2p the same packed per group (pack_rows: (G, ...)), multiplied image after
    image; packs[t]: thread t's sgemm scratch."""
    B, C, H, W = x.shape
    N, P = out.shape[1], out.shape[2]
    Cg = C // groups
    M = w2.shape[1]
    TM = kh * kw * M
    Ng = N // groups
    T = ws.shape[0]
    tasks = B * nsplit
    xf = x.ravel()
    of = out.ravel()
    rf = res.ravel()
    wkf = wk.ravel()
    w2f = w2.ravel()
    taken = _unclaimed(tasks)
    for t in prange(T):
        buf = ws[t]
        for i in range(tasks):
            task = _take(taken, t, T, i)
            if task < 0:
                continue
            b = task // nsplit
            sp = task % nsplit
            oy0 = ho * sp // nsplit
            oy1 = ho * (sp + 1) // nsplit
            n_col = (oy1 - oy0) * wo
            if n_col == 0:
                continue
            iy0 = max(0, oy0 - pt)
            iy1 = min(H, oy1 - 1 - pt + (kh - 1) * dh + 1)
            n_in = max(0, iy1 - iy0) * W
            sb = TM * n_in                               # s after Y in the scratch
            for g in range(groups):
                if n_in > 0:
                    _gemm(False, TM, n_in, Cg, wkf, g * TM * Cg, Cg, xf,
                          (b * C + g * Cg) * H * W + iy0 * W, H * W, buf, 0, n_in, packs[t],
                          wkp[g])
                _shift_add(buf, 0, n_in, iy0, W, M, kh, kw, dh, dw, pt, pl, oy0, oy1, wo, H,
                           buf, sb, n_col)
                _gemm(False, Ng, n_col, M, w2f, g * Ng * M, M, buf, sb, n_col, of,
                      (b * N + g * Ng) * P + oy0 * wo, P, packs[t], w2p[g])
            for n in range(N):
                o = (b * N + n) * P + oy0 * wo
                _finish_in_place(of, o, n_col, bias[n], rf, o, has_res, act, a0, a1)


@njit(cache=True, parallel=True)
def _kn2row_batched(x, wk, w2, bias, res, has_res, act, a0, a1, kh, kw, dh, dw, pt, pl, ho, wo,
                    groups, split1, split2, out, xcols, Y, s_buf, tmp, packs):
    """Basis conv, stride 1, the whole batch at once: xcols (C, B*H*W) <- x; Y (G*kh*kw*M,
    B*H*W) = wk @ xcols per group (T slices by rows if split1, else columns); s_buf (G*M, B*P)
    <- shifted adds (prange over (image, group, part of M)); tmp (N, B*P) = combine @ s_buf and
    the epilogue, as _batched (packs (T, ...): the slices' sgemm scratch)."""
    B, C, H, W = x.shape
    N, P = out.shape[1], out.shape[2]
    HW = H * W
    BHW = B * HW
    BP = B * P
    Cg = C // groups
    M = w2.shape[1]
    TM = kh * kw * M
    T = packs.shape[0]
    xc = xcols.ravel()
    yf = Y.ravel()
    sf = s_buf.ravel()
    tf = tmp.ravel()
    of = out.ravel()
    rf = res.ravel()
    for t in prange(B * C):
        b = t // C
        c = t % C
        xc[c * BHW + b * HW:c * BHW + (b + 1) * HW] = x[b, c].ravel()
    for sp in prange(T):
        r0, r1, c0, c1 = _split(sp, T, groups * TM, BHW, split1)
        _grouped_gemm(wk, Cg, groups, r0, r1, c0, c1, xc, BHW, Cg, yf, BHW, packs[sp])
    parts = max(1, min(M, -(-T // (B * groups))))     # split M too when images are few
    for t in prange(B * groups * parts):
        b = t // (groups * parts)
        g = t // parts % groups
        k = t % parts
        _shift_add(yf, g * TM * BHW + b * HW, BHW, 0, W, M, kh, kw, dh, dw, pt, pl, 0, ho, wo, H,
                   sf, g * M * BP + b * P, BP, M * k // parts, M * (k + 1) // parts)
    for sp in prange(T):
        r0, r1, c0, c1 = _split(sp, T, N, BP, split2)
        _grouped_gemm(w2, M, groups, r0, r1, c0, c1, sf, BP, M, tf, BP, packs[sp])
        _scatter(tf, of, rf, bias, has_res, act, a0, a1, r0, r1, c0, c1, N, P)


@njit(cache=True, parallel=True)
def _matmul(a, b, out, packs, by_rows):
    """out (m, n) = a (m, k) @ b (k, n), cut into S slices of rows or columns (packs (S, ...):
    their sgemm scratch)."""
    m, k = a.shape
    S = packs.shape[0]
    n = b.shape[1]
    af = a.ravel()
    bf = b.ravel()
    of = out.ravel()
    for s in prange(S):
        r0, r1, c0, c1 = _split(s, S, m, n, by_rows)
        if r1 > r0 and c1 > c0:
            _gemm(False, r1 - r0, c1 - c0, k, af, r0 * k, k, bf, c0, n, of, r0 * n + c0, n,
                  packs[s])


def matmul(a, b, out=None):
    """a (m, k) @ b (k, n) in float32 as Numba tasks with single-threaded sgemm each (the
    engine's replacement for NumPy's threaded BLAS on hot paths); any layouts (copied to
    C order when needed). out: a C-contiguous float32 (m, n) to write, else a new array."""
    a = np.ascontiguousarray(a, np.float32)
    b = np.ascontiguousarray(b, np.float32)
    m, n = a.shape[0], b.shape[1]
    if out is None:
        out = np.empty((m, n), np.float32)
    by_rows = n < m
    S = min(threads(), max(1, (m if by_rows else n) // 32))
    packs, = scratch((S, pack_size(-(-m // S) if by_rows else m, n if by_rows else -(-n // S),
                                   a.shape[1])))
    _matmul(a, b, out, packs, by_rows)
    return out

"""The engine's own single-threaded float32 GEMM: C = A @ B over flat row-major arrays, for the
GEMM-shaped kernels (ops/gemm.py) to call from inside their Numba-parallel tasks.

Why not BLAS: the OpenBLAS that SciPy ships picks its kernels by CPU at run time and may be told
to use older ones (OPENBLAS_CORETYPE); on AVX-512 machines that halves the rate. This GEMM is
written for the machine Numba compiles on: the register tile is MR x NR values, NR = two SIMD
vectors of the widest width the host has (16 floats with AVX-512, 8 with AVX, else 4; 8 where
AVX-512 runs at AVX2's rate, `HALF_RATE_AVX512`).

Structure (GotoBLAS / BLIS): for each block of KC rows of B and NC of its columns, B is packed
into NR-wide micro-panels (kc, NR), zero-padded at the right; for each block of MC rows of A, A
is packed into MR-tall micro-panels (kc, MR); the micro-kernel multiplies one A micro-panel by one
B micro-panel into MR x NR accumulators held in registers (`_micro`, LLVM IR written with
llvmlite: fused multiply-adds on whole vectors, the broadcast of A folded in) and stores or adds
them to C. Partial tiles go through a small tile buffer.

Rounding: every C element is a sum over k in increasing order, in blocks of KC, each block's sum
added to C (c = c + s); the result does not depend on threads or on where C's tiles fall.

The direct conv's micro-kernel (`_direct_micro`, used by ops/gemm.py's `_conv_direct`) shares
the register-tile loop (`_tile_loop`) with the other roles: the input's values are the broadcast
scalars, read in place through tap offsets, and the weights the vectors (`pack_cols` panels), so
that output channels fill the vectors; the tile is transposed in registers (`_transposed`) and
stored channel-major, as the output is laid out. Its grid mode (few filters, first layers) uses
`_micro` itself: filters broadcast, window corners of the input as the vectors.

`_micro_finish`: `_micro`'s tile with the conv epilogue (bias, residual add, activation) applied
to its accumulators on the way out, for kernels whose tiles are pieces of the output itself
(ops/gemm.py's grid1 over an output row of whole tiles): no stage, no second pass.

`_vector_op` / `_run`: moves and adds of short rows between two arrays as whole vectors (LLVM
left such loops scalar below 32 values), for B's packing here and ops/gemm.py's gathers, padding
copies and kn2row's shifted adds.

`sgemm_reference` is the plain NumPy definition the GEMM is tested against (the direct conv is
tested as a conv, against the reference conv and PyTorch).
"""
from __future__ import annotations

import os

import numpy as np
from llvmlite import ir
import llvmlite.binding as llvm
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic


def _widest_vector_width() -> int:
    """float32 lanes of the widest SIMD registers the host has (Numba compiles for the host)."""
    features = llvm.get_host_cpu_features()
    return 16 if features.get("avx512f") else 8 if features.get("avx") else 4


# CPUs that run a 512-bit FMA as two 256-bit halves: AVX-512 gives them few more FLOPs a cycle
# than AVX2, and tiles 4x the size, which waste more on the compressed nets' small layers (AMD
# Zen 4, 8 lanes against 16, alternating processes: BasisConv VGG-16 and ResNet-18 0.5-0.9 of
# the time at batch 1, 0.93-0.94 at batch 16; the dense nets 1.07 of it at batch 16, 1.1-1.2 at
# batch 1; one core's sgemm 96-98 GFLOP/s either way). The engine is for compressed nets.
HALF_RATE_AVX512 = {"znver4"}


def _host_vector_width() -> int:
    """float32 lanes of the vectors the kernels use: the widest the host has, 8 on CPUs in
    HALF_RATE_AVX512, or what BASISCONV_VECTOR_WIDTH (4, 8 or 16) asks, at most the widest:
    the tests run the other widths' kernels that way (with their own NUMBA_CACHE_DIR: Numba's
    cache does not see this setting)."""
    widest = _widest_vector_width()
    asked = os.environ.get("BASISCONV_VECTOR_WIDTH")
    if asked in ("4", "8", "16"):
        return min(widest, int(asked))
    return 8 if widest == 16 and llvm.get_host_cpu_name() in HALF_RATE_AVX512 else widest


VW = _host_vector_width()
NR = 2 * VW                     # register tile columns: two vectors
MR = 12 if VW == 16 else 6      # register tile rows: 2*MR accumulators (32 / 16 registers)
KC = 256                        # rows of B per packed block: one B micro-panel (KC, NR) in L1
MC = 120                        # rows of A per packed block (MC, KC) in L2
NC = 2048                       # columns of B per packed block
PREFETCH_ROWS = 64              # direct conv: weight rows prefetched ahead, when they stream
CHANNEL_BLOCK = 8               # channels the direct conv's copied input interleaves (gemm.py)


def _vector_ptr(context, builder, arr_t, arr, offset, lanes):
    """A pointer to the `lanes` float32 values of arr from offset, as one vector."""
    data = context.make_array(arr_t)(context, builder, arr).data
    return builder.bitcast(builder.gep(data, [offset]),
                           ir.VectorType(ir.FloatType(), lanes).as_pointer())


def _splat(builder, scalar, lanes):
    """A vector of `lanes` copies of the float32 scalar."""
    undef = ir.Constant(ir.VectorType(ir.FloatType(), lanes), ir.Undefined)
    return builder.shuffle_vector(
        builder.insert_element(undef, scalar, ir.Constant(ir.IntType(32), 0)), undef,
        ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes))


def _activated(builder, v, code, low, high):
    """act(v) for a float32 vector v by the epilogue's code (an integer value: 0 none, 1 relu,
    2 clip low..high, 3 leaky_relu slope low; low, high: vectors): ordered compares and
    selects, so that NaN propagates as NumPy's."""
    zero = ir.Constant(v.type, [0.0] * v.type.count)
    negative = builder.fcmp_ordered("<", v, zero)
    relu = builder.select(negative, zero, v)
    clip = builder.select(builder.fcmp_ordered("<", v, low), low,
                          builder.select(builder.fcmp_ordered(">", v, high), high, v))
    leaky = builder.select(negative, builder.fmul(v, low), v)

    def is_(c):
        return builder.icmp_signed("==", code, ir.Constant(code.type, c))
    return builder.select(is_(1), relu, builder.select(is_(2), clip,
                                                       builder.select(is_(3), leaky, v)))


def _tile_loop(context, builder, k, n, lanes, rows, group=1):
    """Emits the register tile's loop and returns its accumulators after it:
    acc[2*i + v] = sum_{q < k} lanes(p, u)[i] * rows(p, u)[v], q = p + u, for i < n, v < 2, one
    fused multiply-add per (i, v, q) with the scalar broadcast, 2n vector accumulators in
    registers. lanes: the tile's n scalars of step q; rows: its two vectors; the loop runs
    `group` steps at a time (p a multiple of group, u < group; k a multiple of group)."""
    intp = context.get_value_type(types.intp)
    vec = ir.VectorType(ir.FloatType(), VW)
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec] * 3),
                                         f"llvm.fma.v{VW}f32")
    entry = builder.block
    head = builder.append_basic_block("tile.head")
    body = builder.append_basic_block("tile.body")
    tail = builder.append_basic_block("tile.tail")
    builder.branch(head)
    builder.position_at_end(head)
    p = builder.phi(intp)
    p.add_incoming(ir.Constant(intp, 0), entry)
    acc = []
    for _ in range(2 * n):
        phi = builder.phi(vec)
        phi.add_incoming(ir.Constant(vec, None), entry)
        acc.append(phi)
    builder.cbranch(builder.icmp_signed("<", p, k), body, tail)

    builder.position_at_end(body)
    new = list(acc)
    for u in range(group):
        bv = rows(p, u)
        for i, s in enumerate(lanes(p, u)):
            splat = _splat(builder, s, VW)
            new[2 * i:2 * i + 2] = [builder.call(fma, [splat, bv[v], new[2 * i + v]])
                                    for v in range(2)]
    p.add_incoming(builder.add(p, ir.Constant(intp, group)), body)
    for phi, value in zip(acc, new):
        phi.add_incoming(value, body)
    builder.branch(head)
    builder.position_at_end(tail)
    return acc


def _codegen_helpers(context, builder):
    """(ptr(array type, array, offset) -> element pointer, const(int) -> intp constant,
    vec_at(pointer) -> the VW-vector there)."""
    intp = context.get_value_type(types.intp)
    vec = ir.VectorType(ir.FloatType(), VW)

    def ptr(arr_t, arr, off):
        return builder.gep(context.make_array(arr_t)(context, builder, arr).data, [off])

    def const(v):
        return ir.Constant(intp, v)

    def vec_at(pointer):
        return builder.load(builder.bitcast(pointer, vec.as_pointer()), align=4)
    return ptr, const, vec_at


def _micro_tile(context, builder, k, a_t, a, oa, b_t, b, ob, boff_t, boff, obf):
    """The GEMM register tile's loop: its 2*MR accumulators (row i, vector v at 2*i + v) of
    sum_p a[oa + p*MR + i] * b[ob + boff[obf + p] + j] (b's row p at ob + p*NR when boff_t is
    None)."""
    ptr, const, vec_at = _codegen_helpers(context, builder)
    ap, bp = ptr(a_t, a, oa), ptr(b_t, b, ob)
    packed = isinstance(boff_t, types.NoneType)
    op = None if packed else ptr(boff_t, boff, obf)

    def lanes(p, u):
        return [builder.load(builder.gep(ap, [builder.add(builder.mul(p, const(MR)),
                                                          const(i))])) for i in range(MR)]

    def rows(p, u):
        row = builder.gep(bp, [builder.mul(p, const(NR)) if packed
                               else builder.load(builder.gep(op, [p]))])
        return [vec_at(builder.gep(row, [const(v * VW)])) for v in range(2)]
    return _tile_loop(context, builder, k, MR, lanes, rows)


def _tile_rows(context, builder, arr_t, arr, offset, ld):
    """Pointers to the 2*MR vectors of a tile's rows in arr: row i's v-th at offset + i*ld +
    v*VW (the order of _micro_tile's accumulators)."""
    ptr, const, _ = _codegen_helpers(context, builder)
    base = ptr(arr_t, arr, offset)
    vec_ptr = ir.VectorType(ir.FloatType(), VW).as_pointer()
    return [builder.bitcast(builder.gep(base, [builder.add(builder.mul(const(i), ld),
                                                           const(v * VW))]), vec_ptr)
            for i in range(MR) for v in range(2)]


@intrinsic
def _micro(typingctx, k_t, a_t, oa_t, b_t, ob_t, boff_t, obf_t, c_t, oc_t, ldc_t, add_t):
    """c[oc + i*ldc + j] (+= when add) sum_p a[oa + p*MR + i] * b[ob + boff[obf + p] + j] for
    i < MR, j < NR, p < k: the GEMM's register tile. B's rows are NR contiguous values anywhere
    in b (boff: the taps' offsets when the conv reads its input in place), or a packed
    micro-panel's, row p at ob + p*NR (boff None: without the offset's load and add, 20
    instructions a step for 12 FMAs instead of 22; packed 3x3 layers at 8x8, one core:
    0.92-0.95 of the time)."""
    sig = types.void(types.intp, a_t, types.intp, b_t, types.intp, boff_t, types.intp, c_t,
                     types.intp, types.intp, types.boolean)

    def codegen(context, builder, signature, args):
        k, a, oa, b, ob, boff, obf, c, oc, ldc, add = args
        acc = _micro_tile(context, builder, k, a_t, a, oa, b_t, b, ob, boff_t, boff, obf)
        dst = _tile_rows(context, builder, c_t, c, oc, ldc)
        with builder.if_else(add) as (then, otherwise):
            with then:
                for d, s in zip(dst, acc):
                    builder.store(builder.fadd(builder.load(d, align=4), s), d, align=4)
            with otherwise:
                for d, s in zip(dst, acc):
                    builder.store(s, d, align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _micro_finish(typingctx, k_t, a_t, oa_t, b_t, ob_t, boff_t, obf_t, c_t, oc_t, ldc_t, bias_t,
                  obias_t, res_t, has_res_t, act_t, lo_t, hi_t):
    """_micro's tile with the conv epilogue on its way out, for a whole tile of output rows:
    c[oc + i*ldc + j] = act(sum_p ... + bias[obias + i] (+ res[oc + i*ldc + j] when has_res))
    (act: the epilogue's code, lo / hi its parameters; the order and rounding of ops/gemm.py's
    _finish). The output written once, not as a stage that a second pass finishes."""
    sig = types.void(types.intp, a_t, types.intp, b_t, types.intp, boff_t, types.intp, c_t,
                     types.intp, types.intp, bias_t, types.intp, res_t, types.boolean, act_t,
                     lo_t, hi_t)

    def codegen(context, builder, signature, args):
        k, a, oa, b, ob, boff, obf, c, oc, ldc, bias, obias, res, has_res, act, lo, hi = args
        acc = _micro_tile(context, builder, k, a_t, a, oa, b_t, b, ob, boff_t, boff, obf)
        ptr, const, _ = _codegen_helpers(context, builder)
        bp = ptr(bias_t, bias, obias)
        v = [builder.fadd(s, _splat(builder, builder.load(builder.gep(bp, [const(n // 2)])), VW))
             for n, s in enumerate(acc)]
        code = context.cast(builder, act, act_t, types.intp)
        low, high = (_splat(builder, context.cast(builder, x, t, types.float32), VW)
                     for x, t in ((lo, lo_t), (hi, hi_t)))
        dst = _tile_rows(context, builder, c_t, c, oc, ldc)
        with builder.if_else(has_res) as (then, otherwise):
            with then:
                for d, r, s in zip(dst, _tile_rows(context, builder, res_t, res, oc, ldc), v):
                    s = builder.fadd(s, builder.load(r, align=4))
                    builder.store(_activated(builder, s, code, low, high), d, align=4)
            with otherwise:
                for d, s in zip(dst, v):
                    builder.store(_activated(builder, s, code, low, high), d, align=4)
        return context.get_dummy_value()

    return sig, codegen


def _transposed(builder, vecs):
    """The TX = len(vecs) (4 or 2) vectors of VW channels (one per output column), regrouped by
    channel: a list over channels j < VW of channel j's TX values (TX-vectors). Shuffles within
    128-bit lanes (unpack, then pairs of halves), as a 4x4 transpose is done by hand."""
    i32 = ir.IntType(32)

    def shuffle(a, b, mask):
        return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(i32, len(mask)), mask))

    def per_lane(pattern):      # a 4-index pattern repeated in every 128-bit lane; 4.. is b
        return [4 * L + (q if q < 4 else VW + q - 4) for L in range(VW // 4) for q in pattern]
    lo, hi = per_lane([0, 4, 1, 5]), per_lane([2, 6, 3, 7])
    if len(vecs) == 2:
        pairs = [shuffle(vecs[0], vecs[1], lo), shuffle(vecs[0], vecs[1], hi)]
        # pairs[h] lane L: channels 4L + 2h, 4L + 2h + 1, each (x0, x1)
        return [shuffle(pairs[j % 4 // 2], pairs[j % 4 // 2], [j // 4 * 4 + j % 2 * 2,
                                                               j // 4 * 4 + j % 2 * 2 + 1])
                for j in range(VW)]
    a0, a1, a2, a3 = vecs
    t0, t1 = shuffle(a0, a1, lo), shuffle(a0, a1, hi)
    t2, t3 = shuffle(a2, a3, lo), shuffle(a2, a3, hi)
    first, second = per_lane([0, 1, 4, 5]), per_lane([2, 3, 6, 7])
    quads = [shuffle(t0, t2, first), shuffle(t0, t2, second), shuffle(t1, t3, first),
             shuffle(t1, t3, second)]
    # quads[q] lane L: channel 4L + q's (x0, x1, x2, x3)
    return [shuffle(quads[j % 4], quads[j % 4], [j // 4 * 4 + u for u in range(4)])
            for j in range(VW)]


def _direct_micro(NY, TX, streamed, group=1):
    """The direct conv's register tile of NY output rows x TX adjacent output columns by NR
    output channels (NY*TX = MR positions at TX = 4 with AVX-512) as an intrinsic:
    c[oc + j*ldj + y*ldc + x] = sum_p x[ox + koff[p] + roff[y] + x*xs] * w[ow + p*NR + j] for
    y < NY, x < TX, j < NR, p < k: the input read in place (roff: each row's window corner,
    koff: each tap's offset, xs: the step between columns), weights from an NR-wide panel, and
    the tile written channel-major (TX adjacent values per channel and row), as the output is
    laid out. streamed: the panel is read by few tiles, from memory; the tile prefetches it
    PREFETCH_ROWS rows ahead (dense VGG-16's 4x4 and 2x2 layers at batch 1 took 1.04-1.13x as
    long without). Where the panel stays in L2 for many tiles, the prefetch is one more
    instruction a tap for nothing. group: koff's taps come in runs of `group` adjacent input
    values (CHANNEL_BLOCK channels interleaved by the conv's input copy, and K ordered so by
    blocked_k; k a multiple of group), and a run's offset is read once.
    Instructions per FMA count here: in the machine's slow phases (a busy sibling hyperthread,
    it seems) a kernel with more of them slows more (3x3 layers at 32x32 and 16x16, one core:
    1.45x against ONNX Runtime's 1.12x). Without the prefetch and with the offsets below, 23
    instructions a tap instead of 27 for 12 FMAs: 0.96-0.97 of the time in fast phases,
    0.88-0.89 in slow ones; grouped by 8, about 20.5: 0.92 again."""
    @intrinsic
    def micro(typingctx, k_t, x_t, ox_t, xs_t, koff_t, roff_t, w_t, ow_t, c_t, oc_t, ldj_t, ldc_t):
        sig = types.void(types.intp, x_t, types.intp, types.intp, koff_t, roff_t, w_t, types.intp,
                         c_t, types.intp, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            k, x, ox, xs, koff, roff, w, ow, c, oc, ldj, ldc = args
            ptr, const, vec_at = _codegen_helpers(context, builder)
            xp, wp, cp = ptr(x_t, x, ox), ptr(w_t, w, ow), ptr(c_t, c, oc)
            kp, rp = ptr(koff_t, koff, const(0)), ptr(roff_t, roff, const(0))
            corners = [builder.load(builder.gep(rp, [const(y)])) for y in range(NY)]
            # each position's offset from a tap, in a register of its own before the loop (made
            # opaque: LLVM would split it again into the row's and the column's, and add them
            # for every load: 3 more instructions a tap)
            opaque = ir.FunctionType(corners[0].type, [corners[0].type])
            offsets = [builder.asm(opaque, "", "=r,0", [builder.add(corner,
                                                                    builder.mul(const(u), xs))],
                                   False) for corner in corners for u in range(TX)]

            def lanes(p, u):
                tap = builder.gep(xp, [builder.load(builder.gep(kp, [p]))])
                return [builder.load(builder.gep(tap, [builder.add(offset, const(u))]))
                        for offset in offsets]

            i32 = ir.IntType(32)
            i8p = ir.IntType(8).as_pointer()
            prefetch = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                "llvm.prefetch.p0")

            def rows(p, u):
                row = builder.gep(wp, [builder.mul(builder.add(p, const(u)), const(NR))])
                for line in range(0, NR if streamed else 0, 16):
                    ahead = builder.gep(row, [const(PREFETCH_ROWS * NR + line)])
                    builder.call(prefetch, [builder.bitcast(ahead, i8p), ir.Constant(i32, 0),
                                            ir.Constant(i32, 2), ir.Constant(i32, 1)])
                return [vec_at(builder.gep(row, [const(v * VW)])) for v in range(2)]
            acc = _tile_loop(context, builder, k, NY * TX, lanes, rows, group)
            for y in range(NY):
                for v in range(2):
                    groups = _transposed(builder, [acc[2 * (y * TX + u) + v] for u in range(TX)])
                    for j, g in enumerate(groups):
                        d = builder.gep(cp, [builder.add(builder.mul(const(v * VW + j), ldj),
                                                         builder.mul(const(y), ldc))])
                        builder.store(g, builder.bitcast(d, g.type.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen
    return micro


def _vector_op(lanes, step=1):
    """An intrinsic f(dst, od, src, os, add): dst[od:od + lanes] = src[os:os + lanes*step:step],
    or += when add, as whole-vector loads (a shuffle keeping every step-th value) and a store
    (add a literal at the call sites: LLVM drops the other case). The same loop over values
    stays scalar when short: LLVM vectorizes it only 32 values at a time, behind a run-time
    check that the two ranges do not overlap; strided, it stays scalar."""
    @intrinsic
    def op(typingctx, dst_t, od_t, src_t, os_t, add_t):
        sig = types.void(dst_t, types.intp, src_t, types.intp, types.boolean)

        def codegen(context, builder, signature, args):
            dst, od, src, os_, add = args
            target = _vector_ptr(context, builder, dst_t, dst, od, lanes)
            value = builder.load(_vector_ptr(context, builder, src_t, src, os_, lanes * step),
                                 align=4)
            if step > 1:
                every = ir.Constant(ir.VectorType(ir.IntType(32), lanes),
                                    [i * step for i in range(lanes)])
                value = builder.shuffle_vector(value, value, every)
            value = builder.select(add, builder.fadd(builder.load(target, align=4), value), value)
            builder.store(value, target, align=4)
            return context.get_dummy_value()
        return sig, codegen
    return op


@intrinsic
def _transposed8(typingctx, dst_t, od_t, ld_t, src_t, os_t, cols_t, oc_t):
    """dst[od + r*ld + l] = src[cols[oc + l] + os + r] for r, l < 8: eight runs of 8 adjacent
    values (a column's channels in a channels-last input) loaded as vectors and stored
    transposed (rows of 8 columns), by the 8x8 transpose's three rounds of shuffles (the
    packed path's gather from a channels-last input: value by value, a 3x3 layer 256 -> 256 at
    8x8, batch 16, took 1.08x as long)."""
    sig = types.void(dst_t, types.intp, types.intp, src_t, types.intp, cols_t, types.intp)

    def codegen(context, builder, signature, args):
        dst, od, ld, src, os_, cols, oc = args
        ptr, const, _ = _codegen_helpers(context, builder)
        vec8 = ir.VectorType(ir.FloatType(), 8)
        cp = ptr(cols_t, cols, oc)
        rows = [builder.load(builder.bitcast(
            ptr(src_t, src, builder.add(builder.load(builder.gep(cp, [const(l)])), os_)),
            vec8.as_pointer()), align=4) for l in range(8)]

        def shuffle(a, b, mask):
            return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(ir.IntType(32), 8),
                                                            mask))
        # pairs of rows interleaved, then pairs of pairs, then halves: channel j's 8 values
        t = [shuffle(rows[2 * i], rows[2 * i + 1], m) for i in range(4)
             for m in ([0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15])]
        u = [shuffle(t[4 * h + i], t[4 * h + i + 2], m) for h in range(2) for i in range(2)
             for m in ([0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15])]
        out = [shuffle(u[j % 4], u[4 + j % 4], [0, 1, 2, 3, 8, 9, 10, 11] if j < 4
                       else [4, 5, 6, 7, 12, 13, 14, 15]) for j in range(8)]
        base = ptr(dst_t, dst, od)
        for j, v in enumerate(out):
            d = builder.gep(base, [builder.mul(const(j), ld)])
            builder.store(v, builder.bitcast(d, vec8.as_pointer()), align=4)
        return context.get_dummy_value()
    return sig, codegen


_vec8, _vec4, _evens8, _evens4 = (_vector_op(8), _vector_op(4), _vector_op(8, 2),
                                  _vector_op(4, 2))


@njit(inline="always")
def _run(dst, od, src, os_, n, add, step=1):
    """dst[od:od + n] = src[os_:os_ + n*step:step], or += when add: vectors of 8, one of 4, then
    values (short rows: B's rows packed, the shifted adds of kn2row, the rows of a padded
    plane); step 2 (a stride-2 conv's phase planes): vectors of 8 from 16 loaded values while
    those lie in src (stride 2 by values took 4x as long as stride 1)."""
    q = 0
    if step == 2:
        while q + 8 <= n and os_ + 2 * q + 16 <= src.size:
            _evens8(dst, od + q, src, os_ + 2 * q, add)
            q += 8
    elif step == 1:
        while q + 8 <= n:
            _vec8(dst, od + q, src, os_ + q, add)
            q += 8
        if q + 4 <= n:
            _vec4(dst, od + q, src, os_ + q, add)
            q += 4
    for u in range(q, n):
        v = src[np.uintp(os_ + u * step)]
        dst[np.uintp(od + u)] = dst[np.uintp(od + u)] + v if add else v


# (rows, columns) of the direct conv's two tiles, wide and narrow, and the narrow one's time per
# position against the wide one's (measured on VGG-16's 3x3 layers at batch 16): with AVX-512's
# 32 registers 3 x 4 and 4 x 2 positions (24 and 16 accumulators; the narrow 1-3% slower);
# with 16 registers 1 x 4 and 3 x 2 (8 and 12 accumulators: the 1 x 4 tile's 8 FMA chains do
# not hide the FMA latency, and the 3 x 2 ran 7-25% faster on AVX2, Zen 3)
DIRECT_TILES, DIRECT_NARROW_COST = ((((3, 4), (4, 2)), 1.03) if MR == 12
                                   else (((1, 4), (3, 2)), 0.88))
# each tile's kernels: plain, streamed (prefetching the weights), grouped (channel-blocked taps)
((_direct_wide, _direct_wide_streamed, _direct_wide_grouped),
 (_direct_narrow, _direct_narrow_streamed, _direct_narrow_grouped)) = (
    [_direct_micro(NY, TX, streamed, group)
     for streamed, group in ((False, 1), (True, 1), (False, CHANNEL_BLOCK))]
    for NY, TX in DIRECT_TILES)


@njit(cache=True)
def _pack_b(tb, b, ob, ldb, k0, kc, j0, nc, bp):
    """bp[(t*kc + p)*NR + q] = B[k0 + p, j0 + t*NR + q] (0 past column j0 + nc), B[l, j] being
    b[ob + l*ldb + j], or b[ob + j*ldb + l] when tb."""
    tiles = (nc + NR - 1) // NR
    for t in range(tiles):
        w = min(NR, nc - t * NR)
        for p in range(kc):
            d = bp[(t * kc + p) * NR:(t * kc + p + 1) * NR]
            if tb:
                for q in range(w):
                    d[q] = b[ob + (j0 + t * NR + q) * ldb + k0 + p]
            else:
                _run(bp, (t * kc + p) * NR, b, ob + (k0 + p) * ldb + j0 + t * NR, w, False)
            for q in range(w, NR):
                d[q] = 0.0


@njit(cache=True)
def _pack_a(a, oa, lda, i0, mc, k0, kc, ap):
    """ap[(s*kc + p)*MR + i] = A[i0 + s*MR + i, k0 + p] (0 past row i0 + mc), A[r, l] being
    a[oa + r*lda + l]."""
    panels = (mc + MR - 1) // MR
    for s in range(panels):
        h = min(MR, mc - s * MR)
        d = ap[s * kc * MR:(s + 1) * kc * MR]
        for i in range(h):
            src = a[oa + (i0 + s * MR + i) * lda + k0:oa + (i0 + s * MR + i) * lda + k0 + kc]
            for p in range(kc):
                d[p * MR + i] = src[p]
        for i in range(h, MR):
            for p in range(kc):
                d[p * MR + i] = 0.0


def pack_size(m: int, n: int, k: int) -> int:
    """Values of the packing scratch sgemm needs for an m x n x k product (or any smaller)."""
    kc = min(KC, max(k, 1))
    return kc * (min(NC, -(-n // NR) * NR) + min(MC, -(-m // MR) * MR)) + MR * NR


@njit(cache=True)
def sgemm(tb, m, n, k, a, oa, lda, b, ob, ldb, c, oc, ldc, pack, packed_a=None):
    """Row-major C = A @ B over flat float32 arrays, single-threaded:
    c[oc + i*ldc + j] = sum_l a[oa + i*lda + l] * B[l, j] for i < m, j < n, where B[l, j] is
    b[ob + l*ldb + j], or b[ob + j*ldb + l] when tb (B stored transposed). pack: the caller's
    scratch for the packed panels, at least pack_size(m, n, k) values (when this allocated them,
    they page-faulted on every call: the heap gives large blocks back to the OS).
    packed_a: A already packed by pack_rows (a weight called with image after image: its
    packing took 7% of a 225 x 128 x 256 product), read instead of a."""
    if m <= 0 or n <= 0:
        return
    if k <= 0:
        for i in range(m):
            c[oc + i * ldc:oc + i * ldc + n] = 0.0
        return
    kcmax = min(KC, k)
    ncmax = min(NC, (n + NR - 1) // NR * NR)
    mcmax = min(MC, (m + MR - 1) // MR * MR)
    bp = pack[:kcmax * ncmax]
    ap = pack[kcmax * ncmax:kcmax * (ncmax + mcmax)]
    tile = pack[kcmax * (ncmax + mcmax):kcmax * (ncmax + mcmax) + MR * NR]
    for j0 in range(0, n, NC):
        nc = min(NC, n - j0)
        for k0 in range(0, k, KC):
            kc = min(KC, k - k0)
            add = k0 > 0
            _pack_b(tb, b, ob, ldb, k0, kc, j0, nc, bp)
            for i0 in range(0, m, MC):
                mc = min(MC, m - i0)
                if packed_a is None:
                    _pack_a(a, oa, lda, i0, mc, k0, kc, ap)
                for t in range((nc + NR - 1) // NR):
                    w = min(NR, nc - t * NR)
                    for s in range((mc + MR - 1) // MR):
                        h = min(MR, mc - s * MR)
                        o = oc + (i0 + s * MR) * ldc + j0 + t * NR
                        whole = h == MR and w == NR
                        dst, od, ld = (c, o, ldc) if whole else (tile, 0, NR)
                        if packed_a is None:
                            _micro(kc, ap, s * kc * MR, bp, t * kc * NR, None, 0, dst, od, ld,
                                   add and whole)
                        else:
                            _micro(kc, packed_a, ((i0 // MR + s) * k + k0) * MR, bp, t * kc * NR,
                                   None, 0, dst, od, ld, add and whole)
                        if not whole:
                            for i in range(h):
                                d = c[o + i * ldc:o + i * ldc + w]
                                src = tile[i * NR:i * NR + w]
                                if add:
                                    for q in range(w):
                                        d[q] += src[q]
                                else:
                                    for q in range(w):
                                        d[q] = src[q]


def sgemm_reference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a (m, k) @ b (k, n) in float64, rounded to float32: what sgemm approximates."""
    return (a.astype(np.float64) @ b.astype(np.float64)).astype(np.float32)


def pack_rows(w: np.ndarray, k_pad: int = 0) -> np.ndarray:
    """w (m, k) as MR-tall micro-panels over all of k, for the kernels that keep a weight packed:
    (ceil(m/MR) * max(k, k_pad) * MR) with [(s*K + p)*MR + i] = w[s*MR + i, p], zero past row m
    and past column k (K = max(k, k_pad))."""
    m, k = w.shape
    K = max(k, k_pad)
    panels = -(-m // MR)
    out = np.zeros((panels * MR, K), np.float32)
    out[:m, :k] = w
    return np.ascontiguousarray(out.reshape(panels, MR, K).transpose(0, 2, 1)).ravel()


def pack_cols(w: np.ndarray) -> np.ndarray:
    """w (n, k) as NR-wide panels of its transpose over all of k, the direct conv's weights:
    (ceil(n/NR) * k * NR) with [(t*k + p)*NR + j] = w[t*NR + j, p], zero past row n."""
    n, k = w.shape
    panels = -(-n // NR)
    out = np.zeros((panels * NR, k), np.float32)
    out[:n] = w
    return np.ascontiguousarray(out.reshape(panels, NR, k).transpose(0, 2, 1)).ravel()

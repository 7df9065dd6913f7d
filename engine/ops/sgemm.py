"""The engine's own single-threaded float32 GEMM: C = A @ B over flat row-major arrays, for the
GEMM-shaped kernels (ops/gemm.py) to call from inside their Numba-parallel tasks.

Why not BLAS: the OpenBLAS that SciPy ships picks its kernels by CPU at run time and may be told
to use older ones (OPENBLAS_CORETYPE); on AVX-512 machines that halves the rate. This GEMM is
written for the machine Numba compiles on: the register tile is MR x NR values, NR = two SIMD
vectors of the widest width the host has (16 floats with AVX-512, 8 with AVX, else 4).

Structure (GotoBLAS / BLIS): for each block of KC rows of B and NC of its columns, B is packed
into NR-wide micro-panels (kc, NR), zero-padded at the right; for each block of MC rows of A, A
is packed into MR-tall micro-panels (kc, MR); the micro-kernel multiplies one A micro-panel by one
B micro-panel into MR x NR accumulators held in registers (`_micro`, LLVM IR written with
llvmlite: fused multiply-adds on whole vectors, the broadcast of A folded in) and stores or adds
them to C. Partial tiles go through a small tile buffer.

Rounding: every C element is a sum over k in increasing order, in blocks of KC, each block's sum
added to C (c = c + s); the result does not depend on threads or on where C's tiles fall.

`sgemm_reference` is the plain NumPy definition the kernel is tested against.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
import llvmlite.binding as llvm
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic


def _host_vector_width() -> int:
    """float32 lanes of the widest SIMD registers the host has (Numba compiles for the host)."""
    features = llvm.get_host_cpu_features()
    if features.get("avx512f"):
        return 16
    if features.get("avx"):
        return 8
    return 4


VW = _host_vector_width()
NR = 2 * VW                     # register tile columns: two vectors
MR = 12 if VW == 16 else 6      # register tile rows: 2*MR accumulators (32 / 16 registers)
KC = 256                        # rows of B per packed block: one B micro-panel (KC, NR) in L1
MC = 120                        # rows of A per packed block (MC, KC) in L2
NC = 2048                       # columns of B per packed block


@intrinsic
def _micro(typingctx, k_t, a_t, oa_t, b_t, ob_t, boff_t, obf_t, c_t, oc_t, ldc_t, add_t):
    """c[oc + i*ldc + j] (+= when add) sum_p a[oa + p*MR + i] * b[ob + boff[obf + p] + j] for
    i < MR, j < NR, p < k: the register tile, 2*MR vector accumulators, one FMA per (i, vector,
    p). B's rows are NR contiguous values anywhere in b (boff: p*NR for a packed micro-panel,
    the taps' offsets when the conv reads its input in place)."""
    sig = types.void(types.intp, a_t, types.intp, b_t, types.intp, boff_t, types.intp, c_t,
                     types.intp, types.intp, types.boolean)

    def codegen(context, builder, signature, args):
        k, a, oa, b, ob, boff, obf, c, oc, ldc, add = args
        intp = context.get_value_type(types.intp)
        vec = ir.VectorType(ir.FloatType(), VW)
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec] * 3),
                                             f"llvm.fma.v{VW}f32")

        def ptr(arr_t, arr, off):
            return builder.gep(context.make_array(arr_t)(context, builder, arr).data, [off])

        def const(v):
            return ir.Constant(intp, v)

        ap, bp, cp = ptr(a_t, a, oa), ptr(b_t, b, ob), ptr(c_t, c, oc)
        op = ptr(boff_t, boff, obf)
        entry = builder.block
        head = builder.append_basic_block("micro.head")
        body = builder.append_basic_block("micro.body")
        tail = builder.append_basic_block("micro.tail")
        builder.branch(head)
        builder.position_at_end(head)
        p = builder.phi(intp)
        p.add_incoming(const(0), entry)
        acc = []
        for _ in range(2 * MR):
            phi = builder.phi(vec)
            phi.add_incoming(ir.Constant(vec, None), entry)
            acc.append(phi)
        builder.cbranch(builder.icmp_signed("<", p, k), body, tail)

        builder.position_at_end(body)
        row = builder.gep(bp, [builder.load(builder.gep(op, [p]))])
        bv = [builder.load(builder.bitcast(builder.gep(row, [const(v * VW)]), vec.as_pointer()),
                           align=4) for v in range(2)]
        zeros = ir.Constant(ir.VectorType(ir.IntType(32), VW), [0] * VW)
        undef = ir.Constant(vec, ir.Undefined)
        new = []
        for i in range(MR):
            s = builder.load(builder.gep(ap, [builder.add(builder.mul(p, const(MR)), const(i))]))
            splat = builder.shuffle_vector(
                builder.insert_element(undef, s, ir.Constant(ir.IntType(32), 0)), undef, zeros)
            new += [builder.call(fma, [splat, bv[v], acc[2 * i + v]]) for v in range(2)]
        p.add_incoming(builder.add(p, const(1)), body)
        for phi, value in zip(acc, new):
            phi.add_incoming(value, body)
        builder.branch(head)

        builder.position_at_end(tail)
        dst = [builder.bitcast(builder.gep(cp, [builder.add(builder.mul(const(i), ldc),
                                                            const(v * VW))]), vec.as_pointer())
               for i in range(MR) for v in range(2)]
        with builder.if_else(add) as (then, otherwise):
            with then:
                for d, s in zip(dst, acc):
                    builder.store(builder.fadd(builder.load(d, align=4), s), d, align=4)
            with otherwise:
                for d, s in zip(dst, acc):
                    builder.store(s, d, align=4)
        return context.get_dummy_value()

    return sig, codegen


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
                s = b[ob + (k0 + p) * ldb + j0 + t * NR:ob + (k0 + p) * ldb + j0 + t * NR + w]
                for q in range(w):
                    d[q] = s[q]
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


@njit(cache=True)
def sgemm(tb, m, n, k, a, oa, lda, b, ob, ldb, c, oc, ldc):
    """Row-major C = A @ B over flat float32 arrays, single-threaded:
    c[oc + i*ldc + j] = sum_l a[oa + i*lda + l] * B[l, j] for i < m, j < n, where B[l, j] is
    b[ob + l*ldb + j], or b[ob + j*ldb + l] when tb (B stored transposed)."""
    if m <= 0 or n <= 0:
        return
    if k <= 0:
        for i in range(m):
            c[oc + i * ldc:oc + i * ldc + n] = 0.0
        return
    kcmax = min(KC, k)
    ncmax = min(NC, (n + NR - 1) // NR * NR)
    mcmax = min(MC, (m + MR - 1) // MR * MR)
    bp = np.empty(kcmax * ncmax, np.float32)
    ap = np.empty(kcmax * mcmax, np.float32)
    tile = np.empty(MR * NR, np.float32)
    rows = np.arange(kcmax) * NR                # B micro-panel row offsets
    for j0 in range(0, n, NC):
        nc = min(NC, n - j0)
        for k0 in range(0, k, KC):
            kc = min(KC, k - k0)
            add = k0 > 0
            _pack_b(tb, b, ob, ldb, k0, kc, j0, nc, bp)
            for i0 in range(0, m, MC):
                mc = min(MC, m - i0)
                _pack_a(a, oa, lda, i0, mc, k0, kc, ap)
                for t in range((nc + NR - 1) // NR):
                    w = min(NR, nc - t * NR)
                    for s in range((mc + MR - 1) // MR):
                        h = min(MR, mc - s * MR)
                        o = oc + (i0 + s * MR) * ldc + j0 + t * NR
                        if h == MR and w == NR:
                            _micro(kc, ap, s * kc * MR, bp, t * kc * NR, rows, 0, c, o, ldc, add)
                        else:
                            _micro(kc, ap, s * kc * MR, bp, t * kc * NR, rows, 0, tile, 0, NR, False)
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

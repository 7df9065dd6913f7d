"""Every fast path added for speed, held to its reference: the engine's sgemm, the GEMM conv
kernels (packed gather and grid modes, per-image and batched splits, im2col and kn2row, fused
epilogue), linear, 2x2 max pooling, global average pooling, the plan's residual-add fusion and
the single-threaded BLAS setting."""
import contextlib
import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from threadpoolctl import threadpool_info

import engine
from engine import format as fmt
from engine import timing
from engine.graph import Graph, Node, TensorSpec
from engine.ops import OPS, gemm, load_all, sgemm
from engine.ops.activation import apply_act
from engine.ops.conv import basis_conv2d_fast, conv2d_fast, conv_out_hw

load_all()
ROOT = Path(__file__).resolve().parents[1]
ACTS = [None, ("relu",), ("clip", -0.5, 0.7), ("leaky_relu", 0.1), ("sigmoid",)]


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def conv_node(w, b, stride, pad, dil, groups, mode="zeros"):
    weights = {"weight": w} | ({"bias": b} if b is not None else {})
    return Node("n", "conv2d", ["x"], {"stride": list(stride), "padding": list(pad), "dilation": list(dil),
                                       "groups": groups, "padding_mode": mode}, weights)


def basis_node(basis, combine, b, stride, pad, dil, groups, mode="zeros"):
    weights = {"basis": basis, "combine": combine} | ({"bias": b} if b is not None else {})
    return Node("n", "basis_conv2d", ["x"], {"stride": list(stride), "padding": list(pad),
                                             "dilation": list(dil), "groups": groups, "padding_mode": mode,
                                             "rank": combine.shape[1]}, weights)


def close(got, want, scale=None):
    assert got.shape == want.shape and got.dtype == np.float32 and got.flags.c_contiguous
    scale = np.abs(want).max() if scale is None else scale
    assert np.abs(got - want).max() <= 2e-5 * scale


# B, C, N, H, W, kh, kw, stride, padding [t, l, b, r], dilation, groups
CASES = [
    (1, 3, 8, 13, 11, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),     # batched, 'same'
    (2, 4, 6, 13, 11, 3, 2, (2, 1), (0, 1, 1, 0), (1, 1), 2),     # grouped, strided
    (3, 5, 7, 20, 17, 2, 3, (2, 2), (1, 0, 0, 2), (2, 1), 1),     # dilated, asymmetric padding
    (2, 16, 32, 20, 20, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),   # per image
    (1, 16, 32, 20, 20, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1),   # packed, 1x1
    (1, 16, 32, 20, 20, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 2),   # per image, grouped 1x1 direct
    (5, 16, 32, 20, 20, 1, 1, (2, 2), (0, 0, 0, 0), (1, 1), 4),   # 1x1 stride 2, grouped
    (4, 32, 24, 4, 4, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),     # batched, split by columns
    (1, 64, 96, 2, 2, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),     # direct, few outputs per weight
    (1, 24, 96, 4, 8, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),     # basis: streamed, 2 tiles (AVX2)
    (1, 8, 4, 40, 40, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),     # per image, 2 bands
    (2, 8, 8, 9, 10, 3, 3, (1, 1), (1, 0, 2, 1), (2, 1), 2),
    (1, 12, 6, 30, 31, 3, 2, (1, 1), (2, 1, 0, 1), (2, 2), 2),
    (2, 32, 40, 30, 30, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),   # packed grid, K > KC
    (1, 32, 13, 60, 60, 3, 3, (1, 1), (2, 2, 2, 2), (2, 2), 1),   # packed grid, dilated, 1 image
    (2, 40, 64, 4, 4, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),     # direct, weight-bound
    (3, 30, 50, 13, 17, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1), 1),   # packed gather, strided
    (1, 64, 64, 12, 12, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),   # direct, wide tiles
    (2, 16, 32, 10, 16, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),   # ... each panel read by many
    (2, 16, 32, 10, 20, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),   # ... channel-blocked
    (1, 128, 64, 32, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),  # direct, bands of an image
    (2, 64, 32, 8, 8, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1),     # direct, x read in place
    (1, 64, 96, 4, 4, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),     # direct, panels split
    (2, 24, 64, 16, 15, 3, 3, (2, 2), (1, 0, 1, 2), (1, 1), 1),   # direct, stride phases
    (2, 16, 64, 15, 16, 3, 3, (1, 1), (2, 1, 2, 1), (2, 1), 1),   # direct, dilated
    (4, 36, 40, 14, 14, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),   # direct, basis grid, 2 images
    (4, 36, 40, 32, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),   # ... the output's positions
    (2, 3, 20, 16, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),    # ... a conv's, part strip
    (1, 3, 24, 32, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),    # ... a conv's, in bands
    (2, 36, 24, 14, 14, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),   # basis grid, whole strips
    (1, 8, 24, 28, 1, 3, 2, (1, 1), (1, 0, 0, 2), (2, 2), 1),     # a tap reading padding only
    (2, 3, 24, 16, 16, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),    # direct conv over the grid
    (2, 3, 24, 90, 90, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),    # direct conv over the grid, bands
    (1, 40, 32, 15, 31, 5, 2, (3, 1), (0, 0, 2, 0), (2, 1), 1),   # direct, batch 1: an image's band
    (1, 16, 96, 9, 9, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),     # packed, rows split (16 registers)
    # basis: streamed (NR/2 < outputs <= 2*NR: one tile of 16 positions with 8-wide vectors,
    # 24 with 16, 8 with 4; two tiles of 24-32, 48, 16)
    (1, 72, 40, 4, 4, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),
    (3, 16, 24, 4, 4, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),
    (4, 20, 30, 6, 5, 3, 2, (2, 2), (1, 0, 0, 1), (1, 2), 1),
    (2, 16, 24, 2, 2, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),
    (1, 1, 8, 4, 5, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),       # fewer channels than threads
    (1, 5, 8, 4, 5, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),       # channels split unevenly
    # whole tiles copied in runs of 8 or 4 columns, and a part tile (basis: streamed; conv and
    # the last two's bases: packed)
    (1, 12, 16, 3, 8, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),
    (1, 16, 24, 3, 4, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),
    (1, 20, 40, 9, 12, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),
    (1, 16, 32, 9, 8, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),
    (1, 16, 32, 11, 10, 3, 3, (1, 1), (0, 0, 0, 0), (1, 1), 1),  # (unpadded: in order)
    # basis: split by K (B*H' rows and W' columns in one direct tile; and the 2x2 case above)
    (3, 40, 24, 3, 3, 3, 3, (2, 2), (0, 0, 0, 0), (1, 1), 1),     # 3 images of 1x1, strided
    (1, 24, 40, 1, 4, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),     # one row of 4: the wide tile
    (4, 16, 24, 1, 1, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),     # 4 rows: AVX-512's narrow tile
    # stride 2: runs of 8 and 4 columns gathered from every other value, the last one ending
    # at the input's last value (2x2 taps, unpadded: read in place); the input grid's phases
    (2, 16, 24, 32, 32, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1), 1),
    (5, 24, 40, 8, 8, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1), 1),
    (3, 8, 24, 16, 16, 2, 2, (2, 2), (0, 0, 0, 0), (1, 1), 1),
    # packed, columns sorted by the taps they read inside the input (column_order): strided;
    # tiles of positions whose taps all read padding; a batch split by output rows
    (8, 24, 32, 8, 8, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1), 1),
    (2, 16, 24, 4, 4, 1, 1, (1, 1), (2, 2, 2, 2), (1, 1), 1),
    (16, 16, 96, 2, 2, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),
]


@contextlib.contextmanager
def direct_everywhere(forced=True):
    """Plans made (when forced) as if the direct conv beat the packed path for every conv and
    basis conv, as with AVX-512's registers, so that its modes are tested whatever the host."""
    saved = gemm.direct_beats_packed
    if forced:
        gemm.direct_beats_packed = lambda *args: True
    gemm.planned.cache_clear()
    try:
        yield
    finally:
        gemm.direct_beats_packed = saved
        gemm.planned.cache_clear()


@pytest.mark.parametrize("forced", [False, True], ids=["planned", "direct everywhere"])
@pytest.mark.parametrize("case", CASES)
def test_conv_gemm_matches_reference(case, forced):
    B, C, N, H, W, kh, kw, stride, pad, dil, g = case
    x, w, b = rand(B, C, H, W), rand(N, C // g, kh, kw, seed=1), rand(N, seed=2)
    want = OPS["conv2d"].reference(conv_node(w, b, stride, pad, dil, g), x)
    res = rand(*want.shape, seed=3)
    with direct_everywhere(forced):
        for act in ACTS:
            for r in (None, res):
                got = conv2d_fast(x, w, b, stride, pad, dil, g, "zeros", act, r)
                exp = want if r is None else want + r
                close(got, apply_act(exp.copy(), act) if act else exp, np.abs(exp).max())
        close(conv2d_fast(x, w, None, stride, pad, dil, g, "zeros"),
              OPS["conv2d"].reference(conv_node(w, None, stride, pad, dil, g), x))


@pytest.mark.parametrize("forced", [False, True], ids=["planned", "direct everywhere"])
@pytest.mark.parametrize("case", CASES)
def test_basis_conv_matches_reference(case, forced):
    B, C, N, H, W, kh, kw, stride, pad, dil, g = case
    for M in basis_ranks(C, g):
        x, basis, comb = rand(B, C, H, W), rand(g * M, C // g, kh, kw, seed=1), rand(N, M, seed=2)
        b = rand(N, seed=3)
        want = OPS["basis_conv2d"].reference(basis_node(basis, comb, b, stride, pad, dil, g), x)
        res = rand(*want.shape, seed=4)
        with direct_everywhere(forced):
            got = basis_conv2d_fast(x, basis, comb, b, stride, pad, dil, g, "zeros", ("relu",), res)
            close(got, np.maximum(want + res, 0), np.abs(want + res).max())
            close(basis_conv2d_fast(x, basis, comb, None, stride, pad, dil, g, "zeros"),
                  OPS["basis_conv2d"].reference(
                      basis_node(basis, comb, None, stride, pad, dil, g), x))


def test_random_shapes_match_reference():
    """Random conv and basis-conv shapes (strides, dilations, uneven padding, batch 1 to 4, odd
    channel counts) against the references: plans pick each path from shapes, so random ones
    reach corners the CASES do not (a batch-1 band as tall as its image once overran its
    scratch)."""
    rng = np.random.default_rng(7)
    for _ in range(150):
        B, C = int(rng.integers(1, 5)), int(rng.choice([1, 3, 8, 16, 24, 40, 64]))
        N = int(rng.choice([1, 5, 12, 16, 24, 33, 36, 64]))
        kh, kw, sh, sw, dh, dw = (int(v) for v in rng.integers(1, [6, 6, 4, 4, 3, 3]))
        pad = tuple(int(v) for v in rng.integers(0, 3, 4))
        H, W = (int(v) for v in rng.integers(1, 30, 2))
        if H + pad[0] + pad[2] < (kh - 1) * dh + 1 or W + pad[1] + pad[3] < (kw - 1) * dw + 1:
            continue
        M = None if rng.random() < 0.5 else int(rng.integers(1, 2 * C + 2))
        x, b = rand(B, C, H, W), rand(N, seed=2)
        args = ((sh, sw), pad, (dh, dw), 1, "zeros")
        if M is None:
            w = rand(N, C, kh, kw, seed=1)
            got = conv2d_fast(x, w, b, *args, ("relu",))
            want = OPS["conv2d"].reference(conv_node(w, b, *args[:4]), x)
        else:
            basis, comb = rand(M, C, kh, kw, seed=1), rand(N, M, seed=3)
            got = basis_conv2d_fast(x, basis, comb, b, *args, ("relu",))
            want = OPS["basis_conv2d"].reference(basis_node(basis, comb, b, *args[:4]), x)
        close(got, np.maximum(want, 0), np.abs(want).max())


def basis_ranks(C, g):
    """The basis ranks the basis test tries: kn2row (M < C/G) and im2col."""
    return sorted({1, max(1, C // g // 3), C // g + 1})


def test_cases_cover_every_conv_path():
    """The CASES above, as convs and as basis convs, planned for this host and with the direct
    conv everywhere (as the conv test runs them), reach each conv path and mode (so the tests
    cannot drift off one)."""
    seen = set()
    for (B, C, N, H, W, kh, kw, stride, pad, dil, g), forced in itertools.product(CASES, [0, 1]):
        ho, wo = conv_out_hw(H, W, kh, kw, stride, pad, dil)
        for M in [None] + basis_ranks(C, g):
            with direct_everywhere(forced):
                plan = gemm.plan_conv((B, C, H, W), N, kh, kw, ho, wo, stride, pad, dil, g, M)
            if plan.how == "direct":
                narrow, per_block, parts, copy, grid1, cb = plan.split
                seen |= {("direct", ("wide", "narrow")[narrow]), ("direct", "parts", parts > 1),
                         ("direct", "copy", copy), ("direct", "bands", per_block < ho),
                         ("direct", "stride", stride != (1, 1)), ("direct", "basis", bool(M)),
                         ("direct", "channel block", cb)}
                if not grid1:           # the tile's kernel (_direct_row)
                    seen.add(("direct", ("wide", "narrow")[narrow],
                              "streamed" if gemm._streamed(narrow, per_block, wo)
                              else "grouped" if cb == gemm.CHANNEL_BLOCK else "plain"))
                if grid1:
                    # (the output's positions alone, W' a multiple of NR: its whole strips of
                    # MR channels straight into the output, a part strip through the stage)
                    seen.add(("direct", "grid1" if M else "grid conv", "images" if per_block > ho
                              else "bands" if per_block < ho else "image",
                              "output grid" if wo % gemm.NR == 0 else "wide grid"))
                    seen.add(("direct", "grid1" if M else "grid conv", "part strip",
                              N % gemm.MR != 0, wo % gemm.NR == 0))
                    seen.add(("direct", "grid1" if M else "grid conv", "stride", stride))
            elif plan.how == "packed":
                seen.add(("grid" if plan.grid else "gather", plan.split[1] > 1))
                if plan.split[2]:
                    rows = gemm.column_order(B, H, W, C, ho, wo, kh, kw, stride, pad, dil,
                                             gemm.threads() if plan.split[1] == 1 else 1)[1]
                    seen |= {("by taps", "by 8", C % 8 == 0), ("by taps", "stride", stride),
                             ("by taps", "parts", plan.split[1] > 1), ("by taps", "basis", bool(M)),
                             ("by taps", "no tap", bool((rows[:, 2] == 0).any()))}
                elif not plan.grid:
                    seen.add(("gather", "run", gemm._column_run(stride[1], wo),
                              B * ho * wo % gemm.NR != 0))
                    seen.add(("gather", "run", gemm._column_run(stride[1], wo), "stride",
                              stride[1]))
            elif plan.how == "split_k":
                seen.add(("split_k", ("wide", "narrow")[plan.split[0]]))
            elif plan.how == "streamed":
                seen.add(("streamed", "tiles", -(-B * ho * wo // gemm.NR)))
                seen.add(("streamed", "run", gemm._column_run(stride[1], wo),
                          B * ho * wo % gemm.NR != 0))
            else:
                seen.add(plan.how)
    # (packed by rows: plain convs, with 16 registers; with 32 they run direct)
    assert {"image", "batched", ("streamed", "tiles", 1), ("streamed", "tiles", 2),
            ("grid", False), ("gather", False),
            ("gather", gemm.MR != 12), ("split_k", "wide"), ("split_k", "narrow"),
            ("direct", "wide"), ("direct", "narrow"), ("direct", "parts", True),
            ("direct", "copy", False), ("direct", "bands", True), ("direct", "stride", True),
            ("direct", "basis", True), ("direct", "channel block", 1),
            *{("direct", tile, kind) for tile in ("wide", "narrow")
              for kind in ("plain", "streamed", "grouped")},
            ("direct", "channel block", gemm.CHANNEL_BLOCK),
            *{("direct", "grid1", blocks, grid) for blocks in ("images", "bands", "image")
              for grid in ("output grid", "wide grid")},
            *{("direct", "grid conv", blocks, grid) for blocks in ("bands", "image")
              for grid in ("output grid", "wide grid")},
            *{("direct", kind, "part strip", part, grid) for kind in ("grid1", "grid conv")
              for part in (False, True) for grid in (False, True)},
            ("direct", "grid1", "stride", (2, 2)), ("direct", "grid conv", "stride", (2, 2)),
            ("gather", "run", 8, "stride", 2), ("gather", "run", 4, "stride", 2),
            *{("by taps", kind, value) for kind in ("by 8", "parts", "basis", "no tap")
              for value in (False, True)},
            ("by taps", "stride", (1, 1)), ("by taps", "stride", (2, 2))} <= seen
    # _pack_cols: whole tiles copied in runs of 8 and 4 columns, part tiles gathered
    assert {(how, "run", run, part) for how in ("gather", "streamed") for run in (8, 4)
            for part in (False, True)} <= seen, sorted(str(k) for k in seen if "run" in k)


@pytest.mark.parametrize("m,n,k,tb", [(1, 1, 1, False), (12, 32, 256, False), (13, 33, 257, True),
                                      (5, 70, 600, False), (130, 40, 3, True), (7, 2100, 9, False),
                                      (4, 5, 0, False)])
@pytest.mark.parametrize("prepacked", [False, True])
def test_sgemm_matches_reference(m, n, k, tb, prepacked):
    """Edges of every blocking (MR, NR, KC, MC, NC), offsets and leading dimensions past the
    matrix, A packed by the call or before (pack_rows); C outside its m x n window is left
    alone, and so is the packing scratch past pack_size."""
    a = rand(2 + m * (k + 3))                                   # offset 2, lda = k + 3
    rows, ldb = (n, k + 1) if tb else (k, n + 2)
    b = rand(1 + rows * ldb, seed=1)                            # offset 1
    c = np.full((m + 1, n + 4), 7.0, np.float32)                # offset ldc + 1, ldc = n + 4
    pack = np.full(sgemm.pack_size(m, n, k) + 64, 5.0, np.float32)
    packed_a = sgemm.pack_rows(a[2:].reshape(m, k + 3)[:, :k]) if prepacked else None
    sgemm.sgemm(tb, m, n, k, a, 2, k + 3, b, 1, ldb, c.ravel(), n + 5, n + 4, pack, packed_a)
    assert (pack[-64:] == 5).all()
    bm = b[1:].reshape(rows, ldb)
    bm = bm[:, :k].T if tb else bm[:, :n]
    want = sgemm.sgemm_reference(a[2:].reshape(m, k + 3)[:, :k], bm)
    close(c[1:, 1:n + 1].copy(), want, max(1.0, np.abs(want).max()))
    assert (c[0] == 7).all() and (c[:, 0] == 7).all() and (c[:, n + 1:] == 7).all()


@pytest.mark.parametrize("step", [1, 2])
@pytest.mark.parametrize("add", [False, True])
def test_vector_runs_copy_and_add_exactly_their_values(add, step):
    """sgemm._run (vectors of 8 and 4, or at step 2 of 8 from 16 values, then values) at every
    length mod 8, at odd offsets, up to the source's last value; the values around the
    destination run are left alone."""
    src = rand(64, seed=2)
    for n in range(0, 21):
        for start in (7, 64 - 1 - (n - 1) * step):
            dst = np.full(40, 3.0, np.float32)
            sgemm._run(dst, 5, src, start, n, add, step)
            want = np.full(40, 3.0, np.float32)
            run = src[start:start + n * step:step]
            want[5:5 + n] = (want[5:5 + n] + run) if add else run
            np.testing.assert_array_equal(dst, want)


def guarded_child():
    """Run in a child process: the stride-2 vector reads (sgemm._run, gemm._pack_cols) of rows
    that end at an input's last value, the input placed so that the next page is unreadable:
    a read past it is a crash, not a harmless stray value."""
    import ctypes
    import mmap
    page = mmap.PAGESIZE
    region = mmap.mmap(-1, 2 * page)
    base = ctypes.addressof(ctypes.c_char.from_buffer(region))
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mprotect(ctypes.c_void_p(base + page), page, 0) == 0, ctypes.get_errno()
    src = np.frombuffer(region, np.float32, page // 4, 0)
    src[:] = rand(page // 4)
    for n in (8, 9, 16, 17):
        dst = np.zeros(n, np.float32)
        sgemm._run(dst, 0, src, src.size - 1 - 2 * (n - 1), n, False, 2)
        np.testing.assert_array_equal(dst, src[src.size - 1 - 2 * (n - 1)::2])
    # one image (1, 2, 16, 16) at the page's end, 2x2 taps at stride 2: 8 x 8 outputs
    C, H, wo = 2, 16, 8
    x = src[src.size - C * H * H:]
    colbase = np.array([(q // wo * 2) * H + q % wo * 2 for q in range(64)], np.intp)
    delta = gemm._tap_offsets(C, 2, 2, 1, 1, H, H)
    bp = np.zeros(4 * 8 * delta.size * sgemm.NR // 4, np.float32)
    gemm._pack_cols(x, colbase, delta, 0, delta.size, 64, bp, gemm._column_run(2, wo), 2)
    want = x[colbase[None, :] + delta[:, None]]                 # (K, 64)
    got = bp.reshape(-1, delta.size, sgemm.NR).transpose(1, 0, 2).reshape(delta.size, -1)
    np.testing.assert_array_equal(got[:, :64], want)


def test_strided_vector_reads_stay_inside_the_input():
    """guarded_child in a child process (a read past the input would kill it)."""
    done = subprocess.run([sys.executable, "-c", "import tests.test_fast_paths as t; "
                           "t.guarded_child()"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_packed_rows_layout():
    w = rand(14, 5)
    p = sgemm.pack_rows(w, 8).reshape(-1, 8, sgemm.MR)
    assert p.shape == (-(-14 // sgemm.MR), 8, sgemm.MR)
    np.testing.assert_array_equal(p[1, 3, 1], w[sgemm.MR + 1, 3])
    assert (p[:, 5:] == 0).all() and (p[-1, :, 14 - sgemm.MR * (p.shape[0] - 1):] == 0).all()


@pytest.mark.parametrize("channels_last", [False, True], ids=["planes", "channels last"])
@pytest.mark.parametrize("shape,pad", [((3, 16, 8, 8), (1, 1)), ((2, 24, 16, 16), (1, 1)),
                                       ((2, 8, 4, 16), (2, 0)), ((2, 12, 8, 8), (1, 1)),
                                       ((3, 16, 5, 6), (1, 2))])
def test_pad_input_matches_numpy(shape, pad, channels_last):
    """_pad_input: x zero-padded by pad (top/bottom, left/right) as planes, or channels last
    (in 8 x 8 blocks transposed in registers where C and W are multiples of 8), on 2 threads."""
    B, C, H, W = shape
    x = rand(*shape)
    Hp, Wp = H + 2 * pad[0], W + 2 * pad[1]
    xq = np.full(B * C * Hp * Wp, np.nan, np.float32)
    gemm._pad_input(x, pad[0], pad[1], Hp, Wp, xq, 2, channels_last)
    want = np.pad(x, ((0, 0), (0, 0), (pad[0],) * 2, (pad[1],) * 2))
    if channels_last:
        want = want.transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(xq, want.ravel())


@pytest.mark.parametrize("groups", [1, 2, 3])
@pytest.mark.parametrize("shape", [
    (16, 4, 4, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)),
    (3, 13, 17, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1)),
    (2, 9, 10, 3, 2, (1, 1), (1, 0, 2, 1), (2, 1)),
    (5, 4, 4, 1, 1, (1, 1), (2, 2, 2, 2), (1, 1)),
    (1, 28, 1, 3, 2, (1, 1), (1, 0, 0, 2), (2, 2))])
def test_column_order_skips_only_padding(shape, groups):
    """column_order: a permutation of the output positions, each group's images' apart, each
    tile's runs of (tap, channel) rows holding every tap that reads inside the input for one
    of its columns (the others, skipped, read padding alone), and the fraction the rows that
    the tiles keep, at least taps_inside's."""
    B, H, W, kh, kw, stride, pad, dil = shape
    C, NR = 3, gemm.NR
    ho, wo = conv_out_hw(H, W, kh, kw, stride, pad, dil)
    P = ho * wo
    order, rows, fraction = gemm.column_order(B, H, W, C, ho, wo, kh, kw, stride, pad, dil,
                                              groups)
    assert sorted(order) == list(range(B * P))
    assert (np.diff(order // P * groups // B) >= 0).all()     # group by group
    kept_rows = 0
    for t in range(-(-B * P // NR)):
        first, step, count, length = rows[t]
        kept = {r for i in range(count) for r in range(first + i * step, first + i * step + length)}
        kept_rows += len(kept)
        assert all(0 <= r < kh * kw * C for r in kept)
        for g in order[t * NR:(t + 1) * NR]:
            b, y, x = g // P, g % P // wo, g % P % wo
            for i, j in itertools.product(range(kh), range(kw)):
                inside = (0 <= y * stride[0] - pad[0] + i * dil[0] < H
                          and 0 <= x * stride[1] - pad[1] + j * dil[1] < W)
                if inside:
                    assert {(i * kw + j) * C + c for c in range(C)} <= kept
    assert fraction == kept_rows / (-(-B * P // NR) * kh * kw * C)
    # taps_inside: the taps reading the input, of all (the least a tile can keep)
    inside = sum((0 <= y * stride[0] - pad[0] + i * dil[0] < H)
                 and (0 <= x * stride[1] - pad[1] + j * dil[1] < W)
                 for y, x, i, j in itertools.product(range(ho), range(wo), range(kh), range(kw)))
    assert gemm.taps_inside(H, W, ho, wo, kh, kw, stride, pad, dil) == pytest.approx(
        inside / (P * kh * kw))
    assert fraction >= inside / (P * kh * kw) - 1e-12
    if shape[0] == 16 and groups < 3 and NR == 16:
        # 3x3 'same' at 4x4: 69% of the taps read the input, and so many are kept when whole
        # tiles share them (corners 16 a group); 75% in halves (a tile two corners, 6 taps)
        assert fraction == pytest.approx(100 / 144 if groups == 1 else 0.75)


@pytest.mark.parametrize("C", [5, 24])
def test_skipped_taps_do_not_change_results_across_batches(C):
    """The packed path's tiles skip the taps their columns read in the padding, and which
    those are depends on the batch's other images (column_order); an image's output does
    not: bit-identical at batch 16, 12, 8 and 5 (a dataset run's last batch is short)."""
    x, w, b = rand(16, C, 6, 6), rand(24, C, 3, 3, seed=1), rand(24, seed=2)
    outs = {}
    for B in (16, 12, 8, 5):
        plan = gemm.plan_conv((B, C, 6, 6), 24, 3, 3, 6, 6, (1, 1), (1, 1, 1, 1), (1, 1), 1)
        assert plan.how == "packed" and plan.split[2]
        outs[B] = conv2d_fast(x[:B], w, b, (1, 1), (1, 1, 1, 1), (1, 1), 1, "zeros")
        np.testing.assert_array_equal(outs[B], outs[16][:B])
    close(outs[16], OPS["conv2d"].reference(conv_node(w, b, (1, 1), (1, 1, 1, 1), (1, 1), 1), x))


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_other_padding_modes(mode):
    x, w = rand(2, 6, 9, 8), rand(5, 6, 3, 3, seed=1)
    node = conv_node(w, None, (1, 1), (1, 1, 2, 1), (1, 1), 1, mode)
    close(OPS["conv2d"].run(node, x), OPS["conv2d"].reference(node, x))
    basis, comb = rand(2, 6, 3, 3, seed=2), rand(5, 2, seed=3)
    bnode = basis_node(basis, comb, None, (1, 1), (1, 1, 2, 1), (1, 1), 1, mode)
    close(OPS["basis_conv2d"].run(bnode, x), OPS["basis_conv2d"].reference(bnode, x))


@pytest.fixture
def fresh_plans():
    """Plans made under this test's caps are forgotten before and after it."""
    gemm.planned.cache_clear()
    yield
    gemm.planned.cache_clear()


def test_batch_groups_and_bands(monkeypatch, fresh_plans):
    """Tiny caps: batched convs run in groups of images, per-image convs in many bands."""
    monkeypatch.setattr(gemm, "BATCH_COLS_CAP", 300)
    monkeypatch.setattr(gemm, "COLS_CAP", 500)
    for B, C, N, H, kh in [(5, 4, 6, 6, 3), (3, 4, 5, 18, 3)]:
        x, w, b = rand(B, C, H, H), rand(N, C, kh, kh, seed=1), rand(N, seed=2)
        node = conv_node(w, b, (1, 1), (1, 1, 1, 1), (1, 1), 1)
        close(OPS["conv2d"].run(node, x), OPS["conv2d"].reference(node, x))
        basis, comb = rand(2, C, kh, kh, seed=3), rand(N, 2, seed=4)
        bnode = basis_node(basis, comb, b, (1, 1), (1, 1, 1, 1), (1, 1), 1)
        close(OPS["basis_conv2d"].run(bnode, x), OPS["basis_conv2d"].reference(bnode, x))


def test_broadcast_residual_falls_back():
    x, w = rand(2, 4, 5, 5), rand(3, 4, 3, 3, seed=1)
    r = rand(1, 3, 1, 5, seed=2)                                   # broadcasts to (2, 3, 5, 5)
    want = OPS["conv2d"].reference(conv_node(w, None, (1, 1), (1, 1, 1, 1), (1, 1), 1), x)
    for act in (None, ("relu",)):
        got = conv2d_fast(x, w, None, (1, 1), (1, 1, 1, 1), (1, 1), 1, "zeros", act, r)
        close(got, np.maximum(want + r, 0) if act else want + r)


def test_nan_propagates_through_epilogue():
    x = rand(1, 2, 4, 4)
    x[0, 0, 1, 1] = np.nan
    w = rand(3, 2, 1, 1, seed=1)
    for act in ACTS[:4]:
        got = conv2d_fast(x, w, None, (1, 1), (0, 0, 0, 0), (1, 1), 1, "zeros", act)
        assert np.isnan(got[0, :, 1, 1]).all() and np.isfinite(np.delete(got.reshape(3, 16), 5, 1)).all()


@pytest.mark.parametrize("has_res", [False, True])
def test_epilogue_rows_match_the_unfused_ops(has_res):
    """gemm._finish (vectors of 8, then values) at every row length up to 20, odd
    offsets, each activation code, NaN and -0.0 among the values: bit for bit the float32
    ops it fuses (bias add, residual add, activation); the values around the row untouched."""
    src, res = rand(64, seed=3), rand(64, seed=4)
    src[[5, 14, 23]] = np.nan
    src[[6, 17]] = -0.0
    bias, lo, hi = np.float32(0.25), np.float32(-0.5), np.float32(0.7)
    acts = {0: lambda v: v, 1: lambda v: np.where(v < 0, np.float32(0), v),
            2: lambda v: np.where(v < lo, lo, np.where(v > hi, hi, v)),
            3: lambda v: np.where(v < 0, v * lo, v)}
    for n in range(21):
        for code, act in acts.items():
            dst = np.full(40, 3.0, np.float32)
            gemm._finish(dst, 5, src, 3, n, bias, res, 7, has_res, code, lo, hi)
            v = src[3:3 + n] + bias
            if has_res:
                v = v + res[7:7 + n]
            want = np.full(40, 3.0, np.float32)
            want[5:5 + n] = act(v)
            np.testing.assert_array_equal(dst, want)


def test_im2col_same_path_matches_generic():
    """The stride-1 'same' shifted copy equals the generic per-row copy (wo != W forces it)."""
    x = rand(2, 3, 7, 6)
    for pads, dil in [((1, 1), 1), ((2, 0), 2), ((0, 2), 1)]:
        pt, pl = pads
        kh = kw = 3
        ho, wo = conv_out_hw(7, 6, kh, kw, (1, 1), (pt, pl, pt, pl), (dil, dil))
        got = np.empty(3 * kh * kw * ho * wo, np.float32)
        gemm._im2col(x, 1, 0, 3, kh, kw, 1, 1, dil, dil, pt, pl, 0, ho, wo, got, 0, ho * wo)
        xp = np.pad(x[1], ((0, 0), (pt, pt), (pl, pl)))
        want = np.stack([xp[c, i * dil:i * dil + ho, j * dil:j * dil + wo].ravel()
                         for c in range(3) for i in range(kh) for j in range(kw)])
        np.testing.assert_array_equal(got.reshape(want.shape), want)


def test_linear_gemm():
    x, w, b = rand(2, 3, 200), rand(300, 200, seed=1), rand(300, seed=2)
    r = rand(2, 3, 300, seed=3)
    want = x @ w.T + b
    close(gemm.linear_gemm(x, w, b), want)
    close(gemm.linear_gemm(x, w, b, ("relu",), r), np.maximum(want + r, 0))
    close(gemm.linear_gemm(x[0, :1], w[:5], None), x[0, :1] @ w[:5].T)


@pytest.mark.parametrize("shape", [(2, 3, 8, 6), (1, 2, 7, 5)])
def test_max_pool_2x2(shape):
    x = rand(*shape)
    x[0, 0, 0, 1] = np.nan
    node = Node("p", "max_pool2d", ["x"], {"kernel": [2, 2], "stride": [2, 2], "padding": [0, 0],
                                           "dilation": [1, 1], "ceil_mode": False})
    np.testing.assert_array_equal(OPS["max_pool2d"].run(node, x), OPS["max_pool2d"].reference(node, x))


@pytest.mark.parametrize("out", [[1, 1], [2, 3], [3, 3]])
def test_adaptive_avg_pool_fast(out):
    x = rand(2, 3, 6, 6)
    node = Node("p", "adaptive_avg_pool2d", ["x"], {"output_size": out})
    close(OPS["adaptive_avg_pool2d"].run(node, x), OPS["adaptive_avg_pool2d"].reference(node, x))


def _residual_graph(broadcast=False):
    """conv -> bn -> add(., shortcut) -> relu, the ResNet block shape; the shortcut a 1x1 conv
    (same shape: fusable) or its mean over H (broadcasts: not fusable)."""
    conv = {"stride": [1, 1], "padding": [1, 1, 1, 1], "dilation": [1, 1], "groups": 1, "padding_mode": "zeros"}
    one = dict(conv, padding=[0, 0, 0, 0])
    bn = {"weight": np.full(4, 1.5, np.float32), "bias": np.full(4, 0.1, np.float32),
          "running_mean": np.full(4, 0.2, np.float32), "running_var": np.full(4, 0.8, np.float32)}
    nodes = [Node("sc", "conv2d", ["x"], one, {"weight": rand(4, 3, 1, 1, seed=5)})]
    short = "sc"
    if broadcast:
        nodes.append(Node("scm", "mean", ["sc"], {"dims": [2], "keepdim": True}))
        short = "scm"
    nodes += [Node("c1", "conv2d", ["x"], conv, {"weight": rand(4, 3, 3, 3, seed=1)}),
              Node("b1", "batch_norm", ["c1"], {"eps": 1e-5}, bn),
              Node("add", "add", ["b1", short], {}),
              Node("relu", "relu", ["add"])]
    return Graph([TensorSpec("x", [None, 3, 6, 6])], [("y", "relu")], "tensor", nodes)


def test_residual_add_fused_into_conv():
    model = engine.Model(_residual_graph(), fmt.References())
    fused = [s for s in model.plan.steps if s.residual is not None]
    assert len(model.plan.steps) == 2                          # sc, then c1 + bn + add + relu
    assert len(fused) == 1 and fused[0].node.name == "c1" and fused[0].residual == "sc"
    assert fused[0].act == ("relu",) and fused[0].output == "relu" and "sc" in fused[0].frees
    assert [s.covers for s in model.plan.steps] == [("sc",), ("c1", "b1", "add", "relu")]
    x = rand(3, 3, 6, 6)
    close(model(x), model.activations(x, kernels="reference")["relu"])
    steps = model.profile(x, calls=3)                          # Model.profile: per step
    assert [(r["nodes"], r["macs"], r["calls"]) for r in steps] == [
        (["sc"], 3 * 36 * 4 * 3, 3), (["c1", "b1", "add", "relu"], 3 * 36 * 4 * 27, 3)]


def test_broadcasting_add_is_not_fused():
    model = engine.Model(_residual_graph(broadcast=True), fmt.References())
    assert all(s.residual is None for s in model.plan.steps)
    x = rand(2, 3, 6, 6)
    close(model(x), model.activations(x, kernels="reference")["relu"])


def _bn_node(C, seed=0):
    rng = np.random.default_rng(seed)
    weights = {"running_mean": rand(C, seed=seed), "running_var": rng.random(C, np.float32) + 0.1,
               "weight": rand(C, seed=seed + 1), "bias": rand(C, seed=seed + 2)}
    return Node("bn", "batch_norm", ["x"], {"eps": 1e-5}, weights)


@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (4, 6), (3, 4, 9), (1, 3, 1, 1)])
def test_batch_norm_kernel_fuses_residual_and_activation(shape):
    """The BN kernel, with a residual of the output's shape or a broadcasting one and every
    activation, equals the unfused NumPy ops bit for bit (the same float32 roundings); NaN
    propagates."""
    node, bn = _bn_node(shape[1]), OPS["batch_norm"]
    x, res = rand(*shape), rand(*shape, seed=4)
    x.flat[-1] = np.nan
    want = bn.reference(node, x)
    np.testing.assert_array_equal(bn.run(node, x), want)
    for act in ACTS:
        for r in (None, res, res[:1]):
            exp = want if r is None else want + r
            np.testing.assert_array_equal(bn.run_fused(node, [x], act, r),
                                          apply_act(exp.copy(), act) if act else exp)


def test_activation_fused_into_unfolded_batch_norm():
    """A BN with nothing to fold into (here the graph's input) runs as one step with the ReLU."""
    graph = Graph([TensorSpec("x", [None, 4, 5, 5])], [("y", "relu")], "tensor",
                  [_bn_node(4), Node("relu", "relu", ["bn"])])
    model = engine.Model(graph, fmt.References())
    assert [(s.node.op, s.act) for s in model.plan.steps] == [("batch_norm", ("relu",))]
    x = rand(3, 4, 5, 5)
    np.testing.assert_array_equal(model(x), model.activations(x, kernels="reference")["relu"])


@pytest.mark.parametrize("op,mode", [("conv2d", "zeros"), ("conv2d", "reflect"),
                                     ("basis_conv2d", "zeros")])
def test_step_launch_set_up_per_input_shape(op, mode):
    """A plan step's launch (set up once per input shape and residual) equals run_fused bit for
    bit, with shapes, residuals of the output's shape, broadcasting ones and none alternating
    on the same launch."""
    attrs = {"stride": [1, 1], "padding": [1, 1, 1, 1], "dilation": [1, 1], "groups": 1,
             "padding_mode": mode}
    weights = ({"basis": rand(3, 4, 3, 3), "combine": rand(6, 3, seed=1)} if op == "basis_conv2d"
               else {"weight": rand(6, 4, 3, 3)})
    weights["bias"] = rand(6, seed=2)
    node = Node("c", op, ["x"], dict(attrs, rank=3) if op == "basis_conv2d" else attrs, weights)
    impl = OPS[op]
    launch = impl.launcher(node, ("relu",))
    for shape in [(1, 4, 9, 9), (3, 4, 9, 9), (1, 4, 9, 9), (2, 4, 5, 7), (1, 4, 9, 9)]:
        x = rand(*shape, seed=shape[0])
        out = (shape[0], 6) + shape[2:]
        for r in (None, rand(*out, seed=3), rand(1, 6, 1, 1, seed=4)):
            np.testing.assert_array_equal(launch([x], r), impl.run_fused(node, [x], ("relu",), r))


@pytest.mark.parametrize("op", ["linear", "max_pool2d", "avg_pool2d", "flatten"])
def test_other_step_launches_set_up_per_input_shape(op):
    """As above for the ops whose steps also set up once per shape (the bias in the linear
    kernel), an activation and residuals included though a plan fuses none into the pools and
    views."""
    pool = {"kernel": [2, 2], "stride": [2, 2], "padding": [0, 0], "ceil_mode": False}
    linear = {"weight": rand(6, 8), "bias": rand(6, seed=1)}
    node = {"linear": Node("l", "linear", ["x"], {}, linear),
            "max_pool2d": Node("p", "max_pool2d", ["x"], dict(pool, dilation=[1, 1]), {}),
            "avg_pool2d": Node("p", "avg_pool2d", ["x"], dict(pool, count_include_pad=True), {}),
            "flatten": Node("f", "flatten", ["x"], {"start_dim": 1, "end_dim": 3}, {})}[op]
    impl = OPS[op]
    impl.check_attrs(node)
    shapes = ([(1, 8), (3, 8), (2, 5, 8), (1, 8)] if op == "linear"
              else [(1, 6, 4, 4), (3, 6, 8, 6), (1, 6, 4, 4)])
    for act in (None, ("relu",)):
        launch = impl.launcher(node, act)
        for shape in shapes:
            x = rand(*shape, seed=len(shape))
            out = impl.infer(node, [shape])
            for r in (None, rand(*out, seed=3), rand(*(1,) * (len(out) - 1) + out[-1:], seed=4)):
                np.testing.assert_array_equal(launch([x], r), impl.run_fused(node, [x], act, r))


def test_blas_called_by_kernels_is_single_threaded():
    assert gemm.LIMITED_BLAS
    threads = {i["filepath"]: i["num_threads"] for i in threadpool_info()}
    assert all(threads[p] == 1 for p in gemm.LIMITED_BLAS if p in threads)


def test_kn2row_weights_cached_per_array():
    basis = rand(6, 4, 3, 3)
    a = gemm.kn2row_weights(basis, 2)
    assert gemm.kn2row_weights(basis, 2) is a
    assert a.shape == (2 * 9 * 3, 4)
    np.testing.assert_array_equal(a[(1 * 9 + 2 * 3 + 1) * 3 + 2], basis[3 + 2, :, 2, 1])
    other = basis.copy()
    assert gemm.kn2row_weights(other, 2) is not a


@pytest.mark.parametrize("m,k,n", [(3, 5, 7), (64, 100, 3), (5, 64, 1000), (1, 1, 1)])
def test_matmul(m, k, n):
    a, b = rand(m, k), rand(k, n, seed=1)
    close(gemm.matmul(a, b), a @ b)
    close(gemm.matmul(b.T, a.T), b.T @ a.T)                    # transposed views are copied


def test_derived_weights_die_with_their_array():
    import gc
    basis = rand(6, 4, 3, 3)
    gemm.kn2row_weights(basis, 2)
    key = (id(basis), ("kn2row", 2))
    assert key in gemm._DERIVED._map
    del basis
    gc.collect()
    assert key not in gemm._DERIVED._map


@pytest.mark.parametrize("warmup, warm_calls", [(0.0, 1), (0.01, 3)])
def test_interleaved_warms_up_for_a_time(monkeypatch, warmup, warm_calls):
    """Each (model, runtime) gets warm-up calls until `warmup` s have passed (one at least),
    then `calls` timed ones, every round (a fake clock: each call takes 4 ms)."""
    clock = [0.0]
    made = []

    def call(name):
        made.append(name)
        clock[0] += 0.004

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(timing.time, "sleep", lambda s: None)
    fns = {("net", r): (lambda r=r: call(r)) for r in ("engine", "ort")}
    fns["dense", "engine"] = lambda: call("dense")      # a model on one runtime only
    times = timing.interleaved(fns, calls=5, rounds=2, warmup=warmup)
    assert list(times) == list(fns)
    assert all(t == pytest.approx([0.004] * 10) for t in times.values())
    assert made.count("engine") == made.count("ort") == made.count("dense") == 2 * (warm_calls + 5)


def test_speed_report_checks_the_targets():
    """bench/speed.py's targets table: each target from the run's medians and rounds (ORT /
    engine time, its inverse for latency, compressed vs dense over the MAC reduction), met or
    not by its bound, the median of the rounds with the vCPUs near and far, and the same ratio
    of the fastest calls; targets whose models the run lacks are left out."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("speed", ROOT / "bench" / "speed.py")
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)

    def row(model, batch, macs, engine_ms, ort_ms, engine_min=None, last_round=None):
        times = {k: {"ms": ms, "min_ms": ms, "gflops": 2 * macs * batch / ms / 1e6,
                     "rounds": [ms, ms, ms]}                  # three rounds at the median
                 for k, ms in (("engine", engine_ms), ("onnxruntime", ort_ms),
                               ("pytorch", 10.0))}
        times["engine"]["min_ms"] = engine_min or engine_ms
        times["engine"]["rounds"][2] = last_round or engine_ms
        return {"model": model, "batch": batch, "macs": macs, **times,
                "vs_ort_rounds": [ort_ms / e for e in times["engine"]["rounds"]],
                "placement": [35.0, 38.0, 170.0, 175.0]}  # rounds: near, mixed, far

    res = {"sgemm_start": 100.0, "sgemm_end": 100.0,
           "rows": [row("vgg16-dense", 16, 4e8, 40.0, 38.0, 36.0),
                    row("vgg16-basis", 16, 1e8, 12.0, 13.0, 10.0, last_round=15.0),
                    row("vgg16-dense", 1, 4e8, 4.0, 3.0),
                    row("vgg16-basis", 1, 1e8, 1.3, 1.0, 1.2)]}
    rows = speed.targets(res, {"warm": 2.5})
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
    assert [c[0] for c in cells] == [
        "BasisConv VGG-16 throughput vs ORT, batch 16 >= 1", "BasisConv VGG-16 latency vs ORT's, "
        "batch 1 <= 1.25", "dense VGG-16 throughput vs ORT, batch 16 >= 0.9", "VGG-16 compressed "
        "vs dense, of the MAC reduction, batch 1 >= 0.8", "VGG-16 compressed vs dense, of the MAC "
        "reduction, batch 16 >= 0.8", "first output, warm cache <= 2 s"]
    assert [(c[1], c[5], c[7]) for c in cells] == [
        ("1.08", "1.30", "yes"), ("1.30", "1.20", "**no**"), ("0.95", "1.06", "yes"),
        ("0.77", "0.83", "**no**"), ("0.83", "0.90", "yes"), ("2.50 s", "", "**no**")]
    assert cells[0][6] == f"{2 * 1e8 * 16 / 12.0 / 1e6 / 100:.2f}"
    # the ranges over the rounds, and the rounds with the vCPUs near and far (not the mixed one)
    assert [c[2:5] for c in cells[:5]] == [
        ["0.87-1.08", "1.08 (1)", "0.87 (1)"], ["1.30-1.30", "1.30 (1)", "1.30 (1)"],
        ["0.95-0.95", "0.95 (1)", "0.95 (1)"], ["0.77-0.77", "0.77 (1)", "0.77 (1)"],
        ["0.67-0.83", "0.83 (1)", "0.67 (1)"]]


def test_placement_probe_times_a_line_transfer():
    """bench/placement.py: the time a cache line takes between CPUs 0 and 1 (a plausible number
    of ns), with the caller's own CPU affinity left as it was."""
    import importlib.util

    if not {0, 1} <= os.sched_getaffinity(0):
        pytest.skip("needs CPUs 0 and 1")
    spec = importlib.util.spec_from_file_location("placement", ROOT / "bench" / "placement.py")
    placement = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(placement)
    before = os.sched_getaffinity(0)
    ns = placement.transfer_ns(2000)
    assert 1 < ns < 100_000
    assert os.sched_getaffinity(0) == before


def test_cli_bench_times_the_engine_alone(tmp_path, capsys):
    import json

    from engine.cli import main
    path = tmp_path / "m.h5"
    conv = {"stride": [1, 1], "padding": [1, 1, 1, 1], "dilation": [1, 1], "groups": 1, "padding_mode": "zeros"}
    graph = Graph([TensorSpec("x", [None, 3, 8, 8])], [("y", "r")], "tensor",
                  [Node("c", "conv2d", ["x"], conv, {"weight": rand(4, 3, 3, 3)}), Node("r", "relu", ["c"])])
    fmt.save(path, graph, fmt.References())
    assert main(["bench", str(path), "--batch", "3", "--seconds", "0.05", "--min-runs", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["input_shapes"] == [[3, 3, 8, 8]] and out["runs"] >= 2 and out["macs"] == 3 * 4 * 64 * 27
    assert main(["bench", str(path), "--seconds", "0.05", "--min-runs", "2"]) == 0
    assert "engine only: --onnx" in capsys.readouterr().out


def test_cli_bench_times_each_plan_step(tmp_path, capsys):
    """--layers: one row per plan step, naming the file's nodes fused into it (every node
    once), with their MACs (summing to the call's), a time and its share of the steps' total."""
    import json

    from engine.cli import main
    path = tmp_path / "m.h5"
    fmt.save(path, _residual_graph(), fmt.References())
    bench = ["bench", str(path), "--batch", "2", "--seconds", "0.05", "--min-runs", "3", "--layers"]
    assert main(bench + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert main(bench) == 0
    text = capsys.readouterr().out
    rows = out["layers"]
    assert [(r["op"], r["nodes"], r["output_shape"]) for r in rows] == [
        ("conv2d", ["sc"], [2, 4, 6, 6]), ("conv2d", ["c1", "b1", "add", "relu"], [2, 4, 6, 6])]
    assert [r["macs"] for r in rows] == [2 * 36 * 4 * 3, 2 * 36 * 4 * 27]
    assert sum(r["macs"] for r in rows) == out["macs"]
    assert all(r["median_ms"] > 0 and r["calls"] >= 3 for r in rows)
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    assert "c1, b1, add, relu" in text and "per plan step" in text


def test_cli_bench_against_the_dense_model(tmp_path, capsys):
    """--against: the compressed model timed alternately with its dense original; its speedup
    per round, the MAC reduction and the share of it turned into time; with --layers each step
    beside the dense steps running the same nodes. A model of other inputs is refused by name."""
    import json

    from converters.basis import compress_graph
    from engine.cli import main
    dense, basis, other = tmp_path / "dense.h5", tmp_path / "basis.h5", tmp_path / "other.h5"
    graph = _residual_graph()
    fmt.save(dense, graph, fmt.References())
    fmt.save(basis, compress_graph(graph, rank=1, force=True)[0], fmt.References())
    bench = ["bench", str(basis), "--batch", "2", "--seconds", "0.05", "--min-runs", "4",
             "--rounds", "2", "--against", str(dense), "--layers"]
    assert main(bench + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    macs = {p: engine.load(p).count((2, 3, 6, 6)).total["macs"] for p in (basis, dense)}
    against = out["against"]
    assert out["macs"] == macs[basis] and against["macs"] == macs[dense]
    assert against["mac_reduction"] == pytest.approx(macs[dense] / macs[basis])
    lo, hi = against["speedup_rounds"]
    assert 0 < lo <= against["speedup"] <= hi
    assert against["of_mac_reduction"] == pytest.approx(against["speedup"] / against["mac_reduction"])
    rows = out["layers"]
    assert [r["nodes"] for r in rows] == [["sc"], ["c1", "b1", "add", "relu"]]
    dense_macs = {n.name: n.macs for n in engine.load(dense).count((2, 3, 6, 6)).nodes}
    for r in rows:                  # the same fusions: each step against the dense one
        v = r["against"]
        assert v["steps"] == [r["step"]] and v["median_ms"] > 0 and r["calls"] >= 4
        assert v["macs"] == sum(dense_macs[n] for n in r["nodes"])
        assert v["mac_reduction"] == pytest.approx(v["macs"] / r["macs"])
        assert v["of_mac_reduction"] == pytest.approx(v["speedup"] / v["mac_reduction"])
        assert v["speedup"] == pytest.approx(v["median_ms"] / r["median_ms"])
    assert main(bench) == 0
    text = capsys.readouterr().out
    assert f"against {dense}" in text and "of the MAC reduction" in text and "speedup" in text

    conv = {"stride": [1, 1], "padding": [0, 0, 0, 0], "dilation": [1, 1], "groups": 1, "padding_mode": "zeros"}
    fmt.save(other, Graph([TensorSpec("x", [None, 5, 6, 6])], [("y", "c")], "tensor",
                          [Node("c", "conv2d", ["x"], conv, {"weight": rand(4, 5, 1, 1)})]),
             fmt.References())
    assert main(bench[:-2] + [str(other)]) == 1
    assert f"--against {other} does not take {basis}'s inputs" in capsys.readouterr().err

    # no MACs to reduce (a ReLU alone): the speedup, no reduction (it divided by zero)
    relu = tmp_path / "relu.h5"
    fmt.save(relu, Graph([TensorSpec("x", [None, 3, 6, 6])], [("y", "r")], "tensor",
                         [Node("r", "relu", ["x"])]), fmt.References())
    alone = ["bench", str(relu), "--seconds", "0.05", "--min-runs", "2", "--rounds", "2",
             "--against", str(relu), "--layers"]
    assert main(alone + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["against"]["speedup"] > 0 and out["against"]["mac_reduction"] is None
    assert out["against"]["of_mac_reduction"] is None
    assert out["layers"][0]["against"]["mac_reduction"] is None
    assert main(alone) == 0
    assert "fewer MACs" not in capsys.readouterr().out


NETS = """import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)).eval()


def wider():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1)).eval()
"""


def test_cli_bench_against_onnx_runtime_and_pytorch(tmp_path, capsys):
    """--torch times PyTorch eager, and ONNX Runtime on its export, beside the engine (each
    output checked against the engine's first); --onnx takes a given export; another model or
    an unreadable export is refused by name."""
    import json

    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from engine.cli import main
    src, h5, onnx = tmp_path / "nets.py", tmp_path / "m.h5", tmp_path / "m.onnx"
    src.write_text(NETS)
    assert main(["convert", f"{src}:build", "--input-shape", "1,3,8,8", "-o", str(h5)]) == 0
    capsys.readouterr()
    bench = ["bench", str(h5), "--batch", "2", "--seconds", "0.05", "--min-runs", "4",
             "--rounds", "2", "--json"]
    assert main(bench + ["--torch", f"{src}:build"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["input_shapes"] == [[2, 3, 8, 8]] and out["rounds"] == 2 and out["runs"] >= 4
    assert list(out["peers"]) == ["onnxruntime", "pytorch"]
    for peer in out["peers"].values():
        assert peer["max_error_vs_engine"] <= 1e-5 and peer["runs"] == out["runs"]
        lo, hi = peer["engine_speedup_rounds"]
        assert 0 < lo <= peer["engine_speedup"] <= hi
    # with --against too: that model on the engine alone, interleaved with the peers
    assert main(bench + ["--torch", f"{src}:build", "--against", str(h5)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out["peers"]) == ["onnxruntime", "pytorch"]
    assert out["against"]["mac_reduction"] == 1.0 and out["against"]["speedup"] > 0

    from converters.loading import load_factory
    net = load_factory(f"{src}:build")
    torch.onnx.export(net, torch.zeros(2, 3, 8, 8), str(onnx), dynamo=False)
    assert main(bench[:-1] + ["--onnx", str(onnx)]) == 0
    text = capsys.readouterr().out
    assert "onnxruntime" in text and "pytorch" not in text
    with torch.no_grad():
        net[0].weight.mul_(2)
    torch.onnx.export(net, torch.zeros(2, 3, 8, 8), str(onnx), dynamo=False)
    assert main(bench + ["--onnx", str(onnx)]) == 0     # runs: the error says it differs
    out, err = capsys.readouterr()
    assert json.loads(out)["peers"]["onnxruntime"]["max_error_vs_engine"] > 0.1
    assert "not the same model?" in err

    assert main(bench + ["--torch", f"{src}:wider"]) == 1
    assert "not the same model" in capsys.readouterr().err
    onnx.write_bytes(b"not an onnx file")
    assert main(bench + ["--onnx", str(onnx)]) == 1
    assert "ONNX Runtime cannot load" in capsys.readouterr().err


def vector_width_child(width):
    """Run in a child process with BASISCONV_VECTOR_WIDTH=width and NUMBA_BOUNDSCHECK=1: the
    kernels an AVX-512 (16), AVX (8) or SSE / NEON (4) machine compiles, with every array index
    checked (a kernel reading or writing past its scratch gives an error, or NaN from its
    parallel tasks, instead of silently corrupting memory), on every case of CASES, random
    shapes and the sgemm, held to the references."""
    assert sgemm.VW == width and sgemm.DIRECT_TILES[0][1] == 4, (sgemm.VW, sgemm.DIRECT_TILES)
    test_random_shapes_match_reference()
    kinds = set()
    for (B, C, N, H, W, kh, kw, stride, pad, dil, g), forced in itertools.product(CASES, [0, 1]):
        ho, wo = conv_out_hw(H, W, kh, kw, stride, pad, dil)
        x, w, b = rand(B, C, H, W), rand(N, C // g, kh, kw, seed=1), rand(N, seed=2)
        want = OPS["conv2d"].reference(conv_node(w, b, stride, pad, dil, g), x)
        with direct_everywhere(forced):
            close(conv2d_fast(x, w, b, stride, pad, dil, g, "zeros", ("relu",)),
                  np.maximum(want, 0))
        for M in ([] if forced else [None]) + basis_ranks(C, g):
            with direct_everywhere(forced):
                plan = gemm.plan_conv((B, C, H, W), N, kh, kw, ho, wo, stride, pad, dil, g, M)
                kinds.add(("grid" if plan.grid else "gather") if plan.how == "packed" else plan.how)
                if M is not None:
                    basis, comb = rand(g * M, C // g, kh, kw, seed=1), rand(N, M, seed=2)
                    want = OPS["basis_conv2d"].reference(
                        basis_node(basis, comb, b, stride, pad, dil, g), x)
                    close(basis_conv2d_fast(x, basis, comb, b, stride, pad, dil, g, "zeros"), want)
    assert {"direct", "gather", "grid", "image", "batched", "streamed", "split_k"} <= kinds, kinds
    a, bm = rand(37, 300), rand(300, 45, seed=1)
    c = np.empty(37 * 45, np.float32)
    sgemm.sgemm(False, 37, 45, 300, a.ravel(), 0, 300, bm.ravel(), 0, 45, c, 0, 45,
                np.empty(sgemm.pack_size(37, 45, 300), np.float32))
    close(c.reshape(37, 45), sgemm.sgemm_reference(a, bm))


@pytest.fixture(scope="module")
def width_children(tmp_path_factory):
    """get(width) -> (child process, its stderr file) of vector_width_child, started on first
    use; outside pytest-xdist every width the host has at once (each compiles every kernel
    with bounds checks, about 2 minutes: on 2 cores the two together took about as long as
    one alone)."""
    started = {}

    def get(width):
        host = [w for w in (16, 8, 4) if w <= sgemm._widest_vector_width()]
        for w in [width] if os.environ.get("PYTEST_XDIST_WORKER") else host:
            if w not in started:
                cache = tmp_path_factory.mktemp(f"width{w}")
                env = dict(os.environ, BASISCONV_VECTOR_WIDTH=str(w), NUMBA_CACHE_DIR=str(cache),
                           NUMBA_BOUNDSCHECK="1")
                log = open(cache / "stderr", "w+")
                started[w] = (subprocess.Popen(
                    [sys.executable, "-c", f"import tests.test_fast_paths as t; "
                     f"t.vector_width_child({w})"], cwd=ROOT, env=env,
                    stdout=subprocess.DEVNULL, stderr=log), log)
        return started[width]
    yield get
    for child, log in started.values():
        if child.poll() is None:
            child.kill()
            child.wait()
        log.close()


@pytest.mark.parametrize("width", [16, 8, 4])
def test_bounds_checked_kernels_at_each_vector_width(width_children, width):
    """The 16-wide (AVX-512), 8-wide (AVX) and 4-wide (SSE, NEON) micro-kernels and direct-conv
    tiles, compiled with bounds checks in a child process with its own Numba cache, match the
    references."""
    if width > sgemm._widest_vector_width():
        pytest.skip(f"the host has no {width}-wide float32 vectors")
    child, log = width_children(width)
    child.wait(timeout=900)
    log.seek(0)
    assert child.returncode == 0, log.read()[-3000:]

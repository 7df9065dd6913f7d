"""Pooling and reductions: max_pool2d, avg_pool2d, adaptive_avg_pool2d, mean (PyTorch semantics).

Fast paths: max_pool2d and avg_pool2d share one Numba kernel (_pool2d) with one prange task
per (image, channel) plane; adaptive_avg_pool2d over even windows one loop kernel
(_even_means), else, like mean, O(input) NumPy (run = reference).
Cost (other), counting the input elements each window really reads (taps over padding or past
the input read nothing: unlike conv2d's, they are skipped, by the fast kernel too):
max_pool2d one compare per in-bounds tap; avg_pool2d and adaptive_avg_pool2d one add per
in-bounds tap plus one divide per output element; mean one add per input element plus one
divide per output element.
Counted: `_max_pool_counted` and `_box_sums_counted`, loop kernels counting each tap they read;
mean from the arrays it reduces.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..buffers import empty
from ..errors import FormatError
from . import Cost, Op, attr, mismatch, numel, per_shape_then_act, register
from .conv import out_size, pad2d, tap
from .gemm import threads
from .shape import check_axis, int_min, ints


def _box_means(x, y0, y1, x0, x1, div):
    """(B, C, len(y0), len(x0)) float32 sums of x (B, C, H, W) over the windows
    [y0[i], y1[i]) x [x0[j], x1[j]), divided by div (scalar or (len(y0), len(x0))); summed in
    float64 from the summed-area table of x."""
    B, C, H, W = x.shape
    S = np.zeros((B, C, H + 1, W + 1))  # (B, C, H+1, W+1) S[.., y, x] = sum of x[.., :y, :x]
    S[:, :, 1:, 1:] = x.cumsum(2, dtype=np.float64).cumsum(3)
    y0, y1, x0, x1 = y0[:, None], y1[:, None], x0[None, :], x1[None, :]
    sums = S[:, :, y1, x1] - S[:, :, y0, x1] - S[:, :, y1, x0] + S[:, :, y0, x0]
    return (sums / div).astype(np.float32, order="C")


@njit(cache=True)
def _box_sums_counted(x, y0, y1, x0, x1, out):
    """out[p, i, j] = sum of x[p, y0[i]:y1[i], x0[j]:x1[j]] over planes x (P, H, W): plain loops,
    one count per element added. Returns the count."""
    adds = 0
    for p in range(x.shape[0]):
        for i in range(y0.size):
            for j in range(x0.size):
                acc = 0.0
                for yy in range(y0[i], y1[i]):
                    for xx in range(x0[j], x1[j]):
                        acc += x[p, yy, xx]
                        adds += 1
                out[p, i, j] = acc
    return adds


@njit(cache=True, parallel=True)
def _even_means(x, kh, kw, out):
    """out[p, i, j] = mean of x[p, i*kh:(i+1)*kh, j*kw:(j+1)*kw] over planes x (P, H, W), summed
    in float64 as _box_means."""
    for p in prange(x.shape[0]):
        for i in range(out.shape[1]):
            for j in range(out.shape[2]):
                acc = 0.0
                for yy in range(i * kh, (i + 1) * kh):
                    for xx in range(j * kw, (j + 1) * kw):
                        acc += x[p, yy, xx]
                out[p, i, j] = acc / (kh * kw)


def _box_means_counted(x, y0, y1, x0, x1, div) -> tuple[np.ndarray, Cost]:
    """_box_means by the counting kernel: (output, Cost of the adds and the divides executed)."""
    B, C, H, W = x.shape
    sums = np.empty((B * C, y0.size, x0.size))  # float64, as _box_means
    adds = _box_sums_counted(x.reshape(B * C, H, W), y0, y1, x0, x1, sums)
    y = (sums / div).astype(np.float32).reshape(B, C, y0.size, x0.size)
    return y, Cost(other=adds + y.size)


def _box_cost(x_shape, y0, y1, x0, x1) -> Cost:
    """Cost of _box_means: one add per element of every window, one divide per output."""
    B, C = x_shape[:2]
    return Cost(other=int(B * C * ((y1 - y0).sum() * (x1 - x0).sum() + y0.size * x0.size)))


def _tap_ranges(n_out: int, size: int, k: int, s: int, p: int, d: int):
    """(lo, hi) per output position along one axis: kernel taps lo <= i < hi land inside
    [0, size) (o*s - p + i*d in range). Vectorised over outputs only, never over taps."""
    start = np.arange(n_out, dtype=np.int64) * s - p
    lo = np.clip(-(start // d), 0, k)                       # ceil(-start / d)
    hi = np.clip((size - 1 - start) // d + 1, 0, k)
    return lo, np.maximum(hi, lo)


def _taps_in_bounds(n_out: int, size: int, k: int, s: int, p: int, d: int) -> int:
    """Taps of all n_out windows along one axis that land inside [0, size)."""
    lo, hi = _tap_ranges(n_out, size, k, s, p, d)
    return int((hi - lo).sum())


def _tap_span(n_out: int, size: int, k: int, s: int, p: int, d: int) -> tuple[int, int]:
    """The kernel taps [lo, hi) that land inside the input for at least one output position:
    the others read only padding, so kernels skip them (and their time is not bounded by size)."""
    lo, hi = _tap_ranges(n_out, size, k, s, p, d)
    return int(lo.min()), int(hi.max())


class _Pool2d(Op):
    """Shared attributes and output shape of max_pool2d / avg_pool2d (symmetric padding); the
    subclass's kernel is pool(node, x, geometry)."""
    arena_output = True

    def check_attrs(self, node):
        k = ints(node, "kernel", 1, 2)
        ints(node, "stride", 1, 2)
        p = ints(node, "padding", 0, 2)
        attr(node, "ceil_mode", bool)
        if p[0] > k[0] // 2 or p[1] > k[1] // 2:  # torch: pad at most half the kernel
            raise FormatError(f"node '{node.name}' ({node.op}): padding {p} must be at most "
                              f"half of kernel {k}")

    def geometry(self, node, shape):
        """(ho, wo, kh, kw, sh, sw, ph, pw, dh, dw) of this pool on input `shape`."""
        a = node.attrs
        (kh, kw), (sh, sw), (ph, pw) = a["kernel"], a["stride"], a["padding"]
        dh, dw = a["dilation"] if self.name == "max_pool2d" else (1, 1)
        H, W = shape[2], shape[3]
        ho = out_size(H, kh, sh, ph, ph, dh, a["ceil_mode"])
        wo = out_size(W, kw, sw, pw, pw, dw, a["ceil_mode"])
        return ho, wo, kh, kw, sh, sw, ph, pw, dh, dw

    def run(self, node, x):
        return self.pool(node, x, self.geometry(node, x.shape))

    def launcher(self, node, act):
        """The geometry worked out once per input shape."""
        return per_shape_then_act(lambda x_shape: self.geometry(node, x_shape),
                                  lambda x, geometry: self.pool(node, x, geometry), act)

    def infer(self, node, in_shapes):
        x = tuple(in_shapes[0])
        if len(x) != 4:
            raise mismatch(node, f"expected input (B, C, H, W), got {x}")
        ho, wo = self.geometry(node, x)[:2]
        if ho < 1 or wo < 1:
            raise mismatch(node, f"expected an input larger than the kernel, got {x}: "
                                 f"output {ho}x{wo}")
        return x[:2] + (ho, wo)


@njit(cache=True, inline="always")
def _fold(dst, src, avg):
    """dst += src (avg) or dst = max(dst, src) with NaN propagating (max), over 1-D arrays."""
    if avg:
        for q in range(dst.shape[0]):
            dst[q] += src[q]
    else:
        for q in range(dst.shape[0]):
            dst[q] = np.maximum(dst[q], src[q])


@njit(cache=True)
def _span(n_out, size, k, s, p, d):
    """_tap_span in Numba: taps [lo, hi) inside the input for some output position."""
    lo, hi = k, 0
    for o in range(n_out):
        start = o * s - p
        a = min(max(-(start // d), 0), k)
        b = min(max((size - 1 - start) // d + 1, 0), k)
        if b > a:
            lo, hi = min(lo, a), max(hi, b)
    return lo, max(hi, lo)


@njit(cache=True, parallel=True)
def _pool2d(x, kh, kw, sh, sw, ph, pw, dh, dw, avg, include_pad, divisor, out):
    """Max (avg = 0) or average (avg = 1) pooling of planes x (P, H, W) into out (P, H', W'),
    one prange task per plane, tap by tap. Only in-bounds taps are visited: per kernel column
    the valid output columns [lo, hi) are computed once, per (kernel row, output row) the input
    row is skipped when outside; the inner loop runs over slices (branch-free; SIMD when sw = 1,
    where the source slice is contiguous). Max: NaN propagates, as in torch. Average: window
    sum / divisor (> 0), or / the window's element count (padded extent if include_pad, else
    in-bounds), as in _avg_windows."""
    P, H, W = x.shape
    ho, wo = out.shape[1], out.shape[2]
    i_lo, i_hi = _span(ho, H, kh, sh, ph, dh)
    j_lo, j_hi = _span(wo, W, kw, sw, pw, dw)
    for p in prange(P):
        out[p] = 0.0 if avg else -np.inf
        for j in range(j_lo, j_hi):
            off = j * dw - pw  # output column ox reads input column ox*sw + off
            lo = max(0, (sw - 1 - off) // sw)
            hi = min(wo, (W - 1 - off) // sw + 1)
            start = lo * sw + off
            for i in range(i_lo, i_hi):
                for oy in range(ho):
                    iy = oy * sh - ph + i * dh
                    if iy < 0 or iy >= H:
                        continue
                    if sw == 1:
                        _fold(out[p, oy, lo:hi], x[p, iy, start:start + hi - lo], avg)
                    else:
                        _fold(out[p, oy, lo:hi], x[p, iy, start:start + (hi - lo - 1) * sw + 1:sw],
                              avg)
        if avg:
            for oy in range(ho):
                y0 = oy * sh - ph
                y1 = min(y0 + kh, H + ph)
                for ox in range(wo):
                    x0 = ox * sw - pw
                    x1 = min(x0 + kw, W + pw)
                    if divisor > 0:
                        d = divisor
                    elif include_pad:
                        d = (y1 - y0) * (x1 - x0)
                    else:
                        d = (min(y1, H) - max(y0, 0)) * (min(x1, W) - max(x0, 0))
                    out[p, oy, ox] /= d


@njit(cache=True, parallel=True)
def _max2x2(x, out, T):
    """2x2 stride-2 max pooling of planes x (P, H, W) into out (P, H', W'), 2H' <= H, 2W' <= W,
    NaN propagating as np.maximum; T slices of the planes, read and written through flat
    unsigned indices (a view per row made small planes 2-4x slower)."""
    P, H, W = x.shape
    ho, wo = out.shape[1], out.shape[2]
    xf = x.ravel()
    of = out.ravel()
    for t in prange(T):
        for p in range(P * t // T, P * (t + 1) // T):
            for oy in range(ho):
                i0 = (p * H + 2 * oy) * W                # the output row's first input row
                i1 = i0 + W
                o = (p * ho + oy) * wo
                for ox in range(wo):
                    a = np.maximum(xf[np.uintp(i0 + 2 * ox)], xf[np.uintp(i0 + 2 * ox + 1)])
                    b = np.maximum(xf[np.uintp(i1 + 2 * ox)], xf[np.uintp(i1 + 2 * ox + 1)])
                    of[np.uintp(o + ox)] = np.maximum(a, b)


def _run_pool(x, geometry, avg, include_pad=0, divisor=0):
    """Run _pool2d over the B*C planes of x (B, C, H, W) for geometry (H', W', kh, kw, sh, sw,
    ph, pw, dh, dw); 2x2 stride-2 unpadded max pooling by _max2x2."""
    ho, wo, kh, kw, sh, sw, ph, pw, dh, dw = geometry
    B, C, H, W = x.shape
    out = empty((B, C, ho, wo))                     # (B, C, H', W'): the step's arena memory
    if not avg and (kh, kw, sh, sw, ph, pw, dh, dw) == (2, 2, 2, 2, 0, 0, 1, 1) \
            and 2 * ho <= H and 2 * wo <= W:
        _max2x2(x.reshape(B * C, H, W), out.reshape(B * C, ho, wo), threads())
        return out
    _pool2d(x.reshape(B * C, H, W), kh, kw, sh, sw, ph, pw, dh, dw, avg, include_pad, divisor,
            out.reshape(B * C, ho, wo))
    return out


@register
class MaxPool2d(_Pool2d):
    name = "max_pool2d"

    def check_attrs(self, node):
        super().check_attrs(node)
        ints(node, "dilation", 1, 2)

    def reference(self, node, x):
        ho, wo, kh, kw, sh, sw, ph, pw, dh, dw = self.geometry(node, x.shape)
        B, C, H, W = x.shape
        # -inf padding, extended at the end for ceil_mode windows that run past it
        bottom = max(ph, (ho - 1) * sh + dh * (kh - 1) + 1 - H - ph)
        right = max(pw, (wo - 1) * sw + dw * (kw - 1) + 1 - W - pw)
        xp = pad2d(x, [ph, pw, bottom, right], value=-np.inf)
        out = np.full((B, C, ho, wo), -np.inf, np.float32)
        for i in range(*_tap_span(ho, H, kh, sh, ph, dh)):
            for j in range(*_tap_span(wo, W, kw, sw, pw, dw)):
                np.maximum(out, tap(xp, i * dh, j * dw, ho, wo, sh, sw), out=out)
        return out

    def workspace(self, node, in_shapes, out_shape):
        """The reference's -inf padded input."""
        ho, wo, kh, kw, sh, sw, ph, pw, dh, dw = self.geometry(node, in_shapes[0])
        B, C, H, W = in_shapes[0]
        return B * C * (max(H + 2 * ph, (ho - 1) * sh + dh * (kh - 1) + 1)
                        * max(W + 2 * pw, (wo - 1) * sw + dw * (kw - 1) + 1))

    def pool(self, node, x, geometry):
        return _run_pool(x, geometry, 0)

    def cost(self, node, in_shapes, out_shape):
        B, C, H, W = in_shapes[0]
        ho, wo, kh, kw, sh, sw, ph, pw, dh, dw = self.geometry(node, in_shapes[0])
        return Cost(other=B * C * _taps_in_bounds(ho, H, kh, sh, ph, dh)
                    * _taps_in_bounds(wo, W, kw, sw, pw, dw))

    def counted(self, node, x):
        ho, wo, kh, kw, sh, sw, ph, pw, dh, dw = self.geometry(node, x.shape)
        B, C, H, W = x.shape
        out = np.empty((B, C, ho, wo), np.float32)
        taps = _max_pool_counted(x.reshape(B * C, H, W), kh, kw, sh, sw, ph, pw, dh, dw,
                                 out.reshape(B * C, ho, wo))
        return out, Cost(other=taps)


@njit(cache=True)
def _max_pool_counted(x, kh, kw, sh, sw, ph, pw, dh, dw, out):
    """Max over the in-bounds taps of every window of planes x (P, H, W) into out (P, H', W'),
    NaN propagating: plain loops, one count per tap compared. Returns the count."""
    P, H, W = x.shape
    taps = 0
    i_lo, i_hi = _span(out.shape[1], H, kh, sh, ph, dh)
    j_lo, j_hi = _span(out.shape[2], W, kw, sw, pw, dw)
    for p in range(P):
        for oy in range(out.shape[1]):
            for ox in range(out.shape[2]):
                m = -np.inf
                for i in range(i_lo, i_hi):
                    iy = oy * sh - ph + i * dh
                    if 0 <= iy < H:
                        for j in range(j_lo, j_hi):
                            ix = ox * sw - pw + j * dw
                            if 0 <= ix < W:
                                m = np.maximum(m, x[p, iy, ix])
                                taps += 1
                out[p, oy, ox] = m
    return taps


def _avg_windows(n_out, size, k, s, p):
    """(lo, hi, padded) per-axis window bounds of avg_pool2d, as torch: window [start, start + k)
    cut to the input [0, size) is [lo, hi); cut to the padded extent [-p, size + p) its length is
    `padded` (the count_include_pad divisor). Every window keeps >= 1 input element: it starts
    before `size` (ceil rule) and ends after 0 (p <= k/2)."""
    start = np.arange(n_out) * s - p
    end = np.minimum(start + k, size + p)
    return np.maximum(start, 0), np.minimum(end, size), end - start


@register
class AvgPool2d(_Pool2d):
    name = "avg_pool2d"

    def check_attrs(self, node):
        super().check_attrs(node)
        attr(node, "count_include_pad", bool)
        if "dilation" in node.attrs:
            raise FormatError(f"node '{node.name}' ({node.op}): avg_pool2d has no dilation")
        if node.attrs.get("divisor_override") is not None:
            int_min(node, "divisor_override", 1)

    def box(self, node, shape):
        """(y0, y1, x0, x1, div): the windows cut to the input, [y0[i], y1[i]) x [x0[j], x1[j]),
        and the divisor (an int, or one per output position)."""
        ho, wo, kh, kw, sh, sw, ph, pw = self.geometry(node, shape)[:8]
        H, W = shape[2:]
        y0, y1, ny = _avg_windows(ho, H, kh, sh, ph)
        x0, x1, nx = _avg_windows(wo, W, kw, sw, pw)
        if node.attrs.get("divisor_override") is not None:
            div = node.attrs["divisor_override"]
        elif node.attrs["count_include_pad"]:
            div = np.outer(ny, nx)
        else:
            div = np.outer(y1 - y0, x1 - x0)
        return y0, y1, x0, x1, div

    def reference(self, node, x):
        return _box_means(x, *self.box(node, x.shape))

    def counted(self, node, x):
        return _box_means_counted(x, *self.box(node, x.shape))

    def cost(self, node, in_shapes, out_shape):
        return _box_cost(in_shapes[0], *self.box(node, in_shapes[0])[:4])

    def pool(self, node, x, geometry):
        return _run_pool(x, geometry, 1, int(node.attrs["count_include_pad"]),
                         node.attrs.get("divisor_override") or 0)


@register
class AdaptiveAvgPool2d(Op):
    """Output cell i averages input [floor(i*H/o), ceil((i+1)*H/o)); a null size keeps H."""
    name = "adaptive_avg_pool2d"
    arena_output = True

    def check_attrs(self, node):
        v = attr(node, "output_size", list)
        if len(v) != 2 or not all(s is None or (type(s) is int and s >= 1) for s in v):
            raise FormatError(f"node '{node.name}' (adaptive_avg_pool2d): output_size must be "
                              f"2 ints >= 1 or null, got {v!r}")

    def infer(self, node, in_shapes):
        x = tuple(in_shapes[0])
        if len(x) != 4:
            raise mismatch(node, f"expected input (B, C, H, W), got {x}")
        return x[:2] + tuple(x[2 + i] if o is None else o
                             for i, o in enumerate(node.attrs["output_size"]))

    def windows(self, n_out, size):
        """(start, end) index arrays of the n_out adaptive windows along an axis of `size`."""
        i = np.arange(n_out)
        return i * size // n_out, -(-(i + 1) * size // n_out)

    def box(self, node, shape):
        """(y0, y1, x0, x1, div) as AvgPool2d.box: the windows, divided by their sizes."""
        ho, wo = self.infer(node, [shape])[2:]
        (y0, y1), (x0, x1) = self.windows(ho, shape[2]), self.windows(wo, shape[3])
        return y0, y1, x0, x1, np.outer(y1 - y0, x1 - x0)

    def reference(self, node, x):
        return _box_means(x, *self.box(node, x.shape))

    def run(self, node, x):
        """Windows that tile the input evenly (global pooling, H % H' == 0): _even_means (NumPy's
        float64 sums of a few values per row took 0.14 ms on ResNet-18's (16, 512, 4, 4)); else
        the reference."""
        B, C, H, W = x.shape
        ho, wo = self.infer(node, [x.shape])[2:]
        if H % ho or W % wo:
            return self.reference(node, x)
        out = empty((B, C, ho, wo))                     # (B, C, H', W')
        _even_means(x.reshape(B * C, H, W), H // ho, W // wo, out.reshape(B * C, ho, wo))
        return out

    def counted(self, node, x):
        return _box_means_counted(x, *self.box(node, x.shape))

    def cost(self, node, in_shapes, out_shape):
        return _box_cost(in_shapes[0], *self.box(node, in_shapes[0])[:4])


@register
class Mean(Op):
    name = "mean"

    def check_attrs(self, node):
        dims = ints(node, "dims", 0)
        if not dims or len(set(dims)) != len(dims):
            raise FormatError(f"node '{node.name}' (mean): dims must be non-empty and distinct, "
                              f"got {dims}")
        attr(node, "keepdim", bool)

    def infer(self, node, in_shapes):
        x = tuple(in_shapes[0])
        dims = node.attrs["dims"]
        check_axis(node, x, "dims", max(dims))
        if node.attrs["keepdim"]:
            return tuple(1 if i in dims else s for i, s in enumerate(x))
        return tuple(s for i, s in enumerate(x) if i not in dims)

    def reference(self, node, x):
        return np.asarray(np.mean(x, axis=tuple(node.attrs["dims"]),
                                  keepdims=node.attrs["keepdim"], dtype=np.float32))

    def cost(self, node, in_shapes, out_shape):
        return Cost(other=numel(in_shapes[0]) + numel(out_shape))

    def counted(self, node, x):
        """One add per element of x, one divide per element of the result."""
        y = self.reference(node, x)
        return y, Cost(other=x.size + y.size)

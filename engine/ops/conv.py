"""conv2d with PyTorch semantics: padding [top, left, bottom, right] (asymmetric allowed),
padding_mode zeros / reflect / replicate / circular, stride, dilation, groups, optional bias.

Also the helpers shared with the other op modules: `out_size` (window count of a conv / pool
sweep), `conv_out_hw`, `pad2d` (padding of an NCHW tensor by mode), `tap` (one kernel tap of
every window) and `check_weight`.

Fast path `conv2d_fast` (bias, a fused residual add and the activation in one epilogue):
  - groups == C (depthwise, any channel multiplier): `_depthwise`, a direct Numba kernel with one
    prange task per (image, output channel); residual and activation after, in NumPy.
  - otherwise `gemm.prepare_conv` (zero padding inline; other modes padded first): one group with
    K = C*kh*kw >= 64 mostly the direct conv (register tiles over the input read in place, no
    im2col); else im2col gathered into the GEMM's panels, or im2col / kn2row and sgemm per
    image or per batch, inside Numba prange tasks (see ops/gemm.py, plan_conv).
`basis_conv2d_fast` runs both stages of a basis conv in the same tasks (ops/basis.py).
A plan step sets a GEMM-shaped conv up once per input shape (`launcher`, `per_shape`: the
launch gemm.prepare_conv returns), so that a call runs little Python besides the kernel.
Cost: macs = B*N*H'*W'*(C/G)*kh*kw; other = B*N*H'*W' (the bias add) when there is a bias.
Counted (`conv2d_counted`, also the MAC kernel of linear, basis and TT): `_conv_counted`, direct
loops over every (b, n, oy, ox, c, i, j) tap of the padded input, taps reading padding included.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..buffers import empty
from ..errors import FormatError
from . import Cost, Op, attr, mismatch, numel, per_shape, register, residual_key
from .activation import residual_then_act
from .gemm import plan_conv, prepare_conv
from .shape import int_min, ints

PADDING_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def out_size(size: int, kernel: int, stride: int, pad_begin: int, pad_end: int,
             dilation: int = 1, ceil_mode: bool = False) -> int:
    """Number of window positions along one axis (PyTorch's rule; < 1 means no valid output).

    With ceil_mode a partial last window counts, unless it would start in the end padding.
    """
    span = size + pad_begin + pad_end - dilation * (kernel - 1) - 1
    n = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (n - 1) * stride >= size + pad_begin:
        n -= 1
    return n


def conv_out_hw(H: int, W: int, kh: int, kw: int, stride, padding, dilation) -> tuple[int, int]:
    """(H', W') of a conv with padding [top, left, bottom, right] on an H x W input."""
    return (out_size(H, kh, stride[0], padding[0], padding[2], dilation[0]),
            out_size(W, kw, stride[1], padding[1], padding[3], dilation[1]))


def pad2d(x: np.ndarray, pads, mode: str = "zeros", value: float = 0.0) -> np.ndarray:
    """x (B, C, H, W) padded by pads = [top, left, bottom, right]; mode "zeros" fills `value`.

    Returns x itself when there is nothing to pad.
    """
    t, l, b, r = pads
    if not (t or l or b or r):
        return x
    B, C, H, W = x.shape
    if mode == "zeros":
        xp = np.full((B, C, H + t + b, W + l + r), value, np.float32)
        xp[:, :, t:t + H, l:l + W] = x
        return xp
    return np.pad(x, ((0, 0), (0, 0), (t, b), (l, r)), mode=PADDING_MODES[mode])


def tap(xp: np.ndarray, y0: int, x0: int, ho: int, wo: int, sh: int, sw: int) -> np.ndarray:
    """(B, C, ho, wo) view of padded xp (B, C, Hp, Wp): the element at offset (y0, x0) of every
    window, windows stepping by (sh, sw)."""
    return xp[:, :, y0:y0 + sh * (ho - 1) + 1:sh, x0:x0 + sw * (wo - 1) + 1:sw]


def check_weight(node, name: str, shape: tuple) -> None:
    """Raise ShapeMismatch unless weight `name` is a float32 array of exactly `shape`."""
    w = node.weights.get(name)
    if w is None or w.dtype != np.float32 or w.shape != tuple(shape):
        got = "none" if w is None else f"{w.dtype} {w.shape}"
        raise mismatch(node, f"expected weight '{name}' float32 {tuple(shape)}, got {got}")


@njit(cache=True, parallel=True)
def _depthwise(xp, w, bias, sh, sw, dh, dw, out):
    """out[b, n] = bias[n] + sum_ij w[n, i, j] * xp[b, n // m, oy*sh + i*dh, ox*sw + j*dw],
    m = N / C output channels per input channel; one prange task per (b, n). Flat arrays with
    unsigned offsets, no row views: a view per row cost more than its few values (TT's stage 1,
    4,608 planes of 4x4: 3.6 -> 3.0 ms with them gone), and the sw == 1 loop vectorizes."""
    B, N, ho, wo = out.shape
    C, Hp, Wp = xp.shape[1], xp.shape[2], xp.shape[3]
    m = N // C
    kh, kw = w.shape[1], w.shape[2]
    xf = xp.ravel()
    wf = w.ravel()
    of = out.ravel()
    for t in prange(B * N):
        n = t % N
        o = t * ho * wo                                  # out[b, n]
        xb = (t // N * C + n // m) * Hp * Wp             # xp[b, n // m]
        for q in range(ho * wo):
            of[np.uintp(o + q)] = bias[n]
        for i in range(kh):
            for j in range(kw):
                wv = wf[(n * kh + i) * kw + j]
                for oy in range(ho):
                    d = o + oy * wo
                    s0 = xb + (oy * sh + i * dh) * Wp + j * dw
                    if sw == 1:
                        for ox in range(wo):
                            of[np.uintp(d + ox)] += wv * xf[np.uintp(s0 + ox)]
                    else:
                        for ox in range(wo):
                            of[np.uintp(d + ox)] += wv * xf[np.uintp(s0 + ox * sw)]


def gemm_launch(x_shape, w1, bias, stride, padding, dilation, groups, padding_mode, act=None,
                residual=None, w2=None):
    """launch(x, residual) -> output of a GEMM-shaped conv (w2 None) or basis conv (combine w2)
    set up for one input shape and residual ((shape, dtype) or None): gemm.prepare_conv, other
    padding modes than zeros padded first."""
    B, C, H, W = x_shape
    ho, wo = conv_out_hw(H, W, w1.shape[2], w1.shape[3], stride, padding, dilation)
    if padding_mode == "zeros" or not any(padding):
        return prepare_conv(x_shape, w1, bias, stride, padding, dilation, groups, ho, wo, w2, act,
                            residual)
    padded = (B, C, H + padding[0] + padding[2], W + padding[1] + padding[3])
    launch = prepare_conv(padded, w1, bias, stride, (0, 0, 0, 0), dilation, groups, ho, wo, w2,
                          act, residual)
    return lambda x, r: launch(pad2d(x, padding, padding_mode), r)


def conv2d_fast(x, weight, bias, stride, padding, dilation, groups, padding_mode, act=None,
                residual=None):
    """Fast conv2d of float32 C-contiguous x (B, C, H, W) with weight (N, C/G, kh, kw) and bias
    (N) or None; then + residual (an array the output's shape, or one NumPy broadcasts to it)
    and activation `act` (see activation.apply_act). Shapes must have passed Conv2d.infer."""
    B, C, H, W = x.shape
    N, Cg, kh, kw = weight.shape
    if groups != C:  # GEMM-shaped: im2col + sgemm tasks with a fused epilogue
        return gemm_launch(x.shape, weight, bias, stride, padding, dilation, groups, padding_mode,
                           act, residual_key(residual))(x, residual)
    ho, wo = conv_out_hw(H, W, kh, kw, stride, padding, dilation)
    xp = pad2d(x, padding, padding_mode)  # (B, C, H + top + bottom, W + left + right)
    out = empty((B, N, ho, wo))                     # (B, N, H', W'): the step's arena memory
    bias_n = bias if bias is not None else np.zeros(N, np.float32)  # (N)
    _depthwise(xp, weight.reshape(N, kh, kw), bias_n, *stride, *dilation, out)
    return residual_then_act(out, residual, act)


def basis_conv2d_fast(x, basis, combine, bias, stride, padding, dilation, groups, padding_mode,
                      act=None, residual=None):
    """Fast basis conv: stage 1 with basis (G*M, C/G, kh, kw) and stage 2 with combine (N, M)
    (grouped 1x1) in the same GEMM tasks (gemm.prepare_conv), then + bias, + residual and `act`
    in its epilogue. Shapes must have passed BasisConv2d.infer."""
    return gemm_launch(x.shape, basis, bias, stride, padding, dilation, groups, padding_mode, act,
                       residual_key(residual), combine)(x, residual)


def conv_workspace(x_shape, out_shape, weight_shape, groups, attrs, rank=None) -> int:
    """Scratch values conv2d_fast (rank None, weight_shape the weight's) or basis_conv2d_fast
    (weight_shape the basis') allocate besides the output (B, N, H', W'): a padded copy of the
    input where the padding is not zeros or the conv is depthwise, and the GEMM kernels'
    scratch (gemm.plan_conv)."""
    B, C, H, W = x_shape
    N, ho, wo = out_shape[1], out_shape[2], out_shape[3]
    t, l, b, r = attrs["padding"]
    padded = B * C * (H + t + b) * (W + l + r) if t or l or b or r else 0
    if groups == C and rank is None:
        return padded
    if attrs["padding_mode"] == "zeros":
        padded = 0
    else:
        H, W = H + t + b, W + l + r
    plan = plan_conv((B, C, H, W), N, weight_shape[2], weight_shape[3], ho, wo, attrs["stride"],
                     (0, 0, 0, 0) if padded else attrs["padding"], attrs["dilation"], groups, rank)
    return padded + plan.workspace


@njit(cache=True)
def _conv_counted(xp, w, groups, sh, sw, dh, dw, out):
    """out[b, n, oy, ox] = sum over (c, i, j) of w[n, c, i, j] * xp[b, g*C/G + c, oy*sh + i*dh,
    ox*sw + j*dw], g the group of n: plain loops over the padded input xp, one count per
    multiply-add performed. Returns the count."""
    B, N, ho, wo = out.shape
    Cg, kh, kw = w.shape[1], w.shape[2], w.shape[3]
    Ng = N // groups
    macs = 0
    for b in range(B):
        for n in range(N):
            c0 = (n // Ng) * Cg
            for oy in range(ho):
                for ox in range(wo):
                    acc = 0.0
                    for c in range(Cg):
                        for i in range(kh):
                            for j in range(kw):
                                acc += w[n, c, i, j] * xp[b, c0 + c, oy * sh + i * dh, ox * sw + j * dw]
                                macs += 1
                    out[b, n, oy, ox] = acc
    return macs


def conv2d_counted(x, weight, bias, stride, padding, dilation, groups, padding_mode):
    """(conv2d output, Cost executed): MACs counted by `_conv_counted`, one bias add per output
    element when there is a bias. Arguments as conv2d_fast; shapes must have passed infer."""
    B, C, H, W = x.shape
    N, _, kh, kw = weight.shape
    out = np.empty((B, N) + conv_out_hw(H, W, kh, kw, stride, padding, dilation), np.float32)
    macs = _conv_counted(pad2d(x, padding, padding_mode), weight, groups, *stride, *dilation, out)
    if bias is None:
        return out, Cost(macs=macs)
    out += bias[:, None, None]
    return out, Cost(macs=macs, other=out.size)


@register
class Conv2d(Op):
    name = "conv2d"
    arena_output = True
    weights = ("weight",)
    optional_weights = ("bias",)

    def check_attrs(self, node):
        ints(node, "stride", 1, 2)
        ints(node, "padding", 0, 4)
        ints(node, "dilation", 1, 2)
        groups = int_min(node, "groups", 1)
        if attr(node, "padding_mode", str) not in PADDING_MODES:
            raise FormatError(f"node '{node.name}' ({node.op}): padding_mode must be one of "
                              f"{sorted(PADDING_MODES)}, got {node.attrs['padding_mode']!r}")
        w = node.weights.get("weight")
        if w is not None and w.ndim == 4 and w.shape[0] % groups:
            raise FormatError(f"node '{node.name}' ({node.op}): groups {groups} does not divide "
                              f"the {w.shape[0]} output channels")

    def infer(self, node, in_shapes):
        a = node.attrs
        x = tuple(in_shapes[0])
        if len(x) != 4:
            raise mismatch(node, f"expected input (B, C, H, W), got {x}")
        B, C, H, W = x
        g = a["groups"]
        w = node.weights.get("weight")
        shape = None if w is None else w.shape
        if shape is None or len(shape) != 4 or shape[0] % g or shape[1] * g != C or 0 in shape:
            raise mismatch(node, f"expected weight (N, {C}/groups={g}, kh, kw) with N divisible "
                                 f"by {g} for input {x}, got {shape}")
        check_weight(node, "weight", shape)
        if "bias" in node.weights:
            check_weight(node, "bias", (shape[0],))
        t, l, b, r = a["padding"]
        # torch refuses reflect padding >= size and circular padding > size
        limit = {"reflect": 1, "circular": 0}.get(a["padding_mode"])
        if limit is not None and (max(t, b) > H - limit or max(l, r) > W - limit):
            raise mismatch(node, f"{a['padding_mode']} padding {a['padding']} too large for "
                                 f"input {x}")
        ho, wo = conv_out_hw(H, W, shape[2], shape[3], a["stride"], a["padding"], a["dilation"])
        if ho < 1 or wo < 1:
            raise mismatch(node, f"expected an input larger than the dilated kernel, got {x} "
                                 f"for kernel {shape[2:]}: output {ho}x{wo}")
        return (B, shape[0], ho, wo)

    def reference(self, node, x):
        """Sum over kernel taps (i, j) of W[:, :, i, j] applied to the input seen by that tap."""
        a = node.attrs
        (sh, sw), (dh, dw), G = a["stride"], a["dilation"], a["groups"]
        w = node.weights["weight"]
        N, Cg, kh, kw = w.shape
        B, C, H, W = x.shape
        ho, wo = conv_out_hw(H, W, kh, kw, a["stride"], a["padding"], a["dilation"])
        xp = pad2d(x, a["padding"], a["padding_mode"])
        wr = w.reshape(G, N // G, Cg, kh, kw)  # (G, N/G, C/G, kh, kw) weights by group
        out = np.zeros((B, G, N // G, ho * wo), np.float32)
        for i in range(kh):
            for j in range(kw):
                xs = tap(xp, i * dh, j * dw, ho, wo, sh, sw).reshape(B, G, Cg, ho * wo)
                out += wr[:, :, :, i, j] @ xs
        if "bias" in node.weights:
            out += node.weights["bias"].reshape(G, N // G, 1)
        return out.reshape(B, N, ho, wo)

    def run(self, node, x):
        a = node.attrs
        return conv2d_fast(x, node.weights["weight"], node.weights.get("bias"), a["stride"],
                           a["padding"], a["dilation"], a["groups"], a["padding_mode"])

    def run_fused(self, node, xs, act=None, residual=None):
        a = node.attrs
        return conv2d_fast(xs[0], node.weights["weight"], node.weights.get("bias"), a["stride"],
                           a["padding"], a["dilation"], a["groups"], a["padding_mode"], act,
                           residual)

    def launcher(self, node, act):
        """GEMM-shaped convs set up once per input shape (gemm_launch); depthwise run_fused."""
        a, w = node.attrs, node.weights

        def prepare(x_shape, residual):
            if a["groups"] == x_shape[1]:
                return lambda x, r: self.run_fused(node, [x], act, r)
            return gemm_launch(x_shape, w["weight"], w.get("bias"), a["stride"], a["padding"],
                               a["dilation"], a["groups"], a["padding_mode"], act, residual)
        return per_shape(prepare)

    def workspace(self, node, in_shapes, out_shape):
        """Scratch elements: a padded input copy where needed and the GEMM tasks' im2col
        columns (conv_workspace)."""
        return conv_workspace(in_shapes[0], out_shape, node.weights["weight"].shape,
                              node.attrs.get("groups", 1), node.attrs)

    def cost(self, node, in_shapes, out_shape):
        _, Cg, kh, kw = node.weights["weight"].shape
        return Cost(macs=numel(out_shape) * Cg * kh * kw,
                    other=numel(out_shape) if "bias" in node.weights else 0)

    def counted(self, node, x):
        a = node.attrs
        return conv2d_counted(x, node.weights["weight"], node.weights.get("bias"), a["stride"],
                              a["padding"], a["dilation"], a["groups"], a["padding_mode"])

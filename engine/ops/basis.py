"""BasisConv ops: a conv / linear layer as M fixed basis filters per group plus 1D combine weights.

basis_conv2d (attrs: conv2d's plus `rank` M; weights basis (G*M, C/G, kh, kw) fixed, combine
(N, M), bias (N) optional):
  stage 1  s = conv2d(x, basis) with the layer's stride, padding, dilation, groups -> G*M channels;
  stage 2  grouped 1x1 combine with G groups: output channel n of group g = n // (N/G) is
           sum_m combine[n, m] * s[g*M + m] + bias[n].
basis_linear (attrs: rank M; weights basis (M, in) fixed, combine (out, M), bias (out) optional):
  y = (x @ basis.T) @ combine.T + bias over the last dim.

The reference is the composition of the conv2d / linear reference kernels, so the op is defined
by the two stages above and nothing else. Fast path (conv.basis_conv2d_fast -> gemm.prepare_conv):
both stages in the same tasks; stage 1 once per input (every output channel of a group reuses
the same G*M responses). One group, where its tiles waste little: the direct conv (a block's
responses by its micro-kernel, then the combine as a 1x1 conv over them); else by im2col +
sgemm, or with stride 1 and M < C/G by kn2row (one sgemm over the taps, then shifted adds),
stage 2 one sgemm (N/G, M) @ (M, columns) per task and group. Bias, a fused residual add and the
activation in the epilogue.
Cost: macs = B*H'*W'*(G*M*d + N*M) with d = (C/G)*kh*kw; other = B*N*H'*W' bias adds when there
is a bias (basis_linear: macs = rows*(M*in + out*M), other = rows*out).
Counted: the two stages through the counting conv / linear kernels, their counts added.
"""
from __future__ import annotations

from ..graph import Node
from . import Cost, Op, mismatch, numel, per_shape, register
from .conv import Conv2d, basis_conv2d_fast, check_weight, conv_workspace, gemm_launch
from .linear import Linear, linear_counted, linear_fast
from .shape import int_min

_CONV = Conv2d()
_LINEAR = Linear()
_ONE_BY_ONE = {"stride": [1, 1], "padding": [0, 0, 0, 0], "dilation": [1, 1], "padding_mode": "zeros"}


def basis_macs(N: int, d: int, groups: int, M: int) -> int:
    """MACs per output position of a basis layer: G*M*d (stage 1) + N*M (stage 2)."""
    return groups * M * d + N * M


def break_even_rank(N: int, d: int, groups: int = 1) -> float:
    """The M at which the basis form costs as many MACs as the dense layer (N*d): it saves only
    below N*d / (G*d + N), i.e. (N/G)*d / (d + N/G) per group."""
    return N * d / (groups * d + N)


def _stages(node: Node) -> tuple[Node, Node]:
    """The two conv2d nodes a basis_conv2d node is made of (they carry its name for messages)."""
    a = {k: v for k, v in node.attrs.items() if k != "rank"}
    w = node.weights
    N, M = w["combine"].shape
    stage2 = {"weight": w["combine"].reshape(N, M, 1, 1)}  # (N, M, 1, 1) grouped 1x1 combine
    if "bias" in w:
        stage2["bias"] = w["bias"]
    return (Node(node.name, node.op, node.inputs, a, {"weight": w["basis"]}),
            Node(node.name, node.op, [node.name], dict(_ONE_BY_ONE, groups=a["groups"]), stage2))


@register
class BasisConv2d(Op):
    name = "basis_conv2d"
    arena_output = True
    weights = ("basis", "combine")
    optional_weights = ("bias",)
    fixed_weights = ("basis",)

    def check_attrs(self, node):
        _CONV.check_attrs(node)
        int_min(node, "rank", 1)

    def infer(self, node, in_shapes):
        x = tuple(in_shapes[0])
        if len(x) != 4:
            raise mismatch(node, f"expected input (B, C, H, W), got {x}")
        G, M = node.attrs["groups"], node.attrs["rank"]
        basis, combine = node.weights.get("basis"), node.weights.get("combine")
        if basis is None or basis.ndim != 4 or basis.shape[0] != G * M or basis.shape[1] * G != x[1] \
                or 0 in basis.shape:
            raise mismatch(node, f"expected basis (groups*rank={G * M}, {x[1]}/groups={G}, kh, kw) "
                                 f"for input {x}, got {None if basis is None else basis.shape}")
        check_weight(node, "basis", basis.shape)
        if combine is None or combine.ndim != 2 or combine.shape[1] != M or combine.shape[0] % G \
                or combine.shape[0] == 0:
            raise mismatch(node, f"expected combine (N, rank={M}) with N divisible by groups={G}, "
                                 f"got {None if combine is None else combine.shape}")
        check_weight(node, "combine", combine.shape)
        if "bias" in node.weights:
            check_weight(node, "bias", (combine.shape[0],))
        stage1, _ = _stages(node)
        B, _, ho, wo = _CONV.infer(stage1, [x])  # spatial checks: padding limits, output size
        return (B, combine.shape[0], ho, wo)

    def reference(self, node, x):
        stage1, stage2 = _stages(node)
        return _CONV.reference(stage2, _CONV.reference(stage1, x))

    def run(self, node, x):
        return self.run_fused(node, [x])

    def run_fused(self, node, xs, act=None, residual=None):
        """Both stages in the same GEMM tasks, bias, residual add and activation in their
        epilogue (conv.basis_conv2d_fast)."""
        a, w = node.attrs, node.weights
        return basis_conv2d_fast(xs[0], w["basis"], w["combine"], w.get("bias"), a["stride"],
                                 a["padding"], a["dilation"], a["groups"], a["padding_mode"], act,
                                 residual)

    def launcher(self, node, act):
        """Set up once per input shape (conv.gemm_launch)."""
        a, w = node.attrs, node.weights
        return per_shape(lambda x_shape, residual: gemm_launch(
            x_shape, w["basis"], w.get("bias"), a["stride"], a["padding"], a["dilation"],
            a["groups"], a["padding_mode"], act, residual, w["combine"]))

    def workspace(self, node, in_shapes, out_shape):
        """Scratch elements besides the output: the fused kernel's (conv_workspace: im2col or
        kn2row columns and the stage-1 responses of a task or batch group)."""
        return conv_workspace(in_shapes[0], out_shape, node.weights["basis"].shape,
                              node.attrs["groups"], node.attrs, node.attrs["rank"])

    def cost(self, node, in_shapes, out_shape):
        GM, Cg, kh, kw = node.weights["basis"].shape
        N, M = node.weights["combine"].shape
        positions = numel(out_shape) // N
        return Cost(macs=positions * basis_macs(N, Cg * kh * kw, GM // M, M),
                    other=numel(out_shape) if "bias" in node.weights else 0)

    def counted(self, node, x):
        stage1, stage2 = _stages(node)
        s, cost1 = _CONV.counted(stage1, x)
        y, cost2 = _CONV.counted(stage2, s)
        return y, cost1 + cost2

    def count_details(self, node, in_shapes, out_shape):
        GM, Cg, kh, kw = node.weights["basis"].shape
        N, M = node.weights["combine"].shape
        return {"rank": M, "break_even_rank": break_even_rank(N, Cg * kh * kw, GM // M)}


@register
class BasisLinear(Op):
    name = "basis_linear"
    arena_output = True
    weights = ("basis", "combine")
    optional_weights = ("bias",)
    fixed_weights = ("basis",)

    def check_attrs(self, node):
        int_min(node, "rank", 1)

    def infer(self, node, in_shapes):
        x = tuple(in_shapes[0])
        M = node.attrs["rank"]
        combine = node.weights.get("combine")
        if not x:
            raise mismatch(node, f"expected input (..., in), got {x}")
        check_weight(node, "basis", (M, x[-1]))
        if combine is None or combine.ndim != 2 or combine.shape[1] != M or combine.shape[0] == 0:
            raise mismatch(node, f"expected combine (out, rank={M}), "
                                 f"got {None if combine is None else combine.shape}")
        check_weight(node, "combine", combine.shape)
        if "bias" in node.weights:
            check_weight(node, "bias", (combine.shape[0],))
        return x[:-1] + (combine.shape[0],)

    def reference(self, node, x):
        w = node.weights
        stage2 = {"weight": w["combine"]}  # (out, M)
        if "bias" in w:
            stage2["bias"] = w["bias"]
        stage1 = _LINEAR.reference(Node(node.name, node.op, node.inputs, {}, {"weight": w["basis"]}), x)
        return _LINEAR.reference(Node(node.name, node.op, [node.name], {}, stage2), stage1)

    def run(self, node, x):
        w = node.weights
        return linear_fast(linear_fast(x, w["basis"], None), w["combine"], w.get("bias"))

    def workspace(self, node, in_shapes, out_shape):
        """Scratch elements besides the output: the stage-1 responses (rows, M)."""
        return numel(out_shape[:-1]) * node.attrs["rank"]

    def cost(self, node, in_shapes, out_shape):
        M, d = node.weights["basis"].shape
        N = node.weights["combine"].shape[0]
        rows = numel(out_shape[:-1])
        return Cost(macs=rows * basis_macs(N, d, 1, M), other=rows * N if "bias" in node.weights else 0)

    def counted(self, node, x):
        w = node.weights
        s, cost1 = linear_counted(x, w["basis"], None)
        y, cost2 = linear_counted(s, w["combine"], w.get("bias"))
        return y, cost1 + cost2

    def count_details(self, node, in_shapes, out_shape):
        M, d = node.weights["basis"].shape
        return {"rank": M, "break_even_rank": break_even_rank(node.weights["combine"].shape[0], d)}


"""Every dense op, reference and fast kernel, against torch.nn.functional; attribute and shape
checks; counting kernels execute what cost counts (hand-computed counts: tests/test_count.py)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.errors import FormatError, ShapeMismatch
from engine.graph import Node
from engine.ops import OPS, load_all
from engine.ops.conv import _depthwise, conv2d_fast
from engine.ops.linear import linear_fast
from engine.ops.pool import _pool2d

load_all()


def rand(*shape, scale=1.0, seed=0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def t(a):
    return torch.from_numpy(a)


def assert_close_rel(out, want, tol=1e-5):
    """out is a float32 C-contiguous array of want's shape with max|out - want| <= tol*max|want|."""
    want = want.numpy() if isinstance(want, torch.Tensor) else np.asarray(want)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.flags.c_contiguous
    assert out.shape == want.shape
    assert np.abs(out - want).max() <= tol * np.abs(want).max()


def node(op, attrs=None, weights=None, n_inputs=1):
    return Node("n", op, [f"x{i}" for i in range(n_inputs)], attrs or {}, weights or {})


def check(op, attrs, xs, want, weights=None):
    """check_attrs and infer pass; reference, run and the counting kernel all match want, inputs
    untouched; the counting kernel executes what cost counts."""
    n = node(op, attrs, weights, len(xs))
    OPS[op].check_attrs(n)
    assert OPS[op].infer(n, [x.shape for x in xs]) == tuple(want.shape)
    before = [x.copy() for x in xs]
    for kernel in (OPS[op].reference, OPS[op].run):
        assert_close_rel(kernel(n, *xs), want)
    out, executed = OPS[op].counted(n, *xs)
    assert_close_rel(out, want)
    assert executed == OPS[op].cost(n, [x.shape for x in xs], tuple(want.shape))
    for x, b in zip(xs, before):
        np.testing.assert_array_equal(x, b)


# --- conv2d ----------------------------------------------------------------------------------

CONV_CASES = [
    # C, N, H, W, kh, kw, stride, padding [t, l, b, r], dilation, groups, padding_mode, bias
    (3, 8, 13, 11, 3, 3, [1, 1], [1, 1, 1, 1], [1, 1], 1, "zeros", True),
    (4, 6, 13, 11, 3, 2, [2, 1], [0, 1, 1, 0], [1, 1], 2, "zeros", False),
    (4, 8, 12, 12, 4, 4, [1, 1], [1, 1, 2, 2], [1, 1], 1, "zeros", True),     # 'same', even kernel
    (4, 4, 13, 11, 3, 3, [1, 1], [1, 1, 1, 1], [2, 2], 1, "zeros", True),
    (5, 7, 13, 11, 2, 3, [2, 2], [1, 0, 0, 2], [2, 1], 1, "zeros", False),
    (6, 6, 13, 11, 3, 3, [2, 2], [1, 1, 1, 1], [1, 1], 6, "zeros", True),     # depthwise
    (3, 6, 9, 9, 5, 5, [1, 1], [2, 2, 2, 2], [1, 1], 3, "zeros", False),      # depthwise x2
    (4, 4, 13, 11, 3, 3, [2, 1], [2, 1, 0, 2], [2, 2], 4, "zeros", True),     # depthwise, dilated
    (1, 8, 13, 11, 5, 5, [1, 1], [2, 2, 2, 2], [1, 1], 1, "zeros", True),     # single channel
    (8, 5, 7, 9, 1, 1, [1, 1], [0, 0, 0, 0], [1, 1], 1, "zeros", True),       # 1x1 direct
    (8, 6, 7, 9, 1, 1, [1, 1], [0, 0, 0, 0], [1, 1], 2, "zeros", False),      # 1x1 grouped
    (8, 5, 7, 9, 1, 1, [2, 2], [0, 0, 0, 0], [1, 1], 1, "zeros", True),       # 1x1 strided
] + [
    case for mode in ("reflect", "replicate", "circular") for case in [
        (4, 6, 13, 11, 3, 3, [1, 2], [1, 2, 1, 0], [1, 1], 1, mode, True),
        (4, 4, 10, 9, 3, 3, [1, 1], [2, 2, 2, 2], [2, 2], 2, mode, False),
        (4, 4, 9, 8, 3, 3, [2, 1], [1, 1, 1, 1], [1, 1], 4, mode, True),
    ]
]


def conv_case(C, N, H, W, kh, kw, stride, padding, dilation, groups, mode, bias):
    x = rand(2, C, H, W, seed=1)
    weights = {"weight": rand(N, C // groups, kh, kw, seed=2)}
    if bias:
        weights["bias"] = rand(N, seed=3)
    attrs = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups,
             "padding_mode": mode}
    t_, l, b, r = padding
    xp = F.pad(t(x), (l, r, t_, b), mode="constant" if mode == "zeros" else mode)
    want = F.conv2d(xp, t(weights["weight"]), t(weights["bias"]) if bias else None,
                    stride=stride, dilation=dilation, groups=groups)
    return x, attrs, weights, want


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv2d(case):
    x, attrs, weights, want = conv_case(*case)
    check("conv2d", attrs, [x], want, weights)


ACTS = [(("relu",), F.relu), (("clip", -0.5, 0.7), lambda y: y.clamp(-0.5, 0.7)),
        (("leaky_relu", 0.1), lambda y: F.leaky_relu(y, 0.1)), (("sigmoid",), torch.sigmoid),
        (("tanh",), torch.tanh), (("silu",), F.silu), (("hardswish",), F.hardswish)]


@pytest.mark.parametrize("act,fn", ACTS, ids=lambda a: a[0] if isinstance(a, tuple) else "")
@pytest.mark.parametrize("case", [CONV_CASES[0], CONV_CASES[5]], ids=["im2col", "depthwise"])
def test_conv2d_fused_act(case, act, fn):
    x, a, w, want = conv_case(*case)
    out = conv2d_fast(x, w["weight"], w.get("bias"), a["stride"], a["padding"], a["dilation"],
                      a["groups"], a["padding_mode"], act)
    assert_close_rel(out, fn(want))


# --- linear ------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 7), (7,)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear(shape, bias):
    x = rand(*shape, seed=1)
    w = {"weight": rand(4, 7, seed=2)} | ({"bias": rand(4, seed=3)} if bias else {})
    check("linear", {}, [x], F.linear(t(x), t(w["weight"]), t(w["bias"]) if bias else None), w)


@pytest.mark.parametrize("act,fn", ACTS, ids=lambda a: a[0] if isinstance(a, tuple) else "")
def test_linear_fused_act(act, fn):
    x, w, b = rand(3, 2, 7, seed=1), rand(4, 7, seed=2), rand(4, seed=3)
    assert_close_rel(linear_fast(x, w, b, act), fn(F.linear(t(x), t(w), t(b))))


# --- batch_norm and activations ------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 5), (2, 3, 6, 5)])
@pytest.mark.parametrize("eps", [1e-5, 1e-3])
def test_batch_norm(shape, eps):
    x = rand(*shape, seed=1)
    w = {"weight": rand(3, seed=2), "bias": rand(3, seed=3), "running_mean": rand(3, seed=4),
         "running_var": np.abs(rand(3, seed=5)) + 0.1}
    want = F.batch_norm(t(x), t(w["running_mean"]), t(w["running_var"]), t(w["weight"]),
                        t(w["bias"]), training=False, eps=eps)
    check("batch_norm", {"eps": eps}, [x], want, w)


ACT_OPS = [
    ("relu", {}, F.relu),
    ("clip", {"min": -0.5, "max": 6.0}, lambda y: y.clamp(-0.5, 6.0)),
    ("clip", {"min": 0, "max": 6}, F.relu6),
    ("leaky_relu", {"negative_slope": 0.01}, lambda y: F.leaky_relu(y, 0.01)),
    ("sigmoid", {}, torch.sigmoid),
    ("tanh", {}, torch.tanh),
    ("silu", {}, F.silu),
    ("hardswish", {}, F.hardswish),
]


@pytest.mark.parametrize("op,attrs,fn", ACT_OPS, ids=[a[0] for a in ACT_OPS])
def test_activation(op, attrs, fn):
    x = rand(2, 3, 5, 4, scale=4, seed=1)
    x[0, 0, 0, :4] = [-100, 100, -3, 3]  # sigmoid overflow, hardswish breakpoints
    check(op, attrs, [x], fn(t(x)))


@pytest.mark.parametrize("shape,wshape", [((2, 3, 5, 4), (3,)), ((2, 3, 5, 4), (1,)),
                                          ((6, 3), (3,)), ((7,), (1,))])
def test_prelu(shape, wshape):
    x, w = rand(*shape, seed=1), rand(*wshape, seed=2)
    check("prelu", {}, [x], F.prelu(t(x), t(w)), {"weight": w})


@pytest.mark.parametrize("op,fn", [("softmax", F.softmax), ("log_softmax", F.log_softmax)])
@pytest.mark.parametrize("axis", [0, 1, 2, 3])
def test_softmax(op, fn, axis):
    x = rand(2, 3, 4, 5, scale=10, seed=1)
    x[0, 0, 0, 0] = 200  # exp overflows without the max shift
    check(op, {"axis": axis}, [x], fn(t(x), dim=axis))


# --- pools -------------------------------------------------------------------------------------

@pytest.mark.parametrize("k,s,p,d,ceil", [
    ([3, 3], [2, 2], [1, 1], [1, 1], False), ([3, 3], [2, 2], [1, 1], [1, 1], True),
    ([2, 2], [2, 2], [0, 0], [1, 1], True), ([3, 3], [3, 3], [1, 1], [2, 2], True),
    ([3, 3], [1, 1], [0, 0], [1, 1], False), ([3, 2], [2, 1], [1, 1], [1, 2], True),
    ([2, 2], [3, 3], [1, 1], [1, 1], True),
])
def test_max_pool2d(k, s, p, d, ceil):
    x = rand(2, 3, 13, 11, seed=1)
    want = F.max_pool2d(t(x), k, s, p, d, ceil_mode=ceil)
    check("max_pool2d", {"kernel": k, "stride": s, "padding": p, "dilation": d, "ceil_mode": ceil},
          [x], want)


def test_max_pool2d_nan():
    x = rand(1, 2, 6, 6, seed=1)
    x[0, 0, 1, 2] = np.nan  # seen first, in the middle and last by overlapping windows
    n = node("max_pool2d", {"kernel": [3, 3], "stride": [1, 1], "padding": [1, 1],
                            "dilation": [1, 1], "ceil_mode": False})
    want = np.isnan(F.max_pool2d(t(x), 3, 1, 1).numpy())
    assert want.sum() == 9
    for kernel in (OPS["max_pool2d"].reference, OPS["max_pool2d"].run,
                   lambda n, x: OPS["max_pool2d"].counted(n, x)[0]):
        np.testing.assert_array_equal(np.isnan(kernel(n, x)), want)


@pytest.mark.parametrize("k,s,p,ceil,include,div", [
    ([3, 3], [2, 2], [1, 1], False, True, None), ([3, 3], [2, 2], [1, 1], True, True, None),
    ([3, 3], [2, 2], [1, 1], True, False, None), ([2, 2], [2, 2], [0, 0], True, True, None),
    ([3, 3], [2, 2], [1, 1], True, True, 5), ([3, 2], [2, 1], [1, 1], False, False, None),
    ([4, 4], [3, 3], [2, 2], True, True, None), ([4, 4], [3, 3], [2, 2], True, False, None),
    ([2, 2], [2, 2], [1, 1], True, False, 3), ([5, 3], [4, 2], [2, 1], True, True, None),
])
def test_avg_pool2d(k, s, p, ceil, include, div):
    x = rand(2, 3, 13, 11, seed=1)
    want = F.avg_pool2d(t(x), k, s, p, ceil_mode=ceil, count_include_pad=include,
                        divisor_override=div)
    check("avg_pool2d", {"kernel": k, "stride": s, "padding": p, "ceil_mode": ceil,
                         "count_include_pad": include, "divisor_override": div}, [x], want)


@pytest.mark.parametrize("size", [[3, 2], [1, 1], [7, 5], [2, None], [None, 3], [4, 4], [9, 8]],
                         ids=str)
def test_adaptive_avg_pool2d(size):
    x = rand(2, 3, 7, 5, seed=1)
    check("adaptive_avg_pool2d", {"output_size": size}, [x],
          F.adaptive_avg_pool2d(t(x), tuple(size)))


@pytest.mark.parametrize("dims", [[1], [2, 3], [0, 3], [0, 1, 2, 3]], ids=str)
@pytest.mark.parametrize("keepdim", [True, False])
def test_mean(dims, keepdim):
    x = rand(2, 3, 4, 5, seed=1)
    check("mean", {"dims": dims, "keepdim": keepdim}, [x], t(x).mean(dims, keepdim=keepdim))


# --- elementwise and shape ops -----------------------------------------------------------------

@pytest.mark.parametrize("op,fn", [("add", torch.add), ("mul", torch.mul)])
@pytest.mark.parametrize("shapes", [[(2, 3, 4, 5), (2, 3, 4, 5)], [(2, 3, 4, 5), (3, 1, 1)],
                                    [(4, 1), (3, 1, 5)], [(1, 3, 1, 1), (2, 3, 4, 5)]], ids=str)
def test_binary(op, fn, shapes):
    a, b = rand(*shapes[0], seed=1), rand(*shapes[1], seed=2)
    check(op, {}, [a, b], fn(t(a), t(b)))


@pytest.mark.parametrize("op,fn", [("add", torch.add), ("mul", torch.mul)])
def test_binary_scalar(op, fn):
    a = rand(2, 3, 4, seed=1)
    check(op, {"scalar": 2.5}, [a], fn(t(a), 2.5))


X4 = rand(2, 3, 4, 5, seed=1)


@pytest.mark.parametrize("op,attrs,want", [
    ("flatten", {"start_dim": 1, "end_dim": 3}, t(X4).flatten(1)),
    ("flatten", {"start_dim": 0, "end_dim": 1}, t(X4).flatten(0, 1)),
    ("flatten", {"start_dim": 2, "end_dim": 2}, t(X4)),
    ("reshape", {"shape": [0, -1]}, t(X4).reshape(2, 60)),
    ("reshape", {"shape": [0, 3, -1]}, t(X4).reshape(2, 3, 20)),
    ("reshape", {"shape": [-1]}, t(X4).reshape(120)),
    ("reshape", {"shape": [4, 0, 10]}, t(X4).reshape(4, 3, 10)),
    ("permute", {"perm": [0, 2, 3, 1]}, t(X4).permute(0, 2, 3, 1)),
    ("permute", {"perm": [3, 2, 1, 0]}, t(X4).permute(3, 2, 1, 0)),
    ("identity", {}, t(X4)),
], ids=lambda v: str(v) if isinstance(v, str) else "")
def test_shape_ops(op, attrs, want):
    check(op, attrs, [X4], want)


@pytest.mark.parametrize("axis", [0, 1, 2, 3])
def test_concat(axis):
    xs = [rand(*[2, 3, 4, 5][:axis], n, *[2, 3, 4, 5][axis + 1:], seed=n) for n in (1, 2, 3)]
    check("concat", {"axis": axis}, xs, torch.cat([t(x) for x in xs], axis))


# --- attribute checks: FormatError ---------------------------------------------------------------

CONV = {"stride": [1, 1], "padding": [1, 1, 1, 1], "dilation": [1, 1], "groups": 1,
        "padding_mode": "zeros"}
MAXP = {"kernel": [3, 3], "stride": [2, 2], "padding": [1, 1], "dilation": [1, 1],
        "ceil_mode": False}
AVGP = {"kernel": [3, 3], "stride": [2, 2], "padding": [1, 1], "ceil_mode": False,
        "count_include_pad": True, "divisor_override": None}


def edit(attrs, **changes):
    """attrs with changes applied; a change to ... deletes the key."""
    out = {**attrs, **changes}
    return {k: v for k, v in out.items() if v is not ...}


BAD_ATTRS = [
    ("conv2d", edit(CONV, stride=[0, 1])), ("conv2d", edit(CONV, stride=[1])),
    ("conv2d", edit(CONV, stride=1)), ("conv2d", edit(CONV, stride=[1.0, 1])),
    ("conv2d", edit(CONV, padding=[-1, 0, 0, 0])), ("conv2d", edit(CONV, padding=[1, 1])),
    ("conv2d", edit(CONV, dilation=[0, 1])), ("conv2d", edit(CONV, groups=0)),
    ("conv2d", edit(CONV, groups=True)), ("conv2d", edit(CONV, groups=3)),
    ("conv2d", edit(CONV, padding_mode="mirror")), ("conv2d", edit(CONV, groups=...)),
    ("max_pool2d", edit(MAXP, kernel=[0, 2])), ("max_pool2d", edit(MAXP, stride=[0, 1])),
    ("max_pool2d", edit(MAXP, padding=[2, 1])), ("max_pool2d", edit(MAXP, ceil_mode=1)),
    ("max_pool2d", edit(MAXP, dilation=[1, 0])), ("max_pool2d", edit(MAXP, dilation=...)),
    ("avg_pool2d", edit(AVGP, divisor_override=0)), ("avg_pool2d", edit(AVGP, count_include_pad=...)),
    ("avg_pool2d", edit(AVGP, kernel=[3])), ("avg_pool2d", edit(AVGP, padding=[0, -1])),
    ("adaptive_avg_pool2d", {"output_size": [0, 2]}), ("adaptive_avg_pool2d", {"output_size": [2]}),
    ("adaptive_avg_pool2d", {"output_size": ["a", 1]}),
    ("mean", {"dims": [], "keepdim": True}), ("mean", {"dims": [1, 1], "keepdim": True}),
    ("mean", {"dims": [-1], "keepdim": True}), ("mean", {"dims": [1]}),
    ("flatten", {"start_dim": 2, "end_dim": 1}), ("flatten", {"start_dim": -1, "end_dim": 1}),
    ("reshape", {"shape": [-1, -1]}), ("reshape", {"shape": [-2, 4]}), ("reshape", {"shape": 4}),
    ("permute", {"perm": [0, 0, 1]}), ("permute", {"perm": [1, 2]}),
    ("concat", {"axis": -1}), ("softmax", {"axis": -1}), ("log_softmax", {}),
    ("clip", {"min": 0.0}), ("clip", {"min": "0", "max": 6}), ("leaky_relu", {}),
    ("batch_norm", {"eps": -1.0}), ("batch_norm", {"eps": "1e-5"}),
]


@pytest.mark.parametrize("op,attrs", BAD_ATTRS, ids=[f"{o}-{i}" for i, (o, _) in enumerate(BAD_ATTRS)])
def test_bad_attrs(op, attrs):
    n = node(op, attrs, {"weight": rand(8, 4, 3, 3)} if op == "conv2d" else None)
    with pytest.raises(FormatError):
        OPS[op].check_attrs(n)


@pytest.mark.parametrize("inputs,attrs", [(1, {}), (2, {"scalar": 1.0}), (3, {}), (1, {"scalar": "1"})])
def test_binary_bad_attrs(inputs, attrs):
    with pytest.raises(FormatError):
        OPS["add"].check_attrs(node("add", attrs, n_inputs=inputs))


# --- shape checks: ShapeMismatch ---------------------------------------------------------------

W8 = {"weight": rand(8, 4, 3, 3), "bias": rand(8)}
BN = dict({k: rand(4) for k in ("weight", "bias", "running_mean")}, running_var=np.abs(rand(4)) + 0.5)

BAD_SHAPES = [
    ("conv2d", CONV, W8, [(1, 4, 8)]),
    ("conv2d", CONV, W8, [(1, 3, 8, 8)]),
    ("conv2d", edit(CONV, groups=2), W8, [(1, 4, 8, 8)]),
    ("conv2d", CONV, {"weight": rand(8, 4, 3, 3), "bias": rand(4)}, [(1, 4, 8, 8)]),
    ("conv2d", CONV, {"weight": rand(8, 4, 3, 3).astype(np.float64)}, [(1, 4, 8, 8)]),
    ("conv2d", CONV, {"weight": rand(8, 4, 3)}, [(1, 4, 8, 8)]),
    ("conv2d", CONV, {}, [(1, 4, 8, 8)]),
    ("conv2d", edit(CONV, padding=[0, 0, 0, 0]), W8, [(1, 4, 2, 8)]),
    ("conv2d", edit(CONV, padding=[2, 0, 2, 0], padding_mode="reflect"), W8, [(1, 4, 2, 8)]),
    ("conv2d", edit(CONV, padding=[0, 3, 0, 3], padding_mode="circular"), W8, [(1, 4, 8, 2)]),
    ("linear", {}, {"weight": rand(5, 7)}, [(2, 6)]),
    ("linear", {}, {"weight": rand(5, 7), "bias": rand(7)}, [(2, 7)]),
    ("linear", {}, {"weight": rand(5, 7)}, [()]),
    ("batch_norm", {"eps": 1e-5}, BN, [(2, 3, 4, 4)]),
    ("batch_norm", {"eps": 1e-5}, BN, [(4,)]),
    ("batch_norm", {"eps": 1e-5}, BN | {"running_var": rand(4, 1)}, [(2, 4)]),
    ("prelu", {}, {"weight": rand(3)}, [(2, 4, 5, 5)]),
    ("prelu", {}, {"weight": rand(2, 2)}, [(2, 4, 5, 5)]),
    ("max_pool2d", MAXP, {}, [(1, 2, 8)]),
    ("max_pool2d", edit(MAXP, padding=[0, 0]), {}, [(1, 2, 2, 8)]),
    ("avg_pool2d", edit(AVGP, padding=[0, 0]), {}, [(1, 2, 8, 2)]),
    ("adaptive_avg_pool2d", {"output_size": [2, 2]}, {}, [(2, 8)]),
    ("mean", {"dims": [4], "keepdim": True}, {}, [(1, 2, 3, 4)]),
    ("flatten", {"start_dim": 1, "end_dim": 4}, {}, [(1, 2, 3, 4)]),
    ("reshape", {"shape": [5, -1]}, {}, [(2, 3, 4)]),
    ("reshape", {"shape": [5, 5]}, {}, [(2, 3, 4)]),
    ("reshape", {"shape": [0, 0, 0, 0]}, {}, [(2, 3, 4)]),
    ("reshape", {"shape": [0, -1]}, {}, [(0, 3, 4)]),
    ("permute", {"perm": [1, 0]}, {}, [(2, 3, 4)]),
    ("concat", {"axis": 1}, {}, [(2, 3, 4), (2, 3, 5)]),
    ("concat", {"axis": 1}, {}, [(2, 3, 4), (2, 3)]),
    ("concat", {"axis": 3}, {}, [(2, 3, 4), (2, 3, 4)]),
    ("add", {}, {}, [(2, 3), (4,)]),
    ("softmax", {"axis": 2}, {}, [(2, 3)]),
]


@pytest.mark.parametrize("op,attrs,weights,shapes", BAD_SHAPES,
                         ids=[f"{o}-{i}" for i, (o, *_) in enumerate(BAD_SHAPES)])
def test_bad_shapes(op, attrs, weights, shapes):
    n = node(op, attrs, weights, len(shapes))
    OPS[op].check_attrs(n)
    with pytest.raises(ShapeMismatch):
        OPS[op].infer(n, shapes)


def test_kernels_compiled_once():
    """Each Numba kernel is called with one type signature only (compile time counts)."""
    for kernel in (_depthwise, _pool2d):
        assert len(kernel.signatures) <= 1, kernel.signatures

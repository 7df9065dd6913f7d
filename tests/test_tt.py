"""Tensor-train layers: TT-SVD accuracy and error bound, the engine's tt_conv2d / tt_linear (both
strategies and the reference) against the torch TT modules, export + verify, torch-free compress."""
import os
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn as nn

import engine
from converters import LEAF_EXPORTERS, export
from converters.tt import factorize, tt_svd
from converters.tt_layers import TTConv2d, TTLinear, to_tt
from engine.errors import FormatError, LimitError, ShapeMismatch
from engine.format import Limits
from engine.graph import Graph, Node, TensorSpec
from engine.ops import OPS, load_all
from engine.ops import tt
from engine.ops.tt import STRATEGIES, chain_macs, conv_kernel, set_strategy, tt_matrix
from engine.plan import Plan
from engine.verify import compare

load_all()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def rel(got, want) -> float:
    got, want = np.asarray(got), np.asarray(want)
    assert np.isfinite(want).all() and want.any()      # where compare() falls back to looser checks
    return compare(got, want)[1]                        # inf on a shape mismatch (no broadcasting)


def decaying(shape, seed=0):
    """A kernel with a decaying spectrum in every unfolding, like trained weights."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape)
    for axis in range(len(shape)):
        w = np.moveaxis(np.moveaxis(w, axis, -1) * np.exp(-np.arange(shape[axis]) / 3), -1, axis)
    return w.astype(np.float32)


def engine_node(module: nn.Module) -> Node:
    op, attrs, weights = LEAF_EXPORTERS[type(module)](module)
    return Node("tt", op, ["x"], attrs, weights)


def matches_torch(m: nn.Module, x: np.ndarray):
    """m's engine node passes check_attrs and infer; reference and every strategy give m(x) as
    C-contiguous float32. Returns (node, op, want)."""
    with torch.no_grad():
        want = m(torch.from_numpy(x)).numpy()
    node = engine_node(m)
    op = OPS[node.op]
    op.check_attrs(node)
    assert op.infer(node, [x.shape]) == want.shape
    assert rel(op.reference(node, x), want) <= 1e-5
    for s in STRATEGIES:
        node.attrs["strategy"] = s
        y = op.run(node, x)
        assert y.dtype == np.float32 and y.flags.c_contiguous and rel(y, want) <= 1e-5, s
    return node, op, want


# --- factorization ----------------------------------------------------------------------------

@pytest.mark.parametrize("shape, modes, naive", [
    ((12, 8, 3, 3), None, False),
    ((12, 8, 3, 2), ([2, 4], [3, 4]), False),
    ((16, 3, 5, 5), None, False),              # C = 3: one channel core
    ((24, 60), ([3, 4, 5], [2, 3, 4]), False),  # linear (out, in)
    ((12, 8, 3, 3), None, True),               # the naive 4D TT
])
def test_full_rank_tt_svd_reproduces_the_layer(shape, modes, naive):
    w = rand(*shape)
    f = factorize("l", w, modes=modes, naive=naive)
    assert f.report.rel_error < 1e-12
    if naive:
        rebuilt = tt_matrix([g[:, :, None, :] for g in f.cores]).reshape(shape)
    elif len(shape) == 4:
        rebuilt = conv_kernel(f.cores, shape[2:])
    else:
        rebuilt = tt_matrix(f.cores).T
    assert rel(rebuilt, w) < 1e-5      # float32 cores: round-off only


@pytest.mark.parametrize("shape, modes", [((32, 16, 3, 3), None), ((64, 96), ([4, 4, 6], [4, 4, 4]))])
@pytest.mark.parametrize("eps", [0.05, 0.2, 0.5])
def test_eps_bounds_the_error_and_lowers_the_ranks(shape, modes, eps):
    w = decaying(shape)
    full = factorize("l", w, modes=modes)
    f = factorize("l", w, modes=modes, eps=eps)
    assert f.report.rel_error <= eps
    assert f.report.params_tt < full.report.params_tt
    assert all(a <= b for a, b in zip(f.report.ranks, full.report.ranks))
    capped = factorize("l", w, modes=modes, eps=eps, max_rank=2)
    assert max(capped.report.ranks) <= 2 and capped.report.rel_error >= f.report.rel_error - 1e-12


def test_tt_svd_ranks_per_bond_and_bad_arguments():
    a = rand(4, 5, 6, 3)
    cores = tt_svd(a, max_rank=[2, 3, 1])
    assert [g.shape for g in cores] == [(1, 4, 2), (2, 5, 3), (3, 6, 1), (1, 3, 1)]
    with pytest.raises(ValueError, match="per-bond"):
        tt_svd(a, max_rank=[2, 3])
    with pytest.raises(ValueError, match="do not factor"):
        factorize("l", rand(12, 8, 3, 3), modes=([2, 2], [3, 5]))
    with pytest.raises(ValueError, match="TT chain"):
        TTLinear([np.ones((1, 2, 2, 3)), np.ones((2, 2, 2, 1))])
    with pytest.raises(ValueError, match="eps"):
        tt_svd(a, eps=-0.1)
    with pytest.raises(ValueError, match="not groups=1"):
        to_tt(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), layers=["0"])


# --- the engine ops against the torch modules ---------------------------------------------------

CONV_CASES = [
    # in_modes, out_modes, ranks, kernel, stride, padding [t, l, b, r], dilation, padding_mode, bias
    ([2, 3], [4, 2], [3, 5], (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), "zeros", True),
    ([2, 2, 2], [2, 3, 2], [4, 6, 3], (3, 2), (2, 1), (1, 0, 2, 1), (1, 2), "reflect", False),
    ([3], [5], [2], (5, 5), (1, 2), (2, 2, 2, 2), (1, 1), "replicate", True),
    ([4, 2], [2, 4], [9, 8], (3, 3), (2, 2), (1, 1, 1, 1), (2, 1), "circular", True),
    ([6], [8], [1], (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), "zeros", True),     # 1x1, rank 1
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_tt_conv2d_both_strategies_match_torch(case):
    in_modes, out_modes, ranks, k, stride, pad, dil, mode, bias = case
    gen = torch.Generator().manual_seed(0)
    m = TTConv2d.scratch(in_modes, out_modes, ranks, k, bias=bias, generator=gen, stride=stride,
                         padding=pad, dilation=dil, padding_mode=mode)
    if bias:
        nn.init.normal_(m.bias, generator=gen)
    x = rand(2, int(np.prod(in_modes)), 9, 8, seed=1)
    node, op, want = matches_torch(m, x)
    np.testing.assert_array_equal(x, rand(2, int(np.prod(in_modes)), 9, 8, seed=1))  # input untouched
    # counts: the chain (spatial term C kh kw r_0 first) vs the dense conv, per output pixel
    costs = op.costs(node, [x.shape], want.shape)
    pixels = want.size // want.shape[1]
    kk = k[0] * k[1]
    assert costs["dense"] == pixels * kk * want.shape[1] * x.shape[1]
    assert costs["contract"] == pixels * chain_macs([kk, *in_modes], [1, *out_modes], [1, *ranks, 1])
    for s in ("contract", "dense"):
        node.attrs["strategy"] = s
        assert op.cost(node, [x.shape], want.shape).macs == costs[s]
    node.attrs["strategy"] = "auto"         # the contraction's MACs weighted by its slower rate
    auto = "contract" if costs["contract"] * op.contract_cost < costs["dense"] else "dense"
    assert op.cost(node, [x.shape], want.shape).macs == costs[auto]


@pytest.mark.parametrize("in_modes, out_modes, ranks, lead", [
    ([3, 4, 5], [2, 3, 2], [4, 6], (2,)),
    ([8, 8], [4, 4], [3], (2, 3)),             # input (..., in): leading dims kept
    ([10], [7], [], (3,)),                     # one core: a dense matrix
])
def test_tt_linear_both_strategies_match_torch(in_modes, out_modes, ranks, lead):
    m = TTLinear.scratch(in_modes, out_modes, ranks, generator=torch.Generator().manual_seed(0))
    nn.init.normal_(m.bias)
    x = rand(*lead, int(np.prod(in_modes)), seed=2)
    node, op, want = matches_torch(m, x)
    rows = int(np.prod(lead))
    assert op.costs(node, [x.shape], want.shape) == {
        "contract": rows * chain_macs(in_modes, out_modes, [1, *ranks, 1]),
        "dense": rows * int(np.prod(in_modes)) * int(np.prod(out_modes))}


def test_dense_kernel_is_built_once_per_node():
    m = TTLinear.scratch([4, 4], [2, 3], [3], generator=torch.Generator().manual_seed(0))
    node, op = engine_node(m), OPS["tt_linear"]
    node.attrs["strategy"] = "dense"
    calls = []
    build = op.dense_kernel
    op.dense_kernel = lambda n: calls.append(n.name) or time.sleep(0.05) or build(n)
    try:
        x = rand(3, 16)
        with ThreadPoolExecutor(4) as pool:           # first calls race: one build
            y1, y2 = pool.map(lambda _: op.run(node, x), range(2))
        assert calls == ["tt"]
        np.testing.assert_array_equal(y1, y2)
        node.weights["core1"] = node.weights["core1"] * 2     # new core arrays: rebuilt
        np.testing.assert_allclose(op.run(node, x) - node.weights["bias"], 2 * (y1 - node.weights["bias"]),
                                   rtol=1e-5, atol=1e-5)
        assert calls == ["tt", "tt"]
    finally:
        del op.dense_kernel


def test_bad_attrs_cores_and_inputs_are_named_errors():
    m = TTConv2d.scratch([2, 2], [2, 2], [3, 2], 3, padding=1)
    good = engine_node(m)
    graph = lambda n: Graph([TensorSpec("x", [None, 4, 6, 6])], [("y", "tt")], "tensor", [n])  # noqa: E731

    def bad(attrs=None, weights=None):
        n = Node("tt", "tt_conv2d", ["x"], {**good.attrs, **(attrs or {})},
                 {**good.weights, **(weights or {})})
        with pytest.raises(FormatError, match="node 'tt'"):
            Plan(graph(n))

    bad(weights={"core1": np.zeros((3, 2, 2, 3), np.float32)})      # rank r_1 is 2
    bad(weights={"core3": np.zeros((2, 2, 2, 1), np.float32)})      # a core too many
    bad(weights={"bias": np.zeros(5, np.float32)})
    bad(attrs={"ranks": [3]})
    bad(attrs={"in_modes": [4]})
    bad(attrs={"strategy": "fastest"})
    bad(attrs={"kernel_size": [3, 1]})
    Plan(graph(good))
    for s in ("contract", "dense"):               # scratch buffers are held to the limits
        good.attrs["strategy"] = s
        need = OPS["tt_conv2d"].workspace(good, [(1, 4, 6, 6)], (1, 4, 6, 6))
        Plan(graph(good), Limits(max_activation_elements=need))
        with pytest.raises(LimitError, match="scratch"):
            Plan(graph(good), Limits(max_activation_elements=need - 1))
    with pytest.raises(ShapeMismatch):
        OPS["tt_conv2d"].infer(good, [(1, 5, 6, 6)])
    with pytest.raises(ValueError, match="tt_strategy"):
        set_strategy(graph(good), "fastest")


# --- whole networks ------------------------------------------------------------------------------

class SmallTTNet(nn.Module):
    """Dense stem, TT convs with BatchNorm after them (as in the paper), TT-FC, dense classifier."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.tt1 = TTConv2d.scratch([2, 4], [4, 4], [5, 6], 3, padding=1, generator=g)
        self.bn1 = nn.BatchNorm2d(16)
        self.tt2 = TTConv2d.scratch([4, 4], [4, 4], [4, 8], 3, stride=2, padding=1, bias=False, generator=g)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = TTLinear.scratch([4, 10, 10], [2, 4, 4], [4, 4], generator=g)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.tt1(self.stem(x))))
        x = torch.relu(self.bn2(self.tt2(x)))
        return self.head(torch.relu(self.fc(x.flatten(1))))


def test_export_and_verify_a_net_with_tt_layers(tmp_path):
    torch.manual_seed(0)
    net = SmallTTNet().eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 10, 10)
    path = tmp_path / "tt.h5"
    export(net, x, path)
    with torch.no_grad():
        want = net(x).numpy()
    for s in STRATEGIES:
        model = engine.load(path, tt_strategy=s)
        assert sorted(n.op for n in model.graph.nodes if n.op.startswith("tt")) == \
            ["tt_conv2d", "tt_conv2d", "tt_linear"]
        # run dense, the plan runs them as conv2d / linear, with the BatchNorms folded in
        contracted = [n for n in model.graph.nodes
                      if n.op == "tt_conv2d" and OPS[n.op].strategy(n) == "contract"]
        if s != "auto":
            assert len(contracted) == (2 if s == "contract" else 0)
        planned = [st.node.op for st in model.plan.steps]
        assert planned.count("tt_conv2d") == planned.count("batch_norm") == len(contracted)
        assert model.verify().ok, model.verify().summary()
        assert rel(model(x.numpy()), want) <= 1e-5
        acts = model.activations(x.numpy(), kernels="reference")
        assert rel(acts[model.graph.outputs[0][1]], want) <= 1e-5


def test_to_tt_full_rank_and_naive_keep_the_outputs(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 12, 3, padding=(1, 2), stride=2), nn.BatchNorm2d(12), nn.ReLU(),
                        nn.Flatten(), nn.Linear(12 * 4 * 5, 20)).eval()
    x = torch.randn(2, 3, 8, 8)
    for naive in (False, True):
        tt, reports = to_tt(net, layers=["2", "6"], naive=naive)
        assert [r.op for r in reports] == ["naive_tt_conv2d" if naive else "tt_conv2d", "tt_linear"]
        with torch.no_grad():
            assert rel(tt(x), net(x)) <= 1e-5
        export(tt, x, tmp_path / "n.h5")
        assert engine.load(tmp_path / "n.h5").verify().ok
    tt, reports = to_tt(net, max_rank=2)          # default layers: where TT has fewer params
    assert all(r.replaced == (r.params_tt < r.params_dense) for r in reports)
    assert sum(isinstance(m, (TTConv2d, TTLinear)) for m in tt.modules()) == sum(r.replaced for r in reports)


TORCH_FREE = textwrap.dedent("""
    import sys
    sys.modules["torch"] = None                  # any torch import fails
    import numpy as np
    from converters.tt import compress_graph_tt
    from engine.graph import Graph, Node, TensorSpec
    from engine.model import Model
    from engine.format import References
    rng = np.random.default_rng(0)
    w = lambda *s: rng.standard_normal(s).astype(np.float32)
    conv = {"stride": [1, 1], "padding": [1, 1, 1, 1], "dilation": [1, 1], "groups": 1,
            "padding_mode": "zeros"}
    g = Graph([TensorSpec("x", [None, 4, 6, 6])], [("y", "fc")], "tensor", [
        Node("c1", "conv2d", ["x"], conv, {"weight": w(8, 4, 3, 3), "bias": w(8)}),
        Node("r", "relu", ["c1"]),
        Node("f", "flatten", ["r"], {"start_dim": 1, "end_dim": 3}),
        Node("fc", "linear", ["f"], {}, {"weight": w(6, 288), "bias": w(6)})])
    x = w(2, 4, 6, 6)
    dense = Model(g, References())(x)
    full, reports = compress_graph_tt(g, layers=["c1", "fc"])
    assert [n.op for n in full.nodes] == ["tt_conv2d", "relu", "flatten", "tt_linear"]
    assert [n.op for n in g.nodes] == ["conv2d", "relu", "flatten", "linear"]      # input untouched
    y = Model(full, References())(x)
    assert np.abs(y - dense).max() <= 1e-4 * np.abs(dense).max(), np.abs(y - dense).max()
    small, reports = compress_graph_tt(g, max_rank=2)
    assert all(r.rel_error < 1 for r in reports) and Model(small, References())(x).shape == (2, 6)
    print("ok", "torch" in sys.modules and sys.modules["torch"] is None)
""")


def test_compress_graph_tt_without_torch():
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", TORCH_FREE], env=env, capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["ok", "True"]


def test_cli_compress_tt(tmp_path):
    from engine.cli import main
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(16 * 36, 10)).eval()
    export(net, torch.randn(1, 3, 6, 6), tmp_path / "dense.h5")
    assert main(["compress", str(tmp_path / "dense.h5"), "--tt", "--max-rank", "3",
                 "-o", str(tmp_path / "tt.h5")]) == 0
    model = engine.load(tmp_path / "tt.h5")
    assert {n.op for n in model.graph.nodes} >= {"tt_conv2d", "tt_linear"}
    dense = engine.load(tmp_path / "dense.h5")
    assert [n.name for n in model.graph.nodes] == [n.name for n in dense.graph.nodes]
    assert model.references.source == "engine-reference"
    assert model.verify().ok
    assert main(["compress", str(tmp_path / "dense.h5"), "--tt", "-o", str(tmp_path / "x.h5")]) == 2


@pytest.mark.parametrize("m,n", [(1, 5), (8, 3000), (16, 1024), (3, 2049)])
def test_chain_transpose_matches_numpy(m, n):
    """The chain's transposed copy (tt._transpose, blocks of 1024 columns) against NumPy's."""
    src = np.random.default_rng(0).standard_normal((m, n)).astype(np.float32)
    dst = np.full(m * n, np.nan, np.float32)
    tt._transpose(src.ravel(), m, dst)
    np.testing.assert_array_equal(dst.reshape(n, m), src.T)

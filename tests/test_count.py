"""Operation counts: dense conv / linear MACs against torch's FlopCounterMode, executed counts
(counting kernels) against analytic counts on every family dense and compressed, hand-computed
examples per op, peak memory with views, the CLI's --against / --json / --csv / --executed."""
import csv
import io
import json

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import converters
import engine
from converters.basis import compress_graph
from converters.basis_layers import to_basis
from converters.tt import compress_graph_tt
from converters.tt_layers import to_tt
from engine import format as fmt
from engine.cli import main
from engine.count import execute
from engine.graph import Graph, Node, TensorSpec
from engine.ops import OPS, Cost, load_all
from engine.ops.tt import set_strategy
from engine.verify import compare
from tests.models import FAMILIES

load_all()
MAC_ATEN = {"aten.convolution", "aten.mm", "aten.addmm", "aten.bmm"}


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """family -> (torch model, dense file, FlopCounterMode's FLOPs by aten op at batch 1)."""
    root = tmp_path_factory.mktemp("count")
    out = {}
    for name, (factory, shape) in FAMILIES.items():
        model = factory()
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            model(x)
        flops = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
        out[name] = (model, converters.export(model, x, root / f"{name}.h5", n_random=0), flops)
    return out


@pytest.fixture(scope="module")
def variants(nets):
    """family -> {kind: Model}: the dense file and its compressed forms (same node names):
    BasisConv at 90 % energy, tensor-train at max rank 4 run by contraction and run dense."""
    out = {}
    for name, (_, path, _) in nets.items():
        graph, refs = fmt.load(path)
        models = {"dense": engine.load(path),
                  "basis": engine.Model(compress_graph(graph, energy=0.9, force=True)[0], refs)}
        for strategy in ("contract", "dense"):
            tt, _ = compress_graph_tt(graph, max_rank=4)
            set_strategy(tt, strategy)
            models[f"tt-{strategy}"] = engine.Model(tt, refs)
        out[name] = models
    return out


# --- against PyTorch ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_dense_macs_times_two_are_torch_flop_counters_flops(nets, name):
    """FlopCounterMode counts 2 FLOPs per multiply-add of convolution / mm / addmm (bias adds,
    BN, activations, pools: nothing); our conv2d + linear MACs x 2 are exactly its total."""
    _, path, flops = nets[name]
    assert set(flops) <= MAC_ATEN, flops
    rows = engine.load(path).count().nodes
    assert 2 * sum(r.macs for r in rows if r.op in ("conv2d", "linear")) == sum(flops.values())
    assert all(r.flops == 2 * r.macs for r in rows)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_learnable_params_are_torchs_parameters(nets, name):
    """Learnable = torch's nn.Parameters (BN statistics are buffers; a non-affine BN has none)."""
    model, path, _ = nets[name]
    total = engine.load(path).count().total
    assert total["learnable_params"] == sum(p.numel() for p in model.parameters())
    assert total["params"] == total["learnable_params"] + sum(
        b.numel() for k, b in model.named_buffers() if k.endswith(("running_mean", "running_var")))


# --- executed == analytic -------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_counting_kernels_execute_what_the_formulas_count_dense_and_compressed(variants, name):
    for kind, model in variants[name].items():
        report = model.count(executed=True)
        assert not report.mismatches, (kind, [(r.name, r.macs, r.executed_macs, r.other_ops,
                                               r.executed_other) for r in report.mismatches])
        assert report.total["executed_macs"] == report.total["macs"] > 0
        assert report.total["executed_other"] == report.total["other_ops"] > 0
        if kind != "dense":
            assert any(r.op.startswith(kind[:2]) for r in report.nodes), kind
        if kind.startswith("tt"):
            strategies = {r.details["strategy"] for r in report.nodes if r.op.startswith("tt_")}
            assert strategies == {kind[3:]}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_counting_kernels_compute_the_reference_outputs(variants, name):
    """The counts are of real executions: every node's counted output is its reference output."""
    x = rand(*FAMILIES[name][1], seed=3)
    for kind, model in variants[name].items():
        acts, _ = execute(model, {model.graph.inputs[0].name: x})
        want = model.activations(x, kernels="reference")
        worst = max(compare(acts[k], v)[1] for k, v in want.items())
        assert worst <= 1e-5, (kind, worst)


def test_every_op_type_has_a_counting_kernel_and_is_counted_by_the_families(variants):
    assert all(type(op).counted is not engine.ops.Op.counted for op in OPS.values())
    seen = {n.op for models in variants.values() for m in models.values() for n in m.graph.nodes}
    assert seen == set(OPS), set(OPS) - seen


def test_torch_side_compressions_count_what_they_execute(nets, tmp_path):
    """converters.to_basis / to_tt models, exported: their basis and TT nodes too."""
    model, _, _ = nets["two_outputs"]
    x = torch.randn(*FAMILIES["two_outputs"][1])
    compressed = {"basis_": to_basis(model, energy=0.9, example_input=x)[0],
                  "tt_": to_tt(model, max_rank=3)[0]}
    for prefix, net in compressed.items():
        report = engine.load(converters.export(net.eval(), x, tmp_path / f"{prefix}.h5",
                                               n_random=0)).count(executed=True)
        assert any(r.op.startswith(prefix) for r in report.nodes)
        assert not report.mismatches


# --- hand-computed examples -----------------------------------------------------------------------

def costs(op, attrs, weights, *xs, **counted_kwargs):
    """(analytic Cost, executed Cost) of one node on inputs xs, its counted output checked
    against the reference."""
    n = Node("n", op, [f"x{i}" for i in range(len(xs))], attrs, weights)
    OPS[op].check_attrs(n)
    shapes = [x.shape for x in xs]
    y, executed = OPS[op].counted(n, *xs, **counted_kwargs)
    assert compare(y, OPS[op].reference(n, *xs))[1] <= 1e-5
    return OPS[op].cost(n, shapes, OPS[op].infer(n, shapes)), executed


def both(cost):
    return cost, cost


def w(**shapes):
    """Weights of the given shapes (values never change a count)."""
    return {k: rand(*s, seed=i) for i, (k, s) in enumerate(shapes.items())}


CONV = {"stride": [1, 1], "padding": [1, 1, 1, 1], "dilation": [1, 1], "groups": 1, "padding_mode": "zeros"}
POOL = {"kernel": [3, 3], "stride": [2, 2], "padding": [1, 1], "ceil_mode": False}
AVG = {**POOL, "count_include_pad": True, "divisor_override": None}
TTC = {**{k: v for k, v in CONV.items() if k != "groups"}, "kernel_size": [3, 3], "in_modes": [2, 4],
       "out_modes": [4, 4], "ranks": [3, 2]}
TTC_W = w(core0=(1, 9, 1, 3), core1=(3, 2, 4, 2), core2=(2, 4, 4, 1))
TTL = {"in_modes": [4, 5], "out_modes": [3, 2], "ranks": [2]}
TTL_W = w(core1=(1, 4, 3, 2), core2=(2, 5, 2, 1), bias=(6,))
BN = {k: rand(4, seed=i) + 2 for i, k in enumerate(("weight", "bias", "running_mean", "running_var"))}

# op, attrs, weights, input shapes, Cost(macs, other) worked out by hand (docs/COUNTING.md)
HAND = {
    # 3x3 conv 64 -> 128, padding 1, 32x32: positions * filters * taps; one bias add per output
    "conv2d": ("conv2d", CONV, w(weight=(128, 64, 3, 3), bias=(128,)), [(1, 64, 32, 32)],
               Cost(macs=32 * 32 * 128 * 64 * 3 * 3, other=32 * 32 * 128)),
    # depthwise 3x3 stride 2 on 2 x 32 x 16 x 16 -> 8x8: batch * channels * positions * taps
    "conv2d-depthwise": ("conv2d", {**CONV, "groups": 32, "stride": [2, 2]}, w(weight=(32, 1, 3, 3)),
                         [(2, 32, 16, 16)], Cost(macs=2 * 32 * 8 * 8 * 9)),
    # reflect padding 5x5 -> 5x5: the taps over the padding are multiply-adds like any other
    "conv2d-reflect": ("conv2d", {**CONV, "padding_mode": "reflect"}, w(weight=(4, 3, 3, 3)), [(1, 3, 5, 5)],
                       Cost(macs=5 * 5 * 4 * 3 * 3 * 3)),
    # 3x2 kernel, stride (2, 1), padding t0 l1 b1 r0, dilation (1, 2), groups 2, 4 -> 6 on 7x6:
    # H' = (7+0+1 - 1*2 - 1)//2 + 1 = 3, W' = (6+1+0 - 2*1 - 1)//1 + 1 = 5; C/G = 2 per filter
    "conv2d-strided": ("conv2d", {"stride": [2, 1], "padding": [0, 1, 1, 0], "dilation": [1, 2], "groups": 2,
                                  "padding_mode": "zeros"}, w(weight=(6, 2, 3, 2), bias=(6,)), [(1, 4, 7, 6)],
                       Cost(macs=3 * 5 * 6 * 2 * 3 * 2, other=3 * 5 * 6)),
    # rows = 3*4 leading positions, 10 in, 5 out; one bias add per output
    "linear": ("linear", {}, w(weight=(5, 10), bias=(5,)), [(3, 4, 10)], Cost(macs=12 * 10 * 5, other=12 * 5)),
    # one x * alpha + beta per element
    "batch_norm": ("batch_norm", {"eps": 1e-5}, BN, [(2, 4, 3, 3)], Cost(other=2 * 4 * 3 * 3)),
    # activations: one evaluation per element
    "relu": ("relu", {}, {}, [(1, 3, 4, 4)], Cost(other=3 * 4 * 4)),
    "clip": ("clip", {"min": 0.0, "max": 6.0}, {}, [(2, 5)], Cost(other=2 * 5)),
    "leaky_relu": ("leaky_relu", {"negative_slope": 0.1}, {}, [(2, 3, 4)], Cost(other=2 * 3 * 4)),
    "prelu": ("prelu", {}, w(weight=(3,)), [(2, 3, 4)], Cost(other=2 * 3 * 4)),
    "sigmoid": ("sigmoid", {}, {}, [(4, 5)], Cost(other=4 * 5)),
    "tanh": ("tanh", {}, {}, [(1, 2, 3, 3)], Cost(other=2 * 3 * 3)),
    "silu": ("silu", {}, {}, [(2, 8)], Cost(other=2 * 8)),
    "hardswish": ("hardswish", {}, {}, [(3, 7)], Cost(other=3 * 7)),
    # 4 per element (max, exp, sum, divide); log_softmax + 1 log per row: rows = 2*3 (axis 1 reduced)
    "softmax": ("softmax", {"axis": 1}, {}, [(2, 10)], Cost(other=4 * 2 * 10)),
    "log_softmax": ("log_softmax", {"axis": 1}, {}, [(2, 10, 3)], Cost(other=4 * 2 * 10 * 3 + 2 * 3)),
    # 5 -> 3 windows per axis cut to the input, [0,2) [1,4) [3,5): 2 + 3 + 2 = 7 taps per axis
    "max_pool2d": ("max_pool2d", {**POOL, "dilation": [1, 1]}, {}, [(1, 2, 5, 5)], Cost(other=2 * 7 * 7)),
    # dilation 2, 6 -> 2 windows per axis at -1 (taps -1, 1, 3: 2 in bounds) and 1 (1, 3, 5: 3)
    "max_pool2d-dilated": ("max_pool2d", {**POOL, "dilation": [2, 2]}, {}, [(1, 3, 6, 6)],
                           Cost(other=3 * (2 + 3) * (2 + 3))),
    # 2x2 stride 2 no padding on 4x4: every element read once
    "max_pool2d-tiled": ("max_pool2d", {**POOL, "kernel": [2, 2], "padding": [0, 0], "dilation": [1, 1]}, {},
                         [(1, 8, 4, 4)], Cost(other=8 * 4 * 4)),
    # the same 7 taps per axis as max_pool2d, plus one divide per 3x3 output
    "avg_pool2d": ("avg_pool2d", AVG, {}, [(1, 2, 5, 5)], Cost(other=2 * 7 * 7 + 2 * 3 * 3)),
    # ceil_mode 2x2 stride 2 on 5: windows [0,2) [2,4) [4,5): 2 + 2 + 1 taps; 3x3 divides
    "avg_pool2d-ceil": ("avg_pool2d", {**AVG, "kernel": [2, 2], "padding": [0, 0], "ceil_mode": True,
                                       "count_include_pad": False}, {}, [(1, 1, 5, 5)],
                        Cost(other=(2 + 2 + 1) * (2 + 2 + 1) + 3 * 3)),
    # 7 -> 3 windows [0,3) [2,5) [4,7): 9 rows; 5 -> 2 windows [0,3) [2,5): 6 cols; + 3*2 divides
    "adaptive_avg_pool2d": ("adaptive_avg_pool2d", {"output_size": [3, 2]}, {}, [(1, 2, 7, 5)],
                            Cost(other=2 * 9 * 6 + 2 * 3 * 2)),
    # one add per input element, one divide per output element
    "mean": ("mean", {"dims": [2, 3], "keepdim": False}, {}, [(1, 3, 4, 4)], Cost(other=3 * 4 * 4 + 3)),
    # one per output element after broadcasting (2, 3, 4)
    "add": ("add", {}, {}, [(2, 3, 4), (3, 1)], Cost(other=2 * 3 * 4)),
    "mul": ("mul", {}, {}, [(2, 1, 4), (3, 1)], Cost(other=2 * 3 * 4)),
    "mul-scalar": ("mul", {"scalar": 0.5}, {}, [(2, 5)], Cost(other=2 * 5)),
    # data movement only
    "flatten": ("flatten", {"start_dim": 1, "end_dim": 2}, {}, [(2, 3, 4)], Cost()),
    "reshape": ("reshape", {"shape": [-1]}, {}, [(2, 3)], Cost()),
    "permute": ("permute", {"perm": [0, 2, 1]}, {}, [(2, 3, 4)], Cost()),
    "concat": ("concat", {"axis": 1}, {}, [(2, 3), (2, 4)], Cost()),
    "identity": ("identity", {}, {}, [(2, 3)], Cost()),
    # C=16 -> N=32, 3x3, 8x8 positions, M=4, d = 16*9: P * (G*M*d + N*M); one bias add per output
    "basis_conv2d": ("basis_conv2d", {**CONV, "rank": 4}, w(basis=(4, 16, 3, 3), combine=(32, 4), bias=(32,)),
                     [(1, 16, 8, 8)], Cost(macs=64 * (1 * 4 * 144 + 32 * 4), other=64 * 32)),
    # groups 2, M=3 per group, d = 8*9
    "basis_conv2d-groups": ("basis_conv2d", {**CONV, "groups": 2, "rank": 3}, w(basis=(6, 8, 3, 3), combine=(32, 3)),
                            [(1, 16, 8, 8)], Cost(macs=64 * (2 * 3 * 72 + 32 * 3))),
    # rows * (M*in + out*M) + rows * out bias adds
    "basis_linear": ("basis_linear", {"rank": 6}, w(basis=(6, 20), combine=(7, 6), bias=(7,)), [(3, 20)],
                     Cost(macs=3 * (6 * 20 + 7 * 6), other=3 * 7)),
    # 3x3, C = 2*4 -> S = 4*4, ranks 3, 2, on 10x10 padded: 100 positions. Chain in modes (9, 2, 4),
    # out (1, 4, 4): r0 r1 (out_1..k)(in_k..in_D) = 1*3*1*(9*2*4) + 3*2*(1*4)*(2*4) + 2*1*(1*4*4)*4
    "tt_conv2d-contract": ("tt_conv2d", {**TTC, "strategy": "contract"}, TTC_W, [(1, 8, 10, 10)],
                           Cost(macs=100 * (1 * 3 * 1 * 72 + 3 * 2 * 4 * 8 + 2 * 1 * 16 * 4))),
    # the rebuilt 16 x 8 x 3 x 3 kernel as a conv
    "tt_conv2d-dense": ("tt_conv2d", {**TTC, "strategy": "dense"}, TTC_W, [(1, 8, 10, 10)],
                        Cost(macs=100 * 16 * 8 * 9)),
    # 20 = 4*5 -> 6 = 3*2, rank 2, 3 rows: core1 1*2 * out(3) * in(4*5) + core2 2*1 * out(3*2) * in(5)
    "tt_linear-contract": ("tt_linear", {**TTL, "strategy": "contract"}, TTL_W, [(3, 20)],
                           Cost(macs=3 * (1 * 2 * 3 * 20 + 2 * 1 * 6 * 5), other=3 * 6)),
    # dense 20*6 per row: fewer MACs, so auto runs it
    "tt_linear-auto": ("tt_linear", TTL, TTL_W, [(3, 20)], Cost(macs=3 * 20 * 6, other=3 * 6)),
}


@pytest.mark.parametrize("case", sorted(HAND))
def test_op_costs_by_hand(case):
    """Analytic and executed counts both equal the hand-computed Cost."""
    op, attrs, weights, shapes, want = HAND[case]
    xs = [rand(*s, seed=i) for i, s in enumerate(shapes)]
    assert costs(op, attrs, weights, *xs) == both(want)


def test_every_op_has_a_hand_example():
    assert set(OPS) <= {op for op, *_ in HAND.values()}, set(OPS) - {op for op, *_ in HAND.values()}


def test_basis_conv2d_break_even_by_hand():
    op, attrs, weights, shapes, _ = HAND["basis_conv2d-groups"]
    n = Node("n", op, ["x"], attrs, weights)
    # per group: (N/G) d / (d + N/G) = 16*72 / (72 + 16)
    assert OPS[op].count_details(n, shapes, (1, 32, 8, 8)) == \
        {"rank": 3, "break_even_rank": pytest.approx(16 * 72 / 88)}


def test_tt_strategy_by_hand():
    """The counting kernel counts either way on request; the details give both ways' MACs."""
    _, _, _, _, contract = HAND["tt_linear-contract"]
    assert costs("tt_linear", TTL, TTL_W, rand(3, 20), strategy="contract")[1] == contract
    n = Node("n", "tt_conv2d", ["x"], TTC, TTC_W)
    # auto: the 53,600 contraction MACs weigh 2.5 each (contract_cost), more than 115,200 dense
    assert OPS["tt_conv2d"].count_details(n, [(1, 8, 10, 10)], (1, 16, 10, 10)) == \
        {"strategy": "dense", "macs_contract": HAND["tt_conv2d-contract"][4].macs,
         "macs_dense": HAND["tt_conv2d-dense"][4].macs}


def test_stored_and_learnable_params(variants):
    """BN running statistics and a basis are stored, not learnable; everything else is both."""
    rows = {r.name: r for r in variants["vgg16_bn"]["basis"].count().nodes}
    bn, conv = rows["features_1"], rows["features_3"]
    assert (bn.params, bn.learnable_params, bn.weight_bytes) == (4 * 8, 2 * 8, 4 * 4 * 8)
    assert conv.op == "basis_conv2d"
    M = conv.details["rank"]
    assert conv.params == M * 8 * 9 + 8 * M + 8 and conv.learnable_params == 8 * M + 8
    assert conv.details["break_even_rank"] == pytest.approx(8 * 72 / (72 + 8))


# --- memory ---------------------------------------------------------------------------------------

def test_peak_activation_memory_shares_view_buffers():
    """x -> conv -> reshape (a view) -> linear: the peak is x + conv's output (256 + 512 values);
    the reshape holds no buffer of its own and the conv output lives on through it."""
    nodes = [Node("conv", "conv2d", ["x"], CONV, {"weight": rand(8, 4, 3, 3)}),
             Node("flat", "reshape", ["conv"], {"shape": [0, -1]}),
             Node("fc", "linear", ["flat"], {}, {"weight": rand(10, 512)})]
    model = engine.Model(Graph([TensorSpec("x", [None, 4, 8, 8])], [("y", "fc")], "tensor", nodes),
                         fmt.References())
    total = model.count().total
    assert total["peak_activation_bytes"] == (256 + 512) * 4
    assert total["activation_bytes"] == (512 + 512 + 10) * 4


def test_view_ops_really_return_views(variants):
    """What the peak assumes: flatten / reshape / identity outputs share their input's memory."""
    for name, models in variants.items():
        model = models["dense"]
        x = rand(*FAMILIES[name][1])
        acts = {"x": x, **model.activations(x)}
        for n in model.graph.nodes:
            if OPS[n.op].view:
                assert np.shares_memory(acts[n.name], acts[n.inputs[0]]), (name, n.name)


def test_plan_other_ops_count_folded_bn_as_bias_adds(variants):
    report = variants["resnet18"]["dense"].count()
    total = report.total
    bn = sum(r.other_ops for r in report.nodes if r.op == "batch_norm")
    # every BN of resnet18 follows a bias-free conv: folded, it becomes that conv's bias add
    assert total["plan_other_ops"] == total["other_ops"] and bn > 0


# --- command line ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def basis_file(nets, tmp_path_factory):
    from converters.basis import compress_file
    out = tmp_path_factory.mktemp("cli") / "basis.h5"
    compress_file(nets["vgg16_bn"][1], out, energy=0.9, force=True)
    return out


def test_cli_against_gives_the_reduction_factors(nets, basis_file, capsys):
    dense = nets["vgg16_bn"][1]
    assert main(["count", str(basis_file), "--against", str(dense), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = {r.name: r for r in engine.load(dense).count().nodes}
    assert got["input_shape"] == {"x": [1, 3, 36, 36]}
    for node in got["nodes"]:
        d = want[node["name"]]
        for k in ("macs", "params", "learnable_params", "weight_bytes"):
            assert node[f"{k}_reduction"] == (getattr(d, k) / node[k] if node[k] else None)
        if node["op"] == "basis_conv2d":
            assert node["learnable_params_reduction"] > 1 and node["rank"] >= 1
    total, dense_total = got["total"], engine.load(dense).count().total
    assert total["macs_reduction"] == dense_total["macs"] / total["macs"]
    assert total["learnable_params_reduction"] == dense_total["learnable_params"] / total["learnable_params"]
    assert main(["count", str(basis_file), "--against", str(dense)]) == 0
    text = capsys.readouterr().out
    assert "learnable params" in text and "fewer" in text and "break-even M" in text


def test_cli_csv_and_json_parse(nets, basis_file, capsys):
    assert main(["count", str(basis_file), "--csv", "--input-shape", "2,3,40,40"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert main(["count", str(basis_file), "--json", "--input-shape", "2,3,40,40"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == [n["name"] for n in got["nodes"]]
    assert [int(r["macs"]) for r in rows] == [n["macs"] for n in got["nodes"]]
    assert rows[0]["output_shape"] == "2x8x40x40" and got["input_shape"] == {"x": [2, 3, 40, 40]}
    assert got["total"]["macs"] == sum(n["macs"] for n in got["nodes"])
    assert {"rank", "break_even_rank"} <= set(rows[0])


def test_cli_executed_exit_status(nets, capsys, monkeypatch):
    path = str(nets["resnet18"][1])
    assert main(["count", path, "--executed"]) == 0
    assert "equal the analytic counts on every node" in capsys.readouterr().out
    monkeypatch.setattr(type(OPS["relu"]), "cost", lambda self, n, i, o: Cost())   # a wrong formula
    assert main(["count", path, "--executed"]) == 1
    out = capsys.readouterr().out
    assert "DIFF" in out and "differ from the analytic ones" in out


def test_cli_plot_and_bad_shape(nets, basis_file, tmp_path, capsys):
    assert main(["count", str(nets["vgg16_bn"][1]), "--input-shape", "1,3,7"]) == 1
    assert "InputError" in capsys.readouterr().err
    pytest.importorskip("matplotlib")
    png = tmp_path / "macs.png"
    assert main(["count", str(basis_file), "--against", str(nets["vgg16_bn"][1]), "--plot", str(png)]) == 0
    assert png.stat().st_size > 0


def test_counting_kernels_compiled_once(variants):
    """Each counting kernel is called with one type signature only (compile time counts)."""
    from engine.ops.conv import _conv_counted
    from engine.ops.pool import _box_sums_counted, _max_pool_counted
    from engine.ops.tt import _core_counted
    for models in variants.values():
        models["tt-contract"].count(executed=True)
    for kernel in (_conv_counted, _box_sums_counted, _max_pool_counted, _core_counted):
        assert len(kernel.signatures) == 1, (kernel, kernel.signatures)

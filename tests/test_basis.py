"""BasisConv: the decomposition math, the engine's basis ops against the PyTorch layers, rank
choice and its report, lossless full-rank conversion of every model family, torch-free
compression of model files, fine-tuning and the spectrum."""
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import converters
import engine
from converters.basis import compress_file, compress_graph, random_basis, svd_basis
from converters.basis_layers import BasisConv2d, BasisLinear, to_basis
from converters.finetune import finetune, trainable_parameters
from converters.torch_export import LEAF_EXPORTERS
from engine.format import load as load_file
from engine.graph import Node
from engine.ops import OPS, load_all
from engine.spectrum import layer_spectra, rank_for_energy, singular_values
from engine.verify import compare
from tests.models import FAMILIES, as_list

load_all()
ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-5


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# --- the math ---------------------------------------------------------------------------------

def test_full_rank_reconstructs_exactly_and_truncation_loses_the_discarded_energy():
    W = rand(12, 4, 3, 3).astype(np.float64)                   # N = 12 < d = 36
    H = W.reshape(12, -1)
    s = np.linalg.svd(H, compute_uv=False)
    for M in (12, 7, 3, 1):
        basis, combine = svd_basis(W, 1, M)
        assert basis.shape == (M, 4, 3, 3) and combine.shape == (12, M)
        H_M = combine.astype(np.float64) @ basis.reshape(M, -1).astype(np.float64)
        err = np.linalg.norm(H - H_M) ** 2 / np.linalg.norm(H) ** 2
        discarded = (s[M:] ** 2).sum() / (s ** 2).sum()
        assert err == pytest.approx(discarded, abs=1e-6)       # float32 storage of the factors
    assert discarded > 0.5 and err < 1
    conv = nn.Conv2d(4, 12, 3, padding=1)
    layer = BasisConv2d.decomposed(conv, 12)                   # full rank: the same conv
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        assert compare(layer(x).numpy(), conv(x).numpy())[1] <= RTOL


def test_rank_for_energy_is_the_smallest_sufficient_m():
    s = np.array([[4.0, 2.0, 1.0, 1.0]])                        # energies 16, 4, 1, 1 of 22
    assert rank_for_energy(s, 16 / 22) == 1
    assert rank_for_energy(s, 16 / 22 + 1e-6) == 2
    assert rank_for_energy(s, 1.0) == 4
    two = np.array([[4.0, 2.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    assert rank_for_energy(two, 0.7) == 3                       # the max of what each group needs


def test_groups_are_decomposed_each_on_its_own():
    G, N, Cg = 3, 12, 2
    W = rand(N, Cg, 3, 3, seed=1)
    M = 3
    basis, combine = svd_basis(W, G, M)
    assert basis.shape == (G * M, Cg, 3, 3) and combine.shape == (N, M)
    for g in range(G):
        Wg = W[g * 4:(g + 1) * 4].astype(np.float64)
        b_alone, c_alone = svd_basis(Wg, 1, M)                  # the group as a layer of its own
        Fg = basis[g * M:(g + 1) * M].reshape(M, -1)
        wg = combine[g * 4:(g + 1) * 4]
        np.testing.assert_allclose(wg @ Fg, c_alone @ b_alone.reshape(M, -1), atol=1e-5)
    # at full rank (N/G = 4 filters per group) every group is reconstructed exactly
    basis, combine = svd_basis(W, G, 4)
    full = np.concatenate([combine[g * 4:(g + 1) * 4] @ basis[g * 4:(g + 1) * 4].reshape(4, -1)
                           for g in range(G)])
    np.testing.assert_allclose(full, W.reshape(N, -1), atol=1e-5)


def test_random_basis_is_orthonormal_and_seeded():
    F = random_basis(27, 10, np.random.default_rng(3))
    assert F.shape == (10, 27)
    np.testing.assert_allclose(F @ F.T, np.eye(10), atol=1e-12)
    np.testing.assert_array_equal(F, random_basis(27, 10, np.random.default_rng(3)))
    model, report = to_basis(nn.Sequential(nn.Conv2d(4, 16, 3, groups=2), nn.Conv2d(16, 8, 1)),
                             rank=5, from_scratch=True, force=True, seed=7)
    layer = model[0]
    assert isinstance(layer, BasisConv2d) and layer.basis.shape == (10, 2, 3, 3)
    for g in range(2):
        Fg = layer.basis[g * 5:(g + 1) * 5].reshape(5, -1).double()
        torch.testing.assert_close(Fg @ Fg.T, torch.eye(5, dtype=torch.float64), atol=1e-6, rtol=0)
    assert "basis" not in dict(layer.named_parameters())     # a buffer: never trained
    one = BasisLinear.decomposed(nn.Linear(30, 8), 6, from_scratch=True, seed=1)
    torch.testing.assert_close(one.basis @ one.basis.T, torch.eye(6), atol=1e-6, rtol=0)
    assert all(math.isnan(r.energy) for r in report.decomposed)


# --- engine ops against the PyTorch layers ----------------------------------------------------

CONV_CASES = [
    # C, N, H, W, kernel, stride, padding [t, l, b, r], dilation, groups, padding_mode, M, bias
    (3, 8, 11, 9, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, "zeros", 5, True),
    (6, 9, 12, 10, (3, 2), (2, 1), (0, 1, 1, 0), (1, 2), 3, "zeros", 2, False),
    (4, 8, 12, 12, (4, 4), (1, 1), (1, 1, 2, 2), (1, 1), 1, "reflect", 6, True),
    (4, 6, 10, 11, (3, 5), (2, 2), (1, 2, 1, 2), (2, 1), 2, "replicate", 3, True),
    (5, 4, 9, 9, (3, 3), (1, 2), (2, 1, 0, 1), (1, 1), 1, "circular", 1, False),
    (4, 8, 7, 7, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 4, "zeros", 1, True),
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_basis_conv2d_reference_and_fast_match_torch(case):
    C, N, H, W, k, stride, pad, dil, G, mode, M, bias = case
    layer = BasisConv2d(rand(G * M, C // G, *k, seed=1), rand(N, M, seed=2), rand(N, seed=3) if bias else None,
                        stride=stride, padding=pad, dilation=dil, groups=G, padding_mode=mode)
    op, attrs, weights = LEAF_EXPORTERS[BasisConv2d](layer)
    node = Node("n", op, ["x"], attrs, weights)
    x = rand(2, C, H, W, seed=4)
    with torch.no_grad():
        want = layer(torch.from_numpy(x)).numpy()
    OPS[op].check_attrs(node)
    assert OPS[op].infer(node, [x.shape]) == want.shape
    for kernel in (OPS[op].reference, OPS[op].run):
        got = kernel(node, x)
        assert got.dtype == np.float32 and compare(got, want)[1] <= RTOL
    cost = OPS[op].cost(node, [x.shape], want.shape)
    positions = 2 * want.shape[2] * want.shape[3]
    assert cost.macs == positions * (G * M * (C // G) * k[0] * k[1] + N * M)
    assert cost.other == (positions * N if bias else 0)


@pytest.mark.parametrize("shape", [(3, 20), (2, 5, 20)])
def test_basis_linear_reference_and_fast_match_torch(shape):
    layer = BasisLinear(rand(6, 20, seed=1), rand(7, 6, seed=2), rand(7, seed=3))
    op, attrs, weights = LEAF_EXPORTERS[BasisLinear](layer)
    node = Node("n", op, ["x"], attrs, weights)
    x = rand(*shape, seed=4)
    with torch.no_grad():
        want = layer(torch.from_numpy(x)).numpy()
    assert OPS[op].infer(node, [x.shape]) == want.shape
    for kernel in (OPS[op].reference, OPS[op].run):
        assert compare(kernel(node, x), want)[1] <= RTOL
    rows = math.prod(shape[:-1])
    assert OPS[op].cost(node, [x.shape], want.shape).macs == rows * (6 * 20 + 7 * 6)


def test_bad_basis_weights_are_refused_with_the_node_named():
    layer = BasisConv2d(rand(6, 2, 3, 3), rand(8, 3), groups=2)
    op, attrs, weights = LEAF_EXPORTERS[BasisConv2d](layer)
    from engine.errors import ShapeMismatch
    for bad in ({"basis": rand(5, 2, 3, 3)}, {"combine": rand(8, 4)}, {"combine": rand(7, 3)},
                {"bias": rand(3)}):
        node = Node("lay", op, ["x"], attrs, {**weights, **bad})
        with pytest.raises(ShapeMismatch, match="lay"):
            OPS[op].infer(node, [(1, 4, 8, 8)])
    with pytest.raises(ShapeMismatch, match="lay"):                 # input channels != G * C/G
        OPS[op].infer(Node("lay", op, ["x"], attrs, weights), [(1, 6, 8, 8)])


def test_batch_norm_folds_into_combine_and_activation_fuses(tmp_path):
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 36, 12), nn.BatchNorm1d(12), nn.ReLU())
    for bn in (dense[1], dense[5]):
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
    model, _ = to_basis(dense.eval(), rank=4, force=True)
    assert isinstance(model[0], BasisConv2d) and isinstance(model[4], BasisLinear)
    path = converters.export(model, torch.randn(2, 4, 6, 6), tmp_path / "bn.h5")
    m = engine.load(path)
    assert len(m.plan.steps) == len(m.graph.nodes) - 4              # two BN + two ReLU absorbed
    folded = [s.node for s in m.plan.steps if s.node.op.startswith("basis")]
    assert [s.act for s in m.plan.steps if s.node.op.startswith("basis")] == [("relu",), ("relu",)]
    assert all("bias" in n.weights for n in folded)
    report = m.verify()                                             # node by node, then planned
    assert report.ok, report.summary()


def test_batch_norm_after_a_rank3_basis_linear_is_not_folded_into_combine(tmp_path):
    """BatchNorm1d on (B, T, out) normalises axis 1 (T), not the combine's output features."""
    class TokenHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(8, 6), nn.BatchNorm1d(6)

        def forward(self, x):
            return self.bn(self.fc(x))
    torch.manual_seed(0)
    dense = TokenHead().eval()
    dense.bn.running_mean.uniform_(-1, 1), dense.bn.running_var.uniform_(0.5, 2)
    model, _ = to_basis(dense, rank=3, force=True)
    path = converters.export(model.eval(), torch.randn(2, 6, 8), tmp_path / "tokens.h5", n_random=0)
    report = engine.load(path).verify()
    assert report.ok, report.summary()


# --- rank choice and the report ---------------------------------------------------------------

def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),      # depthwise
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 4, 1), nn.Flatten(), nn.Linear(4 * 64, 10)).eval()


def test_skipped_layers_are_reported_with_reasons():
    energy = {"0": 0.7, "4": 0.7, "6": 0.99}                            # "8": no energy given
    model, report = to_basis(small_net(), energy=energy, example_input=torch.randn(1, 3, 8, 8))
    why = {r.path: r.skipped for r in report.records}
    assert why["2"].startswith("depthwise")
    assert why["6"].startswith("dense: M=") and "break-even" in why["6"]   # 1x1 to 4 channels
    assert why["4"] == "" and isinstance(model[4], BasisConv2d)
    assert why["8"] == "no energy / rank given for this layer"
    assert isinstance(model[2], nn.Conv2d) and isinstance(model[6], nn.Conv2d)
    text = str(report)
    assert "depthwise" in text and "layers decomposed" in text
    _, forced = to_basis(small_net(), rank=32, force=True)
    why = {r.path: r.skipped for r in forced.records}
    assert why["2"].startswith("depthwise") and why["6"] == ""           # force overrides break-even
    assert forced.per_position and "MACs/pos" in str(forced)


def test_rank_and_energy_by_layer_and_layers_selection():
    _, report = to_basis(small_net(), rank={"0": 2, "8": 3}, force=True)
    got = {r.path: r.rank for r in report.records}
    assert got == {"0": 2, "2": None, "4": None, "6": None, "8": 3}
    _, report = to_basis(small_net(), energy=0.9, layers=["4"])
    assert [r.path for r in report.decomposed] == ["4"]
    assert {r.skipped for r in report.records if r.path in ("0", "8")} == {"not selected (layers=)"}
    with pytest.raises(ValueError, match="no conv / linear layer named 'nope'"):
        to_basis(small_net(), rank={"nope": 2})
    with pytest.raises(ValueError, match="exactly one"):
        to_basis(small_net(), rank=2, energy=0.9)
    with pytest.raises(ValueError, match="example_input"):
        to_basis(small_net(), mac_budget=0.5)


@pytest.mark.parametrize("fraction", [0.3, 0.6])
def test_mac_budget_is_respected(fraction):
    model = FAMILIES["resnet18"][0]()
    x = torch.randn(*FAMILIES["resnet18"][1])
    new, report = to_basis(model, mac_budget=fraction, example_input=x)
    t = report.totals()
    assert t["macs_after"] <= fraction * t["macs_dense"]
    assert t["macs_after"] >= 0.9 * fraction * t["macs_dense"]          # and mostly used
    assert report.decomposed and all(0 < r.energy <= 1 for r in report.decomposed)
    with torch.no_grad():
        assert new(x).shape == model(x).shape
    with pytest.raises(ValueError, match="below the smallest possible network"):
        to_basis(model, mac_budget=0.01, example_input=x)


# --- whole networks ---------------------------------------------------------------------------

def _convert_families(tmp_path_factory, energy):
    """family -> (dense model, basis model at `energy`, report, example input, exported basis file)."""
    root = tmp_path_factory.mktemp(f"basis{round(100 * energy)}")
    out = {}
    for name, (factory, shape) in FAMILIES.items():
        dense = factory()
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        model, report = to_basis(dense, energy=energy, force=True, example_input=x)
        path = converters.export(model.eval(), x, root / f"{name}.h5", n_random=0)
        out[name] = (dense, model, report, x, path)
    return out


@pytest.fixture(scope="module")
def full_rank(tmp_path_factory):
    return _convert_families(tmp_path_factory, 1.0)


@pytest.fixture(scope="module")
def truncated(tmp_path_factory):
    return _convert_families(tmp_path_factory, 0.8)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_full_rank_basis_model_equals_the_dense_model(full_rank, name):
    dense, model, report, x, _ = full_rank[name]
    with torch.no_grad():
        for want, got in zip(as_list(dense(x)), as_list(model(x))):
            assert compare(got.numpy(), want.numpy())[1] <= RTOL
    for r in report.records:
        assert (r.rank is None) == r.skipped.startswith("depthwise"), r
        layer = model.get_submodule(r.path)
        assert isinstance(layer, (nn.Conv2d,) if r.rank is None else (BasisConv2d, BasisLinear))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_exported_basis_model_runs_node_by_node_in_the_engine(full_rank, name):
    _, _, _, _, path = full_rank[name]
    m = engine.load(path)
    assert any(n.op.startswith("basis_") for n in m.graph.nodes)
    report = m.verify(rtol=RTOL)
    assert report.ok, report.summary()
    basis_rows = m.count().nodes
    assert all(r.learnable_params < r.params for r in basis_rows if r.op.startswith("basis_"))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_truncated_basis_model_loses_the_discarded_energy_and_runs_in_the_engine(truncated, name):
    """Each decomposed layer's squared relative reconstruction error (float64, group by group) is
    its discarded energy 1 - kept; the exported model verifies node by node."""
    dense, model, report, _, path = truncated[name]
    assert report.decomposed and any(r.energy < 0.99 for r in report.decomposed)   # really truncated
    for r in report.decomposed:
        layer = model.get_submodule(r.path)
        W = dense.get_submodule(r.path).weight.detach().double().numpy()
        G = getattr(layer, "groups", 1)
        H = W.reshape(G, W.shape[0] // G, -1)                                     # (G, N/G, d)
        basis = layer.basis.double().numpy().reshape(G, r.rank, -1)               # (G, M, d)
        combine = layer.combine.detach().double().numpy().reshape(G, -1, r.rank)  # (G, N/G, M)
        err = np.linalg.norm(H - combine @ basis) ** 2 / np.linalg.norm(H) ** 2
        assert err == pytest.approx(1 - r.energy, abs=1e-9), (r.path, err, r.energy)
    report = engine.load(path).verify(rtol=RTOL)
    assert report.ok, report.summary()


def test_compress_graph_keeps_names_and_runs_the_dense_file(tmp_path):
    factory, shape = FAMILIES["vgg16_bn"]
    dense = converters.export(factory(), torch.randn(*shape), tmp_path / "dense.h5", n_random=1)
    graph, _ = load_file(dense)
    new, report = compress_graph(graph, energy=1.0, force=True)
    assert [n.name for n in new.nodes] == [n.name for n in graph.nodes]
    assert {n.op for n in new.nodes} >= {"basis_conv2d", "basis_linear"}
    assert new.meta["torch_version"] == "" and "compress" in new.meta["producer"]
    # lossless at full rank: the compressed file's outputs match the dense file's references
    out = tmp_path / "basis.h5"
    compress_file(dense, out, energy=1.0, force=True)
    m, d = engine.load(out), engine.load(dense)
    assert m.references.source == "engine-reference"
    for run in d.references.runs:
        got = m(run.inputs["x"])
        assert compare(got, run.nodes[d.graph.outputs[0][1]])[1] <= RTOL
    assert m.verify().ok


def test_compress_cli_works_without_torch(tmp_path):
    factory, shape = FAMILIES["resnet_bottleneck"]
    dense = converters.export(factory(), torch.randn(*shape), tmp_path / "dense.h5", n_random=0)
    out = tmp_path / "basis.h5"
    code = ("import sys; sys.modules['torch'] = None\n"      # any `import torch` now fails
            "from engine.cli import main\n"
            f"rc = main(['compress', {str(dense)!r}, '--energy', '0.9', '-o', {str(out)!r}])\n"
            f"rc = rc or main(['verify', {str(out)!r}])\n"
            "assert 'torch' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]\n"
            "sys.exit(rc)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "engine-reference" in proc.stdout and "OK" in proc.stdout
    assert "layers decomposed" in proc.stdout


def test_mac_budget_of_a_compressed_file_is_what_count_says(tmp_path):
    factory, shape = FAMILIES["alexnet"]
    dense = converters.export(factory(), torch.randn(*shape), tmp_path / "dense.h5", n_random=0)
    out = tmp_path / "basis.h5"
    report = compress_file(dense, out, mac_budget=0.4)
    macs = engine.load(out).count().total["macs"]
    assert macs == report.totals()["macs_after"] <= 0.4 * report.totals()["macs_dense"]
    assert macs == sum(r.macs for r in engine.load(out).count().nodes)


# --- fine-tuning and the spectrum -------------------------------------------------------------

def test_finetune_trains_only_the_combine_weights():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                        nn.Flatten(), nn.Linear(32, 3))
    x = torch.randn(48, 1, 6, 6)
    y = (x[:, 0, :3].mean((1, 2)) > 0).long() + (x[:, 0, 3:].mean((1, 2)) > 0).long()
    loader = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 48, 16)]
    model, _ = to_basis(net, rank=3, force=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = finetune(model, loader, epochs=3, lr=0.05, progress=False)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"0.combine", "5.combine"}
    assert set(result) >= {"acc_before", "acc_after", "trainable_params", "losses"}
    assert result["trainable_params"] == 8 * 3 + 3 * 3
    assert result["losses"][-1] < result["losses"][0]
    names = {id(p) for p in trainable_parameters(model, ("combine", "bias", "bn", "classifier"))}
    assert {id(model[0].bias), id(model[1].weight), id(model[5].combine), id(model[5].bias)} <= names
    with pytest.raises(ValueError, match="unknown part"):
        trainable_parameters(model, ("basis",))


def test_spectrum_matches_what_compress_uses(tmp_path):
    factory, shape = FAMILIES["densenet"]
    dense = converters.export(factory(), torch.randn(*shape), tmp_path / "dense.h5", n_random=0)
    graph, _ = load_file(dense)
    spectra = layer_spectra(graph)
    _, report = compress_graph(graph, energy=0.9, force=True)
    assert [s.rank_for(0.9) for s in spectra] == [r.rank for r in report.records]
    for s in spectra:
        assert s.energy[-1] == pytest.approx(1.0) and np.all(np.diff(s.energy) >= -1e-12)
        assert s.break_even == pytest.approx(s.N * s.d / (s.groups * s.d + s.N))
    w = graph.nodes[0].weights["weight"]
    np.testing.assert_allclose(singular_values(w, 1)[0], np.linalg.svd(w.reshape(len(w), -1).astype(np.float64),
                                                                       compute_uv=False))
    pytest.importorskip("matplotlib")
    from engine.cli import main
    assert main(["inspect", str(dense), "--spectrum", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 10_000

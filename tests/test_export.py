"""converters.export: graph structure, references and errors, read back with engine.format."""
import json

import h5py
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

import converters
from converters import InputError, UnsupportedOpError, export
from engine.format import load
from tests.models import FAMILIES, as_list

# the exact set of ops each family must export to
_CNN = {"conv2d", "batch_norm", "relu", "linear"}
OPS = {
    "vgg16_bn": _CNN | {"max_pool2d", "adaptive_avg_pool2d", "flatten", "identity"},
    "resnet18": _CNN | {"max_pool2d", "add", "adaptive_avg_pool2d", "reshape"},
    "resnet_bottleneck": _CNN | {"add", "adaptive_avg_pool2d", "reshape"},
    "densenet": _CNN | {"concat", "avg_pool2d", "adaptive_avg_pool2d", "flatten"},
    "alexnet": {"conv2d", "relu", "max_pool2d", "adaptive_avg_pool2d", "flatten", "identity", "linear"},
    "mobilenet_v2": {"conv2d", "batch_norm", "clip", "add", "adaptive_avg_pool2d", "flatten", "identity",
                     "linear"},
    "two_outputs": _CNN | {"max_pool2d", "adaptive_avg_pool2d", "flatten", "sigmoid"},
    "dict_outputs": _CNN | {"max_pool2d", "identity", "avg_pool2d", "adaptive_avg_pool2d", "flatten", "clip",
                            "tanh", "leaky_relu", "log_softmax", "softmax"},
    "permute_view": _CNN | {"permute", "reshape", "flatten", "identity", "concat"},
    "functional": {"conv2d", "silu", "hardswish", "leaky_relu", "prelu", "sigmoid", "tanh", "concat", "mul",
                   "add", "max_pool2d", "avg_pool2d", "mean", "clip", "identity", "linear", "softmax",
                   "log_softmax", "relu"},
    "conv_variants": _CNN | {"hardswish", "silu", "clip", "flatten"},
}
KIND = {"two_outputs": "tuple", "dict_outputs": "dict"}
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")


def _export_family(name, tmp_path):
    factory, shape = FAMILIES[name]
    model = factory()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    x3 = torch.randn(3, *shape[1:], generator=torch.Generator().manual_seed(2))
    path = export(model, x, tmp_path / f"{name}.h5", reference_inputs=[x3], n_random=1)
    return model, load(path)


def test_every_family_is_listed():
    assert set(OPS) == set(FAMILIES)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_graph_and_references(name, tmp_path):
    model, (graph, refs) = _export_family(name, tmp_path)

    # graph: ops, one node per tensor-valued fx node (same names), module paths, output kind
    assert {n.op for n in graph.nodes} == OPS[name]
    assert graph.output_kind == KIND.get(name, "tensor")
    assert graph.meta == {"producer": f"basisconv-converters {converters.__version__}",
                          "torch_version": str(torch.__version__), "model_class": type(model).__name__}
    gm = converters.trace(model)
    with torch.no_grad():
        ShapeProp(gm).propagate(torch.randn(*FAMILIES[name][1]))
    tensor_nodes = [n for n in gm.graph.nodes
                    if n.op.startswith("call") and isinstance(n.meta.get("tensor_meta"), TensorMetadata)]
    assert [n.name for n in graph.nodes] == [n.name for n in tensor_nodes]
    modules = dict(model.named_modules())
    for n, fxn in zip(graph.nodes, tensor_nodes):
        assert n.module == (fxn.target if fxn.op == "call_module" else "")
        assert n.module == "" or n.module in modules
        assert all(w.dtype == np.float32 for w in n.weights.values())

    # references: example (batch 1), batch 3, one random; every node; outputs equal PyTorch's
    assert refs.stored == "all" and refs.source == "pytorch" and len(refs.runs) == 3
    assert [r.inputs[graph.inputs[0].name].shape[0] for r in refs.runs] == [1, 3, 1]
    for run in refs.runs:
        assert set(run.nodes) == {n.name for n in graph.nodes}
        for n in graph.nodes:
            assert list(run.nodes[n.name].shape[1:]) == n.shape[1:]
        with torch.no_grad():
            want = as_list(model(torch.from_numpy(run.inputs[graph.inputs[0].name])))
        got = [run.nodes[node] for _, node in graph.outputs]
        for w, g in zip(want, got, strict=True):
            np.testing.assert_allclose(g, w.numpy(), rtol=1e-6, atol=1e-6)
    if name == "dict_outputs":
        assert [o for o, _ in graph.outputs] == ["logits", "embedding", "probs"]


def test_shape_attributes_are_normalized(tmp_path):
    _, (graph, _) = _export_family("functional", tmp_path)
    attrs = {n.name: n.attrs for n in graph.nodes}
    assert attrs["cat"]["axis"] == 1                       # dim=-3 on a rank-4 tensor
    assert attrs["mean"] == {"dims": [2, 3], "keepdim": True}
    assert attrs["softmax"]["axis"] == 1 and attrs["log_softmax"]["axis"] == 1
    assert attrs["mul"] == {"scalar": 0.75} and attrs["mul_1"] == {"scalar": 2.0}   # x * s, s * x
    assert attrs["relu6"] == {"min": 0.0, "max": 6.0}
    assert graph.node("prelu_1").weights["weight"].shape == (1,)                   # F.prelu(x, param)
    _, (graph, _) = _export_family("permute_view", tmp_path)
    assert graph.node("transpose").op == "permute" and graph.node("transpose").attrs == {"perm": [0, 2, 1]}
    assert graph.node("flatten").attrs == {"start_dim": 2, "end_dim": 3}


def test_conv_padding_encodings(tmp_path):
    model, (graph, _) = _export_family("conv_variants", tmp_path)
    convs = [n for n in graph.nodes if n.op == "conv2d"]
    assert [c.attrs["padding"] for c in convs] == [[1, 2, 2, 2], [2, 2, 2, 2], [1, 2, 1, 2], [1, 2, 1, 2],
                                                   [0, 0, 0, 0]]
    assert [c.attrs["padding_mode"] for c in convs] == ["zeros", "reflect", "replicate", "circular", "zeros"]
    assert "bias" not in convs[2].weights and convs[1].attrs["groups"] == 3
    bn = graph.node("_1")                                   # affine=False: only the statistics
    assert sorted(bn.weights) == ["running_mean", "running_var"]
    # 'same' with an even kernel: the explicit [top, left, bottom, right] reproduces PyTorch
    conv, x = model[0], torch.randn(2, 3, 21, 19)
    t, l, b, r = convs[0].attrs["padding"]
    with torch.no_grad():
        want = conv(x)
        got = F.conv2d(F.pad(x, (l, r, t, b)), conv.weight, conv.bias, dilation=conv.dilation)
    torch.testing.assert_close(got, want)


def test_reshape_encoding_survives_other_batch_sizes(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            y = self.conv(x)
            return y.view(y.size(0), -1), y.reshape(y.shape[0], 4, -1), y.view(-1, 5), y.view(-1)

    model, x = Net(), torch.randn(2, 3, 7, 6)
    path = export(model, x, tmp_path / "r.h5", n_random=0)
    with h5py.File(path) as f:
        nodes = {n["name"]: n for n in json.loads(f["graph"][()])["nodes"]}
    codes = [nodes[k]["attrs"]["shape"] for k in ("view", "reshape", "view_1", "view_2")]
    assert codes == [[0, -1], [0, 0, -1], [-1, 5], [-1]]
    # the engine's semantics (0 = copy the input's size there, -1 inferred) at batch 3
    y3 = model.conv(torch.randn(3, 3, 7, 6)).detach()
    for code, want in zip(codes, as_list(model(torch.randn(3, 3, 7, 6)))):
        target = [y3.shape[i] if c == 0 else c for i, c in enumerate(code)]
        assert list(y3.numpy().reshape(target).shape) == list(want.shape)


def test_store_outputs_keeps_only_outputs(tmp_path):
    model = FAMILIES["two_outputs"][0]()
    path = export(model, torch.randn(*FAMILIES["two_outputs"][1]), tmp_path / "o.h5", store="outputs")
    graph, refs = load(path)
    assert refs.stored == "outputs" and len(refs.runs) == 3
    assert all(set(r.nodes) == {node for _, node in graph.outputs} for r in refs.runs)


def test_outputs_that_are_inputs_or_repeated_get_identity_nodes(tmp_path):
    class Net(nn.Module):
        def forward(self, x):
            y = torch.relu(x)
            return x, y, y

    graph, refs = load(export(Net(), torch.randn(2, 5), tmp_path / "i.h5"))
    assert graph.output_kind == "tuple"
    assert graph.outputs == [("output_0", "output_0"), ("output_1", "relu"), ("output_2", "output_2")]
    assert [(n.name, n.op, n.inputs) for n in graph.nodes] == [
        ("relu", "relu", ["x"]), ("output_0", "identity", ["x"]), ("output_2", "identity", ["relu"])]
    run = refs.runs[0]
    np.testing.assert_array_equal(run.nodes["output_0"], run.inputs["x"])
    np.testing.assert_array_equal(run.nodes["output_2"], run.nodes["relu"])


def test_multi_input_model(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(2, 4, 1)

        def forward(self, image, mask):
            return self.a(image) + self.b(mask)

    model, xs = Net(), (torch.randn(1, 3, 9, 7), torch.randn(1, 2, 9, 7))
    extra = (torch.randn(4, 3, 9, 7), torch.randn(4, 2, 9, 7))
    graph, refs = load(export(model, xs, tmp_path / "m.h5", reference_inputs=[extra], n_random=2, seed=3))
    assert [t.name for t in graph.inputs] == ["image", "mask"]
    assert [t.shape for t in graph.inputs] == [[None, 3, 9, 7], [None, 2, 9, 7]]
    assert len(refs.runs) == 4 and refs.runs[1].inputs["mask"].shape == (4, 2, 9, 7)
    with torch.no_grad():
        want = model(*extra).numpy()
    np.testing.assert_allclose(refs.runs[1].nodes["add"], want, rtol=1e-6, atol=1e-6)
    # random inputs are reproducible from the seed
    _, again = load(export(model, xs, tmp_path / "m2.h5", n_random=2, seed=3))
    np.testing.assert_array_equal(again.runs[1].inputs["image"], refs.runs[2].inputs["image"])
    with pytest.raises(InputError, match="1 tensors for 2 model inputs"):
        export(model, xs[0], tmp_path / "bad.h5")


def test_training_flags_restored_and_weights_cast_to_float32(tmp_path):
    model = FAMILIES["two_outputs"][0]().double().train()
    model.seg.eval()
    graph, refs = load(export(model, torch.randn(2, 3, 12, 12, dtype=torch.float64), tmp_path / "d.h5"))
    assert model.training and model.backbone.training and not model.seg.training
    assert all(w.dtype == np.float32 for n in graph.nodes for w in n.weights.values())
    assert refs.runs[0].nodes["backbone_0_1"].dtype == np.float32        # eval-mode BN, stored float32


def test_registered_leaf_module_is_one_node(tmp_path, monkeypatch):
    class Scaled(nn.Module):
        """Would be untraceable if fx traced into it (data-dependent branch)."""
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor([2.0, 3.0]))

        def forward(self, x):
            return x * self.scale if x.sum() > -1e9 else x

    def exporter(m):
        return "channel_scale", {"axis": 1}, {"scale": m.scale.detach().double().numpy()}

    monkeypatch.setitem(converters.LEAF_EXPORTERS, Scaled, exporter)
    model = nn.Sequential(nn.Linear(3, 2), Scaled())
    graph, _ = load(export(model, torch.randn(2, 3), tmp_path / "leaf.h5"))
    node = graph.nodes[-1]
    assert (node.op, node.module, node.inputs, node.attrs) == ("channel_scale", "1", ["_0"], {"axis": 1})
    assert node.weights["scale"].dtype == np.float32


def test_subclasses_export_as_their_base_only_without_their_own_forward(tmp_path):
    class Halve(nn.Module):
        def forward(self, w):
            return w / 2

    class Doubled(nn.Conv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    conv = nn.Conv2d(3, 4, 3)
    parametrize.register_parametrization(conv, "weight", Halve())    # class ParametrizedConv2d
    graph, _ = load(export(nn.Sequential(conv), torch.randn(2, 3, 8, 8), tmp_path / "p.h5"))
    assert [n.op for n in graph.nodes] == ["conv2d"]
    np.testing.assert_array_equal(graph.nodes[0].weights["weight"], conv.weight.detach().numpy())
    with pytest.raises(UnsupportedOpError, match="function torch.conv2d at node 'conv2d' in module '0'"):
        export(nn.Sequential(Doubled(3, 4, 3)), torch.randn(2, 3, 8, 8), tmp_path / "d.h5")


class _Wrap(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.block = inner

    def forward(self, x):
        return self.block(x)


class _LSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 4, batch_first=True)

    def forward(self, x):
        return self.rnn(x)[0]


def _sort(x):
    return torch.sort(x, dim=1)[0]


def _data_dependent(x):
    return x if x.sum() > 0 else 2 * x


def _mutates_then_reads(x):
    y = x * 2
    return y + y.relu_()


def _fn(f):
    """A module whose forward is `f`."""
    return type(f.__name__, (nn.Module,), {"forward": lambda self, x: f(x)})()


@pytest.mark.parametrize("inner, shape, needles", [
    (_LSTM(), (2, 3, 4), ["torch.nn.modules.rnn.LSTM", "'block.rnn'"]),
    (_fn(_sort), (2, 4), ["function torch.sort", "in module 'block'"]),
    (_fn(_data_dependent), (2, 4), ["cannot trace module 'block'", "control flow"]),
    (_fn(lambda x: torch.add(x, x, alpha=2)), (2, 4), ["torch.add", "alpha=2", "'block'"]),
    (_fn(lambda x: F.dropout(x, 0.5)), (2, 4), ["dropout", "training=True"]),
    (_fn(lambda x: x[:, :2]), (2, 4), ["operator.getitem", "'block'"]),
    (_fn(_mutates_then_reads), (2, 4), ["'mul' is modified in place", "node 'add'"]),
    (nn.BatchNorm1d(4, track_running_stats=False), (2, 4), ["BatchNorm1d", "track_running_stats=False"]),
    (nn.Conv1d(4, 4, 1), (2, 4, 3), ["Conv1d", "'block'"]),
    (_fn(lambda x: x.mean()), (2, 4), ["Tensor.mean", "pass dim"]),
])
def test_unsupported_ops_are_named_with_their_module(inner, shape, needles, tmp_path):
    with pytest.raises(UnsupportedOpError) as info:
        export(_Wrap(inner), torch.randn(*shape), tmp_path / "u.h5")
    for needle in needles:
        assert needle in str(info.value)


def test_parameter_used_directly_is_refused(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x + self.p

    with pytest.raises(UnsupportedOpError, match="parameter/buffer 'p' is used directly"):
        export(Net(), torch.randn(2, 4), tmp_path / "p.h5")


def test_bad_outputs_are_refused(tmp_path):
    with pytest.raises(UnsupportedOpError, match="output key 'a-b'"):
        export(_fn(lambda x: {"a-b": x * 1}), torch.randn(2, 4), tmp_path / "k.h5")
    with pytest.raises(UnsupportedOpError, match="Tensor.argmax"):
        export(_fn(lambda x: x.argmax(1)), torch.randn(2, 4), tmp_path / "a.h5")

"""Bad files: every malformed file is refused with a named error before any kernel runs."""
import json

import h5py
import numpy as np
import pytest

import engine
from engine import format as fmt
from engine.graph import Graph, Node, TensorSpec


def tiny_graph() -> Graph:
    rng = np.random.default_rng(0)
    w = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    conv = {"stride": [1, 1], "padding": [1, 1, 1, 1], "dilation": [1, 1], "groups": 1, "padding_mode": "zeros"}
    nodes = [
        Node("conv", "conv2d", ["x"], conv, {"weight": w(4, 3, 3, 3), "bias": w(4)}, "conv"),
        Node("act", "relu", ["conv"]),
        Node("flat", "flatten", ["act"], {"start_dim": 1, "end_dim": 3}),
        Node("fc", "linear", ["flat"], {}, {"weight": w(5, 4 * 6 * 6), "bias": w(5)}, "fc"),
    ]
    return Graph([TensorSpec("x", [None, 3, 6, 6])], [("out", "fc")], "tensor", nodes,
                 {"producer": "test", "model_class": "Tiny"})


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.h5"
    g = tiny_graph()
    x = np.random.default_rng(1).standard_normal((2, 3, 6, 6)).astype(np.float32)
    fmt.save(path, g)
    model = engine.load(path)
    out = model.activations(x, kernels="reference")
    fmt.save(path, g, fmt.References([fmt.Reference({"x": x}, out)], stored="all", source="test"))
    return path


def edit(path, fn):
    with h5py.File(path, "r+") as f:
        fn(f)
    return path


def edit_graph(path, fn):
    def change(f):
        doc = json.loads(f["graph"][()])
        fn(doc)
        del f["graph"]
        f.create_dataset("graph", data=np.bytes_(json.dumps(doc)))
    return edit(path, change)


def test_good_file_loads_and_verifies(good):
    report = engine.load(good).verify()
    assert report.ok, report.summary()
    assert report.first_failure is None


def test_truncated_file(good, tmp_path):
    data = good.read_bytes()
    for cut in (len(data) // 2, 100, 0):
        bad = tmp_path / f"cut{cut}.h5"
        bad.write_bytes(data[:cut])
        with pytest.raises(engine.FormatError):
            engine.load(bad)


@pytest.mark.parametrize("mutate, error, words", [
    (lambda f: f.attrs.__setitem__("format_version", 2), engine.FormatError, "format_version"),
    (lambda f: f.attrs.__setitem__("format", "onnx"), engine.FormatError, "format"),
    (lambda f: f.__delitem__("graph"), engine.FormatError, "/graph"),
    (lambda f: f.__delitem__("weights/fc/weight"), engine.FormatError, "'fc' weight 'weight'"),
    (lambda f: f.__delitem__("references/0/nodes/act"), engine.FormatError, "node 'act'"),
    (lambda f: (f.__delitem__("weights/fc/bias"), f.create_dataset("weights/fc/bias", data=np.zeros(7, np.float32))),
     engine.FormatError, "fc"),
    (lambda f: (f.__delitem__("weights/conv/weight"), f.create_dataset("weights/conv/weight", data=np.zeros((4, 3, 3, 3)))),
     engine.FormatError, "float32"),
    (lambda f: f["weights/conv/bias"].__setitem__(0, np.nan), engine.FormatError, "NaN"),
])
def test_bad_datasets(good, mutate, error, words):
    with pytest.raises(error, match=words):
        engine.load(edit(good, mutate))


@pytest.mark.parametrize("mutate, error, words", [
    (lambda d: d["nodes"][1].__setitem__("inputs", ["nowhere"]), engine.FormatError, "'nowhere'"),
    (lambda d: d["nodes"][1].__setitem__("inputs", ["fc"]), engine.FormatError, "earlier node"),
    (lambda d: d["nodes"][0].__setitem__("op", "conv3d"), engine.UnsupportedOpError, "conv3d"),
    (lambda d: d["nodes"][0]["attrs"].__setitem__("stride", [0, 1]), engine.FormatError, "stride"),
    (lambda d: d["nodes"][0]["attrs"].__setitem__("groups", 2), engine.FormatError, "conv"),
    (lambda d: d["nodes"][0]["attrs"].pop("padding"), engine.FormatError, "padding"),
    (lambda d: d["nodes"][2].__setitem__("name", "act"), engine.FormatError, "twice"),
    (lambda d: d.__setitem__("outputs", [{"name": "out", "node": "ghost"}]), engine.FormatError, "output"),
    (lambda d: d["inputs"][0].__setitem__("shape", [None, 3, 7, 6]), engine.FormatError, "fc"),
    (lambda d: d["inputs"][0].__setitem__("shape", [None, 3, 1 << 30, 6]), engine.LimitError, "max_dim_size"),
    (lambda d: d.__setitem__("output_kind", "list"), engine.FormatError, "output_kind"),
    (lambda d: d["nodes"][0].__setitem__("shape", [None, 5, 6, 6]), engine.FormatError, "output shape"),
])
def test_bad_graph(good, mutate, error, words):
    with pytest.raises(error, match=words):
        engine.load(edit_graph(good, mutate))


def test_graph_not_json(good):
    def garble(f):
        del f["graph"]
        f.create_dataset("graph", data=np.bytes_("{nodes: oops"))
    with pytest.raises(engine.FormatError, match="JSON"):
        engine.load(edit(good, garble))


def test_limits_refuse_big_weights_before_reading(good):
    with pytest.raises(engine.LimitError, match="max_weight_elements"):
        engine.load(good, limits=fmt.Limits(max_weight_elements=100))
    engine.load(good, limits=fmt.Limits(max_weight_elements=1000))


@pytest.mark.parametrize("x, words", [
    (np.zeros((2, 3, 6), np.float32), "rank 4"),
    (np.zeros((2, 4, 6, 6), np.float32), "conv"),
    (np.zeros((2, 3, 7, 6), np.float32), "fc"),
    (np.zeros((2, 3, 6, 6), np.int32), "floating"),
    (np.zeros((0, 3, 6, 6), np.float32), "empty batch"),
    ([[1.0]], "ndarray"),
])
def test_bad_inputs(good, x, words):
    with pytest.raises(engine.InputError, match=words):
        engine.load(good)(x)


def test_input_dtype_and_layout_are_normalised(good):
    model = engine.load(good)
    x = np.random.default_rng(2).standard_normal((3, 3, 6, 6))
    want = model(x.astype(np.float32))
    for variant in (x, x.astype(">f4"), np.asfortranarray(x), x.astype(np.float16).astype(np.float64)):
        got = model(variant)
        assert got.dtype == np.float32 and got.shape == (3, 5)
    np.testing.assert_allclose(model(np.asfortranarray(x)), want, rtol=0, atol=1e-6)

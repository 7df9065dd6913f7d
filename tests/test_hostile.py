"""Hostile files: every claim is checked against the limits before memory is spent, nothing is
read from outside the file, and every value a kernel sees is in range (or a named error)."""
import json
import re
import subprocess
import sys
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_format import edit, edit_graph, good, tiny_graph  # noqa: F401 - good: a fixture

import engine
from engine import format as fmt
from engine.graph import Graph, Node, TensorSpec

ROOT = Path(__file__).resolve().parent.parent
X = np.random.default_rng(1).standard_normal((2, 3, 6, 6)).astype(np.float32)     # test_format's good input
CONV = {"stride": [1, 1], "padding": [1, 1, 1, 1], "dilation": [1, 1], "groups": 1, "padding_mode": "zeros"}


def one_node(op, attrs=None, weights=None, shape=(None, 3, 6, 6)) -> Graph:
    return Graph([TensorSpec("x", list(shape))], [("y", "n")], "tensor",
                 [Node("n", op, ["x"], attrs or {}, weights or {})])


def plan(graph, **limits):
    return engine.Model(graph, fmt.References(), engine.Limits(**limits) if limits else None)


# --- limits ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{"max_nodes": -1}, {"max_ops": True}, {"max_dims": 33}, {"max_chunks": 1.5}])
def test_limits_themselves_are_checked(kwargs):
    with pytest.raises(ValueError, match="Limits"):
        engine.Limits(**kwargs)


def test_every_limit_is_raisable(good):
    """The defaults accept the file; each limit set below what it needs refuses it, by name."""
    cases = {"max_nodes": 3, "max_graph_json_bytes": 100, "max_weight_elements": 100,
             "max_total_weight_bytes": 1000, "max_reference_bytes": 1000, "max_references": 0,
             "max_dim_size": 100, "max_activation_elements": 100, "max_live_elements": 500, "max_ops": 1000}
    for key, low in cases.items():
        with pytest.raises(engine.LimitError, match=key):
            engine.load(good, limits=engine.Limits(**{key: low}))
    engine.load(good)


def test_chunk_count_is_limited(good):
    edit(good, lambda f: (f.__delitem__("weights/fc/weight"),
                          f.create_dataset("weights/fc/weight", data=tiny_graph().node("fc").weights["weight"],
                                           chunks=(1, 1))))
    with pytest.raises(engine.LimitError, match="max_chunks"):
        engine.load(good, limits=engine.Limits(max_chunks=100))


def test_doubling_graph_is_refused_before_running():
    nodes, prev = [], "x"
    for i in range(40):
        nodes.append(Node(f"d{i}", "concat", [prev, prev], {"axis": 1}))
        prev = f"d{i}"
    with pytest.raises(engine.LimitError, match="max_activation_elements"):
        engine.Model(Graph([TensorSpec("x", [None, 3, 6, 6])], [("y", prev)], "tensor", nodes), fmt.References())


def test_what_a_call_holds_at_once_is_limited():
    """Every node a graph output: the fused plan keeps them all, so the peak is their sum."""
    nodes = [Node(f"r{i}", "relu", ["x"]) for i in range(10)]
    g = Graph([TensorSpec("x", [None, 3, 6, 6])], [(f"o{i}", f"r{i}") for i in range(10)], "tuple", nodes)
    model = plan(g, max_live_elements=10 * 108 + 108)
    model(X[:1])
    with pytest.raises(engine.LimitError, match="max_live_elements"):
        model(X)


def test_ops_are_limited_at_load():
    graph = one_node("conv2d", dict(CONV, padding=[0] * 4), {"weight": np.ones((4, 3, 8, 8), np.float32)},
                     (None, 3, 64, 64))
    plan(graph, max_ops=1 << 22)
    with pytest.raises(engine.LimitError, match="max_ops"):
        plan(graph, max_ops=1 << 20)


def test_rank_is_limited():
    with pytest.raises(engine.LimitError, match="max_dims"):
        plan(one_node("reshape", {"shape": [1] * 40 + [-1]}))


# --- attribute values ---------------------------------------------------------------------------

@pytest.mark.parametrize("attrs, words", [
    (dict(CONV, stride=[10 ** 30, 1]), "int64"),
    (dict(CONV, groups=2 ** 63), "int64"),
    (dict(CONV, padding=[1, 1, 1, [[[[[[[[[[1]]]]]]]]]]]), "nested"),
    (dict(CONV, groups=object()), "not a JSON value"),
])
def test_attribute_values_beyond_json(attrs, words):
    with pytest.raises(engine.FormatError, match=words):
        plan(one_node("conv2d", attrs, {"weight": np.ones((4, 3, 3, 3), np.float32)}))


@pytest.mark.parametrize("op, attrs", [
    ("clip", {"min": float("nan"), "max": 1.0}),
    ("clip", {"min": 0.0, "max": float("inf")}),
    ("leaky_relu", {"negative_slope": 1e308}),
    ("add", {"scalar": 10 ** 400}),
])
def test_non_finite_or_float32_overflowing_attributes(op, attrs):
    with pytest.raises(engine.FormatError, match="attribute"):
        plan(one_node(op, attrs))


@pytest.mark.parametrize("text, words", [
    ('{"nodes": [' * 50_000, "nested too deeply|not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"a": 1' + "0" * 5000 + "}", "not valid JSON"),
    (b'{"a": "\xff"}', "not valid JSON"),
])
def test_graph_json_garbage(good, text, words):
    def write(f):
        del f["graph"]
        f.create_dataset("graph", data=np.bytes_(text.encode() if isinstance(text, str) else text))
    with pytest.raises(engine.FormatError, match=words):
        engine.load(edit(good, write))


@pytest.mark.parametrize("mutate, error, words", [
    (lambda d: d["nodes"][0]["attrs"].__setitem__("stride", [float("nan"), 1]), engine.FormatError, "stride"),
    (lambda d: d["nodes"][0]["attrs"].__setitem__("padding", [1e400, 1, 1, 1]), engine.FormatError, "padding"),
    (lambda d: d["inputs"][0].__setitem__("shape", [None, 3, 0, 6]), engine.FormatError, "positive"),
    (lambda d: d.__setitem__("nodes", d["nodes"] * 3000), engine.LimitError, "max_nodes"),
    (lambda d: d["outputs"][0].__setitem__("node", ["fc"]), engine.FormatError, "output 0"),
    (lambda d: d.__setitem__("outputs", d["outputs"] * 2), engine.FormatError, "exactly one output"),
    (lambda d: d["nodes"][2]["attrs"].__setitem__("end_dim", True), engine.FormatError, "end_dim"),
])
def test_hostile_graph_fields(good, mutate, error, words):
    with pytest.raises(error, match=words):
        engine.load(edit_graph(good, mutate))


def test_empty_tensors_are_refused():
    with pytest.raises(engine.FormatError, match="empty output"):
        plan(one_node("linear", {}, {"weight": np.ones((0, 6), np.float32)}))


# --- storage: only this file's bytes, gzip within bounds -----------------------------------------

def _swap(name, **kwargs):
    def change(f):
        data = f[name][()]
        del f[name]
        f.create_dataset(name, **({"data": data} | kwargs))
    return change


def _relink(link):
    def change(f):
        del f["weights/fc/bias"]
        f["weights/fc/bias"] = link
    return change


@pytest.mark.parametrize("change, words", [
    (_relink(h5py.SoftLink("/weights/conv/bias")), "SoftLink"),
    (_relink(h5py.ExternalLink("other.h5", "/b")), "ExternalLink"),
    (lambda f: (f.__delitem__("weights/fc/bias"),
                f.create_dataset("weights/fc/bias", shape=(5,), dtype="<f4",
                                 external=[("/etc/hostname", 0, 20)])),
     "outside the file"),
    (_swap("weights/fc/bias", dtype=">f4"), "little-endian"),
    (_swap("weights/fc/weight", chunks=(5, 16), compression="gzip", shuffle=True), "filters"),
    (_swap("weights/fc/weight", chunks=(5, 16), fletcher32=True), "filters"),
    (lambda f: f.__delitem__("weights/fc/bias") or f.create_dataset(
        "weights/fc/bias", shape=(5,), maxshape=(None,), chunks=(4096,), dtype="<f4"), "chunk shape"),
])
def test_storage_outside_the_rules(good, change, words):
    with pytest.raises(engine.FormatError, match=words):
        engine.load(edit(good, change))


def test_virtual_dataset_refused(good):
    def change(f):
        layout = h5py.VirtualLayout(shape=(5,), dtype="<f4")
        layout[...] = h5py.VirtualSource(".", "src", shape=(5,))
        f.create_dataset("src", data=np.zeros(5, np.float32))
        del f["weights/fc/bias"]
        f.create_virtual_dataset("weights/fc/bias", layout)
    with pytest.raises(engine.FormatError, match="outside the file"):
        engine.load(edit(good, change))


def test_gzip_chunks_read_like_plain_ones(good):
    want = engine.load(good)(X)
    edit(good, lambda f: (_swap("weights/conv/weight", chunks=(3, 2, 2, 2), compression="gzip")(f),
                          _swap("weights/fc/weight", chunks=(2, 50), compression="gzip", fillvalue=7.0)(f)))
    model = engine.load(good)
    np.testing.assert_array_equal(model(X), want)
    assert model.verify().ok


def test_gzip_bomb_in_one_chunk_is_refused(good):
    """A chunk declared 20 floats whose stream inflates to 64 MiB: refused after 80 bytes."""
    def bomb(f):
        del f["weights/fc/bias"]
        ds = f.create_dataset("weights/fc/bias", shape=(5,), chunks=(5,), dtype="<f4", compression="gzip")
        ds.id.write_direct_chunk((0,), zlib.compress(bytes(64 << 20), 9))
    with pytest.raises(engine.FormatError, match="does not end within its 20 bytes"):
        engine.load(edit(good, bomb))


def test_reference_bytes_are_limited_before_reading(good):
    """Each array within max_weight_elements, the claimed total over max_reference_bytes."""
    def grow(f):
        for i in range(1, 5):
            g = f.create_group(f"references/{i}")
            g.create_dataset("inputs/x", shape=(1 << 20, 3, 6, 6), dtype="<f4", chunks=(1 << 10, 3, 6, 6),
                             compression="gzip")
            nodes = g.create_group("nodes")
            for name in ("conv", "act", "flat", "fc"):
                f.copy(f"references/0/nodes/{name}", nodes, name)
        f["references"].attrs["count"] = 5
    with pytest.raises(engine.LimitError, match="max_reference_bytes"):
        engine.load(edit(good, grow))


@pytest.mark.parametrize("change, words", [
    (_swap("references/0/inputs/x", data=X[:, :, :5]), "reference run 0"),
    (_swap("references/0/nodes/act", data=np.zeros((2, 4, 6, 5), np.float32)), "node 'act' stored with shape"),
    (_swap("references/0/inputs/x", data=X[0]), "expected rank 4"),
])
def test_references_must_fit_the_graph(good, change, words):
    with pytest.raises(engine.FormatError, match=words):
        engine.load(edit(good, change))


def test_variable_length_strings_are_refused_unread(good, tmp_path):
    """vlen data lives in HDF5's global heap, whose corrupt headers hang libhdf5 (an object of
    size 0 loops forever): such a file must be refused without reading it (in a child, in case)."""
    edit(good, lambda f: f.attrs.__setitem__("producer", "variable length"))
    data = bytearray(good.read_bytes())
    heap = data.find(b"GCOL")
    data[heap + 16:heap + 32] = bytes(16)           # the first object's header: index 0, size 0
    bad = tmp_path / "heap.h5"
    bad.write_bytes(bytes(data))
    code = f"import engine\ntry:\n    engine.load({str(bad)!r})\nexcept engine.FormatError as e:\n    print(e)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "variable-length data is refused" in out.stdout, out.stderr[-2000:]
    with h5py.File(good, "r+") as f:
        del f.attrs["producer"]
        text = f["graph"][()].decode()
        del f["graph"]
        f["graph"] = text
    with pytest.raises(engine.FormatError, match="fixed-length string"):
        engine.load(good)


def test_graph_string_size_is_limited(good):
    edit(good, _swap("graph", data=np.bytes_(b" " * 4096 + json.dumps({}).encode())))
    with pytest.raises(engine.LimitError, match="max_graph_json_bytes"):
        engine.load(good, limits=engine.Limits(max_graph_json_bytes=1000))


# --- no pickle ---------------------------------------------------------------------------------

def test_no_pickle_anywhere():
    """No module unpickles: np.load only with allow_pickle=False, torch.load only weights_only."""
    for path in [*ROOT.glob("engine/**/*.py"), *ROOT.glob("converters/**/*.py")]:
        text = path.read_text()
        assert not re.search(r"\bimport (c?pickle|dill|joblib)|\bpickle\.|allow_pickle=True|weights_only=False",
                             text), path
        for call in re.findall(r"np\.load\([^)]*\)", text):
            assert "allow_pickle=False" in call, (path, call)
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)


# --- op-module holes found by fuzzing -----------------------------------------------------------

AVG = {"kernel": [3, 3], "stride": [1, 1], "padding": [1, 1], "ceil_mode": False, "count_include_pad": False}


@pytest.mark.parametrize("dilation", ["ab", [0, 0], [2, 2], [1.5, 1]])
def test_avg_pool_dilation_is_checked(dilation):
    with pytest.raises(engine.FormatError, match="dilation"):
        plan(one_node("avg_pool2d", dict(AVG, dilation=dilation)))


@pytest.mark.parametrize("var, eps", [(-1.0, 1e-5), (0.0, 0.0)])
def test_batch_norm_variance_must_be_positive(var, eps):
    w = {k: np.ones(3, np.float32) for k in ("weight", "bias", "running_mean")}
    with pytest.raises(engine.FormatError, match="running_var"):
        plan(one_node("batch_norm", {"eps": eps}, dict(w, running_var=np.full(3, var, np.float32))))


def test_pool_cost_of_a_huge_window_is_computed_not_allocated():
    pool = {"kernel": [1 << 16, 1], "stride": [1, 1], "padding": [1 << 15, 0], "dilation": [1, 1],
            "ceil_mode": False}
    with pytest.raises(engine.LimitError, match="max_ops"):
        plan(one_node("max_pool2d", pool, shape=(None, 1, 1 << 24, 1)), max_ops=1 << 30)


TT = {"stride": [1, 1], "dilation": [1, 1], "padding_mode": "zeros", "padding": [7] * 4, "in_modes": [16, 16],
      "out_modes": [1, 1], "ranks": [16, 1], "kernel_size": [16, 16]}


@pytest.mark.parametrize("graph", [
    # zero padding is applied inside the im2col kernels; other modes pad a copy of the input first
    pytest.param(one_node("conv2d", dict(CONV, padding=[300] * 4, stride=[400, 400], padding_mode="replicate"),
                          {"weight": np.ones((4, 3, 3, 3), np.float32)}),
                 id="conv2d padded input"),
    pytest.param(one_node("conv2d", dict(CONV, groups=2), {"weight": np.ones((2, 3, 64, 64), np.float32)},
                          (None, 6, 64, 64)), id="conv2d im2col columns"),  # (grouped: not direct)
    pytest.param(one_node("basis_conv2d", dict(CONV, rank=4096), {"basis": np.ones((4096, 3, 1, 1), np.float32),
                                                                  "combine": np.ones((1, 4096), np.float32)},
                          (None, 3, 16, 16)), id="basis_conv2d stage-1 responses"),
    pytest.param(one_node("tt_conv2d", TT, {"core0": np.ones((1, 256, 1, 16), np.float32),
                                            "core1": np.ones((16, 16, 1, 1), np.float32),
                                            "core2": np.ones((1, 16, 1, 1), np.float32)}, (None, 256, 2, 2)),
                 id="tt_conv2d tiled spatial filters"),
])
def test_kernel_scratch_buffers_are_limited(graph):
    """Small outputs whose kernels allocate far more than max_activation_elements."""
    with pytest.raises(engine.LimitError, match="scratch"):
        plan(graph, max_activation_elements=1 << 16)


SMALL_TT = {"stride": [1, 1], "dilation": [1, 1], "padding_mode": "zeros", "padding": [1] * 4, "in_modes": [2, 3],
            "out_modes": [2, 2], "ranks": [3, 2], "kernel_size": [3, 3], "strategy": "dense"}
SMALL_TT_W = {"core0": np.ones((1, 9, 1, 3), np.float32), "core1": np.ones((3, 2, 2, 2), np.float32),
              "core2": np.ones((2, 3, 2, 1), np.float32)}


@pytest.mark.parametrize("groups", [0, None, [2, 2]])
def test_tt_conv2d_stray_groups_attribute_is_harmless(groups):
    """tt_conv2d has no groups: a stray one is ignored (loads) or refused, never a leaked error."""
    try:
        plan(one_node("tt_conv2d", dict(SMALL_TT, groups=groups), SMALL_TT_W, (None, 6, 8, 8)))
    except engine.EngineError:
        pass

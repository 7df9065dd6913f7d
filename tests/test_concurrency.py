"""One loaded Model called from 4 threads at once gives exactly the serial results, its caches
(per-input-shape checks) filled for the first time concurrently; TT kernels race in test_tt.py.

engine/__init__.py selects Numba's "threadsafe" layer (TBB if installed, else OpenMP): the
default workqueue layer refuses concurrent parallel calls. Worker processes must be started with
subprocess or spawn, never fork once Numba threads exist (OpenMP does not survive fork).
"""
import itertools
import os
import subprocess
import sys
import threading
from pathlib import Path

import numba
import numpy as np
import pytest

import engine
from engine import format as fmt
from engine.ops.tt import _KERNELS
from tests.fuzz import seed_graphs, write_seeds

THREADS, CALLS = 4, 6


@pytest.fixture(scope="module")
def seed_files(tmp_path_factory):
    """name -> path of each seed graph's model file."""
    return write_seeds(tmp_path_factory.mktemp("seeds"))


def test_threading_layer_is_threadsafe():
    engine.Model(seed_graphs()["cnn"], fmt.References())(np.ones((1, 3, 10, 10), np.float32))  # starts the pool
    if "NUMBA_THREADING_LAYER" not in os.environ:
        assert numba.config.THREADING_LAYER == "threadsafe"
    assert numba.threading_layer() in ("omp", "tbb")


@pytest.mark.parametrize("env,want", [({}, "2000000"), ({"GOMP_SPINCOUNT": "5"}, "5"),
                                      ({"OMP_WAIT_POLICY": "passive"}, None)])
def test_openmp_spin_default_respects_the_user(env, want):
    """Importing the engine makes OpenMP's threads spin longer before they sleep (their wake-up
    made sporadic calls slow), unless the user set how OpenMP waits."""
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    code = "import os, engine; print(os.environ.get('GOMP_SPINCOUNT'))"
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True,
                         text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == str(want)


def _tt_kernels(model):
    return [id(n) in _KERNELS._kernels for n in model.graph.nodes if n.op.startswith("tt_")]


@pytest.mark.parametrize("name,strategy", [("cnn", None), ("branchy", None), ("compressed", "contract"),
                                           ("compressed", "dense")])
def test_fresh_model_many_threads(seed_files, name, strategy):
    if name not in seed_files:
        pytest.skip(f"{name}: ops not installed")
    reference = engine.load(seed_files[name], tt_strategy=strategy)   # serial results: another instance
    model = engine.load(seed_files[name], tt_strategy=strategy)       # caches still empty
    spec = model.graph.inputs[0].shape
    rng = np.random.default_rng(0)
    # every thread and call its own batch size and data; batches 3 to 5 are shapes new to the
    # model (loading checked the references' batches 1 and 2)
    xs = [[rng.standard_normal((3 + (t + c) % 3,) + tuple(spec[1:])).astype(np.float32) for c in range(CALLS)]
          for t in range(THREADS)]
    serial = [[reference(x) for x in row] for row in xs]
    acts = reference.activations(xs[0][0])
    assert not any(k[0][0] >= 3 for k in model.plan._checked), "shape checks already cached"
    # a TT node run dense has its kernel rebuilt at load, into the conv2d / linear the plan runs
    # in its place; the TT op's own cache (activations) is filled on first use
    tt_nodes = [n.name for n in model.graph.nodes if n.op.startswith("tt_")]
    planned = {st.node.name: st.node.op for st in model.plan.steps}
    assert bool(tt_nodes) == (name == "compressed") and not any(_tt_kernels(model))
    assert all((planned[n] in ("conv2d", "linear")) == (strategy == "dense") for n in tt_nodes)
    got = [[None] * CALLS for _ in range(THREADS)]
    got_acts, errors = [None] * THREADS, []
    start = threading.Barrier(THREADS)

    def work(t):
        try:
            start.wait()
            for c, x in enumerate(xs[t]):
                got[t][c] = model(x)
            got_acts[t] = model.activations(xs[0][0])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not errors, errors
    for t in range(THREADS):
        for c in range(CALLS):
            _assert_same(got[t][c], serial[t][c])
        _assert_same(got_acts[t], acts)
    assert {k[0][0] for k in model.plan._checked} >= {3, 4, 5}


def _assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, tuple):
        for u, v in zip(a, b, strict=True):
            _assert_same(u, v)
    else:
        np.testing.assert_array_equal(a, b)


def _memory_graph():
    """Outputs alive for long and short spans, a skip connection (a fused residual add), views
    of planned outputs read late, a graph output that is a view of a conv's output and one that
    later steps read too."""
    from engine.graph import Graph, Node, TensorSpec
    from tests.fuzz import _conv
    rng = np.random.default_rng(3)

    def w(*shape):
        return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)

    def conv(name, x, n, c):
        return Node(name, "conv2d", [x], _conv(), {"weight": w(n, c, 3, 3), "bias": w(n)})
    pool = {"kernel": [2, 2], "stride": [2, 2], "padding": [0, 0], "dilation": [1, 1],
            "ceil_mode": False}
    return Graph([TensorSpec("x", [None, 3, 8, 8])],
                 [("logits", "fc"), ("early", "early_flat"), ("mid", "c3")], "dict", [
        conv("c1", "x", 4, 3),                      # read by c2 and, much later, the add
        conv("c2", "c1", 4, 4),
        Node("early_flat", "flatten", ["c2"], {"start_dim": 1, "end_dim": 3}),  # an output
        conv("c3", "c2", 4, 4),                     # an output that c4 reads
        conv("c4", "c3", 4, 4),
        Node("skip", "add", ["c4", "c1"]),
        Node("r", "relu", ["skip"]),
        Node("p", "max_pool2d", ["r"], pool),
        Node("flat", "flatten", ["p"], {"start_dim": 1, "end_dim": 3}),   # a view, read late
        Node("fc0", "linear", ["flat"], {}, {"weight": w(16, 64), "bias": w(16)}),
        Node("fc1", "linear", ["fc0"], {}, {"weight": w(64, 16), "bias": w(64)}),
        Node("both", "add", ["fc1", "flat"]),
        Node("fc", "linear", ["both"], {}, {"weight": w(5, 64), "bias": w(5)}),
    ])


def test_planned_outputs_share_memory_only_when_dead():
    """Plan._layout: each step's output gets arena memory that no output alive at the same time
    (a view of it included) shares, and memory is reused, outputs sharing memory split in halves
    at one address; graph outputs and what they view are the caller's (never in the arena).
    Checked against the unfused reference, node by node."""
    model = engine.Model(_memory_graph(), fmt.References())
    x = np.random.default_rng(4).standard_normal((2, 3, 8, 8)).astype(np.float32)
    shapes, layout = model.plan._check({"x": x.shape}, keep_all=False)
    by_output = {st.output: at for st, at in zip(model.plan.steps, layout)}
    assert by_output["c2"] is None and by_output["c3"] is None and by_output["fc"] is None
    planned = [at for at in layout if at is not None]
    assert len(planned) >= 4
    end = max(off + int(np.prod(shape)) for off, shape in planned)
    assert end < sum(int(np.prod(shape)) for _, shape in planned)      # some memory reused
    _, layout = model.plan._check({"x": (64, 3, 8, 8)}, keep_all=False)
    shared = [((a, int(np.prod(sa))), (b, int(np.prod(sb))))        # outputs sharing memory
              for (a, sa), (b, sb) in itertools.combinations(filter(None, layout), 2)
              if a < b + np.prod(sb) and b < a + np.prod(sa)]
    assert any(na != nb for (_, na), (_, nb) in shared)
    for (a, na), (b, nb) in shared:                                 # halves at one address
        assert abs((a + na / 2) - (b + nb / 2)) < 1024                # (to the 4 KB page)
    want = model.activations(x, kernels="reference")
    for _ in range(2):                                                  # the arena's second use too
        got = model(x)
        for name, node in (("logits", "fc"), ("early", "early_flat"), ("mid", "c3")):
            np.testing.assert_allclose(got[name], want[node], rtol=1e-5,
                                       atol=1e-5 * np.abs(want[node]).max())


def test_scratch_is_carved_from_the_calls_arena():
    """Inside Plan.run a kernel's scratch comes from the call's arena: disjoint arrays on
    64-byte boundaries, the same memory for the same request on every call (no fresh pages),
    the i-th arrays of all requests split in halves at one address (each thread's rows stay
    where they were), another arena for a call running at the same time; outside, plain new
    arrays."""
    from engine import buffers
    shapes = ((3, 5), (7,), (0,), (2, 33))
    loose = buffers.scratch(*shapes)
    assert [a.shape for a in loose] == list(shapes)
    pool = buffers.ArenaPool()
    token, _ = buffers.using(pool)
    try:
        first = buffers.scratch(*shapes)
        assert [a.shape for a in first] == list(shapes)
        assert all(a.dtype == np.float32 and (a.size == 0 or a.ctypes.data % 64 == 0)
                   for a in first)
        assert not any(np.shares_memory(a, b) for a, b in itertools.combinations(first, 2))
        assert not any(np.shares_memory(a, b) for a in first for b in loose)
        inner, _ = buffers.using(pool)            # a concurrent call: its own arena
        try:
            assert not any(np.shares_memory(a, b) for a in buffers.scratch(*shapes) for b in first)
        finally:
            buffers.done(inner)
    finally:
        buffers.done(token)
    token, _ = buffers.using(pool)                # the next call: the same memory again
    try:
        again = buffers.scratch(*shapes)
        assert len(pool._arenas) == 1 and all(np.shares_memory(a, b) for a, b in
                                              zip(again[:2], first[:2]))
    finally:
        buffers.done(token)
    token, _ = buffers.using(pool)                # thread halves of any size at one address
    try:
        small, = buffers.scratch((2, 3000))
        large, = buffers.scratch((2, 10000))
        small, = buffers.scratch((2, 3000))
        assert np.shares_memory(small, large)
        assert abs(small[1].ctypes.data - large[1].ctypes.data) < 4096   # to the page
    finally:
        buffers.done(token)


def test_calls_reuse_buffers_and_keep_results(seed_files):
    """A call's outputs stay as they were after later calls, which reuse the arena."""
    model = engine.load(seed_files["cnn"])
    rng = np.random.default_rng(1)
    x1, x2 = (rng.standard_normal((2,) + tuple(model.graph.inputs[0].shape[1:])).astype(np.float32)
              for _ in range(2))
    y1 = model(x1)
    kept = {k: v.copy() for k, v in y1.items()} if isinstance(y1, dict) else y1.copy()
    assert model.plan._arenas._arenas[0].planned
    for _ in range(3):
        model(x2)
    _assert_same(y1, kept)
    _assert_same(model(x1), kept)

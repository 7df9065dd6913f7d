"""One loaded Model called from 4 threads at once gives exactly the serial results.

engine/__init__.py selects Numba's "threadsafe" layer (TBB if installed, else OpenMP): the
default workqueue layer refuses concurrent parallel calls. Worker processes must be started with
subprocess or spawn, never fork once Numba threads exist (OpenMP does not survive fork).
"""
import os
import threading

import numba
import numpy as np
import pytest

import engine
from engine import format as fmt
from tests.fuzz import seed_graphs

THREADS, CALLS = 4, 6


def test_threading_layer_is_threadsafe():
    engine.Model(seed_graphs()["cnn"], fmt.References())(np.ones((1, 3, 10, 10), np.float32))  # starts the pool
    if "NUMBA_THREADING_LAYER" not in os.environ:
        assert numba.config.THREADING_LAYER == "threadsafe"
    assert numba.threading_layer() in ("omp", "tbb")


@pytest.mark.parametrize("name", ["cnn", "branchy", "compressed"])
def test_one_model_many_threads(name):
    graphs = seed_graphs()
    if name not in graphs:
        pytest.skip(f"{name}: ops not installed")
    model = engine.Model(graphs[name], fmt.References())
    spec = model.graph.inputs[0].shape
    rng = np.random.default_rng(0)
    # every thread and call its own batch size and data: shape checks are cached concurrently too
    xs = [[rng.standard_normal((1 + (t + c) % 3,) + tuple(spec[1:])).astype(np.float32) for c in range(CALLS)]
          for t in range(THREADS)]
    serial = [[model(x) for x in row] for row in xs]
    acts = model.activations(xs[0][0])
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

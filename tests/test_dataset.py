"""Datasets: streamed runs equal Model(x), resume after Ctrl-C or kill -9 is bit-identical,
mismatched resumes are refused, and Dask workers give the single process's result."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import engine
from engine import format as fmt
from engine.cli import main
from engine.graph import Graph, Node, TensorSpec
from test_format import tiny_graph

ROOT = Path(__file__).resolve().parents[1]
N, BATCH = 50, 8        # 7 batches, the last one short

# a child that runs the CLI and SIGKILLs itself when the 4th batch starts: 3 batches are marked
KILLED_CHILD = """
import os, signal, sys
import engine
from engine.cli import main
calls, call = [0], engine.Model.__call__
def dying(self, x):
    calls[0] += 1
    if calls[0] == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    return call(self, x)
engine.Model.__call__ = dying
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def files(tmp_path):
    fmt.save(tmp_path / "m.h5", tiny_graph())
    x = np.random.default_rng(2).standard_normal((N, 3, 6, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["data/images"] = x
    return tmp_path, x


def contents(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f}, dict(f.attrs)


def assert_same_file(a, b):
    """Bit for bit: every dataset and attribute, and the file's bytes."""
    (da, aa), (db, ab) = contents(a), contents(b)
    assert da.keys() == db.keys() and all(np.array_equal(da[k], db[k]) for k in da)
    assert aa.keys() == ab.keys() and all(np.array_equal(aa[k], ab[k]) for k in aa)
    assert Path(a).read_bytes() == Path(b).read_bytes()


def interrupt_after(monkeypatch, calls):
    """Make Model(x) raise KeyboardInterrupt (Ctrl-C) on its `calls`-th call in this process."""
    seen, call = [0], engine.Model.__call__

    def interrupted(self, x):
        seen[0] += 1
        if seen[0] == calls:
            raise KeyboardInterrupt
        return call(self, x)
    monkeypatch.setattr(engine.Model, "__call__", interrupted)


@pytest.mark.parametrize("source", ["x.npy", "x.h5:/data/images", ("x.h5", "/data/images")])
def test_streamed_equals_whole_array(files, source):
    tmp, x = files
    src = (str(tmp / source[0]), source[1]) if isinstance(source, tuple) else str(tmp / source)
    assert engine.run_dataset(tmp / "m.h5", src, tmp / "y.h5", batch_size=BATCH, progress=False) == N
    (out, attrs) = contents(tmp / "y.h5")
    np.testing.assert_allclose(out["out"], engine.load(tmp / "m.h5")(x), rtol=1e-6, atol=1e-6)
    assert attrs["completed"] == N and attrs["batch_size"] == BATCH
    assert engine.run_dataset(tmp / "m.h5", src, tmp / "y.h5", batch_size=BATCH, progress=False) == 0


@pytest.mark.parametrize("how", ["ctrl-c", "kill -9"])
def test_interrupted_run_resumes_bit_identical(files, how, monkeypatch, capsys):
    tmp, _ = files
    args = ["run", str(tmp / "m.h5"), "--input", f"{tmp}/x.h5:/data/images", "--output",
            str(tmp / "y.h5"), "--batch-size", str(BATCH)]
    if how == "ctrl-c":
        with monkeypatch.context() as m:
            interrupt_after(m, 4)
            assert main(args) == 130
        assert "run the same command again" in capsys.readouterr().err
    else:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        r = subprocess.run([sys.executable, "-c", KILLED_CHILD, *args], env=env, capture_output=True,
                           timeout=120)
        assert r.returncode == -signal.SIGKILL, r.stderr.decode()
    out, attrs = contents(tmp / "y.h5")
    assert attrs["completed"] == 3 * BATCH

    assert main(args) == 0
    engine.run_dataset(tmp / "m.h5", f"{tmp}/x.h5:/data/images", tmp / "ref.h5", batch_size=BATCH,
                       progress=False)
    assert_same_file(tmp / "y.h5", tmp / "ref.h5")


def other_model(tmp):
    g = tiny_graph()
    g.nodes[-1].weights["bias"] = g.nodes[-1].weights["bias"] + 1
    fmt.save(tmp / "m2.h5", g)
    return dict(model_path=tmp / "m2.h5")


def other_content(tmp):
    np.save(tmp / "x.npy", np.zeros((N, 3, 6, 6), np.float32))
    return {}


@pytest.mark.parametrize("change, words", [
    (other_model, "another model"),
    (other_content, "another input content"),
    (lambda tmp: np.save(tmp / "x.npy", np.zeros((N + 1, 3, 6, 6), np.float32)) or {}, "another input shape"),
    (lambda tmp: dict(input=str(tmp / "x.h5:/data/images")), "another input file"),
    (lambda tmp: dict(batch_size=BATCH + 1), "another batch size"),
])
def test_mismatched_resume_is_refused(files, monkeypatch, change, words):
    tmp, _ = files
    run = dict(model_path=tmp / "m.h5", input=str(tmp / "x.npy"), output=tmp / "y.h5", batch_size=BATCH,
               progress=False)
    with monkeypatch.context() as m:
        interrupt_after(m, 2)
        with pytest.raises(KeyboardInterrupt):
            engine.run_dataset(**run)
    with pytest.raises(engine.InputError, match=words):
        engine.run_dataset(**{**run, **change(tmp)})
    assert contents(tmp / "y.h5")[1]["completed"] == BATCH


def test_bad_inputs_and_outputs(files):
    tmp, _ = files
    np.save(tmp / "int.npy", np.zeros((4, 3, 6, 6), np.int32))
    np.save(tmp / "rank3.npy", np.zeros((4, 3, 6), np.float32))
    for src, words in [(tmp / "int.npy", "floating dtype"), (tmp / "rank3.npy", "rank 4"),
                       (f"{tmp}/x.h5:/nothing", "no such dataset"), (tmp / "x.h5", "FILE.h5:/DATASET"),
                       (f"{tmp}/m.h5:/graph", "floating dtype")]:
        with pytest.raises(engine.InputError, match=words):
            engine.run_dataset(tmp / "m.h5", src, tmp / "y.h5", progress=False)
    before = (tmp / "x.h5").read_bytes()
    with pytest.raises(engine.FormatError, match="not a basisconv run output"):
        engine.run_dataset(tmp / "m.h5", tmp / "x.npy", tmp / "x.h5", progress=False)
    assert (tmp / "x.h5").read_bytes() == before
    assert main(["run", str(tmp / "m.h5"), "--input", f"{tmp}/x.h5:/data/images", "--output",
                 str(tmp / "y.npz")]) == 1


def test_results_do_not_depend_on_thread_counts(tmp_path):
    """OpenBLAS's sgemm changes in the last bits with its thread count: runs pin it to 1."""
    import numba
    from threadpoolctl import threadpool_limits
    rng = np.random.default_rng(3)
    fc = Node("fc", "linear", ["x"], {}, {"weight": rng.standard_normal((128, 2048), np.float32),
                                          "bias": np.zeros(128, np.float32)})
    fmt.save(tmp_path / "fc.h5", Graph([TensorSpec("x", [None, 2048])], [("out", "fc")], "tensor", [fc]))
    np.save(tmp_path / "x.npy", rng.standard_normal((128, 2048), np.float32))
    for threads in (2, 1):
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        with threadpool_limits(threads):
            engine.run_dataset(tmp_path / "fc.h5", tmp_path / "x.npy", tmp_path / f"y{threads}.h5",
                               batch_size=64, progress=False)
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    assert_same_file(tmp_path / "y2.h5", tmp_path / "y1.h5")


def test_dask_local_cluster_equals_single_process(files, monkeypatch):
    distributed = pytest.importorskip("distributed")
    import dask
    tmp, _ = files
    src = f"{tmp}/x.h5:/data/images"
    engine.run_dataset(tmp / "m.h5", src, tmp / "ref.h5", batch_size=BATCH, progress=False)
    with dask.config.set({"distributed.worker.multiprocessing-method": "spawn"}), \
            distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                     dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        # a run started in this process, interrupted, and finished by the workers
        with monkeypatch.context() as m:
            interrupt_after(m, 3)
            with pytest.raises(KeyboardInterrupt):
                engine.run_dataset(tmp / "m.h5", src, tmp / "y.h5", batch_size=BATCH, progress=False)
        assert engine.run_dataset(tmp / "m.h5", src, tmp / "y.h5", batch_size=BATCH, client=client,
                                  progress=False) == N - 2 * BATCH
        assert_same_file(tmp / "y.h5", tmp / "ref.h5")
        # the CLI on the same workers, from scratch
        assert main(["run", str(tmp / "m.h5"), "--input", src, "--output", str(tmp / "z.h5"),
                     "--batch-size", str(BATCH), "--scheduler", cluster.scheduler_address]) == 0
        assert_same_file(tmp / "z.h5", tmp / "ref.h5")
        cached = client.run(lambda: list(__import__("engine.dataset").dataset._MODELS))
        assert any(cached.values()) and all(len(keys) <= 1 for keys in cached.values())

"""Inference over whole datasets: streamed in fixed batches into a chunked HDF5 file, resumable
after any interruption, optionally spread over Dask workers.

The output file holds one dataset per model output (named like the output, rows in input order)
and root attributes saying what produced it. Every chunk is allocated when the file is created
(under a temporary name, then renamed), so filling it changes no HDF5 metadata except the root
attribute `completed`, rewritten in place and flushed only after each batch's rows are flushed:
a kill at any moment leaves a readable file whose first `completed` rows are final.

Batches always start at multiples of batch_size and BLAS runs on one thread (OpenBLAS's results
change in the last bits with its thread count; Numba's do not), so a resumed run, a Dask worker
or another machine computes every batch exactly as an uninterrupted run would, bit for bit. Many
small per-image GEMMs gain little from BLAS threads anyway; Numba's kernels still use every core.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass

import h5py
import numba
import numpy as np
from threadpoolctl import threadpool_limits

from . import format as fmt
from .errors import FormatError, InputError
from .model import Model, load

MARKER = "basisconv_outputs"    # root attribute of an output file: its layout version
CHUNK_BYTES = 4 << 20           # upper bound of one HDF5 chunk of an output dataset
# header attributes a resumed run must match, and how an error names them
IDENTITY = {"model_sha256": "model (graph + weights)", "input_path": "input file",
            "input_dataset": "input dataset", "input_shape": "input shape",
            "input_sample_sha256": "input content", "batch_size": "batch size"}


@dataclass(frozen=True)
class Source:
    """An input dataset: an .npy file (memory-mapped) or a dataset in an HDF5 file."""
    path: str                   # absolute, so that Dask workers find it too
    dataset: str | None = None  # None for .npy

    @classmethod
    def parse(cls, spec) -> "Source":
        """Accepts "file.h5:/dataset", "file.npy", a (file, dataset) tuple or a Source."""
        if isinstance(spec, Source):
            return spec
        if isinstance(spec, (tuple, list)):
            path, dataset = spec
        else:
            path, sep, dataset = os.fspath(spec).rpartition(":")
            if not sep or not path:
                path, dataset = os.fspath(spec), None
        if dataset is None and not str(path).endswith(".npy"):
            raise InputError(f"input {spec!r}: expected an .npy file or FILE.h5:/DATASET")
        return cls(os.path.abspath(path), dataset)

    def __str__(self) -> str:
        return self.path if self.dataset is None else f"{self.path}:{self.dataset}"

    @contextmanager
    def open(self):
        """The rows as an array-like (h5py.Dataset or read-only memmap), to slice batch by batch."""
        try:
            f = (np.load(self.path, mmap_mode="r", allow_pickle=False) if self.dataset is None
                 else h5py.File(self.path, "r"))
        except FileNotFoundError:
            raise
        except (OSError, ValueError) as e:
            raise InputError(f"input {self}: not readable ({e})") from None
        if self.dataset is None:
            yield f
            return
        with f:
            ds = f.get(self.dataset)
            if not isinstance(ds, h5py.Dataset):
                raise InputError(f"input {self}: no such dataset")
            yield ds

    def identity(self, rows) -> dict:
        """Path, dataset, shape and a hash of dtype + 8 spread rows: what a resume must match."""
        h = hashlib.sha256(str(rows.dtype).encode())
        for i in sorted(set(np.linspace(0, len(rows) - 1, 8).astype(int).tolist())):
            h.update(np.ascontiguousarray(rows[i]).tobytes())
        return {"input_path": self.path, "input_dataset": self.dataset or "",
                "input_shape": np.array(rows.shape, np.int64), "input_sample_sha256": h.hexdigest()}


def model_hash(model: Model) -> str:
    """sha256 of the graph JSON and every weight: the identity of what a model computes."""
    h = hashlib.sha256(json.dumps(fmt.graph_to_json(model.graph), sort_keys=True).encode())
    for n in model.graph.nodes:
        for k, w in n.weights.items():
            h.update(f"{n.name}/{k}{w.shape}".encode())
            h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()


def named_outputs(model: Model, y) -> dict[str, np.ndarray]:
    """Model(x)'s result (array, tuple or dict) as {output name: array}."""
    if isinstance(y, dict):
        return y
    return dict(zip((o for o, _ in model.graph.outputs), y if isinstance(y, tuple) else (y,)))


def run_dataset(model_path, input, output, *, batch_size: int = 64, client=None,
                progress: bool = True) -> int:
    """Run a single-input model over every row of `input` into the HDF5 file `output`.

    input: "file.h5:/dataset", "file.npy" (memory-mapped) or a (file, dataset) tuple. An existing
    `output` from the same model, input and batch size is continued; one from another run is
    refused (InputError). client: a dask.distributed Client whose workers compute chunks of
    rows; they need the model file and the input readable at the same absolute paths. Returns
    the number of rows computed by this call.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    batch_size = int(batch_size)
    source = Source.parse(input)
    model_path = os.path.abspath(model_path)
    model = load(model_path)
    digest = model_hash(model)
    with source.open() as rows:
        row_shapes = _check_fit(model, source, rows)
        header = {"model_sha256": digest, **source.identity(rows), "batch_size": batch_size}
        n = len(rows)
        with _open_output(os.fspath(output), header, row_shapes, n, model_path) as f:
            done = int(f.attrs["completed"])
            with _Progress(n, done, progress) as bar, threadpool_limits(1, user_api="blas"):
                if client is None:
                    for a in range(done, n, batch_size):
                        b = min(a + batch_size, n)
                        _write(f, a, _outputs(model, rows, a, b))
                        bar.update(b - a)
                else:
                    _run_dask(client, model_path, digest, source, f, done, n, batch_size, bar)
    return n - done


def _check_fit(model: Model, source: Source, rows) -> dict[str, tuple]:
    """Refuse inputs the model cannot take before any output is written; output row shapes."""
    specs = model.graph.inputs
    if len(specs) != 1:
        raise InputError(f"datasets run single-input models; this one takes {len(specs)} inputs")
    if rows.dtype.kind != "f":
        raise InputError(f"input {source}: expected a floating dtype, got {rows.dtype}")
    if rows.ndim != len(specs[0].shape) or len(rows) == 0:
        raise InputError(f"input {source}: expected rank {len(specs[0].shape)} with at least one row, "
                         f"got shape {rows.shape}")
    shapes = model.plan.check_inputs({specs[0].name: np.empty((1,) + rows.shape[1:], np.float32)})
    out = {o: shapes[node] for o, node in model.graph.outputs}
    for o, s in out.items():
        if not s or s[0] != 1:
            raise InputError(f"output '{o}' has shape {s} for one input row: no batch axis to stream")
    return {o: s[1:] for o, s in out.items()}


def _outputs(model: Model, rows, a: int, b: int) -> dict[str, np.ndarray]:
    return named_outputs(model, model(np.asarray(rows[a:b])))


# --- the output file ---------------------------------------------------------------------------

def _open_output(path: str, header: dict, row_shapes: dict, n: int, model_path: str) -> h5py.File:
    """Open `path` to continue the run `header` describes, creating it when missing."""
    if not os.path.exists(path):
        tmp = path + ".tmp"
        with h5py.File(tmp, "w") as f:
            f.attrs[MARKER] = 1
            f.attrs.update(header)
            f.attrs["model_path"] = model_path          # informative; the hash identifies the model
            f.attrs["completed"] = np.int64(0)
            for name, shape in row_shapes.items():
                _create_dataset(f, name, (n,) + shape, header["batch_size"])
        os.replace(tmp, path)
    try:
        f = h5py.File(path, "r+")
    except FileNotFoundError:
        raise
    except OSError as e:
        raise FormatError(f"output {path}: cannot open it for writing ({e})") from None
    try:
        _check_output(f, path, header, row_shapes, n)
    except BaseException:
        f.close()
        raise
    return f


def _create_dataset(f: h5py.File, name: str, shape: tuple, batch_size: int) -> None:
    row_bytes = 4 * int(np.prod(shape[1:], dtype=np.int64))
    chunk_rows = max(1, min(batch_size, shape[0], CHUNK_BYTES // max(row_bytes, 1)))
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)     # every chunk placed now: filling adds no metadata
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)       # and writes no zeros first
    f.create_dataset(name, shape, np.float32, chunks=(chunk_rows,) + shape[1:], dcpl=dcpl)


def _check_output(f: h5py.File, path: str, header: dict, row_shapes: dict, n: int) -> None:
    if MARKER not in f.attrs:
        raise FormatError(f"output {path} exists and is not a basisconv run output: refusing to overwrite it")
    for key, want in header.items():
        got = f.attrs.get(key)
        if got is None or not np.array_equal(got, want):
            got, want = (v.tolist() if isinstance(v, (np.ndarray, np.generic)) else v for v in (got, want))
            raise InputError(f"output {path} was started with another {IDENTITY[key]} ({key} {got!r}, "
                             f"this run: {want!r}); rerun with the original settings to resume it, "
                             "or delete it to start over")
    for name, shape in row_shapes.items():
        ds = f.get(name)
        if not isinstance(ds, h5py.Dataset) or ds.shape != (n,) + shape:
            raise FormatError(f"output {path}: dataset '{name}' missing or not of shape {(n,) + shape}")
    done = f.attrs.get("completed")
    if not isinstance(done, (int, np.integer)) or not (0 <= done <= n) or (done % header["batch_size"]
                                                                           and done != n):
        raise FormatError(f"output {path}: attribute 'completed' is {done!r}, not a batch boundary of {n} rows")


def _write(f: h5py.File, a: int, outputs: dict[str, np.ndarray]) -> None:
    """Write rows a.. of every output, flush, then mark them completed and flush again."""
    k = len(next(iter(outputs.values())))
    for name, y in outputs.items():
        f[name][a:a + k] = y
    f.flush()
    f.attrs.modify("completed", np.int64(a + k))        # same type and size: rewritten in place
    f.flush()


# --- Dask --------------------------------------------------------------------------------------

_MODELS: dict[tuple[str, str], Model] = {}      # per worker process: the last model it ran
_MODELS_LOCK = threading.Lock()


def _worker_model(path: str, digest: str) -> Model:
    """The model, loaded once per worker process and checked against the client's hash."""
    with _MODELS_LOCK:
        model = _MODELS.get((path, digest))
        if model is None:
            model = load(path)
            threadpool_limits(1, user_api="blas")       # for this whole process: see the docstring
            if model_hash(model) != digest:
                raise InputError(f"model {path} on this worker differs from the client's (sha256): "
                                 "workers need the same model file at the same path")
            _MODELS.clear()
            _MODELS[(path, digest)] = model
    return model


def _run_chunk(model_path: str, digest: str, source: Source, start: int, stop: int,
               batch_size: int) -> dict[str, np.ndarray]:
    """Dask task: rows [start, stop) in batches of batch_size from `start` (a batch boundary)."""
    # follow the worker's thread budget: Dask's nanny sets OMP_NUM_THREADS (1 by default)
    numba.set_num_threads(min(numba.config.NUMBA_NUM_THREADS,
                              int(os.environ.get("OMP_NUM_THREADS", numba.config.NUMBA_NUM_THREADS))))
    model = _worker_model(model_path, digest)
    with source.open() as rows:
        parts = [_outputs(model, rows, a, min(a + batch_size, stop)) for a in range(start, stop, batch_size)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _run_dask(client, model_path, digest, source, f, done, n, batch_size, bar) -> None:
    """Workers compute chunks of rows; the client writes them in order as they arrive, with at
    most a few chunks in flight or waiting so that memory stays bounded."""
    from distributed import as_completed
    slots = max(1, sum(client.nthreads().values()))
    batches = -(-(n - done) // batch_size)
    per_task = batch_size * max(1, min(8, batches // (4 * slots)))
    window = 2 * slots
    todo = deque(range(done, n, per_task))
    running: dict[str, tuple] = {}      # future key -> (future, first row)
    ready: dict[int, dict] = {}         # first row -> outputs not yet written
    pending = as_completed()

    def submit():
        while todo and len(running) + len(ready) < window:
            a = todo.popleft()
            fut = client.submit(_run_chunk, model_path, digest, source, a, min(a + per_task, n),
                                batch_size, pure=False)
            running[fut.key] = (fut, a)
            pending.add(fut)

    try:
        submit()
        nxt = done
        for fut in pending:
            _, a = running.pop(fut.key)
            ready[a] = fut.result()
            while nxt in ready:
                outs = ready.pop(nxt)
                _write(f, nxt, outs)
                k = len(next(iter(outs.values())))
                bar.update(k)
                nxt += k
            submit()
    finally:
        client.cancel([fut for fut, _ in running.values()])


# --- progress ----------------------------------------------------------------------------------

class _Progress:
    """tqdm when installed (not an engine dependency), else a plain stderr line twice a second."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.total, self.done, self.start_done = total, done, done
        self.t0 = self.last = time.perf_counter()
        self.enabled, self.bar = enabled, None
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, initial=done, unit="img", file=sys.stderr)
            except ImportError:
                pass

    def update(self, k: int) -> None:
        self.done += k
        if self.bar is not None:
            self.bar.update(k)
        elif self.enabled and (time.perf_counter() - self.last > 0.5 or self.done == self.total):
            self.last = time.perf_counter()
            rate = (self.done - self.start_done) / max(self.last - self.t0, 1e-9)
            print(f"\r{self.done}/{self.total} images, {rate:.1f} images/s", end="", file=sys.stderr)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.done > self.start_done:
            print(file=sys.stderr)

"""The only module that reads or writes model files (schema: docs/FORMAT.md).

Reading validates the file's structure and resource claims before any array is read: hard links
only, no data outside the file, little-endian float32 arrays within the limits, gzip inflated here
with a bound per chunk. The graph's semantics (ops, attributes, weight shapes) are checked by the
plan, which knows the ops.
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field, fields

import h5py
import numpy as np

from .errors import FormatError, LimitError
from .graph import NAME_RE, Graph, Node, TensorSpec
from .ops import numel

FORMAT_NAME = "basisconv"
FORMAT_VERSION = 1
OUTPUT_KINDS = ("tensor", "tuple", "dict")


@dataclass(frozen=True)
class Limits:
    """Resource limits a file and a call must respect, each checked before the memory or time it
    stands for is spent; raise them for big models: load(path, limits=Limits(max_ops=1 << 42))."""
    max_nodes: int = 10_000                  # graph nodes; also graph inputs and outputs
    max_graph_json_bytes: int = 64 << 20
    max_weight_elements: int = 1 << 30       # per stored array (weight or reference)
    max_total_weight_bytes: int = 4 << 30
    max_reference_bytes: int = 1 << 30       # all reference arrays of the file together
    max_references: int = 64                 # reference runs
    max_chunks: int = 1 << 20                # HDF5 chunks of all the arrays read
    max_dims: int = 8                        # rank of any array or tensor (at most 32)
    max_dim_size: int = 1 << 24              # any single dimension, of any weight or shape
    max_activation_elements: int = 1 << 28   # one node's output, or one kernel's scratch buffer
    max_live_elements: int = 1 << 30         # all tensors one call holds at once
    max_ops: int = 1 << 40                   # MACs + other ops of one batch-1 run at the file's shapes

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if type(v) is not int or v < 0:
                raise ValueError(f"Limits.{f.name} must be a non-negative int, got {v!r}")
        if self.max_dims > 32:
            raise ValueError(f"Limits.max_dims must be at most 32 (NumPy's rank limit), got {self.max_dims}")


@dataclass
class Reference:
    """One stored reference run: the inputs and every stored node's output."""
    inputs: dict[str, np.ndarray]       # input name -> (B, ...) float32
    nodes: dict[str, np.ndarray]        # node name -> that node's output


@dataclass
class References:
    runs: list[Reference] = field(default_factory=list)
    stored: str = "all"                 # "all" | "outputs"
    source: str = "pytorch"             # "pytorch" | "engine-reference"
    source_version: str = ""


# --- writing ---------------------------------------------------------------------------------

def save(path, graph: Graph, refs: References | None = None) -> None:
    """Write `graph` (weights included) and its references to `path` (overwritten)."""
    try:
        text = json.dumps(graph_to_json(graph), allow_nan=False)
    except ValueError as e:
        raise FormatError(f"graph attributes must be finite numbers: {e}") from None
    with h5py.File(path, "w") as f:
        f.attrs["format"] = _text(FORMAT_NAME)
        f.attrs["format_version"] = FORMAT_VERSION
        for key in ("producer", "torch_version", "model_class"):
            f.attrs[key] = _text(str(graph.meta.get(key, "")))
        f.create_dataset("graph", data=_text(text))
        wg = f.create_group("weights")
        for n in graph.nodes:
            if n.weights:
                g = wg.create_group(n.name)
                for k, w in n.weights.items():
                    g.create_dataset(k, data=np.ascontiguousarray(w, dtype=np.float32))
        if refs is not None:
            rg = f.create_group("references")
            rg.attrs.update(count=len(refs.runs), stored=_text(refs.stored), source=_text(refs.source),
                            source_version=_text(refs.source_version))
            for i, run in enumerate(refs.runs):
                g = rg.create_group(str(i))
                for k, v in run.inputs.items():
                    g.create_dataset(f"inputs/{k}", data=np.asarray(v, np.float32))
                for k, v in run.nodes.items():
                    g.create_dataset(f"nodes/{k}", data=np.asarray(v, np.float32),
                                     compression="gzip", compression_opts=4)


def _text(s: str) -> np.ndarray:
    """`s` as a fixed-length UTF-8 string: files hold no variable-length data, so reading one
    never parses HDF5's global heap (where corrupt files hang libhdf5)."""
    b = s.encode("utf-8")
    return np.array(b, dtype=h5py.string_dtype("utf-8", max(len(b), 1)))


def graph_to_json(graph: Graph) -> dict:
    return {
        "inputs": [{"name": t.name, "shape": list(t.shape)} for t in graph.inputs],
        "outputs": [{"name": o, "node": n} for o, n in graph.outputs],
        "output_kind": graph.output_kind,
        "nodes": [{"name": n.name, "op": n.op, "inputs": list(n.inputs), "attrs": n.attrs,
                   "module": n.module, "weights": list(n.weights), "shape": n.shape}
                  for n in graph.nodes],
    }


# --- reading ---------------------------------------------------------------------------------

def load(path, limits: Limits | None = None) -> tuple[Graph, References]:
    """Read and structurally validate a model file. Raises FormatError / LimitError."""
    limits = limits or Limits()
    try:
        f = h5py.File(path, "r")
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise FormatError(f"{path}: not a readable HDF5 model file ({e})") from None
    try:
        with f:
            return _Reader(f, limits).read()
    except (KeyError, OSError, ValueError, TypeError, RuntimeError, zlib.error) as e:
        # h5py raises these for corrupt datasets, truncated chunks, failed filters
        raise FormatError(f"{path}: corrupt model file ({type(e).__name__}: {e})") from None


def _str_attr(f, key: str) -> str:
    if key not in f.attrs:
        return ""
    _expect(not f.attrs.get_id(key).dtype.hasobject,
            f"attribute '{key}': variable-length data is refused (strings are fixed-length)")
    v = f.attrs[key]
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def _int_attr(obj, key: str) -> int | None:
    """Scalar integer attribute `key` of `obj`; None when absent or of another type."""
    if key not in obj.attrs:
        return None
    a = obj.attrs.get_id(key)
    return int(obj.attrs[key]) if a.dtype.kind in "iu" and a.shape == () else None


def _expect(cond: bool, msg: str) -> None:
    if not cond:
        raise FormatError(msg)


def _shape(v, where: str, limits: Limits, batch_free: bool) -> list:
    _expect(isinstance(v, list) and 1 <= len(v) <= limits.max_dims,
            f"{where}: shape must be a list of 1..{limits.max_dims} sizes, got {v!r}")
    for i, s in enumerate(v):
        if i == 0 and batch_free and s is None:
            continue
        _expect(isinstance(s, int) and not isinstance(s, bool) and s >= 1,
                f"{where}: shape entry {i} must be a positive int{' or null' if i == 0 else ''}, got {s!r}")
        if s > limits.max_dim_size:
            raise LimitError(f"{where}: size {s} over max_dim_size {limits.max_dim_size}")
    return v


def graph_from_json(doc, limits: Limits | None = None) -> Graph:
    """Build a Graph (without weights) from its JSON, checking names and references."""
    limits = limits or Limits()
    _expect(isinstance(doc, dict), "graph JSON must be an object")
    for key in ("inputs", "outputs", "nodes"):
        _expect(isinstance(doc.get(key), list), f"graph JSON: '{key}' must be a list")
        if len(doc[key]) > limits.max_nodes:
            raise LimitError(f"graph has {len(doc[key])} {key}, over max_nodes {limits.max_nodes}")
    kind = doc.get("output_kind")
    _expect(kind in OUTPUT_KINDS, f"graph JSON: output_kind must be one of {OUTPUT_KINDS}, got {kind!r}")

    known: set[str] = set()

    def new_name(n, where):
        _expect(isinstance(n, str) and NAME_RE.match(n) is not None,
                f"{where}: name {n!r} must match {NAME_RE.pattern}")
        _expect(n not in known, f"{where}: name '{n}' used twice")
        known.add(n)
        return n

    inputs = []
    _expect(len(doc["inputs"]) >= 1, "graph JSON: at least one input required")
    for i, t in enumerate(doc["inputs"]):
        _expect(isinstance(t, dict), f"input {i}: must be an object")
        name = new_name(t.get("name"), f"input {i}")
        inputs.append(TensorSpec(name, _shape(t.get("shape"), f"input '{name}'", limits, True)))

    nodes = []
    for i, d in enumerate(doc["nodes"]):
        _expect(isinstance(d, dict), f"node {i}: must be an object")
        name = new_name(d.get("name"), f"node {i}")
        where = f"node '{name}'"
        op = d.get("op")
        _expect(isinstance(op, str), f"{where}: 'op' must be a string, got {op!r}")
        ins = d.get("inputs")
        _expect(isinstance(ins, list) and all(isinstance(x, str) for x in ins),
                f"{where}: 'inputs' must be a list of names, got {ins!r}")
        for x in ins:
            _expect(x in known and x != name,
                    f"{where}: input '{x}' is not a graph input or an earlier node")
        attrs = d.get("attrs", {})
        _expect(isinstance(attrs, dict), f"{where}: 'attrs' must be an object")
        wnames = d.get("weights", [])
        _expect(isinstance(wnames, list) and all(isinstance(w, str) and NAME_RE.match(w) for w in wnames)
                and len(set(wnames)) == len(wnames), f"{where}: 'weights' must be a list of distinct names")
        module = d.get("module", "")
        _expect(isinstance(module, str), f"{where}: 'module' must be a string")
        shape = d.get("shape")
        if shape is not None:
            shape = _shape(shape, where, limits, True)
        nodes.append(Node(name, op, list(ins), attrs, dict.fromkeys(wnames), module, shape))

    node_names = {n.name for n in nodes}
    outputs = []
    _expect(len(doc["outputs"]) >= 1, "graph JSON: at least one output required")
    for i, o in enumerate(doc["outputs"]):
        _expect(isinstance(o, dict) and isinstance(o.get("name"), str) and NAME_RE.match(o["name"]) is not None
                and isinstance(o.get("node"), str) and o["node"] in node_names,
                f"output {i}: must have a name matching {NAME_RE.pattern} and an existing node, got {o!r}")
        outputs.append((o["name"], o["node"]))
    _expect(kind != "tensor" or len(outputs) == 1, "output_kind 'tensor' needs exactly one output")
    _expect(len({o for o, _ in outputs}) == len(outputs), "output names must be distinct")
    return Graph(inputs, outputs, kind, nodes)


class _Reader:
    """One file read: every array's claims (links, storage, type, shape, chunks, totals) are
    checked against the limits before the first array is read."""

    def __init__(self, f: h5py.File, limits: Limits):
        self.f, self.limits = f, limits
        self.chunks = 0                          # HDF5 chunks of the arrays checked so far

    def read(self) -> tuple[Graph, References]:
        f = self.f
        name = _str_attr(f, "format")
        if name != FORMAT_NAME:
            raise FormatError(f"file attribute 'format': expected '{FORMAT_NAME}', got {name!r}")
        version = _int_attr(f, "format_version")
        if version != FORMAT_VERSION:
            raise FormatError(f"file attribute 'format_version': expected {FORMAT_VERSION}, got {version!r}"
                              " (this engine reads version 1 only)")
        graph = graph_from_json(self.graph_json(), self.limits)
        graph.meta = {k: _str_attr(f, k) for k in ("producer", "torch_version", "model_class")}
        weights = self.weight_datasets(graph)
        refs, runs = self.reference_datasets(graph)
        for n, w, ds in weights:
            arr = self.array(ds)
            if not np.isfinite(arr).all():
                raise FormatError(f"node '{n.name}' weight '{w}': contains NaN or Inf")
            n.weights[w] = arr
        refs.runs = [Reference({k: self.array(ds) for k, ds in ins.items()},
                               {k: self.array(ds) for k, ds in nodes.items()}) for ins, nodes in runs]
        return graph, refs

    def get(self, path: str):
        """The object at `path` reached through hard links only; None when absent."""
        obj = self.f
        for part in path.split("/"):
            link = obj.get(part, getlink=True) if isinstance(obj, h5py.Group) else None
            if link is None:
                return None
            _expect(isinstance(link, h5py.HardLink),
                    f"'/{path}': {type(link).__name__}s are refused (they reach outside the file)")
            obj = obj[part]
        return obj

    def graph_json(self) -> dict:
        ds = self.get("graph")
        _expect(isinstance(ds, h5py.Dataset) and ds.shape == () and ds.dtype.kind == "S",
                "dataset '/graph' missing or not a scalar fixed-length string")
        self.storage(ds, "'/graph'")
        if ds.dtype.itemsize > self.limits.max_graph_json_bytes:
            raise LimitError(f"'/graph' is {ds.dtype.itemsize} bytes, over max_graph_json_bytes "
                             f"{self.limits.max_graph_json_bytes}")
        try:
            return json.loads(ds[()].decode("utf-8"))
        except RecursionError:
            raise FormatError("'/graph' JSON is nested too deeply") from None
        except (UnicodeDecodeError, ValueError) as e:
            raise FormatError(f"'/graph' is not valid JSON: {e}") from None

    def _add_bytes(self, total: int, ds, where: str, min_rank: int, limit: str, what: str) -> int:
        """total + the bytes of float32 dataset ds (checked); LimitError past limits.<limit>."""
        total += 4 * self.check(ds, where, min_rank=min_rank)
        if total > getattr(self.limits, limit):
            raise LimitError(f"{where}: total {what} over {limit} {getattr(self.limits, limit)}")
        return total

    def weight_datasets(self, graph: Graph) -> list:
        """[(node, weight name, dataset)], every claim checked; nothing read yet."""
        out, total = [], 0
        for n in graph.nodes:
            for w in n.weights:
                where = f"node '{n.name}' weight '{w}'"
                ds = self.get(f"weights/{n.name}/{w}")
                _expect(isinstance(ds, h5py.Dataset), f"{where}: dataset /weights/{n.name}/{w} missing")
                total = self._add_bytes(total, ds, where, 1, "max_total_weight_bytes", "weights")
                out.append((n, w, ds))
        return out

    def reference_datasets(self, graph: Graph) -> tuple[References, list]:
        """References (without runs) and per run ({input: dataset}, {node: dataset}), checked."""
        rg = self.get("references")
        if rg is None:
            return References(runs=[], stored="all", source="", source_version=""), []
        _expect(isinstance(rg, h5py.Group), "'/references' must be a group")
        count = _int_attr(rg, "count")
        _expect(count is not None and count >= 0,
                "'/references' attribute 'count' missing or not an int >= 0")
        if count > self.limits.max_references:
            raise LimitError(f"'/references' count {count} over max_references {self.limits.max_references}")
        refs = References(stored=_str_attr(rg, "stored"), source=_str_attr(rg, "source"),
                          source_version=_str_attr(rg, "source_version"))
        _expect(refs.stored in ("all", "outputs"),
                f"'/references' stored must be all|outputs, got {refs.stored!r}")
        wanted = ([n.name for n in graph.nodes] if refs.stored == "all"
                  else list(dict.fromkeys(n for _, n in graph.outputs)))
        runs, total = [], 0
        for i in range(int(count)):
            _expect(isinstance(self.get(f"references/{i}"), h5py.Group), f"reference run {i} missing")
            run = ({}, {})
            for part, names in (("inputs", [t.name for t in graph.inputs]), ("nodes", wanted)):
                for name in names:
                    where = f"reference run {i} {part[:-1]} '{name}'"
                    ds = self.get(f"references/{i}/{part}/{name}")
                    _expect(isinstance(ds, h5py.Dataset), f"{where}: missing")
                    total = self._add_bytes(total, ds, where, 0, "max_reference_bytes",
                                            "references")
                    run[part == "nodes"][name] = ds
            runs.append(run)
        return refs, runs

    def storage(self, ds: h5py.Dataset, where: str) -> list[int]:
        """Refuse data kept outside the file (external raw storage, virtual datasets); the
        dataset's filter ids."""
        plist = ds.id.get_create_plist()
        _expect(not ds.is_virtual and plist.get_external_count() == 0,
                f"{where}: data stored outside the file (external or virtual dataset) is refused")
        return [plist.get_filter(k)[0] for k in range(plist.get_nfilters())]

    def check(self, ds: h5py.Dataset, where: str, min_rank: int) -> int:
        """Check a float32 array's storage, type, shape and chunks; its element count."""
        limits = self.limits
        filters = self.storage(ds, where)
        _expect(ds.id.get_type().equal(h5py.h5t.IEEE_F32LE),
                f"{where}: type must be little-endian IEEE float32, got {ds.dtype}")
        _expect(min_rank <= ds.ndim <= limits.max_dims,
                f"{where}: rank must be {min_rank}..{limits.max_dims}, got {ds.ndim}")
        if max(ds.shape, default=1) > limits.max_dim_size or ds.size > limits.max_weight_elements:
            raise LimitError(f"{where}: shape {ds.shape} over limits (max_dim_size {limits.max_dim_size}, "
                             f"max_weight_elements {limits.max_weight_elements})")
        _expect(ds.size > 0, f"{where}: empty array {ds.shape}")
        if ds.chunks is not None:
            _expect(filters in ([], [h5py.h5z.FILTER_DEFLATE]),
                    f"{where}: HDF5 filters {filters} unsupported (gzip alone or none)")
            _expect(all(1 <= c <= s for c, s in zip(ds.chunks, ds.shape)),
                    f"{where}: chunk shape {ds.chunks} exceeds the array's {ds.shape}")
            self.chunks += numel(-(-s // c) for s, c in zip(ds.shape, ds.chunks))
            if self.chunks > limits.max_chunks:
                raise LimitError(f"{where}: the file's arrays span more than max_chunks "
                                 f"{limits.max_chunks} chunks")
        return ds.size

    def array(self, ds: h5py.Dataset) -> np.ndarray:
        """A checked dataset's values as C-contiguous float32."""
        if ds.chunks is None or ds.id.get_create_plist().get_nfilters() == 0:
            return np.ascontiguousarray(ds[()], np.float32)
        return _inflate(ds)


def _inflate(ds: h5py.Dataset) -> np.ndarray:
    """A gzip-chunked float32 dataset, each chunk inflated here to at most its declared size:
    HDF5's own filter grows its buffer for as long as a chunk's stream goes on (a gzip bomb)."""
    chunk, shape = ds.chunks, ds.shape
    nbytes = 4 * numel(chunk)
    out = np.full(shape, ds.fillvalue, np.float32)           # chunks never written hold the fill value
    offsets = []
    ds.id.chunk_iter(lambda info: offsets.append(info.chunk_offset))
    for offset in offsets:
        _expect(all(o % c == 0 and o < s for o, c, s in zip(offset, chunk, shape)),
                f"'{ds.name}': chunk offset {offset} outside the array {shape}")
        mask, raw = ds.id.read_direct_chunk(offset)
        if not mask & 1:                                     # bit 0 set: stored without gzip
            z = zlib.decompressobj()
            raw = z.decompress(raw, nbytes)
            _expect(z.eof, f"'{ds.name}': a gzip chunk does not end within its {nbytes} bytes")
        _expect(len(raw) == nbytes, f"'{ds.name}': a chunk holds {len(raw)} bytes, expected {nbytes}")
        block = np.frombuffer(raw, "<f4").reshape(chunk)
        dst = tuple(slice(o, min(o + c, s)) for o, c, s in zip(offset, chunk, shape))
        out[dst] = block[tuple(slice(0, d.stop - d.start) for d in dst)]
    return out

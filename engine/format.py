"""The only module that reads or writes model files (schema: docs/FORMAT.md).

Reading validates the file's structure and resource claims before any array is read; the graph's
semantics (ops, attributes, weight shapes) are checked by the plan, which knows the ops.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import h5py
import numpy as np

from .errors import FormatError, LimitError
from .graph import NAME_RE, Graph, Node, TensorSpec

FORMAT_NAME = "basisconv"
FORMAT_VERSION = 1
OUTPUT_KINDS = ("tensor", "tuple", "dict")


@dataclass(frozen=True)
class Limits:
    """Resource limits a file must respect; raise them for big models: load(path, limits=Limits(...))."""
    max_nodes: int = 10_000
    max_graph_json_bytes: int = 64 << 20
    max_weight_elements: int = 1 << 30      # per weight array
    max_total_weight_bytes: int = 4 << 30
    max_dims: int = 8
    max_dim_size: int = 1 << 24             # any single dimension, of any weight or shape
    max_activation_elements: int = 1 << 28  # per node output, at load-time shapes
    max_references: int = 64


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
    with h5py.File(path, "w") as f:
        f.attrs["format"] = FORMAT_NAME
        f.attrs["format_version"] = FORMAT_VERSION
        for key in ("producer", "torch_version", "model_class"):
            f.attrs[key] = str(graph.meta.get(key, ""))
        f.create_dataset("graph", data=json.dumps(graph_to_json(graph)))
        wg = f.create_group("weights")
        for n in graph.nodes:
            if n.weights:
                g = wg.create_group(n.name)
                for k, w in n.weights.items():
                    g.create_dataset(k, data=np.ascontiguousarray(w, dtype=np.float32))
        if refs is not None:
            rg = f.create_group("references")
            rg.attrs.update(count=len(refs.runs), stored=refs.stored, source=refs.source,
                            source_version=refs.source_version)
            for i, run in enumerate(refs.runs):
                g = rg.create_group(str(i))
                for k, v in run.inputs.items():
                    g.create_dataset(f"inputs/{k}", data=np.asarray(v, np.float32))
                for k, v in run.nodes.items():
                    g.create_dataset(f"nodes/{k}", data=np.asarray(v, np.float32),
                                     compression="gzip", compression_opts=4)


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
            return _read(f, limits)
    except (KeyError, OSError, ValueError, TypeError, RuntimeError) as e:
        # h5py raises these for corrupt datasets, truncated chunks, failed filters
        raise FormatError(f"{path}: corrupt model file ({type(e).__name__}: {e})") from None


def _read(f: h5py.File, limits: Limits) -> tuple[Graph, References]:
    name = _str_attr(f, "format")
    if name != FORMAT_NAME:
        raise FormatError(f"file attribute 'format': expected '{FORMAT_NAME}', got {name!r}")
    version = f.attrs.get("format_version")
    if not isinstance(version, (int, np.integer)) or int(version) != FORMAT_VERSION:
        raise FormatError(f"file attribute 'format_version': expected {FORMAT_VERSION}, got {version!r}"
                          " (this engine reads version 1 only)")
    ds = f.get("graph")
    if not isinstance(ds, h5py.Dataset) or ds.shape != () or ds.dtype.kind not in "OS":
        raise FormatError("dataset '/graph' missing or not a scalar string")
    if ds.id.get_storage_size() > limits.max_graph_json_bytes:
        raise LimitError(f"'/graph' is {ds.id.get_storage_size()} bytes, over max_graph_json_bytes "
                         f"{limits.max_graph_json_bytes}")
    raw = ds[()]
    try:
        doc = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"'/graph' is not valid JSON: {e}") from None
    graph = graph_from_json(doc, limits)
    graph.meta = {k: _str_attr(f, k) for k in ("producer", "torch_version", "model_class")}
    _read_weights(f, graph, limits)
    return graph, _read_references(f, graph, limits)


def _str_attr(f, key: str) -> str:
    v = f.attrs.get(key, "")
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def _expect(cond: bool, msg: str) -> None:
    if not cond:
        raise FormatError(msg)


def _shape(v, where: str, limits: Limits, batch_free: bool) -> list:
    _expect(isinstance(v, list) and 1 <= len(v) <= limits.max_dims,
            f"{where}: shape must be a list of 1..{limits.max_dims} sizes, got {v!r}")
    for i, s in enumerate(v):
        if i == 0 and batch_free and s is None:
            continue
        _expect(isinstance(s, int) and not isinstance(s, bool) and s >= 0,
                f"{where}: shape entry {i} must be a non-negative int{' or null' if i == 0 else ''}, got {s!r}")
        if s > limits.max_dim_size:
            raise LimitError(f"{where}: size {s} over max_dim_size {limits.max_dim_size}")
    return v


def graph_from_json(doc, limits: Limits | None = None) -> Graph:
    """Build a Graph (without weights) from its JSON, checking names and references."""
    limits = limits or Limits()
    _expect(isinstance(doc, dict), "graph JSON must be an object")
    for key in ("inputs", "outputs", "nodes"):
        _expect(isinstance(doc.get(key), list), f"graph JSON: '{key}' must be a list")
    if len(doc["nodes"]) > limits.max_nodes:
        raise LimitError(f"graph has {len(doc['nodes'])} nodes, over max_nodes {limits.max_nodes}")
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
        _expect(isinstance(o, dict) and isinstance(o.get("name"), str) and o.get("node") in node_names,
                f"output {i}: must name an output and an existing node, got {o!r}")
        outputs.append((o["name"], o["node"]))
    _expect(kind != "tensor" or len(outputs) == 1, "output_kind 'tensor' needs exactly one output")
    _expect(len({o for o, _ in outputs}) == len(outputs), "output names must be distinct")
    return Graph(inputs, outputs, kind, nodes)


def _read_weights(f: h5py.File, graph: Graph, limits: Limits) -> None:
    total = 0
    for n in graph.nodes:
        for w in n.weights:
            ds = f.get(f"weights/{n.name}/{w}")
            where = f"node '{n.name}' weight '{w}'"
            _expect(isinstance(ds, h5py.Dataset), f"{where}: dataset /weights/{n.name}/{w} missing")
            _check_dataset(ds, where, limits)
            total += ds.size * 4
            if total > limits.max_total_weight_bytes:
                raise LimitError(f"{where}: total weights over max_total_weight_bytes "
                                 f"{limits.max_total_weight_bytes}")
    for n in graph.nodes:
        for w in n.weights:
            arr = np.ascontiguousarray(f[f"weights/{n.name}/{w}"][()], dtype=np.float32)
            if not np.isfinite(arr).all():
                raise FormatError(f"node '{n.name}' weight '{w}': contains NaN or Inf")
            n.weights[w] = arr


def _check_dataset(ds: h5py.Dataset, where: str, limits: Limits) -> None:
    _expect(ds.dtype == np.float32, f"{where}: dtype must be float32, got {ds.dtype}")
    _expect(1 <= ds.ndim <= limits.max_dims, f"{where}: rank must be 1..{limits.max_dims}, got {ds.ndim}")
    if max(ds.shape) > limits.max_dim_size or ds.size > limits.max_weight_elements:
        raise LimitError(f"{where}: shape {ds.shape} over limits (max_dim_size {limits.max_dim_size}, "
                         f"max_weight_elements {limits.max_weight_elements})")


def _read_references(f: h5py.File, graph: Graph, limits: Limits) -> References:
    rg = f.get("references")
    if rg is None:
        return References(runs=[], stored="all", source="", source_version="")
    _expect(isinstance(rg, h5py.Group), "'/references' must be a group")
    count = rg.attrs.get("count", -1)
    _expect(isinstance(count, (int, np.integer)) and count >= 0, "'/references' attribute 'count' missing")
    if count > limits.max_references:
        raise LimitError(f"'/references' count {count} over max_references {limits.max_references}")
    refs = References(stored=_str_attr(rg, "stored"), source=_str_attr(rg, "source"),
                      source_version=_str_attr(rg, "source_version"))
    _expect(refs.stored in ("all", "outputs"), f"'/references' stored must be all|outputs, got {refs.stored!r}")
    for i in range(int(count)):
        g = rg.get(str(i))
        _expect(isinstance(g, h5py.Group), f"reference run {i} missing")
        run = Reference({}, {})
        for t in graph.inputs:
            ds = g.get(f"inputs/{t.name}")
            _expect(isinstance(ds, h5py.Dataset), f"reference run {i}: input '{t.name}' missing")
            _check_dataset(ds, f"reference run {i} input '{t.name}'", limits)
            run.inputs[t.name] = np.ascontiguousarray(ds[()], np.float32)
        wanted = [n.name for n in graph.nodes] if refs.stored == "all" else [n for _, n in graph.outputs]
        for name in wanted:
            ds = g.get(f"nodes/{name}")
            _expect(isinstance(ds, h5py.Dataset), f"reference run {i}: activation of node '{name}' missing")
            _check_dataset(ds, f"reference run {i} node '{name}'", limits)
            run.nodes[name] = np.ascontiguousarray(ds[()], np.float32)
        refs.runs.append(run)
    return refs

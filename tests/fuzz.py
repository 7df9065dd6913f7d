"""Fuzzing: mutated model files must run correctly or be refused with a named engine error.

    python -m tests.fuzz --files 3000 --seed 11 --grid     # the long run of docs/FORMAT.md

Seed models are built without torch (engine.graph objects, references from the engine's reference
kernels); each mutated file (bytes, HDF5 structure, graph JSON, weights) goes to a child process
(subprocess, never fork: Numba's OpenMP threads do not survive it) that loads it, runs it and
verifies it under an address-space cap and tight Limits, many files per child, with a watchdog
per file. A file passes when it loads and runs (with the un-mutated output when the mutation is
neutral) or raises an EngineError subclass; it fails as a crash (the child dies), a hang (the
watchdog fires), a MemoryError, any other exception leaking out, or a wrong neutral output.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MEMORY_CAP = 3 << 30            # child address space: a hostile allocation fails fast
# tight limits, so that everything a file may claim fits under MEMORY_CAP and runs in well
# under the watchdog: any MemoryError or hang is then a hole in the checks, not a big model
FUZZ_LIMITS = dict(max_nodes=2000, max_graph_json_bytes=1 << 20, max_weight_elements=1 << 22,
                   max_total_weight_bytes=64 << 20, max_reference_bytes=64 << 20, max_chunks=1 << 14,
                   max_activation_elements=1 << 22, max_live_elements=1 << 24, max_ops=1 << 28)
HOSTILE = [0, -1, 1, 2, 3, 7, 1 << 20, 1 << 40, 2 ** 63, -(2 ** 63) - 1, 10 ** 30, True, False, None,
           "x", "", "zeros", "reflect", "circular", "auto", "dense", [], [0], [1], [1, 1], [0, 0], [-1, -1],
           [2, 3], [1 << 30, 1], [1 << 20, 1 << 20], [1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1], [5, 5, 5, 5],
           [1 << 20] * 4, [None, 1], [[1], [1]], [0, 1, 2], [3, 2, 1, 0], [0, -1], {"a": 1}, 0.5, -0.5,
           1e308, -1e308, 1e-45, math.nan, math.inf, -math.inf]
ATTR_NAMES = ["stride", "padding", "dilation", "groups", "padding_mode", "kernel", "ceil_mode",
              "count_include_pad", "divisor_override", "output_size", "dims", "keepdim", "start_dim", "end_dim",
              "shape", "perm", "axis", "scalar", "eps", "min", "max", "negative_slope", "rank", "in_modes",
              "out_modes", "ranks", "kernel_size", "strategy"]
OP_NAMES = ["conv2d", "linear", "batch_norm", "relu", "clip", "max_pool2d", "avg_pool2d", "mean",
            "adaptive_avg_pool2d", "flatten", "reshape", "permute", "concat", "add", "mul", "softmax",
            "identity", "prelu", "basis_conv2d", "tt_conv2d", "tt_linear", "conv3d"]


# --- seed models -------------------------------------------------------------------------------

def _conv(stride=1, pad=1, groups=1, mode="zeros") -> dict:
    return {"stride": [stride, stride], "padding": [pad] * 4, "dilation": [1, 1], "groups": groups,
            "padding_mode": mode}


def seed_graphs() -> dict:
    """name -> Graph: a plain CNN, a branchy graph, and the compressed ops when installed."""
    from engine.graph import Graph, Node, TensorSpec
    from engine.ops import OPS
    rng = np.random.default_rng(0)

    def w(*shape):
        return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:], dtype=float) or 1)).astype(np.float32)

    bn = {"weight": 1 + 0.1 * w(8), "bias": w(8), "running_mean": w(8), "running_var": 1 + np.abs(w(8))}
    cnn = Graph([TensorSpec("x", [None, 3, 10, 10])], [("out", "fc")], "tensor", [
        Node("conv1", "conv2d", ["x"], _conv(), {"weight": w(8, 3, 3, 3), "bias": w(8)}),
        Node("bn1", "batch_norm", ["conv1"], {"eps": 1e-5}, bn),
        Node("relu1", "relu", ["bn1"]),
        Node("pool1", "max_pool2d", ["relu1"], {"kernel": [2, 2], "stride": [2, 2], "padding": [0, 0],
                                                 "dilation": [1, 1], "ceil_mode": False}),
        Node("dw", "conv2d", ["pool1"], _conv(groups=8, mode="reflect"), {"weight": w(8, 1, 3, 3)}),
        Node("clip1", "clip", ["dw"], {"min": 0.0, "max": 6.0}),
        Node("pool2", "avg_pool2d", ["clip1"], {"kernel": [3, 3], "stride": [2, 2], "padding": [1, 1],
                                                "ceil_mode": True, "count_include_pad": False,
                                                "divisor_override": None}),
        Node("gap", "adaptive_avg_pool2d", ["pool2"], {"output_size": [1, 1]}),
        Node("flat", "flatten", ["gap"], {"start_dim": 1, "end_dim": 3}),
        Node("fc", "linear", ["flat"], {}, {"weight": w(5, 8), "bias": w(5)}),
    ])
    branchy = Graph([TensorSpec("x", [None, 4, 6, 6])],
                    [("probs", "sm"), ("logp", "lsm"), ("feat", "avg")], "dict", [
        Node("a", "conv2d", ["x"], _conv(pad=0), {"weight": w(6, 4, 1, 1)}),
        Node("a_act", "leaky_relu", ["a"], {"negative_slope": 0.1}),
        Node("b", "conv2d", ["x"], _conv(mode="circular"), {"weight": w(6, 4, 3, 3), "bias": w(6)}),
        Node("b_act", "sigmoid", ["b"]),
        Node("cat", "concat", ["a_act", "b_act"], {"axis": 1}),
        Node("half", "mul", ["cat"], {"scalar": 0.5}),
        Node("sum", "add", ["a_act", "b_act"]),
        Node("pre", "prelu", ["sum"], {}, {"weight": 0.2 + 0.1 * w(6)}),
        Node("th", "tanh", ["pre"]),
        Node("avg", "mean", ["th"], {"dims": [2, 3], "keepdim": False}),
        Node("perm", "permute", ["half"], {"perm": [0, 2, 3, 1]}),
        Node("flat", "reshape", ["perm"], {"shape": [0, -1]}),
        Node("drop", "identity", ["flat"]),
        Node("fc", "linear", ["drop"], {}, {"weight": w(7, 432), "bias": w(7)}),
        Node("hs", "hardswish", ["fc"]),
        Node("sm", "softmax", ["hs"], {"axis": 1}),
        Node("lsm", "log_softmax", ["fc"], {"axis": 1}),
    ])
    graphs = {"cnn": cnn, "branchy": branchy}
    if {"basis_conv2d", "basis_linear", "tt_conv2d", "tt_linear"} <= set(OPS):
        bn6 = {k: v[:6] for k, v in bn.items()}
        tt = dict(_conv(stride=2), in_modes=[2, 3], out_modes=[2, 2], ranks=[3, 2], kernel_size=[3, 3])
        del tt["groups"]
        graphs["compressed"] = Graph([TensorSpec("x", [None, 4, 8, 8])], [("out", "bl")], "tensor", [
            Node("bc", "basis_conv2d", ["x"], dict(_conv(groups=2), rank=2),
                 {"basis": w(4, 2, 3, 3), "combine": w(6, 2), "bias": w(6)}),
            Node("bn", "batch_norm", ["bc"], {"eps": 1e-5}, bn6),
            Node("act", "silu", ["bn"]),
            Node("ttc", "tt_conv2d", ["act"], tt, {"core0": w(1, 9, 1, 3), "core1": w(3, 2, 2, 2),
                                                   "core2": w(2, 3, 2, 1), "bias": w(4)}),
            Node("flat", "flatten", ["ttc"], {"start_dim": 1, "end_dim": 3}),
            Node("ttl", "tt_linear", ["flat"], {"in_modes": [4, 16], "out_modes": [2, 3], "ranks": [3]},
                 {"core1": w(1, 4, 2, 3), "core2": w(3, 16, 3, 1)}),
            Node("bl", "basis_linear", ["ttl"], {"rank": 3}, {"basis": w(3, 6), "combine": w(5, 3)}),
        ])
    return graphs


def write_seeds(directory: Path) -> dict[str, Path]:
    """Each seed graph saved with two reference runs (batch 2 and 1) of every node."""
    import engine
    from engine import format as fmt
    paths = {}
    for i, (name, graph) in enumerate(seed_graphs().items()):
        model = engine.Model(graph, fmt.References())
        rng = np.random.default_rng(100 + i)
        runs = []
        for batch in (2, 1):
            x = {t.name: rng.standard_normal((batch,) + tuple(t.shape[1:])).astype(np.float32)
                 for t in graph.inputs}
            runs.append(fmt.Reference(x, model.activations(tuple(x.values()), kernels="reference")))
        paths[name] = directory / f"seed_{name}.h5"
        fmt.save(paths[name], graph, fmt.References(runs, "all", "engine-reference", engine.__version__))
    return paths


# --- mutations: each edits the file at `path` in place; returns (description, neutral) --------

def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _datasets(f: h5py.File) -> list[str]:
    names = []
    f.visititems(lambda k, v: names.append(k) if isinstance(v, h5py.Dataset) else None)
    return names


def _replace(f: h5py.File, name: str, **kwargs) -> None:
    del f[name]
    f.create_dataset(name, **kwargs)


def _read_doc(f: h5py.File) -> dict:
    return json.loads(f["graph"][()])


def _fixed(value):
    """Strings as fixed-length (the format's); variable-length ones have their own mutation."""
    if isinstance(value, str):
        value = value.encode()
    return np.bytes_(value) if isinstance(value, bytes) else value


def _write_doc(f: h5py.File, doc) -> None:
    _replace(f, "graph", data=np.bytes_(json.dumps(doc).encode()))


def mutate_bytes(rng, path: Path) -> tuple[str, bool]:
    data = bytearray(path.read_bytes())
    kind = _pick(rng, ["truncate", "flip", "zero"])
    if kind == "truncate":
        cut = int(rng.integers(len(data)))
        path.write_bytes(bytes(data[:cut]))
        return f"truncate at {cut}/{len(data)}", False
    if kind == "flip":
        spots = rng.integers(len(data), size=int(rng.integers(1, 9)))
        for i in spots:
            data[i] ^= int(rng.integers(1, 256))
        path.write_bytes(bytes(data))
        return f"flip bytes {sorted(spots.tolist())}", False
    start, n = int(rng.integers(len(data))), int(rng.integers(16, 257))
    data[start:start + n] = bytes(len(data[start:start + n]))
    path.write_bytes(bytes(data))
    return f"zero {n} bytes at {start}", False


def mutate_hdf5(rng, path: Path) -> tuple[str, bool]:
    with h5py.File(path, "r+") as f:
        names = _datasets(f)
        arrays = [n for n in names if n != "graph"]
        target = _pick(rng, arrays)
        old = f[target][()]
        kind = _pick(rng, ["root_attr", "delete", "extra", "extra_attr", "dtype", "shape", "nonfinite",
                           "rechunk", "bomb", "lying_chunk", "shuffle", "external", "virtual", "softlink",
                           "extlink", "ref_attr", "vlen", "graph_type"])
        if kind == "root_attr":
            key = _pick(rng, ["format", "format_version", "producer"])
            value = _pick(rng, [0, 2, "1", 1.0, -1, 2 ** 40, True, np.array([1]), "onnx", b"basisconv", "x "])
            f.attrs[key] = _fixed(value)
            neutral = key == "producer" or (key, value) == ("format", b"basisconv")
            return f"root attribute {key} = {value!r}", neutral
        if kind == "delete":
            victim = _pick(rng, names)
            del f[victim]
            return f"delete {victim}", False
        if kind == "extra":
            where = _pick(rng, ["junk", f"{target.rsplit('/', 1)[0]}/unused", "references/99/inputs/x",
                                "weights/nobody/weight"])
            f.create_dataset(where, data=rng.standard_normal(3).astype(np.float32))
            return f"extra dataset {where}", True
        if kind == "extra_attr":
            f[target].attrs["note"] = "unused"
            f.attrs["extra"] = 1
            return f"extra attributes on / and {target}", True
        if kind == "dtype":
            dtype = _pick(rng, ["f8", "f2", "i4", ">f4", "u1"])
            _replace(f, target, data=old.astype(dtype))
            return f"{target} as {dtype}", False
        if kind == "shape":
            shape = _pick(rng, [(), (0,), old.shape[::-1], old.shape + (1,), (old.size + 1,),
                                tuple(s + 1 for s in old.shape), (1,) * 9])
            _replace(f, target, data=np.resize(old, shape).astype(np.float32) if shape else np.float32(1))
            return f"{target} reshaped {old.shape} -> {shape}", False
        if kind == "nonfinite":
            flat = old.astype(np.float32).ravel()
            flat[int(rng.integers(flat.size))] = _pick(rng, [np.nan, np.inf, -np.inf])
            _replace(f, target, data=flat.reshape(old.shape))
            return f"{target} gets a non-finite value", False
        if kind == "rechunk":
            _replace(f, target, data=old, chunks=True, compression="gzip",
                     compression_opts=int(rng.integers(1, 10)))
            return f"{target} rewritten gzip-chunked", True
        if kind == "bomb":
            n = _pick(rng, [1 << 22, 1 << 24, 1 << 30])
            del f[target]
            f.create_dataset(target, shape=(n,), dtype="f4", chunks=(min(n, 1 << 20),), compression="gzip")
            f[target].id.write_direct_chunk((0,), zlib.compress(bytes(4 * min(n, 1 << 20)), 9))
            return f"{target} claims ({n},) gzip", False
        if kind == "lying_chunk":
            size = old.size if old.ndim else 1
            _replace(f, target, shape=old.shape or (1,), dtype="f4", chunks=old.shape or (1,), compression="gzip")
            f[target].id.write_direct_chunk((0,) * max(old.ndim, 1), zlib.compress(bytes(4 * size * 4096), 9))
            return f"{target}: one gzip chunk inflating 4096x its size", False
        if kind == "shuffle":
            _replace(f, target, data=old, chunks=True, shuffle=True, compression="gzip")
            return f"{target} with the shuffle filter", False
        if kind == "external":
            del f[target]
            f.create_dataset(target, shape=old.shape, dtype="<f4", external=[("/etc/hostname", 0, 4 * old.size)])
            return f"{target} stored externally in /etc/hostname", False
        if kind == "virtual":
            layout = h5py.VirtualLayout(shape=old.shape or (1,), dtype="<f4")
            layout[...] = h5py.VirtualSource(".", "junk_src", shape=old.shape or (1,))
            f.create_dataset("junk_src", data=np.resize(old, old.shape or (1,)).astype(np.float32))
            del f[target]
            f.create_virtual_dataset(target, layout)
            return f"{target} virtual", False
        if kind == "softlink":
            del f[target]
            f[target] = h5py.SoftLink("/" + _pick(rng, arrays))
            return f"{target} soft link", False
        if kind == "extlink":
            del f[target]
            f[target] = h5py.ExternalLink(str(path), "/" + target)
            return f"{target} external link", False
        if kind == "ref_attr":
            key = _pick(rng, ["count", "stored", "source"])
            value = _pick(rng, [0, 1, 3, 1000, -1, "outputs", "all", "none", 2.0])
            f["references"].attrs[key] = _fixed(value)
            return f"references attribute {key} = {value!r}", key == "source"
        raw = f["graph"][()]
        if kind == "vlen":
            _replace(f, "graph", data=raw.decode())
            f.attrs["producer"] = "a variable-length string"
            return "graph and an attribute as variable-length strings", False
        _replace(f, "graph", data=np.frombuffer(raw, np.uint8))
        return "graph as a uint8 array", False


def _mutate_value(rng, value):
    """A variant of `value`: plausible (same type, small numbers), one list element hostile, or a
    value from HOSTILE."""
    r = rng.random()
    if r < 0.4 and isinstance(value, (bool, int, float, list)):
        if isinstance(value, bool):
            return not value
        if isinstance(value, list):
            return [_mutate_value(rng, v) if isinstance(v, (int, float)) else v for v in value]
        return _pick(rng, [-1, 0, 1, 2, 3, 5, 9] if isinstance(value, int) else [-1.0, 0.0, 1e-3, 0.5, 100.0])
    if r < 0.7 and isinstance(value, list) and value:
        out = list(value)
        out[int(rng.integers(len(out)))] = _pick(rng, HOSTILE)
        return out
    return _pick(rng, HOSTILE)


def mutate_graph(rng, path: Path) -> tuple[str, bool]:
    with h5py.File(path, "r+") as f:
        doc = _read_doc(f)
        nodes = doc["nodes"]
        node = _pick(rng, nodes)
        kind = _pick(rng, ["attr", "attr", "attr", "drop_attr", "op", "inputs", "weights", "swap", "rename",
                           "input_shape", "outputs", "output_kind", "module", "unknown_key", "drop_key",
                           "many_nodes", "doubling", "deep", "text"])
        desc, neutral = kind, False
        if kind == "attr":
            changes = []
            for _ in range(_pick(rng, [1, 1, 2, 3])):
                attrs = node.setdefault("attrs", {})
                key = _pick(rng, list(attrs)) if attrs and rng.random() < 0.75 else _pick(rng, ATTR_NAMES)
                attrs[key] = _mutate_value(rng, attrs.get(key, _pick(rng, [1, [1, 1], [2, 2], [1, 1, 1, 1], 0.5])))
                changes.append(f"{key} = {node['attrs'][key]!r}")
            desc = f"{node['name']}: {', '.join(changes)}"
        elif kind == "drop_attr" and node["attrs"]:
            key = _pick(rng, list(node["attrs"]))
            del node["attrs"][key]
            desc = f"drop {node['name']}.{key}"
        elif kind == "op":
            node["op"] = _pick(rng, OP_NAMES)
            desc = f"{node['name']}.op = {node['op']}"
        elif kind == "inputs":
            names = [t["name"] for t in doc["inputs"]] + [n["name"] for n in nodes] + ["nowhere", 3]
            how = _pick(rng, ["replace", "add", "remove"])
            if how == "replace" and node["inputs"]:
                node["inputs"][int(rng.integers(len(node["inputs"])))] = _pick(rng, names)
            elif how == "add":
                node["inputs"].append(_pick(rng, names))
            else:
                node["inputs"] = node["inputs"][1:]
            desc = f"{node['name']}.inputs = {node['inputs']}"
        elif kind == "weights":
            w = node["weights"]
            node["weights"] = _pick(rng, [[], w + ["extra"], w[:1], ["weight", "weight"]])
            desc = f"{node['name']}.weights = {node['weights']}"
        elif kind == "swap":
            i, j = rng.integers(len(nodes), size=2)
            nodes[i], nodes[j] = nodes[j], nodes[i]
            desc = f"swap nodes {i} and {j}"
        elif kind == "rename":
            node["name"] = _pick(rng, [nodes[0]["name"], doc["inputs"][0]["name"], "bad name", "", 7, "fresh"])
            desc = f"rename a node to {node['name']!r}"
        elif kind == "input_shape":
            shape = doc["inputs"][0]["shape"]
            doc["inputs"][0]["shape"] = _pick(rng, [_mutate_value(rng, shape), shape[:-1], shape + [1],
                                                    [None] + [s + 1 for s in shape[1:]], [1] + shape[1:]])
            desc = f"input shape {doc['inputs'][0]['shape']}"
            neutral = doc["inputs"][0]["shape"] == [1] + shape[1:]
        elif kind == "outputs":
            o = doc["outputs"][0]
            how = _pick(rng, ["node", "name", "add", "empty"])
            if how == "node":
                o["node"] = _pick(rng, [n["name"] for n in nodes] + ["ghost", None])
            elif how == "name":
                o["name"] = _pick(rng, [doc["outputs"][-1]["name"], 5, ""])
            elif how == "add":
                doc["outputs"].append(dict(o))
            else:
                doc["outputs"] = []
            desc = f"outputs = {doc['outputs']}"
        elif kind == "output_kind":
            doc["output_kind"] = _pick(rng, ["tensor", "tuple", "dict", "list", None])
            desc = f"output_kind = {doc['output_kind']}"
        elif kind == "module":
            node["module"] = "renamed.module"
            desc, neutral = f"{node['name']}.module renamed", True
        elif kind == "unknown_key":
            doc["comment"] = {"anything": [1, 2, 3]}
            node["note"] = "ignored"
            desc, neutral = "unknown keys", True
        elif kind == "drop_key":
            key = _pick(rng, ["inputs", "outputs", "nodes", "output_kind"])
            del doc[key]
            desc = f"drop graph key {key}"
        elif kind == "many_nodes":
            n = _pick(rng, [300, 2500])
            last = nodes[-1]["name"]
            nodes += [{"name": f"id{i}", "op": "identity", "inputs": [last if i == 0 else f"id{i - 1}"]}
                      for i in range(n)]
            doc["outputs"][0]["node"] = f"id{n - 1}"
            desc = f"{n} identity nodes appended"
        elif kind == "doubling":
            prev = nodes[0]["name"]
            for i in range(40):
                nodes.append({"name": f"dbl{i}", "op": "concat", "inputs": [prev, prev], "attrs": {"axis": 1}})
                prev = f"dbl{i}"
            doc["outputs"][0]["node"] = prev
            desc = "40 doubling concats"
        if kind == "deep":
            _replace(f, "graph", data=np.bytes_(b"[" * 100_000 + b"]" * 100_000))
        elif kind == "text":
            text = json.dumps(doc)
            how = _pick(rng, ["cut", "nan", "big", "utf8"])
            text = {"cut": text[:int(rng.integers(len(text)))], "nan": text.replace("1.0", "NaN", 1),
                    "big": text.replace(": 1,", ": 1e400,", 1), "utf8": text}[how]
            _replace(f, "graph", data=np.bytes_(text.encode() + (b"\xff" if how == "utf8" else b"")))
            desc = f"graph text: {how}"
        else:
            _write_doc(f, doc)
        if not neutral and "references" in f and rng.random() < 0.6:
            del f["references"]         # else they no longer fit: shape changes would never run
            desc += " (references dropped)"
        return desc, neutral


def mutate(rng, path: Path) -> tuple[str, bool]:
    """One to three random mutations of the file at `path`, in place (stacking stops when an
    earlier one left a file h5py cannot edit)."""
    descs, neutral = [], True
    for _ in range(_pick(rng, [1, 1, 1, 2, 3])):
        r = rng.random()
        fn = mutate_bytes if r < 0.2 else mutate_hdf5 if r < 0.55 else mutate_graph
        try:
            desc, ok = fn(rng, path)
        except Exception:  # noqa: BLE001 - an earlier mutation broke what this one edits
            break
        descs.append(desc)
        neutral &= ok
    return "; ".join(descs), neutral and bool(descs)


# --- the child: load, run, verify --------------------------------------------------------------

def child() -> None:
    """Read one task per stdin line, answer one JSON line each on stdout. A task is a mutated
    file (load, run, verify) or a grid case: the seed graph in memory with one attribute set
    (plan, run with the fast and the reference kernels)."""
    import copy
    import resource
    import traceback
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
    import engine
    from engine import format as fmt
    limits = engine.Limits(**FUZZ_LIMITS)
    seeds = {}
    for line in sys.stdin:
        task = json.loads(line)
        if task["seed_path"] not in seeds:
            model = engine.load(task["seed_path"], limits=limits)
            x = tuple(model.references.runs[0].inputs[t.name] for t in model.graph.inputs)
            seeds[task["seed_path"]] = (model.graph, x, model(x))
            model.verify()
        graph, x, want = seeds[task["seed_path"]]
        try:
            if "grid" in task:
                name, key, value = task["grid"]
                graph = copy.deepcopy(graph)
                graph.node(name).attrs[key] = value
                model = engine.Model(graph, fmt.References(), limits)
                model(x)
                model.activations(x, kernels="reference")
                reply = {"status": "ok", "error": "", "msg": "", "verified": True}
            else:
                model = engine.load(task["path"], limits=limits)
                got = model(x)
                report = model.verify()
                if task["neutral"] and not (_same(got, want) and report.ok):
                    reply = {"status": "wrong", "error": "", "msg": report.summary()}
                else:
                    reply = {"status": "ok", "error": "", "msg": "", "verified": report.ok}
        except engine.EngineError as e:   # a neutral mutation must not be refused
            reply = {"status": "wrong" if task.get("neutral") else "refused", "error": type(e).__name__,
                     "msg": str(e)[:300]}
        except MemoryError as e:
            reply = {"status": "memory", "error": "MemoryError", "msg": str(e)[:300]}
        except Exception as e:  # noqa: BLE001 - the point: anything else leaking out is a failure
            reply = {"status": "leak", "error": type(e).__name__,
                     "msg": "".join(traceback.format_exception(e, limit=-3))[-1200:]}
        print(json.dumps(reply), flush=True)


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, tuple):
        return len(a) == len(b) and all(map(_same, a, b))
    return isinstance(a, np.ndarray) and a.dtype == np.float32 and np.array_equal(a, b)


# --- the parent: make files, feed children, count ----------------------------------------------

@dataclass
class Counts:
    tried: int = 0
    ok: int = 0
    ok_verify_flagged: int = 0      # loaded and ran; verify reported a mismatch (not a failure)
    refused: Counter = field(default_factory=Counter)
    leaks: int = 0
    memory: int = 0
    wrong: int = 0
    crashes: int = 0
    hangs: int = 0
    failures: list = field(default_factory=list)    # (description, status, detail)
    seconds: float = 0.0
    unit: str = "files"

    @property
    def failed(self) -> int:
        return self.leaks + self.memory + self.wrong + self.crashes + self.hangs

    def summary(self) -> str:
        refused = ", ".join(f"{k} {v}" for k, v in sorted(self.refused.items())) or "none"
        lines = [f"fuzz: {self.tried} {self.unit} in {self.seconds:.0f} s: loaded fine {self.ok} "
                 f"(verify flagged {self.ok_verify_flagged}); refused {sum(self.refused.values())} "
                 f"({refused}); crashes {self.crashes}, hangs {self.hangs}, leaks {self.leaks}, "
                 f"MemoryErrors {self.memory}, wrong neutral outputs {self.wrong}"]
        lines += [f"  FAIL {status}: {desc}\n    {detail.strip().splitlines()[-1] if detail.strip() else ''}"
                  for desc, status, detail in self.failures[:20]]
        return "\n".join(lines)


class _Child:
    """A worker process answering tasks one line at a time, read by a thread (for timeouts)."""

    def __init__(self, log):
        env = dict(os.environ, PYTHONPATH=str(ROOT), NUMBA_NUM_THREADS="1")  # fast on a busy machine
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.fuzz", "--child"], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
        self.lines: queue.Queue = queue.Queue()
        self.fresh = True               # its first task also imports the engine, compiles, runs the seed
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def ask(self, task: dict, timeout: float):
        """The reply, None if the child died, or "hang" after `timeout` seconds."""
        try:
            self.proc.stdin.write(json.dumps(task) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return None
        try:
            line = self.lines.get(timeout=10 * timeout if self.fresh else timeout)
            self.fresh = False
        except queue.Empty:
            return "hang"
        return None if line is None else json.loads(line)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class _Runner:
    """Feeds tasks to a child, restarting it after a crash or a hang, and counts the replies."""

    def __init__(self, directory: Path, timeout: float, keep: Path | None, verbose: bool):
        self.log = open(directory / "child.log", "w+")
        self.timeout, self.keep, self.verbose = timeout, keep, verbose
        self.counts = Counts()
        self.worker = None

    def check(self, desc: str, task: dict, path: Path | None = None) -> None:
        if self.worker is None:
            self.worker = _Child(self.log)
        reply = self.worker.ask(task, self.timeout)
        c = self.counts
        c.tried += 1
        if reply is None or reply == "hang":
            self.worker.stop()
            code = self.worker.proc.returncode
            self.worker = None
            reply = ({"status": "crash", "msg": f"exit {code}"} if reply is None else
                     {"status": "hang", "msg": f"> {self.timeout} s"})
        status = reply["status"]
        if status == "ok":
            c.ok += 1
            c.ok_verify_flagged += not reply["verified"]
        elif status == "refused":
            c.refused[reply["error"]] += 1
        else:
            setattr(c, FAILURES[status], getattr(c, FAILURES[status]) + 1)
            c.failures.append((desc, status, reply["msg"]))
            if self.keep is not None and path is not None:
                self.keep.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, self.keep / path.name)
        if self.verbose:
            print(f"{desc} -> {status} {reply.get('error', '')} {reply['msg'][:200]}")

    def close(self) -> Counts:
        if self.worker is not None:
            self.worker.proc.stdin.close()
            self.worker.stop()
        self.log.close()
        return self.counts


FAILURES = {"crash": "crashes", "hang": "hangs", "leak": "leaks", "memory": "memory", "wrong": "wrong"}


def run(files: int, seed: int = 0, time_budget: float = 600.0, timeout: float = 30.0,
        keep: Path | None = None, verbose: bool = False) -> Counts:
    """Fuzz `files` mutated files (fewer if `time_budget` seconds run out); failing files are
    copied to `keep` when given; verbose prints one line per file."""
    t0 = time.monotonic()
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="fuzz") as tmp:
        tmp = Path(tmp)
        seeds = write_seeds(tmp)
        runner = _Runner(tmp, timeout, keep, verbose)
        try:
            for i in range(files):
                if time.monotonic() - t0 > time_budget:
                    break
                name = _pick(rng, sorted(seeds))
                path = tmp / f"m{i}.h5"
                shutil.copyfile(seeds[name], path)
                desc, neutral = mutate(rng, path)
                runner.check(f"#{i} {name}: {desc}", {"path": str(path), "seed_path": str(seeds[name]),
                                                      "neutral": neutral}, path)
                path.unlink()
        finally:
            counts = runner.close()
    counts.seconds = time.monotonic() - t0
    return counts


def run_grid(timeout: float = 30.0, verbose: bool = False) -> Counts:
    """Every node of every seed graph with each attribute (its own and every op's) set to each
    value of HOSTILE and of small plausible ones: the op checks, systematically."""
    t0 = time.monotonic()
    plausible = [[-1, 3], [0, 2], [2, 0], [3, 3], [1, 2, 3], [1, 0, 1, 0], [0, 0, 2, 2], [2, 2, 0, 0]]
    with tempfile.TemporaryDirectory(prefix="fuzzgrid") as tmp:
        seeds = write_seeds(Path(tmp))
        runner = _Runner(Path(tmp), timeout, None, verbose)
        try:
            for name, graph in seed_graphs().items():
                for node in graph.nodes:
                    for key in dict.fromkeys(list(node.attrs) + ATTR_NAMES):
                        for value in HOSTILE + plausible:
                            runner.check(f"{name}: {node.name}.{key} = {value!r}",
                                         {"grid": [node.name, key, value], "seed_path": str(seeds[name])})
        finally:
            counts = runner.close()
    counts.seconds, counts.unit = time.monotonic() - t0, "cases"
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--files", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time", type=float, default=1800.0, help="total time budget, seconds")
    p.add_argument("--timeout", type=float, default=30.0, help="watchdog per file, seconds")
    p.add_argument("--keep", type=Path, help="copy failing files here")
    p.add_argument("-v", "--verbose", action="store_true", help="one line per file")
    p.add_argument("--grid", action="store_true", help="then every seed node x attribute x value, in memory")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child()
        return 0
    counts = run(a.files, a.seed, a.time, a.timeout, a.keep, a.verbose)
    print(counts.summary())
    failed = counts.failed
    if a.grid:
        grid = run_grid(a.timeout, a.verbose)
        print("grid " + grid.summary())
        failed += grid.failed
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

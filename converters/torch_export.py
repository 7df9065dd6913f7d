"""Export a PyTorch model to the engine's model file (docs/FORMAT.md).

Why torch.fx and not torch.export: fx lets us declare leaf modules, so our compressed layers
(BasisConv2d, TT layers) stay single ops carrying their factors as weights, and every
call_module node comes with its module path for free. torch.export decomposes everything into
aten ops, which would lose both the layer boundaries and the module paths.

Mapping is table-driven; both tables return the same thing, a node's op, attrs and weights:
  LEAF_EXPORTERS  module type -> exporter(module) -> (op, attrs, weights)   (call_module nodes)
  FUNCTIONS       function / Tensor-method name -> handler(*args, **kwargs) -> _Mapped
                  (call_function / call_method nodes; handlers mirror torch's signatures)
Attributes that depend on traced shapes (negative axes, reshape targets) are filled in
afterwards from the recorded activations, the same way for modules and functions.
"""
from __future__ import annotations

import contextlib

import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from engine.errors import InputError, UnsupportedOpError
from engine.format import Reference, References, save
from engine.graph import NAME_RE, Graph, Node, TensorSpec

from . import __version__

Exporter = Callable[[nn.Module], "tuple[str, dict, dict[str, np.ndarray]]"]
LEAF_EXPORTERS: dict[type, Exporter] = {}
FUNCTIONS: dict[Any, Callable[..., "_Mapped"]] = {}


def register_leaf(*types: type):
    """Decorator: `exporter(module) -> (op, attrs, weights)` handles these module types.

    Registered types are also fx leaves: they become one node, never traced through.
    """
    def deco(fn: Exporter) -> Exporter:
        for t in types:
            LEAF_EXPORTERS[t] = fn
        return fn
    return deco


def _exporter_for(cls: type) -> Exporter | None:
    """The exporter of `cls`, or of its nearest registered base class when `cls` keeps that
    base's forward (e.g. torch.nn.utils.parametrize's ParametrizedConv2d); a subclass with its
    own forward is traced through instead of being exported as its base by mistake."""
    return next((LEAF_EXPORTERS[b] for b in cls.__mro__
                 if b in LEAF_EXPORTERS and getattr(b, "forward", None) is getattr(cls, "forward", None)), None)


def _function(*targets):
    """Decorator: `handler` maps calls of these functions / Tensor-method names."""
    def deco(fn):
        for t in targets:
            FUNCTIONS[t] = fn
        return fn
    return deco


# --- values a handler sees in place of fx nodes ----------------------------------------------

@dataclass(frozen=True)
class _T:
    """A tensor in the exported graph: its name and its traced shape."""
    name: str
    shape: tuple


@dataclass(frozen=True)
class _Param:
    """A parameter or buffer read with get_attr; only some handlers accept one (as a weight)."""
    target: str
    value: torch.Tensor = field(repr=False)


@dataclass
class _Mapped:
    op: str
    attrs: dict
    inputs: list
    weights: dict = field(default_factory=dict)

    def __post_init__(self):
        for x in self.inputs:
            if isinstance(x, _Param):
                raise _direct_param(x)
            if not isinstance(x, _T):
                raise UnsupportedOpError(f"expected a tensor input, got {x!r}")


def _direct_param(p: _Param) -> UnsupportedOpError:
    return UnsupportedOpError(f"parameter/buffer '{p.target}' is used directly as an operand "
                              "(the format has no constant op; wrap it in a leaf module)")


def _np(t: torch.Tensor) -> np.ndarray:
    """float32 copy (never a view: in-place ops must not change what was recorded)."""
    return t.detach().cpu().to(torch.float32).numpy().copy()


def _weights(m: nn.Module, *names: str) -> dict[str, np.ndarray]:
    return {k: _np(getattr(m, k)) for k in names if getattr(m, k, None) is not None}


def _pair(v) -> list[int]:
    if isinstance(v, int):
        return [v, v]
    v = [int(x) for x in v]
    return v * 2 if len(v) == 1 else v


def _scalar(v) -> float:
    if isinstance(v, _Param) and v.value.numel() == 1:
        return float(v.value)
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, _Param):
        raise _direct_param(v)
    raise UnsupportedOpError(f"operand {v!r} is neither a tensor nor a number")


# --- attribute builders: torch's argument lists minus the input, shared by modules and functions

def _no_attrs(inplace=False):
    return {}


def _clip(min_val=-1.0, max_val=1.0, inplace=False):
    return {"min": float(min_val), "max": float(max_val)}


def _relu6(inplace=False):
    return _clip(0.0, 6.0)


def _leaky_relu(negative_slope=0.01, inplace=False):
    return {"negative_slope": float(negative_slope)}


def _max_pool(kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    if return_indices:
        raise UnsupportedOpError("max_pool2d with return_indices=True")
    k = _pair(kernel_size)
    return {"kernel": k, "stride": _pair(stride) if stride else k, "padding": _pair(padding),
            "dilation": _pair(dilation), "ceil_mode": bool(ceil_mode)}


def _avg_pool(kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
              divisor_override=None):
    k = _pair(kernel_size)
    return {"kernel": k, "stride": _pair(stride) if stride else k, "padding": _pair(padding),
            "ceil_mode": bool(ceil_mode), "count_include_pad": bool(count_include_pad),
            "divisor_override": None if divisor_override is None else int(divisor_override)}


def _adaptive_avg_pool(output_size):
    size = [output_size] * 2 if output_size is None or isinstance(output_size, int) else list(output_size)
    return {"output_size": [None if s is None else int(s) for s in size]}


def _flatten(start_dim=0, end_dim=-1):
    return {"start_dim": int(start_dim), "end_dim": int(end_dim)}


def _softmax(dim=None, _stacklevel=3, dtype=None):
    if dim is None:
        raise UnsupportedOpError("softmax without an explicit dim (implicit dim is deprecated)")
    return {"axis": int(dim)}


def _mean(dim=None, keepdim=False, *, dtype=None):
    if dim is None:
        raise UnsupportedOpError("mean over all dims (the batch dim included); pass dim")
    return {"dims": [int(dim)] if isinstance(dim, int) else [int(d) for d in dim],
            "keepdim": bool(keepdim)}


def _permute(*dims):
    dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else dims
    return {"perm": [int(d) for d in dims]}


def _dropout(p=0.5, training=True, inplace=False):
    if training:
        raise UnsupportedOpError("dropout with training=True is random at inference; "
                                 "pass training=self.training")
    return {}


def _alpha_dropout(p=0.5, training=False, inplace=False):
    return _dropout(p, training)


def _from_trace(*_args, **_kwargs):
    """reshape/view: the target shape is encoded from the traced shapes (_reshape_code)."""
    return {}


# --- standard modules --------------------------------------------------------------------------

@register_leaf(nn.Conv2d)
def _export_conv2d(m: nn.Conv2d):
    if m.padding == "valid":
        pad = [0, 0, 0, 0]
    elif m.padding == "same":   # torch puts the odd pixel on the bottom/right
        th, tw = (d * (k - 1) for d, k in zip(m.dilation, m.kernel_size))
        pad = [th // 2, tw // 2, th - th // 2, tw - tw // 2]
    else:
        pad = _pair(m.padding) * 2
    return "conv2d", {"stride": _pair(m.stride), "padding": pad, "dilation": _pair(m.dilation),
                      "groups": int(m.groups), "padding_mode": m.padding_mode}, _weights(m, "weight", "bias")


@register_leaf(nn.Linear)
def _export_linear(m: nn.Linear):
    return "linear", {}, _weights(m, "weight", "bias")


@register_leaf(nn.BatchNorm1d, nn.BatchNorm2d)
def _export_batch_norm(m: nn.modules.batchnorm._BatchNorm):
    if m.running_mean is None or m.running_var is None:
        raise UnsupportedOpError(f"{type(m).__name__} with track_running_stats=False "
                                 "(normalizes with batch statistics even in eval mode)")
    w = {"weight": m.weight, "bias": m.bias} if m.affine else {}   # non-affine: nothing learnable
    w.update(running_mean=m.running_mean, running_var=m.running_var)
    return "batch_norm", {"eps": float(m.eps)}, {k: _np(v) for k, v in w.items()}


@register_leaf(nn.PReLU)
def _export_prelu(m: nn.PReLU):
    return "prelu", {}, _weights(m, "weight")


_MODULE_ATTRS: dict[tuple, tuple[str, Callable[[nn.Module], dict]]] = {
    (nn.ReLU,): ("relu", lambda m: {}),
    (nn.Sigmoid,): ("sigmoid", lambda m: {}),
    (nn.Tanh,): ("tanh", lambda m: {}),
    (nn.SiLU,): ("silu", lambda m: {}),
    (nn.Hardswish,): ("hardswish", lambda m: {}),
    (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
     nn.FeatureAlphaDropout): ("identity", lambda m: {}),
    (nn.Hardtanh, nn.ReLU6): ("clip", lambda m: _clip(m.min_val, m.max_val)),
    (nn.LeakyReLU,): ("leaky_relu", lambda m: _leaky_relu(m.negative_slope)),
    (nn.MaxPool2d,): ("max_pool2d", lambda m: _max_pool(m.kernel_size, m.stride, m.padding,
                                                         m.dilation, m.ceil_mode, m.return_indices)),
    (nn.AvgPool2d,): ("avg_pool2d", lambda m: _avg_pool(m.kernel_size, m.stride, m.padding, m.ceil_mode,
                                                         m.count_include_pad, m.divisor_override)),
    (nn.AdaptiveAvgPool2d,): ("adaptive_avg_pool2d", lambda m: _adaptive_avg_pool(m.output_size)),
    (nn.Flatten,): ("flatten", lambda m: _flatten(m.start_dim, m.end_dim)),
    (nn.Softmax,): ("softmax", lambda m: _softmax(m.dim)),
    (nn.LogSoftmax,): ("log_softmax", lambda m: _softmax(m.dim)),
}


def _module_exporter(op: str, attrs: Callable[[nn.Module], dict]) -> Exporter:
    return lambda m: (op, attrs(m), {})


LEAF_EXPORTERS.update({t: _module_exporter(op, attrs)
                       for types, (op, attrs) in _MODULE_ATTRS.items() for t in types})


# --- functions and Tensor methods (strings are method names) ----------------------------------

_UNARY: list[tuple[tuple, str, Callable[..., dict]]] = [
    ((F.relu, F.relu_, torch.relu, torch.relu_, "relu", "relu_"), "relu", _no_attrs),
    ((F.relu6,), "clip", _relu6),
    ((F.hardtanh, F.hardtanh_), "clip", _clip),
    ((F.leaky_relu, F.leaky_relu_), "leaky_relu", _leaky_relu),
    ((torch.sigmoid, F.sigmoid, "sigmoid", "sigmoid_"), "sigmoid", _no_attrs),
    ((torch.tanh, F.tanh, "tanh", "tanh_"), "tanh", _no_attrs),
    ((F.silu,), "silu", _no_attrs),
    ((F.hardswish,), "hardswish", _no_attrs),
    ((F.max_pool2d,), "max_pool2d", _max_pool),
    ((F.avg_pool2d,), "avg_pool2d", _avg_pool),
    ((F.adaptive_avg_pool2d,), "adaptive_avg_pool2d", _adaptive_avg_pool),
    ((torch.flatten, "flatten"), "flatten", _flatten),
    ((torch.mean, "mean"), "mean", _mean),
    ((torch.permute, "permute"), "permute", _permute),
    ((torch.reshape, "reshape", "view"), "reshape", _from_trace),
    ((F.softmax, torch.softmax, "softmax"), "softmax", _softmax),
    ((F.log_softmax, torch.log_softmax, "log_softmax"), "log_softmax", _softmax),
    ((F.dropout, F.dropout1d, F.dropout2d, F.dropout3d), "identity", _dropout),
    ((F.alpha_dropout, F.feature_alpha_dropout), "identity", _alpha_dropout),
    (("contiguous",), "identity", lambda memory_format=None: {}),
]


def _unary(op: str, attrs: Callable[..., dict]):
    """Handler for op(x, *rest): `attrs` takes torch's arguments after the input."""
    return lambda x, *args, **kwargs: _Mapped(op, attrs(*args, **kwargs), [x])


FUNCTIONS.update({t: _unary(op, attrs) for targets, op, attrs in _UNARY for t in targets})


def _binary(op: str):
    """add / mul: tensor (op) tensor, or tensor (op) number in either order -> attribute scalar."""
    def handler(a, b, *, alpha=1):
        if alpha != 1:
            raise UnsupportedOpError(f"{op} with alpha={alpha}")
        if isinstance(a, _T) and isinstance(b, _T):
            return _Mapped(op, {}, [a, b])
        x, s = (a, b) if isinstance(a, _T) else (b, a)
        return _Mapped(op, {"scalar": _scalar(s)}, [x])
    return handler


_function(operator.add, operator.iadd, torch.add, "add", "add_")(_binary("add"))
_function(operator.mul, operator.imul, torch.mul, "mul", "mul_")(_binary("mul"))


@_function(torch.cat, torch.concat)
def _cat(tensors, dim=0):
    return _Mapped("concat", {"axis": int(dim)}, list(tensors))


@_function(torch.transpose, "transpose")
def _transpose(x, dim0, dim1):
    perm = list(range(len(x.shape)))
    perm[dim0], perm[dim1] = perm[dim1], perm[dim0]
    return _Mapped("permute", {"perm": perm}, [x])


@_function(F.prelu)
def _prelu(x, weight):
    if not isinstance(weight, _Param):
        raise UnsupportedOpError("prelu with a computed weight (only a parameter is supported)")
    return _Mapped("prelu", {}, [x], {"weight": _np(weight.value)})


# --- shape-dependent attributes ----------------------------------------------------------------

_AXES = {"flatten": ("start_dim", "end_dim"), "mean": ("dims",), "permute": ("perm",),
         "concat": ("axis",), "softmax": ("axis",), "log_softmax": ("axis",)}


def _normalize(m: _Mapped, out_shape: tuple) -> None:
    """Negative axes -> non-negative (traced rank); reshape target from traced shapes."""
    rank = len(m.inputs[0].shape)
    for key in _AXES.get(m.op, ()):
        v = m.attrs[key]
        m.attrs[key] = [d % rank for d in v] if isinstance(v, list) else v % rank
    if m.op == "reshape":
        m.attrs["shape"] = _reshape_code(m.inputs[0].shape, out_shape)


def _reshape_code(in_shape: tuple, out_shape: tuple) -> list[int]:
    """Engine reshape target from traced shapes: the prefix of dims equal to the input's becomes 0
    (copy), the last other dim -1 (inferred), so x.view(x.size(0), -1) -> [0, -1] works for any
    batch and spatial size. When even the batch dim is not copied, it was merged into dim 0, so
    dim 0 is the inferred one: x.view(-1, 4) -> [-1, 4]."""
    code = [int(s) for s in out_shape]
    k = 0
    while k < min(len(in_shape), len(out_shape)) and in_shape[k] == out_shape[k]:
        code[k] = 0
        k += 1
    if k < len(code):
        code[0 if k == 0 else -1] = -1
    return code


# --- tracing and recording ---------------------------------------------------------------------

class _TraceFailure(Exception):
    def __init__(self, path: str, error: Exception):
        super().__init__(path, error)
        self.path, self.error = path, error


class _Tracer(fx.Tracer):
    """fx tracer: registered types and standard torch.nn layers are leaves; remembers the module
    in which tracing fails."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _exporter_for(type(m)) is not None or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except _TraceFailure:
            raise
        except Exception as e:
            raise _TraceFailure(path, e) from e


def trace(model: nn.Module) -> fx.GraphModule:
    """Trace `model` with our leaf rules; failures (data-dependent control flow...) -> UnsupportedOpError."""
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as e:
        path, err = (e.path, e.error) if isinstance(e, _TraceFailure) else ("", e)
        raise UnsupportedOpError(f"{type(model).__name__}: torch.fx cannot trace module "
                                 f"'{path or '<root>'}': {type(err).__name__}: {err}") from e
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


_SHAPE_QUERIES = {"size", "dim", "shape", "ndim"}
_SHAPE_ARITH = {operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv,
                operator.truediv, operator.neg}


def _is_shape_query(n: fx.Node) -> bool:
    """x.size(), x.dim(), x.shape, x.ndim: read a tensor's shape, not its values."""
    return ((n.op == "call_method" and n.target in _SHAPE_QUERIES) or
            (n.op == "call_function" and n.target is getattr and n.args[1] in _SHAPE_QUERIES))


class _Recorder(fx.Interpreter):
    """Runs the traced module once, keeping every node's value (tensors as float32 copies).

    Refuses graphs where an in-place op changes a tensor that a later node still reads: the
    exported graph is functional, so it would compute something else than PyTorch did.
    """

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.extra_traceback = False     # our errors already name the node
        self.values: dict[fx.Node, Any] = {}
        self._versions: dict[fx.Node, int] = {}

    def run_node(self, n: fx.Node):
        if not _is_shape_query(n):
            for a in n.all_input_nodes:
                if a in self._versions and self.env[a]._version != self._versions[a]:
                    raise UnsupportedOpError(
                        f"'{a.name}' is modified in place before node '{n.name}' reads it "
                        f"({_where(n)}); use the out-of-place op, not inplace=True or a method ending in _")
        out = super().run_node(n)
        if isinstance(out, torch.Tensor) and n.op != "get_attr":
            self._versions[n] = out._version
            self.values[n] = _np(out)
        else:
            self.values[n] = out      # parameters (get_attr) and shape values, as they are
        return out


def _where(n: fx.Node) -> str:
    """Human location of an fx node: its module path (enclosing module for functional calls)."""
    stack = n.meta.get("nn_module_stack") or {}
    path = n.target if n.op == "call_module" else (next(reversed(stack.values()))[0] if stack else "")
    return f"node '{n.name}' in module '{path or '<root>'}'"


def _describe(n: fx.Node, gm: fx.GraphModule) -> str:
    if n.op == "call_module":
        t = type(gm.get_submodule(n.target))
        return f"module type {t.__module__}.{t.__qualname__}"
    if n.op == "call_method":
        return f"method Tensor.{n.target}"
    t = n.target
    module = (getattr(t, "__module__", None) or "builtins").lstrip("_")    # _operator -> operator
    return f"function {module}.{getattr(t, '__name__', t)}"


# --- graph building ----------------------------------------------------------------------------

def _map_node(n: fx.Node, gm: fx.GraphModule, env: dict) -> _Mapped:
    """Map one call node to op/attrs/inputs/weights with the tables; errors name op and place."""
    args = fx.node.map_arg(n.args, env.__getitem__)
    kwargs = fx.node.map_arg(n.kwargs, env.__getitem__)
    try:
        if n.op == "call_module":
            exporter = _exporter_for(type(gm.get_submodule(n.target)))
            if exporter is None:
                raise UnsupportedOpError("no exporter registered")
            op, attrs, weights = exporter(gm.get_submodule(n.target))
            flat = [a for a in (*args, *kwargs.values()) if isinstance(a, (_T, _Param))]
            weights = {k: np.asarray(v, np.float32) for k, v in weights.items()}
            return _Mapped(op, dict(attrs), flat, weights)
        handler = FUNCTIONS.get(n.target)
        if handler is None:
            raise UnsupportedOpError("not in the export table")
        try:
            return handler(*args, **kwargs)
        except TypeError as e:     # handlers mirror torch's signatures: these are odd arguments
            raise UnsupportedOpError(f"unsupported arguments ({e})") from None
    except UnsupportedOpError as e:
        raise UnsupportedOpError(f"{_describe(n, gm)} at {_where(n)}: {e}") from None


def _build(gm: fx.GraphModule, values: dict):
    """fx graph + values of the first run -> (Graph, fx node of every graph tensor)."""
    env: dict[fx.Node, Any] = {}     # fx node -> _T / _Param / concrete non-tensor value
    shape_nodes: set[fx.Node] = set()
    inputs, nodes, sources = [], [], {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            v = values[n]
            env[n] = _T(n.name, v.shape)
            inputs.append(TensorSpec(n.name, [None, *v.shape[1:]]))
            sources[n.name] = n
        elif n.op == "get_attr":
            env[n] = _Param(n.target, values[n])
        elif n.op == "output":
            outputs, kind = _outputs(n, env, nodes, sources, {s.name for s in inputs})
        else:
            v = values[n]
            if n.op != "call_module" and not isinstance(v, np.ndarray):
                if _is_shape_query(n) or (n.target in _SHAPE_ARITH and n.all_input_nodes and
                                          all(a in shape_nodes for a in n.all_input_nodes)):
                    shape_nodes.add(n)
                    env[n] = v
                    continue
            m = _map_node(n, gm, env)
            if not isinstance(v, np.ndarray) or v.ndim == 0:
                raise UnsupportedOpError(f"{_describe(n, gm)} at {_where(n)}: produces "
                                         f"{type(v).__name__}, not a tensor with a batch dim")
            _normalize(m, v.shape)
            module = n.target if n.op == "call_module" else ""
            nodes.append(Node(n.name, m.op, [x.name for x in m.inputs], m.attrs, m.weights,
                              module, [None, *v.shape[1:]]))
            env[n] = _T(n.name, v.shape)
            sources[n.name] = n
    return Graph(inputs, outputs, kind, nodes), sources


def _outputs(n: fx.Node, env: dict, nodes: list, sources: dict, input_names: set):
    """Graph outputs from fx's output node; an output that is a graph input or repeats another
    output gets its own identity node, so every output is a distinct node."""
    result = n.args[0]
    if isinstance(result, fx.Node):
        kind, items = "tensor", [("output", result)]
    elif isinstance(result, (tuple, list)):
        kind, items = "tuple", [(f"output_{i}", r) for i, r in enumerate(result)]
    elif isinstance(result, dict):
        kind, items = "dict", list(result.items())
    else:
        raise UnsupportedOpError(f"forward returns {type(result).__name__}; "
                                 "expected a tensor, a tuple/list or a dict of tensors")
    used = input_names | {x.name for x in nodes}
    outputs, taken = [], set()
    for name, r in items:
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise UnsupportedOpError(f"output key {name!r} must be a string matching {NAME_RE.pattern}")
        t = env.get(r) if isinstance(r, fx.Node) else None
        if not isinstance(t, _T):
            raise UnsupportedOpError(f"output '{name}' is {r!r}, not a tensor computed by the graph")
        node = t.name
        if node in input_names or node in taken:
            node = _fresh(name, used)
            nodes.append(Node(node, "identity", [t.name], {}, {}, "", [None, *t.shape[1:]]))
            sources[node] = sources[t.name]
        taken.add(node)
        outputs.append((name, node))
    return outputs, kind


def _fresh(base: str, used: set) -> str:
    name, i = base, 0
    while name in used:
        i += 1
        name = f"{base}_{i}"
    used.add(name)
    return name


def _as_tuple(x, what: str) -> tuple:
    xs = x if isinstance(x, (tuple, list)) else (x,)
    if not xs or not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in xs):
        raise InputError(f"{what}: expected a floating-point tensor or a tuple of them, got {x!r}")
    return tuple(t.detach().clone() for t in xs)


@contextlib.contextmanager
def eval_mode(model):
    """Every submodule in eval mode inside, each one's own training flag restored after."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags.items():
            m.training = flag


def export(model: nn.Module, example_input, path, *, reference_inputs=None, n_random: int = 2,
           store: str = "all", seed: int = 0):
    """Trace `model`, map it to the engine's ops and write it, with PyTorch reference activations,
    to `path`. References: example input, then reference_inputs, then n_random seeded randn inputs
    shaped like the example. store="outputs" keeps only the graph outputs' activations."""
    if store not in ("all", "outputs"):
        raise InputError(f"store must be 'all' or 'outputs', got {store!r}")
    example = _as_tuple(example_input, "example_input")
    gen = torch.Generator().manual_seed(seed)
    runs = [example] + [_as_tuple(x, f"reference_inputs[{i}]")
                        for i, x in enumerate(reference_inputs or [])]
    runs += [tuple(torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in example)
             for _ in range(n_random)]

    with eval_mode(model):
        gm = trace(model)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for i, xs in enumerate(runs):
            if len(xs) != len(placeholders):
                raise InputError(f"reference input {i}: {len(xs)} tensors for {len(placeholders)} "
                                 f"model inputs ({', '.join(p.name for p in placeholders)})")
        recorded = []
        with torch.no_grad():
            for i, xs in enumerate(runs):
                recorded.append(_Recorder(gm))
                try:
                    recorded[-1].run(*(x.clone() for x in xs))
                except RuntimeError as e:  # the model itself refuses this input
                    raise InputError(f"reference input {i} {[tuple(x.shape) for x in xs]}: the model "
                                     f"fails on it: {e}") from None
                if len(recorded) == 1:     # map the graph once, before the other runs
                    graph, sources = _build(gm, recorded[0].values)

    graph.meta = {"producer": f"basisconv-converters {__version__}",
                  "torch_version": str(torch.__version__), "model_class": type(model).__name__}
    keep = [n.name for n in graph.nodes] if store == "all" else [node for _, node in graph.outputs]
    refs = References(
        runs=[Reference({s.name: _np(x) for s, x in zip(graph.inputs, xs)},
                        {k: rec.values[sources[k]] for k in keep})
              for rec, xs in zip(recorded, runs)],
        stored=store, source="pytorch", source_version=str(torch.__version__))
    save(path, graph, refs)
    return path

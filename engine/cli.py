"""`basisconv`: the one command-line entry point.

Commands that need torch (convert) or matplotlib (plots) import them lazily and say what to
install when they are missing. Exit status: 0 success, 1 failure (including a verify mismatch),
2 bad usage.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from .errors import EngineError

INSTALL_HINT = {
    "torch": "pip install torch==2.13.0 'basisconv[torch]'  (the pinned torch is the CPU build)",
    "matplotlib": "pip install 'basisconv[plot]'",
    "tqdm": "pip install 'basisconv[torch]'",
}


class MissingDependency(Exception):
    pass


def need(module: str):
    """Import an optional dependency or fail with what to install."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        raise MissingDependency(f"this command needs {top}: {INSTALL_HINT.get(top, 'pip install ' + top)}") from None


def shape_arg(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,3,32,32, got {text!r}")
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return dims


# --- commands ---------------------------------------------------------------------------------

def cmd_convert(a) -> int:
    need("torch")
    from converters.loading import load_factory
    from converters.torch_export import export
    model = load_factory(a.model, a.state_dict)
    import torch
    example = torch.randn(*a.input_shape, generator=torch.Generator().manual_seed(a.seed))
    export(model, example, a.output, n_random=a.n_random, store=a.store)
    print(f"wrote {a.output}")
    return 0


def cmd_run(a) -> int:
    from . import load
    model = load(a.model)
    x = np.load(a.input, allow_pickle=False)
    y = model(x)
    outs = y if isinstance(y, dict) else dict(zip((o for o, _ in model.graph.outputs),
                                                   y if isinstance(y, tuple) else (y,)))
    for k, v in outs.items():
        print(f"{k}: shape {v.shape}, mean {v.mean():.6g}, max {v.max():.6g}")
    if a.output:
        np.savez(a.output, **outs)
        print(f"wrote {a.output}")
    return 0


def cmd_verify(a) -> int:
    from . import load
    report = load(a.model).verify(rtol=a.rtol)
    if a.json:
        print(json.dumps({"ok": report.ok, "rtol": report.rtol, "source": report.source,
                          "rows": [r.__dict__ for r in report.rows]}))
    else:
        if a.verbose:
            for r in report.rows:
                print(f"{'ok ' if r.ok else 'BAD'} run {r.run} {r.name:<32} {r.op:<20} max_abs {r.max_abs:.2e} rel {r.rel:.2e}")
        print(report.summary())
    return 0 if report.ok else 1


def cmd_inspect(a) -> int:
    from . import load
    model = load(a.model)
    g = model.graph
    print(f"{a.model}: {len(g.nodes)} nodes, model class {g.meta.get('model_class') or '?'}, "
          f"made by {g.meta.get('producer') or '?'} (torch {g.meta.get('torch_version') or '-'})")
    print("inputs:  " + ", ".join(f"{t.name} {_shape(t.shape)}" for t in g.inputs))
    print("outputs: " + ", ".join(f"{o} <- {n}" for o, n in g.outputs) + f" ({g.output_kind})")
    refs = model.references
    print(f"references: {len(refs.runs)} input(s), {refs.stored} nodes, from {refs.source} {refs.source_version}")
    total = 0
    print(f"{'node':<28} {'op':<20} {'module':<28} {'output (batch 1)':<22} {'params':>10}")
    for n in g.nodes:
        p = sum(w.size for w in n.weights.values())
        total += p
        print(f"{n.name:<28} {n.op:<20} {n.module:<28} {str(model.plan.shapes[n.name]):<22} {p:>10,}")
    print(f"total params {total:,}; plan: {len(model.plan.steps)} steps after fusion")
    return 0


def cmd_count(a) -> int:
    from . import load
    report = load(a.model).count(a.input_shape)
    if a.json:
        print(json.dumps(report.to_dict()))
        return 0
    cols = ("macs", "other_ops", "params", "learnable_params", "activation_bytes")
    print(f"input {report.input_shape}")
    print(f"{'node':<28} {'op':<20} " + " ".join(f"{c:>16}" for c in cols))
    for r in report.nodes:
        print(f"{r.name:<28} {r.op:<20} " + " ".join(f"{getattr(r, c):>16,}" for c in cols))
    print(f"{'total':<49} " + " ".join(f"{report.total[c]:>16,}" for c in cols))
    print(f"FLOPs (2 x MACs) {report.total['flops']:,}; peak activation memory "
          f"{report.total['peak_activation_bytes']:,} bytes")
    return 0


def _shape(shape) -> str:
    return "(" + ", ".join("B" if s is None else str(s) for s in shape) + ")"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="basisconv", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="PyTorch model -> HDF5 model file (needs torch)")
    c.add_argument("model", help="FILE.py:FACTORY or package.module:FACTORY; the factory returns an nn.Module")
    c.add_argument("--input-shape", type=shape_arg, required=True, help="e.g. 1,3,32,32")
    c.add_argument("--state-dict", help="weights to load (torch.load(weights_only=True))")
    c.add_argument("-o", "--output", required=True)
    c.add_argument("--n-random", type=int, default=2, help="random reference inputs besides the example")
    c.add_argument("--store", choices=("all", "outputs"), default="all",
                   help="store every node's reference activation, or only the outputs")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=cmd_convert)

    r = sub.add_parser("run", help="run a model on an input array")
    r.add_argument("model")
    r.add_argument("--input", required=True, help=".npy file")
    r.add_argument("--output", help=".npz file for the outputs")
    r.set_defaults(func=cmd_run)

    v = sub.add_parser("verify", help="check every node against the file's stored references")
    v.add_argument("model")
    v.add_argument("--rtol", type=float, default=1e-5, help="tolerance relative to max |reference|")
    v.add_argument("-v", "--verbose", action="store_true", help="one line per node")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_verify)

    i = sub.add_parser("inspect", help="graph summary: nodes, shapes, params")
    i.add_argument("model")
    i.set_defaults(func=cmd_inspect)

    k = sub.add_parser("count", help="MACs, params and bytes per node")
    k.add_argument("model")
    k.add_argument("--input-shape", type=shape_arg, help="default: the stored reference input at batch 1")
    k.add_argument("--json", action="store_true")
    k.set_defaults(func=cmd_count)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (EngineError, MissingDependency) as e:
        print(f"basisconv {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except FileNotFoundError as e:
        print(f"basisconv {args.command}: file not found: {e.filename or e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

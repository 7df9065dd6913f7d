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

from .errors import EngineError, InputError

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
    from .dataset import named_outputs, run_dataset
    from .errors import InputError
    if a.output and a.output.endswith((".h5", ".hdf5")):      # streamed, resumable, maybe on Dask
        try:
            if a.scheduler:
                with need("distributed").Client(a.scheduler) as client:
                    run_dataset(a.model, a.input, a.output, batch_size=a.batch_size, client=client)
            else:
                run_dataset(a.model, a.input, a.output, batch_size=a.batch_size)
        except KeyboardInterrupt:
            print(f"\ninterrupted: the rows done are kept in {a.output}; run the same command again "
                  "to resume", file=sys.stderr)
            return 130
        print(f"wrote {a.output}")
        return 0
    if a.scheduler or not a.input.endswith(".npy"):
        raise InputError("an HDF5 input or --scheduler needs an .h5 --output (the streamed run)")
    if a.output and not a.output.endswith(".npz"):
        raise InputError(f"--output {a.output}: a whole-array run writes .npz (or give an .h5 output to stream)")
    model = load(a.model)
    try:
        x = np.load(a.input, allow_pickle=False)
    except ValueError as e:  # not an .npy array, or one holding Python objects
        raise InputError(f"--input {a.input}: not a readable .npy array ({e})") from None
    outs = named_outputs(model, model(x))
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
        finite = lambda v: v if not isinstance(v, float) or np.isfinite(v) else str(v)  # noqa: E731
        print(json.dumps({"ok": report.ok, "rtol": report.rtol, "source": report.source,
                          "rows": [{k: finite(v) for k, v in r.__dict__.items()} for r in report.rows]}))
    else:
        if a.verbose:
            for r in report.rows:
                print(f"{'ok ' if r.ok else 'BAD'} run {r.run} {r.name:<32} {r.op:<20} max_abs {r.max_abs:.2e} rel {r.rel:.2e}")
        print(report.summary())
    return 0 if report.ok else 1


def cmd_inspect(a) -> int:
    from . import load
    from .model import format_shape
    model = load(a.model)
    g = model.graph
    print(f"{a.model}: {len(g.nodes)} nodes, model class {g.meta.get('model_class') or '?'}, "
          f"made by {g.meta.get('producer') or '?'} (torch {g.meta.get('torch_version') or '-'})")
    print("inputs:  " + ", ".join(f"{t.name} {format_shape(t.shape)}" for t in g.inputs))
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
    if a.spectrum:
        from .spectrum import layer_spectra, plot_spectra, spectrum_table
        spectra = layer_spectra(g)
        print("\nspectrum (M keeping 90/95/99 % of each layer's filter energy; basis nodes: of combine @ basis)")
        print(spectrum_table(spectra))
        plot_spectra(spectra, a.spectrum, title=f"{a.model}: cumulative energy vs M (x = break-even M)")
        print(f"wrote {a.spectrum}")
    return 0


def cmd_compress(a) -> int:
    if a.tt:
        return _compress_tt(a)
    if a.max_rank is not None or a.eps is not None:
        print("basisconv compress: --max-rank and --eps go with --tt", file=sys.stderr)
        return 2
    from converters.basis import compress_file  # NumPy only: works without torch
    try:
        report = compress_file(a.model, a.output, energy=a.energy, rank=a.rank, mac_budget=a.mac_budget,
                               force=a.force)
    except ValueError as e:
        print(f"basisconv compress: {e}", file=sys.stderr)
        return 2
    print(report)
    print(f"wrote {a.output} (references recomputed by the engine's reference kernels)")
    return 0


def _compress_tt(a) -> int:
    from converters.tt import compress_file_tt, report_table  # NumPy only: works without torch
    if a.max_rank is None and a.eps is None:
        print("basisconv compress: --tt needs --max-rank and/or --eps", file=sys.stderr)
        return 2
    try:
        reports = compress_file_tt(a.model, a.output, max_rank=a.max_rank, eps=a.eps)
    except ValueError as e:
        print(f"basisconv compress: {e}", file=sys.stderr)
        return 2
    print(report_table(reports))
    print(f"wrote {a.output} (references recomputed by the engine's reference kernels)")
    return 0


def cmd_count(a) -> int:
    from . import load
    from .count import format_table, plot_macs, to_csv
    shape = a.input_shape and (a.input_shape[0] if len(a.input_shape) == 1 else a.input_shape)
    report = load(a.model).count(shape, executed=a.executed)
    dense = None
    if a.against:
        dense = load(a.against).count([tuple(s) for s in report.input_shape.values()])
    if a.json:
        print(json.dumps(report.to_dict(dense)))
    elif a.csv:
        print(to_csv(report, dense), end="")
    else:
        print(format_table(report, dense))
    if a.plot:
        plot_macs(report, a.plot, dense, title=f"MACs per layer: {a.model}"
                  + (f" vs {a.against}" if a.against else ""))
        print(f"wrote {a.plot}", file=sys.stderr)
    return 1 if report.mismatches else 0


def cmd_bench(a) -> int:
    """The engine's speed on this model file at --batch, alone or against ONNX Runtime (--onnx,
    or the --torch model exported) and PyTorch eager (--torch), interleaved on the same inputs
    with as many threads each; --against: the engine on another file of the same inputs (the
    dense original of a compressed model), timed alternately: how much of the MAC reduction
    becomes time saved."""
    import statistics
    import time

    import numba

    from . import load
    from .count import reference_input_shapes
    from .model import mac_reduction
    from .timing import interleaved, round_medians
    if a.threads:
        numba.set_num_threads(a.threads)
    threads = numba.get_num_threads()
    model = load(a.model)
    shapes = ([tuple(s) for s in a.input_shape] if a.input_shape
              else list(reference_input_shapes(model, a.batch).values()))
    rng = np.random.default_rng(0)
    xs = tuple(rng.standard_normal(s, dtype=np.float32) for s in shapes)
    x = xs[0] if len(xs) == 1 else xs
    in_shapes = shapes[0] if len(shapes) == 1 else shapes
    macs = model.count(in_shapes).total["macs"]
    t0 = time.perf_counter()
    want = _outputs(model(x))
    first = time.perf_counter() - t0
    fns = {("model", "engine"): lambda: model(x)}
    errs = {}
    for name, (fn, got) in _peers(a, xs, threads).items():
        fns["model", name] = fn
        errs[name] = _max_error(got, want, name)
    other = None
    if a.against:
        other = load(a.against)
        try:
            other(x)
        except InputError as e:
            raise InputError(f"--against {a.against} does not take {a.model}'s inputs: {e}") \
                from None
        fns["against", "engine"] = lambda: other(x)
    for f in fns.values():
        for _ in range(a.warmup):
            f()
    per_call = {}
    for key, f in fns.items():
        t = time.perf_counter()
        f()
        per_call[key] = time.perf_counter() - t
    rounds = a.rounds if len(fns) > 1 else 1
    calls = max(-(-a.min_runs // rounds), int(a.seconds / rounds / sum(per_call.values())))
    times = interleaved(fns, calls, rounds, pause=0.25 if len(fns) > 1 else 0.0)
    B = shapes[0][0]
    engine_rounds = round_medians(times["model", "engine"], calls)

    def per_round(ts):      # ts's time / the engine's, each round's medians: sorted
        return sorted(t / e for t, e in zip(round_medians(ts, calls), engine_rounds))
    runtimes = {}
    for name in [runtime for m, runtime in fns if m == "model"]:
        ts = times["model", name]
        med = statistics.median(ts)
        runtimes[name] = {"median_ms": med * 1e3, "min_ms": min(ts) * 1e3, "images_per_s": B / med,
                          "gflops": 2 * macs / med / 1e9, "runs": len(ts)}
        if name != "engine":   # its time / the engine's, per round (> 1: the engine is faster)
            ratios = per_round(ts)
            runtimes[name].update(engine_speedup=statistics.median(ratios),
                                  engine_speedup_rounds=[ratios[0], ratios[-1]],
                                  max_error_vs_engine=errs[name])
    result = {"model": a.model, "input_shapes": shapes, "threads": threads, "first_call_s": first,
              "macs": macs, "rounds": rounds, "calls_per_round": calls, **runtimes.pop("engine"),
              "peers": runtimes}
    if other is not None:   # its time / this model's, per round: this model's speedup
        ts = times["against", "engine"]
        ratios = per_round(ts)
        other_macs = other.count(in_shapes).total["macs"]
        speedup = statistics.median(ratios)
        result["against"] = {"model": a.against, "macs": other_macs,
                             "median_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3,
                             "speedup": speedup, "speedup_rounds": [ratios[0], ratios[-1]],
                             **mac_reduction(speedup, macs, other_macs)}
    if a.layers:
        result["layers"] = model.profile(x, max(a.min_runs, rounds * calls), against=other,
                                         rounds=rounds)
    for name, r in runtimes.items():
        if r["max_error_vs_engine"] > 1e-3:
            print(f"warning: {name}'s outputs differ from the engine's by "
                  f"{r['max_error_vs_engine']:.1e} of their largest value: not the same model?",
                  file=sys.stderr)
    if a.json:
        print(json.dumps(result))
        return 0
    print(f"{a.model}: input {', '.join(map(str, shapes))}, {threads} threads, {macs:,} MACs per "
          f"call; first call {first * 1e3:.1f} ms (includes loading compiled kernels)")
    print(f"{'runtime':12s} {'median ms':>10s} {'min ms':>9s} {'images/s':>10s} {'GFLOP/s':>8s}"
          + ("   engine speed vs it (rounds)   max error vs engine" if runtimes else ""))
    for name, r in [("engine", result)] + list(runtimes.items()):
        line = (f"{name:12s} {r['median_ms']:10.3f} {r['min_ms']:9.3f} {r['images_per_s']:10,.1f} "
                f"{r['gflops']:8.1f}")
        if name != "engine":
            lo, hi = r["engine_speedup_rounds"]
            line += (f"   {r['engine_speedup']:5.2f}x ({lo:.2f}-{hi:.2f}){'':11s}"
                     f"{r['max_error_vs_engine']:.1e}")
        print(line)
    if not runtimes:
        print("engine only: --onnx FILE.onnx adds ONNX Runtime, --torch FILE.py:FACTORY PyTorch "
              "(and ONNX Runtime on its export)")
    if other is not None:
        r = result["against"]
        lo, hi = r["speedup_rounds"]
        print(f"against {a.against}: {r['median_ms']:.3f} ms median, {r['macs']:,} MACs per call; "
              f"this model {r['speedup']:.2f}x as fast (rounds {lo:.2f}-{hi:.2f})"
              + ("" if r["mac_reduction"] is None else
                 f", with {r['mac_reduction']:.2f}x fewer MACs: {r['of_mac_reduction']:.2f} of the "
                 f"MAC reduction turned into time"))
    if a.layers:
        print(f"\nper plan step (median of {result['layers'][0]['calls']} calls; nodes: the file's, "
              f"fused into the step" + ("; against: the other model's steps running the same "
                                        "nodes, the speedup and MAC reduction vs them):"
                                        if other is not None else "):"))
        print(f"{'step':>4s} {'op':19s} {'output':20s} {'ms':>8s} {'share':>6s} {'MACs':>13s} "
              f"{'GFLOP/s':>8s}" + (f" {'against':>8s} {'speedup':>8s} {'MACs/':>6s} {'of it':>5s}"
                                    if other is not None else "") + "  nodes")
        for r in result["layers"]:
            line = (f"{r['step']:4d} {r['op']:19s} {str(tuple(r['output_shape'])):20s} "
                    f"{r['median_ms']:8.3f} {r['share']:6.1%} {r['macs']:13,d} {r['gflops']:8.1f}")
            if other is not None:       # '-' where the dense steps run other nodes too, or
                v = r["against"] or {}  # there are no MACs to reduce
                line += "".join(" " + (f.format(v[k]) if v.get(k) is not None
                                       else "-".rjust(len(f.format(0))))
                                for k, f in AGAINST_COLUMNS)
            print(line + f"  {', '.join(r['nodes'])}")
    return 0


# bench --against --layers: the dense steps' columns (Model.profile's "against")
AGAINST_COLUMNS = (("median_ms", "{:8.3f}"), ("speedup", "{:7.2f}x"), ("mac_reduction", "{:5.2f}x"),
                   ("of_mac_reduction", "{:5.2f}"))


def _outputs(y) -> list[np.ndarray]:
    """A model's output(s) (an array or tensor, or a tuple, list or dict of them) as a list of
    arrays, in order."""
    if isinstance(y, dict):
        y = list(y.values())
    return [np.asarray(v) for v in (y if isinstance(y, (tuple, list)) else (y,))]


def _max_error(got: list, want: list, name: str) -> float:
    """max |got - want| / max |want| over the outputs (want: the engine's)."""
    if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want)):
        raise InputError(f"{name}'s outputs {[g.shape for g in got]} do not match the model "
                         f"file's {[w.shape for w in want]}: not the same model?")
    scale = max(float(np.abs(w).max()) for w in want) or 1.0
    return max(float(np.abs(g - w).max()) for g, w in zip(got, want)) / scale


def _peers(a, xs: tuple, threads: int) -> dict:
    """{runtime: (call, its outputs on xs)}: ONNX Runtime on --onnx, or on the --torch model's
    export when onnxruntime is installed, and PyTorch eager on --torch; `threads` threads each."""
    import importlib.util
    import tempfile
    peers = {}
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = a.onnx
        if a.torch:
            torch = need("torch")
            from converters.loading import load_factory
            torch.set_num_threads(threads)
            net = load_factory(a.torch, a.state_dict).eval()
            xt = tuple(torch.from_numpy(x) for x in xs)

            def torch_call():
                with torch.no_grad():
                    return net(*xt)
            peers["pytorch"] = (torch_call, _outputs(torch_call()))
            if onnx_path is None and importlib.util.find_spec("onnxruntime"):
                import warnings
                onnx_path = f"{tmp}/model.onnx"
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")    # the exporter's notes on its own choices
                    torch.onnx.export(net, xt, onnx_path, dynamo=False)
        if onnx_path is not None:
            ort = need("onnxruntime")
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            try:                 # (the session keeps the model: the export may go after)
                session = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
            except Exception as e:   # ORT's own types: a file it cannot read, or run on CPU
                raise InputError(f"ONNX Runtime cannot load {onnx_path}: {e}") from None
            names = [i.name for i in session.get_inputs()]
            if len(names) != len(xs):
                raise InputError(f"the ONNX model takes {len(names)} input(s), the model file "
                                 f"{len(xs)}")
            feed = dict(zip(names, xs))
            try:
                got = _outputs(session.run(None, feed))
            except Exception as e:
                raise InputError(f"ONNX Runtime cannot run {onnx_path} on inputs "
                                 f"{[x.shape for x in xs]}: {e}") from None
            peers = {"onnxruntime": (lambda: session.run(None, feed), got), **peers}
    return peers


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

    r = sub.add_parser("run", help="run a model on an input array, or stream a dataset into an .h5 file")
    r.add_argument("model")
    r.add_argument("--input", required=True, help=".npy file, or FILE.h5:/DATASET (needs an .h5 --output)")
    r.add_argument("--output", help=".npz: whole array at once; .h5: streamed in batches, resumable")
    r.add_argument("--batch-size", type=int, default=64, metavar="N", help="rows per batch of a streamed run")
    r.add_argument("--scheduler", metavar="ADDRESS", help="dask.distributed scheduler: workers compute the "
                   "streamed run (they need the model and input at the same paths)")
    r.set_defaults(func=cmd_run)

    v = sub.add_parser("verify", help="check every node against the file's stored references")
    v.add_argument("model")
    v.add_argument("--rtol", type=float, default=1e-5, help="tolerance relative to max |reference|")
    v.add_argument("-v", "--verbose", action="store_true", help="one line per node")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_verify)

    i = sub.add_parser("inspect", help="graph summary: nodes, shapes, params")
    i.add_argument("model")
    i.add_argument("--spectrum", metavar="PNG", help="plot each conv/linear layer's cumulative "
                   "singular-value energy vs M, break-even M marked (needs matplotlib)")
    i.set_defaults(func=cmd_inspect)

    b = sub.add_parser("compress", help="dense model file -> BasisConv or tensor-train model file "
                       "(NumPy; no torch)")
    b.add_argument("model")
    how = b.add_mutually_exclusive_group(required=True)
    how.add_argument("--energy", type=float, help="keep this fraction of each layer's energy, e.g. 0.95")
    how.add_argument("--rank", type=int, help="M basis filters per group in every layer")
    how.add_argument("--mac-budget", type=float, help="fraction of the dense conv/linear MACs")
    how.add_argument("--tt", action="store_true", help="tensor-train instead: TT-conv / TT-FC by "
                     "TT-SVD, every layer where it saves parameters (--max-rank and/or --eps)")
    tt = b.add_argument_group("tensor-train (with --tt)")
    tt.add_argument("--max-rank", type=int, help="cap on every TT rank")
    tt.add_argument("--eps", type=float, help="relative Frobenius error bound per layer, e.g. 0.3")
    b.add_argument("--force", action="store_true",
                   help="decompose layers even where the basis form costs more MACs than dense")
    b.add_argument("-o", "--output", required=True)
    b.set_defaults(func=cmd_compress)

    k = sub.add_parser("count", help="MACs, other ops, params (stored / learnable) and bytes per "
                       "node (docs/COUNTING.md)")
    k.add_argument("model")
    k.add_argument("--input-shape", type=shape_arg, action="append",
                   help="default: the stored reference input at batch 1 (once per input)")
    k.add_argument("--against", metavar="DENSE_MODEL",
                   help="reduction factors against this model, per node (matched by name) and total")
    out = k.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="one JSON object on stdout")
    out.add_argument("--csv", action="store_true", help="one CSV row per node on stdout")
    k.add_argument("--plot", metavar="PNG", help="bar chart of MACs per layer, vs --against's "
                   "(needs matplotlib)")
    k.add_argument("--executed", action="store_true", help="also run the counting kernels and show "
                   "what they execute; exit 1 if any node differs from its analytic count")
    k.set_defaults(func=cmd_count)

    e = sub.add_parser("bench", help="the engine's latency / throughput on a model file, alone or "
                       "against ONNX Runtime and PyTorch on the same inputs")
    e.add_argument("model")
    e.add_argument("--batch", type=int, default=1, metavar="N", help="batch size (default 1)")
    e.add_argument("--input-shape", type=shape_arg, action="append",
                   help="full input shape instead of --batch (once per input)")
    e.add_argument("--seconds", type=float, default=3.0, help="time budget of the timed runs")
    e.add_argument("--min-runs", type=int, default=10)
    e.add_argument("--warmup", type=int, default=3)
    e.add_argument("--threads", type=int, help="threads of every runtime (default: all cores)")
    e.add_argument("--onnx", metavar="FILE.onnx", help="also time ONNX Runtime on this export of "
                   "the model (needs onnxruntime)")
    e.add_argument("--torch", metavar="FILE.py:FACTORY", help="also time PyTorch eager on this "
                   "model (as convert loads it), and ONNX Runtime on its export unless --onnx "
                   "(needs torch; onnx and onnxruntime for the export)")
    e.add_argument("--state-dict", help="--torch's weights (torch.load(weights_only=True))")
    e.add_argument("--rounds", type=int, default=7, help="with peers: rounds of interleaved calls "
                   "(the engine's speed vs each is the median of the rounds' ratios)")
    e.add_argument("--against", metavar="DENSE_MODEL", help="also time the engine on this model "
                   "(the same inputs; alternating with MODEL): MODEL's speedup against it and the "
                   "share of the MAC reduction it turns into time; with --layers per step too "
                   "(matched by node name)")
    e.add_argument("--layers", action="store_true", help="also time each plan step (a conv with "
                   "its fused BN, add and activation, ...): where the time goes, layer by layer")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_bench)
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
    except OSError as e:  # a directory, no permission, disk full
        print(f"basisconv {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

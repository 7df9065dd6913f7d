"""Speed: the engine vs PyTorch eager vs ONNX Runtime, same models, same inputs, one process.

    .venv/bin/python bench/speed.py                      # all models, batch 1 and 16, print
    .venv/bin/python bench/speed.py --write              # ... and the "## Speed" section of bench/RESULTS.md
    .venv/bin/python bench/speed.py --models vgg16-basis --batches 1 --rounds 3
    .venv/bin/python bench/speed.py --cold-start-only --write

Models (bench/models.py, full widths, 3x32x32 inputs, seeded random weights): VGG-16 (BN
folded by the engine at load and by ORT's optimizer; PyTorch runs it unfused) and ResNet-18,
dense; the same nets with every conv but the first as a BasisConv of M = N // 5 (converters
to_basis, SVD basis + 1x1 combine, ~4.3x fewer MACs); VGG-16 with every conv but the first as
a TT conv (to_tt, ranks <= 16). ONNX Runtime runs the torch model of each (the BasisConv model
exports as basis conv + 1x1 conv, the same compressed graph), exported with torch.onnx.export.

Every runtime gets 2 threads (torch.set_num_threads(2), ORT intra_op_num_threads=2, Numba's 2).
Timing: per (net, batch), R rounds; each round runs every runtime in turn (order rotated), each
runtime the net's variants (dense, BasisConv, TT) back to back (order rotated), each for warm-up
calls (50 ms at least, engine/timing.py) then N timed calls, with a pause between runtimes so that
spinning thread pools (ORT, OpenMP, OpenBLAS) go idle; reported: the median over all timed calls
(and the min), and ratios (engine vs ORT, compressed vs dense) per round, whose phases of the
machine cancel. Before and after each round, bench/placement.py times a cache line's transfer
between the two CPUs: the host puts this machine's two vCPUs now on one L3, now on two (35-40
against 160-180 ns, for seconds to minutes), and on two every line one thread wrote and the
other reads costs more, the compressed nets 1.1-1.5x as long where the dense ones take
1.02-1.1x (bench/RESULTS.md). The targets table gives each ratio over all rounds, over the
rounds spent near and far, and from the fastest calls.
Before and after the runs: SGEMM GFLOP/s of np.dot on 2048x2048 float32 (NumPy's BLAS, 2 threads); each
result is also given as effective GFLOP/s (2 x the engine-counted MACs x batch / time) and as a
fraction of that SGEMM rate. At batch 1 also a sporadic caller's latency: engine and ORT calls
alternated, each after IDLE_GAP s of sleep (thread pools as idle as that leaves them). Cold
start: a fresh interpreter to the first output of the BasisConv VGG-16 file, with Numba's
on-disk cache warm and cold (NUMBA_CACHE_DIR: an empty directory).

The machine is shared: --max-load waits (up to --wait seconds) for the 1-minute load average to
drop below it before timing, and the load is recorded with the results.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from engine.timing import interleaved, round_medians  # noqa: E402 (after the path)

HEADING = "## Speed"
THREADS = 2
IDLE_GAP = 0.1   # s of sleep before each batch-1 call of the sporadic-caller measure
MODEL_NAMES = ["vgg16-dense", "vgg16-basis", "vgg16-tt", "resnet18-dense", "resnet18-basis"]
EXPORTS = "v2"   # part of the cached exports' names: bumped when the converters' output changes
                 # (v2: zero padding inside the conv, no ONNX Pad node per basis / TT conv)


# --- models ----------------------------------------------------------------------------------------

def build(name: str):
    """The torch model (eval) of 'net-variant'."""
    import models
    net, variant = name.split("-")
    dense = models.MODELS[net]()
    return {"dense": lambda: dense, "basis": lambda: models.basis(dense),
            "tt": lambda: models.tt(dense)}[variant]()


def export(name: str, model, workdir: Path) -> tuple[Path, Path]:
    """(engine .h5, .onnx) of the model, cached in workdir."""
    import warnings

    import torch

    import converters
    h5, onnx = workdir / f"{name}-{EXPORTS}.h5", workdir / f"{name}-{EXPORTS}.onnx"
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    if not h5.exists():
        converters.export(model, x, str(h5), n_random=0, store="outputs")
    if not onnx.exists():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, x, str(onnx), input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "B"}, "y": {0: "B"}}, dynamo=False)
    return h5, onnx


# --- measuring -------------------------------------------------------------------------------------

def sgemm_gflops(n: int = 2048, reps: int = 7) -> float:
    """Median GFLOP/s of np.dot on n x n float32 (NumPy's BLAS, its threads as configured)."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), np.float32)
    np.dot(a, b, out=c)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        np.dot(a, b, out=c)
        ts.append(time.perf_counter() - t)
    time.sleep(0.3)       # OpenBLAS's threads spin for a while after a call
    return 2 * n ** 3 / statistics.median(ts) / 1e9


def after_idle(fns: dict, calls: int = 20, gap: float = IDLE_GAP) -> dict:
    """{name: median seconds} of calls each made after `gap` s of sleep, the runtimes alternated:
    a sporadic caller's latency, with each thread pool as idle as that leaves it (asleep, or
    still spinning)."""
    times = {k: [] for k in fns}
    names = list(fns)
    for r in range(calls):
        for k in names if r % 2 == 0 else names[::-1]:
            time.sleep(gap)
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(ts) for k, ts in times.items()}


def wait_for_load(max_load: float, wait: float) -> float:
    """Poll the 1-minute load average until below max_load or `wait` s pass; returns it."""
    t0 = time.time()
    load = os.getloadavg()[0]
    while load > max_load and time.time() - t0 < wait:
        print(f"  load average {load:.2f} > {max_load}: waiting", file=sys.stderr, flush=True)
        time.sleep(15)
        load = os.getloadavg()[0]
    return load


def cold_start(h5: Path, runs: int = 3) -> dict:
    """Seconds from a fresh interpreter to the first output, Numba cache warm and cold."""
    code = ("import numpy as np, engine; m = engine.load(%r); "
            "m(np.zeros((1, 3, 32, 32), np.float32))" % str(h5))
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def once(cache_dir):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT,
                       env=dict(env, NUMBA_CACHE_DIR=cache_dir))
        return time.perf_counter() - t

    with tempfile.TemporaryDirectory() as warm:
        once(warm)                                            # fills the cache
        warm_times = [once(warm) for _ in range(runs)]
    cold_times = []
    for _ in range(max(1, runs - 1)):
        with tempfile.TemporaryDirectory() as cold:
            cold_times.append(once(cold))
    return {"warm": statistics.median(warm_times), "warm_all": warm_times,
            "cold": statistics.median(cold_times), "cold_all": cold_times}


# --- the run ---------------------------------------------------------------------------------------

def machine() -> dict:
    import llvmlite.binding as llvm
    import numba
    import onnxruntime
    import threadpoolctl
    import torch

    from engine.ops import sgemm
    model = next((line.split(":", 1)[1].strip() for line in
                  subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                  if line.startswith("Model name")), platform.processor())
    blas = [f"{i['prefix']} {i.get('version', '')} ({i.get('architecture', '?')} kernels)"
            for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
    return {"cpu": f"{model} (LLVM: {llvm.get_host_cpu_name()})", "cores": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__, "numba": numba.__version__, "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "blas": sorted(set(blas)),
            "coretype": os.environ.get("OPENBLAS_CORETYPE", "(unset: OpenBLAS's own detection)"),
            "layer": _layer(), "vector": {16: "AVX-512", 8: "AVX2", 4: "SSE"}[sgemm.VW]}


def _layer() -> str:
    import numba
    try:
        return numba.threading_layer()
    except ValueError:          # no parallel kernel has run in this process
        return str(numba.config.THREADING_LAYER)


def run(args) -> dict:
    import engine   # first: torch loads its own libgomp.so.1, which Numba's OpenMP would then
    # share, so the engine's OpenMP setting (GOMP_SPINCOUNT, engine/__init__.py) must come first
    import onnxruntime as ort
    import placement
    import torch
    torch.set_num_threads(THREADS)
    import numba
    numba.set_num_threads(THREADS)
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1

    def torch_call(model, x):
        with torch.no_grad():
            model(x)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    res = {"rows": [], "load_start": wait_for_load(args.max_load, args.wait)}
    res["sgemm_start"] = sgemm_gflops()
    print(f"SGEMM (np.dot 2048^3 float32, {THREADS} threads): {res['sgemm_start']:.1f} GFLOP/s; "
          f"load {res['load_start']:.2f}", flush=True)
    for net in dict.fromkeys(name.split("-")[0] for name in args.models):
        # a net's variants run interleaved: their time ratios (compressed vs dense) per round
        names = [name for name in args.models if name.startswith(net + "-")]
        runs = {}
        for name in names:
            model = build(name)
            h5, onnx = export(name, model, workdir)
            m = engine.load(str(h5))
            runs[name] = (model, m, ort.InferenceSession(str(onnx), so,
                                                         providers=["CPUExecutionProvider"]),
                          m.count((1, 3, 32, 32)).total["macs"])
        for B in args.batches:
            x = np.random.default_rng(B).standard_normal((B, 3, 32, 32), dtype=np.float32)
            xt = torch.from_numpy(x)
            fns, errs = {}, {}
            for name, (model, m, sess, _) in runs.items():
                with torch.no_grad():
                    want = model(xt).numpy()
                got_e, got_o = m(x), sess.run(None, {"x": x})[0]
                scale = float(np.abs(want).max())
                errs[name] = {"engine": float(np.abs(got_e - want).max()) / scale,
                              "ort": float(np.abs(got_o - want).max()) / scale}
                fns[name, "engine"] = functools.partial(m, x)
                fns[name, "pytorch"] = functools.partial(torch_call, model, xt)
                fns[name, "onnxruntime"] = functools.partial(sess.run, None, {"x": x})
            calls = args.calls if B > 1 else args.calls * 4
            probes = [placement.transfer_ns()]  # before and after each round: the vCPUs' state
            times = interleaved(fns, calls, args.rounds,
                                after_round=lambda: probes.append(placement.transfer_ns()))
            print(f"B={B}: CPU 0 -> 1 line transfer before and after each round (ns): "
                  f"{' '.join(f'{p:.0f}' for p in probes)}", flush=True)
            for name, (_, m, _, macs) in runs.items():
                row = {"model": name, "batch": B, "macs": macs, "err": errs[name],
                       "placement": probes}
                for k in ("engine", "pytorch", "onnxruntime"):
                    ts = times[name, k]
                    med = statistics.median(ts)
                    row[k] = {"ms": med * 1e3, "min_ms": min(ts) * 1e3, "img_s": B / med,
                              "gflops": 2 * macs * B / med / 1e9,
                              "rounds": round_medians(ts, calls)}
                # ORT / engine per round, in order: the machine's slow and fast phases (often
                # 1.5x apart on a shared machine) cancel in these where they outlast a round
                row["vs_ort_rounds"] = [o / e for o, e in zip(row["onnxruntime"]["rounds"],
                                                              row["engine"]["rounds"])]
                if B == 1:
                    row["idle"] = after_idle({k: fns[name, k] for k in ("engine", "onnxruntime")})
                    print(f"{name:15s} B=1   after {IDLE_GAP * 1e3:.0f} ms idle: engine "
                          f"{row['idle']['engine'] * 1e3:.2f} ms  ORT "
                          f"{row['idle']['onnxruntime'] * 1e3:.2f} ms", flush=True)
                res["rows"].append(row)
                e, o, p = row["engine"], row["onnxruntime"], row["pytorch"]
                lo, hi = min(row["vs_ort_rounds"]), max(row["vs_ort_rounds"])
                print(f"{name:15s} B={B:<3d} engine {e['ms']:8.2f} ms  ORT {o['ms']:8.2f} ms  "
                      f"torch {p['ms']:8.2f} ms   engine/ORT speed {o['ms'] / e['ms']:.2f}x "
                      f"(rounds {lo:.2f}-{hi:.2f})  engine {e['gflops']:.0f} GFLOP/s  "
                      f"err {errs[name]['engine']:.1e}", flush=True)
        runs = fns = None   # free the models and sessions before the next net loads
    res["sgemm_end"] = sgemm_gflops()
    res["load_end"] = os.getloadavg()[0]
    print(f"SGEMM at the end: {res['sgemm_end']:.1f} GFLOP/s; load {res['load_end']:.2f}")
    return res


def cold(args) -> dict:
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    h5, _ = export("vgg16-basis", build("vgg16-basis"), workdir)
    c = cold_start(h5)
    print(f"cold start (fresh process -> first output, vgg16-basis): warm cache "
          f"{c['warm']:.2f} s, cold cache {c['cold']:.2f} s", flush=True)
    return c


# --- the report ------------------------------------------------------------------------------------

def label(mach: dict) -> str:
    """The run's subsection title: the engine's kernels (the host's vector width) and the
    OpenBLAS kernels its narrow GEMMs use."""
    arch = sorted({b.split("(")[-1].split(" ")[0] for b in mach["blas"]})
    return (f"{mach['vector']} engine kernels, OpenBLAS {'/'.join(arch)} kernels "
            f"(OPENBLAS_CORETYPE={mach['coretype']})")


def report(res: dict | None, cs: dict | None, mach: dict, command: str) -> str:
    lines = [f"### {label(mach)}", "", f"Command: `{command}`", "",
             f"Machine: {mach['cpu']}, {mach['cores']} cores (shared with other jobs), Python "
             f"{mach['python']}, NumPy {mach['numpy']}, Numba {mach['numba']} (threading layer "
             f"{mach['layer']}), torch {mach['torch']}, onnxruntime {mach['onnxruntime']}; BLAS: "
             f"{'; '.join(mach['blas'])}; OPENBLAS_CORETYPE={mach['coretype']}. "
             f"{THREADS} threads per runtime. Run {time.strftime('%Y-%m-%d %H:%M')}."]
    if res:
        sg = (res["sgemm_start"] + res["sgemm_end"]) / 2
        lines += ["", f"SGEMM (np.dot, 2048^3 float32, {THREADS} threads): {res['sgemm_start']:.0f} "
                  f"GFLOP/s before the runs, {res['sgemm_end']:.0f} after; fractions below are of "
                  f"their mean, {sg:.0f}. Load average (1 min): {res['load_start']:.2f} at the start, "
                  f"{res['load_end']:.2f} at the end.", "",
                  "Median ms per batch (min in brackets); img/s; effective GFLOP/s = 2 x MACs (the "
                  "engine's count) x batch / time, and its fraction of SGEMM. 'vs ORT' = ORT time / "
                  "engine time (> 1: the engine is faster), in brackets its range over the rounds "
                  "(each round's medians). err: max |output - PyTorch| / max |PyTorch|.",
                  "",
                  "| model | MACs/img | batch | engine ms | img/s | GFLOP/s | of SGEMM | ORT ms | img/s "
                  "| GFLOP/s | of SGEMM | PyTorch ms | img/s | engine vs ORT | engine vs PyTorch | err engine / ORT |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            e, o, p = r["engine"], r["onnxruntime"], r["pytorch"]
            lines.append(
                f"| {r['model']} | {r['macs'] / 1e6:.1f} M | {r['batch']} | {e['ms']:.2f} ({e['min_ms']:.2f}) "
                f"| {e['img_s']:.0f} | {e['gflops']:.0f} | {e['gflops'] / sg:.2f} | {o['ms']:.2f} "
                f"({o['min_ms']:.2f}) | {o['img_s']:.0f} | {o['gflops']:.0f} | {o['gflops'] / sg:.2f} | "
                f"{p['ms']:.2f} | {p['img_s']:.0f} | {o['ms'] / e['ms']:.2f}x ({min(r['vs_ort_rounds']):.2f}-"
                f"{max(r['vs_ort_rounds']):.2f}) | {p['ms'] / e['ms']:.2f}x | "
                f"{r['err']['engine']:.1e} / {r['err']['ort']:.1e} |")
        speedups = [
            f"| {net} {variant} | {B} | {c['reduction']:.2f}x | {c['engine']:.2f}x "
            f"({c['engine'] / c['reduction']:.2f} of the MAC reduction; rounds "
            f"{min(c['engine_rounds']) / c['reduction']:.2f}-"
            f"{max(c['engine_rounds']) / c['reduction']:.2f}) | "
            + " | ".join(f"{c[k]:.2f}x ({c[k] / c['reduction']:.2f})"
                         for k in ("onnxruntime", "pytorch")) + " |"
            for (net, variant, B), c in compressed_vs_dense(res).items()]
        idle = [r for r in res["rows"] if "idle" in r]
        if idle:
            lines += ["", f"Batch 1 for a sporadic caller: each call after {IDLE_GAP * 1e3:.0f} ms "
                      "of sleep, the engine and ORT alternated, 20 calls each (the table above "
                      "times calls back to back). Medians:", "",
                      "| model | engine ms | ORT ms | engine vs ORT |", "|---|---|---|---|"]
            lines += [f"| {r['model']} | {r['idle']['engine'] * 1e3:.2f} | "
                      f"{r['idle']['onnxruntime'] * 1e3:.2f} | "
                      f"{r['idle']['onnxruntime'] / r['idle']['engine']:.2f}x |" for r in idle]
        if speedups:
            lines += ["", "Compressed vs dense, time speedup per runtime: the median over the "
                      "rounds of each round's dense time / compressed time (in a round a runtime "
                      "runs a net's variants back to back), in brackets its fraction of the MAC "
                      "reduction (for the engine also its range over the rounds):", "",
                      "| model | batch | MAC reduction | engine | ORT | PyTorch |", "|---|---|---|---|---|---|",
                      *speedups]
    if cs:
        lines += ["", f"Cold start, fresh process to the first output of vgg16-basis (interpreter, "
                  f"imports, load, first call): Numba cache warm {cs['warm']:.2f} s (runs "
                  f"{', '.join(f'{t:.2f}' for t in cs['warm_all'])}), cold (empty NUMBA_CACHE_DIR, "
                  f"every kernel compiled) {cs['cold']:.2f} s."]
    met = targets(res, cs)
    if met:
        lines += ["", "Targets (issue #6), from the tables above (met: by 'this run', the "
                  "medians); 'near' / 'far': the median over the rounds that began and ended "
                  f"with the two vCPUs sharing an L3 (a cache line from one to the other in "
                  f"under {NEAR_NS} ns, bench/placement.py) / on different L3s (how many such "
                  "rounds in brackets); 'fastest calls': the same ratio from each model's and "
                  "runtime's fastest call of the run; 'of SGEMM': the engine's effective GFLOP/s "
                  "as a fraction of the run's SGEMM rate:", "",
                  "| target | this run | rounds | near | far | fastest calls | of SGEMM | met |",
                  "|---|---|---|---|---|---|---|---|", *met]
    return "\n".join(lines) + "\n"


def compressed_vs_dense(res: dict) -> dict:
    """{(net, variant, batch): time speedup of the compressed net over the dense one per
    runtime (the median over the rounds of each round's dense / compressed time), the engine's
    per round (in order), and the MAC reduction}, for the nets the run has both of."""
    by = {(r["model"], r["batch"]): r for r in res["rows"]}
    out = {}
    nets = dict.fromkeys(m.split("-")[0] for m, _ in by)
    for net, variant, B in itertools.product(nets, ("basis", "tt"), sorted({b for _, b in by})):
        d, c = by.get((f"{net}-dense", B)), by.get((f"{net}-{variant}", B))
        if d is None or c is None:
            continue
        ratios = {k: [a / b for a, b in zip(d[k]["rounds"], c[k]["rounds"])]
                  for k in ("engine", "onnxruntime", "pytorch")}
        out[net, variant, B] = {"reduction": d["macs"] / c["macs"],
                                "engine_rounds": ratios["engine"],
                                **{k: statistics.median(v) for k, v in ratios.items()}}
    return out


# issue #6's targets: (what, model, batch, measure, bound). Measures: "vs ORT" ORT time /
# engine time (>= bound), "latency" engine time / ORT time (<= bound), "of MACs" the engine's
# compressed-vs-dense speedup / the MAC reduction (>= bound)
TARGETS = [("BasisConv VGG-16 throughput vs ORT", "vgg16-basis", 16, "vs ORT", 1.0),
           ("BasisConv VGG-16 latency vs ORT's", "vgg16-basis", 1, "latency", 1.25),
           ("dense VGG-16 throughput vs ORT", "vgg16-dense", 16, "vs ORT", 0.9),
           ("dense ResNet-18 throughput vs ORT", "resnet18-dense", 16, "vs ORT", 0.9),
           *((f"{title} compressed vs dense, of the MAC reduction", f"{net}-basis", B,
              "of MACs", 0.8) for net, title in (("vgg16", "VGG-16"), ("resnet18", "ResNet-18"))
             for B in (1, 16))]
WARM_START_MAX = 2.0  # s: the first output in a fresh process, Numba's cache warm
NEAR_NS = 100         # a line transfer between the vCPUs under this: they share an L3
                      # (bench/placement.py: 35-40 ns near, 160-180 ns far on this machine)


def placed(values: list, probes: list | None, state: str) -> str:
    """'median (rounds)' of the per-round values whose round began and ended with the vCPUs in
    `state` ('near': the line transfer under NEAR_NS both times, 'far': over it both times)."""
    if not probes:
        return ""
    near = [p < NEAR_NS for p in probes]
    picked = [v for v, a, b in zip(values, near, near[1:]) if a == b == (state == "near")]
    return f"{statistics.median(picked):.2f} ({len(picked)})" if picked else "-"


def targets(res: dict | None, cs: dict | None) -> list[str]:
    """Table rows: each of TARGETS the run measured (value, its range over the rounds, its
    median over the rounds with the vCPUs near and far, the ratio of the fastest calls, the
    engine's fraction of SGEMM, met), and the warm start."""
    rows = []
    if res:
        sg = (res["sgemm_start"] + res["sgemm_end"]) / 2
        by = {(r["model"], r["batch"]): r for r in res["rows"]}
        speedups = compressed_vs_dense(res)
        for what, model, B, measure, bound in TARGETS:
            r, c = by.get((model, B)), speedups.get((model.split("-")[0], "basis", B))
            if r is None or (measure == "of MACs" and c is None):
                continue
            e, o, rounds = r["engine"], r["onnxruntime"], r["vs_ort_rounds"]   # in order
            if measure == "of MACs":
                value = c["engine"] / c["reduction"]
                rounds = [v / c["reduction"] for v in c["engine_rounds"]]
                dense = by[model.replace("-basis", "-dense"), B]["engine"]
                fastest = dense["min_ms"] / e["min_ms"] / c["reduction"]
            elif measure == "latency":
                value, rounds = e["ms"] / o["ms"], [1 / v for v in rounds]
                fastest = e["min_ms"] / o["min_ms"]
            else:
                value, fastest = o["ms"] / e["ms"], o["min_ms"] / e["min_ms"]
            ok = value <= bound if measure == "latency" else value >= bound
            sign = "<=" if measure == "latency" else ">="
            near, far = (placed(rounds, r.get("placement"), s) for s in ("near", "far"))
            rows.append(f"| {what}, batch {B} {sign} {bound:g} | {value:.2f} | "
                        f"{min(rounds):.2f}-{max(rounds):.2f} | {near} | {far} | {fastest:.2f} "
                        f"| {e['gflops'] / sg:.2f} | {'yes' if ok else '**no**'} |")
    if cs:
        rows.append(f"| first output, warm cache <= {WARM_START_MAX:g} s | {cs['warm']:.2f} s | | "
                    f"| | | | {'yes' if cs['warm'] <= WARM_START_MAX else '**no**'} |")
    return rows


INTRO = (f"{HEADING}\n\nbench/speed.py: the engine, PyTorch eager and ONNX Runtime on the same "
         "models and inputs in one process, interleaved (see the script's docstring). One subsection "
         "per engine kernel width and OpenBLAS kernel choice; a run rewrites its own and keeps the "
         "others and the hand-written Notes.\n")


def speed_section(old: str, text: str, title: str) -> str:
    """The '## Speed' section with `text` (a '### title' block) in place of the block with the
    same title in `old` (the current RESULTS.md), other blocks kept ('### Notes' last)."""
    start = old.find(HEADING + "\n")
    section = ""
    if start >= 0:
        end = old.find("\n## ", start + len(HEADING))
        section = old[start:end + 1 if end >= 0 else len(old)]
    blocks = {}
    for part in section.split("\n### ")[1:]:
        name = part.split("\n", 1)[0].strip()
        blocks[name] = "### " + part.rstrip("\n") + "\n"
    blocks[title] = text.rstrip("\n") + "\n"
    notes = blocks.pop("Notes", None)
    return INTRO + "\n" + "\n".join(blocks.values()) + (("\n" + notes) if notes else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=MODEL_NAMES, choices=MODEL_NAMES)
    p.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 16])
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds per (net, batch)")
    p.add_argument("--calls", type=int, default=4,
                   help="timed calls per model and runtime per round (x4 at batch 1)")
    p.add_argument("--max-load", type=float, default=2.5, help="wait for the load average to drop below")
    p.add_argument("--wait", type=float, default=600, help="seconds to wait for it at most")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "basisconv-speed"),
                   help="exported model files (kept between runs)")
    p.add_argument("--no-cold-start", action="store_true")
    p.add_argument("--cold-start-only", action="store_true")
    p.add_argument("--write", action="store_true", help=f"write '{HEADING}' in bench/RESULTS.md")
    args = p.parse_args(argv)
    res = None if args.cold_start_only else run(args)
    cs = None if args.no_cold_start else cold(args)
    mach = machine()
    text = report(res, cs, mach, "python bench/speed.py " + " ".join(argv or sys.argv[1:]))
    print("\n" + text)
    if args.write:
        from results import RESULTS, write_section
        old = RESULTS.read_text() if RESULTS.exists() else ""
        write_section(HEADING + "\n", speed_section(old, text, label(mach)))
        print(f"wrote {ROOT / 'bench' / 'RESULTS.md'} ({HEADING})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

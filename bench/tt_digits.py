"""Tensor-train compression on real data (Garipov et al. 2016, "Ultimate tensorization", in
small): scikit-learn's digits, upscaled to 16x16, on CPU.

Two nets are trained dense, as in the paper: an all-conv net (6 conv + BN + ReLU, global average
pool, linear classifier) and a conv + FC net (4 conv, then FC 1024-512-256-10 with BN). Their
layers are turned into TT layers by TT-SVD of the trained kernels (converters.to_tt, ranks capped
by max_rank, modes balanced), evaluated right away, then the whole net is fine-tuned. The naive
baseline (4D TT of each kernel tensor) is run at matched parameter counts. Every net is exported,
verified node by node in the engine and run by the engine on the test set; MACs are the engine's
count at batch 1 with every TT layer run by contraction, by its rebuilt dense kernel, and the
engine's per-layer choice (auto).

    .venv/bin/python bench/tt_digits.py [--epochs 12] [--finetune-epochs 5] [--seeds 0 1 2]
                                        [--out bench/RESULTS.md]
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import converters  # noqa: E402
import engine  # noqa: E402
from results import write_section  # noqa: E402
from basis_digits import SIZE, Batches, digits, learnable as params  # noqa: E402  (same data, same split)
from converters.finetune import accuracy, finetune  # noqa: E402
from converters.tt import factorize_layers, report_table  # noqa: E402
from converters.tt_layers import to_tt  # noqa: E402
from engine.ops.tt import set_strategy  # noqa: E402

HEADING = "## Tensor-train on digits"


def cbr(cin, cout):
    return [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def conv_net():
    """The paper's all-conv CIFAR net in small: 32, 32, pool, 64, 64, pool, 64, 64, avg pool, fc."""
    return nn.Sequential(*cbr(1, 32), *cbr(32, 32), nn.MaxPool2d(2), *cbr(32, 64), *cbr(64, 64),
                         nn.MaxPool2d(2), *cbr(64, 64), *cbr(64, 64), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(64, 10))


def conv_fc_net():
    """The paper's conv + FC net in small: 32, 32, pool, 64, 64, pool, FC 1024-512-256-10."""
    return nn.Sequential(*cbr(1, 32), *cbr(32, 32), nn.MaxPool2d(2), *cbr(32, 64), *cbr(64, 64),
                         nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(1024, 512), nn.BatchNorm1d(512), nn.ReLU(inplace=True),
                         nn.Linear(512, 256), nn.BatchNorm1d(256), nn.ReLU(inplace=True),
                         nn.Linear(256, 10))


def layer_paths(model, kind) -> list[str]:
    """Paths of the layers the paper compresses: convs after the 1-channel stem; hidden FCs."""
    if kind is nn.Conv2d:
        return [p for p, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.in_channels > 1]
    fcs = [p for p, m in model.named_modules() if isinstance(m, nn.Linear)]
    return fcs[:-1]


def engine_check(model, x_test, y_test, path) -> dict:
    """Export; per TT strategy verify and count MACs; run the test set in the engine (auto)."""
    converters.export(model.eval(), x_test[:2], path, n_random=0)
    out = {"ok": True}
    for s in ("contract", "dense", "auto"):
        m = engine.load(path)
        set_strategy(m.graph, s)
        out[s] = m.count((1, 1, SIZE, SIZE)).total["macs"]
        out["ok"] &= m.verify().ok
    out["acc"] = float((m(x_test.numpy()).argmax(1) == y_test.numpy()).mean())
    return out


def compressed_params(dense, paths, max_rank, naive=False) -> int:
    """Core values of the layers at `paths` after TT-SVD at max_rank (no model built)."""
    kernels = {p: dense.get_submodule(p).weight.detach().numpy() for p in paths}
    done = factorize_layers(kernels, max_rank=max_rank, layers=paths, naive=naive)
    return sum(f.report.params_tt for f in done.values())


def configs(net, dense, args) -> list[tuple[str, dict, bool]]:
    """(label, max_rank by layer path, naive) of every compressed variant of `net`."""
    convs, fcs = layer_paths(dense, nn.Conv2d), layer_paths(dense, nn.Linear)
    if net == "conv+FC":
        return ([(f"TT-FC r{r}", dict.fromkeys(fcs, r), False) for r in args.fc_ranks]
                + [(f"TT-conv r{rc} + TT-FC r{rf}",
                    {**dict.fromkeys(convs, rc), **dict.fromkeys(fcs, rf)}, False)
                   for rc, rf in zip(args.conv_ranks[1:], args.fc_ranks)])
    out = [(f"TT-conv r{r}", dict.fromkeys(convs, r), False) for r in args.conv_ranks]
    for r in args.conv_ranks:   # naive at the TT-conv row's parameter count
        target = compressed_params(dense, convs, r)
        n = min(range(1, 65), key=lambda n: abs(compressed_params(dense, convs, n, naive=True) - target))
        out.append((f"naive r{n} (vs TT-conv r{r})", dict.fromkeys(convs, n), True))
    return out


def run(args) -> str:
    torch.set_num_threads(args.threads)
    (xtr, ytr), (xte, yte) = digits()
    test = Batches(xte, yte, 256, shuffle=False)
    tmp = Path(tempfile.mkdtemp(prefix="tt_digits_"))
    rows: dict[tuple, dict] = {}   # (net, label) -> params, ratio, engine counts, per-seed accuracies
    details = []
    t_start = time.perf_counter()

    def train(model, epochs, lr, seed):
        # each training shuffles with its own seeded generator: results do not depend on run order
        finetune(model, Batches(xtr, ytr, 64, shuffle=True, seed=seed), epochs=epochs, lr=lr,
                 train=("all",), progress=False)

    def measure(net, label, model, dense_params, svd_acc, t0):
        ft = accuracy(model, test)
        e = engine_check(model, xte, yte, tmp / f"{net}_{len(rows)}.h5")
        row = rows.setdefault((net, label), {"params": params(model), "ratio": dense_params / params(model),
                                             "macs": e, "svd": [], "acc": [], "engine": [], "ok": True})
        row["svd"].append(svd_acc)
        row["acc"].append(ft)
        row["engine"].append(e["acc"])
        row["ok"] &= e["ok"]
        print(f"{net} {label}: params {params(model):,} (x{dense_params / params(model):.2f}), "
              f"after TT-SVD {'-' if svd_acc is None else f'{svd_acc:.4f}'} -> {ft:.4f} (engine "
              f"{e['acc']:.4f}, verify {e['ok']}); MACs contract {e['contract']:,} dense {e['dense']:,} "
              f"auto {e['auto']:,}; {time.perf_counter() - t0:.1f}s", flush=True)

    for seed in args.seeds:
        for net, build in (("conv", conv_net), ("conv+FC", conv_fc_net)):
            t0 = time.perf_counter()
            torch.manual_seed(seed + 1)
            dense = build()
            train(dense, args.epochs, 2e-3, seed)
            dense_params = params(dense)
            measure(net, "dense", dense, dense_params, None, t0)
            # control: the dense net trained as long as the TT nets (their fine-tuning included)
            t0 = time.perf_counter()
            control = copy.deepcopy(dense)
            train(control, args.finetune_epochs, args.finetune_lr, seed + 100)
            measure(net, f"dense + {args.finetune_epochs} epochs (control)", control, dense_params, None, t0)
            variants = configs(net, dense, args)
            detail = 1 if net == "conv" else len(variants) - 1     # which variant gets a per-layer table
            for i, (label, max_rank, naive) in enumerate(variants):
                t0 = time.perf_counter()
                model, reports = to_tt(dense, max_rank=max_rank, layers=list(max_rank), naive=naive)
                svd_acc = accuracy(model, test)
                train(model, args.finetune_epochs, args.finetune_lr, seed + 100)
                if i == detail and seed == args.seeds[0]:
                    details.append((f"{net}, {label}, seed {seed}", reports))
                measure(net, label, model, dense_params, svd_acc, t0)

    return table(rows, details, args, time.perf_counter() - t_start)


def _stat(values) -> str:
    """Mean, and the range over seeds when there are several, in percent."""
    if values[0] is None:
        return ""
    v = 100 * np.array(values)
    return f"{v.mean():.2f}" + (f" ({v.min():.2f}-{v.max():.2f})" if len(v) > 1 else "")


def table(rows, details, args, seconds: float) -> str:
    cmd = "python bench/tt_digits.py " + " ".join(sys.argv[1:])
    out = [HEADING, "",
           f"Machine: {platform.machine()} {platform.system()}, {os.cpu_count()} cores (shared), torch "
           f"{torch.__version__} ({args.threads} thread(s) for torch, BLAS and Numba); run time "
           f"{seconds / 60:.1f} min.",
           f"Command: `{cmd.strip()}`", "",
           f"Data: scikit-learn digits, 1,797 8x8 images upscaled to {SIZE}x{SIZE}, 1,347 train / 450 test "
           f"(stratified, seed 0). Dense nets trained {args.epochs} epochs (Adam 2e-3, batch 64). TT nets: "
           "`converters.to_tt` (TT-SVD of the trained kernels, balanced modes over 3 cores, ranks capped "
           "at max rank r; convs after the 1-channel stem and the hidden FCs, as the paper), then every "
           f"parameter fine-tuned {args.finetune_epochs} epochs (Adam {args.finetune_lr:g}). 'control': "
           "the dense net trained those extra epochs too. 'naive': the 4D TT of each conv kernel "
           "(S, C, 3, 3), its max rank chosen to match the TT-conv row's parameter count. Accuracies: "
           f"test top-1, mean (min-max) over seeds {', '.join(map(str, args.seeds))} (init and shuffling; "
           "1 test image = 0.22 %); 'engine': the exported file run by the engine (verify: node by node "
           "against PyTorch, every seed and every TT strategy). Params: all learnable (BN included). "
           "MACs: engine count at batch 1 with the TT layers contracted / rebuilt dense / the engine's "
           "choice (naive rows export as dense convs).", "",
           "| net | layers | params | x fewer | acc after TT-SVD | acc fine-tuned | engine | verify "
           "| MACs contract | MACs dense | MACs auto |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (net, label), r in rows.items():
        e = r["macs"]
        out.append(f"| {net} | {label} | {r['params']:,} | {r['ratio']:.2f} | {_stat(r['svd'])} "
                   f"| {_stat(r['acc'])} | {_stat(r['engine'])} | {'ok' if r['ok'] else 'FAIL'} "
                   f"| {e['contract']:,} | {e['dense']:,} | {e['auto']:,} |")
    for title, reports in details:
        out += ["", f"Per layer, {title} (MACs per output position; error right after TT-SVD):", "",
                "```", report_table(reports), "```"]
    return "\n".join(out) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--finetune-epochs", type=int, default=5)
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--conv-ranks", type=int, nargs="+", default=[32, 16, 8])
    p.add_argument("--fc-ranks", type=int, nargs="+", default=[8, 4])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = p.parse_args()
    from threadpoolctl import threadpool_limits
    # one thread each for torch, BLAS and Numba: on the shared 2-core machine more threads only
    # contended (a torch epoch 4-20x slower, engine runs 50x slower with BLAS threads spinning)
    with threadpool_limits(limits=args.threads):
        numba.set_num_threads(args.threads)
        text = run(args)
    print(text)
    write_section(HEADING, text, args.out)
    print(f"wrote section '{HEADING[3:]}' of {args.out}")


if __name__ == "__main__":
    main()

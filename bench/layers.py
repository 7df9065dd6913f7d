"""Per layer: the engine's conv kernels vs ONNX Runtime on the conv layers of bench/speed.py's
VGG-16 and ResNet-18 (3x3 'same', 3x3 stride 2, 1x1 stride-2 shortcuts), dense and as a
BasisConv of M = N // 5 (basis conv, then a 1x1 combine with bias), each with a fused ReLU.

    .venv/bin/python bench/layers.py                    # batch 16, all layers
    .venv/bin/python bench/layers.py --batch 1 --rounds 5

Where bench/speed.py says how a whole net compares, this says which layers make the
difference. Each layer is one torch module exported to ONNX and the same weights given to
the engine's prepare_conv (the plan a model file would get); both run interleaved with warm-up
and a pause between runtimes (engine/timing.py), 2 threads each. Reported: median ms, ORT's
time / the engine's (> 1: the engine is faster), the engine's plan, max |difference| / max |ORT|.
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.ops import gemm  # noqa: E402 (after the path)
from engine.timing import interleaved  # noqa: E402

# (C, N, H, kernel, stride): VGG-16's 3x3 layers, then ResNet-18's strided ones and shortcuts
LAYERS = [(64, 64, 32, 3, 1), (64, 128, 16, 3, 1), (128, 128, 16, 3, 1), (128, 256, 8, 3, 1),
          (256, 256, 8, 3, 1), (256, 512, 4, 3, 1), (512, 512, 4, 3, 1), (512, 512, 2, 3, 1),
          (64, 128, 32, 3, 2), (128, 256, 16, 3, 2), (256, 512, 8, 3, 2),
          (64, 128, 32, 1, 2), (128, 256, 16, 1, 2), (256, 512, 8, 1, 2)]


def layer(C, N, H, k, s, M, batch, session_options):
    """(engine call, ORT call, plan, relative difference) of one layer on seeded inputs."""
    import onnxruntime as ort
    import torch
    p = k // 2
    convs = ([torch.nn.Conv2d(C, M, k, s, p, bias=False), torch.nn.Conv2d(M, N, 1)] if M
             else [torch.nn.Conv2d(C, N, k, s, p)])
    torch.manual_seed(0)
    net = torch.nn.Sequential(*convs, torch.nn.ReLU()).eval()
    x = np.random.default_rng(0).standard_normal((batch, C, H, H)).astype(np.float32)
    onnx = io.BytesIO()
    torch.onnx.export(net, torch.from_numpy(x), onnx, dynamo=False)
    sess = ort.InferenceSession(onnx.getvalue(), session_options,
                                providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    w1 = convs[0].weight.detach().numpy()
    w2 = convs[1].weight.detach().numpy()[:, :, 0, 0].copy() if M else None
    bias = convs[-1].bias.detach().numpy()
    ho = (H + 2 * p - k) // s + 1
    launch = gemm.prepare_conv(x.shape, w1, bias, (s, s), (p,) * 4, (1, 1), 1, ho, ho, w2,
                               ("relu",))
    plan = gemm.planned(x.shape, N, k, k, ho, ho, (s, s), (p,) * 4, (1, 1), 1, M)
    got, want = launch(x, None), sess.run(None, {name: x})[0]
    return (lambda: launch(x, None), lambda: sess.run(None, {name: x}), plan,
            float(np.abs(got - want).max() / np.abs(want).max()))


def main(argv=None) -> int:
    import onnxruntime as ort
    import torch
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a.add_argument("--batch", type=int, default=16)
    a.add_argument("--rounds", type=int, default=7)
    a.add_argument("--calls", type=int, default=5)
    args = a.parse_args(argv)
    torch.set_num_threads(2)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    print(f"batch {args.batch}, {args.rounds} rounds of {args.calls} calls; ORT / engine time "
          "(> 1: the engine is faster)\n")
    print("| layer | kind | engine ms | ORT ms | ORT / engine | engine plan | difference |")
    print("|---|---|---|---|---|---|---|")
    for C, N, H, k, s in LAYERS:
        for M in (None, N // 5):
            engine, onnx, plan, diff = layer(C, N, H, k, s, M, args.batch, so)
            t = interleaved({("l", "engine"): engine, ("l", "ORT"): onnx}, args.calls,
                            args.rounds)
            e, o = (statistics.median(t["l", r]) * 1e3 for r in ("engine", "ORT"))
            how = f"{plan.how} {plan.split}".replace(",)", ")")
            kind = f"basis M={M}" if M else "dense"
            print(f"| {C} -> {N} at {H}x{H}, {k}x{k} stride {s} | {kind} | {e:.3f} | {o:.3f} | "
                  f"{o / e:.2f} | {how} | {diff:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

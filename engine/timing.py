"""Timing runtimes against each other on one machine (`basisconv bench`, bench/speed.py).

Calls are interleaved, not run one runtime after the other: a shared machine's slow and fast
phases (often 1.5x apart, lasting seconds to minutes) then fall on every runtime alike, and the
ratios of each round's medians cancel them."""
from __future__ import annotations

import statistics
import time


def interleaved(fns: dict, calls: int, rounds: int, pause: float = 0.25,
                warmup: float = 0.05, after_round=None) -> dict:
    """{(model, runtime): per-call seconds} of each fn of fns {(model, runtime): fn}, run in
    turn `rounds` times, each time warm-up calls for `warmup` s (one at least) and `calls` timed
    calls, with `pause` s between runtimes. A round takes the runtimes in turn (order rotated),
    and each runtime its models back to back (order rotated): a runtime's models meet the same
    phase of the machine; a runtime need not run every model (`basisconv bench --against`: the
    dense model on the engine alone). Why warm up for a time: after a pause the first ~10 ms of
    calls run slow (clocks and thread pools coming up; BasisConv VGG-16 at batch 1 took 1.81,
    1.40, 1.26, 1.23 ms, then 1.10-1.15), which one warm-up call of a short model does not
    cover. `after_round()`, if given, is called at the end of each round (after its pauses:
    the thread pools idle), for a measure of the machine's state during it."""
    times = {k: [] for k in fns}
    runtimes = list(dict.fromkeys(r for _, r in fns))
    models = list(dict.fromkeys(m for m, _ in fns))
    for r in range(rounds):
        for runtime in runtimes[r % len(runtimes):] + runtimes[:r % len(runtimes)]:
            for model in models[r % len(models):] + models[:r % len(models)]:
                f = fns.get((model, runtime))
                if f is None:
                    continue
                until = time.perf_counter() + warmup
                f()
                while time.perf_counter() < until:
                    f()
                for _ in range(calls):
                    t = time.perf_counter()
                    f()
                    times[model, runtime].append(time.perf_counter() - t)
            time.sleep(pause)
        if after_round is not None:
            after_round()
    return times


def round_medians(ts: list, calls: int) -> list:
    """The median of each round's `calls` timed calls (interleaved's per-call list)."""
    return [statistics.median(ts[i:i + calls]) for i in range(0, len(ts), calls)]

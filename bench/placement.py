"""Where the host put this machine's first two CPUs: the time a cache line takes from one to the
other (a ping-pong of one value between two threads pinned to CPUs 0 and 1).

On the bench's 2-vCPU cloud machine this one number separates its two states: 35-40 ns a
transfer when the vCPUs share an L3, 160-180 ns when the host has put them on different L3
domains, which it does for seconds to minutes at a time. In the far state every line one thread
wrote and the other reads costs that much more: the engine's BasisConv nets take 1.1-1.5x as
long, the dense ones 1.02-1.1x (bench/RESULTS.md). `python bench/placement.py` prints it a few
times.
"""
from __future__ import annotations

import os
import statistics
import threading
import time

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

CPUS = (0, 1)


@intrinsic
def _load(typingctx, a_t, i_t):
    """a[i] read atomically (acquire): each read of the loop goes to memory."""
    def codegen(context, builder, signature, args):
        a, i = args
        cell = builder.gep(context.make_array(a_t)(context, builder, a).data, [i])
        return builder.load_atomic(cell, "acquire", 8)
    return types.int64(a_t, types.intp), codegen


@intrinsic
def _store(typingctx, a_t, i_t, v_t):
    """a[i] = v atomically (release)."""
    def codegen(context, builder, signature, args):
        a, i, v = args
        cell = builder.gep(context.make_array(a_t)(context, builder, a).data, [i])
        builder.store_atomic(v, cell, "release", 8)
        return context.get_dummy_value()
    return types.void(a_t, types.intp, types.int64), codegen


@njit(nogil=True, cache=True)
def _volley(cell, first, n):
    """Wait for each value of this side (first, first + 2, ...) and answer with the next one."""
    for k in range(n):
        v = first + 2 * k
        while _load(cell, 0) != v:
            pass
        _store(cell, 0, v + 1)


def transfer_ns(n: int = 20000) -> float:
    """Nanoseconds for a cache line to go from CPU 0 to CPU 1 (half a round trip, the median of
    3 volleys of n round trips), or NaN where the process may not run on both."""
    if not hasattr(os, "sched_setaffinity") or not set(CPUS) <= os.sched_getaffinity(0):
        return float("nan")
    cell = np.zeros(8, np.int64)                # (8,) one 64-byte line; cell[0] the ball

    def side(cpu, first, out):
        os.sched_setaffinity(0, {cpu})          # this thread only (Linux): not the caller's
        t = time.perf_counter()
        _volley(cell, first, n)
        out.append(time.perf_counter() - t)

    _volley(np.ones(8, np.int64), 1, 1)         # compile or load before timing
    runs = []
    for _ in range(3):
        cell[0] = 0
        got = []
        sides = [threading.Thread(target=side, args=(cpu, k, got)) for k, cpu in enumerate(CPUS)]
        for t in sides[::-1]:
            t.start()
        for t in sides:
            t.join()
        runs.append(max(got) / (2 * n) * 1e9)
    return statistics.median(runs)


if __name__ == "__main__":
    for _ in range(5):
        print(f"{transfer_ns():.1f} ns")
        time.sleep(0.5)

"""Output buffers recycled across calls, as an inference runtime's arena does: a tensor that
dies inside Plan.run gives its memory to the plan's pool, and the next op asking for an array
(`empty`) takes a view of the smallest free block that holds it (at most twice its size),
instead of fresh pages from the OS. (Recycled by exact shape, the pool filled with the first
layers' shapes and missed on every later one: BasisConv ResNet-18 at batch 16 still took 1,500
faults a call.)

Why: glibc returns large freed blocks to the OS (heap trim, munmap), so every call's first
writes into its new outputs page-fault. BasisConv VGG-16 at batch 16 took 1,500 faults per call,
about 1 ms of its 11 (ResNet-18 BasisConv: 1.8 of 19.5 ms); dense models, whose larger buffers
keep the heap grown, had none.

A buffer is recycled only when nothing else refers to it (CPython's reference count, measured
against a fresh array's): a view kept by a later tensor, a graph output, the caller's input or
an activation the caller holds are never taken. The pool holds at most `max_bytes` (Plan sets
the largest call's peak), under a lock: concurrent calls on one Model each get their own
buffers.

A kernel's scratch (`scratch`: padded inputs, im2col panels, partial sums) is carved from the
call's arena, one flat array the pool lends to each Plan.run and takes back after it, grown to
the largest request and kept across calls, for the same reason: fresh scratch from np.empty
page-faulted about 1,000 times a call in BasisConv VGG-16 at batch 16 (2.4 MB of it a layer).
The TT chain keeps its own scratch.
"""
from __future__ import annotations

import math
import sys
import threading
from contextvars import ContextVar

import numpy as np


def _refs(a) -> int:
    return sys.getrefcount(a)


def _root_refs(a) -> int:
    root = a.base
    return sys.getrefcount(root)


def _probe(a) -> tuple[int, int]:
    """What give() sees of an array only its argument holds (the same call nesting)."""
    return _refs(a), _root_refs(a) if a.base is not None else 0


_ALONE = _probe(np.empty(1))[0]             # an array no one else holds
_VIEW_ALONE = _probe(np.empty(2)[:1])[1]    # the memory of a view no one else holds


class BufferPool:
    """Dead arrays' memory, for `empty` to hand out again."""

    def __init__(self, max_bytes: int = 0):
        self.max_bytes = max_bytes
        self.bytes = 0                              # held now
        self._free: list[np.ndarray] = []           # blocks: C-contiguous arrays owning their data
        self._arenas: list[_Arena] = []             # not lent to a running call
        self._lock = threading.Lock()

    def take(self, shape: tuple, dtype) -> np.ndarray:
        """An uninitialised C-contiguous array of this shape and dtype: a view of the smallest
        free block of its size up to twice it (small tensors leave large blocks to large ones),
        else a new array."""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        with self._lock:
            best = None
            for i, b in enumerate(self._free):
                if nbytes <= b.nbytes <= 2 * nbytes and (best is None
                                                         or b.nbytes < self._free[best].nbytes):
                    best = i
            if best is not None:
                block = self._free.pop(best)
                self.bytes -= block.nbytes
                if block.shape == shape and block.dtype == dtype:
                    return block
                return np.ndarray(shape, dtype, buffer=block)
        return np.empty(shape, dtype)

    def give(self, a) -> None:
        """Keep the memory of `a` (an array, or a view of one) for `take`, if the caller held
        the last reference to it (pass it as `give(env.pop(name))`) and nothing else holds it."""
        if not isinstance(a, np.ndarray) or _refs(a) != _ALONE:
            return
        if a.base is not None:
            if _root_refs(a) != _VIEW_ALONE:
                return
            a = a.base
        if (not isinstance(a, np.ndarray) or a.base is not None or not a.flags.owndata
                or not a.flags.c_contiguous or not a.flags.writeable):
            return
        with self._lock:
            if self.bytes + a.nbytes > self.max_bytes:
                return
            self._free.append(a)
            self.bytes += a.nbytes


class _Arena:
    """One running call's scratch memory (float32), grown on demand."""

    def __init__(self):
        self.values = np.empty(0, np.float32)
        self.start = 0                              # its first value on a 64-byte boundary
        self.carved: dict[tuple, list[np.ndarray]] = {}   # scratch's views by shapes

    def grow(self, n: int) -> None:
        self.values = np.empty(n + _ALIGN, np.float32)
        self.start = -self.values.ctypes.data // 4 % _ALIGN
        self.carved.clear()


_ALIGN = 16                                         # values: each scratch array starts on 64 bytes
_CARVED_MAX = 1024                                  # scratch requests an arena remembers

_CURRENT: ContextVar[tuple[BufferPool, _Arena] | None] = ContextVar("engine_buffer_pool",
                                                                    default=None)


def empty(shape: tuple, dtype=np.float32) -> np.ndarray:
    """np.empty, from the running plan's pool when called inside Plan.run (ops' outputs)."""
    current = _CURRENT.get()
    return np.empty(shape, dtype) if current is None else current[0].take(shape, dtype)


def scratch(*shapes: tuple) -> list[np.ndarray]:
    """Uninitialised, disjoint float32 arrays of these shapes for one kernel call: inside
    Plan.run carved from the call's arena (valid until the next `scratch` of the call), else
    np.empty."""
    current = _CURRENT.get()
    if current is None:
        return [np.empty(shape, np.float32) for shape in shapes]
    arena = current[1]
    arrays = arena.carved.get(shapes)               # a layer asks for the same every call
    if arrays is None:
        sizes = [math.prod(shape) for shape in shapes]
        if arena.values.size < sum(sizes) + _ALIGN * len(sizes):
            arena.grow(sum(sizes) + _ALIGN * len(sizes))
        arrays, start = [], arena.start
        for shape, n in zip(shapes, sizes):
            arrays.append(arena.values[start:start + n].reshape(shape))
            start += -(-n // _ALIGN) * _ALIGN
        if len(arena.carved) >= _CARVED_MAX:         # batch sizes without end: start again
            arena.carved.clear()
        arena.carved[shapes] = arrays
    return arrays


def using(pool: BufferPool):
    """Context token: `empty` draws from `pool`, and `scratch` from an arena of it (not lent to
    any other call), until `done(token)`."""
    with pool._lock:
        arena = pool._arenas.pop() if pool._arenas else _Arena()
    return _CURRENT.set((pool, arena))


def done(token) -> None:
    pool, arena = _CURRENT.get()
    _CURRENT.reset(token)
    with pool._lock:
        pool._arenas.append(arena)

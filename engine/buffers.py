"""Output buffers recycled across calls, as an inference runtime's arena does: a tensor that
dies inside Plan.run gives its memory to the plan's pool, and the next op asking for an array
of that shape and dtype (`empty`) takes it, instead of fresh pages from the OS.

Why: glibc returns large freed blocks to the OS (heap trim, munmap), so every call's first
writes into its new outputs page-fault. BasisConv VGG-16 at batch 16 took 1,500 faults per call,
about 1 ms of its 11 (ResNet-18 BasisConv: 1.8 of 19.5 ms); dense models, whose larger buffers
keep the heap grown, had none.

A buffer is recycled only when nothing else refers to it (CPython's reference count, measured
against a fresh array's): a view kept by a later tensor, a graph output, the caller's input or
an activation the caller holds are never taken. The pool holds at most `max_bytes` (Plan sets
the largest call's peak), under a lock: concurrent calls on one Model each get their own
buffers. Intermediates inside an op are not pooled (the TT chain keeps its own scratch).
"""
from __future__ import annotations

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
    """Dead arrays by (shape, dtype), for `empty` to hand out again."""

    def __init__(self, max_bytes: int = 0):
        self.max_bytes = max_bytes
        self.bytes = 0                              # held now
        self._free: dict[tuple, list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def take(self, shape: tuple, dtype) -> np.ndarray:
        """An uninitialised C-contiguous array of this shape and dtype, recycled if one is free."""
        key = (tuple(shape), np.dtype(dtype))
        with self._lock:
            stack = self._free.get(key)
            if stack:
                a = stack.pop()
                self.bytes -= a.nbytes
                return a
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
            self._free.setdefault((a.shape, a.dtype), []).append(a)
            self.bytes += a.nbytes


_CURRENT: ContextVar[BufferPool | None] = ContextVar("engine_buffer_pool", default=None)


def empty(shape: tuple, dtype=np.float32) -> np.ndarray:
    """np.empty, from the running plan's pool when called inside Plan.run (ops' outputs)."""
    pool = _CURRENT.get()
    return np.empty(shape, dtype) if pool is None else pool.take(shape, dtype)


def using(pool: BufferPool):
    """Context token: `empty` draws from `pool` until `_CURRENT.reset(token)`."""
    return _CURRENT.set(pool)


def done(token) -> None:
    _CURRENT.reset(token)

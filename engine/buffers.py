"""A call's memory, planned once per input shape as an inference runtime's arena is: each
running Plan.run holds an arena (its own, while it runs: concurrent calls on one Model never
share one), and

- an op's output (`empty`) is the view of the arena's activation block the plan laid out for
  that step (Plan._layout: steps whose outputs are alive at the same time get disjoint
  memory), if the step's first request fits it; else, and always outside Plan.run, a new
  array. Graph outputs and whatever may alias them are never laid out: the caller owns them;
- a kernel's scratch (`scratch`: padded inputs, im2col panels, partial sums) is carved from
  the arena's scratch block (valid until the next `scratch` of the call).

Both blocks grow to the largest request and are kept across calls. Why: glibc returns large
freed blocks to the OS, so fresh arrays page-fault on their first writes (BasisConv VGG-16 at
batch 16 took 1,500 faults a call, about 1 ms of its 11; fresh scratch another 1,000). A
recycling pool that found each dead buffer by reference counts avoided the faults but cost
~0.12 ms of Python a call at batch 1 (6% of BasisConv VGG-16): the layout is worked out once.
"""
from __future__ import annotations

import itertools
import math
import threading
from contextvars import ContextVar

import numpy as np

_ALIGN = 16                                         # values: each array starts on 64 bytes
_PAGE = 1024                                        # values: 4 KB
_CARVED_MAX = 1024                                  # scratch requests an arena remembers
_LAYOUTS_MAX = 64                                   # input shapes an arena keeps views for


class ArenaPool:
    """The arenas of one Plan not lent to a running call."""

    def __init__(self):
        self._arenas: list[_Arena] = []
        self._lock = threading.Lock()


class _Arena:
    """One running call's memory (float32): the planned outputs and the scratch."""

    def __init__(self, pool: ArenaPool):
        self.pool = pool                            # it goes back to
        self.scratch = np.empty(0, np.float32)      # (values + _ALIGN) carved by `scratch`
        self.slots: list[int] = []                  # scratch's slots (values): the largest
                                                    # i-th array of any request so far
        self.carved: dict[tuple, list[np.ndarray]] = {}   # scratch's views by shapes
        self.activations = np.empty(0, np.float32)  # (values + _ALIGN) laid out by a plan
        self.planned: dict[tuple, list] = {}        # per input shapes: each step's view or None
        self.out: np.ndarray | None = None          # the running step's planned output

    def outputs(self, key: tuple, layout: tuple) -> list:
        """Each step's planned output (a view of `activations` at its (offset, shape) in
        `layout`), or None; made once per input shapes `key`."""
        views = self.planned.get(key)
        if views is None:
            size = max((off + math.prod(shape) for off, shape in filter(None, layout)), default=0)
            if self.activations.size < size + _ALIGN:
                self.activations = np.empty(size + _ALIGN, np.float32)
                self.planned.clear()
            block = _aligned(self.activations)
            views = [None if at is None else block[at[0]:at[0] + math.prod(at[1])].reshape(at[1])
                     for at in layout]
            if len(self.planned) >= _LAYOUTS_MAX:
                self.planned.clear()
            self.planned[key] = views
        return views


def centred(slots: list[int], j: int, n: int) -> int:
    """Offset of n values centred in slot j of consecutive slots of these sizes (values, whole
    lines), to the 4 KB page: every array of a slot is cut in halves at (nearly) the same
    address. Why: a kernel's threads each take a contiguous part of an array (half the images,
    their own row of scratch), and a line the other thread last touched costs a transfer
    between cores, several times dearer when the host puts the two vCPUs on different L3s
    (bench/placement.py; a max pool 2.3x slower on the other thread's data). To the page, not
    the line: each array keeps its offset within a page, as at the slot's start (at 64 bytes
    the direct conv's copies and stage collided in 4K aliasing, 32x32 layers 7% slower)."""
    return sum(slots[:j]) + (slots[j] - align(n)) // 2 // _PAGE * _PAGE


def _aligned(values: np.ndarray) -> np.ndarray:
    """values from its first element on a 64-byte boundary."""
    return values[-values.ctypes.data // 4 % _ALIGN:]


def align(n: int) -> int:
    """n values rounded up to whole 64-byte lines."""
    return -(-n // _ALIGN) * _ALIGN


_CURRENT: ContextVar[_Arena | None] = ContextVar("engine_arena", default=None)


def empty(shape: tuple, dtype=np.float32) -> np.ndarray:
    """An op's output: inside Plan.run, for the step's first request, its planned memory if
    that fits (float32, at most its size; the planned shape needs no reshape), else np.empty."""
    arena = _CURRENT.get()
    if arena is not None and arena.out is not None:
        out, arena.out = arena.out, None
        if out.shape == shape and dtype is np.float32:
            return out
        n = math.prod(shape)
        if n <= out.size and np.dtype(dtype) == np.float32:
            return out.reshape(-1)[:n].reshape(shape)
    return np.empty(shape, dtype)


def scratch(*shapes: tuple) -> list[np.ndarray]:
    """Uninitialised, disjoint float32 arrays of these shapes for one kernel call: inside
    Plan.run carved from the call's arena (valid until the next `scratch` of the call), else
    np.empty."""
    arena = _CURRENT.get()
    if arena is None:
        return [np.empty(shape, np.float32) for shape in shapes]
    arrays = arena.carved.get(shapes)               # a layer asks for the same every call
    if arrays is None:
        sizes = [math.prod(shape) for shape in shapes]
        slots = [max(align(n), old) for n, old in itertools.zip_longest(sizes, arena.slots,
                                                                         fillvalue=0)]
        if slots != arena.slots:                    # the i-th array of a request: slot i
            arena.slots = slots
            arena.carved.clear()
            if arena.scratch.size < sum(slots) + _ALIGN:
                arena.scratch = np.empty(sum(slots) + _ALIGN, np.float32)
        block = _aligned(arena.scratch)
        arrays = []
        for i, (shape, n) in enumerate(zip(shapes, sizes)):
            at = centred(slots, i, n)
            arrays.append(block[at:at + n].reshape(shape))
        if len(arena.carved) >= _CARVED_MAX:         # batch sizes without end: start again
            arena.carved.clear()
        arena.carved[shapes] = arrays
    return arrays


def using(pool: ArenaPool) -> tuple:
    """(token, arena): `empty` and `scratch` draw on an arena of `pool` not lent to any other
    call, until `done(token)`."""
    with pool._lock:
        arena = pool._arenas.pop() if pool._arenas else _Arena(pool)
    return _CURRENT.set(arena), arena


def done(token) -> None:
    arena = _CURRENT.get()
    arena.out = None
    _CURRENT.reset(token)
    with arena.pool._lock:
        arena.pool._arenas.append(arena)

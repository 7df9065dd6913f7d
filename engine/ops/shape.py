"""Shape ops: flatten, reshape, permute, concat, identity.

They only move data, so NumPy is the fast path (run = reference). flatten, reshape and identity
return views of their input (no copy, Op.view); permute and concat return new C-contiguous arrays.
Cost and counted: none of them counts any operation (Cost() = 0, data movement only).

Also `ints`, `int_min` (int attribute readers) and `check_axis`, shared by the op modules.
"""
from __future__ import annotations

import numpy as np

from ..errors import FormatError
from . import Cost, Op, attr, mismatch, numel, per_shape_then_act, register


def ints(node, key: str, minimum: int, length: int | None = None) -> list[int]:
    """Attribute `key` as a list of ints >= minimum (of `length` items, or any length)."""
    if length is None:
        length = len(attr(node, key, list))
    v = attr(node, key, int, length=length)
    if any(e < minimum for e in v):
        raise FormatError(f"node '{node.name}' ({node.op}): attribute '{key}' must hold ints "
                          f">= {minimum}, got {v!r}")
    return v


def int_min(node, key: str, minimum: int) -> int:
    """Attribute `key` as an int >= minimum."""
    v = attr(node, key, int)
    if v < minimum:
        raise FormatError(f"node '{node.name}' ({node.op}): attribute '{key}' must be an int "
                          f">= {minimum}, got {v}")
    return v


def check_axis(node, shape, key: str, value: int) -> None:
    """Raise ShapeMismatch unless `value` indexes a dim of `shape`."""
    if value >= len(shape):
        raise mismatch(node, f"expected {key} < rank {len(shape)}, got {key} {value} "
                             f"for input {shape}")


class _Move(Op):
    """A data-movement op: its counting kernel is the reference, executing no operation."""

    def counted(self, node, *xs):
        return self.reference(node, *xs), Cost()


class _Reshaped(_Move):
    """A view of the input in the shape infer gives (flatten, reshape)."""
    view = True

    def reference(self, node, x):
        return x.reshape(self.infer(node, [x.shape]))

    def launcher(self, node, act):
        """The output shape worked out once per input shape."""
        return per_shape_then_act(lambda x_shape: self.infer(node, [x_shape]),
                                  lambda x, shape: x.reshape(shape), act)


@register
class Flatten(_Reshaped):
    name = "flatten"

    def check_attrs(self, node):
        s, e = int_min(node, "start_dim", 0), int_min(node, "end_dim", 0)
        if s > e:
            raise FormatError(f"node '{node.name}' (flatten): need start_dim <= end_dim, "
                              f"got {s}, {e}")

    def infer(self, node, in_shapes):
        x = tuple(in_shapes[0])
        s, e = node.attrs["start_dim"], node.attrs["end_dim"]
        check_axis(node, x, "end_dim", e)
        return x[:s] + (numel(x[s:e + 1]),) + x[e + 1:]


@register
class Reshape(_Reshaped):
    name = "reshape"

    def check_attrs(self, node):
        shape = ints(node, "shape", -1)
        if shape.count(-1) > 1:
            raise FormatError(f"node '{node.name}' (reshape): at most one -1 in shape, got {shape}")

    def infer(self, node, in_shapes):
        x = tuple(in_shapes[0])
        out = []
        for i, s in enumerate(node.attrs["shape"]):
            if s == 0:
                check_axis(node, x, "index of a 0 entry", i)
                s = x[i]
            out.append(s)
        known = numel(s for s in out if s != -1)
        if -1 in out:
            if known == 0 or numel(x) % known:
                raise mismatch(node, f"cannot infer -1 in {node.attrs['shape']} for input {x}")
            out[out.index(-1)] = numel(x) // known
        if numel(out) != numel(x):
            raise mismatch(node, f"expected {numel(x)} elements as in input {x}, "
                                 f"got shape {out} ({numel(out)} elements)")
        return tuple(out)


@register
class Permute(_Move):
    name = "permute"

    def check_attrs(self, node):
        perm = ints(node, "perm", 0)
        if sorted(perm) != list(range(len(perm))):
            raise FormatError(f"node '{node.name}' (permute): perm must be a permutation of "
                              f"0..{len(perm) - 1}, got {perm}")

    def infer(self, node, in_shapes):
        x = in_shapes[0]
        perm = node.attrs["perm"]
        if len(perm) != len(x):
            raise mismatch(node, f"expected input of rank {len(perm)} (perm {perm}), "
                                 f"got {tuple(x)}")
        return tuple(x[p] for p in perm)

    def reference(self, node, x):
        return np.ascontiguousarray(x.transpose(node.attrs["perm"]))


@register
class Concat(_Move):
    name = "concat"
    n_inputs = None

    def check_attrs(self, node):
        int_min(node, "axis", 0)

    def infer(self, node, in_shapes):
        axis = node.attrs["axis"]
        first = tuple(in_shapes[0])
        check_axis(node, first, "axis", axis)
        for s in in_shapes[1:]:
            s = tuple(s)
            if len(s) != len(first) or s[:axis] + s[axis + 1:] != first[:axis] + first[axis + 1:]:
                raise mismatch(node, f"expected inputs equal to {first} except in dim {axis}, "
                                     f"got {s}")
        return first[:axis] + (sum(s[axis] for s in in_shapes),) + first[axis + 1:]

    def reference(self, node, *xs):
        return np.concatenate(xs, axis=node.attrs["axis"])


@register
class Identity(_Move):
    name = "identity"
    view = True

    def reference(self, node, x):
        return x

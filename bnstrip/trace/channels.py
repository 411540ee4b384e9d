"""Where a tensor's channel axis goes through ops that keep the per-channel mapping (reshapes, permutes, averages).

A BatchNorm is a per-channel affine map, so it commutes with any op that moves each channel's
values without mixing channels: a reshape that merges or splits only the dims around the channel
axis (LeViT's `bn(x.flatten(0, 1)).reshape_as(x)`), a permute, an identity in eval (Dropout), and
an average over other dims (global average pooling: averaging commutes with x * s + t). The fold
rules follow the channel axis through such ops with `carry_axis`; anything else mixes channels or
is unknown, and stops them.
"""
from __future__ import annotations

import math
import operator
from typing import Any

import torch.fx as fx
from torch import nn

from bnstrip.trace.opgraph import Op
from bnstrip.trace.reads import call_name, identity_in_eval

_RESHAPES = {"flatten", "unflatten", "view", "reshape", "reshape_as", "view_as", "_unsafe_view", "squeeze",
             "unsqueeze", "_reshape_alias"}
"""Row-major reshapes: the channel axis survives when the dims before and after it keep their total sizes."""
_IDENTITIES = {"contiguous", "clone", "detach", "alias", "lift_fresh_copy"}
_PERMUTES = {"permute", "transpose", "swapaxes", "swapdims"}
_MEANS = {"mean"}
_ADAPTIVE = {"adaptive_avg_pool1d": 1, "adaptive_avg_pool2d": 2, "adaptive_avg_pool3d": 3,
             "_adaptive_avg_pool2d": 2, "_adaptive_avg_pool3d": 3}
_MODULES: tuple[type[nn.Module], ...] = (nn.Flatten, nn.Unflatten, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                                         nn.AdaptiveAvgPool3d)
"""Modules that move or average channels; identities in eval (Dropout, nn.Identity) are bnstrip.trace.reads'."""


def shape_of(op: Op) -> tuple[int, ...] | None:
    """The output shape seen on the example inputs (fx: val_shape from the rank pass; export: meta['val'])."""
    node = op.node
    if node is None:
        return None
    shape = node.meta.get("val_shape")
    if shape is None:
        shape = getattr(node.meta.get("val"), "shape", None)
    try:
        return tuple(int(s) for s in shape) if shape is not None else None
    except (TypeError, ValueError):  # symbolic sizes
        return None


def data_input(op: Op) -> Op | None:
    """The op whose output is this call's first (data) argument."""
    node = op.node
    if node is None:
        return None
    first = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
    return next((i for i in op.inputs if i.node is first), None) if isinstance(first, fx.Node) else None


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def passes_channels(op: Op) -> bool:
    """Whether `op` is one of the ops `carry_axis` can follow (not yet whether it keeps this axis)."""
    if op.kind != "other" or op.node is None or op.note:
        return False
    if identity_in_eval(op):
        return True
    if op.node.op == "call_module":
        return isinstance(op.module, _MODULES)
    if op.node.op not in ("call_method", "call_function"):
        return False
    return call_name(op.node) in _RESHAPES | _IDENTITIES | _PERMUTES | _MEANS | set(_ADAPTIVE)


def _reshaped_axis(axis: int, before: tuple[int, ...], after: tuple[int, ...]) -> int | None:
    """The axis of `after` holding channel c at index c, when the sizes before and after it are kept."""
    outer, size = math.prod(before[:axis]), before[axis]
    for index, n in enumerate(after):
        if n == size and math.prod(after[:index]) == outer:
            return index
    return None


def _dims(value: Any, rank: int) -> list[int] | None:
    if isinstance(value, int):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(d, int) for d in value):
        return None
    return [d % rank for d in value] if rank else None


def carry_axis(op: Op, axis: int) -> int | str:
    """Where the channel axis `axis` of `op`'s data input lies in its output, or why it does not survive."""
    source = data_input(op)
    before, after = (shape_of(source) if source else None), shape_of(op)
    node = op.node
    if before is None or after is None or node is None:  # a known shape_of(op) has a node
        return f"the shapes around {op.label} are unknown; pass example inputs (example_inputs)"
    rank = len(before)
    kind = type(op.module).__name__ if node.op == "call_module" else call_name(node)
    lost = f"{op.label} mixes its channel dim {axis} with others"
    if identity_in_eval(op) or kind in _IDENTITIES:
        return axis if before == after else lost
    if isinstance(op.module, (nn.Flatten, nn.Unflatten)) or kind in _RESHAPES:
        found = _reshaped_axis(axis, before, after)
        return lost if found is None else found
    if kind in _PERMUTES:
        if kind == "permute":
            order = node.args[1:] if len(node.args) > 2 else _arg(node, 1, "dims", None)
            order = _dims(list(order) if isinstance(order, (list, tuple)) else order, rank)
        else:
            pair = _dims([_arg(node, 1, "dim0", None), _arg(node, 2, "dim1", None)], rank)
            order = None if pair is None else list(range(rank))
            if order is not None and pair is not None:
                order[pair[0]], order[pair[1]] = pair[1], pair[0]
        return lost if order is None or axis not in order else order.index(axis)
    pooled = _ADAPTIVE.get(kind) or next((k for cls, k in ((nn.AdaptiveAvgPool1d, 1), (nn.AdaptiveAvgPool2d, 2),
                                                             (nn.AdaptiveAvgPool3d, 3)) if isinstance(op.module, cls)), 0)
    if pooled:
        return axis if axis < rank - pooled and len(after) == rank else lost
    if kind in _MEANS:
        dims = _dims(_arg(node, 1, "dim", None), rank)
        keep = _arg(node, 2, "keepdim", False)
        if dims is None or axis in dims or _arg(node, 3, "dtype", None) is not None or not isinstance(keep, bool):
            return lost
        return axis if keep else axis - sum(d < axis for d in dims)
    return lost


def carry_axis_through(chain: list[Op], axis: int) -> int | str:
    """carry_axis along a chain of ops, first to last: where `axis` ends up, or why it does not get through."""
    for step in chain:
        carried = carry_axis(step, axis)
        if isinstance(carried, str):
            return carried
        axis = carried
    return axis


def concatenated(op: Op) -> tuple[list[Op | None], int] | None:
    """(the concatenated ops in order, dim) when `op` is a torch.cat of graph values, else None."""
    node = op.node
    if node is None or node.op != "call_function" or call_name(node) not in ("cat", "concat", "concatenate"):
        return None
    pieces = _arg(node, 0, "tensors", None)
    dim = _arg(node, 1, "dim", 0)
    if not isinstance(pieces, (list, tuple)) or not isinstance(dim, int):
        return None
    by_node = {i.node: i for i in op.inputs}
    return [by_node.get(p) if isinstance(p, fx.Node) else None for p in pieces], dim


_SPLITS = {"split", "split_with_sizes", "unsafe_split", "unsafe_split_with_sizes", "chunk"}


def _split_ranges(node: fx.Node, length: int) -> list[tuple[int, int]] | None:
    """[start, stop) of each piece of a split/chunk of `length` elements along its dim, or None when unknown."""
    name = call_name(node)
    spec = _arg(node, 1, "chunks" if name == "chunk" else "split_size_or_sections", None)
    if spec is None:
        spec = next((node.kwargs[k] for k in ("split_size", "split_sizes", "sections") if k in node.kwargs), None)
    if name == "chunk" and isinstance(spec, int) and spec > 0:
        spec = -(-length // spec)  # torch.chunk: pieces of ceil(length / chunks)
    if isinstance(spec, int) and spec > 0:
        spec = [min(spec, length - start) for start in range(0, length, spec)]
    if not isinstance(spec, (list, tuple)) or not all(isinstance(s, int) and s >= 0 for s in spec) \
            or sum(spec) != length:
        return None
    starts = [sum(spec[:i]) for i in range(len(spec))]
    return [(start, start + size) for start, size in zip(starts, spec, strict=True)]


def _split_dim(node: fx.Node) -> Any:
    return _arg(node, 2, "dim", 0)


def is_split(op: Op) -> bool:
    """A split/chunk call: its pieces are the getitems that read it."""
    node = op.node
    return node is not None and node.op in ("call_function", "call_method") and call_name(node) in _SPLITS


def channel_slice(op: Op) -> tuple[Op, int, int, int] | None:
    """(the sliced op, dim, start, stop) when `op` is one contiguous slice of another op's output along one dim:
    a piece of split/chunk (lambda_resnet26t's q, k, v = torch.split(qkv, ...)), `x[:, a:b]` or aten.slice."""
    node = op.node
    if node is None or node.op not in ("call_function", "call_method"):
        return None
    source = data_input(op)
    if source is None or source.node is None:
        return None
    before = shape_of(source)
    if node.target is operator.getitem and isinstance(node.args[1], int):
        split = source.node
        if split.op not in ("call_function", "call_method") or call_name(split) not in _SPLITS:
            return None
        data = data_input(source)
        shape = shape_of(data) if data is not None else None
        dim = _split_dim(split)
        if data is None or shape is None or not isinstance(dim, int):
            return None
        ranges = _split_ranges(split, shape[dim % len(shape)])
        if ranges is None or not -len(ranges) <= node.args[1] < len(ranges):
            return None
        return (data, dim % len(shape), *ranges[node.args[1]])
    if before is None:
        return None
    if node.target is operator.getitem:
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if len(index) > len(before) or not all(isinstance(i, slice) for i in index):
            return None
        cut = [(d, i) for d, i in enumerate(index) if i != slice(None)]
        if len(cut) != 1 or cut[0][1].step not in (None, 1):
            return None
        dim, part = cut[0]
        start, stop, _ = part.indices(before[dim])
        return (source, dim, start, max(start, stop))
    if call_name(node) == "slice" and not isinstance(node.target, str):  # aten.slice.Tensor(x, dim, start, end, step)
        dim, start, stop, step = (_arg(node, i, k, d) for i, k, d in ((1, "dim", 0), (2, "start", None),
                                                                       (3, "end", None), (4, "step", 1)))
        if not isinstance(dim, int) or step != 1 or not all(isinstance(v, (int, type(None))) for v in (start, stop)):
            return None
        dim %= len(before)
        start, stop, _ = slice(start, stop).indices(before[dim])
        return (source, dim, start, max(start, stop))
    return None

"""Fold matcher for a BatchNorm after a layer and constant per-channel arithmetic: conv -> * c -> + a -> BN
(PyTorch's JIT freezing test `conv -> mul -> add -> bn`).

The ops between stay in the model. They map the layer's output y to z = A y + B per channel, and
the BatchNorm maps z to s z + t. The layer with weight s W and bias s b + (s B + t - B) / A then
gives the same A y' + B = s (A y + B) + t, exactly in real arithmetic, when no A is 0. Constants
are Python numbers or tensors the graph reads as attributes whose shape keeps channels apart
(a scalar, or (1, C, 1, 1)-like). The table that lists this matcher is bnstrip.fold.rules.PATTERNS.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import cast

import torch
from torch import fx, nn

from bnstrip._torch import ConvNd, ConvTransposeNd
from bnstrip.core.foldmath import BNStats, bn_scale_shift
from bnstrip.fold.rules_adjacent import (
    Match,
    bn_channels,
    bn_rank,
    layer_issue,
    out_channels,
)
from bnstrip.trace.opgraph import Op, OpGraph
from bnstrip.trace.reads import call_name, reading_users

_MUL, _ADD, _SUB, _DIV = {"mul", "__mul__"}, {"add", "__add__"}, {"sub", "__sub__"}, {"truediv", "div", "true_divide",
                                                                                       "__truediv__"}


@dataclass(frozen=True)
class Through:
    """A layer that absorbs a BatchNorm through per-channel affine ops z = a * y + b (float64 per channel)."""

    layer: Op
    a: torch.Tensor
    b: torch.Tensor


def through_stats(stats: BNStats, a: torch.Tensor, b: torch.Tensor, name: str) -> BNStats:
    """Statistics whose fold into the layer gives what the BatchNorm gives after z = a * y + b (see the docstring):
    scale s and shift (s b + t - b) / a, as a BatchNorm with mean 0, variance 1 and eps 0 (exact in float64)."""
    scale, shift = bn_scale_shift(stats, name)
    ones = torch.ones_like(scale)
    return BNStats(torch.zeros_like(scale), ones, scale, (scale * b + shift - b) / a, 0.0)


def _attribute(op: Op) -> bool:
    """A read of a module tensor: an fx get_attr, or torch.export's lifted parameter/buffer input."""
    node = op.node
    return node is not None and (node.op == "get_attr" or (node.op == "placeholder" and op.label.startswith("parameter ")))


def _constant(value: object, attrs: dict[fx.Node, str], root: nn.Module, channels: int,
              rank: int) -> torch.Tensor | None:
    """A per-channel float64 vector for a constant operand, or None when it is not one (or mixes channels)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.full((channels,), float(value), dtype=torch.float64)
    if not isinstance(value, fx.Node) or value not in attrs:
        return None
    try:
        tensor = root.get_buffer(attrs[value])
    except AttributeError:
        try:
            tensor = root.get_parameter(attrs[value])
        except AttributeError:
            return None
    if not tensor.is_floating_point() or tensor.dim() > rank:
        return None
    shape = [1] * (rank - tensor.dim()) + list(tensor.shape)
    if any(n != 1 for d, n in enumerate(shape) if d != 1) or shape[1] not in (1, channels):
        return None
    return tensor.detach().to(torch.float64).reshape(-1).expand(channels).clone()


def _step(op: Op, root: nn.Module, channels: int, rank: int) -> tuple[Op, str, torch.Tensor] | None:
    """(data input, 'mul'/'add'/'sub'/'div', the constant) for `op` = data (op) constant, else None."""
    node = op.node
    data_ops = [i for i in op.inputs if not _attribute(i)]
    if node is None or node.op not in ("call_function", "call_method") or node.kwargs or len(node.args) != 2 \
            or len(data_ops) != 1 or op.note:
        return None
    name = call_name(node)
    kind = next((k for k, names in (("mul", _MUL), ("add", _ADD), ("sub", _SUB), ("div", _DIV)) if name in names), None)
    if kind is None or (node.op == "call_function" and node.target not in (
            operator.mul, operator.add, operator.sub, operator.truediv, torch.mul, torch.add, torch.sub, torch.div)
            and getattr(node.target, "_schema", None) is None):
        return None
    data = data_ops[0]
    first, second = node.args
    if first is data.node and second is not data.node:
        constant = second
    elif second is data.node and kind in ("mul", "add"):
        constant = first
    else:
        return None
    value = _constant(constant, {i.node: i.name for i in op.inputs if i.node is not None and _attribute(i)}, root, channels, rank)
    return None if value is None else (data, kind, value)


def try_through_affine(bn: Op, graph: OpGraph, root: nn.Module, keep_structure: bool) -> Match | Through:
    """layer -> * c / + a / - a / / c (constants per channel) -> BN: the layer absorbs it, the ops stay."""
    channels, rank = bn_channels(bn, root), bn_rank(bn)
    steps: list[tuple[str, torch.Tensor]] = []
    op, reader = bn.inputs[0] if bn.inputs else None, bn
    while op is not None and rank is not None and len(steps) < 8 and (step := _step(op, root, channels, rank)):
        if reading_users(op) != [reader]:
            return f"{op.label} also feeds another op, which must keep its values"
        steps.insert(0, step[1:])
        op, reader = step[0], op
    if not steps:
        return None
    if op is None or op.kind != "layer" or op.own_forward is not None \
            or isinstance(op.module, ConvTransposeNd):
        return f"its input comes through constant arithmetic from {op.label if op else 'outside the graph'}, not a Conv/Linear"
    if keep_structure:
        return "keep_structure=True keeps it, and the arithmetic before it would apply to the shift"
    if issue := layer_issue(op, graph, "its producer"):
        return issue
    if reading_users(op) != [reader]:
        return f"the output of {op.name} also feeds another op, which must keep the unnormalised values"
    module = cast("ConvNd | nn.Linear", op.module)  # a 'layer' op's module is a conv or a Linear
    want = 2 if isinstance(module, nn.Linear) else module.weight.dim()
    if rank != want or out_channels(module) != channels:
        return f"{op.name}'s output channels are not the channels it normalises"
    a, b = torch.ones(channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64)
    for kind, value in steps:
        if kind == "mul":
            a, b = a * value, b * value
        elif kind == "div":
            a, b = a / value, b / value
        else:
            b = b + value if kind == "add" else b - value
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all()) and bool((a != 0).all())):
        return "the arithmetic before it multiplies some channel by 0 (or is not finite), so it cannot be moved"
    return Through(op, a, b)

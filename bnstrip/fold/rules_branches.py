"""Fold matchers where the BatchNorm's data forks: it normalises one slice of a layer's output, or its output
feeds several layers.

* `try_slice`: conv -> split / chunk / `x[:, a:b]` -> BN on one piece (timm's lambda_resnet26t normalises q and
  v of one qkv conv). The layer's output channels are independent rows of its weight, so that slice of rows
  absorbs the BatchNorm; the other pieces read rows that do not change.
* `try_consumers`: BN -> (reshapes/permutes/averages) -> several Linear or unpadded convs (NextViT's key and
  value, MobileNetV4-hybrid's attention). Each consumer absorbs it on its own: W' = W diag(s), b' = b + W t.

The table that lists these matchers is bnstrip.fold.rules.PATTERNS.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from torch import nn

from bnstrip._torch import ConvNd, ConvTransposeNd
from bnstrip.fold.rules_adjacent import (
    Match,
    input_channels,
    aliasing_issue,
    bn_channels,
    bn_rank,
    consumer_fits,
    layer_issue,
)
from bnstrip.trace.channels import (
    carry_axis_through,
    channel_slice,
    data_input,
    is_split,
    passes_channels,
    shape_of,
)
from bnstrip.trace.opgraph import Op, OpGraph
from bnstrip.trace.reads import reading_users


@dataclass(frozen=True)
class Rows:
    """A layer whose output channels [start, stop) absorb the whole BatchNorm (a BatchNorm on a slice)."""

    layer: Op
    start: int
    stop: int


def _ranges_read(layer: Op, dim: int) -> list[tuple[Op, int | None, int | None]]:
    """Each op that reads `layer`'s output values, with the range along `dim` it reads (None: all of it);
    the pieces of a split are its readers."""
    found: list[tuple[Op, int | None, int | None]] = []
    for reader in reading_users(layer):
        parts = reading_users(reader) if is_split(reader) else [reader]
        for part in parts:
            cut = channel_slice(part)
            known = cut is not None and cut[0] is layer and cut[1] == dim
            found.append((part, cut[2], cut[3]) if cut is not None and known else (part, None, None))
    return found


def try_slice(bn: Op, graph: OpGraph, root: nn.Module, keep_structure: bool) -> Match | Rows:
    """conv -> one slice of its channels -> BN: the slice's rows of the conv absorb it."""
    piece = bn.inputs[0] if bn.inputs else None
    found = channel_slice(piece) if piece is not None else None
    if piece is None or found is None:
        return None
    layer, dim, start, stop = found
    if layer.kind != "layer":
        return f"it normalises a slice of {layer.label}, not of a Conv or Linear"
    if keep_structure:
        return "keep_structure=True keeps a BatchNorm on a slice of a layer, whose other channels keep their bias"
    if issue := layer_issue(layer, graph, "the sliced layer") or layer.own_forward:
        return issue
    if isinstance(layer.module, ConvTransposeNd):
        return f"it normalises a slice of ConvTranspose {layer.name}"
    rank = len(shape_of(layer) or ())
    if not rank:
        return f"the shape of {layer.name}'s output is unknown; pass example inputs (example_inputs)"
    module = cast("ConvNd | nn.Linear", layer.module)  # a 'layer' op's module is a conv or a Linear
    channel_dim = rank - 1 if isinstance(module, nn.Linear) else 1
    if dim != channel_dim or rank != (2 if isinstance(module, nn.Linear) else module.weight.dim()):
        return f"it normalises a slice along dim {dim} of {layer.name}'s output, not of its channels"
    if (bn_rank(bn) or rank) != rank:
        return f"it normalises a tensor of another rank than {layer.name}'s output"
    if stop - start != bn_channels(bn, root):
        return f"the slice has {stop - start} channels of {layer.name} but it has {bn_channels(bn, root)}"
    if [r for r in reading_users(piece)] != [bn]:
        return f"the slice of {layer.name} also feeds another op, which must keep the unnormalised values"
    for reader, low, high in _ranges_read(layer, dim):
        if reader is piece:
            continue
        if low is None or high is None or (low < stop and start < high):
            return (f"{reader.label} also reads channels {start}..{stop - 1} of {layer.name}, which must keep the "
                    "unnormalised values")
    return Rows(layer, start, stop)


def try_consumers(bn: Op, graph: OpGraph, root: nn.Module, keep_structure: bool) -> Match:
    """BN -> ops that keep channels whole -> several Linear/conv layers: each absorbs it (W diag(s), b + W t)."""
    chain: list[Op] = []
    op = bn
    while len(readers := reading_users(op)) == 1 and passes_channels(readers[0]) and data_input(readers[0]) is op \
            and len(chain) < 16:
        op = readers[0]
        chain.append(op)
    consumers = reading_users(op)
    if len(consumers) < 2:
        return None
    if not keep_structure and (issue := aliasing_issue(bn, chain[0] if chain else consumers[0], graph)):
        return issue
    axis = 1
    carried = carry_axis_through(chain, axis)
    if isinstance(carried, str):
        return carried
    axis = carried
    rank = len(shape_of(op) or ()) or (bn_rank(bn) if not chain else None)
    if rank is None:
        return f"the rank of {op.label}'s output is unknown; pass example inputs (example_inputs)"
    found = []
    for consumer in consumers:
        if issue := _consumer_issue(bn, op, consumer, axis, rank, graph, root, keep_structure):
            return f"its output feeds {len(consumers)} layers, and {issue}"
        found.append((consumer, None, None))
    return found


def _consumer_issue(bn: Op, op: Op, consumer: Op, axis: int, rank: int, graph: OpGraph, root: nn.Module,
                    keep_structure: bool) -> str | None:
    """Why `consumer`, one of several readers of `op` (the BatchNorm's output carried to `axis`), cannot absorb it."""
    if consumer.kind != "layer" or consumer.own_forward is not None \
            or isinstance(consumer.module, ConvTransposeNd):
        return f"{consumer.label} is not a Linear or Conv that can absorb it"
    if issue := layer_issue(consumer, graph, "the next layer"):
        return issue
    if consumer.inputs != [op]:
        return f"{consumer.name} takes other inputs too"
    channels = input_channels(consumer, axis, rank)
    if isinstance(channels, str):
        return channels
    fits = consumer_fits(bn, consumer, channels, root, keep_structure)
    return None if isinstance(fits, Op) else fits

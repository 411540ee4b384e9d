"""Fold matchers that look past the BatchNorm's direct neighbour: through reshapes, permutes and global
averages (LeViT, classifier heads), into concatenated layers (MixNet), and (layer, BN) pairs called together.

Each keeps the per-channel mapping exact: bnstrip.trace.channels follows the channel axis op by op.
The table that lists these matchers is bnstrip.fold.rules.PATTERNS.
"""
from __future__ import annotations

from torch import nn

from bnstrip._torch import ConvTransposeNd
from bnstrip.core.foldmath import BNStats
from bnstrip.fold.rules_adjacent import (Match, aliasing_issue, bn_channels, bn_rank, bn_stats, consumer_fits,
                                         input_channels, layer_issue, layer_module, out_channels, own_forward_consumer_proof,
                                         own_forward_proof, try_producer)
from bnstrip.trace.channels import carry_axis_through, concatenated, data_input, passes_channels, shape_of
from bnstrip.trace.opgraph import Op, OpGraph
from bnstrip.trace.reads import reading_users


def _channel_axis(layer: Op, rank: int | None) -> int | None:
    """The dim of `layer`'s output holding its output channels: last for a Linear, 1 for a batched conv."""
    if rank is None:
        return None
    module = layer_module(layer)
    if isinstance(module, nn.Linear):
        return rank - 1
    return {module.weight.dim(): 1, module.weight.dim() - 1: 0}.get(rank)


def _feeds_only(op: Op, nxt: Op) -> str | None:
    readers = reading_users(op)
    if readers == [nxt]:
        return None
    other = next((r for r in readers if r is not nxt), None)
    return (f"the output of {op.name} also feeds {other.label if other else 'nothing'}, which must keep the "
            "unnormalised values")


def try_producer_through(bn: Op, graph: OpGraph, root: nn.Module) -> Match:
    """Layer -> reshapes/permutes/averages that keep each channel whole -> BN (LeViT's bn(x.flatten(0, 1)))."""
    chain: list[Op] = []
    op = bn.inputs[0] if bn.inputs else None
    while op is not None and passes_channels(op) and len(chain) < 16:
        chain.insert(0, op)
        op = data_input(op)
    if not chain:
        return None
    if op is None or op.kind != "layer":
        return f"its input comes through {chain[-1].label} from {op.label if op else 'outside the graph'}, not from a layer"
    if issue := layer_issue(op, graph, "its producer") or op.own_forward:
        return issue
    for source, nxt in zip([op] + chain, chain + [bn], strict=True):
        if issue := _feeds_only(source, nxt):
            return issue
    axis = _channel_axis(op, len(shape_of(op) or ()) or op.rank)
    if axis is None:
        return f"the layout of {op.name}'s output is unknown; pass example inputs (example_inputs)"
    carried = carry_axis_through(chain, axis)
    if isinstance(carried, str):
        return carried
    axis = carried
    if axis != 1:
        return f"the channels of {op.name} reach dim {axis} of its input, but it normalises dim 1"
    if out_channels(layer_module(op)) != bn_channels(bn, root):
        return f"{op.name} produces {out_channels(layer_module(op))} channels but it has {bn_channels(bn, root)}"
    return op


def try_concat(bn: Op, graph: OpGraph, root: nn.Module) -> Match:
    """cat([conv_a(x), conv_b(y)], dim=1) -> BN: each producer absorbs its own slice of the channels (MixNet)."""
    cat = concatenated(bn.inputs[0]) if bn.inputs else None
    if cat is None:
        return None
    joined, (pieces, dim) = bn.inputs[0], cat
    if issue := _feeds_only(joined, bn):
        return issue
    rank = len(shape_of(joined) or ()) or bn_rank(bn)
    if rank is None:
        return f"the rank of {joined.label}'s output is unknown; pass example inputs (example_inputs)"
    if dim % rank != 1:
        return f"it normalises dim 1 but {joined.label} concatenates along dim {dim}"
    found: list[tuple[Op, int, int]] = []
    for piece in pieces:
        if piece is None or piece.kind != "layer":
            return (f"{joined.label} also concatenates {piece.label if piece else 'a value from outside the graph'}, "
                    "which cannot absorb its channels")
        if any(piece is p for p, _, _ in found):
            return f"{joined.label} concatenates the output of {piece.name} more than once"
        if issue := layer_issue(piece, graph, "the concatenated layer") or _feeds_only(piece, joined):
            return issue
        if _channel_axis(piece, rank) != 1:
            return f"{joined.label} concatenates {piece.name}'s output along dim 1, which is not its channel dim"
        start = found[-1][2] if found else 0
        if piece.own_forward is not None:  # Conv2dSame-like: prove its slice of the BatchNorm, as try_producer does
            stop = min(start + out_channels(layer_module(piece)), bn_channels(bn, root))
            if issue := own_forward_proof(piece, bn, graph, stats_slice(bn_stats(bn, root, None), start, stop)):
                return f"{joined.label} concatenates {piece.label}: {issue}"
        found.append((piece, start, start + out_channels(layer_module(piece))))
    if not found or found[-1][2] != bn_channels(bn, root):
        return f"the concatenated layers produce {found[-1][2] if found else 0} channels but it has {bn_channels(bn, root)}"
    return found


def stats_slice(stats: BNStats, start: int, stop: int) -> BNStats:
    """The statistics of channels [start, stop) of a BatchNorm."""
    weight, bias = stats.weight, stats.bias
    return BNStats(stats.running_mean[start:stop], stats.running_var[start:stop],
                   None if weight is None else weight[start:stop], None if bias is None else bias[start:stop], stats.eps)


def try_consumer_through(bn: Op, graph: OpGraph, root: nn.Module, keep_structure: bool) -> Match:
    """BN -> global average / flatten / Dropout / reshapes -> Linear or conv (classifier heads of ConvMixer, LeViT).

    Exact because every op in between moves or averages each channel's values on their own, and
    averaging commutes with the BatchNorm's x * s + t.
    """
    chain: list[Op] = []
    op = bn
    while len(readers := reading_users(op)) == 1 and passes_channels(readers[0]) and data_input(readers[0]) is op:
        op = readers[0]
        chain.append(op)
        if len(chain) >= 16:
            break
    if not chain:
        return None
    readers = reading_users(op)
    if len(readers) != 1:
        return f"the output of {op.label} feeds {len(readers)} ops"
    consumer = readers[0]
    if consumer.kind != "layer" or isinstance(consumer.module, ConvTransposeNd):
        return f"its output goes through {chain[-1].label} to {consumer.label}, not to a Linear or Conv"
    if issue := layer_issue(consumer, graph, "the next layer"):
        return issue
    if consumer.inputs != [op]:
        return f"the next layer {consumer.name} takes other inputs too"
    if not keep_structure and (issue := aliasing_issue(bn, chain[0], graph)):
        return issue
    axis = 1
    carried = carry_axis_through(chain, axis)
    if isinstance(carried, str):
        return carried
    axis = carried
    rank = len(shape_of(op) or ())
    if consumer.own_forward is not None and (issue := own_forward_consumer_proof(consumer, bn, graph, root, op, axis)):
        return issue
    channels = input_channels(consumer, axis, rank)
    if isinstance(channels, str):
        return channels
    return consumer_fits(bn, consumer, channels, root, keep_structure)


def try_repeated_pair(bn: Op, graph: OpGraph, root: nn.Module) -> Op | str:
    """A (layer, BN) pair called together several times (shared weights): every call of each is the pair's."""
    calls = graph.calls.get(bn.name, 1)
    refused = f"it is called {calls} times, so folding would change every call"
    if bn.functional is not None:
        return refused
    layers = []
    for call in (op for op in graph.ops if op.kind == "bn" and op.name == bn.name):
        match = try_producer(call, graph, root, calls_ok=calls)
        if not isinstance(match, Op):
            return f"{refused}, and not every call comes right after the same layer ({match})"
        layers.append(match)
    if len(layers) != calls or len({layer.name for layer in layers}) != 1 \
            or graph.calls.get(layers[0].name, 1) != calls:
        return f"{refused}, and its calls do not all come right after one layer called as often"
    return layers[0]

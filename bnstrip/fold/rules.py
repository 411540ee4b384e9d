"""The fold rules, as a table of patterns (the way torch.ao's fuse_modules maps module pairs to fusers).

Each `Pattern` says where a BatchNorm may go and a matcher that returns the layer that absorbs
it or the reason it cannot; `decide` walks PATTERNS in order after the checks that apply to the
BatchNorm itself (`bn_issue`). A new fold pattern is a new matcher and a new row of PATTERNS.
Every rule accepts only rewrites that are exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Union

import torch
from torch import nn

from bnstrip.core.foldmath import BNStats, bn_scale_shift
from bnstrip.errors import InputError
from bnstrip.fold.proof import own_forward_issue
from bnstrip.trace.alias import other_readers, writer_of
from bnstrip.trace.channels import carry_axis, concatenated, data_input, passes_channels, reading_users, shape_of
from bnstrip.trace.bn_registry import batchnorm_entry, module_stats
from bnstrip.trace.classify import bn_fixed_rank
from bnstrip.trace.opgraph import Op, OpGraph, identity_in_eval, value_users

INTO_PRODUCER = "producer"
INTO_CONSUMER = "consumer"


@dataclass
class Fold:
    layer: Op
    bn: Op
    into: str
    pieces: list[tuple[Op, int, int]] = field(default_factory=list)
    """For a BatchNorm after a concatenation: each producer and the channels [start, stop) it absorbs."""

    def parts(self) -> list[tuple[Op, int | None, int | None]]:
        """(layer, start, stop) for each layer that absorbs the BatchNorm; None: all of its channels."""
        return list(self.pieces) if self.pieces else [(self.layer, None, None)]

    @property
    def layer_name(self) -> str:
        return " + ".join(layer.name for layer, _, _ in self.parts())


def _bn_channels(bn: Op, root: nn.Module) -> int:
    if bn.module is not None:
        return int(module_stats(bn.module).running_mean.numel())
    return int(tensor_at(root, bn.functional.mean).numel())


def _bn_rank(bn: Op) -> int | None:
    return bn.rank if bn.rank is not None else bn_fixed_rank(bn.module)


def _layer_issue(layer: Op, graph: OpGraph, role: str, calls_ok: int = 1) -> str | None:
    """Why `layer` cannot absorb a BatchNorm whatever its shapes; `calls_ok`: calls allowed (a pair called together)."""
    calls = graph.calls.get(layer.name, 1)
    if calls > calls_ok:
        return f"{role} {layer.name} is called {calls} times, so folding would change every call"
    if layer.name in graph.refusals:
        return f"{role} {layer.name}: {graph.refusals[layer.name]}"
    return None


def _through_identities_back(op: Op, user: Op) -> tuple[Op, Op]:
    """(the op before a chain of identity-in-eval ops that only `user` reads, the chain's first op or `user`)."""
    while identity_in_eval(op) and value_users(op) == [user]:
        op, user = op.inputs[0], op
    return op, user


def _through_identities_forward(op: Op) -> tuple[list[Op], Op | None]:
    """(value users of `op`, or those of the last of a chain of identity-in-eval ops it alone feeds; that last op)."""
    last = None
    users = value_users(op)
    while len(users) == 1 and identity_in_eval(users[0]) and users[0].inputs == [op if last is None else last]:
        last = users[0]
        users = value_users(last)
    return users, last


def _try_producer(bn: Op, graph: OpGraph, root: nn.Module, calls_ok: int = 1) -> Op | str:
    if not bn.inputs:
        return "its input is not in the traced graph"
    producer, reader = _through_identities_back(bn.inputs[0], bn)
    if producer.own_forward is not None and not graph.example_run:
        return (f"its input comes from {producer.label}, which {producer.own_forward.split(', so ')[0]}; folding "
                "into it needs a real run to prove it: pass example inputs (example_inputs)")
    if producer.kind != "layer":
        if producer.note:
            return f"its input comes from {producer.label}, which cannot absorb it ({producer.note})"
        return f"its input comes from {producer.label}, not directly from a Conv, ConvTranspose or Linear"
    if issue := _layer_issue(producer, graph, "its producer", calls_ok):
        return issue
    others = [u for u in value_users(producer) if u is not reader]
    if others:
        return f"the output of {producer.name} also feeds {others[0].label}, which must keep the unnormalised values"
    module = producer.module
    rank = _bn_rank(bn)
    if isinstance(module, nn.Linear):
        if rank is None:
            return (f"its input rank is unknown, and BatchNorm1d after Linear {producer.name} is exact only on 2-D "
                    "input; pass example inputs (example_inputs)")
        if rank != 2:
            return (f"it normalises dim 1 of the {rank}-D output of Linear {producer.name}, whose features are the "
                    "last dim, so folding would scale the wrong axis")
    else:
        if rank is None:
            return (f"its input rank is unknown (an unbatched {type(module).__name__} output would put channels on "
                    "dim 0); pass example inputs (example_inputs)")
        if rank != module.weight.dim():
            return (f"it normalises dim 1 of a {rank}-D tensor, which is not the channel dim of "
                    f"{producer.name}'s output (unbatched call?)")
    out_channels = module.out_features if isinstance(module, nn.Linear) else module.out_channels
    if out_channels != _bn_channels(bn, root):
        return f"{producer.name} produces {out_channels} channels but it has {_bn_channels(bn, root)}"
    if producer.own_forward is not None:  # Conv2dSame-like: prove that scaling its channels scales its output
        key = (producer.name, bn.name)  # plan_folds asks again on every pass: prove once
        if key not in graph.proofs:
            shape = shape_of(producer.inputs[0]) if producer.inputs else None
            shape = (1, *shape[1:]) if shape else shape  # one sample is enough for a per-channel map
            graph.proofs[key] = own_forward_issue(module, shape, bn_stats(bn, root, None), f"{producer.name} + {bn.name}")
        if issue := graph.proofs[key]:
            return f"its input comes from {producer.label}: {issue}"
    return producer


def _zero_padded(conv: nn.Module) -> bool:
    """True when the conv reads zeros outside its input (where a BN shift would not be applied)."""
    if conv.padding_mode != "zeros":
        return False
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return False
        return any(d * (k - 1) > 0 for d, k in zip(conv.dilation, conv.kernel_size))
    return any(p != 0 for p in conv.padding)


def _try_consumer(bn: Op, graph: OpGraph, root: nn.Module, keep_structure: bool) -> Op | str:
    if (entry := batchnorm_entry(bn.module)) is not None and entry.post is not None:
        return f"{type(bn.module).__name__} applies more after normalising, so it cannot move into the next layer"
    users, last = _through_identities_forward(bn)
    if not users:
        return "its output is unused"
    if len(users) > 1:
        return f"its output feeds {len(users)} ops ({', '.join(u.label for u in users[:3])})"
    consumer = users[0]
    if consumer.own_forward is not None:
        return f"its output goes to {consumer.label}, which cannot absorb it ({consumer.own_forward})"
    if consumer.kind != "layer":
        if consumer.note:
            return f"its output goes to {consumer.label}, which cannot absorb it ({consumer.note})"
        return f"its output goes to {consumer.label}, not directly to a Linear or Conv"
    module = consumer.module
    if consumer.module is not None and isinstance(module, nn.modules.conv._ConvTransposeNd):
        return (f"it feeds ConvTranspose {consumer.name}, where border outputs sum fewer taps of the BatchNorm's "
                "shift, so folding into it is not exact")
    if issue := _layer_issue(consumer, graph, "the next layer"):
        return issue
    if consumer.inputs != [bn if last is None else last]:
        return f"the next layer {consumer.name} takes other inputs too"
    if not keep_structure and (issue := _aliasing_issue(bn, consumer, graph)):
        return issue
    rank = _bn_rank(bn)
    if isinstance(module, nn.Linear):
        if rank is None:
            return f"its input rank is unknown, and folding into Linear {consumer.name} is exact only on 2-D input; pass example inputs (example_inputs)"
        if rank != 2:
            return (f"it normalises dim 1 of a {rank}-D tensor but Linear {consumer.name} mixes the last dim, "
                    "so it cannot absorb it")
        in_channels = module.in_features
    else:
        if rank is None or rank != module.weight.dim():
            return f"its input rank is {'unknown' if rank is None else rank}, not the batched rank {module.weight.dim()} of {consumer.name}"
        in_channels = module.in_channels
    return _consumer_fits(bn, consumer, in_channels, root, keep_structure)


def _consumer_fits(bn: Op, consumer: Op, in_channels: int, root: nn.Module, keep_structure: bool) -> Op | str:
    """The checks on the layer after a BatchNorm once its channels are known to land on the layer's inputs."""
    module = consumer.module
    if not isinstance(module, nn.Linear) and _zero_padded(module):
        return (f"the next conv {consumer.name} zero-pads (padding={module.padding}) and padded zeros never get "
                "the BatchNorm's shift, so folding into it is not exact")
    if in_channels != _bn_channels(bn, root):
        return f"{consumer.name} takes {in_channels} channels but it has {_bn_channels(bn, root)}"
    if keep_structure and module.bias is None:
        return f"keep_structure=True: the next layer {consumer.name} has no bias to hold the folded shift"
    return consumer


def _root_hooks(root: nn.Module) -> bool:
    return bool(root._forward_hooks or root._forward_pre_hooks or getattr(root, "_forward_hooks_with_kwargs", None))


def bn_issue(bn: Op, graph: OpGraph, root: nn.Module, keep_structure: bool, eps: float | None,
             repeated_ok: bool = False) -> str | None:
    """Why this BatchNorm cannot be folded anywhere, whatever its neighbours (repeated_ok: calls are checked later)."""
    if bn.note:
        return bn.note
    calls = graph.calls.get(bn.name, 1)
    if calls > 1 and not repeated_ok:
        return f"it is called {calls} times, so folding would change every call"
    if bn.name in graph.refusals:
        return graph.refusals[bn.name]
    if bn.functional is not None and not keep_structure and _root_hooks(root):
        return (f"{type(root).__name__} has forward hooks, and removing a functional batch_norm needs an fx "
                "GraphModule, which would drop them (use keep_structure=True)")
    try:
        bn_scale_shift(bn_stats(bn, root, eps), bn.name)
    except InputError as exc:
        return f"its statistics cannot be folded: {exc}"
    own_eps = bn.functional.eps if bn.functional is not None else module_stats(bn.module).eps
    if keep_structure and not (math.isfinite(own_eps) and 0 <= own_eps < 1):
        return f"keep_structure=True: its eps={own_eps} is not in [0, 1), so it cannot become an exact identity"
    return None


def _aliasing_issue(bn: Op, consumer: Op, graph: OpGraph) -> str | None:
    """Why dropping the BatchNorm would let an in-place write reach `consumer`, or None.

    Without the BatchNorm its output is its input tensor itself, so a write into that input
    (or a view of it) between the two calls would now reach the consumer. Only forms that delete
    the BatchNorm are affected; keep_structure=True keeps it as a real op.
    """
    source = bn.inputs[0] if bn.inputs else None
    if source is None:
        return None
    changed = f"without the BatchNorm, {consumer.name} would read that same tensor, changed"
    if (writer := writer_of(source, skip=bn)) is not None:
        return f"its input is also changed in place by {writer.label}; {changed}"
    if bn.name in graph.input_written:
        return f"its input is changed in place ({graph.input_written[bn.name]}) after it runs; {changed}"
    if not graph.sees_inplace and (readers := other_readers(source, skip=bn)):
        return (f"its input is also used by {readers[0].label}, and torch.fx records `x += y` as out-of-place, so "
                "an in-place change cannot be ruled out without example inputs; pass example inputs (example_inputs)")
    return None


Match = Union[Op, list, str, None]
"""What a matcher returns: the absorbing layer, [(layer, start, stop)] for a concatenation, why not, or None
when the pattern does not apply at all (it then adds nothing to the reasons)."""


def _out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _channel_axis(layer: Op, rank: int | None) -> int | None:
    """The dim of `layer`'s output holding its output channels: last for a Linear, 1 for a batched conv."""
    if rank is None:
        return None
    if isinstance(layer.module, nn.Linear):
        return rank - 1
    return {layer.module.weight.dim(): 1, layer.module.weight.dim() - 1: 0}.get(rank)


def _feeds_only(op: Op, nxt: Op) -> str | None:
    readers = reading_users(op)
    if readers == [nxt]:
        return None
    other = next((r for r in readers if r is not nxt), None)
    return (f"the output of {op.name} also feeds {other.label if other else 'nothing'}, which must keep the "
            "unnormalised values")


def _try_producer_through(bn: Op, graph: OpGraph, root: nn.Module) -> Match:
    """Layer -> reshapes/permutes/averages that keep each channel whole -> BN (LeViT's bn(x.flatten(0, 1)))."""
    chain, op = [], bn.inputs[0] if bn.inputs else None
    while op is not None and passes_channels(op) and len(chain) < 16:
        chain.insert(0, op)
        op = data_input(op)
    if not chain:
        return None
    if op is None or op.kind != "layer":
        return f"its input comes through {chain[-1].label} from {op.label if op else 'outside the graph'}, not from a layer"
    if issue := _layer_issue(op, graph, "its producer") or getattr(op, "own_forward", None):
        return issue
    for source, nxt in zip([op] + chain, chain + [bn]):
        if issue := _feeds_only(source, nxt):
            return issue
    axis: int | str | None = _channel_axis(op, len(shape_of(op) or ()) or op.rank)
    if axis is None:
        return f"the layout of {op.name}'s output is unknown; pass example inputs (example_inputs)"
    for step in chain:
        if isinstance(axis := carry_axis(step, axis), str):
            return axis
    if axis != 1:
        return f"the channels of {op.name} reach dim {axis} of its input, but it normalises dim 1"
    if _out_channels(op.module) != _bn_channels(bn, root):
        return f"{op.name} produces {_out_channels(op.module)} channels but it has {_bn_channels(bn, root)}"
    return op


def _try_concat(bn: Op, graph: OpGraph, root: nn.Module) -> Match:
    """cat([conv_a(x), conv_b(y)], dim=1) -> BN: each producer absorbs its own slice of the channels (MixNet)."""
    cat = concatenated(bn.inputs[0]) if bn.inputs else None
    if cat is None:
        return None
    joined, (pieces, dim) = bn.inputs[0], cat
    if issue := _feeds_only(joined, bn):
        return issue
    rank = len(shape_of(joined) or ()) or _bn_rank(bn)
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
        if issue := (_layer_issue(piece, graph, "the concatenated layer") or getattr(piece, "own_forward", None)
                     or _feeds_only(piece, joined)):
            return issue
        if _channel_axis(piece, rank) != 1:
            return f"{joined.label} concatenates {piece.name}'s output along dim 1, which is not its channel dim"
        start = found[-1][2] if found else 0
        found.append((piece, start, start + _out_channels(piece.module)))
    if not found or found[-1][2] != _bn_channels(bn, root):
        return f"the concatenated layers produce {found[-1][2] if found else 0} channels but it has {_bn_channels(bn, root)}"
    return found


def _try_consumer_through(bn: Op, graph: OpGraph, root: nn.Module, keep_structure: bool) -> Match:
    """BN -> global average / flatten / Dropout / reshapes -> Linear or conv (classifier heads of ConvMixer, LeViT).

    Exact because every op in between moves or averages each channel's values on their own, and
    averaging commutes with the BatchNorm's x * s + t.
    """
    chain, op = [], bn
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
    if consumer.kind != "layer" or isinstance(consumer.module, nn.modules.conv._ConvTransposeNd):
        return f"its output goes through {chain[-1].label} to {consumer.label}, not to a Linear or Conv"
    if issue := _layer_issue(consumer, graph, "the next layer") or getattr(consumer, "own_forward", None):
        return issue
    if consumer.inputs != [op]:
        return f"the next layer {consumer.name} takes other inputs too"
    if not keep_structure and (issue := _aliasing_issue(bn, chain[0], graph)):
        return issue
    axis: int | str = 1
    for step in chain:
        if isinstance(axis := carry_axis(step, axis), str):
            return axis
    module, rank = consumer.module, len(shape_of(op) or ())
    if isinstance(module, nn.Linear):
        if axis != rank - 1:
            return f"its channels reach dim {axis} of the input of Linear {consumer.name}, which mixes the last dim"
        channels = module.in_features
    else:
        if axis != 1 or rank != module.weight.dim():
            return f"its channels reach dim {axis} of a {rank}-D input of {consumer.name}, not its channel dim"
        channels = module.in_channels
    return _consumer_fits(bn, consumer, channels, root, keep_structure)


def _try_repeated_pair(bn: Op, graph: OpGraph, root: nn.Module) -> Op | str:
    """A (layer, BN) pair called together several times (shared weights): every call of each is the pair's."""
    calls = graph.calls.get(bn.name, 1)
    refused = f"it is called {calls} times, so folding would change every call"
    if bn.functional is not None:
        return refused
    layers = []
    for call in (op for op in graph.ops if op.kind == "bn" and op.name == bn.name):
        match = _try_producer(call, graph, root, calls_ok=calls)
        if not isinstance(match, Op):
            return f"{refused}, and not every call comes right after the same layer ({match})"
        layers.append(match)
    if len(layers) != calls or len({layer.name for layer in layers}) != 1 \
            or graph.calls.get(layers[0].name, 1) != calls:
        return f"{refused}, and its calls do not all come right after one layer called as often"
    return layers[0]


@dataclass(frozen=True)
class Pattern:
    """One way to fold a BatchNorm: `matcher` returns the layer that absorbs it, or why that is not possible."""

    name: str
    into: str
    where: str
    matcher: Callable[[Op, OpGraph, nn.Module, bool], Match]


PATTERNS: list[Pattern] = [
    Pattern("conv/linear -> BN", INTO_PRODUCER, "into the layer before",
            lambda bn, graph, root, keep: _try_producer(bn, graph, root)),
    Pattern("layer -> reshape/permute/average -> BN", INTO_PRODUCER, "through the ops before it",
            lambda bn, graph, root, keep: _try_producer_through(bn, graph, root)),
    Pattern("cat(layers) -> BN", INTO_PRODUCER, "into the concatenated layers",
            lambda bn, graph, root, keep: _try_concat(bn, graph, root)),
    Pattern("BN -> linear/conv", INTO_CONSUMER, "into the layer after", _try_consumer),
    Pattern("BN -> global average/flatten/reshape -> linear/conv", INTO_CONSUMER, "through the ops after it",
            _try_consumer_through),
]
"""Tried in order; the first match wins. A new fold pattern is a matcher plus a row here."""


def decide(bn: Op, graph: OpGraph, root: nn.Module, keep_structure: bool, eps: float | None = None) -> Fold | str:
    """The first pattern of PATTERNS that folds `bn`, or every pattern's reason why not."""
    if issue := bn_issue(bn, graph, root, keep_structure, eps, repeated_ok=True):
        return issue
    if graph.calls.get(bn.name, 1) > 1:  # the "(layer, BN) called together" pattern, the only one for repeats
        match = _try_repeated_pair(bn, graph, root)
        return Fold(match, bn, INTO_PRODUCER) if isinstance(match, Op) else match
    reasons = []
    for pattern in PATTERNS:
        match = pattern.matcher(bn, graph, root, keep_structure)
        if isinstance(match, Op):
            return Fold(match, bn, pattern.into)
        if isinstance(match, list):
            return Fold(match[0][0], bn, pattern.into, pieces=match)
        if match is not None:
            reasons.append(f"{pattern.where}: {match}")
    return "not folded " + "; nor ".join(reasons)


def tensor_at(root: nn.Module, path: str) -> torch.Tensor:
    """The parameter or buffer at a dotted path (a functional batch_norm's statistics can be either)."""
    try:
        return root.get_buffer(path)
    except AttributeError:
        return root.get_parameter(path)


def bn_stats(bn: Op, root: nn.Module, eps: float | None) -> BNStats:
    if bn.functional is not None:
        spec = bn.functional
        return BNStats(tensor_at(root, spec.mean), tensor_at(root, spec.var),
                       tensor_at(root, spec.weight) if spec.weight else None,
                       tensor_at(root, spec.bias) if spec.bias else None, spec.eps)
    return module_stats(bn.module, eps)

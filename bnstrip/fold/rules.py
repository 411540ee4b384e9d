"""The fold rules, as a table of patterns (the way torch.ao's fuse_modules maps module pairs to fusers).

Each `Pattern` says where a BatchNorm may go and a matcher that returns the layer that absorbs
it or the reason it cannot; `decide` walks PATTERNS in order after the checks that apply to the
BatchNorm itself (`bn_issue`). A new fold pattern is a new matcher and a new row of PATTERNS.
Every rule accepts only rewrites that are exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from bnstrip.core.foldmath import BNStats, bn_scale_shift
from bnstrip.errors import InputError
from bnstrip.trace.alias import other_readers, writer_of
from bnstrip.trace.classify import bn_fixed_rank
from bnstrip.trace.opgraph import Op, OpGraph

INTO_PRODUCER = "producer"
INTO_CONSUMER = "consumer"


@dataclass
class Fold:
    layer: Op
    bn: Op
    into: str


def _bn_channels(bn: Op, root: nn.Module) -> int:
    if bn.module is not None:
        return int(bn.module.running_mean.numel())
    return int(tensor_at(root, bn.functional.mean).numel())


def _bn_rank(bn: Op) -> int | None:
    return bn.rank if bn.rank is not None else bn_fixed_rank(bn.module)


def _layer_issue(layer: Op, graph: OpGraph, role: str) -> str | None:
    calls = graph.calls.get(layer.name, 1)
    if calls > 1:
        return f"{role} {layer.name} is called {calls} times, so folding would change every call"
    if layer.name in graph.refusals:
        return f"{role} {layer.name}: {graph.refusals[layer.name]}"
    return None


def _try_producer(bn: Op, graph: OpGraph, root: nn.Module) -> Op | str:
    if not bn.inputs:
        return "its input is not in the traced graph"
    producer = bn.inputs[0]
    if producer.kind != "layer":
        if producer.note:
            return f"its input comes from {producer.label}, which cannot absorb it ({producer.note})"
        return f"its input comes from {producer.label}, not directly from a Conv, ConvTranspose or Linear"
    if issue := _layer_issue(producer, graph, "its producer"):
        return issue
    others = [u for u in producer.users if u is not bn]
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
    if not bn.users:
        return "its output is unused"
    if len(bn.users) > 1:
        return f"its output feeds {len(bn.users)} ops ({', '.join(u.label for u in bn.users[:3])})"
    consumer = bn.users[0]
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
    if consumer.inputs != [bn]:
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
        if _zero_padded(module):
            return (f"the next conv {consumer.name} zero-pads (padding={module.padding}) and padded zeros never get "
                    "the BatchNorm's shift, so folding into it is not exact")
        in_channels = module.in_channels
    if in_channels != _bn_channels(bn, root):
        return f"{consumer.name} takes {in_channels} channels but it has {_bn_channels(bn, root)}"
    if keep_structure and module.bias is None:
        return f"keep_structure=True: the next layer {consumer.name} has no bias to hold the folded shift"
    return consumer


def _root_hooks(root: nn.Module) -> bool:
    return bool(root._forward_hooks or root._forward_pre_hooks or getattr(root, "_forward_hooks_with_kwargs", None))


def bn_issue(bn: Op, graph: OpGraph, root: nn.Module, keep_structure: bool, eps: float | None) -> str | None:
    """Why this BatchNorm cannot be folded anywhere, whatever its neighbours."""
    if bn.note:
        return bn.note
    calls = graph.calls.get(bn.name, 1)
    if calls > 1:
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
    own_eps = bn.functional.eps if bn.functional is not None else float(bn.module.eps)
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


@dataclass(frozen=True)
class Pattern:
    """One way to fold a BatchNorm: `matcher` returns the layer that absorbs it, or why that is not possible."""

    name: str
    into: str
    where: str
    matcher: Callable[[Op, OpGraph, nn.Module, bool], "Op | str"]


PATTERNS: list[Pattern] = [
    Pattern("conv/linear -> BN", INTO_PRODUCER, "into the layer before",
            lambda bn, graph, root, keep: _try_producer(bn, graph, root)),
    Pattern("BN -> linear/conv", INTO_CONSUMER, "into the layer after", _try_consumer),
]
"""Tried in order; the first match wins. A new fold pattern is a matcher plus a row here."""


def decide(bn: Op, graph: OpGraph, root: nn.Module, keep_structure: bool, eps: float | None = None) -> Fold | str:
    """The first pattern of PATTERNS that folds `bn`, or every pattern's reason why not."""
    if issue := bn_issue(bn, graph, root, keep_structure, eps):
        return issue
    reasons = []
    for pattern in PATTERNS:
        match = pattern.matcher(bn, graph, root, keep_structure)
        if isinstance(match, Op):
            return Fold(match, bn, pattern.into)
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
    m = bn.module
    return BNStats(m.running_mean, m.running_var, m.weight, m.bias, float(m.eps if eps is None else eps))

"""The fold rules, as a table of patterns (the way torch.ao's fuse_modules maps module pairs to fusers).

Each `Pattern` says where a BatchNorm may go and a matcher that returns the layer that absorbs
it or the reason it cannot; `decide` walks PATTERNS in order after the checks that apply to the
BatchNorm itself (`bn_issue`). A new fold pattern is a new matcher (next to its layer:
bnstrip.fold.rules_adjacent; through other ops: bnstrip.fold.rules_structural) and a new row of
PATTERNS. Every rule accepts only rewrites that are exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from bnstrip._torch import has_forward_hooks
from bnstrip.core.foldmath import bn_scale_shift
from bnstrip.errors import InputError
from bnstrip.fold.rules_adjacent import Match, bn_stats, tail_issue, tensor_at, try_consumer, try_producer
from bnstrip.fold.rules_affine import Through, try_through_affine
from bnstrip.fold.rules_branches import Rows, try_consumers, try_slice
from bnstrip.fold.rules_structural import try_concat, try_consumer_through, try_producer_through, try_repeated_pair
from bnstrip.trace.bn_registry import module_stats
from bnstrip.trace.opgraph import Op, OpGraph

__all__ = ["INTO_CONSUMER", "INTO_PRODUCER", "PATTERNS", "Fold", "Match", "Pattern", "bn_issue", "bn_stats",
           "decide", "tensor_at"]

INTO_PRODUCER = "producer"
INTO_CONSUMER = "consumer"


@dataclass
class Fold:
    layer: Op
    bn: Op
    into: str
    pieces: list[tuple[Op, int, int]] = field(default_factory=list)
    """For a BatchNorm after a concatenation: each producer and the channels [start, stop) it absorbs. For one
    read by several layers: each consumer, with None, None."""
    rows: tuple[int, int] | None = None
    through: tuple[torch.Tensor, torch.Tensor] | None = None
    """For layer -> constant arithmetic z = a * y + b -> BN: (a, b) per channel in float64 (rules_affine)."""
    """For a BatchNorm on a slice of the layer's output: the layer's output channels [start, stop) absorb it."""

    def parts(self) -> list[tuple[Op, int | None, int | None]]:
        """(layer, start, stop) for each layer that absorbs the BatchNorm; None: all of its channels."""
        return list(self.pieces) if self.pieces else [(self.layer, None, None)]

    @property
    def layer_name(self) -> str:
        return " + ".join(layer.name for layer, _, _ in self.parts())


def _root_hooks(root: nn.Module) -> bool:
    return has_forward_hooks(root)


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
    except AttributeError:  # F.batch_norm on plain tensor attributes: not in the state_dict
        return ("its tensors are plain attributes, not parameters or buffers of the model, so a fold into them "
                "could not be saved; register them with register_buffer")
    if bn.functional is not None:
        own_eps = bn.functional.eps
    else:
        assert bn.module is not None  # a BatchNorm op is a functional call or a module's
        own_eps = module_stats(bn.module).eps
    if keep_structure and not (math.isfinite(own_eps) and 0 <= own_eps < 1):
        return f"keep_structure=True: its eps={own_eps} is not in [0, 1), so it cannot become an exact identity"
    return None


@dataclass(frozen=True)
class Pattern:
    """One way to fold a BatchNorm: `matcher` returns the layer that absorbs it, or why that is not possible."""

    name: str
    into: str
    where: str
    matcher: Callable[[Op, OpGraph, nn.Module, bool], Match | Rows | Through]


PATTERNS: list[Pattern] = [
    Pattern("conv/linear -> BN", INTO_PRODUCER, "into the layer before",
            lambda bn, graph, root, keep: try_producer(bn, graph, root)),
    Pattern("layer -> reshape/permute/average -> BN", INTO_PRODUCER, "through the ops before it",
            lambda bn, graph, root, keep: try_producer_through(bn, graph, root)),
    Pattern("cat(layers) -> BN", INTO_PRODUCER, "into the concatenated layers",
            lambda bn, graph, root, keep: try_concat(bn, graph, root)),
    Pattern("layer -> split/chunk/slice -> BN", INTO_PRODUCER, "into the rows of the sliced layer", try_slice),
    Pattern("layer -> * constant / + constant -> BN", INTO_PRODUCER, "through constant arithmetic into the layer",
            try_through_affine),
    Pattern("BN -> linear/conv", INTO_CONSUMER, "into the layer after", try_consumer),
    Pattern("BN -> global average/flatten/reshape -> linear/conv", INTO_CONSUMER, "through the ops after it",
            try_consumer_through),
    Pattern("BN -> (reshape/permute/average) -> several linear/conv", INTO_CONSUMER, "into each layer it feeds",
            try_consumers),
]
"""Tried in order; the first match wins. A new fold pattern is a matcher plus a row here."""


def decide(bn: Op, graph: OpGraph, root: nn.Module, keep_structure: bool, eps: float | None = None) -> Fold | str:
    """The first pattern of PATTERNS that folds `bn`, or every pattern's reason why not."""
    if issue := bn_issue(bn, graph, root, keep_structure, eps, repeated_ok=True):
        return issue
    if graph.calls.get(bn.name, 1) > 1:  # the "(layer, BN) called together" pattern, the only one for repeats
        pair = try_repeated_pair(bn, graph, root)
        return Fold(pair, bn, INTO_PRODUCER) if isinstance(pair, Op) else pair
    reasons = []
    tail = tail_issue(bn)  # one rule for every pattern that folds into a later layer
    for pattern in PATTERNS:
        if pattern.into == INTO_CONSUMER and tail:
            reasons.append(f"{pattern.where}: {tail}")
            continue
        match = pattern.matcher(bn, graph, root, keep_structure)
        if isinstance(match, Op):
            return Fold(match, bn, pattern.into)
        if isinstance(match, Through):
            return Fold(match.layer, bn, pattern.into, through=(match.a, match.b))
        if isinstance(match, Rows):
            return Fold(match.layer, bn, pattern.into, rows=(match.start, match.stop))
        if isinstance(match, list):
            return Fold(match[0][0], bn, pattern.into, pieces=match)
        if match is not None:
            reasons.append(f"{pattern.where}: {match}")
    return "not folded " + "; nor ".join(reasons)

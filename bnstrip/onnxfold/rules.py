"""The ONNX fold rules, as a table (PATTERNS, like bnstrip.fold.rules): where a BatchNormalization may go.

Each row names the layer, the direction and a matcher that returns a `Match` (what to scale,
along which axis, where the bias goes) or the reason it cannot fold. `decide` runs the checks
on the BatchNormalization itself (`bn_issue`), walks past the ops that keep values and
channels unchanged in inference (PASS_THROUGH), then tries PATTERNS in order. Every rule
accepts only rewrites that are exact; `bnstrip.onnxfold.edit` applies them in float64.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bnstrip.onnxfold.graph import STANDARD_DOMAINS, Scope, attr, is_float_tensor

INTO_PRODUCER = "producer"
INTO_CONSUMER = "consumer"


@dataclass
class Match:
    """How one BatchNormalization folds into `layer` (see edit.apply_match)."""

    layer: Any
    into: str
    weight: int
    """Input index of the layer's weight initializer."""
    axis: int
    """Axis of the weight that the BatchNorm's channels map to (output channels, or input channels)."""
    groups: int = 1
    bias_node: Any = None
    """The node whose constant input holds the bias (the layer, or the Add after a MatMul); None: no bias yet."""
    bias_index: int = -1
    channel_shape: tuple[int, ...] = ()
    """Shape the per-channel scale/shift take to broadcast against the layer's output ((C,) or (C, 1))."""
    beta: float = 1.0
    alpha: float = 1.0
    chain: list[Any] = field(default_factory=list)
    """The pass-through nodes between the layer and the BatchNorm, in data order."""
    padded: bool = False
    """A consumer Conv that reads padding: exact only when the BatchNorm's shift is zero."""
    repeat: int = 1
    """Each BatchNorm channel covers this many consecutive input features of the layer (a Flatten between them)."""


def _dropout_issue(node: Any, scope: Scope) -> str | None:
    if any(name and scope.uses(name) for name in node.output[1:]):
        return "its mask output is used"
    if len(node.input) > 2 and node.input[2]:
        mode = scope.constant(node.input[2])
        if mode is None:
            return "its training_mode input is not a constant"
        import onnx

        if bool(onnx.numpy_helper.to_array(mode).any()):
            return "its training_mode is true"
    return None


def _reshape_issue(node: Any, scope: Scope) -> str | None:
    before, after = scope.shapes.get(node.input[0]), scope.shapes.get(node.output[0])
    if not before or not after or len(before) < 2 or len(after) < 2:
        return "its shapes are unknown"
    if before[0] != after[0] or before[1] is None or before[1] != after[1]:
        return f"it maps shape {before} to {after}, which moves the channel axis"
    if None in before[2:] or None in after[2:] or math.prod(before[2:]) != math.prod(after[2:]):
        return f"it maps shape {before} to {after}: the batch may be regrouped"
    return None


def _pad_issue(node: Any, scope: Scope) -> str | None:
    """Edge/reflect/wrap padding of the spatial axes repeats values, so a per-channel affine map commutes with it."""
    mode = attr(node, "mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else str(mode)
    if mode not in ("edge", "reflect", "wrap"):
        return f"mode={mode} pads with a value the BatchNorm would have changed"
    if len(node.input) > 3 and node.input[3]:
        return "it pads selected axes"
    if len(node.input) > 1 and node.input[1]:
        if scope.computed_from_constants(node.input[1]) is None:
            return "its pads are not constant"
        pads = [int(v) for v in scope.evaluate(node.input[1]).ravel()]
    else:
        pads = [int(v) for v in attr(node, "pads", [])]
    rank = len(pads) // 2
    if rank < 2 or any(pads[i] for i in (0, 1, rank, rank + 1)):
        return "it pads the batch or channel axis"
    return None


PASS_THROUGH: dict[str, Callable[[Any, Scope], str | None]] = {
    "Identity": lambda node, scope: None,
    "Pad": _pad_issue,
    "Dropout": _dropout_issue,
    "Flatten": _reshape_issue,
    "Reshape": _reshape_issue,
}
"""Ops a BatchNorm folds through, each with the check that it keeps values and the channel axis."""


def bn_issue(bn: Any, scope: Scope) -> str | None:
    """Why this BatchNormalization cannot fold anywhere, whatever its neighbours."""
    if attr(bn, "training_mode", 0):
        return "training_mode=1: it normalises with batch statistics"
    if attr(bn, "spatial", 1) != 1:
        return "spatial=0: per-activation statistics, not per channel"
    if any(name and scope.uses(name) for name in bn.output[1:]):
        return "its running-statistics outputs are used (a training graph)"
    for name, what in zip(bn.input[1:5], ("scale", "B", "input_mean", "input_var"), strict=True):
        if name in scope.graph_inputs:
            return f"its {what} '{name}' is a graph input, so it can change at run time"
        tensor = scope.constant(name)
        if tensor is None and name not in scope.producers:
            return f"its {what} '{name}' comes from an outer graph, not a constant of its own"
        if tensor is None:
            return f"its {what} '{name}' is computed in the graph, not a constant"
        if not is_float_tensor(tensor):
            return f"its {what} '{name}' is not float16/32/64"
    rank = scope.rank(bn.input[0])
    if rank is not None and rank < 2:
        return f"its input has rank {rank}"
    return None


def _walk_up(name: str, scope: Scope, chain: list[Any]) -> tuple[Any, str] | str:
    """The node producing `name` past pass-through ops (each read only by the next), and the value it feeds on."""
    node = scope.producers.get(name)
    while node is not None and node.op_type in PASS_THROUGH and node.domain in STANDARD_DOMAINS:
        if scope.uses(node.output[0]) != 1:
            return f"{node.op_type} '{node.name}' before it has other readers"
        if issue := PASS_THROUGH[node.op_type](node, scope):
            return f"{node.op_type} '{node.name}' before it: {issue}"
        chain.insert(0, node)
        name = node.input[0]
        node = scope.producers.get(name)
    if node is None:
        return "its input comes from no layer (a graph input or an initializer)"
    if scope.uses(name) != 1:
        return f"'{node.name or node.op_type}' output has other readers"
    return node, name


def flatten_repeat(node: Any, scope: Scope) -> int | None:
    """k when Flatten/Reshape maps static (N, C, d1, ...) to (N, C*k), k = d1*...: channel c becomes features
    [c*k, (c+1)*k), so a BatchNorm before it acts on the next layer's inputs as its (s, t) repeated k times."""
    if node.op_type not in ("Flatten", "Reshape"):
        return None
    before, after = scope.shapes.get(node.input[0]), scope.shapes.get(node.output[0])
    if not before or not after or len(before) < 3 or len(after) != 2 or None in before[1:]:
        return None
    if node.op_type == "Flatten" and attr(node, "axis", 1) != 1:
        return None
    k = math.prod(before[2:])
    return k if before[0] == after[0] and after[1] == before[1] * k else None


def _walk_down(name: str, scope: Scope, chain: list[Any], repeat: list[int] | None = None) -> tuple[Any, str] | str:
    """The single reader of `name` past pass-through ops, and the value it reads (`repeat` collects flatten_repeat)."""
    while True:
        if name in scope.graph_outputs:
            return "its output is a graph output"
        node = scope.only_reader(name)
        if node is None:
            return "its output has several readers (or one inside a subgraph)"
        if node.op_type not in PASS_THROUGH or node.domain not in STANDARD_DOMAINS or node.input[0] != name:
            return node, name
        k = flatten_repeat(node, scope) if repeat is not None else None
        if k is not None and repeat is not None:
            repeat[0] *= k
        elif issue := PASS_THROUGH[node.op_type](node, scope):
            return f"{node.op_type} '{node.name}' after it: {issue}"
        chain.append(node)
        name = node.output[0]


def _weight(node: Any, index: int, scope: Scope, rank: int | None = None) -> str | None:
    if len(node.input) <= index or not node.input[index]:
        return "it has no weight"
    name = node.input[index]
    if not is_constant(scope, name):
        return f"its weight '{name}' is not computed from constants only"
    tensor = scope.constant(name)
    if tensor is not None and not is_float_tensor(tensor):
        return f"its weight '{name}' is not float16/32/64"
    shape = scope.shapes.get(name)
    if rank is not None and (shape is None or len(shape) != rank):
        return f"its weight has rank {None if shape is None else len(shape)}, not {rank}"
    return None


def is_constant(scope: Scope, name: str) -> bool:
    """An initializer, a Constant node, or computed from those only (edit.materialize evaluates it once)."""
    return scope.constant(name) is not None or scope.computed_from_constants(name) is not None


def _bias(match: Match, node: Any, index: int, scope: Scope) -> Match | str:
    if len(node.input) > index and node.input[index]:
        tensor = scope.constant(node.input[index])
        if tensor is None or not is_float_tensor(tensor):
            return f"its bias '{node.input[index]}' is not a float constant initializer"
        match.bias_node, match.bias_index = node, index
    return match


def producer_conv(layer: Any, scope: Scope, channels: int) -> Match | str:
    transpose = layer.op_type == "ConvTranspose"
    if issue := _weight(layer, 1, scope):
        return issue
    groups = int(attr(layer, "group", 1))
    match = Match(layer, INTO_PRODUCER, weight=1, axis=1 if transpose else 0, groups=groups if transpose else 1,
                  channel_shape=(channels,))
    return _bias(match, layer, 2, scope)


def producer_gemm(layer: Any, scope: Scope, channels: int) -> Match | str:
    if issue := _weight(layer, 1, scope, rank=2):
        return issue
    beta = float(attr(layer, "beta", 1.0))
    if beta == 0:
        return "beta=0"
    match = Match(layer, INTO_PRODUCER, weight=1, axis=0 if attr(layer, "transB", 0) else 1, beta=beta,
                  channel_shape=(channels,))
    return _bias(match, layer, 2, scope)


def producer_matmul(layer: Any, scope: Scope, channels: int, add: Any = None) -> Match | str:
    """MatMul(X, W) with a 2-D output (channels are W's columns) or MatMul(W, X) with a 3-D one (W's rows)."""
    out_rank = scope.rank(layer.output[0])
    shape: tuple[int, ...]
    if is_constant(scope, layer.input[1]) and out_rank == 2:
        weight, axis, shape = 1, 1, (channels,)
    elif is_constant(scope, layer.input[0]) and out_rank == 3:
        weight, axis, shape = 0, 0, (channels, 1)
    else:
        return f"its constant operand does not carry the BatchNorm's channel axis (output rank {out_rank})"
    if issue := _weight(layer, weight, scope, rank=2):
        return issue
    match = Match(layer, INTO_PRODUCER, weight=weight, axis=axis, channel_shape=shape)
    if add is None:
        return match
    constant = 1 if scope.constant(add.input[1]) is not None else 0
    return _bias(match, add, constant, scope)


def consumer_conv(layer: Any, scope: Scope, channels: int) -> Match | str:
    if layer.input[0] == "" or (issue := _weight(layer, 1, scope)):
        return issue or "it has no input"
    pads = list(attr(layer, "pads", []) or [])
    auto_pad = attr(layer, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    padded = any(pads) or auto_pad in ("SAME_UPPER", "SAME_LOWER")
    match = Match(layer, INTO_CONSUMER, weight=1, axis=1, groups=int(attr(layer, "group", 1)), padded=padded,
                  channel_shape=(channels,))
    return _bias(match, layer, 2, scope)


def consumer_gemm(layer: Any, scope: Scope, channels: int) -> Match | str:
    if attr(layer, "transA", 0):
        return "transA=1: the BatchNorm's channels are the Gemm's rows"
    if issue := _weight(layer, 1, scope, rank=2):
        return issue
    beta = float(attr(layer, "beta", 1.0))
    if beta == 0:
        return "beta=0"
    match = Match(layer, INTO_CONSUMER, weight=1, axis=1 if attr(layer, "transB", 0) else 0, beta=beta,
                  alpha=float(attr(layer, "alpha", 1.0)), channel_shape=(channels,))
    return _bias(match, layer, 2, scope)


def consumer_matmul(layer: Any, scope: Scope, channels: int, data: int) -> Match | str:
    """BN -> MatMul(Y, W) with Y 2-D (W's rows) or MatMul(W, Y) with Y 3-D (W's columns)."""
    rank = scope.rank(layer.input[data])
    if data == 0 and rank == 2:
        weight, axis = 1, 0
    elif data == 1 and rank == 3:
        weight, axis = 0, 1
    else:
        return f"the BatchNorm's channel axis is not the MatMul's inner axis (input rank {rank})"
    if issue := _weight(layer, weight, scope, rank=2):
        return issue
    match = Match(layer, INTO_CONSUMER, weight=weight, axis=axis, channel_shape=(channels,))
    after = scope.only_reader(layer.output[0])
    if after is not None and after.op_type == "Add" and after.domain in STANDARD_DOMAINS:
        constant = [i for i, name in enumerate(after.input) if scope.constant(name) is not None]
        if len(constant) == 1:
            return _bias(match, after, constant[0], scope)
    return match


@dataclass(frozen=True)
class Pattern:
    """One way to fold: the layer's op types, the direction, and the matcher."""

    ops: tuple[str, ...]
    into: str
    where: str
    matcher: Callable[..., Match | str]


PATTERNS: list[Pattern] = [
    Pattern(("Conv", "ConvTranspose"), INTO_PRODUCER, "Conv/ConvTranspose -> BN", producer_conv),
    Pattern(("Gemm",), INTO_PRODUCER, "Gemm -> BN", producer_gemm),
    Pattern(("MatMul",), INTO_PRODUCER, "MatMul (+ constant Add) -> BN", producer_matmul),
    Pattern(("Conv",), INTO_CONSUMER, "BN -> Conv (unpadded, or padded with zero shift)", consumer_conv),
    Pattern(("Gemm",), INTO_CONSUMER, "BN -> Gemm", consumer_gemm),
    Pattern(("MatMul",), INTO_CONSUMER, "BN -> MatMul", consumer_matmul),
]
"""Tried in order (producers first); a new pattern is a matcher and a row here."""


def producer_match(bn: Any, scope: Scope, channels: int) -> Match | str:
    chain: list[Any] = []
    found = _walk_up(bn.input[0], scope, chain)
    if isinstance(found, str):
        return found
    layer, _ = found
    add = None
    if layer.op_type == "Add" and layer.domain in STANDARD_DOMAINS:
        constant = [i for i, name in enumerate(layer.input) if scope.constant(name) is not None]
        matmul = scope.producers.get(layer.input[1 - constant[0]]) if len(constant) == 1 else None
        if matmul is None or matmul.op_type != "MatMul" or scope.uses(matmul.output[0]) != 1:
            return "Add before it is not MatMul + constant"
        layer, add = matmul, layer
        chain.insert(0, add)
    for pattern in PATTERNS:
        if pattern.into == INTO_PRODUCER and layer.op_type in pattern.ops and layer.domain in STANDARD_DOMAINS:
            match = producer_matmul(layer, scope, channels, add) if add is not None else pattern.matcher(layer, scope, channels)
            if isinstance(match, Match):
                match.chain = chain
            return match
    return f"the layer before it is {layer.op_type}"


def consumer_match(bn: Any, scope: Scope, channels: int) -> Match | str:
    chain: list[Any] = []
    repeat = [1]
    found = _walk_down(bn.output[0], scope, chain, repeat)
    if isinstance(found, str):
        return found
    layer, name = found
    channels *= repeat[0]
    for pattern in PATTERNS:
        if pattern.into == INTO_CONSUMER and layer.op_type in pattern.ops and layer.domain in STANDARD_DOMAINS:
            if layer.op_type == "MatMul":
                match = consumer_matmul(layer, scope, channels, data=list(layer.input).index(name))
            elif list(layer.input).index(name) != 0:
                return f"it feeds the {layer.op_type}'s weight, not its data"
            else:
                match = pattern.matcher(layer, scope, channels)
            if isinstance(match, Match):
                match.chain, match.repeat = chain, repeat[0]
            return match
    return f"the layer after it is {layer.op_type}"


def decide(bn: Any, scope: Scope) -> Match | str:
    """The first pattern that folds `bn`, or every direction's reason why not."""
    if issue := bn_issue(bn, scope):
        return issue
    mean = scope.constant(bn.input[3])
    channels = int(mean.dims[0]) if mean is not None and mean.dims else 1
    before = producer_match(bn, scope, channels)
    if isinstance(before, Match):
        return before
    after = consumer_match(bn, scope, channels)
    if isinstance(after, Match):
        return after
    return f"not folded into the layer before ({before}), nor the layer after ({after})"

"""The call targets a `.pt2` graph may have: pure tensor operators, named one by one (an allowlist).

torch.export.load resolves a node's target by walking `torch.*` attributes, so any operator torch knows could be
called: `aten.from_file` maps a file the program names, `aten._print` writes to stdout, `aten.copy_` on an input
writes into the caller's memory, random ops make the self-check meaningless, and custom namespaces run the
registering library's code. bnstrip refuses every target not in the tables below, with the op's name.

A new op goes in a row here: the aten overload packet, and which overloads are allowed (`*`: all but `out`).
In-place forms (name ending in `_`) are allowed only on values the graph computed itself, never on a graph
input (user input, parameter, buffer or constant). Ops that size a new tensor from their arguments
(zeros, full, arange, repeat, upsampling to a size) are left out: the file could make them allocate at will.
"""
from __future__ import annotations

import re

_ALL = "*"
ATEN_OPS: dict[str, str] = {
    # layers
    **{op: _ALL for op in ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
                           "convolution", "linear", "addmm", "mm", "bmm", "matmul", "t")},
    # normalisation (eval forms)
    **{op: _ALL for op in ("batch_norm", "_native_batch_norm_legit_no_training", "layer_norm", "group_norm",
                           "native_layer_norm", "native_group_norm", "instance_norm")},
    # activations (and their in-place forms, on computed values only)
    **{op: _ALL for op in ("relu", "relu_", "relu6", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "gelu",
                           "silu", "silu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "hardswish", "hardswish_",
                           "hardsigmoid", "hardsigmoid_", "elu", "elu_", "softplus", "mish", "mish_", "softmax",
                           "log_softmax", "_softmax", "_log_softmax", "clamp", "clamp_", "clamp_min", "clamp_max")},
    # elementwise arithmetic and comparisons
    **{op: _ALL for op in ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "neg", "abs", "sqrt", "rsqrt",
                           "exp", "log", "reciprocal", "square", "where", "eq", "ne", "lt", "le", "gt", "ge",
                           "minimum", "maximum", "erf")},
    # reductions
    **{op: _ALL for op in ("mean", "sum", "amax", "amin", "std", "var", "var_mean", "max", "min", "norm")},
    # shape and layout (views or copies of the input's own size)
    **{op: _ALL for op in ("view", "reshape", "flatten", "unflatten", "permute", "transpose", "contiguous", "clone",
                           "expand", "expand_as", "unsqueeze", "squeeze", "cat", "stack", "split", "split_with_sizes",
                           "chunk", "slice", "select", "narrow", "unbind", "alias", "detach", "pad",
                           "constant_pad_nd", "_to_copy", "to", "type_as", "sym_size", "sym_numel", "sym_stride",
                           "channel_shuffle", "pixel_shuffle", "pixel_unshuffle")},
    # dropout: the identity when `train` is literally False (eval export), random otherwise (see _RANDOM_ARGS)
    **{op: _ALL for op in ("dropout", "dropout_", "feature_dropout", "feature_dropout_", "alpha_dropout",
                           "alpha_dropout_", "feature_alpha_dropout", "feature_alpha_dropout_")},
    # checks torch.export inserts (they raise on a mismatch, nothing else)
    **{op: _ALL for op in ("_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size",
                           "sym_constrain_range")},
    # pooling
    **{op: _ALL for op in ("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "avg_pool1d",
                           "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d",
                           "max_pool2d_with_indices", "adaptive_max_pool2d")},
}
"""aten overload packet -> allowed overloads (`*`: every overload but `out` forms)."""

PYTHON_TARGETS = frozenset({"_operator.getitem", "_operator.add", "_operator.sub", "_operator.mul",
                            "_operator.floordiv", "_operator.mod", "_operator.neg", "torch.sym_max", "torch.sym_min"})
"""Python functions a graph may call: taking outputs apart, and integer arithmetic on sizes."""

MAY_ALIAS = frozenset({
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "t", "contiguous", "expand", "expand_as",
    "unsqueeze", "squeeze", "split", "split_with_sizes", "chunk", "slice", "select", "narrow", "unbind", "alias",
    "detach", "to", "_to_copy", "type_as", "dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout"})
"""Ops whose output may share memory with their first argument: a graph input seen through one is still an input
(an in-place op on it would write into the caller's tensor)."""

_RANDOM_ARGS = {op: "train" for op in ("dropout", "dropout_", "feature_dropout", "feature_dropout_", "alpha_dropout",
                                        "alpha_dropout_", "feature_alpha_dropout", "feature_alpha_dropout_")}
"""Ops that are random unless the named boolean argument is False (eval-mode dropout is the identity)."""
_ATEN = re.compile(r"torch\.ops\.aten\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)")


class OpRefused(ValueError):
    """A call target outside the allowlist; the message names it and why."""


def known_target(target: object) -> tuple[str, str] | None:
    """(packet, overload) of an allowlisted aten target, None for an allowed Python target; OpRefused otherwise."""
    if isinstance(target, str) and target in PYTHON_TARGETS:
        return None
    match = _ATEN.fullmatch(target) if isinstance(target, str) else None
    if match is None:
        raise OpRefused("not a torch operator bnstrip allows (custom namespaces and Python calls are never loaded)")
    packet, overload = match.groups()
    allowed = ATEN_OPS.get(packet)
    if allowed is None:
        raise OpRefused("not a pure tensor op bnstrip allows (file, print, random, allocating and in-place-on-input "
                        "ops are refused)")
    if overload == "out" or overload.endswith("_out") or (allowed != _ALL and overload not in allowed.split(",")):
        raise OpRefused(f"its {overload} form writes into a given tensor")
    return packet, overload


def check_target(target: str, self_arg: str | None, graph_inputs: set[str], flags: dict[str, object]) -> str:
    """`target` when it may be called with these arguments; OpRefused otherwise (known_target's rules, then:)

    self_arg: the tensor name the op's first argument reads (in-place forms may not write a graph input);
    graph_inputs: names of the graph's placeholders; flags: the node's literal boolean arguments by name.
    """
    known = known_target(target)
    if known is None:
        return target
    packet = known[0]
    if packet.endswith("_") and (self_arg is None or self_arg in graph_inputs):
        raise OpRefused("it writes in place into a graph input")
    if packet in _RANDOM_ARGS and flags.get(_RANDOM_ARGS[packet]) is not False:
        raise OpRefused("it is random (train is not False)")
    return target


def may_alias(target: str) -> bool:
    """Whether the op's outputs may be (views of) its first argument: allowlisted view-like ops, in-place forms
    and taking an item out of a list output."""
    if target == "_operator.getitem":
        return True
    match = _ATEN.fullmatch(target)
    return match is not None and (match.group(1) in MAY_ALIAS or match.group(1).endswith("_"))

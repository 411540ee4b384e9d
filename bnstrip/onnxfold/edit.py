"""Apply one fold (a rules.Match) to a graph: the maths in float64 (core.foldmath's scale/shift), then the rewiring.

Weights and biases are read from and written to the Workspace in float64, so a layer that
absorbs two BatchNorms (one before, one after) is rounded once. A weight or bias that
other nodes read too is copied first (the copy is folded, the shared one stays as it was).
The BatchNormalization node is removed and its neighbours rewired so every other value
keeps its name; a MatMul without a bias gets an Add (into the layer before: the
BatchNorm node becomes that Add; into the layer after: a new Add right after the MatMul).
"""
from __future__ import annotations

from typing import Any

from bnstrip.core.foldmath import BNStats, bn_scale_shift
from bnstrip.errors import InputError
from bnstrip.onnxfold.graph import Scope, Workspace, attr, torch_dtype
from bnstrip.onnxfold.rules import INTO_PRODUCER, Match


def bn_scale_shift64(bn: Any, scope: Scope, ws: Workspace, name: str) -> tuple[Any, Any]:
    """(s, t) in float64 with BN(x) = x * s + t per channel; InputError for statistics that cannot fold."""
    gamma, beta, mean, var = (ws.get(scope, n) for n in bn.input[1:5])
    eps = float(attr(bn, "epsilon", 1e-5))
    return bn_scale_shift(BNStats(mean, var, gamma, beta, eps), name)


def scale_axis(weight: Any, scale: Any, axis: int, groups: int, name: str) -> Any:
    """weight * scale along `axis` (float64); with groups, axis 1 holds one group's channels (ConvTranspose
    output channels, Conv input channels) and axis 0 is split into the groups."""
    channels = scale.numel()
    if groups == 1:
        if weight.shape[axis] != channels:
            raise InputError(f"{name}: the weight has {weight.shape[axis]} channels on axis {axis} but the "
                             f"BatchNorm has {channels}; they cannot be folded")
        shape = [1] * weight.dim()
        shape[axis] = channels
        return weight * scale.reshape(shape)
    if axis != 1 or weight.shape[1] * groups != channels or weight.shape[0] % groups:
        raise InputError(f"{name}: a weight of shape {list(weight.shape)} in {groups} groups does not match the "
                         f"BatchNorm's {channels} channels; they cannot be folded")
    grouped = weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])
    s = scale.reshape(groups, 1, weight.shape[1], *([1] * (weight.dim() - 2)))
    return (grouped * s).reshape(weight.shape)


def materialize(scope: Scope, ws: Workspace, node: Any, index: int) -> str:
    """node.input[index] as an initializer: a Constant node's value or a value computed from constants only
    (Transpose of a weight, weight standardisation) is evaluated once by onnx's reference evaluator."""
    import onnx

    name = node.input[index]
    if name in scope.inits and name not in scope.graph_inputs:
        return name
    nodes = scope.computed_from_constants(name)
    if nodes is None:
        raise InputError(f"'{name}' is not computed from constants only")
    value = scope.evaluate(name)
    tensor = scope.graph.initializer.add()
    tensor.CopyFrom(onnx.numpy_helper.from_array(value, ws.fresh_name(scope, name.strip("/").replace("/", "_"))))
    node.input[index] = tensor.name
    scope.shapes[tensor.name] = list(value.shape)
    ws.dead |= {id(n) for n in nodes}
    scope.rebuild()
    return tensor.name


def private(scope: Scope, ws: Workspace, node: Any, index: int) -> str:
    """The initializer at node.input[index], copied under a new name first if anything else reads it."""
    name = node.input[index]
    if scope.uses(name) <= 1:
        return name
    original = scope.inits[name]
    copy = scope.graph.initializer.add()
    copy.CopyFrom(original)
    copy.name = ws.fresh_name(scope, name)
    node.input[index] = copy.name
    scope.shapes[copy.name] = list(original.dims)
    ws.set(scope, copy.name, ws.get(scope, name).clone(), torch_dtype(original))
    scope.rebuild()
    return copy.name


def new_initializer(scope: Scope, ws: Workspace, stem: str, value64: Any, dtype: Any) -> str:
    """A new initializer holding `value64` (rounded to `dtype` in Workspace.finish)."""
    import numpy as np
    import onnx

    tensor = scope.graph.initializer.add()
    tensor.CopyFrom(onnx.numpy_helper.from_array(np.zeros(tuple(value64.shape), dtype=np.float32), ""))
    tensor.name = ws.fresh_name(scope, stem)
    scope.shapes[tensor.name] = list(value64.shape)
    ws.set(scope, tensor.name, value64, dtype)
    scope.rebuild()
    return tensor.name


def _set_input(node: Any, index: int, name: str) -> None:
    while len(node.input) <= index:
        node.input.append("")
    node.input[index] = name


def _consumer_extra(weight: Any, shift: Any, match: Match) -> Any:
    """What the shift adds to the layer's output: W applied to t (per group for a Conv), in the bias's shape."""
    import torch

    if match.layer.op_type == "Conv":
        g = match.groups
        grouped = weight.reshape(g, weight.shape[0] // g, weight.shape[1], *weight.shape[2:])
        t = shift.reshape(g, 1, weight.shape[1], *([1] * (weight.dim() - 2)))
        return (grouped * t).sum(dim=tuple(range(2, grouped.dim()))).reshape(weight.shape[0])
    extra = torch.tensordot(weight, shift, dims=([match.axis], [0])) * match.alpha / match.beta
    return extra.reshape(-1, 1) if match.layer.op_type == "MatMul" and match.weight == 0 else extra


def _fold_producer(scope: Scope, ws: Workspace, bn: Any, match: Match, scale: Any, shift: Any, name: str) -> bool:
    layer = match.layer
    scaled = scale_axis(ws.get(scope, materialize(scope, ws, layer, match.weight)), scale, match.axis, match.groups,
                        name)
    wname = private(scope, ws, layer, match.weight)
    dtype = torch_dtype(scope.inits[wname])
    ws.set(scope, wname, scaled)
    s, t = scale.reshape(match.channel_shape), shift.reshape(match.channel_shape)
    if match.bias_node is not None:
        materialize(scope, ws, match.bias_node, match.bias_index)
        bname = private(scope, ws, match.bias_node, match.bias_index)
        ws.set(scope, bname, ws.get(scope, bname) * s + t / match.beta)
    elif layer.op_type == "MatMul":  # the BatchNorm node becomes the bias: Add(X, t)
        tname = new_initializer(scope, ws, f"{bn.output[0]}_shift", t, dtype)
        del bn.attribute[:]
        bn.op_type, bn.domain = "Add", ""
        del bn.input[:]
        bn.input.extend([match.chain[-1].output[0] if match.chain else layer.output[0], tname])
        del bn.output[1:]
        return True
    else:
        _set_input(layer, 2, new_initializer(scope, ws, f"{layer.name or layer.op_type}_bias", t / match.beta, dtype))
    last = match.chain[-1] if match.chain else layer
    last.output[0] = bn.output[0]
    scope.remove(bn)
    return match.bias_node is None


def _fold_consumer(scope: Scope, ws: Workspace, bn: Any, match: Match, scale: Any, shift: Any, name: str) -> bool:
    import onnx

    layer = match.layer
    weight = ws.get(scope, materialize(scope, ws, layer, match.weight))
    scaled = scale_axis(weight, scale, match.axis, match.groups, name)
    extra = _consumer_extra(weight, shift, match)
    wname = private(scope, ws, layer, match.weight)
    dtype = torch_dtype(scope.inits[wname])
    ws.set(scope, wname, scaled)
    gained = match.bias_node is None
    if match.bias_node is not None:
        materialize(scope, ws, match.bias_node, match.bias_index)
        bname = private(scope, ws, match.bias_node, match.bias_index)
        ws.set(scope, bname, ws.get(scope, bname) + extra)
    elif layer.op_type == "MatMul":
        bias = new_initializer(scope, ws, f"{layer.name or 'MatMul'}_bias", extra, dtype)
        inner = ws.fresh_name(scope, layer.output[0])
        add = onnx.helper.make_node("Add", [inner, bias], [layer.output[0]], name=ws.fresh_name(scope, "Add"))
        layer.output[0] = inner
        scope.shapes[inner] = scope.shapes.get(add.output[0])
        scope.insert_after(layer, add)
    else:
        _set_input(layer, 2, new_initializer(scope, ws, f"{layer.name or layer.op_type}_bias", extra, dtype))
    first = match.chain[0] if match.chain else layer
    for index, value in enumerate(first.input):
        if value == bn.output[0]:
            first.input[index] = bn.input[0]
    scope.remove(bn)
    return gained


def apply_match(scope: Scope, ws: Workspace, bn: Any, match: Match, name: str) -> bool | str:
    """Fold `bn` as `match` says; True if the layer gained a bias, a reason (str) if it cannot fold after all."""
    try:
        scale, shift = bn_scale_shift64(bn, scope, ws, name)
    except InputError as exc:
        return f"its statistics cannot be folded: {exc}"
    if match.repeat > 1:  # a Flatten between: channel c is features [c*k, (c+1)*k) of the layer after
        scale, shift = scale.repeat_interleave(match.repeat), shift.repeat_interleave(match.repeat)
    if match.padded and bool((shift != 0).any()):
        return "the Conv after it pads its input, and the BatchNorm's shift is not zero, so the border would change"
    fold = _fold_producer if match.into == INTO_PRODUCER else _fold_consumer
    ws.dead |= {id(scope.producers[n]) for n in bn.input[1:5] if n in scope.producers}
    try:
        gained = fold(scope, ws, bn, match, scale, shift, name)
    except InputError as exc:
        return str(exc)
    scope.rebuild()
    return gained

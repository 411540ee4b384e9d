"""BatchNorms that an exported program holds as arithmetic: x * scale + shift on constant tensors.

torchvision's FrozenBatchNorm2d (and any frozen norm written by hand) exports as aten ops:
scale = w * rsqrt(rv + eps), shift = b - rm * scale, then `x * scale + shift`. Here that last
`add(mul(x, S), B)` is recognised when S and B are computed from module attributes alone and
keep channels apart (a (1, C, 1, 1)-like shape); it becomes a call of an nn.BatchNormNd with
mean 0, variance 1, eps 0, weight S and bias B (x * S + B exactly), installed at the owner of the
tensors it reads (`backbone.body.bn1`), so fold_model folds it like any BatchNorm. S and B are
evaluated once, from at most _MAX_OPS aten ops on the program's own tensors, each no larger than
the largest tensor it reads. One that cannot become a module is reported with the reason.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

_A = torch.ops.aten
_MAX_OPS = 32
_BN_CLS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
_FROZEN_TENSORS = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


class Constants:
    """Values of nodes computed from module attributes only (memoised; None for anything else)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.values: dict[fx.Node, Any] = {}
        self.leaves: dict[fx.Node, set[str]] = {}
        self.members: dict[fx.Node, set[fx.Node]] = {}

    def value(self, node: fx.Node, budget: int = _MAX_OPS) -> Any:
        if node in self.values:
            return self.values[node]
        self.values[node] = None  # cycles cannot happen in an fx graph; this also marks "being evaluated"
        result = self._evaluate(node, budget)
        self.values[node] = result
        return result

    def _evaluate(self, node: fx.Node, budget: int) -> Any:
        if node.op == "get_attr":
            try:
                tensor = self.gm.get_buffer(str(node.target))
            except AttributeError:
                try:
                    tensor = self.gm.get_parameter(str(node.target))
                except AttributeError:
                    return None
            self.leaves[node], self.members[node] = {str(node.target)}, {node}
            return tensor.detach()
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or budget <= 0 \
                or torch.Tag.nondeterministic_seeded in target.tags or target._schema.is_mutable:
            return None
        inputs = node.all_input_nodes
        values = [self.value(i, budget - 1) for i in inputs]
        if any(v is None for v in values):
            return None
        largest = max([v.numel() for v in values if isinstance(v, torch.Tensor)] or [1])
        shape = getattr(node.meta.get("val"), "shape", None)
        if shape is None or math.prod(int(s) for s in shape) > largest:
            return None  # no op may allocate more than the tensors it reads justify
        by_node = dict(zip(inputs, values, strict=True))
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: by_node[n])
        self.leaves[node] = set().union(*(self.leaves[i] for i in inputs))
        self.members[node] = {node}.union(*(self.members[i] for i in inputs))
        try:
            with torch.no_grad():
                return target(*args, **kwargs)
        except Exception:  # noqa: BLE001 - an op that does not run on these values is simply not a constant
            return None


def _per_channel(value: Any, rank: int, channels: int, dtype: torch.dtype) -> torch.Tensor | None:
    if not isinstance(value, torch.Tensor) or value.dtype != dtype or value.dim() > rank:
        return None
    shape = [1] * (rank - value.dim()) + list(value.shape)
    if any(n != 1 for d, n in enumerate(shape) if d != 1) or shape[1] not in (1, channels):
        return None
    return value.reshape(-1).expand(channels).clone()


def _affine_parts(node: fx.Node, constants: Constants) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """(data, scale node, shift node) when `node` is add(mul(data, scale), shift) with constant scale and shift."""
    if node.op != "call_function" or node.target is not _A.add.Tensor or len(node.args) != 2 or node.kwargs:
        return None
    for product, shift in (node.args, reversed(node.args)):
        if not (isinstance(product, fx.Node) and product.target is _A.mul.Tensor and len(product.users) == 1
                and isinstance(shift, fx.Node) and constants.value(shift) is not None):
            continue
        for data, scale in (product.args, reversed(product.args)):
            if isinstance(data, fx.Node) and isinstance(scale, fx.Node) and constants.value(data) is None \
                    and constants.value(scale) is not None:
                return data, scale, shift
    return None


def affine_batchnorm(gm: fx.GraphModule, node: fx.Node, constants: Constants,
                     install: Callable[[str, nn.Module], bool]) -> tuple[str, str | None] | None:
    """Replace `node` = x * S + B (constant S, B per channel) by a BatchNorm module call (see the module docstring).

    Returns None when `node` is not that form, else (name, None) once replaced or (name, why not).
    """
    parts = _affine_parts(node, constants)
    if parts is None:
        return None
    data, scale_node, shift_node = parts
    val = data.meta.get("val")
    leaves = constants.leaves[scale_node] | constants.leaves[shift_node]
    owners = {path.rpartition(".")[0] for path in leaves}
    name = next(iter(owners)) if len(owners) == 1 and "" not in owners else node.name
    shape = getattr(val, "shape", None)
    if val is None or shape is None or len(shape) not in _BN_CLS or len(shape) < 2 or not isinstance(shape[1], int):
        return name, "it normalises as x * scale + shift, on a tensor whose channels are not known"
    rank, channels = len(shape), int(shape[1])
    scale = _per_channel(constants.value(scale_node), rank, channels, val.dtype)
    shift = _per_channel(constants.value(shift_node), rank, channels, val.dtype)
    if scale is None or shift is None:
        return name, "it computes x * scale + shift, but its scale or shift mixes channels or changes the dtype"
    if name == node.name:
        return name, "it computes x * scale + shift from the tensors of several modules, so it has no one name"
    product = next(a for a in node.args if isinstance(a, fx.Node) and a.target is _A.mul.Tensor and data in a.args)
    dead = constants.members[scale_node] | constants.members[shift_node]
    if any(user not in dead | {product, node} for member in dead for user in member.users):
        return name, "it computes x * scale + shift, and its tensors are also used elsewhere in the program"
    holder = gm.get_submodule(name)
    held = {n for n, t in [*holder._parameters.items(), *holder._buffers.items()] if t is not None}
    if type(holder) is not nn.Module or holder._modules or not held <= _FROZEN_TENSORS:
        return name, f"it computes x * scale + shift, and {name} holds other things than a BatchNorm's tensors"
    with torch.device("meta"):
        module = _BN_CLS[rank](channels, eps=0.0)
    module.weight = nn.Parameter(scale, requires_grad=False)
    module.bias = nn.Parameter(shift, requires_grad=False)
    module.register_buffer("running_mean", torch.zeros_like(scale))
    module.register_buffer("running_var", torch.ones_like(scale))
    module.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))
    if not install(name, module.eval()):
        return name, "it computes x * scale + shift, and another call reads the same tensors differently"
    graph = gm.graph
    with graph.inserting_before(node):
        call = graph.call_module(name, (data,))
    call.meta.update(node.meta)
    node.replace_all_uses_with(call)
    graph.erase_node(node)
    graph.erase_node(product)
    order = {n: i for i, n in enumerate(graph.nodes)}
    for member in sorted(dead, key=order.__getitem__, reverse=True):
        if not member.users:
            graph.erase_node(member)
    return name, None

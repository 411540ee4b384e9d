"""Turn the aten graph of an exported program back into module calls, so fold_model's rules apply unchanged.

`ExportedProgram.module()` gives an fx GraphModule whose parameters and buffers are attributes
under their original names and whose ops are aten calls. Here each aten conv / conv-transpose /
linear call on attribute weights becomes a call of a real nn.ConvNd / ConvTransposeNd / Linear
(same hyper-parameters, the same tensors, not copies), and each eval-mode batch-norm op on
attribute statistics becomes a call of an nn.BatchNormNd, named after the tensors' owner
(`layer1.0.conv1`, `layer1.0.bn1`): exactly the names fold_model gives on the original module.
Several calls on the same tensors with the same hyper-parameters become calls of one module (a
layer called twice stays one layer called twice, so fold_model's shared-layer rules apply).
A reflect/replicate/circular `aten.pad` that only feeds a conv becomes that conv's padding_mode,
as nn.Conv does it. Statistics whose owner holds other things become an `F.batch_norm` call on
the attributes (fold_model's functional BatchNorm). Everything else stays an aten call, which
the rules see as an op that cannot absorb a BatchNorm; batch-norm ops that use batch statistics
are reported in `Modularized.unfoldable` with the reason.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from bnstrip._torch import ConvNd, ConvTransposeNd, op_schema, own_buffers, own_parameters
from bnstrip.trace.modularize_affine import Constants, affine_batchnorm

_A = torch.ops.aten
_CONV = {_A.conv1d.default: 1, _A.conv2d.default: 2, _A.conv3d.default: 3,
         _A.conv1d.padding: 1, _A.conv2d.padding: 2, _A.conv3d.padding: 3}
_CONVT = {_A.conv_transpose1d.default: 1, _A.conv_transpose2d.input: 2, _A.conv_transpose3d.input: 3}
# rank -> class, called with rank-long tuples (torch types each class's sizes for its own rank only)
_CONV_CLS: dict[int, Callable[..., ConvNd]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONVT_CLS: dict[int, Callable[..., ConvTransposeNd]] = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_BN_CLS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
_TRAINING_BN = {_A._native_batch_norm_legit.default, _A._native_batch_norm_legit_functional.default,
                _A._native_batch_norm_legit.no_stats, _A.native_batch_norm.default, _A.cudnn_batch_norm.default,
                _A.miopen_batch_norm.default, _A._batch_norm_with_update.default,
                _A._batch_norm_with_update_functional.default}
_PAD_MODES = {"reflect", "replicate", "circular"}


@dataclass
class Modularized:
    """The rewritten GraphModule, and the batch-norm ops that use batch statistics (name -> reason)."""

    gm: fx.GraphModule
    unfoldable: list[tuple[str, str]] = field(default_factory=list)


def bind(node: fx.Node) -> dict[str, Any]:
    """The arguments of an aten call by schema name, defaults filled in."""
    schema = op_schema(node.target)
    values: dict[str, Any] = {}
    for index, argument in enumerate(schema.arguments):
        if index < len(node.args):
            values[argument.name] = node.args[index]
        elif argument.name in node.kwargs:
            values[argument.name] = node.kwargs[argument.name]
        elif argument.has_default_value():
            values[argument.name] = argument.default_value
        else:
            values[argument.name] = None
    return values


def _attr_path(value: Any) -> str | None:
    return str(value.target) if isinstance(value, fx.Node) and value.op == "get_attr" else None


def _owner(gm: fx.GraphModule, path: str) -> tuple[str, nn.Module] | None:
    owner_path, _, _ = path.rpartition(".")
    if not owner_path:
        return None
    try:
        return owner_path, gm.get_submodule(owner_path)
    except AttributeError:
        return None


def _holds_only(module: nn.Module, allowed: set[str], installed: dict[str, nn.Module], path: str) -> bool:
    """True when `module` is a plain holder of exactly these tensors (nothing else would be lost by replacing it).

    Also True when it is the layer an earlier call of the same tensors installed at `path`: a layer
    called twice becomes one module called twice, as in the original model.
    """
    if installed.get(path) is module:
        return True
    names = {n for n, t in own_parameters(module).items() if t is not None} | \
            {n for n, t in own_buffers(module).items() if t is not None}
    return type(module) is nn.Module and not module._modules and names <= allowed


def _param(tensor: torch.Tensor) -> nn.Parameter:
    return tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, requires_grad=False)


def _tuple(value: Any, rank: int) -> tuple[int, ...]:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    return tuple(int(v) for v in (values * rank if len(values) == 1 else values))


def _absorbed_pad(data: Any, rank: int) -> tuple[Any, str, tuple[int, ...]] | None:
    """(input before the pad, padding_mode, padding) when `data` is a symmetric non-zero-mode pad of a conv input."""
    if not (isinstance(data, fx.Node) and data.op == "call_function" and data.target is _A.pad.default
            and len(data.users) == 1):
        return None
    args = bind(data)
    pad, mode = list(args["pad"]), args["mode"]
    if mode not in _PAD_MODES or len(pad) != 2 * rank or any(pad[i] != pad[i + 1] for i in range(0, len(pad), 2)):
        return None
    return args["self"], mode, tuple(int(p) for p in reversed(pad[::2]))


def _layer_for(gm: fx.GraphModule, node: fx.Node,
               installed: dict[str, nn.Module]) -> tuple[str, nn.Module, Any] | None:
    """(owner path, the real layer module, its input node) for an aten conv/convT/linear call, else None."""
    if node.op != "call_function" or node.target not in (*_CONV, *_CONVT, _A.linear.default):
        return None
    args = bind(node)
    weight_path, bias_path = _attr_path(args["weight"]), _attr_path(args["bias"])
    if weight_path is None or (args["bias"] is not None and bias_path is None) or not weight_path.endswith(".weight"):
        return None
    found = _owner(gm, weight_path)
    if found is None or (bias_path is not None and bias_path != f"{found[0]}.bias"):
        return None
    owner_path, owner = found
    if not _holds_only(owner, {"weight", "bias"}, installed, owner_path) or \
            (bias_path is None and own_parameters(owner).get("bias") is not None):
        return None
    weight: torch.Tensor | None = own_parameters(owner).get("weight")
    if weight is None:
        weight = own_buffers(owner).get("weight")
    if weight is None:
        return None
    data = args["input"]
    with torch.device("meta"):
        if node.target is _A.linear.default:
            module: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias_path is not None)
        elif node.target in _CONV:
            rank = _CONV[node.target]
            padding: Any = args["padding"] if isinstance(args["padding"], str) else _tuple(args["padding"], rank)
            mode = "zeros"
            if padding == "valid" or (not isinstance(padding, str) and not any(padding)):
                if (absorbed := _absorbed_pad(data, rank)) is not None:
                    data, mode, padding = absorbed
            groups = int(args["groups"])
            module = _CONV_CLS[rank](weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                                     stride=_tuple(args["stride"], rank), padding=padding,
                                     dilation=_tuple(args["dilation"], rank), groups=groups,
                                     bias=bias_path is not None, padding_mode=mode)
        else:
            rank = _CONVT[node.target]
            groups = int(args["groups"])
            module = _CONVT_CLS[rank](weight.shape[0], weight.shape[1] * groups, tuple(weight.shape[2:]),
                                      stride=_tuple(args["stride"], rank), padding=_tuple(args["padding"], rank),
                                      output_padding=_tuple(args["output_padding"], rank), groups=groups,
                                      bias=bias_path is not None, dilation=_tuple(args["dilation"], rank))
    module.weight = _param(weight)
    if bias_path is not None:
        module.bias = _param(cast(torch.Tensor, owner.bias))  # a plain holder's tensor (_holds_only)
    return owner_path, module, data


def _eval_bn(node: fx.Node) -> dict[str, Any] | str | None:
    """The arguments of an eval-mode batch-norm op; a reason when it is a batch norm that uses batch statistics."""
    if node.op != "call_function":
        return None
    if node.target in _TRAINING_BN:
        return "it normalises with batch statistics (a training-mode batch norm in the exported program)"
    if node.target is _A._native_batch_norm_legit_no_training.default:
        if any(u.target is not operator.getitem or u.args[1] != 0 for u in node.users):
            return "its saved statistics are used by the program"
        return bind(node)
    if node.target is _A.batch_norm.default:
        args = bind(node)
        if args["training"] or args["running_mean"] is None or args["running_var"] is None:
            return ("it normalises with batch statistics (training=True or no running statistics, e.g. "
                    "track_running_stats=False)")
        return args
    return None


def _bn_module(gm: fx.GraphModule, args: dict[str, Any], rank: int | None,
               installed: dict[str, nn.Module]) -> tuple[str, nn.Module] | None:
    """(owner path, nn.BatchNormNd on the same tensors) when the statistics belong to one plain holder."""
    paths = {key: _attr_path(args[key]) for key in ("running_mean", "running_var", "weight", "bias")}
    mean_path = paths["running_mean"]
    if mean_path is None or not mean_path.endswith(".running_mean") or rank not in _BN_CLS:
        return None
    found = _owner(gm, mean_path)
    if found is None:
        return None
    owner_path, owner = found
    expected = {"running_mean": "running_mean", "running_var": "running_var", "weight": "weight", "bias": "bias"}
    for key, leaf in expected.items():
        if args[key] is not None and paths[key] != f"{owner_path}.{leaf}":
            return None
    affine = args["weight"] is not None
    if affine != (args["bias"] is not None):
        return None
    if not _holds_only(owner, {"running_mean", "running_var", "num_batches_tracked", "weight", "bias"}, installed,
                       owner_path):
        return None
    if not affine and (own_parameters(owner).get("weight") is not None or own_parameters(owner).get("bias") is not None):
        return None
    mean = cast(torch.Tensor, own_buffers(owner)["running_mean"])  # the holder's buffer the graph reads at mean_path
    with torch.device("meta"):
        module = _BN_CLS[rank](mean.numel(), eps=float(args["eps"]), momentum=float(args["momentum"]), affine=affine)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        if own_buffers(owner).get(name) is not None:
            own_buffers(module)[name] = own_buffers(owner)[name]
        else:
            own_buffers(module).pop(name, None)
    if affine:
        module.weight = _param(cast(torch.Tensor, owner.weight))  # plain holder's tensors (_holds_only)
        module.bias = _param(cast(torch.Tensor, owner.bias))
    return owner_path, module.eval()


def _rank(node: fx.Node) -> int | None:
    shape = getattr(node.meta.get("val"), "shape", None)
    return len(shape) if shape is not None else None


def _install(gm: fx.GraphModule, path: str, module: nn.Module, installed: dict[str, nn.Module]) -> bool:
    """Put `module` at `path` (replacing the plain holder); False when another call already put a different one."""
    if path in installed:
        return _same_layer(installed[path], module)
    parent_path, _, leaf = path.rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    setattr(parent, leaf, module)
    installed[path] = module
    return True


def _same_layer(a: nn.Module, b: nn.Module) -> bool:
    """Same class, hyper-parameters and tensor objects: the second call can call the first's module."""
    if type(a) is not type(b) or a.extra_repr() != b.extra_repr():
        return False
    tensors: list[tuple[Mapping[str, torch.Tensor | None], Mapping[str, torch.Tensor | None]]] = [
        (own_parameters(a), own_parameters(b)), (own_buffers(a), own_buffers(b))]
    return all(x.keys() == y.keys() and all(x[k] is y[k] for k in x) for x, y in tensors)


def modularize(gm: fx.GraphModule) -> Modularized:
    """Rewrite `gm` in place (see the module docstring); the tensors stay the same objects."""
    installed: dict[str, nn.Module] = {}
    unfoldable: list[tuple[str, str]] = []
    graph = gm.graph
    constants = Constants(gm)
    for node in list(graph.nodes):
        layer = _layer_for(gm, node, installed)
        if layer is not None:
            path, module, data = layer
            if _install(gm, path, module, installed):
                with graph.inserting_before(node):
                    call = graph.call_module(path, (data,))
                call.meta.update(node.meta)
                node.replace_all_uses_with(call)
                padding = node.args[0] if node.args else None
                graph.erase_node(node)
                if isinstance(padding, fx.Node) and padding is not data and not padding.users:
                    graph.erase_node(padding)  # the pad absorbed into padding_mode
            continue
        affine = affine_batchnorm(gm, node, constants, lambda path, module: _install(gm, path, module, installed))
        if affine is not None:  # x * scale + shift on constants (FrozenBatchNorm2d): a BatchNorm, or why not
            if affine[1] is not None:
                unfoldable.append((affine[0], affine[1]))
            continue
        bn = _eval_bn(node)
        if isinstance(bn, str):
            unfoldable.append((_bn_name(node), bn))
            continue
        if bn is None:
            continue
        found = _bn_module(gm, bn, _rank(bn["input"]), installed)
        with graph.inserting_before(node):
            if found is not None and _install(gm, found[0], found[1], installed):
                call = graph.call_module(found[0], (bn["input"],))
            else:
                call = graph.call_function(F.batch_norm, (bn["input"], bn["running_mean"], bn["running_var"]), {
                    "weight": bn["weight"], "bias": bn["bias"], "training": False,
                    "momentum": float(bn["momentum"]), "eps": float(bn["eps"])})
        users = list(node.users) if node.target is _A._native_batch_norm_legit_no_training.default else [node]
        call.meta["val"] = users[0].meta.get("val") if users else None
        for user in users:
            user.replace_all_uses_with(call)
        for user in users:
            if user is not node:
                graph.erase_node(user)
        graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return Modularized(gm=gm, unfoldable=unfoldable)


def _bn_name(node: fx.Node) -> str:
    """The name fold_model would give this batch norm: its statistics' (or weight's) owner, else the node."""
    for index in (3, 1):
        path = _attr_path(node.args[index]) if len(node.args) > index else None
        if path:
            return path.rpartition(".")[0] or path
    return node.name

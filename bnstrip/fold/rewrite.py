"""Applying planned folds to a model: float64 chaining, one rounding, and the three forms of the result.

Forms of the folded model:
* "modules": the user's own class with folded BatchNorms replaced by FoldedBatchNorm (an
  nn.Identity that still answers num_features, eps, ...) and a bias Parameter added where a
  bias-free layer absorbed a shift (code keeps working);
* "graph": an fx GraphModule, used only when a functional `F.batch_norm` call was
  folded (a call in user code cannot be deleted any other way);
* "keep-structure": the user's class with every module kept; each folded BatchNorm is
  an exact identity-plus-bias (running_mean 0, running_var 1 - eps so that var + eps is
  exactly 1, weight 1, bias = the folded bias) and the producer's own bias is zeroed.
  For affine=False BatchNorms (no bias slot) the shift goes into running_mean as
  -bias instead: (x - (-b)) / 1 = x + b.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnstrip.core.foldmath import all_finite, cast_folded, fold_into_consumer, fold_into_producer, identity_running_var
from bnstrip.fold.rules import INTO_PRODUCER, Fold, bn_stats, tensor_at
from bnstrip.trace.opgraph import Op, OpGraph

class FoldedBatchNorm(nn.Identity):
    """What a folded BatchNorm module becomes: the identity, keeping the plain settings user code may read.

    `x.view(n, self.bn.num_features, -1)` keeps working; its tensors are gone (reads of them in
    forward make bnstrip refuse the fold, so none are needed).
    """

    _SETTINGS = ("num_features", "eps", "momentum", "affine", "track_running_stats")

    def __init__(self, bn: nn.Module | None = None) -> None:
        super().__init__()
        for setting in self._SETTINGS:
            if bn is not None and hasattr(bn, setting):
                setattr(self, setting, getattr(bn, setting))

    def extra_repr(self) -> str:
        return f"num_features={getattr(self, 'num_features', '?')} (folded)"


def _fold_in_float64(folds: list[Fold], root: nn.Module, eps: float | None) -> Iterator[tuple[str, list[Any]]]:
    """Chain the folds of each layer in float64, one layer at a time: (layer, [module, weight64, bias64 or None]).

    A generator, so that only one layer's float64 values exist at once (the caller rounds them
    back before asking for the next layer).
    """
    by_layer: dict[str, list[Fold]] = {}
    for fold in folds:
        by_layer.setdefault(fold.layer.name, []).append(fold)
    for layer_name, layer_folds in by_layer.items():
        module = layer_folds[0].layer.module
        entry = [module, module.weight.detach().to(torch.float64),
                 None if module.bias is None else module.bias.detach().to(torch.float64)]
        for fold in layer_folds:
            stats = bn_stats(fold.bn, root, eps)
            name = f"{fold.layer.name} + {fold.bn.name}"
            if fold.into == INTO_PRODUCER:
                transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
                entry[1], entry[2] = fold_into_producer(entry[1], entry[2], stats, out_axis=1 if transposed else 0,
                                                        groups=getattr(module, "groups", 1) if transposed else 1,
                                                        name=name)
            else:
                entry[1], entry[2] = fold_into_consumer(entry[1], entry[2], stats, groups=getattr(module, "groups", 1),
                                                        name=name)
        yield layer_name, entry
        del entry


def _cast(t64: torch.Tensor, dtype: torch.dtype, name: str, what: str, allow_overflow: bool,
          warnings: list[str]) -> torch.Tensor:
    out = cast_folded(t64, dtype, name, what, allow_overflow)
    if not all_finite(out):
        warnings.append(f"{name}: folded {what} overflows {str(dtype).replace('torch.', '')} and was kept as inf "
                        "(allow_overflow=True)")
    return out


def _set_tensor(target: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        target.copy_(value)


def add_bias(module: nn.Module, value: torch.Tensor) -> None:
    module.bias = nn.Parameter(value, requires_grad=module.weight.requires_grad)


def _write_layers(work: Iterable[tuple[str, list[Any]]], held_by_bn: dict[str, Op], allow_overflow: bool,
                  warnings: list[str], keep_structure: bool) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Round once to each layer's dtype. Returns layers that gained a bias, and keep-structure biases per BN."""
    gained: list[str] = []
    bn_bias: dict[str, torch.Tensor] = {}
    for name, (module, w64, b64) in work:
        dtype = module.weight.dtype
        _set_tensor(module.weight, _cast(w64, dtype, name, "weight", allow_overflow, warnings))
        if keep_structure and name in held_by_bn:
            bn_bias[held_by_bn[name].name] = b64
            if module.bias is not None:
                _set_tensor(module.bias, torch.zeros_like(module.bias))
            continue
        bias_dtype = dtype if module.bias is None else module.bias.dtype
        bias = _cast(b64, bias_dtype, name, "bias", allow_overflow, warnings)
        if module.bias is None:
            add_bias(module, bias)
            gained.append(name)
        else:
            _set_tensor(module.bias, bias)
    return gained, bn_bias


def _make_identity(bn: Op, root: nn.Module, bias64: torch.Tensor | None, allow_overflow: bool,
                   warnings: list[str]) -> None:
    """Turn a folded BN into x * 1 + bias, exactly (see the module docstring)."""
    if bn.functional is not None:
        spec = bn.functional
        mean, var = tensor_at(root, spec.mean), tensor_at(root, spec.var)
        weight = tensor_at(root, spec.weight) if spec.weight else None
        bias = tensor_at(root, spec.bias) if spec.bias else None
        eps = spec.eps
    else:
        m = bn.module
        mean, var, weight, bias, eps = m.running_mean, m.running_var, m.weight, m.bias, float(m.eps)
    _set_tensor(var, identity_running_var(var.numel(), eps, var.dtype))
    _set_tensor(mean, torch.zeros_like(mean))
    if weight is not None:
        _set_tensor(weight, torch.ones_like(weight))
    if bias is not None:
        _set_tensor(bias, torch.zeros_like(bias))
    if bias64 is None:
        return
    if bias is not None:
        _set_tensor(bias, _cast(bias64, bias.dtype, bn.name, "bias", allow_overflow, warnings))
    else:
        _set_tensor(mean, _cast(-bias64, mean.dtype, bn.name, "running_mean", allow_overflow, warnings))


def strip_graph(gm: fx.GraphModule, bn_ops: Sequence[Op]) -> None:
    """Delete folded BN calls from an fx graph, then the attributes and submodules only they used."""
    dropped_attrs: list[str] = []
    for op in bn_ops:
        node = op.node
        data = node.args[0] if node.args else node.kwargs["input"]
        stats = [n for n in node.all_input_nodes if n is not data]
        node.replace_all_uses_with(data)
        gm.graph.erase_node(node)
        for stat in stats:
            if stat.op == "get_attr" and not stat.users:
                dropped_attrs.append(str(stat.target))
                gm.graph.erase_node(stat)
    gm.delete_all_unused_submodules()
    still_used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for path in dropped_attrs:
        if path in still_used:
            continue
        owner_path, _, leaf = path.rpartition(".")
        try:
            owner = gm.get_submodule(owner_path) if owner_path else gm
        except AttributeError:
            continue  # its module was deleted with it
        if leaf in owner._buffers or leaf in owner._parameters:
            delattr(owner, leaf)
    gm.graph.lint()
    gm.recompile()


def set_unfolded_eps(model: nn.Module, folded: set[str], eps: float | None) -> None:
    if eps is None:
        return
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and name not in folded:
            module.eps = eps


@dataclass
class Applied:
    """The folded model in its form, the layers that gained a bias, and overflow warnings."""

    model: nn.Module
    form: str
    gained: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def apply_folds(folds: list[Fold], graph: OpGraph, work: nn.Module, eps: float | None, keep_structure: bool,
                allow_overflow: bool) -> Applied:
    """Write the planned folds into `work` (a copy), float64 values of one layer at a time, and pick the form."""
    warnings: list[str] = []
    work_tensors = _fold_in_float64(folds, work, eps)
    held_by_bn = {f.layer.name: f.bn for f in folds if f.into == INTO_PRODUCER}
    gained, bn_bias = _write_layers(work_tensors, held_by_bn, allow_overflow, warnings, keep_structure)
    if keep_structure:
        form = "keep-structure"
        for fold in folds:
            _make_identity(fold.bn, work, bn_bias.get(fold.bn.name), allow_overflow, warnings)
        result: nn.Module = work
    elif any(f.bn.functional is not None for f in folds):
        form = "graph"
        assert graph.gm is not None  # functional BNs are only folded on a whole-model fx graph
        strip_graph(graph.gm, [f.bn for f in folds])
        result = graph.gm
    else:
        form = "modules"
        for fold in folds:
            work.set_submodule(fold.bn.name, FoldedBatchNorm(work.get_submodule(fold.bn.name)))
        result = work
    set_unfolded_eps(result, {f.bn.name for f in folds}, eps)
    return Applied(model=result, form=form, gained=gained, warnings=warnings)

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
from typing import Any, Iterable, Iterator, Sequence, cast

import torch
import torch.fx as fx
from torch import nn

from bnstrip._torch import ConvNd, ConvTransposeNd, own_buffers, own_parameters
from bnstrip.core.foldmath import (BNStats, all_finite, bn_scale_shift, cast_folded, fold_into_consumer, fold_into_producer,
                                   identity_running_var)
from bnstrip.core.folded_bn import FoldedBatchNorm  # noqa: F401 - re-exported: its old home
from bnstrip.fold.rules import INTO_PRODUCER, Fold, bn_stats
from bnstrip.fold.rules_adjacent import layer_module
from bnstrip.fold.rules_affine import through_stats
from bnstrip.trace.bn_registry import folded_replacement, is_batchnorm_like
from bnstrip.trace.opgraph import Op, OpGraph

def _fold_in_float64(folds: list[Fold], root: nn.Module, eps: float | None,
                     allow_overflow: bool = False) -> Iterator[tuple[str, list[Any]]]:
    """Chain the folds of each layer in float64, one layer at a time: (layer, [module, weight64, bias64 or None]).

    A generator, so that only one layer's float64 values exist at once (the caller rounds them
    back before asking for the next layer).
    """
    by_layer: dict[str, list[tuple[Fold, Op, slice]]] = {}
    for fold in folds:
        for layer, start, stop in fold.parts():  # a concatenation: each layer absorbs its slice of channels
            by_layer.setdefault(layer.name, []).append((fold, layer, slice(start, stop)))
    for layer_name, layer_folds in by_layer.items():
        module = layer_module(layer_folds[0][1])
        if _single_producer_fold(module, layer_folds):
            yield layer_name, _fold_rounded(module, layer_folds[0][0], root, eps, layer_name, allow_overflow)
            continue
        entry: list[Any] = [module, module.weight.detach().to(torch.float64),
                 None if module.bias is None else module.bias.detach().to(torch.float64)]
        for fold, _, channels in layer_folds:
            stats = _channel_slice(bn_stats(fold.bn, root, eps), channels)
            name = f"{layer_name} + {fold.bn.name}"
            if fold.through is not None:  # constant arithmetic between the layer and the BatchNorm stays
                stats = through_stats(stats, *fold.through, name)
            if fold.rows is not None:  # a BatchNorm on a slice: those output rows absorb it
                entry[1], entry[2] = _fold_rows(entry[1], entry[2], stats, slice(*fold.rows), name)
            elif fold.into == INTO_PRODUCER:
                transposed = isinstance(module, ConvTransposeNd)
                entry[1], entry[2] = fold_into_producer(entry[1], entry[2], stats, out_axis=1 if transposed else 0,
                                                        groups=getattr(module, "groups", 1) if transposed else 1,
                                                        name=name)
            else:
                entry[1], entry[2] = fold_into_consumer(entry[1], entry[2], stats, groups=getattr(module, "groups", 1),
                                                        name=name)
        yield layer_name, entry
        del entry


def _single_producer_fold(module: nn.Module, layer_folds: list[tuple[Fold, Op, slice]]) -> bool:
    """The usual case: one BatchNorm folded whole into the output channels (axis 0) of a layer."""
    fold, _, channels = layer_folds[0]
    return (len(layer_folds) == 1 and fold.into == INTO_PRODUCER and channels == slice(None, None) and fold.rows is None
            and fold.through is None
            and not isinstance(module, ConvTransposeNd))


def _fold_rounded(module: ConvNd | nn.Linear, fold: Fold, root: nn.Module, eps: float | None, layer_name: str,
                  allow_overflow: bool) -> list[Any]:
    """[module, weight already rounded to its dtype, bias64] for a single producer fold.

    fold_into_producer scales the weight in float64 a block of rows at a time and rounds each
    block once: bit-identical to widening the whole weight, scaling and rounding (the general
    path), without two float64 copies of the layer. The bias stays float64 (keep-structure moves
    it into the BatchNorm); a missing bias is float64 zeros, as in the general path. Errors name
    what the general path names: the statistics "layer + bn", the rounding the layer.
    """
    stats = bn_stats(fold.bn, root, eps)
    scale_shift = bn_scale_shift(stats, f"{layer_name} + {fold.bn.name}")  # validates, with the general path's name
    bias = module.bias.detach().to(torch.float64) if module.bias is not None else \
        torch.zeros(module.weight.shape[0], dtype=torch.float64, device=module.weight.device)
    weight, bias64 = fold_into_producer(module.weight.detach(), bias, stats, out_axis=0, name=layer_name,
                                        allow_overflow=allow_overflow, scale_shift=scale_shift)
    return [module, _Rounded(weight), bias64]


def _fold_rows(weight64: torch.Tensor, bias64: torch.Tensor | None, stats: BNStats, rows: slice,
               name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold `stats` into output rows `rows` of a float64 (weight, bias); the other rows stay as they are."""
    weight, bias = weight64.clone(), (torch.zeros(weight64.shape[0], dtype=torch.float64, device=weight64.device)
                                      if bias64 is None else bias64.clone())
    weight[rows], bias[rows] = fold_into_producer(weight[rows], bias[rows], stats, out_axis=0, name=name)
    return weight, bias


class _Rounded:
    """A folded weight already rounded to the layer's dtype (see _fold_rounded); _write_layers only checks it."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def _channel_slice(stats: BNStats, channels: slice) -> BNStats:
    if channels == slice(None, None):
        return stats
    weight, bias = stats.weight, stats.bias
    return BNStats(stats.running_mean[channels], stats.running_var[channels], None if weight is None else weight[channels],
                   None if bias is None else bias[channels], stats.eps)


def _cast(t64: torch.Tensor, dtype: torch.dtype, name: str, what: str, allow_overflow: bool,
          warnings: list[str]) -> torch.Tensor:
    out = cast_folded(t64, dtype, name, what, allow_overflow)
    if allow_overflow and not all_finite(out):  # without allow_overflow cast_folded raised
        warnings.append(f"{name}: folded {what} overflows {str(dtype).replace('torch.', '')} and was kept as inf "
                        "(allow_overflow=True)")
    return out



def _set_tensor(target: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        target.copy_(value)


def add_bias(module: nn.Module, value: torch.Tensor) -> None:
    weight = cast(torch.Tensor, module.weight)  # a conv or Linear (fold.load checks that the layer has a weight)
    module.bias = nn.Parameter(value, requires_grad=weight.requires_grad)


def _write_layers(work: Iterable[tuple[str, list[Any]]], held_by_bn: dict[str, tuple[Op, slice, int | None]],
                  allow_overflow: bool, warnings: list[str], keep_structure: bool) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Round once to each layer's dtype. Returns layers that gained a bias, and keep-structure biases per BN."""
    gained: list[str] = []
    bn_bias: dict[str, torch.Tensor] = {}
    for name, (module, w64, b64) in work:
        dtype = module.weight.dtype
        if isinstance(w64, _Rounded):
            if allow_overflow and not all_finite(w64.tensor):  # without allow_overflow fold_into_producer raised
                warnings.append(f"{name}: folded weight overflows {str(dtype).replace('torch.', '')} and was kept as "
                                "inf (allow_overflow=True)")
            _set_tensor(module.weight, w64.tensor)
        else:
            _set_tensor(module.weight, _cast(w64, dtype, name, "weight", allow_overflow, warnings))
        if keep_structure and name in held_by_bn:
            bn, channels, total = held_by_bn[name]  # total: channels of a BN after a concatenation
            if total is None:
                bn_bias[bn.name] = b64
            else:
                bn_bias.setdefault(bn.name, torch.zeros(total, dtype=torch.float64, device=b64.device))[channels] = b64
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
    own = bn_stats(bn, root, None)  # live tensors, the BatchNorm's own eps
    mean, var, weight, bias, eps = own.running_mean, own.running_var, own.weight, own.bias, own.eps
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
        node = cast(fx.Node, op.node)  # ops traced from this fx graph carry their node
        data = cast(fx.Node, node.args[0] if node.args else node.kwargs["input"])  # its input tensor
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
        if leaf in own_buffers(owner) or leaf in own_parameters(owner):
            delattr(owner, leaf)
    gm.graph.lint()
    gm.recompile()


def set_unfolded_eps(model: nn.Module, folded: set[str], eps: float | None) -> None:
    if eps is None:
        return
    for name, module in model.named_modules():
        if is_batchnorm_like(module) and hasattr(module, "eps") and name not in folded:
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
    work_tensors = _fold_in_float64(folds, work, eps, allow_overflow)
    held_by_bn = {layer.name: (f.bn, slice(start, stop), f.pieces[-1][2] if f.pieces else None)
                  for f in folds if f.into == INTO_PRODUCER for layer, start, stop in f.parts()}
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
            work.set_submodule(fold.bn.name, folded_replacement(work.get_submodule(fold.bn.name)))
        result = work
    set_unfolded_eps(result, {f.bn.name for f in folds}, eps)
    return Applied(model=result, form=form, gained=gained, warnings=warnings)

"""Fold every BatchNorm of any model that can be folded exactly, and say why for every one that cannot.

`fold_model` reads the data flow (bnstrip.graph), decides fold by fold with rules that
only accept exact rewrites, chains all folds into a layer in float64 and rounds once,
then removes the folded BatchNorms. The input model is never touched.

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

import copy
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnstrip.io.checkpoint import key_mismatch
from bnstrip.errors import CheckFailed, InputError, first_line
from bnstrip.core.foldmath import (
    BNStats,
    all_finite,
    bn_scale_shift,
    cast_folded,
    fold_into_consumer,
    fold_into_producer,
    identity_running_var,
)
from bnstrip.graph import (Op, OpGraph, bn_fixed_rank, build_graph, fresh_inputs, fx_trace, ops_from_fx,
                           other_readers, output_leaves, writer_of)
from bnstrip.core.compare import SelfCheck, compare_models, relative_tolerance, seeded_inputs

INTO_PRODUCER = "producer"
INTO_CONSUMER = "consumer"


@dataclass
class FoldResult:
    """The folded model and the account of every BatchNorm: folded (with where) or skipped (with why)."""

    model: nn.Module
    folded: list[tuple[str, str]]
    skipped: list[tuple[str, str]]
    into: dict[str, str] = field(default_factory=dict)
    gained_bias: list[str] = field(default_factory=list)
    tracer: str = "torch.fx"
    form: str = "modules"
    eps: float | None = None
    warnings: list[str] = field(default_factory=list)

    def manifest_entries(self) -> dict[str, Any]:
        """What load_folded needs to rebuild `model` from its state_dict."""
        return {
            "form": self.form,
            "tracer": self.tracer,
            "eps": self.eps,
            "folded": [{"layer": layer, "bn": bn, "into": self.into.get(bn, INTO_PRODUCER)} for layer, bn in self.folded],
            "skipped": [{"bn": bn, "reason": reason} for bn, reason in self.skipped],
            "gained_bias": list(self.gained_bias),
        }


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


# --------------------------------------------------------------------------- rules


@dataclass
class _Fold:
    layer: Op
    bn: Op
    into: str


def _bn_channels(bn: Op, root: nn.Module) -> int:
    if bn.module is not None:
        return int(bn.module.running_mean.numel())
    return int(_attr(root, bn.functional.mean).numel())


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
                    "input; pass example inputs")
        if rank != 2:
            return (f"it normalises dim 1 of the {rank}-D output of Linear {producer.name}, whose features are the "
                    "last dim, so folding would scale the wrong axis")
    else:
        if rank is None:
            return (f"its input rank is unknown (an unbatched {type(module).__name__} output would put channels on "
                    "dim 0); pass example inputs")
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
            return f"its input rank is unknown, and folding into Linear {consumer.name} is exact only on 2-D input; pass example inputs"
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
        return f"--keep-structure: the next layer {consumer.name} has no bias to hold the folded shift"
    return consumer


def _root_hooks(root: nn.Module) -> bool:
    return bool(root._forward_hooks or root._forward_pre_hooks or getattr(root, "_forward_hooks_with_kwargs", None))


def _bn_issue(bn: Op, graph: OpGraph, root: nn.Module, keep_structure: bool, eps: float | None) -> str | None:
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
                "GraphModule, which would drop them (use --keep-structure)")
    try:
        bn_scale_shift(_stats(bn, root, eps), bn.name)
    except InputError as exc:
        return f"its statistics cannot be folded: {exc}"
    own_eps = bn.functional.eps if bn.functional is not None else float(bn.module.eps)
    if keep_structure and not (math.isfinite(own_eps) and 0 <= own_eps < 1):
        return f"--keep-structure: its eps={own_eps} is not in [0, 1), so it cannot become an exact identity"
    return None


def _aliasing_issue(bn: Op, consumer: Op, graph: OpGraph) -> str | None:
    """Why dropping the BatchNorm would let an in-place write reach `consumer`, or None.

    Without the BatchNorm its output is its input tensor itself, so a write into that input
    (or a view of it) between the two calls would now reach the consumer. Only forms that delete
    the BatchNorm are affected; --keep-structure keeps it as a real op.
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
                "an in-place change cannot be ruled out without example inputs; pass example inputs")
    return None


def _decide(bn: Op, graph: OpGraph, root: nn.Module, keep_structure: bool, eps: float | None = None) -> _Fold | str:
    if issue := _bn_issue(bn, graph, root, keep_structure, eps):
        return issue
    producer = _try_producer(bn, graph, root)
    if isinstance(producer, Op):
        return _Fold(producer, bn, INTO_PRODUCER)
    consumer = _try_consumer(bn, graph, root, keep_structure)
    if isinstance(consumer, Op):
        return _Fold(consumer, bn, INTO_CONSUMER)
    return f"not folded into the layer before: {producer}; nor into the layer after: {consumer}"


def _rewire(fold: _Fold) -> None:
    """Take the BN out of the op graph so that chains (conv -> BN -> BN) are seen on the next pass."""
    bn = fold.bn
    source = bn.inputs[0] if bn.inputs else None
    for user in bn.users:
        user.inputs = [source if i is bn else i for i in user.inputs if not (i is bn and source is None)]
    if source is not None:
        source.users = [u for u in source.users if u is not bn]
        for user in bn.users:
            if user not in source.users:
                source.users.append(user)
    bn.inputs, bn.users = [], []


def plan_folds(graph: OpGraph, root: nn.Module, keep_structure: bool = False,
               eps: float | None = None) -> tuple[list[_Fold], dict[str, str]]:
    """Folds in the order they must be applied, and the reason each remaining BatchNorm stays."""
    folds: list[_Fold] = []
    reasons: dict[str, str] = {}
    done: set[int] = set()
    changed = True
    while changed:
        changed = False
        reasons = {}
        for op in graph.ops:
            if op.kind != "bn" or id(op) in done:
                continue
            decision = _decide(op, graph, root, keep_structure, eps)
            if isinstance(decision, _Fold):
                folds.append(decision)
                done.add(id(op))
                _rewire(decision)
                changed = True
            else:
                reasons.setdefault(op.name, decision)
    return folds, reasons


# --------------------------------------------------------------------------- applying the folds


def _attr(root: nn.Module, path: str) -> torch.Tensor:
    owner_path, _, leaf = path.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    return getattr(owner, leaf)


def _stats(bn: Op, root: nn.Module, eps: float | None) -> BNStats:
    if bn.functional is not None:
        spec = bn.functional
        return BNStats(_attr(root, spec.mean), _attr(root, spec.var),
                       _attr(root, spec.weight) if spec.weight else None,
                       _attr(root, spec.bias) if spec.bias else None, spec.eps)
    m = bn.module
    return BNStats(m.running_mean, m.running_var, m.weight, m.bias, float(m.eps if eps is None else eps))


def _fold_in_float64(folds: list[_Fold], root: nn.Module, eps: float | None) -> dict[str, list[Any]]:
    """Chain every fold into its layer in float64: {layer: [module, weight64, bias64 or None]}."""
    work: dict[str, list[Any]] = {}
    for fold in folds:
        module = fold.layer.module
        entry = work.setdefault(fold.layer.name, [
            module, module.weight.detach().to(torch.float64),
            None if module.bias is None else module.bias.detach().to(torch.float64)])
        stats = _stats(fold.bn, root, eps)
        name = f"{fold.layer.name} + {fold.bn.name}"
        if fold.into == INTO_PRODUCER:
            transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
            entry[1], entry[2] = fold_into_producer(entry[1], entry[2], stats, out_axis=1 if transposed else 0,
                                                    groups=getattr(module, "groups", 1) if transposed else 1, name=name)
        else:
            entry[1], entry[2] = fold_into_consumer(entry[1], entry[2], stats, groups=getattr(module, "groups", 1),
                                                    name=name)
    return work


def _cast(t64: torch.Tensor, dtype: torch.dtype, name: str, what: str, allow_overflow: bool,
          warnings: list[str]) -> torch.Tensor:
    out = cast_folded(t64, dtype, name, what, allow_overflow)
    if not all_finite(out):
        warnings.append(f"{name}: folded {what} overflows {str(dtype).replace('torch.', '')} and was kept as inf "
                        "(--allow-overflow)")
    return out


def _set_tensor(target: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        target.copy_(value)


def _add_bias(module: nn.Module, value: torch.Tensor) -> None:
    module.bias = nn.Parameter(value, requires_grad=module.weight.requires_grad)


def _write_layers(work: dict[str, list[Any]], held_by_bn: dict[str, Op], allow_overflow: bool,
                  warnings: list[str], keep_structure: bool) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Round once to each layer's dtype. Returns layers that gained a bias, and keep-structure biases per BN."""
    gained: list[str] = []
    bn_bias: dict[str, torch.Tensor] = {}
    for name, (module, w64, b64) in work.items():
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
            _add_bias(module, bias)
            gained.append(name)
        else:
            _set_tensor(module.bias, bias)
    return gained, bn_bias


def _make_identity(bn: Op, root: nn.Module, bias64: torch.Tensor | None, allow_overflow: bool,
                   warnings: list[str]) -> None:
    """Turn a folded BN into x * 1 + bias, exactly (see the module docstring)."""
    if bn.functional is not None:
        spec = bn.functional
        mean, var = _attr(root, spec.mean), _attr(root, spec.var)
        weight = _attr(root, spec.weight) if spec.weight else None
        bias = _attr(root, spec.bias) if spec.bias else None
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


def _replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_path, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, new)


def _strip_graph(gm: fx.GraphModule, bn_ops: Sequence[Op]) -> None:
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


def _set_unfolded_eps(model: nn.Module, folded: set[str], eps: float | None) -> None:
    if eps is None:
        return
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and name not in folded:
            module.eps = eps


def _as_inputs(example_inputs: Any) -> tuple[Any, ...] | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def _deepest(name: str, prefixes: Any) -> str | None:
    best = None
    for prefix in prefixes:
        if prefix == "" or name == prefix or name.startswith(prefix + "."):
            if best is None or len(prefix) > len(best):
                best = prefix
    return best


def _unseen_reason(name: str, graph: OpGraph) -> str:
    untraced = _deepest(name, graph.untraced)
    traced = _deepest(name, graph.traced)
    if untraced is not None and (traced is None or len(untraced) >= len(traced)):
        where = f"{untraced}'s" if untraced else "the model's"
        return f"it is called from {where} forward, which cannot be traced: {graph.untraced[untraced]}"
    return "it is never called in the traced forward (unused, or hidden from the tracer)"


def _refuse_unfoldable_model(model: nn.Module) -> None:
    """Whole models bnstrip cannot work on at all, with the fix."""
    if isinstance(model, torch.jit.ScriptModule):
        raise InputError(f"{getattr(model, 'original_name', type(model).__name__)}: the model is a TorchScript module "
                         "(torch.jit.script/trace), which cannot be rewritten; fold the nn.Module before scripting it")
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if isinstance(tensor, (nn.parameter.UninitializedParameter, nn.parameter.UninitializedBuffer)):
            raise InputError(f"{type(model).__name__}: {name} belongs to a lazy module that was never run, so there "
                             "are no trained weights to fold; run the model once or load its checkpoint first")


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _seeded_outputs(model: nn.Module, inputs: Sequence[Any]) -> Any:
    """model(*inputs) with torch's and Python's generators seeded (and restored): random ops in a forward
    (noise, dropout-like code) draw the same numbers for the original and the folded model."""
    python_state = random.getstate()
    try:
        random.seed(0)
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(0)
            return model(*fresh_inputs(inputs))
    finally:
        random.setstate(python_state)


def _output_gap(expected: Any, got: Any) -> tuple[float, float] | None:
    """(max |difference|, max |expected|) over all tensor outputs; None when the outputs differ in structure."""
    expected_spec, expected_leaves = output_leaves(expected)
    got_spec, got_leaves = output_leaves(got)
    if expected_spec != got_spec:
        return None
    gap, scale = 0.0, 0.0
    for a, b in zip(expected_leaves, got_leaves):
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            continue
        if a.shape != b.shape:
            return None
        if a.numel() == 0:
            continue
        a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
        same_nonfinite = torch.equal(torch.isfinite(a64), torch.isfinite(b64))
        finite = torch.isfinite(a64) & torch.isfinite(b64)
        if not same_nonfinite:
            return float("inf"), scale
        if finite.any():
            gap = max(gap, float((a64[finite] - b64[finite]).abs().max()))
            scale = max(scale, float(a64[finite].abs().max()))
    return gap, scale


def _verify(reference: nn.Module, expected: Any, candidate: nn.Module, inputs: Sequence[Any],
            dtype: torch.dtype) -> str | None:
    """None when `candidate` gives the reference's outputs on the example inputs, else why not.

    `expected` is the reference's output in its own dtype. A candidate within tolerance of it
    passes at once; otherwise the two are compared again in float64 (where the model runs in it),
    so that rounding of the run itself is never blamed on the fold. The tolerance is the one the
    self-check uses for the model's dtype.
    """
    rtol = relative_tolerance(dtype)
    try:
        got = _seeded_outputs(candidate, inputs)
    except Exception as exc:
        return f"the folded model fails on the example inputs ({type(exc).__name__}: {first_line(exc, 200, '')})"
    measured = _output_gap(expected, got)
    if measured is not None and measured[0] <= rtol * max(measured[1], 1.0):
        return None

    def wide(t: Any) -> Any:
        return t.to(torch.float64) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    try:
        wide_inputs = [wide(t) for t in inputs]
        measured = _output_gap(_seeded_outputs(copy.deepcopy(reference).to(torch.float64), wide_inputs),
                               _seeded_outputs(copy.deepcopy(candidate).to(torch.float64), wide_inputs))
    except Exception:  # the model will not run in float64 (hard-coded dtypes, ...): the first comparison stands
        pass
    if measured is None:
        return "the folded model's outputs have another structure or shape than the original's"
    gap, scale = measured
    tolerance = rtol * max(scale, 1.0)
    if gap > tolerance:
        return f"the outputs moved by {gap:.3g} on the example inputs (tolerance {tolerance:.3g})"
    return None




@dataclass
class _Attempt:
    result: FoldResult
    reference: nn.Module | None
    reference_output: Any = None


def _fold_copy(model: nn.Module, inputs: tuple[Any, ...] | None, eps: float | None, keep_structure: bool,
               allow_overflow: bool, excluded: dict[str, str], keep_reference: bool) -> _Attempt:
    """Fold a copy of `model`, refusing the BatchNorms in `excluded` (name -> reason); no verification."""
    try:
        work = copy.deepcopy(model)
    except Exception as exc:
        hint = ("; a torch.nn.utils.weight_norm module cannot be copied: use "
                "torch.nn.utils.parametrizations.weight_norm" if "deepcopy protocol" in str(exc) else "")
        raise InputError(f"{type(model).__name__}: cannot copy the model ({type(exc).__name__}: "
                         f"{first_line(exc, 200, '').split('. ')[0][:160]})"
                         f"{hint}; the input model must stay untouched, so fold a copyable model") from None
    work.eval()
    graph = build_graph(work, inputs)
    for name, reason in excluded.items():
        graph.refusals[name] = reason
    reference, reference_output = None, None
    if keep_reference:
        reference = copy.deepcopy(work)
        _set_unfolded_eps(reference, set(), eps)
        reference_output = graph.model_output if eps is None else None
        if reference_output is None:
            reference_output = _seeded_outputs(reference, inputs or ())
    folds, reasons = plan_folds(graph, work, keep_structure, eps)
    warnings: list[str] = []
    work_tensors = _fold_in_float64(folds, work, eps)
    held_by_bn = {f.layer.name: f.bn for f in folds if f.into == INTO_PRODUCER}
    gained, bn_bias = _write_layers(work_tensors, held_by_bn, allow_overflow, warnings, keep_structure)
    folded_names = {f.bn.name for f in folds}
    functional = [f.bn for f in folds if f.bn.functional is not None]
    if keep_structure:
        form = "keep-structure"
        for fold in folds:
            _make_identity(fold.bn, work, bn_bias.get(fold.bn.name), allow_overflow, warnings)
        result_model = work
    elif functional:
        form = "graph"
        assert graph.gm is not None  # functional BNs are only folded on a whole-model fx graph
        _strip_graph(graph.gm, [f.bn for f in folds])
        result_model = graph.gm
    else:
        form = "modules"
        for fold in folds:
            _replace_module(work, fold.bn.name, FoldedBatchNorm(work.get_submodule(fold.bn.name)))
        result_model = work
    _set_unfolded_eps(result_model, folded_names, eps)
    skipped = list(reasons.items())
    seen = folded_names | set(reasons)
    for name, module in work.named_modules():
        if name in seen:
            continue
        if isinstance(module, _BatchNorm):
            skipped.append((name, _unseen_reason(name, graph)))
            seen.add(name)
        elif isinstance(module, torch.jit.ScriptModule) and "BatchNorm" in str(getattr(module, "original_name", "")):
            skipped.append((name, "it is a TorchScript module (torch.jit.script/trace), which bnstrip cannot rewrite; "
                                  "fold before scripting"))
            seen.add(name)
    result = FoldResult(model=result_model.eval(), folded=[(f.layer.name, f.bn.name) for f in folds], skipped=skipped,
                        into={f.bn.name: f.into for f in folds}, gained_bias=gained, tracer=graph.tracer, form=form,
                        eps=eps, warnings=warnings)
    return _Attempt(result=result, reference=reference, reference_output=reference_output)


_MAX_ATTEMPTS = 12
"""Folds of the model tried while looking for the one that moved the outputs (each is a trace and two runs)."""


def fold_model(model: nn.Module, example_inputs: Any = None, *, eps: float | None = None,
               keep_structure: bool = False, allow_overflow: bool = False) -> FoldResult:
    """Fold every BatchNorm of `model` that can be folded exactly; the input model is left unchanged.

    example_inputs (a tensor or a tuple) give shapes to the rules that need them (BatchNorm1d
    next to Linear or Conv1d) and let torch.export trace models fx cannot. `eps` replaces every
    BatchNorm module's eps in the fold (a state_dict does not store eps); the returned model
    then uses it too. With keep_structure=True every module is kept (see the module docstring).

    With example inputs the folded model is also run against the original: should the outputs
    move (something no rule foresaw), the folds that moved them are found by bisection and undone,
    each skipped with the reason, so a wrong model is never returned for these inputs.
    """
    _refuse_unfoldable_model(model)
    inputs = _as_inputs(example_inputs)
    verify = inputs is not None
    attempt = _fold_copy(model, inputs, eps, keep_structure, allow_overflow, {}, keep_reference=verify)
    if not verify or not attempt.result.folded:
        return attempt.result
    reference, dtype = attempt.reference, _model_dtype(model)
    assert reference is not None
    expected = attempt.reference_output
    problem = _verify(reference, expected, attempt.result.model, inputs, dtype)
    if problem is None:
        return attempt.result

    # Something moved the outputs: keep the folds that provably do not (bisection over the fold list).
    first_problem = problem
    candidates = [bn for _, bn in attempt.result.folded]
    excluded: dict[str, str] = {}
    tries = 0

    def passes(trial_excluded: dict[str, str]) -> bool:
        nonlocal tries
        tries += 1
        trial = _fold_copy(model, inputs, eps, keep_structure, allow_overflow, trial_excluded, keep_reference=False)
        return _verify(reference, expected, trial.result.model, inputs, dtype) is None

    undone = (f"every rule allowed folding it, but then {first_problem}; the fold was undone "
              "(please report this model)")

    def search(block: list[str], rest: list[str]) -> None:
        """Decide `block` given that everything in `rest` (after it) is still excluded."""
        if not block:
            return
        rest_excluded = {bn: "undecided" for bn in rest}
        if tries < _MAX_ATTEMPTS and passes({**excluded, **rest_excluded}):
            return  # the whole block is fine with what is already kept
        if len(block) == 1 or tries >= _MAX_ATTEMPTS:
            for bn in block:
                excluded[bn] = undone
            return
        middle = len(block) // 2
        search(block[:middle], block[middle:] + rest)
        search(block[middle:], rest)

    search(candidates, [])
    final = _fold_copy(model, inputs, eps, keep_structure, allow_overflow, excluded, keep_reference=False)
    if _verify(reference, expected, final.result.model, inputs, dtype) is not None:  # interactions: undo everything
        excluded = {bn: undone for bn in candidates}
        final = _fold_copy(model, inputs, eps, keep_structure, allow_overflow, excluded, keep_reference=False)
    return final.result


# --------------------------------------------------------------------------- rebuilding from OUT + manifest


def folded_skeleton(model: nn.Module, manifest: dict[str, Any], source: str = "manifest") -> nn.Module:
    """A copy of `model` with the manifest's structure (BNs removed, biases added) so OUT loads strictly."""
    work = copy.deepcopy(model).eval()
    form = manifest["form"]
    bn_names = [entry["bn"] for entry in manifest["folded"]]
    eps = manifest.get("eps")
    if form == "keep-structure":
        return work
    if form == "modules":
        for name in bn_names:
            try:
                module = work.get_submodule(name)
            except AttributeError:
                module = None
            if not isinstance(module, _BatchNorm):
                raise InputError(f"{source}: folded BatchNorm {name!r} is not a BatchNorm of {type(model).__name__}; "
                                 "pass the model the checkpoint was folded from")
            _replace_module(work, name, FoldedBatchNorm(module))
        result: nn.Module = work
    else:
        gm, _, error = fx_trace(work)
        if gm is None:
            raise InputError(f"{source}: {type(model).__name__} no longer traces with torch.fx ({error}); "
                             "pass the model the checkpoint was folded from")
        ops = {op.name: op for op in ops_from_fx(gm) if op.kind == "bn"}
        missing = [name for name in bn_names if name not in ops]
        if missing:
            raise InputError(f"{source}: folded BatchNorm {missing[0]!r} is not in {type(model).__name__}'s graph; "
                             "pass the model the checkpoint was folded from")
        _strip_graph(gm, [ops[name] for name in bn_names])
        result = gm
    for name in manifest["gained_bias"]:
        try:
            layer = result.get_submodule(name)
        except AttributeError:
            layer = None
        if layer is None or getattr(layer, "weight", None) is None or "bias" not in layer._parameters:
            raise InputError(f"{source}: layer {name!r} that gained a bias is not in {type(model).__name__}; "
                             "pass the model the checkpoint was folded from")
        if layer.bias is None:
            out_features = layer.weight.shape[1] * layer.groups if isinstance(layer, nn.modules.conv._ConvTransposeNd) \
                else layer.weight.shape[0]
            _add_bias(layer, torch.zeros(out_features, dtype=layer.weight.dtype, device=layer.weight.device))
    _set_unfolded_eps(result, set(bn_names), eps)
    return result.eval()


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict(strict=True) with a one-line InputError that names what does not match."""
    expected = model.state_dict()
    mismatch = key_mismatch(expected, state)
    if mismatch:
        raise InputError(f"{source}: does not load strictly into {type(model).__name__} ({mismatch}); "
                         "pass the matching --arch / checkpoint")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise InputError(f"{source}: {key} has shape {tuple(state[key].shape)} but {type(model).__name__} expects "
                             f"{tuple(tensor.shape)}; pass the matching --arch / checkpoint")
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError) as exc:
        text = str(exc).strip().splitlines()
        raise InputError(f"{source}: does not load into {type(model).__name__} ({text[0] if text else exc})") from None


def load_folded(model: nn.Module, path: str | Path) -> nn.Module:
    """Rebuild the folded module written by `bnstrip fuse --arch`: `model` is a fresh instance of the original class."""
    from bnstrip.io.checkpoint import load_checkpoint
    from bnstrip.io.manifest import manifest_path, read_manifest

    manifest = read_manifest(path)
    loaded = load_checkpoint(path)
    expected_sha = manifest.get("output_sha256")
    if expected_sha and expected_sha != loaded.sha256:
        raise InputError(f"{path}: file changed since {manifest_path(path)} was written (sha256 differs); "
                         "fold it again with `bnstrip fuse --arch`")
    skeleton = folded_skeleton(model, manifest, source=str(path))
    load_state_strict(skeleton, loaded.state_dict, str(path))
    return skeleton.eval()


# --------------------------------------------------------------------------- the `fuse --arch` command as a call


@dataclass
class ArchFuse:
    """What `bnstrip fuse --arch` did, for the table and --json."""

    input: str
    output: str
    manifest: str
    arch: str
    input_shape: list[int]
    result: FoldResult
    self_check: SelfCheck
    dtype: str
    source_format: str
    unwrapped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        entries = self.result.manifest_entries()
        return {
            "input": self.input, "output": self.output, "manifest": self.manifest, "arch": self.arch,
            "input_shape": self.input_shape, "form": entries["form"], "tracer": entries["tracer"],
            "eps": entries["eps"], "dtype": self.dtype, "format": self.source_format,
            "folded": entries["folded"], "skipped": entries["skipped"], "gained_bias": entries["gained_bias"],
            "self_check_max_abs_diff": self.self_check.max_abs_diff,
            "self_check_output_scale": self.self_check.output_scale,
            "self_check_tolerance": self.self_check.tolerance, "self_check_samples": self.self_check.samples,
            "unwrapped": self.unwrapped, "warnings": self.warnings, "seconds": self.seconds,
        }


def _state_dtype(state: dict[str, torch.Tensor]) -> torch.dtype | None:
    dtypes = {t.dtype for t in state.values() if isinstance(t, torch.Tensor) and t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def _outputs_check(reference: nn.Module, candidate: nn.Module, inputs: torch.Tensor, rtol: float,
                   name: str) -> SelfCheck:
    """Compare in float64 (isolates the fold from rounding); in the model's dtype if it will not run in float64."""
    try:
        return compare_models(copy.deepcopy(reference).to(torch.float64), copy.deepcopy(candidate).to(torch.float64),
                              [inputs.to(torch.float64)], rtol, name=name)
    except CheckFailed:
        raise
    except Exception:
        return compare_models(reference, candidate, [inputs], rtol, name=name)


def fuse_checkpoint(input_path: str, output_path: str, arch: str, input_shape: Sequence[int] | None, *,
                    keep_structure: bool = False, eps: float | None = None, force: bool = False,
                    allow_overflow: bool = False, seed: int = 0) -> ArchFuse:
    """Build --arch, load IN strictly, fold, self-check against the original, write OUT and OUT.bnstrip.json."""
    from bnstrip import __version__
    from bnstrip.arch import import_arch
    from bnstrip.io.checkpoint import check_output_path, load_checkpoint, save_checkpoint, sha256_file
    from bnstrip.io.manifest import check_manifest_path, write_manifest

    started = time.perf_counter()
    if not input_shape:
        raise InputError(f"--arch {arch}: --input-shape is required to trace and self-check the model, "
                         "e.g. --input-shape 1,3,224,224")
    if any(int(d) <= 0 for d in input_shape):
        raise InputError(f"--input-shape {','.join(map(str, input_shape))}: every dimension must be positive")
    check_output_path(output_path, [input_path], force)
    manifest_file = check_manifest_path(output_path, [input_path], force)
    model = import_arch(arch)
    loaded = load_checkpoint(input_path)
    dtype = _state_dtype(loaded.state_dict)
    if dtype is not None:
        model = model.to(dtype)
    load_state_strict(model, loaded.state_dict, input_path)
    model.eval()
    model_dtype = _model_dtype(model)
    inputs = seeded_inputs(list(input_shape), seed=seed, dtype=model_dtype)
    result = fold_model(model, (inputs,), eps=eps, keep_structure=keep_structure, allow_overflow=allow_overflow)
    reference = model  # fold_model worked on its own copy; this one is not needed as it was
    _set_unfolded_eps(reference, set(), eps)
    if keep_structure:
        candidate = import_arch(arch).to(model_dtype)
        load_state_strict(candidate, result.model.state_dict(), f"{output_path} (--keep-structure)")
        candidate.eval()
    else:
        candidate = result.model
    check = _outputs_check(reference, candidate, inputs, relative_tolerance(model_dtype), arch)
    if not check.passed:
        hint = ""
        if keep_structure and eps is not None and result.skipped:
            hint = (f"; {len(result.skipped)} BatchNorms were not folded and keep the model's own eps, not --eps "
                    f"{eps}")
        raise CheckFailed(f"{input_path}: folded {arch} differs from the original by {check.max_abs_diff:.3g} "
                          f"(tolerance {check.tolerance:.3g}){hint}; not writing {output_path}")
    state = result.model.state_dict()
    entries = result.manifest_entries()
    save_checkpoint(state, output_path, force=force, inputs=[input_path], metadata={
        "source_sha256": loaded.sha256, "bnstrip_version": __version__, "architecture": arch,
        "form": entries["form"], "folded_pairs": ",".join(f"{layer}+{bn}" for layer, bn in result.folded),
        "eps": repr(eps),
    })
    try:
        write_manifest(output_path, {
            "bnstrip_version": __version__, "architecture": arch, "input_shape": list(map(int, input_shape)),
            "source": str(input_path), "source_sha256": loaded.sha256,
            "output": Path(output_path).name, "output_sha256": sha256_file(output_path),
            **entries,
            "self_check": {"max_abs_diff": check.max_abs_diff, "output_scale": check.output_scale,
                           "tolerance": check.tolerance, "samples": check.samples},
        })
    except BaseException:
        Path(output_path).unlink(missing_ok=True)  # OUT without its manifest cannot be rebuilt
        raise
    return ArchFuse(input=str(input_path), output=str(output_path), manifest=str(manifest_file), arch=arch,
                    input_shape=list(map(int, input_shape)), result=result, self_check=check,
                    dtype=str(model_dtype).replace("torch.", ""), source_format=loaded.format,
                    unwrapped=list(loaded.unwrapped), warnings=list(result.warnings),
                    seconds=time.perf_counter() - started)

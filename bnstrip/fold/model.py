"""fold_model: fold every BatchNorm of any model that can be folded exactly, and say why for every one that cannot.

It reads the data flow (bnstrip.trace), decides fold by fold with the rules table
(bnstrip.fold.rules), applies the folds to a copy (bnstrip.fold.rewrite) and, with example
inputs, checks the result with the one comparator (bnstrip.core.compare); should the outputs
move, `bisect_folds` finds the folds that moved them and undoes them. The input model is never touched.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from bnstrip.core.compare import (SelfCheck, compare_outputs, float64_outputs, fresh_inputs, model_dtype,
                                  seeded_outputs)
from bnstrip.errors import InputError, first_line
from bnstrip.fold.plan import plan_folds, replay_graph
from bnstrip.fold.rewrite import apply_folds
from bnstrip.fold.rules import INTO_PRODUCER
from bnstrip.trace import OpGraph, build_graph
from bnstrip.trace.bn_registry import is_batchnorm_like

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
    check: SelfCheck | None = None
    """The comparison of `model` with the original on the example inputs (None without them)."""
    merged: list[Any] = field(default_factory=list)
    """With reparameterize=True: each sum of branches merged into one conv (bnstrip.fold.reparam.Merge)."""
    merge_refused: list[tuple[str, str]] = field(default_factory=list)
    """With reparameterize=True: (sum or conv, why) for branches that were not merged."""

    def manifest_entries(self) -> dict[str, Any]:
        """What load_folded needs to rebuild `model` from its state_dict."""
        return {
            "form": self.form,
            "tracer": self.tracer,
            "eps": self.eps,
            "folded": [{"layer": layer, "bn": bn, "into": self.into.get(bn, INTO_PRODUCER)} for layer, bn in self.folded],
            "skipped": [{"bn": bn, "reason": reason} for bn, reason in self.skipped],
            "gained_bias": list(self.gained_bias),
            "merged": [merge.to_dict() for merge in self.merged],
        }


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


@contextlib.contextmanager
def _eps_override(model: nn.Module, eps: float | None) -> Iterator[None]:
    """Every BatchNorm of `model` uses `eps` inside the block (the original as the user asked for it)."""
    saved = [(m, m.eps) for m in model.modules() if is_batchnorm_like(m) and hasattr(m, "eps")] if eps is not None else []
    for module, _ in saved:
        module.eps = eps
    try:
        yield
    finally:
        for module, own in saved:
            module.eps = own


@dataclass
class _Reference:
    """The original's outputs on the example inputs: in its own dtype and evaluated in float64 (None if impossible)."""

    outputs: Any
    outputs64: Any
    dtype: torch.dtype
    samples: int


def _check(reference: _Reference, candidate: nn.Module, inputs: Sequence[Any]) -> tuple[SelfCheck | None, str | None]:
    """The one comparator on `candidate`: (report, None) when it passes, else (report or None, why not)."""
    try:  # not seeded: a forward whose output depends on the random generator cannot be proven equal, so it fails
        with torch.no_grad():
            got = candidate(*fresh_inputs(inputs))
    except Exception as exc:  # noqa: BLE001 - the folded model must run where the original did
        return None, f"the folded model fails on the example inputs ({type(exc).__name__}: {first_line(exc, 200, '')})"
    report = compare_outputs(reference.outputs, got, reference.outputs64, reference.dtype, reference.samples)
    if report is None:
        return None, "the folded model's outputs have another structure or shape than the original's"
    if not report.passed:
        return report, f"{report.describe()} on the example inputs"
    return report, None


def training_batchnorms(model: nn.Module) -> list[str]:
    """BatchNorms left in training mode inside a model in eval mode: they stay so (and are skipped), since
    they normalise with batch statistics in the model as given. A model in training mode is folded as eval."""
    if model.training:
        return []
    return [name for name, module in model.named_modules() if is_batchnorm_like(module) and module.training]


def _copy_model(model: nn.Module) -> nn.Module:
    try:
        work = copy.deepcopy(model).eval()
    except Exception as exc:
        weight_norm = any(isinstance(getattr(m, "weight_g", None), nn.Parameter) for m in model.modules())
        hint = ("; a torch.nn.utils.weight_norm module cannot be copied: use torch.nn.utils.parametrizations."
                "weight_norm" if weight_norm else "; a tensor held by the model is computed from another (a view or "
                "an alias, not a leaf)") if "deepcopy protocol" in str(exc) else ""
        raise InputError(f"{type(model).__name__}: cannot copy the model ({type(exc).__name__}: "
                         f"{first_line(exc, 200, '').split('. ')[0][:160]})"
                         f"{hint}; the input model must stay untouched, so fold a copyable model") from None
    return _modes_as_given(model, work.eval())


def _modes_as_given(model: nn.Module, work: nn.Module) -> nn.Module:
    """`work` (in eval mode) with the BatchNorms that `model` left in training mode back in it, alone."""
    for name in training_batchnorms(model):
        try:
            work.get_submodule(name).training = True
        except AttributeError:
            continue
    return work


def _restore_statistics(model: nn.Module, result: FoldResult) -> None:
    """The runs of the check updated the running statistics of BatchNorms left in training mode: put back the
    model's own, so the output holds what the input held."""
    for name in training_batchnorms(model):
        try:
            target = result.model.get_submodule(name)
        except AttributeError:
            continue
        for key, value in model.get_submodule(name)._buffers.items():
            if value is not None and isinstance(target._buffers.get(key), torch.Tensor):
                with torch.no_grad():
                    target._buffers[key].copy_(value)


def _fold_copy(model: nn.Module, inputs: tuple[Any, ...] | None, eps: float | None, keep_structure: bool,
               allow_overflow: bool, excluded: dict[str, str], want_reference: bool = False,
               traced: dict[str, OpGraph | None] | None = None) -> tuple[FoldResult, _Reference | None]:
    """Fold a copy of `model`, refusing the BatchNorms in `excluded` (name -> reason); no check.

    With want_reference, the copy's outputs (own dtype and float64) are taken before it is
    folded: the reference costs no second copy of the model. `traced` keeps the first trace
    (under "graph") so that later calls with it plan again on a copy of that graph (bisection).
    """
    work = _copy_model(model)
    earlier = traced.get("graph") if traced is not None else None
    graph = replay_graph(earlier, work) if earlier is not None else None
    if graph is None:
        graph = build_graph(work, inputs)
        if traced is not None:
            traced["graph"] = replay_graph(graph, work)
    for name, reason in excluded.items():
        graph.refusals[name] = reason
    reference = None
    if want_reference and inputs is not None:
        with _eps_override(work, eps):
            outputs = graph.model_output if eps is None and graph.model_output is not None \
                else seeded_outputs(work, inputs)
            outputs64 = float64_outputs(work, inputs)
        first = inputs[0] if inputs else None
        samples = int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 1
        reference = _Reference(outputs, outputs64, model_dtype(model), samples)
    folds, reasons = plan_folds(graph, work, keep_structure, eps)
    applied = apply_folds(folds, graph, work, eps, keep_structure, allow_overflow)
    folded_names = {f.bn.name for f in folds}
    skipped = list(reasons.items())
    seen = folded_names | set(reasons)
    for name, module in work.named_modules():
        if name in seen:
            continue
        if is_batchnorm_like(module):
            skipped.append((name, _unseen_reason(name, graph)))
            seen.add(name)
        elif isinstance(module, torch.jit.ScriptModule) and "BatchNorm" in str(getattr(module, "original_name", "")):
            skipped.append((name, "it is a TorchScript module (torch.jit.script/trace), which bnstrip cannot rewrite; "
                                  "fold before scripting"))
            seen.add(name)
    result = FoldResult(model=_modes_as_given(model, applied.model.eval()), folded=[(f.layer_name, f.bn.name) for f in folds],
                        skipped=skipped, into={f.bn.name: f.into for f in folds}, gained_bias=applied.gained,
                        tracer=graph.tracer, form=applied.form, eps=eps, warnings=applied.warnings)
    return result, reference


_MAX_ATTEMPTS = 12
"""Folds of the model tried while looking for the one that moved the outputs (each is a trace and two runs)."""


def bisect_folds(candidates: list[str], passes: Callable[[dict[str, str]], bool], undone: str) -> dict[str, str]:
    """The folds to undo (name -> reason) so that the rest pass: bisection over the fold list.

    `passes(excluded)` folds again without the excluded BatchNorms and checks the result; at most
    _MAX_ATTEMPTS such tries are made, after which the undecided folds are undone too.
    """
    excluded: dict[str, str] = {}
    tries = 0

    def search(block: list[str], rest: list[str]) -> None:
        """Decide `block` given that everything in `rest` (after it) is still excluded."""
        nonlocal tries
        if not block:
            return
        if tries < _MAX_ATTEMPTS:
            tries += 1
            if passes({**excluded, **{bn: "undecided" for bn in rest}}):
                return  # the whole block is fine with what is already kept
        if len(block) == 1 or tries >= _MAX_ATTEMPTS:
            for bn in block:
                excluded[bn] = undone
            return
        middle = len(block) // 2
        search(block[:middle], block[middle:] + rest)
        search(block[middle:], rest)

    search(candidates, [])
    return excluded


def fold_model(model: nn.Module, example_inputs: Any = None, *, eps: float | None = None,
               keep_structure: bool = False, allow_overflow: bool = False,
               reparameterize: bool = False) -> FoldResult:
    """Fold every BatchNorm of `model` that can be folded exactly; the input model is left unchanged.

    example_inputs (a tensor or a tuple) give shapes to the rules that need them (BatchNorm1d
    next to Linear or Conv1d) and let torch.export trace models fx cannot. `eps` replaces every
    BatchNorm module's eps in the fold (a state_dict does not store eps); the returned model
    then uses it too. With keep_structure=True every module is kept (see bnstrip.fold.rewrite).

    With example inputs the folded model is also compared with the original (bnstrip.core.compare,
    reported in `result.check`): should the outputs move (something no rule foresaw), the folds
    that moved them are found by bisection and undone, each skipped with the reason, so a wrong
    model is never returned for these inputs.

    With reparameterize=True, sums of parallel branches (RepVGG, MobileOne, ACNet blocks) are then
    merged into one conv each and proven the same way (bnstrip.fold.reparam); it needs
    example_inputs and cannot keep the structure.
    """
    if reparameterize and keep_structure:
        raise InputError("reparameterize=True cannot go with keep_structure=True: merging branches replaces them by "
                         "one new conv, so the original structure cannot be kept")
    if reparameterize and example_inputs is None:
        raise InputError("reparameterize=True needs example_inputs to prove the merged model")
    _refuse_unfoldable_model(model)
    inputs = _as_inputs(example_inputs)
    traced: dict[str, OpGraph | None] = {}
    result, reference = _fold_copy(model, inputs, eps, keep_structure, allow_overflow, {}, want_reference=True,
                                   traced=traced)
    if reference is None or inputs is None:
        return result
    result = _checked(model, inputs, result, reference, eps, keep_structure, allow_overflow, traced)
    if reparameterize:
        from bnstrip.fold.reparam import reparameterize_result  # it imports this module

        reparameterize_result(result, inputs, allow_overflow, lambda candidate: _check(reference, candidate, inputs))
    _restore_statistics(model, result)
    return result


def _checked(model: nn.Module, inputs: tuple[Any, ...], result: FoldResult, reference: _Reference,
             eps: float | None, keep_structure: bool, allow_overflow: bool,
             traced: dict[str, OpGraph | None] | None = None) -> FoldResult:
    """`result` with its check against the original; folds that moved the outputs are found and undone.

    Every retry plans again on a copy of the first trace (`traced`) instead of tracing again.
    """
    report, problem = _check(reference, result.model, inputs)
    if problem is None:
        result.check = report
        return result

    # Something moved the outputs: keep the folds that provably do not.
    undone = f"every rule allowed folding it, but then {problem}; the fold was undone (please report this model)"

    def passes(trial_excluded: dict[str, str]) -> bool:
        trial, _ = _fold_copy(model, inputs, eps, keep_structure, allow_overflow, trial_excluded, traced=traced)
        return _check(reference, trial.model, inputs)[1] is None

    excluded = bisect_folds([bn for _, bn in result.folded], passes, undone)
    final, _ = _fold_copy(model, inputs, eps, keep_structure, allow_overflow, excluded, traced=traced)
    report, problem = _check(reference, final.model, inputs)
    if problem is not None:  # interactions: undo everything
        final, _ = _fold_copy(model, inputs, eps, keep_structure, allow_overflow,
                              {bn: undone for _, bn in result.folded}, traced=traced)
        report, _ = _check(reference, final.model, inputs)
    final.check = report
    return final

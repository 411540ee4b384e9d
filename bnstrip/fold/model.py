"""fold_model: fold every BatchNorm of any model that can be folded exactly, and say why for every one that cannot.

It reads the data flow (bnstrip.trace), decides fold by fold with the rules table
(bnstrip.fold.rules), applies the folds to a copy (bnstrip.fold.rewrite) and, with example
inputs, checks the result with the one comparator (bnstrip.core.compare); should the outputs
move, `bisect_folds` finds the folds that moved them and undoes them. The input model is never touched.
The check itself and the bisection live in bnstrip.fold.check (re-exported here).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from bnstrip._torch import own_buffers
from bnstrip.core.compare import SelfCheck, model_dtype, seeded_outputs
from bnstrip.errors import InputError
from bnstrip.fold.check import (Reference, all_float64, as_inputs, bisect_folds, check_candidate, check_folded,
                                copy_model, eps_override, measure_sensitivity, modes_as_given, original_float64,
                                samples_of, training_batchnorms)
from bnstrip.fold.options import FoldOptions
from bnstrip.refusals import refusal
from bnstrip.fold.plan import plan_folds, replay_graph
from bnstrip.fold.rewrite import apply_folds
from bnstrip.fold.rules import INTO_PRODUCER
from bnstrip.trace import OpGraph, build_graph
from bnstrip.trace.bn_registry import is_batchnorm_like

__all__ = ["FoldResult", "bisect_folds", "check_folded", "fold_model", "training_batchnorms",
           "with_none_folded_warning"]

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
            "skipped": [{"bn": bn, **refusal(reason).to_dict()} for bn, reason in self.skipped],
            "gained_bias": list(self.gained_bias),
            "merged": [merge.to_dict() for merge in self.merged],
        }

    def save(self, path: Any, *, force: bool = False) -> Any:
        """Write the folded state_dict and its manifest, for `bnstrip.load_folded(path, ModelClass)` (fold.save)."""
        from bnstrip.fold.save import save_result

        return save_result(self, path, force=force)


_NONE_FOLDED = "none of its {} BatchNorm(s) could be folded; the reasons are listed with each"


def with_none_folded_warning(warnings: list[str], folded: Sequence[Any], skipped: Sequence[Any]) -> list[str]:
    """`warnings` with the one that says no BatchNorm folded at all, where that is so (every path says it, once):
    a model whose BatchNorms all stay would otherwise pass in silence."""
    prefix = _NONE_FOLDED.split("{}")[0]
    kept = [w for w in warnings if not w.startswith(prefix)]
    if skipped and not folded:
        kept.append(_NONE_FOLDED.format(len(skipped)))
    return kept


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
def _attributes_kept(model: nn.Module) -> Iterator[None]:
    """The plain attributes of every module (not parameters, buffers or children) as they were before the block.

    Tracing runs the forward, and a forward that caches what it computed (ultralytics' detection head keeps
    the anchors of the last input size, timm's EfficientViT-MSRA its attention biases in a dict it fills in
    place) would keep the tracer's fake tensors, which no real run can use. Plain dicts, lists and sets get
    their contents back too, in the same container.
    """
    saved = [(module, dict(module.__dict__)) for module in model.modules()]
    contents = [(value, copy.copy(value)) for _, before in saved for key, value in before.items()
                if not key.startswith("_") and type(value) in (dict, list, set)]
    try:
        yield
    finally:
        for module, before in saved:
            for key in [k for k in module.__dict__ if k not in before and not k.startswith("_")]:
                del module.__dict__[key]
            for key, value in before.items():
                if not key.startswith("_") and module.__dict__.get(key) is not value:
                    module.__dict__[key] = value
        for container, old in contents:
            container.clear()
            if isinstance(container, list):
                container.extend(old)
            else:
                container.update(old)


def _restore_statistics(model: nn.Module, result: FoldResult) -> None:
    """The runs of the check updated the running statistics of BatchNorms left in training mode: put back the
    model's own, so the output holds what the input held."""
    for name in training_batchnorms(model):
        try:
            target = result.model.get_submodule(name)
        except AttributeError:
            continue
        for key, value in own_buffers(model.get_submodule(name)).items():
            slot = own_buffers(target).get(key)
            if value is not None and isinstance(slot, torch.Tensor):
                with torch.no_grad():
                    slot.copy_(value)


def _fold_copy(model: nn.Module, inputs: tuple[Any, ...] | None, options: FoldOptions, excluded: dict[str, str],
               want_reference: bool = False,
               traced: dict[str, OpGraph | None] | None = None) -> tuple[FoldResult, Reference | None]:
    """Fold a copy of `model`, refusing the BatchNorms in `excluded` (name -> reason); no check.

    With want_reference, the copy's outputs (own dtype and float64) are taken before it is
    folded: the reference costs no second copy of the model. `traced` keeps the first trace
    (under "graph") so that later calls with it plan again on a copy of that graph (bisection).
    """
    eps, keep_structure = options.eps, options.keep_structure
    work = copy_model(model)
    earlier = traced.get("graph") if traced is not None else None
    graph = replay_graph(earlier, work) if earlier is not None else None
    if graph is None:
        with _attributes_kept(work):
            graph = build_graph(work, inputs)
        if traced is not None:
            traced["graph"] = replay_graph(graph, work)
    for name, reason in excluded.items():
        graph.refusals[name] = reason
    reference = None
    if want_reference and inputs is not None:
        with eps_override(work, eps):
            outputs = graph.model_output if eps is None and graph.model_output is not None \
                else seeded_outputs(work, inputs)
        # The float64 evaluation (on a fresh copy: `work` is folded below) only where the check needs it.
        reference = Reference(outputs, outputs if all_float64(work, inputs) else None, model_dtype(model),
                              samples_of(inputs))
        if reference.outputs64 is None:
            reference.evaluate64 = lambda: original_float64(model, inputs, eps)
    folds, reasons = plan_folds(graph, work, keep_structure, eps)
    applied = apply_folds(folds, graph, work, eps, keep_structure, options.allow_overflow)
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
    result = FoldResult(model=modes_as_given(model, applied.model.eval()), folded=[(f.layer_name, f.bn.name) for f in folds],
                        skipped=skipped, into={f.bn.name: f.into for f in folds}, gained_bias=applied.gained,
                        tracer=graph.tracer, form=applied.form, eps=eps, warnings=applied.warnings)
    return result, reference


def fold_model(model: nn.Module, example_inputs: Any = None, *, eps: float | None = None,
               keep_structure: bool = False, allow_overflow: bool = False,
               reparameterize: bool = False, options: FoldOptions | None = None) -> FoldResult:
    """Fold every BatchNorm of `model` that can be folded exactly; the input model is left unchanged.

    example_inputs (a tensor or a tuple) give shapes to the rules that need them (BatchNorm1d
    next to Linear or Conv1d) and let torch.export trace models fx cannot. `eps` replaces every
    BatchNorm module's eps in the fold (a state_dict does not store eps); the returned model
    then uses it too. With keep_structure=True every module is kept (see bnstrip.fold.rewrite).

    With example inputs the folded model is also compared with the original (bnstrip.core.compare,
    reported in `result.check`): should the outputs move (something no rule foresaw), the folds
    that moved them are found by bisection and undone, each skipped with the reason, so a wrong
    model is never returned for these inputs. "Moved" means more than rounding the folded
    parameters once can move them (bnstrip.fold.check), so an exact fold is never undone for
    rounding. When BatchNorms exist and none folds, `result.warnings` says so.

    With reparameterize=True, sums of parallel branches (RepVGG, MobileOne, ACNet blocks) are then
    merged into one conv each and proven the same way (bnstrip.fold.reparam); it needs
    example_inputs and cannot keep the structure.

    `options` (a FoldOptions) gives all of these settings as one value instead of the keywords.
    """
    given = FoldOptions(eps, keep_structure, allow_overflow, reparameterize)
    if options is not None and given != FoldOptions():
        raise InputError("pass the fold settings either as options=FoldOptions(...) or as keywords, not both")
    options = options if options is not None else given
    options.check(example_inputs is not None)
    _refuse_unfoldable_model(model)
    inputs = as_inputs(example_inputs)
    traced: dict[str, OpGraph | None] = {}
    result, reference = _fold_copy(model, inputs, options, {}, want_reference=True, traced=traced)
    if reference is None or inputs is None:
        result.warnings = with_none_folded_warning(result.warnings, result.folded, result.skipped)
        return result
    plan, consumers = list(result.folded), {bn for bn, into in result.into.items() if into != INTO_PRODUCER}
    reference.measure = lambda: measure_sensitivity(model, inputs, options.eps, reference, plan, consumers)
    result = _checked(model, inputs, result, reference, options, traced)
    if options.reparameterize:
        from bnstrip.fold.reparam import reparameterize_result  # it imports this module

        with warnings.catch_warnings():  # copying a merged export graph: torch's own pytree deprecation
            warnings.simplefilter("ignore", FutureWarning)
            reparameterize_result(result, inputs, options.allow_overflow,
                                  lambda candidate: check_candidate(reference, candidate, inputs))
            if result.merged:  # a BatchNorm right after a merged sum now follows one conv (RepViT)
                _fold_after_merge(result, inputs, reference, options)
    _restore_statistics(model, result)
    result.warnings = with_none_folded_warning(result.warnings, result.folded, result.skipped)
    return result


def _fold_after_merge(result: FoldResult, inputs: tuple[Any, ...], reference: Reference, options: FoldOptions) -> None:
    """Fold again on the merged model, checked against the original like the first pass; record it in `result`."""
    if not result.skipped:  # every BatchNorm already folded: nothing to trace again
        return
    merged = result.model
    once = dataclasses.replace(options, keep_structure=False, reparameterize=False)
    second, _ = _fold_copy(merged, inputs, once, {}, traced={})
    if not second.folded:
        return
    second = _checked(merged, inputs, second, reference, once, {})
    folded = {bn for _, bn in second.folded}
    if not folded or second.check is None or not second.check.passed:
        return
    result.model, result.check = second.model, second.check
    result.folded += second.folded
    result.into.update(second.into)
    result.gained_bias += second.gained_bias
    result.warnings += second.warnings
    result.skipped = [(bn, reason) for bn, reason in result.skipped if bn not in folded]


def _checked(model: nn.Module, inputs: tuple[Any, ...], result: FoldResult, reference: Reference,
             options: FoldOptions, traced: dict[str, OpGraph | None] | None = None) -> FoldResult:
    """`result` with its check against the original; folds that moved the outputs are found and undone.

    Every retry plans again on a copy of the first trace (`traced`) instead of tracing again.
    """
    report, problem = check_candidate(reference, result.model, inputs)
    if problem is None:
        result.check = report
        return result

    # Something moved the outputs: keep the folds that provably do not.
    undone = f"every rule allowed folding it, but then {problem}; the fold was undone (please report this model)"

    def passes(trial_excluded: dict[str, str]) -> bool:
        trial, _ = _fold_copy(model, inputs, options, trial_excluded, traced=traced)
        return check_candidate(reference, trial.model, inputs)[1] is None

    excluded = bisect_folds([bn for _, bn in result.folded], passes, undone)
    final, _ = _fold_copy(model, inputs, options, excluded, traced=traced)
    report, problem = check_candidate(reference, final.model, inputs)
    if problem is not None:  # interactions: undo everything
        final, _ = _fold_copy(model, inputs, options, {bn: undone for _, bn in result.folded}, traced=traced)
        report, _ = check_candidate(reference, final.model, inputs)
    final.check = report
    return final

"""The one check of a folded model against its original, and the bisection that undoes folds which fail it.

`Reference` holds the original's outputs on the example inputs (in its dtype and evaluated in
float64); `check_candidate` runs a folded model and applies the one rule (bnstrip.core.compare),
measuring the original's sensitivity to one rounding of the folded parameters
(bnstrip.core.perturb) only when the rule needs it; `check_folded` is the same check for a fold
made elsewhere; `bisect_folds` finds the folds to undo when a check fails.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from bnstrip.core.compare import (SelfCheck, compare_outputs, float64_outputs, fresh_inputs, implied_check, model_dtype,
                                  seeded_outputs)
from bnstrip.errors import InputError, first_line
from bnstrip.fold.bisect import bisect_folds  # noqa: F401 - re-exported: fold.model imports it from here
from bnstrip.trace.bn_registry import is_batchnorm_like


def as_inputs(example_inputs: Any) -> tuple[Any, ...] | None:
    """example_inputs as a tuple (a lone tensor is one input)."""
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


@contextlib.contextmanager
def eps_override(model: nn.Module, eps: float | None) -> Iterator[None]:
    """Every BatchNorm of `model` uses `eps` inside the block (the original as the user asked for it)."""
    # BatchNorm-likes (duck-typed too) keep eps as a plain float, which nn.Module.__setattr__'s Tensor | Module typing cannot take
    saved: list[tuple[Any, Any]] = [(m, m.eps) for m in model.modules() if is_batchnorm_like(m) and hasattr(m, "eps")] if eps is not None else []
    for module, _ in saved:
        module.eps = eps
    try:
        yield
    finally:
        for module, own in saved:
            module.eps = own


@dataclass
class Reference:
    """The original's outputs on the example inputs: in its own dtype and evaluated in float64 (None if impossible)."""

    outputs: Any
    outputs64: Any
    dtype: torch.dtype
    samples: int
    sensitivity: float | None = None
    """How far one ulp of the folded parameters moves outputs64 (bnstrip.core.perturb), once measured."""
    measure: Callable[[], float | None] | None = None
    """Measures `sensitivity`; called (once) only when a check fails without it: it costs two float64 runs."""
    evaluate64: Callable[[], Any] | None = None
    """Computes `outputs64` (then None): called (once) only when a check is not decided by the gap in the model's
    own dtype (core.compare.implied_check), since the float64 evaluation costs two to three forwards."""

    def float64(self) -> Any:
        """outputs64, evaluated now if it was left for later."""
        if self.evaluate64 is not None:
            evaluate, self.evaluate64 = self.evaluate64, None
            self.outputs64 = evaluate()
        return self.outputs64


def _compare(reference: Reference, got: Any) -> SelfCheck | None:
    """The one rule on `got`; the float64 evaluation and the sensitivity are computed the first time the rule needs them."""
    if reference.evaluate64 is not None:
        implied = implied_check(reference.outputs, got, reference.dtype, reference.samples)
        if implied is not None:
            return implied
    report = compare_outputs(reference.outputs, got, reference.float64(), reference.dtype, reference.samples,
                             reference.sensitivity)
    if report is not None and not report.passed and report.rounding is not None and reference.measure is not None:
        measure, reference.measure = reference.measure, None
        reference.sensitivity = measure()
        report = compare_outputs(reference.outputs, got, reference.outputs64, reference.dtype, reference.samples,
                                 reference.sensitivity)
    return report


def later_float64(work: nn.Module, inputs: Sequence[Any], eps: float | None) -> Any | None:
    """The float64 evaluation of `work` (a copy nothing else runs) with the eps the fold used."""
    with eps_override(work, eps):
        return float64_outputs(work, inputs)


def original_float64(model: nn.Module, inputs: Sequence[Any], eps: float | None) -> Any | None:
    """The float64 evaluation of the caller's `model`, which must stay untouched, with the eps the fold used.

    The copy keeps the parameters' memory (new Parameter objects over it, so rebinding `.data` or `.to()` in a
    forward reaches only the copy) and runs only the op-by-op widening, whose in-place ops write into widened
    copies: safe while no parameter is float64 already. Where that cannot be, a full copy runs every way.
    """
    if all(type(p) is nn.Parameter and p.dtype != torch.float64 for p in model.parameters()):
        shared = copy_model(model, share_parameters=True)
        with eps_override(shared, eps):
            outputs = float64_outputs(shared, inputs, writes_only_copies=True)
        if outputs is not None:
            return outputs
    return later_float64(copy_model(model), inputs, eps)


def measure_sensitivity(model: nn.Module, inputs: tuple[Any, ...], eps: float | None, reference: Reference,
                        folded: list[tuple[str, str]], consumers: set[str]) -> float | None:
    """rounding_sensitivity of a copy of `model` (its forward may cache or update state) to the folded parameters
    of the (layer, BatchNorm) pairs in `folded`; a float64 model runs as it is (no op-by-op widening)."""
    from bnstrip.core.perturb import rounding_sensitivity
    from bnstrip.trace.bn_registry import module_stats

    work = copy_model(model)
    with eps_override(work, eps):
        return rounding_sensitivity(work, inputs, folded, consumers, reference.float64(),
                                    lambda bn: module_stats(bn, eps),
                                    run=seeded_outputs if all_float64(work, inputs) else float64_outputs)


def all_float64(model: nn.Module, inputs: Sequence[Any]) -> bool:
    """Every floating-point tensor of the model and the inputs is float64: its own run is its float64 evaluation
    (one forward saved)."""
    tensors = [*model.parameters(), *model.buffers(), *(t for t in inputs if isinstance(t, torch.Tensor))]
    return all(t.dtype == torch.float64 for t in tensors if t.is_floating_point())


def samples_of(inputs: Sequence[Any]) -> int:
    first = inputs[0] if inputs else None
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 1


def check_folded(original: nn.Module, folded: nn.Module, example_inputs: Any, folded_pairs: Sequence[tuple[str, str]],
                 *, consumers: Sequence[str] = (), eps: float | None = None) -> SelfCheck | None:
    """fold_model's own check, on a fold made elsewhere: `folded` against `original` (neither is modified).

    `folded_pairs` are the (layer, BatchNorm) names in `original` that the fold claims to have folded
    (`consumers`: the BatchNorms folded into the layer after them); rounding their folded parameters
    once sets how far the outputs may move (bnstrip.core.compare). None when the
    folded model fails to run or its outputs have another structure.
    """
    inputs = as_inputs(example_inputs)
    if inputs is None:
        raise InputError("check_folded needs example_inputs to run both models on")
    work = copy_model(original)
    with eps_override(work, eps):
        outputs = seeded_outputs(work, inputs)
    reference = Reference(outputs, outputs if all_float64(work, inputs) else None, model_dtype(original),
                          samples_of(inputs))
    if reference.outputs64 is None:
        reference.evaluate64 = lambda: later_float64(work, inputs, eps)
    pairs, after = list(folded_pairs), set(consumers)
    reference.measure = lambda: measure_sensitivity(original, inputs, eps, reference, pairs, after)
    return check_candidate(reference, folded, inputs)[0]


def check_candidate(reference: Reference, candidate: nn.Module, inputs: Sequence[Any]) -> tuple[SelfCheck | None, str | None]:
    """The one comparator on `candidate`: (report, None) when it passes, else (report or None, why not)."""
    try:  # not seeded: a forward whose output depends on the random generator cannot be proven equal, so it fails
        with torch.no_grad():
            got = candidate(*fresh_inputs(inputs))
    except Exception as exc:  # noqa: BLE001 - the folded model must run where the original did
        return None, f"the folded model fails on the example inputs ({type(exc).__name__}: {first_line(exc, 200, '')})"
    try:
        report = _compare(reference, got)
    except Exception as exc:  # noqa: BLE001 - outputs torch cannot compare (fake or meta tensors a forward kept)
        raise InputError(f"{type(candidate).__name__}: its outputs cannot be compared with the original's "
                         f"({type(exc).__name__}: {first_line(exc, 160, '')}); does its forward keep tensors from an "
                         "earlier run? Run the model once on the example inputs before folding it") from None
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


def copy_model(model: nn.Module, share_parameters: bool = False) -> nn.Module:
    """A copy of `model` in eval mode (its training-mode BatchNorms as given) that runs without touching it.

    share_parameters=True gives the copy new Parameter objects over the same memory (everything else is copied):
    for a run that only reads them, where copying a large model's weights would cost more than the run (the
    float64 evaluation, original_float64).
    """
    memo: dict[int, Any] = {id(p): nn.Parameter(p.detach(), requires_grad=p.requires_grad)
                            for p in model.parameters()} if share_parameters else {}
    try:
        work = copy.deepcopy(model, memo).eval()
    except Exception as exc:
        weight_norm = any(isinstance(getattr(m, "weight_g", None), nn.Parameter) for m in model.modules())
        hint = ("; a torch.nn.utils.weight_norm module cannot be copied: use torch.nn.utils.parametrizations."
                "weight_norm" if weight_norm else "; a tensor held by the model is computed from another (a view or "
                "an alias, not a leaf)") if "deepcopy protocol" in str(exc) else ""
        raise InputError(f"{type(model).__name__}: cannot copy the model ({type(exc).__name__}: "
                         f"{first_line(exc, 200, '').split('. ')[0][:160]})"
                         f"{hint}; the input model must stay untouched, so fold a copyable model") from None
    return modes_as_given(model, work.eval())


def modes_as_given(model: nn.Module, work: nn.Module) -> nn.Module:
    """`work` (in eval mode) with the BatchNorms that `model` left in training mode back in it, alone."""
    for name in training_batchnorms(model):
        try:
            work.get_submodule(name).training = True
        except AttributeError:
            continue
    return work



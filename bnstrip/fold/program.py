"""Fold the BatchNorms of an exported program (torch.export) and export the result again, with proof.

One set of rules for modules and programs: the program's aten graph is turned back into module
calls under the original names (bnstrip.trace.modularize), `fold_model` folds that GraphModule
exactly as it folds any module, and the folded module is exported again with the program's own
calling convention and dynamic dims (a dim that was a symbol stays one, with its range). The
folded program is then run against the original on the program's example inputs and refused
when its outputs moved (the one comparator, bnstrip.core.compare).
"""
from __future__ import annotations

import copy
import inspect
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch import nn

from bnstrip._torch import pytree
from bnstrip.core.compare import SelfCheck, compare_models, seeded_inputs, seeded_outputs
from bnstrip.errors import CheckFailed, InputError, first_line
from bnstrip.fold.model import FoldResult, fold_model, with_none_folded_warning
from bnstrip.trace.export_tracer import plain_graph_module
from bnstrip.trace.modularize import modularize

@dataclass
class ProgramFoldResult(FoldResult):
    """FoldResult of a program: `program` is the folded ExportedProgram, `model` its module()."""

    program: Any = None
    self_check: SelfCheck | None = None
    dynamic_dims: list[str] = field(default_factory=list)
    seconds: float = 0.0


class _Flat(nn.Module):
    """Calls a program's module with its flat input leaves, so the comparator can widen them to float64."""

    def __init__(self, module: nn.Module, in_spec: Any) -> None:
        super().__init__()
        self.inner = module
        self.in_spec = in_spec

    def forward(self, *leaves: Any) -> Any:
        args, kwargs = pytree.tree_unflatten(list(leaves), self.in_spec)
        return self.inner(*args, **kwargs)


def _user_inputs(ep: Any) -> list[fx.Node]:
    names = set(ep.graph_signature.user_inputs)
    return [n for n in ep.graph.nodes if n.op == "placeholder" and n.name in names]


def _size(dim: Any, ep: Any) -> int:
    """A concrete size for a dim of the program's input: the dim itself, its hint, or a value in its range."""
    if isinstance(dim, int):
        return dim
    hint = getattr(dim.node, "hint", None)
    if hint is not None:
        return int(hint)
    rng = ep.range_constraints.get(dim.node.expr)
    low = int(rng.lower) if rng is not None and rng.lower.is_finite else 2
    return max(low, 2) if rng is None or not rng.upper.is_finite else min(max(low, 2), int(rng.upper))


MAX_SEEDED_ELEMENTS = 1 << 26
"""Seeded inputs are made from the program's own input specs (a file's claim): at most this many elements in all
(256 MiB of float32), so a program claiming a 2**40-element input is refused instead of allocated."""


def program_inputs(ep: Any, seed: int = 0, name: str = "program") -> tuple[tuple[Any, ...], dict[str, Any]]:
    """(args, kwargs) to run the program on: its saved example inputs, else seeded ones of its input specs."""
    saved = getattr(ep, "example_inputs", None)
    if saved is not None:
        return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, saved)
    leaves, total = [], 0
    for index, node in enumerate(_user_inputs(ep)):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            leaves.append(val)
            continue
        shape = [_size(d, ep) for d in val.shape]
        total += math.prod(shape)
        if total > MAX_SEEDED_ELEMENTS:
            raise InputError(f"{name}: the program has no saved example inputs and its inputs claim {total:,} elements (over "
                             f"bnstrip's {MAX_SEEDED_ELEMENTS:,}); save the program with example inputs")
        if val.dtype.is_floating_point:
            leaves.append(seeded_inputs(shape, seed + index, torch.float64).to(val.dtype))
        else:
            leaves.append(torch.zeros(shape, dtype=val.dtype, device=val.device))
    return pytree.tree_unflatten(leaves, ep.call_spec.in_spec)


def _dynamic_shapes(ep: Any, module: nn.Module, args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[Any, list[str]]:
    """The program's dynamic dims as torch.export specs (named Dims with the original ranges), and their names."""
    from torch.export import Dim

    dims: dict[str, Any] = {}
    specs = []
    for node in _user_inputs(ep):
        val = node.meta.get("val")
        spec = {}
        for axis, size in enumerate(getattr(val, "shape", ()) if isinstance(val, torch.Tensor) else ()):
            if isinstance(size, int):
                continue
            expr = size.node.expr
            if not expr.is_Symbol:
                spec[axis] = Dim.AUTO
                continue
            name = str(expr)
            if name not in dims:
                rng = ep.range_constraints.get(expr)
                low = int(rng.lower) if rng is not None and rng.lower.is_finite else None
                high = int(rng.upper) if rng is not None and rng.upper.is_finite else None
                dims[name] = Dim(name, min=low if low is not None else 0, max=high)
            spec[axis] = dims[name]
        specs.append(spec or None)
    if not dims and not any(specs):
        return None, []
    arg_specs, kwarg_specs = pytree.tree_unflatten(specs, ep.call_spec.in_spec)
    if not kwarg_specs:
        return tuple(arg_specs), sorted(dims)
    return dict(inspect.signature(module.forward).bind(*arg_specs, **kwarg_specs).arguments), sorted(dims)


def _export(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], dynamic: Any) -> Any:
    from bnstrip.core.torch_env import quiet_torch_logs as _quiet_torch_logs

    with _quiet_torch_logs(), torch.no_grad():
        return torch.export.export(module, args, kwargs, dynamic_shapes=dynamic, strict=False)


def _float64_outputs(original: nn.Module, in_spec: Any, leaves: list[Any]) -> Any:
    """The original program run in float64 (a float64 copy of its module); None when it will not run that way."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecation, in copying its spec
            wide = _Flat(copy.deepcopy(original).to(torch.float64), in_spec)
        return seeded_outputs(wide, [t.to(torch.float64) if isinstance(t, torch.Tensor) and t.is_floating_point()
                                     else t for t in leaves])
    except Exception:  # noqa: BLE001 - hard-coded dtypes in the graph: the comparator decides in the own dtype
        return None


def _check(original: nn.Module, folded: Any, in_spec: Any, leaves: list[Any], name: str,
           sensitivity: float | None = None) -> SelfCheck:
    """The one comparator on the re-exported program; `sensitivity` is fold_model's measure for the same folds."""
    reference = _Flat(original, in_spec)
    check = compare_models(reference, _Flat(folded.module(), in_spec), leaves, sensitivity=sensitivity,
                           evaluate64=lambda: _float64_outputs(original, in_spec, leaves))
    if check is None:
        raise CheckFailed(f"{name}: the folded program's outputs have another structure or shape than the "
                          "original's; not writing it")
    if not check.passed:
        raise CheckFailed(f"{name}: {check.describe()}; not writing the folded program")
    return check


def fold_program(ep: Any, example_inputs: Any = None, *, eps: float | None = None, allow_overflow: bool = False,
                 name: str = "program") -> ProgramFoldResult:
    """Fold every exactly-foldable BatchNorm of the ExportedProgram `ep` (left unchanged); see the module docstring.

    example_inputs (args tuple, or (args, kwargs)) default to the program's saved example inputs,
    else to seeded inputs of the shapes and dtypes of its input specs (dynamic dims at their hint).
    Raises CheckFailed when the folded program's outputs moved.
    """
    started = time.perf_counter()
    if not isinstance(ep, torch.export.ExportedProgram):
        raise InputError(f"{name}: not an ExportedProgram ({type(ep).__name__}); pass what torch.export.export "
                         "or torch.export.load returned")
    if example_inputs is None:
        args, kwargs = program_inputs(ep, name=name)
    elif isinstance(example_inputs, tuple) and len(example_inputs) == 2 and isinstance(example_inputs[1], dict):
        args, kwargs = tuple(example_inputs[0]), dict(example_inputs[1])
    else:
        args, kwargs = (tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)), {}
    leaves, in_spec = pytree.tree_flatten((tuple(args), kwargs))
    if in_spec != ep.call_spec.in_spec:
        raise InputError(f"{name}: example_inputs do not match the program's inputs ({len(leaves)} leaves given); "
                         "pass them as the program was exported with")
    original = ep.module()
    gm, codegen = plain_graph_module(original)
    rewritten = modularize(gm)
    for node in rewritten.gm.graph.nodes:
        node.meta.pop("val", None)  # fake tensors of the old program: fold_model measures ranks on a real run
    try:
        result = fold_model(rewritten.gm, tuple(leaves), eps=eps, allow_overflow=allow_overflow)
    except InputError as exc:
        raise InputError(f"{name}: {first_line(exc)}") from None
    seen = {bn for _, bn in result.folded} | {bn for bn, _ in result.skipped}
    skipped = result.skipped + [(bn, why) for bn, why in rewritten.unfoldable if bn not in seen]
    folded_module = result.model
    assert isinstance(folded_module, fx.GraphModule)  # a GraphModule folds into a (copied) GraphModule
    folded_module.graph.set_codegen(copy.copy(codegen))
    folded_module.recompile()
    dynamic, dim_names = _dynamic_shapes(ep, folded_module, args, kwargs)
    try:
        program = _export(folded_module, tuple(args), kwargs, dynamic)
    except Exception as exc:  # noqa: BLE001 - torch.export raises many types; the user gets one line
        raise CheckFailed(f"{name}: the folded module does not export again ({type(exc).__name__}: "
                          f"{first_line(exc, 200, '')}); not writing it (please report this program)") from None
    check = _check(original, program, in_spec, leaves, name, result.check.sensitivity if result.check else None)
    return ProgramFoldResult(
        model=program.module(), folded=result.folded, skipped=skipped, into=result.into,
        gained_bias=result.gained_bias, tracer="torch.export program", form="program", eps=eps,
        warnings=with_none_folded_warning(result.warnings, result.folded, skipped), program=program,
        self_check=check, dynamic_dims=dim_names,
        seconds=time.perf_counter() - started)


def export_folded(original: nn.Module, folded: nn.Module, example_inputs: Sequence[Any],
                  name: str = "model", dynamic: Any = None,
                  sensitivity: float | None = None) -> tuple[Any, SelfCheck]:
    """Export a module folded by fold_model as a program, checked against the original module on the inputs.

    For `bnstrip fuse --arch ... OUT.pt2`: the user ships a folded program without the model's code.
    `dynamic` is torch.export's dynamic_shapes (e.g. a dynamic batch dimension).
    """
    args = tuple(example_inputs)
    try:
        program = _export(folded, args, {}, dynamic)
    except Exception as exc:  # noqa: BLE001 - torch.export raises many types; the user gets one line
        raise InputError(f"{name}: the folded model does not export with torch.export ({type(exc).__name__}: "
                         f"{first_line(exc, 200, '')}); write a .pt or .safetensors checkpoint instead") from None
    leaves, in_spec = pytree.tree_flatten((args, {}))
    check = compare_models(_Flat(original, in_spec), _Flat(program.module(), in_spec), leaves, sensitivity=sensitivity)
    if check is None or not check.passed:
        what = "outputs have another structure" if check is None else check.describe()
        raise CheckFailed(f"{name}: the exported folded program's {what}; not writing it")
    return program, check


def compare_programs(reference: Any, candidate: Any, example_inputs: Any = None, name: str = "program") -> SelfCheck:
    """`bnstrip verify A.pt2 B.pt2`: both programs on the reference's example inputs (or the given ones).

    The same comparator and rule as fold_program's own check; CheckFailed when the outputs differ in structure.
    """
    if example_inputs is None:
        args, kwargs = program_inputs(reference, name=name)
    elif isinstance(example_inputs, tuple) and len(example_inputs) == 2 and isinstance(example_inputs[1], dict):
        args, kwargs = tuple(example_inputs[0]), dict(example_inputs[1])
    else:
        args, kwargs = tuple(example_inputs), {}
    leaves, in_spec = pytree.tree_flatten((args, kwargs))
    original = reference.module()
    try:
        check = compare_models(_Flat(original, in_spec), _Flat(candidate.module(), in_spec), leaves,
                               evaluate64=lambda: _float64_outputs(original, in_spec, leaves))
    except Exception as exc:  # noqa: BLE001 - a program that rejects the inputs (guards, shapes)
        raise InputError(f"{name}: the programs do not run on these inputs ({type(exc).__name__}: "
                         f"{first_line(exc, 200, '')}); pass inputs the programs accept") from None
    if check is None:
        raise CheckFailed(f"{name}: the two programs' outputs have another structure or shape")
    return check

"""Merge sums of parallel linear branches into one conv (structural reparameterisation), and prove it.

RepVGG, MobileOne, ACNet and their kin train blocks whose branches read the same input and are
summed: a kxk conv, a 1x1 conv, asymmetric 1x3/3x1 convs, a BatchNorm alone, the identity, a
scaled branch. At inference each branch is an affine map of x, so their sum is one conv:

* a smaller kernel is zero-padded, centred, to the largest one; exact when its padding is the
  larger one's minus the offset times the dilation (1x1 with padding 0 in 3x3 with padding 1);
* a BatchNorm alone or the identity is an identity kernel per group, scaled by the BN;
* a BatchNorm or a scalar after a conv scales its output channels (the BN fold, done on the fly).

Kernels and biases are summed in float64 and rounded once. Branches that differ in stride,
dilation, groups, padding mode or padding alignment are refused with the reason. Matching the
sums lives in reparam_match.py, the fit and the kernel maths in reparam_kernel.py; this module
plans, rewrites the graph and proves. The merged model (an fx GraphModule, form "graph") is then compared with the
input model by the one comparator (bnstrip.core.compare) on the example inputs; merges that moved
the outputs are found by bisection and undone, each reported.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, cast

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from bnstrip._torch import ConvNd
from bnstrip.core.compare import SelfCheck, compare_models, float64_outputs, fresh_inputs, seeded_outputs
from bnstrip.errors import InputError, first_line
from bnstrip.fold.bisect import bisect_folds
from bnstrip.fold.reparam_kernel import Geometry, fit_one_conv, merged_conv, shape_problem
from bnstrip.fold.reparam_match import Branch, Sum, find_sums
from bnstrip.trace.reads import metadata_read
from bnstrip.trace.fx_tracer import fx_trace



@dataclass(frozen=True)
class Merge:
    """One sum of branches replaced by one conv: the branches as described, the BNs removed, the conv's kernel."""

    conv: str
    branches: tuple[str, ...]
    bns: tuple[str, ...]
    kernel_size: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"conv": self.conv, "branches": list(self.branches), "bns": list(self.bns),
                "kernel_size": list(self.kernel_size)}


@dataclass
class MergeResult:
    """The merged model (the input model itself when nothing merged), the merges, and each refusal (where, why)."""

    model: nn.Module
    merged: list[Merge] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    check: SelfCheck | None = None


@dataclass
class _Group:
    """Branches of one sum with the same input, to become the conv at `target`."""

    base: fx.Node
    branches: list[Branch]
    geometry: Geometry
    target: str
    merge: Merge


def _plan_sum(found: Sum) -> tuple[list[_Group], list[str]]:
    """The groups of one sum that become one conv each, and the reasons for what does not merge."""
    reasons = list(found.refused)
    groups: list[_Group] = []
    bases: list[fx.Node] = []
    for branch in found.branches:
        if branch.conv is not None and branch.base is not None and branch.base not in bases:
            bases.append(branch.base)
    for base in bases:
        members = [b for b in found.branches if b.base is base]
        if len(members) > 1:  # a lone branch was never going to merge: its problem is no news
            reasons += [b.problem for b in members if b.problem]
        valid = [b for b in members if b.problem is None]
        if len(valid) < 2 or not any(b.conv is not None for b in valid):
            continue
        geometry = fit_one_conv(valid)
        if isinstance(geometry, Geometry):
            problem = shape_problem(valid, geometry.rank)
            if problem is None:
                convs = [b.conv for b in valid if b.conv is not None]
                # named after the first conv with the full kernel (the "dense" branch), else the first conv (conv steps hold a ConvNd)
                target = next((c.name for c in convs if tuple(cast(ConvNd, c.module).kernel_size) == geometry.kernel), convs[0].name)
                bns = tuple(s.name for b in valid for s in b.steps if s.kind == "bn")
                merge = Merge(conv=target, branches=tuple(b.describe() for b in valid), bns=bns,
                              kernel_size=geometry.kernel)
                groups.append(_Group(base=base, branches=valid, geometry=geometry, target=target, merge=merge))
                continue
            geometry = problem
        reasons.append(geometry)
    return groups, reasons


# --------------------------------------------------------------------------- the rewrite


def _redirect_metadata(group: _Group, conv: fx.Node, base: fx.Node) -> None:
    """x.ndim / x.shape reads of erased branch nodes read the merged conv (or, before a branch's conv, its input)."""
    for branch in group.branches:
        kinds = [s.kind for s in branch.steps]
        first_conv = kinds.index("conv") if "conv" in kinds else 0
        for index, step in enumerate(branch.steps):
            for user in [u for u in step.node.users if metadata_read(u)]:
                user.replace_input_with(step.node, conv if index >= first_conv else base)


def _drop_unused_modules(gm: fx.GraphModule, paths: set[str]) -> None:
    """Delete the merged branches' modules (and their parents' leftovers) that no node calls or reads any more."""
    for node in [n for n in gm.graph.nodes if n.op == "get_attr" and not n.users]:  # reads left by the tracer
        if any(str(node.target).startswith(path + ".") for path in paths):
            gm.graph.erase_node(node)
    used = [str(n.target) for n in gm.graph.nodes if n.op in ("call_module", "get_attr")]
    for path in sorted(paths):
        if not any(t == path or t.startswith(path + ".") for t in used):
            try:
                gm.delete_submodule(path)
            except AttributeError:
                pass


def _drop_dead_reads(gm: fx.GraphModule) -> None:
    """Erase attribute reads nothing uses (the tracer may leave them for a BatchNorm's buffers), and the modules
    only they kept: a merged model and a skeleton rebuilt from a stripped graph then hold the same modules."""
    dead = [n for n in gm.graph.nodes if n.op == "get_attr" and not n.users]
    owners = {str(n.target).rpartition(".")[0] for n in dead} - {""}
    for node in dead:
        gm.graph.erase_node(node)
    _drop_unused_modules(gm, owners)


def _rewrite(gm: fx.GraphModule, found: Sum, groups: list[_Group], replaced: dict[fx.Node, fx.Node],
             order: dict[fx.Node, int], structural: bool, allow_overflow: bool) -> None:
    """Replace the sum by the merged convs plus the terms that stay; erase the merged branches' nodes.

    Each merged conv is called where its first branch started, so reads of the branches' shapes
    that come before the sum (timm asserts x.ndim) can read it instead.
    """
    graph = gm.graph
    merged = {id(b) for group in groups for b in group.branches}
    steps = [s for group in groups for b in group.branches for s in b.steps]
    convs: list[fx.Node] = []
    for group in groups:
        gm.set_submodule(group.target, merged_conv(group.branches, group.geometry, group.target, structural,
                                                  allow_overflow))
        base = replaced.get(group.base, group.base)
        first = min((s.node for b in group.branches for s in b.steps), key=order.__getitem__)
        with graph.inserting_before(first):
            convs.append(graph.call_module(group.target, (base,)))
        _redirect_metadata(group, convs[-1], base)
    acc: Any = convs[0]
    with graph.inserting_before(found.top):
        for node in convs[1:]:
            acc = graph.call_function(operator.add, (acc, node))
        for branch in found.branches:
            if id(branch) not in merged:
                term = replaced.get(branch.term, branch.term)
                acc = graph.call_function(operator.add if branch.coeff > 0 else operator.sub, (acc, term))
    found.top.replace_all_uses_with(acc)
    replaced[found.top] = acc
    dead = set(found.nodes) | {s.node for s in steps} | {a for s in steps for a in s.attrs}
    for node in sorted(dead, key=order.__getitem__, reverse=True):
        graph.erase_node(node)
    targets = {group.target for group in groups}
    _drop_unused_modules(gm, {s.name for s in steps if s.node.op == "call_module" or s.attrs} - targets
                         | {str(n.target) for n in found.nodes if n.op == "call_module"})


def _attempt(model: nn.Module, inputs: Sequence[Any] | None, keep: Callable[[Merge], bool], structural: bool,
             allow_overflow: bool) -> MergeResult:
    """Trace `model`, plan every merge, apply those `keep` accepts; the model is not modified."""
    gm, _, error = fx_trace(model)
    codegen, export_error = None, ""
    if gm is None and inputs is not None:  # fx cannot trace it: the same matching on torch.export's graph
        gm, codegen, export_error = exported_graph(model, inputs)
    if gm is None:
        assert error is not None  # fx_trace gives its error whenever it gives no graph
        why = f"torch.fx cannot trace it ({first_line(error, 200)})"
        why += f" and torch.export cannot either ({export_error})" if inputs is not None else \
            "; without example inputs torch.export cannot run"
        return MergeResult(model, refused=[(type(model).__name__, why)])
    if inputs is not None:
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(*fresh_inputs(inputs))
        except Exception:  # noqa: BLE001 - shapes are a courtesy check; the proof still runs the model
            pass
    _drop_dead_reads(gm)
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    result = MergeResult(gm)
    replaced: dict[fx.Node, fx.Node] = {}
    for found in find_sums(gm):
        groups, reasons = _plan_sum(found)
        result.refused += [(found.where(), reason) for reason in reasons]
        groups = [g for g in groups if keep(g.merge)]
        if groups:
            _rewrite(gm, found, groups, replaced, order, structural, allow_overflow)
            result.merged += [g.merge for g in groups]
    if not result.merged:
        result.model = model
        return result
    if codegen is not None:  # the program's own input/output structure (pytree), as fold_program keeps it
        gm.graph.set_codegen(copy.copy(codegen))
    gm.graph.lint()
    gm.recompile()
    gm.eval()
    return result


def exported_graph(model: nn.Module, inputs: Sequence[Any]) -> tuple[fx.GraphModule | None, Any, str]:
    """(module calls over torch.export's aten graph of `model`, its input/output codegen, '') or (None, None, why)."""
    from bnstrip.core.torch_env import quiet_torch_logs as _quiet_torch_logs
    from bnstrip.trace.export_tracer import plain_graph_module
    from bnstrip.trace.modularize import modularize

    try:
        with _quiet_torch_logs(), torch.no_grad():
            program = torch.export.export(model, tuple(fresh_inputs(inputs)), strict=False)
    except Exception as exc:  # noqa: BLE001 - torch.export raises many types; the reason is one line
        return None, None, f"{type(exc).__name__}: {first_line(exc, 200, '')}"
    gm, codegen = plain_graph_module(program.module())
    return modularize(gm).gm, codegen, ""


# --------------------------------------------------------------------------- the public calls


def merge_branches(model: nn.Module, example_inputs: Any, *, allow_overflow: bool = False) -> MergeResult:
    """Merge every sum of parallel linear branches of `model` into one conv, proven on `example_inputs`.

    Run after BatchNorm folding (fold_model(..., reparameterize=True) does). `model` is not modified;
    the merged GraphModule shares the modules it did not merge with it. Merges that move the outputs
    beyond the comparator's float64 rule are undone and reported in `refused`.
    """
    if example_inputs is None:
        raise InputError(f"{type(model).__name__}: merging branches needs example_inputs to prove the merged model")
    if model.training:
        raise InputError(f"{type(model).__name__} is in training mode; call model.eval() before merging branches")
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    result = _attempt(model, inputs, lambda m: True, False, allow_overflow)
    if not result.merged:
        return result
    expected = seeded_outputs(model, inputs)
    expected64: list[Any] = []  # evaluated once, by the first check the gap alone does not decide

    def float64_once() -> Any:
        if not expected64:
            expected64.append(float64_outputs(model, inputs))
        return expected64[0]

    def check(candidate: nn.Module) -> tuple[SelfCheck | None, str | None]:
        try:
            report = compare_models(model, candidate, inputs, original_outputs=expected, evaluate64=float64_once)
        except Exception as exc:  # noqa: BLE001 - the merged model must run where the original did
            return None, f"the merged model fails on the example inputs ({type(exc).__name__}: {first_line(exc, 200, '')})"
        if report is None:
            return None, "the merged model's outputs have another structure or shape"
        return report, None if report.passed else report.describe()

    result.check, problem = check(result.model)
    if problem is None:
        return result
    undone = f"the merge moved the outputs ({problem}); it was undone"

    def passes(dropped: dict[str, str]) -> bool:
        trial = _attempt(model, inputs, lambda m: m.conv not in dropped, False, allow_overflow)
        return not trial.merged or check(trial.model)[1] is None

    dropped = bisect_folds([m.conv for m in result.merged], passes, undone)
    final = _attempt(model, inputs, lambda m: m.conv not in dropped, False, allow_overflow)
    final.check, problem = check(final.model) if final.merged else (None, None)
    if final.merged and problem is not None:  # interactions: undo everything
        dropped = {m.conv: undone for m in result.merged}
        final = _attempt(model, inputs, lambda m: False, False, allow_overflow)
    final.refused += [(m.conv, f"{' + '.join(m.branches)}: {dropped[m.conv]}") for m in result.merged
                      if m.conv in dropped]
    return final


def reparameterize_result(result: Any, inputs: Sequence[Any], allow_overflow: bool,
                          check: Callable[[nn.Module], tuple[SelfCheck | None, str | None]]) -> None:
    """Merge the branches of a FoldResult's model and record it there (model, form, merged, merge_refused,
    skipped, check); `check` compares a model with the original. Nothing changes when nothing merges or
    when the merged model misses the original (each merge is then refused with the reason)."""
    merged = merge_branches(result.model, inputs, allow_overflow=allow_overflow)
    result.merge_refused = list(merged.refused)
    if not merged.merged:
        return
    report, problem = check(merged.model)
    if problem is not None:
        result.merge_refused += [(m.conv, f"{' + '.join(m.branches)}: against the original, {problem}; not merged")
                                 for m in merged.merged]
        return
    # the fold may list an F.batch_norm BN under its call's name as well as its module's
    gone = {alias for m in merged.merged for bn in m.bns for alias in (bn, f"F.batch_norm@{bn}.running_mean")}
    result.model, result.form, result.merged, result.check = merged.model, "graph", list(merged.merged), report
    result.skipped = [(bn, reason) for bn, reason in result.skipped if bn not in gone]


def rebuild_merges(model: nn.Module, entries: Sequence[dict[str, Any]], source: str = "manifest") -> nn.Module:
    """Re-apply recorded merges structurally (zero kernels) so a merged state_dict loads strictly into the result."""
    if not entries:
        return model
    wanted = {str(entry.get("conv")): entry for entry in entries}
    if fx_trace(model)[0] is None:
        raise InputError(f"{source}: {type(model).__name__} cannot be traced by torch.fx, so its branches were merged "
                         "on torch.export's graph, which needs example inputs; fold it again with fold_model(..., "
                         "reparameterize=True) and example inputs instead of rebuilding it")
    result = _attempt(model, None, lambda m: m.conv in wanted, True, False)
    found = {m.conv: m for m in result.merged}
    for name, entry in wanted.items():
        merge = found.get(name)
        if merge is None or list(merge.branches) != list(entry.get("branches", [])):
            raise InputError(f"{source}: merged conv {name!r} is not a sum of the same branches in "
                             f"{type(model).__name__}'s graph; pass the model the checkpoint was folded from")
    return result.model

"""fold_onnx: fold every BatchNormalization of an ONNX model that folds exactly, prove it, say why for the rest.

The model is read within bounds (onnxfold.load), each BatchNormalization is decided by the
rules table (onnxfold.rules) and applied in float64 (onnxfold.edit), values are rounded once,
and the result is checked against a float64 evaluation of the original (onnxfold.check). When
the check fails, folds are tried one by one and those that move the outputs are undone (with
the reason). The result passes onnx.checker.check_model(full_check=True) whenever the input does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bnstrip.refusals import refusal
from bnstrip.core.compare import SelfCheck
from bnstrip.errors import CheckFailed, first_line, printable
from bnstrip.onnxfold.graph import (
    STANDARD_DOMAINS,
    Scope,
    Workspace,
    inferred_shapes,
    names_read,
    scopes,
)
from bnstrip.onnxfold.rules import INTO_PRODUCER, decide

KNOWN_DOMAINS = STANDARD_DOMAINS + ("ai.onnx.ml",)


@dataclass
class OnnxFoldResult:
    """The folded ModelProto and the account of every BatchNormalization: folded (into what) or skipped (why)."""

    model: Any
    folded: list[tuple[str, str]]
    skipped: list[tuple[str, str]]
    into: dict[str, str] = field(default_factory=dict)
    gained_bias: list[str] = field(default_factory=list)
    tracer: str = "onnx"
    form: str = "onnx"
    eps: float | None = None
    warnings: list[str] = field(default_factory=list)
    check: SelfCheck | None = None
    merged: list[Any] = field(default_factory=list)
    merge_refused: list[tuple[str, str]] = field(default_factory=list)
    external: bool = False
    """The input kept tensors in external data (the writer keeps them so)."""
    source_sha256: str = ""

    def manifest_entries(self) -> dict[str, Any]:
        """The same keys as FoldResult.manifest_entries."""
        return {
            "form": self.form, "tracer": self.tracer, "eps": self.eps,
            "folded": [{"layer": layer, "bn": bn, "into": self.into.get(bn, INTO_PRODUCER)} for layer, bn in self.folded],
            "skipped": [{"bn": bn, **refusal(reason).to_dict()} for bn, reason in self.skipped],
            "gained_bias": list(self.gained_bias), "merged": [],
        }


def is_batchnorm(node: Any) -> bool:
    return node.op_type == "BatchNormalization" and node.domain in STANDARD_DOMAINS


def _labels(all_scopes: list[Scope]) -> list[tuple[Scope, Any, str]]:
    """(scope, node, label) for every BatchNormalization, labels unique and stable across copies of the model."""
    found: list[tuple[Scope, Any, str]] = []
    seen: set[str] = set()
    for scope in all_scopes:
        for node in scope.nodes:
            if is_batchnorm(node):
                label = scope.where + (node.name or node.output[0])
                if label in seen:
                    label = f"{label}#{len(seen)}"
                seen.add(label)
                found.append((scope, node, label))
    return found


def custom_domain_issue(model: Any) -> str | None:
    """Nodes bnstrip cannot evaluate (custom domains) make every fold unprovable."""
    from bnstrip.onnxfold.load import iter_graphs

    for graph in iter_graphs(model.graph):
        for node in graph.node:
            if node.domain not in KNOWN_DOMAINS:
                return (f"the graph has a node of custom domain '{printable(node.domain)}' ({printable(node.op_type)}), "
                        "which bnstrip cannot evaluate to prove a fold")
    return None


def _unused(model: Any) -> set[tuple[int, str]]:
    """(graph index, name) of initializers and value_info entries nothing reads or produces."""
    from bnstrip.onnxfold.load import iter_graphs

    unused = set()
    for index, graph in enumerate(iter_graphs(model.graph)):
        live = set(names_read(graph)) | {v.name for v in graph.input}
        live |= {name for node in graph.node for name in node.output}
        unused |= {(index, t.name) for t in graph.initializer if t.name not in live}
        unused |= {(index, v.name) for v in graph.value_info if v.name not in live}
    return unused


def _prune(model: Any, keep: set[tuple[int, str]]) -> None:
    """Drop initializers and value_info that the folds left unread (those unread before stay: nothing else changes)."""
    from bnstrip.onnxfold.load import iter_graphs

    drop = _unused(model) - keep
    for index, graph in enumerate(iter_graphs(model.graph)):
        for repeated in (graph.initializer, graph.value_info):
            kept = [item for item in repeated if (index, item.name) not in drop]
            if len(kept) != len(repeated):
                copies = [type(item)() for item in kept]
                for copy, item in zip(copies, kept, strict=True):
                    copy.CopyFrom(item)
                del repeated[:]
                repeated.extend(copies)


@dataclass
class _Applied:
    model: Any
    folded: list[tuple[str, str]]
    skipped: dict[str, str]
    into: dict[str, str]
    gained_bias: list[str]
    order: list[str]


def apply_folds(model: Any, allowed: dict[str, str] | None = None, allow_overflow: bool = False,
                refuse_all: str | None = None) -> _Applied:
    """Fold a copy of `model`; `allowed` maps labels that must stay unfolded to their reason."""
    import onnx

    work = onnx.ModelProto()
    work.CopyFrom(model)
    before = _unused(work)
    all_scopes = scopes(work, inferred_shapes(work))
    ws = Workspace(allow_overflow)
    ws.opsets = list(work.opset_import)
    done = _Applied(work, [], {}, {}, [], [])
    for scope, bn, label in _labels(all_scopes):
        done.order.append(label)
        reason = refuse_all or (allowed or {}).get(label)
        decision = reason or decide(bn, scope)
        if isinstance(decision, str):
            done.skipped[label] = decision
            continue
        layer = decision.layer.name or decision.layer.output[0]
        gained = _apply_one(scope, ws, bn, decision, label)
        if isinstance(gained, str):
            done.skipped[label] = gained
            continue
        done.folded.append((scope.where + layer, label))
        done.into[label] = decision.into
        if gained:
            done.gained_bias.append(scope.where + layer)
    ws.finish()
    for scope in reversed(all_scopes):
        scope.drop_dead(ws.dead)
        scope.commit()
    _prune(work, before)
    return done


def _apply_one(scope: Scope, ws: Workspace, bn: Any, decision: Any, label: str) -> bool | str:
    from bnstrip.onnxfold.edit import apply_match

    return apply_match(scope, ws, bn, decision, label)


def _checker_issue(model: Any) -> str | None:
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # noqa: BLE001 - onnx raises several kinds
        return first_line(exc, 300, type(exc).__name__)
    return None


def _describe(report: SelfCheck | str) -> str:
    return report if isinstance(report, str) else report.describe()


def _bisect(original: Any, done: _Applied, reference: Any, allow_overflow: bool) -> tuple[_Applied, SelfCheck | str]:
    """Each fold alone against the reference; those that move the outputs are undone with the reason."""
    labels = [bn for _, bn in done.folded]
    undone: dict[str, str] = {}
    for label in labels:
        others = {other: "(bisection)" for other in labels if other != label}
        alone = apply_folds(original, others, allow_overflow)
        report = reference.check(alone.model)
        if isinstance(report, str) or not report.passed:
            undone[label] = f"folding it moves the outputs: {_describe(report)}"
    final = apply_folds(original, undone, allow_overflow)
    return final, reference.check(final.model)


def fold_onnx(model: Any, *, check: bool = True, allow_overflow: bool = False,
              feeds: list[dict[str, Any]] | None = None) -> OnnxFoldResult:
    """Fold a ModelProto or an `.onnx` path (never changed; or a LoadedOnnx); see the module docstring.

    `feeds` (a list of {input name: numpy array}) replace the seeded inputs of the check.
    Raises InputError for a file that is not a model bnstrip reads, CheckFailed when even
    the remaining folds do not pass the check or the folded model fails onnx's checker.
    """
    from bnstrip.onnxfold.load import LoadedOnnx, load_onnx

    loaded = model if isinstance(model, LoadedOnnx) else load_onnx(model)
    original = loaded.model
    done = apply_folds(original, None, allow_overflow, custom_domain_issue(original))
    report: SelfCheck | str | None = None
    if check and done.folded:  # nothing folded: the graph is the input's, there is nothing to prove
        from bnstrip.onnxfold.check import Reference

        reference = Reference(original, feeds=feeds)
        report = reference.check(done.model)
        if isinstance(report, str) or not report.passed:
            done, report = _bisect(original, done, reference, allow_overflow)
        if isinstance(report, str) or not report.passed:
            raise CheckFailed(f"{printable(loaded.path)}: the folded graph differs from the original: "
                              f"{_describe(report)}; nothing was folded that could be proven")
    warnings = []
    issue = _checker_issue(done.model)
    if issue is not None:
        if _checker_issue(original) is None:
            raise CheckFailed(f"{printable(loaded.path)}: the folded model fails onnx.checker ({issue}); "
                              "this is a bnstrip bug, please report it")
        warnings.append(f"{printable(loaded.path)}: the input itself fails onnx.checker ({issue})")
    from bnstrip.fold.model import with_none_folded_warning  # the one none-folded warning of every path

    skipped = [(label, done.skipped[label]) for label in done.order if label in done.skipped]
    return OnnxFoldResult(model=done.model, folded=done.folded, skipped=skipped, into=done.into,
                          gained_bias=done.gained_bias, warnings=with_none_folded_warning(warnings, done.folded, skipped),
                          check=report if isinstance(report, SelfCheck) else None, external=loaded.external,
                          source_sha256=loaded.sha256)

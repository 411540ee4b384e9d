"""torch.fx submodule by submodule, when the control flow of the whole model depends on tensor values."""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch
import torch.fx as fx
from torch import nn
from bnstrip._torch import BatchNormBase as _BatchNorm
from bnstrip._torch import ConvNd as _ConvNd

from bnstrip.core.compare import outputs_match
from bnstrip.trace.alias import attribute_read_refusals, module_refusals
from bnstrip.trace.bn_registry import is_batchnorm_like
from bnstrip.trace.classify import foldable_module_names
from bnstrip.trace.fx_tracer import fx_trace
from bnstrip.trace.observe import RunRecord, observe_run
from bnstrip.trace.opgraph import Op, OpGraph, error_summary, join_name, module_calls, ops_from_fx

_LEAF_LIKE = (_BatchNorm, _ConvNd, nn.Linear)  # and registered BatchNorm look-alikes (is_batchnorm_like)


def _visit(module: nn.Module, prefix: str, pieces: list[tuple[str, fx.GraphModule]], untraced: dict[str, str],
           unfaithful: dict[str, str]) -> None:
    """Trace `module`, making the submodule fx fails in opaque and retrying; else recurse into children."""
    if isinstance(module, torch.jit.ScriptModule):
        untraced[prefix] = "it is a TorchScript module, which bnstrip cannot rewrite"
        return
    error: BaseException | None = None
    if prefix not in unfaithful:
        opaque: set[int] = set()
        while True:
            gm, tracer, error = fx_trace(module, frozenset(opaque))
            if gm is not None:
                pieces.append((prefix, gm))
                for name, child in module.named_modules():
                    if id(child) in opaque:
                        _visit(child, join_name(prefix, name), pieces, untraced, unfaithful)
                return
            culprit = next(reversed(tracer.module_stack), None) if tracer.module_stack else None
            try:
                child = module.get_submodule(culprit) if culprit else None
            except (AttributeError, RuntimeError):
                child = None
            if child is None or child is module or id(child) in opaque:
                break
            opaque.add(id(child))
    untraced[prefix] = unfaithful.get(prefix) or error_summary(error)
    for name, child in module.named_children():
        if not isinstance(child, _LEAF_LIKE) and not is_batchnorm_like(child):
            _visit(child, join_name(prefix, name), pieces, untraced, unfaithful)


def graph_partial(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> OpGraph:
    """fx graphs of every submodule fx can trace, checked against a real run.

    A module folded inside a traced submodule S must be called exactly once per call of S
    (counted with hooks on the example inputs): otherwise untraced code also calls it. Each
    piece's graph is rerun on the inputs S really got; a piece whose graph computes something
    else is dropped and its children are traced instead. Tensors of foldable modules read by
    code outside their own forward (untraceable code included) are refused.
    """
    unfaithful: dict[str, str] = {}
    while True:
        pieces: list[tuple[str, fx.GraphModule]] = []
        untraced: dict[str, str] = {}
        _visit(model, "", pieces, untraced, unfaithful)
        record = observe_run(model, example_inputs, foldable_module_names(model), capture={p for p, _ in pieces})
        newly = {prefix: reason for prefix, gm in pieces if (reason := _piece_mismatch(prefix, gm, record))}
        if not newly:
            break
        unfaithful.update(newly)

    ops: list[Op] = []
    calls: Counter = Counter()
    refusals = module_refusals(model)
    for prefix, gm in pieces:
        piece_ops = ops_from_fx(gm, prefix, where=prefix, root=model.get_submodule(prefix) if prefix else model)
        piece_calls = module_calls(piece_ops)
        for op in piece_ops:
            if op.kind == "bn" and op.functional is not None:
                op.note = op.note or f"it is a functional batch_norm inside {prefix}, and only fx on the whole model can remove those"
            if op.module is not None and is_batchnorm_like(op.module):
                seen = record.ranks.get(op.name)
                if seen:
                    op.rank = next(iter(seen)) if len(seen) == 1 else None  # several ranks: not provably one layout
        for name, count in piece_calls.items():
            calls[name] += count
            if count == 1 and record.calls[name] != record.calls[prefix]:
                refusals.setdefault(name, f"it runs {record.calls[name]} times but {prefix} only "
                                          f"{record.calls[prefix]} times, so code fx cannot trace also calls it")
        for name, reason in attribute_read_refusals(piece_ops, gm).items():
            refusals.setdefault(name, reason)
        ops.extend(piece_ops)
    for name, reason in record.foreign_reads.items():
        refusals.setdefault(name, reason)
    graph = OpGraph(ops=ops, tracer="torch.fx (per submodule)", calls=calls, refusals=refusals, untraced=untraced,
                    model_output=record.output, input_written=record.input_written, example_run=True)
    graph.traced = {prefix for prefix, _ in pieces}
    return graph


def _piece_mismatch(prefix: str, gm: fx.GraphModule, record: RunRecord) -> str | None:
    """Why the traced graph of submodule `prefix` is not what its forward computed in the real run, or None."""
    if prefix not in record.captured:
        return None  # not called on the example inputs: nothing to compare against
    args, kwargs, expected = record.captured[prefix]
    try:
        with torch.no_grad():
            got = gm(*args, **kwargs)
    except Exception as exc:
        return f"its fx graph fails on the inputs it really gets ({error_summary(exc)})"
    if not outputs_match(expected, got):
        return ("its fx graph computes something else than its forward on the example inputs (Python code that fx "
                "follows differently, e.g. isinstance on a tensor)")
    return None

"""The order of the folds: walk the graph until no BatchNorm can be folded any more (chains included)."""
from __future__ import annotations

import dataclasses

from torch import nn

from bnstrip.fold.rules import Fold, decide
from bnstrip.trace.opgraph import Op, OpGraph

def _rewire(bn: Op) -> None:
    """Take the BN out of the op graph so that chains (conv -> BN -> BN) are seen on the next pass."""
    source = bn.inputs[0] if bn.inputs else None
    for user in bn.users:
        user.inputs = [i for i in user.inputs if i is not bn] if source is None else \
            [source if i is bn else i for i in user.inputs]
    if source is not None:
        source.users = [u for u in source.users if u is not bn]
        for user in bn.users:
            if user not in source.users:
                source.users.append(user)
    bn.inputs, bn.users = [], []


def plan_folds(graph: OpGraph, root: nn.Module, keep_structure: bool = False,
               eps: float | None = None) -> tuple[list[Fold], dict[str, str]]:
    """Folds in the order they must be applied, and the reason each remaining BatchNorm stays."""
    folds: list[Fold] = []
    reasons: dict[str, str] = {}
    done: set[str] = set()  # by name: a BatchNorm called several times is one fold
    changed = True
    while changed:
        changed = False
        reasons = {}
        for op in graph.ops:
            if op.kind != "bn" or op.name in done:
                continue
            decision = decide(op, graph, root, keep_structure, eps)
            if isinstance(decision, Fold):
                folds.append(decision)
                done.add(op.name)
                for call in [o for o in graph.ops if o.kind == "bn" and o.name == op.name]:
                    _rewire(call)
                changed = True
            else:
                reasons.setdefault(op.name, decision)
    return folds, reasons


def replay_graph(graph: OpGraph, root: nn.Module) -> OpGraph | None:
    """A fresh copy of `graph` (not yet planned) whose ops refer to the modules of `root`, a copy of the model
    it was traced from: bisection plans again on it instead of tracing again. None where only a new trace
    will do (a functional batch_norm lives in the traced GraphModule, which belongs to the first copy)."""
    if any(op.functional is not None for op in graph.ops):
        return None
    copies: dict[int, Op] = {}
    for op in graph.ops:
        module = op.module
        if module is not None:
            try:
                module = root.get_submodule(op.name)
            except AttributeError:
                return None
            if type(module) is not type(op.module):
                return None
        copies[id(op)] = dataclasses.replace(op, module=module, inputs=[], users=[])
    for op in graph.ops:
        twin = copies[id(op)]
        twin.inputs = [copies[id(i)] for i in op.inputs]
        twin.users = [copies[id(u)] for u in op.users]
    return dataclasses.replace(graph, ops=[copies[id(op)] for op in graph.ops], refusals=dict(graph.refusals), gm=None)

"""The order of the folds: walk the graph until no BatchNorm can be folded any more (chains included)."""
from __future__ import annotations

from torch import nn

from bnstrip.fold.rules import Fold, decide
from bnstrip.trace.opgraph import OpGraph

def _rewire(fold: Fold) -> None:
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
               eps: float | None = None) -> tuple[list[Fold], dict[str, str]]:
    """Folds in the order they must be applied, and the reason each remaining BatchNorm stays."""
    folds: list[Fold] = []
    reasons: dict[str, str] = {}
    done: set[int] = set()
    changed = True
    while changed:
        changed = False
        reasons = {}
        for op in graph.ops:
            if op.kind != "bn" or id(op) in done:
                continue
            decision = decide(op, graph, root, keep_structure, eps)
            if isinstance(decision, Fold):
                folds.append(decision)
                done.add(id(op))
                _rewire(decision)
                changed = True
            else:
                reasons.setdefault(op.name, decision)
    return folds, reasons

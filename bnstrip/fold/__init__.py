"""Folding on a traced graph: the rules as a table (rules), their order (plan), the rewrite (rewrite),
fold_model with its check and bisection (model), and rebuilding a folded result from a file (load)."""
from __future__ import annotations

from bnstrip.fold.load import folded_skeleton, load_folded, load_state_strict
from bnstrip.fold.model import FoldResult, fold_model
from bnstrip.fold.options import FoldOptions

__all__ = ["FoldOptions", "FoldResult", "fold_model", "folded_skeleton", "load_folded", "load_state_strict"]

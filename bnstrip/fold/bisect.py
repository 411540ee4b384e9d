"""bisect_folds: which of a list of folds (or merges) to undo so that the rest pass the check.

Shared by fold_model (folds) and bnstrip.fold.reparam (merges), so it lives in neither.
"""
from __future__ import annotations

from typing import Callable

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

"""bnstrip: fold BatchNorm into the neighbouring conv/linear layer, prove it, write the result.

Importing the package is cheap on purpose: torch-dependent names are resolved
lazily so that ``bnstrip --help`` never pays for ``import torch``.
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "fold_model": ("bnstrip.engine", "fold_model"),
    "load_folded": ("bnstrip.engine", "load_folded"),
    "FoldResult": ("bnstrip.engine", "FoldResult"),
    "SmallNetTrain": ("bnstrip.homework.models", "SmallNetTrain"),
    "SmallNetTest": ("bnstrip.homework.models", "SmallNetTest"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        return getattr(importlib.import_module(module_name), attr)
    raise AttributeError(f"module 'bnstrip' has no attribute {name!r}")

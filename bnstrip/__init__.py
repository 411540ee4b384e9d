"""bnstrip: fold BatchNorm into the neighbouring conv/linear layer, prove it, write the result.

Importing the package is cheap on purpose: torch-dependent names are resolved
lazily so that ``bnstrip --help`` never pays for ``import torch``.
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "fold_model": ("bnstrip.fold.model", "fold_model"),
    "load_folded": ("bnstrip.fold.load", "load_folded"),
    "FoldResult": ("bnstrip.fold.model", "FoldResult"),
    "FoldOptions": ("bnstrip.fold.options", "FoldOptions"),
    "fold_program": ("bnstrip.fold.program", "fold_program"),
    "load_program": ("bnstrip.io.pt2", "load_program"),
    "fuse_file": ("bnstrip.pipeline", "fuse_file"),
    "register_batchnorm": ("bnstrip.trace.bn_registry", "register_batchnorm"),
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


def __dir__() -> list[str]:
    return sorted((set(globals()) - {"annotations"}) | set(_LAZY))

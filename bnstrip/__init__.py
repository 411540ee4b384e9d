"""bnstrip: fold BatchNorm into the neighbouring conv/linear layer, prove it, write the result.

Importing the package is cheap on purpose: torch-dependent names are resolved
lazily so that ``bnstrip --help`` never pays for ``import torch``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from bnstrip._version import __version__

if TYPE_CHECKING:  # what a type checker sees; at run time the names load lazily (below), without torch
    from bnstrip.fold.load import load_folded as load_folded
    from bnstrip.fold.model import FoldResult as FoldResult, fold_model as fold_model
    from bnstrip.fold.options import FoldOptions as FoldOptions
    from bnstrip.fold.program import fold_program as fold_program
    from bnstrip.homework.models import SmallNetTest as SmallNetTest, SmallNetTrain as SmallNetTrain
    from bnstrip.io.pt2 import load_program as load_program
    from bnstrip.pipeline import fuse_file as fuse_file
    from bnstrip.trace.bn_registry import register_batchnorm as register_batchnorm

_LAZY = {
    "fold_model": ("bnstrip.fold.model", "fold_model"),
    "load_folded": ("bnstrip.fold.load", "load_folded"),
    "FoldResult": ("bnstrip.fold.model", "FoldResult"),
    "FoldOptions": ("bnstrip.fold.options", "FoldOptions"),
    "fold_program": ("bnstrip.fold.program", "fold_program"),
    "fold_onnx": ("bnstrip.onnxfold.fold", "fold_onnx"),
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

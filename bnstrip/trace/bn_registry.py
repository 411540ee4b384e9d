"""Which modules are BatchNorms: PyTorch's own, plus a registry of look-alikes (FrozenBatchNorm2d, BatchNormAct2d).

Real models normalise with modules that are not a plain `_BatchNorm` forward: torchvision's
FrozenBatchNorm2d (buffers only, no `_BatchNorm` base) and timm's BatchNormAct2d (a `_BatchNorm`
that applies dropout and an activation after normalising). An entry says how to read a class's
statistics (live tensors, so keep-structure can rewrite them in place) and what module replaces
it once its normalisation is folded (the part after the normalisation, or None for nothing).
Entries match by the class object, never by a name: an entry registered as a class matches that
class; one registered by qualified name (so that timm/torchvision need not be imported) matches only
the class object that name resolves to in the module already imported under it (sys.modules), and a
built-in entry only when that module is a file of the installed distribution it names (timm,
torchvision).  A class elsewhere that calls itself `timm.layers.norm_act.BatchNormAct2d` (its
__module__ set, or a module of that name planted on sys.path) matches nothing.  The real-run check
in fold_model then proves every fold made through an entry on the example inputs.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import sys
from dataclasses import dataclass
from typing import Callable

from torch import nn
from bnstrip._torch import BatchNormBase as _BatchNorm

from bnstrip.core.folded_bn import BN_SETTINGS, FoldedBatchNorm
from bnstrip.core.foldmath import BNStats

StatsReader = Callable[[nn.Module], BNStats]
PostFactory = Callable[[nn.Module], nn.Module]

_PLAIN_FORWARDS = {_BatchNorm.forward, nn.SyncBatchNorm.forward}


def standard_stats(module: nn.Module) -> BNStats:
    """running_mean, running_var, weight, bias (None when absent) and eps, read as attributes of the module."""
    mean, var = getattr(module, "running_mean"), getattr(module, "running_var")  # noqa: B009 - Tensors, typed as Any
    return BNStats(mean, var, getattr(module, "weight", None), getattr(module, "bias", None), float(getattr(module, "eps")))  # noqa: B009




class FoldedBatchNormTail(nn.Module):
    """What a folded BatchNorm-plus-more module becomes: its own children after the normalisation, in order.

    The children keep their names, so their state_dict keys (a PReLU's weight) stay the same; the plain
    settings user code may read (num_features, eps, ...) are kept too.
    """

    _SETTINGS = BN_SETTINGS

    def __init__(self, bn: nn.Module, order: tuple[str, ...]) -> None:
        super().__init__()
        self.order = tuple(name for name in order if isinstance(getattr(bn, name, None), nn.Module))
        for name in self.order:
            self.add_module(name, getattr(bn, name))
        for setting in self._SETTINGS:
            if hasattr(bn, setting) and not isinstance(getattr(bn, setting), nn.Module):
                setattr(self, setting, getattr(bn, setting))

    def forward(self, x):  # noqa: ANN001, ANN201 - as the module it replaces
        for name in self.order:
            x = getattr(self, name)(x)
        return x

    def extra_repr(self) -> str:
        return f"num_features={getattr(self, 'num_features', '?')} (folded, then {', '.join(self.order) or 'nothing'})"


def children_after(*names: str) -> PostFactory:
    """A `post` factory: after folding, apply the module's own children `names` in this order (missing ones skipped)."""
    return lambda module: FoldedBatchNormTail(module, names)


@dataclass(frozen=True)
class BatchNormLike:
    """How to fold one class: read its statistics, and what replaces it (None: nothing, the identity)."""

    key: str
    stats: StatsReader = standard_stats
    post: PostFactory | None = None
    distribution: str | None = None
    """For an entry by name: the installed distribution whose files must define the class (built-in entries)."""


PLAIN = BatchNormLike("torch.nn BatchNorm")
"""PyTorch's own BatchNorm forward (any _BatchNorm subclass that does not override it)."""

_REGISTRY: dict[type | str, BatchNormLike] = {}
"""Entries by class object (registered as a class) or by qualified name (resolved through sys.modules)."""


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_batchnorm(cls_or_name: type | str, *, stats: StatsReader | None = None,
                       post: PostFactory | None = None, distribution: str | None = None) -> None:
    """Teach bnstrip a BatchNorm-like class: `stats(module)` returns its BNStats (live tensors), `post(module)`
    the module that replaces it after its normalisation is folded (None: it becomes the identity).

    `cls_or_name` is the class itself or its qualified name ("timm.layers.norm_act.BatchNormAct2d"); only
    that exact class object matches, not its subclasses nor another class claiming the name (see the module
    doc); with `distribution`, only when its module is a file of that installed distribution. Its forward
    must normalise its single input first and then apply what `post` returns; fold_model's real-run check
    proves each fold on the example inputs.
    """
    if isinstance(cls_or_name, type):
        _REGISTRY[cls_or_name] = BatchNormLike(qualified_name(cls_or_name), stats or standard_stats, post)
        return
    if not isinstance(cls_or_name, str) or "." not in cls_or_name:
        raise ValueError(f"register_batchnorm: {cls_or_name!r} is not a class or a qualified class name "
                         "like 'package.module.Class'")
    _REGISTRY[cls_or_name] = BatchNormLike(cls_or_name, stats or standard_stats, post, distribution)


def unregister_batchnorm(cls_or_name: type | str) -> None:
    _REGISTRY.pop(cls_or_name, None)


@functools.cache
def _distribution_files(name: str) -> frozenset[str]:
    """The real paths of the .py files an installed distribution owns (empty when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        installed = distribution(name)
    except PackageNotFoundError:
        return frozenset()
    return frozenset(os.path.realpath(str(installed.locate_file(f))) for f in installed.files or []
                     if str(f).endswith(".py"))


def _resolves_to(cls: type, entry: BatchNormLike) -> bool:
    """Does the entry's qualified name, looked up in the module already imported under it, give this very class?"""
    module_name, _, class_name = entry.key.rpartition(".")
    module = sys.modules.get(module_name)
    if module is None or getattr(module, class_name, None) is not cls:
        return False
    if entry.distribution is None:
        return True
    path = getattr(module, "__file__", None)
    return isinstance(path, str) and _real_path(path) in _distribution_files(entry.distribution)


@functools.lru_cache(maxsize=1024)
def _real_path(path: str) -> str:
    """os.path.realpath, once per module file: it is asked for every call of a registered look-alike."""
    return os.path.realpath(path)


def batchnorm_entry(module: nn.Module | None) -> BatchNormLike | None:
    """The entry `module` folds by: PLAIN for PyTorch's BatchNorm forward, a registry entry, or None."""
    if module is None:
        return None
    cls = type(module)
    entry = _REGISTRY.get(cls)
    if entry is None:
        by_name = _REGISTRY.get(qualified_name(cls))
        entry = by_name if by_name is not None and _resolves_to(cls, by_name) else None
    if entry is not None:
        return entry
    if isinstance(module, _BatchNorm) and cls.forward in _PLAIN_FORWARDS:
        return PLAIN
    return None


def is_batchnorm_like(module: nn.Module | None) -> bool:
    """A module bnstrip accounts for as a BatchNorm: any _BatchNorm, or a registered look-alike."""
    return isinstance(module, _BatchNorm) or batchnorm_entry(module) is not None


def module_stats(module: nn.Module, eps: float | None = None) -> BNStats:
    """The statistics of a BatchNorm-like module through its entry; `eps` replaces its own when given."""
    entry = batchnorm_entry(module) or PLAIN
    stats = entry.stats(module)
    return stats if eps is None else dataclasses.replace(stats, eps=float(eps))


def folded_replacement(module: nn.Module) -> nn.Module:
    """The module that takes a folded BatchNorm's place: its entry's post module, else the identity."""
    entry = batchnorm_entry(module)
    if entry is not None and entry.post is not None:
        return entry.post(module)
    return FoldedBatchNorm(module)


for _name, _post, _dist in (("torchvision.ops.misc.FrozenBatchNorm2d", None, "torchvision"),
                            ("timm.layers.norm_act.BatchNormAct2d", children_after("drop", "act"), "timm"),
                            ("timm.layers.norm_act.SyncBatchNormAct", children_after("drop", "act"), "timm"),
                            ("timm.layers.norm_act.FrozenBatchNormAct2d", children_after("drop", "act"), "timm")):
    register_batchnorm(_name, post=_post, distribution=_dist)

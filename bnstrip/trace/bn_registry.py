"""Which modules are BatchNorms: PyTorch's own, plus a registry of look-alikes (FrozenBatchNorm2d, BatchNormAct2d).

Real models normalise with modules that are not a plain `_BatchNorm` forward: torchvision's
FrozenBatchNorm2d (buffers only, no `_BatchNorm` base) and timm's BatchNormAct2d (a `_BatchNorm`
that applies dropout and an activation after normalising). An entry says how to read a class's
statistics (live tensors, so keep-structure can rewrite them in place) and what module replaces
it once its normalisation is folded (the part after the normalisation, or None for nothing).
Entries match by exact class, or by its qualified name so that timm/torchvision need not be
imported; the real-run check in fold_model proves every fold made through an entry.
"""
from __future__ import annotations

import dataclasses
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


PLAIN = BatchNormLike("torch.nn BatchNorm")
"""PyTorch's own BatchNorm forward (any _BatchNorm subclass that does not override it)."""

_REGISTRY: dict[type | str, BatchNormLike] = {}


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_batchnorm(cls_or_name: type | str, *, stats: StatsReader | None = None,
                       post: PostFactory | None = None) -> None:
    """Teach bnstrip a BatchNorm-like class: `stats(module)` returns its BNStats (live tensors), `post(module)`
    the module that replaces it after its normalisation is folded (None: it becomes the identity).

    `cls_or_name` is the class itself or its qualified name ("timm.layers.norm_act.BatchNormAct2d"); only
    that exact class matches, not its subclasses. Its forward must normalise its single input first and then
    apply what `post` returns; fold_model's real-run check proves each fold on the example inputs.
    """
    key = cls_or_name if isinstance(cls_or_name, str) else qualified_name(cls_or_name)
    if not isinstance(key, str) or "." not in key:
        raise ValueError(f"register_batchnorm: {cls_or_name!r} is not a class or a qualified class name "
                         "like 'package.module.Class'")
    _REGISTRY[key] = BatchNormLike(key, stats or standard_stats, post)


def unregister_batchnorm(cls_or_name: type | str) -> None:
    key = cls_or_name if isinstance(cls_or_name, str) else qualified_name(cls_or_name)
    _REGISTRY.pop(key, None)


def batchnorm_entry(module: nn.Module | None) -> BatchNormLike | None:
    """The entry `module` folds by: PLAIN for PyTorch's BatchNorm forward, a registry entry, or None."""
    if module is None:
        return None
    cls = type(module)
    entry = _REGISTRY.get(qualified_name(cls))
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


for _name, _post in (("torchvision.ops.misc.FrozenBatchNorm2d", None),
                     ("timm.layers.norm_act.BatchNormAct2d", children_after("drop", "act")),
                     ("timm.layers.norm_act.SyncBatchNormAct", children_after("drop", "act")),
                     ("timm.layers.norm_act.FrozenBatchNormAct2d", children_after("drop", "act"))):
    register_batchnorm(_name, post=_post)

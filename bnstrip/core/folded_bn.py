"""What a folded plain BatchNorm module becomes: the identity that still answers num_features, eps, ...

A leaf module: the registry (bnstrip.trace.bn_registry) names it as the default replacement and the
rewrite (bnstrip.fold.rewrite) installs it, so it lives below both.
"""
from __future__ import annotations

from torch import nn

BN_SETTINGS = ("num_features", "eps", "momentum", "affine", "track_running_stats")
"""The plain settings user code may read off a BatchNorm; kept on whatever replaces a folded one."""


class FoldedBatchNorm(nn.Identity):
    """What a folded BatchNorm module becomes: the identity, keeping the plain settings user code may read.

    `x.view(n, self.bn.num_features, -1)` keeps working; its tensors are gone (reads of them in
    forward make bnstrip refuse the fold, so none are needed).
    """

    _SETTINGS = BN_SETTINGS

    def __init__(self, bn: nn.Module | None = None) -> None:
        super().__init__()
        for setting in self._SETTINGS:
            if bn is not None and hasattr(bn, setting):
                setattr(self, setting, getattr(bn, setting))

    def extra_repr(self) -> str:
        return f"num_features={getattr(self, 'num_features', '?')} (folded)"

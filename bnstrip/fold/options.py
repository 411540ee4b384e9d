"""FoldOptions: the fold settings as one value, passed whole from fold_model to every step that reads them."""
from __future__ import annotations

from dataclasses import dataclass

from bnstrip.errors import InputError


@dataclass(frozen=True)
class FoldOptions:
    """How to fold: `eps` replaces every BatchNorm module's eps (a state_dict does not store it; None keeps each
    module's own), keep_structure keeps every module (bnstrip.fold.rewrite), allow_overflow writes a folded value
    that overflows the model's dtype with a warning instead of refusing, reparameterize merges parallel branches
    after folding (bnstrip.fold.reparam)."""

    eps: float | None = None
    keep_structure: bool = False
    allow_overflow: bool = False
    reparameterize: bool = False

    def check(self, has_inputs: bool) -> None:
        """InputError for settings that cannot go together (before any work)."""
        if self.reparameterize and self.keep_structure:
            raise InputError("reparameterize=True cannot go with keep_structure=True: merging branches replaces them by "
                             "one new conv, so the original structure cannot be kept")
        if self.reparameterize and not has_inputs:
            raise InputError("reparameterize=True needs example_inputs to prove the merged model")

"""Compare a folded model against the BatchNorm model it came from, on seeded random inputs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from bnstrip.errors import CheckFailed


@dataclass(frozen=True)
class SelfCheck:
    """max |diff| of the outputs, the output scale (max |reference|) and the tolerance it was held to."""

    max_abs_diff: float
    output_scale: float
    tolerance: float
    samples: int

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def relative_tolerance(dtype: torch.dtype) -> float:
    """How far a fold may move outputs, relative to their scale, given the weights' dtype."""
    return 1e-5 if dtype in (torch.float32, torch.float64) else 2e-2


def _outputs(model: nn.Module, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    with torch.inference_mode():
        out = model(*inputs)
    leaves = out if isinstance(out, (tuple, list)) else [out]
    if isinstance(out, dict):
        leaves = list(out.values())
    return [t.detach().to(torch.float64) for t in leaves if isinstance(t, torch.Tensor)]


def compare_models(reference: nn.Module, folded: nn.Module, inputs: Sequence[torch.Tensor], rtol: float,
                   name: str = "model") -> SelfCheck:
    """Run both models in float64 on the same inputs; the tolerance is rtol times the output scale."""
    ref_out = _outputs(reference, inputs)
    new_out = _outputs(folded, inputs)
    if len(ref_out) != len(new_out) or any(a.shape != b.shape for a, b in zip(ref_out, new_out)):
        raise CheckFailed(f"{name}: the folded model's outputs have other shapes than the original's; not writing it")
    diff = max((float((a - b).abs().max()) if a.numel() else 0.0) for a, b in zip(ref_out, new_out))
    if any(not torch.isfinite(b).all() and torch.isfinite(a).all() for a, b in zip(ref_out, new_out)):
        diff = float("inf")
    scale = max((float(a.abs().max()) if a.numel() else 0.0) for a in ref_out)
    samples = int(inputs[0].shape[0]) if inputs and inputs[0].dim() else 1
    return SelfCheck(max_abs_diff=diff, output_scale=scale, tolerance=rtol * max(scale, 1.0), samples=samples)


def seeded_inputs(shape: Sequence[int], seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Uniform [0, 1) inputs (image-like) from a private generator, so checks are reproducible."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=gen, dtype=dtype)

"""Problem 1 as a library call: smallNetTrain state_dict in, smallNetTest state_dict out, self-checked."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Mapping

import torch

from bnstrip.errors import CheckFailed, InputError
from bnstrip.fold import fold_state_dict
from bnstrip.models import SMALLNET_EPS, SMALLNET_INPUT_SHAPE, SMALLNET_PAIRS, SmallNetTest, SmallNetTrain
from bnstrip.selfcheck import SelfCheck, compare_models, relative_tolerance, seeded_inputs


@dataclass
class SmallNetFuse:
    """The folded smallNetTest state_dict and the evidence that it matches smallNetTrain."""

    state_dict: dict[str, torch.Tensor]
    pairs: list[tuple[str, str]]
    self_check: SelfCheck
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


def check_smallnet_keys(state: Mapping[str, torch.Tensor], source: str) -> None:
    """Missing/extra keys or wrong shapes against SmallNetTrain, named in one line."""
    expected = {k: v.shape for k, v in SmallNetTrain().state_dict().items()}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if extra:
            parts.append(f"unexpected {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
        raise InputError(f"{source}: not a smallNetTrain checkpoint ({'; '.join(parts)}); pass smallNetSaved or use --arch")
    for key, shape in expected.items():
        tensor = state[key]
        if not isinstance(tensor, torch.Tensor):
            raise InputError(f"{source}: {key} is not a tensor; pass a smallNetTrain state_dict")
        if tensor.shape != shape:
            raise InputError(f"{source}: {key} has shape {tuple(tensor.shape)}, smallNetTrain expects {tuple(shape)}; wrong architecture")
        if not tensor.dtype.is_floating_point and not key.endswith("num_batches_tracked"):
            raise InputError(f"{source}: {key} has dtype {tensor.dtype}; expected a floating-point tensor")
        if tensor.layout != torch.strided or tensor.device.type != "cpu":
            raise InputError(f"{source}: {key} is a {tensor.layout}/{tensor.device.type} tensor; expected dense CPU tensors")


def never_trained_warnings(state: Mapping[str, torch.Tensor], pairs: list[tuple[str, str]]) -> list[str]:
    """BatchNorms whose num_batches_tracked is 0 hold default statistics: folding them is exact but meaningless."""
    notes = []
    for _, bn in pairs:
        tracked = state.get(f"{bn}.num_batches_tracked")
        if tracked is not None and tracked.numel() == 1 and int(tracked) == 0:
            notes.append(f"{bn}: num_batches_tracked is 0, its running statistics were never trained")
    return notes


def fuse_smallnet(state: Mapping[str, torch.Tensor], eps: float = SMALLNET_EPS, source: str = "checkpoint",
                  allow_overflow: bool = False, check_samples: int = 16, seed: int = 0) -> SmallNetFuse:
    """Fold the three BatchNorms of smallNetTrain; refuse (CheckFailed) if the result does not match."""
    started = time.perf_counter()
    check_smallnet_keys(state, source)
    pairs = list(SMALLNET_PAIRS)
    warnings = never_trained_warnings(state, pairs)
    folded = fold_state_dict(state, pairs, eps, allow_overflow=allow_overflow)
    dtype = state["fc1.0.weight"].dtype
    check = self_check_smallnet(state, folded, eps, rtol=relative_tolerance(dtype), samples=check_samples, seed=seed)
    if not check.passed:
        raise CheckFailed(
            f"{source}: folded smallNetTest differs from smallNetTrain by {check.max_abs_diff:.3g} "
            f"(tolerance {check.tolerance:.3g}); not writing the output"
        )
    return SmallNetFuse(folded, pairs, check, warnings, time.perf_counter() - started)


def build_models(state: Mapping[str, torch.Tensor], folded: Mapping[str, torch.Tensor], eps: float,
                 dtype: torch.dtype) -> tuple[SmallNetTrain, SmallNetTest]:
    """The BN model and the folded model in eval mode, in the given dtype."""
    bn_model = SmallNetTrain().to(dtype)
    for module in bn_model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eps = eps
    bn_model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    test_model = SmallNetTest().to(dtype)
    test_model.load_state_dict({k: v.to(dtype) for k, v in folded.items()}, strict=True)
    return bn_model.eval(), test_model.eval()


def self_check_smallnet(state: Mapping[str, torch.Tensor], folded: Mapping[str, torch.Tensor], eps: float, rtol: float,
                        samples: int = 16, seed: int = 0) -> SelfCheck:
    """Both models in float64 on seeded random images: isolates the fold from float32 rounding."""
    bn_model, test_model = build_models(state, folded, eps, torch.float64)
    inputs = seeded_inputs((samples, *SMALLNET_INPUT_SHAPE), seed=seed)
    return compare_models(bn_model, test_model, [inputs], rtol, name="smallNet")


def load_smallnet_pair(checkpoint: str, fused: str | None, eps: float) -> tuple[SmallNetTrain, SmallNetTest, list[str]]:
    """The BN model from `checkpoint` and the folded model (from `fused`, or folded in memory), both eval, float32."""
    from bnstrip.checkpoint import load_checkpoint

    loaded = load_checkpoint(checkpoint)
    notes = [f"{checkpoint}: {n}" for n in loaded.unwrapped]
    check_smallnet_keys(loaded.state_dict, checkpoint)
    notes += [f"{checkpoint}: {n}" for n in never_trained_warnings(loaded.state_dict, list(SMALLNET_PAIRS))]
    if fused is None:
        folded = fuse_smallnet(loaded.state_dict, eps=eps, source=checkpoint).state_dict
    else:
        fused_loaded = load_checkpoint(fused)
        notes += [f"{fused}: {n}" for n in fused_loaded.unwrapped]
        folded = fused_loaded.state_dict
        expected = set(SmallNetTest().state_dict())
        if set(folded) != expected:
            missing, extra = sorted(expected - set(folded)), sorted(set(folded) - expected)
            raise InputError(f"{fused}: not a smallNetTest state_dict (missing {missing[:4]}, unexpected {extra[:4]}); "
                             "write it with `bnstrip fuse`")
        for key, tensor in SmallNetTest().state_dict().items():
            if folded[key].shape != tensor.shape:
                raise InputError(f"{fused}: {key} has shape {tuple(folded[key].shape)}, smallNetTest expects {tuple(tensor.shape)}")
    bn_model, test_model = build_models(loaded.state_dict, folded, eps, torch.float32)
    return bn_model, test_model, notes

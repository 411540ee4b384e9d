"""Problem 1 as a library call: smallNetTrain state_dict in, smallNetTest state_dict out, self-checked."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Mapping

import torch

from bnstrip._torch import BatchNormBase
from bnstrip.io.checkpoint import key_mismatch
from bnstrip.errors import CheckFailed, InputError
from bnstrip.core.foldmath import all_finite, bn_scale_shift, bn_stats_from_state, fold_state_dict
from bnstrip.homework.models import SMALLNET_EPS, SMALLNET_INPUT_SHAPE, SMALLNET_PAIRS, SmallNetTest, SmallNetTrain
from bnstrip.core.compare import SelfCheck, compare_outputs, implied_check, seeded_inputs, seeded_outputs
from bnstrip.core.threads import map_single_threaded


@dataclass
class SmallNetFuse:
    """The folded smallNetTest state_dict and the evidence that it matches smallNetTrain."""

    state_dict: dict[str, torch.Tensor]
    pairs: list[tuple[str, str]]
    self_check: SelfCheck
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


def check_smallnet_keys(state: Mapping[str, torch.Tensor], source: str) -> None:
    """Missing/extra keys, wrong shapes or NaN/Inf weights against SmallNetTrain, named in one line."""
    with torch.device("meta"):  # shapes only: no 16M-parameter initialisation
        expected = {k: v.shape for k, v in SmallNetTrain().state_dict().items()}
    mismatch = key_mismatch(expected, state, shown=5)
    if mismatch:
        raise InputError(f"{source}: not a smallNetTrain checkpoint ({mismatch}); pass smallNetSaved or use --arch")
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
        # running statistics are checked by the fold, whose message says to recalibrate them
        if tensor.dtype.is_floating_point and not key.endswith(("running_mean", "running_var")) and not all_finite(tensor):
            raise InputError(f"{source}: {key} has NaN/Inf values; the checkpoint is corrupt, re-export it from a healthy run")


def never_trained_warnings(state: Mapping[str, torch.Tensor], pairs: list[tuple[str, str]]) -> list[str]:
    """BatchNorms whose num_batches_tracked is 0 hold default statistics: folding them is exact but meaningless."""
    notes = []
    for _, bn in pairs:
        tracked = state.get(f"{bn}.num_batches_tracked")
        if tracked is not None and tracked.numel() == 1 and int(tracked) == 0:
            notes.append(f"{bn}: num_batches_tracked is 0, its running statistics were never trained")
    return notes


def overflow_warnings(folded: Mapping[str, torch.Tensor], pairs: list[tuple[str, str]]) -> list[str]:
    """Folded tensors holding inf: only possible when --allow-overflow let a half-precision overflow through."""
    notes = []
    for producer, _ in pairs:
        for what in ("weight", "bias"):
            tensor = folded.get(f"{producer}.{what}")
            if tensor is not None and not all_finite(tensor):
                count = int((~torch.isfinite(tensor)).sum())
                notes.append(f"{producer}.{what}: {count} folded values overflow {str(tensor.dtype).replace('torch.', '')} and "
                             "are written as inf (allow_overflow=True); the model will output inf/NaN, save in float32 instead")
    return notes


def exact_where_overflowed(state: Mapping[str, torch.Tensor], folded: Mapping[str, torch.Tensor],
                           pairs: list[tuple[str, str]], eps: float) -> dict[str, torch.Tensor]:
    """`folded`, with each pair that --allow-overflow let overflow refolded in float64.

    The file gets the inf values the user allowed; the self-check still proves the fold itself.
    """
    checked = dict(folded)
    for producer, bn in pairs:
        if all(all_finite(folded[f"{producer}.{what}"]) for what in ("weight", "bias")):
            continue
        pair_state = {k: v.double() for k, v in state.items() if k.startswith((f"{producer}.", f"{bn}.")) and v.is_floating_point()}
        checked.update(fold_state_dict(pair_state, [(producer, bn)], eps))
    return checked


def fuse_smallnet(state: Mapping[str, torch.Tensor], eps: float = SMALLNET_EPS, source: str = "checkpoint",
                  allow_overflow: bool = False, check_samples: int = 16, seed: int = 0) -> SmallNetFuse:
    """Fold the three BatchNorms of smallNetTrain; refuse (CheckFailed) if the result does not match."""
    started = time.perf_counter()
    check_smallnet_keys(state, source)
    pairs = list(SMALLNET_PAIRS)
    warnings = never_trained_warnings(state, pairs)
    try:
        folded = fold_state_dict(state, pairs, eps, allow_overflow=allow_overflow)
    except InputError as exc:
        raise InputError(f"{source}: {exc}") from None
    checked = folded  # without --allow-overflow the fold refused any non-finite result
    if allow_overflow:
        warnings += overflow_warnings(folded, pairs)
        checked = exact_where_overflowed(state, folded, pairs, eps)
    check = self_check_smallnet(state, folded, eps, samples=check_samples, seed=seed,
                                exact=None if checked is folded else checked)
    if not check.passed:
        raise CheckFailed(f"{source}: folded smallNetTest differs from smallNetTrain: {check.describe()}; "
                          "not writing the output")
    return SmallNetFuse(folded, pairs, check, warnings, time.perf_counter() - started)


def _meta_models(eps: float) -> tuple[SmallNetTrain, SmallNetTest]:
    """Both networks on the meta device (no parameter initialisation), the BN model's eps set."""
    with torch.device("meta"):
        bn_model, test_model = SmallNetTrain(), SmallNetTest()
    for module in bn_model.modules():
        if isinstance(module, BatchNormBase):
            module.eps = eps
    return bn_model, test_model


def build_models(state: Mapping[str, torch.Tensor], folded: Mapping[str, torch.Tensor], eps: float,
                 dtype: torch.dtype) -> tuple[SmallNetTrain, SmallNetTest]:
    """The BN model and the folded model in eval mode, in the given dtype.

    Built on the meta device and filled with assign=True: no 16M-parameter random
    initialisation, and tensors already in `dtype` are used as they are, not copied.
    """
    bn_model, test_model = _meta_models(eps)
    bn_model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, strict=True,
                             assign=True)
    test_model.load_state_dict({k: v.to(dtype) for k, v in folded.items()}, strict=True, assign=True)
    return bn_model.eval(), test_model.eval()


class _WidenedLinear(torch.nn.Module):
    """A Linear that keeps its stored weight and computes in float64 one block of output rows at a time.

    The float64 self-check of smallNet would otherwise hold fc1 (16M parameters) twice in
    float64, 268 MB, four times the checkpoint; blocks of 2 MB give the same float64 result.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: int) -> None:
        super().__init__()
        self.weight, self.bias, self.rows = weight, bias, max(1, rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(*x.shape[:-1], self.weight.shape[0], dtype=torch.float64)
        for start in range(0, self.weight.shape[0], self.rows):
            stop = start + self.rows
            bias = None if self.bias is None else self.bias[start:stop].to(torch.float64)
            out[..., start:stop] = torch.nn.functional.linear(x, self.weight[start:stop].to(torch.float64), bias)
        return out


class _FewSamplesAtATime(torch.nn.Module):
    """Runs a per-sample model on a few samples at a time and concatenates the outputs.

    Float64 convolution unfolds its whole input batch (im2col: 1.2 MB a sample for
    smallNet's conv2), which alone would be a third of fuse's memory headroom.
    """

    def __init__(self, model: torch.nn.Module, samples: int = 4, workers: int = 2) -> None:
        super().__init__()
        self.model, self.samples, self.workers = model, samples, workers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Each part on one intra-op thread, up to `workers` at once: the same figures at any core count
        # (bnstrip.core.threads); `workers` bounds the activations alive at once (fuse's memory goal).
        return torch.cat(map_single_threaded(self.model, x.split(self.samples), workers=self.workers))


def _float64_model(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """`model` (built on meta) in float64, its Linear layers widened block by block instead of copied whole."""
    elements_per_block = 1 << 18
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                key = f"{name}.{child_name}" if name else child_name
                weight = state[f"{key}.weight"]
                setattr(module, child_name, _WidenedLinear(weight, state.get(f"{key}.bias"), elements_per_block // weight.shape[1]))
    widened = {k for k, m in model.named_modules() if isinstance(m, _WidenedLinear)}
    rest = {k: v.to(torch.float64) if v.is_floating_point() else v for k, v in state.items() if k.rpartition(".")[0] not in widened}
    model.load_state_dict(rest, strict=True, assign=True)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Conv2d):
                setattr(module, child_name, _FewSamplesAtATime(child, samples=2, workers=1))
    return model.eval()


def self_check_smallnet(state: Mapping[str, torch.Tensor], folded: Mapping[str, torch.Tensor], eps: float,
                        samples: int = 16, seed: int = 0,
                        exact: Mapping[str, torch.Tensor] | None = None) -> SelfCheck:
    """The one comparator on seeded random images: both models in the checkpoint's dtype against smallNetTrain
    evaluated in float64 (fc1 widened block by block, never copied whole).

    `exact` (the fold redone in float64 where allow_overflow=True let values overflow) is compared in
    float64 instead, so the check still proves the fold itself. Where a model does not run in its
    dtype on this machine (half-precision convolutions), the float64 runs are compared.
    """
    dtype = state["fc1.0.weight"].dtype
    inputs = seeded_inputs((samples, *SMALLNET_INPUT_SHAPE), seed=seed)

    def evaluated64() -> object:  # float64, 2 samples at a time; only where the gap in the dtype does not decide
        bn64 = _float64_model(_meta_models(eps)[0], state)
        return seeded_outputs(_FewSamplesAtATime(bn64, samples=2, workers=1), [inputs])

    original64 = None
    if exact is None:
        try:
            bn_model, test_model = build_models(state, folded, eps, dtype)
            own = [inputs.to(dtype)]
            # A few samples at a time, as in float64: conv2's im2col for all 16 at once is most of fuse's headroom.
            expected = seeded_outputs(_FewSamplesAtATime(bn_model), own)
            got = seeded_outputs(_FewSamplesAtATime(test_model), own)
            del bn_model, test_model
            implied = implied_check(expected, got, dtype, samples)
            if implied is not None:
                return implied
            original64 = evaluated64()
            report = compare_outputs(expected, got, original64, dtype, samples)
            if report is not None:
                return report
        except RuntimeError:  # e.g. no half-precision kernel on this CPU
            pass
    if original64 is None:
        original64 = evaluated64()
    test64 = _float64_model(_meta_models(eps)[1], folded if exact is None else exact)
    report = compare_outputs(original64, seeded_outputs(_FewSamplesAtATime(test64, samples=2, workers=1), [inputs]), None,
                             dtype, samples)
    if report is None:
        raise CheckFailed("smallNet: the folded model's outputs have other shapes than the original's; not writing it")
    return report


def half_precision_warning(folded: Mapping[str, torch.Tensor]) -> list[str]:
    """The course's 1e-8 bar is a float32 bar: a half-precision smallNetTest misses it by rounding alone."""
    dtype = folded["fc1.0.weight"].dtype
    if dtype in (torch.float16, torch.bfloat16):
        name = str(dtype).replace("torch.", "")
        return [f"writing a {name} smallNetTest: the course's 1e-8 bar is a float32 bar that {name} rounding alone "
                "misses; fold with dtype='float32'"]
    return []


def refuse_swapped_arguments(state: Mapping[str, torch.Tensor], source: str) -> None:
    """IN that is already a folded smallNetTest state_dict (no BatchNorm keys): the arguments are likely swapped."""
    with torch.device("meta"):
        test_keys = set(SmallNetTest().state_dict())
    if set(state) == test_keys:
        raise InputError(f"{source}: this is a folded smallNetTest state_dict (no BatchNorm keys), not a smallNetTrain "
                         "checkpoint; are the input and output swapped? The smallNetTrain checkpoint comes first")


def load_smallnet_pair(checkpoint: str, fused: str | None, eps: float) -> tuple[SmallNetTrain, SmallNetTest, list[str]]:
    """The BN model from `checkpoint` and the folded model (from `fused`, or folded in memory), both eval, float32."""
    from bnstrip.io.checkpoint import load_checkpoint

    loaded = load_checkpoint(checkpoint)
    notes = [f"{checkpoint}: {n}" for n in loaded.unwrapped]
    if fused is None:
        result = fuse_smallnet(loaded.state_dict, eps=eps, source=checkpoint)  # validates the checkpoint itself
        folded = result.state_dict
        notes += [f"{checkpoint}: {n}" for n in result.warnings]
    else:
        check_smallnet_keys(loaded.state_dict, checkpoint)
        notes += [f"{checkpoint}: {n}" for n in never_trained_warnings(loaded.state_dict, list(SMALLNET_PAIRS))]
        for _, bn in SMALLNET_PAIRS:  # the reference model must be sound even when the fold comes from a file
            try:
                bn_scale_shift(bn_stats_from_state(loaded.state_dict, bn, eps), bn)
            except InputError as exc:
                raise InputError(f"{checkpoint}: {exc}") from None
        fused_loaded = load_checkpoint(fused)
        notes += [f"{fused}: {n}" for n in fused_loaded.unwrapped]
        folded = fused_loaded.state_dict
        expected = _meta_models(eps)[1].state_dict()
        mismatch = key_mismatch(expected, folded)
        if mismatch:
            raise InputError(f"{fused}: not a smallNetTest state_dict ({mismatch}); write it with `bnstrip fuse`")
        for key, tensor in expected.items():
            if folded[key].shape != tensor.shape:
                raise InputError(f"{fused}: {key} has shape {tuple(folded[key].shape)}, smallNetTest expects {tuple(tensor.shape)}")
    bn_model, test_model = build_models(loaded.state_dict, folded, eps, torch.float32)
    return bn_model, test_model, notes

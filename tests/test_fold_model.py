"""fold_model on the zoo: exact where it folds, a reason where it refuses, never silent.

Ground truth is always the original model run in eval mode (and, for executed ops, PyTorch's
own dispatcher), never the fold maths under test. torch.fx's fuse is run beside it to show
what we fold that it misses and where it folds wrongly.
"""
from __future__ import annotations

import copy
import functools
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.optimization import fuse as fx_fuse
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bnstrip import FoldResult, fold_model  # noqa: E402
from bnstrip.errors import InputError  # noqa: E402
from bnstrip.refusals import refusal  # noqa: E402
from bnstrip.testing import zoo  # noqa: E402

REL_TOL = 1e-5


def rel_diff(reference: torch.Tensor, other: torch.Tensor) -> float:
    """max |diff| relative to the output scale (max |reference|, at least 1)."""
    return float((reference - other).abs().max()) / max(float(reference.abs().max()), 1.0)


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


class CountBatchNorms(TorchDispatchMode):
    """Counts batch-norm kernels PyTorch actually executes (independent of how the model was rewritten)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "batch_norm" in func.name():
            self.count += 1
        return func(*args, **(kwargs or {}))


def executed_batch_norms(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), CountBatchNorms() as counter:
        model(x)
    return counter.count


@functools.cache
def folded_zoo(name: str) -> tuple[nn.Module, torch.Tensor, FoldResult, dict[str, torch.Tensor]]:
    """(original, inputs, fold result, snapshot of the original's state before folding), computed once per model."""
    model, x = zoo.build(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    return model, x, fold_model(model, (x,)), before


def bn_module_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, _BatchNorm)}


# name -> (folded (layer, bn) pairs or None for "every BN into the conv before it", skipped bn -> reason fragment)
EXPECTED: dict[str, tuple[set[tuple[str, str]] | None, dict[str, str]]] = {
    "ResNet18Style": (None, {}),
    "MobileNetV2Style": (None, {}),
    "Conv1dNet": ({("conv1", "bn1"), ("conv2", "bn2"), ("up", "bn3"), ("fc", "bn4")}, {}),
    "Conv3dNet": ({("conv1", "bn1"), ("conv2", "bn2"), ("up", "bn3")}, {}),
    "ConvTransposeDecoder": ({("fc", "bn0"), ("up1", "bn1"), ("up2", "bn2"), ("up3", "bn3")}, {}),
    "MLPBothSides": ({("fc1", "bn_in"), ("fc1", "bn1"), ("fc2", "bn_mid"), ("fc2", "bn2")}, {}),
    "LinearBNSequence": ({("head", "bn_head")}, {"bn_seq": "whose features are the last dim, so folding would scale the wrong axis"}),
    "ReusedConv": ({("conv_out", "bn_out")}, {"bn_a": "conv is called 2 times", "bn_b": "conv is called 2 times"}),
    "BNBeforePaddedConv": ({("conv_valid", "bn_valid"), ("conv_replicate", "bn_replicate")},
                           {"bn_pad": "conv_pad zero-pads (padding=(1, 1))"}),
    "ControlFlowNet": ({("stem.0", "stem.1"), ("branch_a.0", "branch_a.1"), ("branch_b.0", "branch_b.1")},
                       {"bn_top": "called from the model's forward, which cannot be traced"}),
    "ShapeBranchNet": ({("conv", "bn"), ("fc", "bn_fc")}, {"bn_shared": "the output of conv_shared also feeds add"}),
    "SubclassNet": ({("conv1", "bn1"), ("conv2", "bn2"), ("conv_f", "F.batch_norm@f_running_mean")},
                    {"bn_ws": "_WeightStdConv overrides forward", "bn_nostats": "no running statistics (track_running_stats=False)"}),
}
TRACER = {"ControlFlowNet": "torch.fx (per submodule)", "ShapeBranchNet": "torch.export"}


def test_zoo_is_covered_by_expectations() -> None:
    assert set(EXPECTED) == set(zoo.ZOO)


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_folded_outputs_match_the_original(name: str) -> None:
    model, x, result, _ = folded_zoo(name)
    reference = run(model, x)
    folded = run(result.model, x)
    assert not result.model.training
    assert rel_diff(reference, folded) <= REL_TOL, name
    # A second, unseen input: folding must not depend on the example it was traced with.
    x2 = torch.randn_like(x) * 3 + 1
    assert rel_diff(run(model, x2), run(result.model, x2)) <= REL_TOL


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_every_batchnorm_is_folded_or_skipped_with_its_reason(name: str) -> None:
    model, x, result, _ = folded_zoo(name)
    pairs, skipped = EXPECTED[name]
    folded_bns = [bn for _, bn in result.folded]
    skipped_bns = [bn for bn, _ in result.skipped]
    assert len(set(folded_bns)) == len(folded_bns) and not set(folded_bns) & set(skipped_bns)
    assert bn_module_names(model) <= set(folded_bns) | set(skipped_bns)
    if pairs is None:
        assert not result.skipped and set(folded_bns) == bn_module_names(model)
        for layer, bn in result.folded:
            conv = model.get_submodule(layer)
            assert isinstance(conv, nn.Conv2d) and conv.out_channels == model.get_submodule(bn).num_features
    else:
        assert set(result.folded) == pairs
    reasons = dict(result.skipped)
    assert set(reasons) == set(skipped)
    for bn, fragment in skipped.items():
        assert fragment in reasons[bn], (bn, reasons[bn])
        assert "\n" not in reasons[bn]
    assert result.tracer == TRACER.get(name, "torch.fx")


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_only_the_skipped_batchnorms_still_run(name: str) -> None:
    """PyTorch's dispatcher, not our bookkeeping, says how many batch norms the folded model executes."""
    model, x, result, _ = folded_zoo(name)
    assert executed_batch_norms(model, x) == len(result.folded) + len(result.skipped) - _never_called(name)
    assert executed_batch_norms(result.model, x) == len(result.skipped)


def _never_called(name: str) -> int:
    return 1 if name == "ControlFlowNet" else 0  # only one of branch_a / branch_b runs


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_input_model_is_never_modified(name: str) -> None:
    model, _, result, before = folded_zoo(name)
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert result.model is not model
    assert bn_module_names(model) == bn_module_names(zoo.ZOO[name][0]())


def test_training_mode_of_the_input_is_kept() -> None:
    model, x = zoo.build("MLPBothSides")
    model.train()
    means = model.bn1.running_mean.clone()
    result = fold_model(model, x)
    assert model.training and model.bn1.training and torch.equal(model.bn1.running_mean, means)
    assert not result.model.training


# --------------------------------------------------------------------------- beside torch.fx's fuse

FX_FUSE_CORRECT = ["ResNet18Style", "MobileNetV2Style", "Conv3dNet", "ConvTransposeDecoder", "MLPBothSides",
                   "BNBeforePaddedConv"]


def _fx_fused(model: nn.Module) -> tuple[nn.Module, int]:
    fused = fx_fuse(copy.deepcopy(model))
    left = sum(1 for n in fused.graph.nodes if n.op == "call_module" and isinstance(fused.get_submodule(n.target), _BatchNorm))
    return fused, len(bn_module_names(model)) - left


@pytest.mark.parametrize("name", FX_FUSE_CORRECT)
def test_we_fold_at_least_what_fx_fuse_folds(name: str) -> None:
    model, x, result, _ = folded_zoo(name)
    fused, fx_count = _fx_fused(model)
    assert rel_diff(run(model, x), run(fused, x)) <= REL_TOL  # fx is right on these ...
    assert len(result.folded) >= fx_count  # ... and we fold at least as many
    if name in ("ResNet18Style", "MobileNetV2Style"):
        assert len(result.folded) == fx_count


@pytest.mark.torch_behaviour
def test_fx_fuse_misses_what_we_fold() -> None:
    counts = {name: (_fx_fused(folded_zoo(name)[0])[1], len(folded_zoo(name)[2].folded))
              for name in ("Conv3dNet", "ConvTransposeDecoder", "MLPBothSides", "BNBeforePaddedConv")}
    assert all(ours >= theirs for theirs, ours in counts.values()), counts  # bnstrip's part: never fewer
    if not all(ours > theirs for theirs, ours in counts.values()):
        pytest.skip(f"torch's fx fuse now folds as many as we do here: {counts}")


@pytest.mark.torch_behaviour
@pytest.mark.parametrize("name", ["ReusedConv", "LinearBNSequence"])
def test_fx_fuse_changes_outputs_where_we_refuse(name: str) -> None:
    model, x, result, _ = folded_zoo(name)
    assert rel_diff(run(model, x), run(result.model, x)) <= REL_TOL  # bnstrip's part: exact, and says why not
    assert result.skipped
    fused, _ = _fx_fused(model)
    if rel_diff(run(model, x), run(fused, x)) <= 1e-2:
        pytest.skip("torch's fx fuse no longer changes this model's outputs")


# --------------------------------------------------------------------------- --keep-structure


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_keep_structure_loads_strictly_into_the_original_class(name: str) -> None:
    model, x, _, _ = folded_zoo(name)
    result = fold_model(model, (x,), keep_structure=True)
    fresh = zoo.ZOO[name][0]().eval()
    fresh.load_state_dict(result.model.state_dict(), strict=True)
    assert rel_diff(run(model, x), run(fresh, x)) <= REL_TOL
    assert result.form == "keep-structure" and result.folded


def test_keep_structure_batchnorm_is_an_exact_identity_plus_bias() -> None:
    model, x = zoo.build("ResNet18Style")
    result = fold_model(model, (x,), keep_structure=True)
    bn = result.model.layers[0].bn1
    assert torch.equal(bn.running_mean, torch.zeros(8)) and torch.equal(bn.weight.detach(), torch.ones(8))
    t = torch.randn(2, 8, 5, 5)
    assert torch.equal(run(bn, t), t + bn.bias.detach().view(1, -1, 1, 1))  # x * 1 + bias, bit for bit
    assert result.model.layers[0].conv1.bias is None  # the class's layout is kept: no bias added


def test_keep_structure_refuses_consumer_folds_without_a_bias_slot() -> None:
    model, x, _, _ = folded_zoo("MLPBothSides")
    result = fold_model(model, (x,), keep_structure=True)
    assert "keep_structure=True: the next layer fc2 has no bias" in dict(result.skipped)["bn_mid"]


# --------------------------------------------------------------------------- single patterns


class ConvBN(nn.Module):
    def __init__(self, conv: nn.Module, bn: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def _with_stats(model: nn.Module) -> nn.Module:
    return zoo.randomize_bn(model, seed=3).eval()


def test_conv_then_two_batchnorms_fold_into_the_conv() -> None:
    model = _with_stats(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)))
    result = fold_model(model)  # Conv2d + BatchNorm2d needs no example inputs: the rank is fixed
    assert result.folded == [("0", "1"), ("0", "2")] and not result.skipped
    x = torch.randn(2, 3, 6, 6)
    assert rel_diff(run(model, x), run(result.model, x)) <= REL_TOL


def test_an_op_between_blocks_the_fold() -> None:
    model = _with_stats(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.ReLU()))
    result = fold_model(model)
    assert not result.folded
    assert "its input comes from 1 (ReLU), not directly from a Conv" in dict(result.skipped)["2"]


def test_sequence_shapes_need_example_inputs() -> None:
    model = _with_stats(nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Conv1d(6, 6, 1), nn.BatchNorm1d(6)))
    blind = fold_model(model)
    assert not blind.folded
    assert all("pass example inputs" in reason for _, reason in blind.skipped)
    model2 = _with_stats(nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6)))
    x = torch.randn(4, 5)
    seen = fold_model(model2, x)
    assert seen.folded == [("0", "1")]
    assert rel_diff(run(model2, x), run(seen.model, x)) <= REL_TOL


def test_batchnorm_called_twice_is_refused() -> None:
    class SharedBN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv_a, self.conv_b, self.bn = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv_a(x)) + self.bn(self.conv_b(x))

    model = _with_stats(SharedBN())
    result = fold_model(model)
    assert not result.folded
    assert dict(result.skipped)["bn"].startswith("it is called 2 times, so folding would change every call")
    x = torch.randn(2, 3, 5, 5)
    assert rel_diff(run(model, x), run(result.model, x)) <= REL_TOL


def test_batchnorm_before_conv_transpose_is_refused() -> None:
    model = _with_stats(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 2, 3)))
    result = fold_model(model)
    assert "border outputs sum fewer taps" in dict(result.skipped)["1"]


def test_module_registered_under_two_names_is_refused() -> None:
    class Aliased(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)
            self.same_conv = self.conv

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x))

    result = fold_model(_with_stats(Aliased()))
    assert not result.folded
    assert "registered as conv and same_conv" in dict(result.skipped)["bn"]


def test_functional_batch_norm_in_training_mode_is_refused() -> None:
    class TrainingBN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.register_buffer("rm", torch.zeros(4))
            self.register_buffer("rv", torch.ones(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.batch_norm(self.conv(x), self.rm, self.rv, training=True)

    result = fold_model(TrainingBN().eval(), torch.randn(2, 3, 4, 4))
    assert not result.folded
    assert "training=True" in dict(result.skipped)["F.batch_norm@rm"]


def test_module_also_called_from_untraceable_code_is_refused() -> None:
    class DirectCall(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.block(x)
            if y.mean() > 0:  # data-dependent, and the conv is called again outside block
                return y + self.block[0](x)
            return y - self.block[0](x)

    model = _with_stats(DirectCall())
    x = torch.randn(2, 3, 5, 5)
    result = fold_model(model, x)
    assert not result.folded
    assert "runs 2 times but block only 1 times" in dict(result.skipped)["block.1"]
    assert rel_diff(run(model, x), run(result.model, x)) <= REL_TOL


class _ScaledBN(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class _Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:  # data-dependent: only this block is untraceable
            return self.bn(self.conv(x))
        return -x


class _Outer(nn.Module):
    def __init__(self, middle: nn.Module) -> None:
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.middle = middle
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv1(self.middle(self.bn0(self.conv0(x)))))


def test_batchnorm_subclass_with_its_own_forward_is_kept_and_the_rest_folds() -> None:
    model = _with_stats(_Outer(nn.Sequential(nn.Conv2d(4, 4, 1), _ScaledBN(4))))
    x = torch.randn(2, 3, 6, 6)
    result = fold_model(model, x)  # fx fails inside _ScaledBN; torch.export traces it
    assert result.tracer == "torch.export"
    assert set(result.folded) == {("conv0", "bn0"), ("conv1", "bn1")}
    assert "_ScaledBN overrides forward" in dict(result.skipped)["middle.1"]
    assert rel_diff(run(model, x), run(result.model, x)) <= REL_TOL


def test_untraceable_block_is_made_opaque_and_everything_around_it_folds() -> None:
    model = _with_stats(_Outer(_Gate()))
    x = torch.randn(2, 3, 6, 6)
    result = fold_model(model, x)
    assert result.tracer == "torch.fx (per submodule)"
    assert set(result.folded) == {("conv0", "bn0"), ("conv1", "bn1")}
    assert "called from middle's forward, which cannot be traced: torch.fx: TraceError" in dict(result.skipped)["middle.bn"]
    for probe in (x, -x - 5):
        assert rel_diff(run(model, probe), run(result.model, probe)) <= REL_TOL


def test_untraceable_model_without_example_inputs_skips_everything_with_the_fix() -> None:
    model, _ = zoo.build("ShapeBranchNet")
    result = fold_model(model)
    assert not result.folded and result.tracer == "none"
    assert len(result.skipped) == 3
    assert all("pass example inputs (example_inputs)" in reason for _, reason in result.skipped)


def test_eps_override_is_used_for_the_fold() -> None:
    model = _with_stats(ConvBN(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    x = torch.randn(2, 3, 6, 6)
    reference = copy.deepcopy(model)
    reference.bn.eps = 1e-1
    result = fold_model(model, eps=1e-1)
    assert rel_diff(run(reference, x), run(result.model, x)) <= REL_TOL
    assert rel_diff(run(model, x), run(result.model, x)) > 1e-3  # the override really changed the fold
    assert model.bn.eps == 1e-5


def test_half_precision_overflow_is_refused_unless_allowed() -> None:
    model = ConvBN(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        model.bn.running_var.fill_(1e-12)
        model.bn.weight.fill_(1e3)
        model.conv.weight.fill_(1.0)
    model = model.half()
    with pytest.raises(InputError, match="conv: folded weight overflows float16"):
        fold_model(model)
    result = fold_model(model, allow_overflow=True)
    assert any("overflows float16" in w for w in result.warnings)


# --------------------------------------------------------------------------- second uses the graph does not show


class _TiedConvs(nn.Module):
    """conv_b holds conv_a's weight Parameter: scaling it for bn would change conv_b's output too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a, self.conv_b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.conv_b.weight = self.conv_a.weight
        self.bn = nn.BatchNorm2d(4)
        self.conv_c, self.bn_c = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_c(self.conv_c(self.bn(self.conv_a(x)) + self.conv_b(x)))


class _TiedHead(nn.Module):
    """A head tied to the embedding (weight tying) behind a BatchNorm that could fold into the head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.bn, self.head = nn.Embedding(10, 6), nn.BatchNorm1d(6), nn.Linear(6, 10)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.embed(tokens)))


class _StatsView(nn.Module):
    """bn's running_var is a view of a buffer the forward also reads: an identity BatchNorm would rewrite it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.register_buffer("stats", torch.rand(8) + 0.5)
        self.bn.running_var = self.stats[:4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) * self.stats.sum()


@pytest.mark.parametrize("build, x, keep_structure", [
    (_TiedConvs, torch.randn(2, 3, 5, 5), False),
    (_TiedHead, torch.randint(0, 10, (8,)), False),
    (_StatsView, torch.randn(2, 3, 5, 5), True),
])
def test_tied_weights_are_never_folded(build, x: torch.Tensor, keep_structure: bool) -> None:
    model = build()
    zoo.randomize_bn(model, seed=3)
    if isinstance(model, _StatsView):
        with torch.no_grad():
            model.stats.uniform_(0.5, 2.0)
    model.eval()
    result = fold_model(model, x, keep_structure=keep_structure)
    assert "shares memory with" in dict(result.skipped)["bn"]
    assert ("conv_c", "bn_c") in result.folded or not hasattr(model, "conv_c")
    assert rel_diff(run(model, x), run(result.model, x)) <= REL_TOL


class _Reader(nn.Module):
    """block (conv, bn) -> tail (conv, bn), scaled by something `read` takes from block's modules."""

    def __init__(self, read) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        self.tail = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))  # zero-padded: no consumer fold
        self.read = read

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.block(x)) * self.read(self)


class _UntraceableReader(_Reader):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        if y.sum() > -1e9:  # data-dependent: fx and torch.export give up, block and tail are traced on their own
            y = y * self.read(self)
        return self.tail(y)


@pytest.mark.parametrize("cls, read, fragment", [
    (_Reader, lambda m: m.block[0].weight.sum(), "its weight is also read directly in forward"),
    (_Reader, lambda m: m.block[1].running_var.mean(), "its running_var is also read directly in forward"),
    (_Reader, lambda m: m.block[1].weight.abs().sum(), "its weight is also read directly in forward"),
    (_UntraceableReader, lambda m: m.block[1].running_var.mean(), "its running_var is also read by the model's forward"),
    (_UntraceableReader, lambda m: m.block[0].weight.sum(), "its weight is also read by the model's forward"),
])
@pytest.mark.parametrize("keep_structure", [False, True])
def test_tensors_read_outside_their_module_block_the_fold(cls, read, fragment: str, keep_structure: bool) -> None:
    model = _with_stats(cls(read))
    x = torch.randn(2, 3, 5, 5)
    result = fold_model(model, x, keep_structure=keep_structure)
    assert fragment in dict(result.skipped)["block.1"]
    assert result.folded == [("tail.0", "tail.1")]
    assert rel_diff(run(model, x), run(result.model, x)) <= REL_TOL


def test_reading_only_a_layers_dtype_or_shape_does_not_block_its_fold() -> None:
    model = _with_stats(_Reader(lambda m: m.block[0].weight.shape[1] + m.block[0].weight.size(0)))  # 3 + 4
    x = torch.randn(2, 3, 5, 5)
    result = fold_model(model, x)
    assert set(result.folded) == {("block.0", "block.1"), ("tail.0", "tail.1")}
    assert rel_diff(run(model, x), run(result.model, x)) <= REL_TOL


class _TensorCheck(nn.Module):
    """fx's proxies are not torch.Tensor, so fx traces the else-branch: a graph in which conv's output has one user."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y = self.bn(y) + y if isinstance(y, torch.Tensor) else self.bn(y)
        return self.bn2(self.conv2(y))


class _Wrapped(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) if x.sum() > -1e9 else x  # data-dependent: only inner can be traced


@pytest.mark.parametrize("wrap, tracer, prefix", [
    (lambda m: m, "torch.export", ""), (_Wrapped, "torch.fx (per submodule)", "inner.")])
def test_a_traced_graph_that_differs_from_the_forward_is_not_trusted(wrap, tracer: str, prefix: str) -> None:
    model = _with_stats(wrap(_TensorCheck()))
    x = torch.randn(2, 3, 5, 5)
    result = fold_model(model, x)
    assert result.tracer == tracer
    assert prefix + "bn" in dict(result.skipped)
    assert rel_diff(run(model, x), run(result.model, x)) <= REL_TOL
    if tracer == "torch.export":  # torch.export sees the real branch: conv feeds bn and add; conv2 + bn2 folds
        assert result.folded == [("conv2", "bn2")]
        assert "the output of conv also feeds add" in dict(result.skipped)["bn"]


def test_outputs_in_dataclasses_and_namedtuples_keep_the_fx_graph() -> None:
    import collections
    import dataclasses

    @dataclasses.dataclass
    class Out:
        pooled: torch.Tensor
        rest: Any

    Pair = collections.namedtuple("Pair", "a b")

    class Structured(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> Out:
            y = self.bn(self.conv(x))
            return Out(y.mean((2, 3)), Pair(y, {"scaled": y * 2, "k": 3}))

    model = _with_stats(Structured())
    x = torch.randn(2, 3, 4, 4)
    result = fold_model(model, x)
    assert result.tracer == "torch.fx" and result.folded == [("conv", "bn")]
    expected, got = run(model, x), run(result.model, x)
    assert rel_diff(expected.rest.b["scaled"], got.rest.b["scaled"]) <= REL_TOL


def test_global_module_hooks_block_every_fold() -> None:
    model = _with_stats(ConvBN(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    x = torch.randn(2, 3, 4, 4)
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: out * 1.5 if isinstance(module, _BatchNorm) else out)
    try:
        result = fold_model(model, x)
        assert not result.folded and "global module hooks are registered" in dict(result.skipped)["bn"]
        assert rel_diff(run(model, x), run(result.model, x)) <= REL_TOL
    finally:
        handle.remove()


class _FunctionalBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.register_buffer("f_running_mean", torch.zeros(4))
        self.register_buffer("f_running_var", torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(self.conv(x), self.f_running_mean, self.f_running_var, training=False)


@pytest.mark.parametrize("with_inputs", [False, True])
def test_hooks_on_the_model_itself_survive_a_functional_fold(with_inputs: bool) -> None:
    """Removing F.batch_norm needs an fx GraphModule, which does not carry the root's hooks."""
    model = _with_stats(_FunctionalBN())
    model.register_forward_hook(lambda module, args, out: out * 2)
    x = torch.randn(2, 3, 4, 4)
    result = fold_model(model, x if with_inputs else None)
    assert not result.folded
    assert rel_diff(run(model, x), run(result.model, x)) <= REL_TOL
    assert "has forward hooks" in dict(result.skipped)["F.batch_norm@f_running_mean"]
    if with_inputs:  # the user's class keeps its hooks, so --keep-structure folds it
        kept = fold_model(model, x, keep_structure=True)
        assert kept.folded == [("conv", "F.batch_norm@f_running_mean")] and kept.tracer == "torch.fx"
        assert rel_diff(run(model, x), run(kept.model, x)) <= REL_TOL


def test_a_folded_batchnorm_still_answers_its_settings() -> None:
    class UsesNumFeatures(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x)).reshape(x.shape[0], self.bn.num_features, -1)

    model = _with_stats(UsesNumFeatures())
    x = torch.randn(2, 3, 4, 4)
    result = fold_model(model, x)
    assert result.folded == [("conv", "bn")]
    assert result.model.bn.num_features == 4 and not list(result.model.bn.parameters())
    assert rel_diff(run(model, x), run(result.model, x)) <= REL_TOL


def test_torchscript_is_refused_or_reported() -> None:
    scripted = torch.jit.script(_with_stats(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))))
    with pytest.raises(InputError, match="TorchScript module .* fold the nn.Module before scripting"):
        fold_model(scripted, torch.randn(2, 3, 4, 4))
    model = _with_stats(nn.Sequential(copy.deepcopy(scripted), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
    x = torch.randn(2, 3, 4, 4)
    for example in (x, None):
        result = fold_model(model, example)
        assert result.folded == [("1", "2")]
        assert "TorchScript" in dict(result.skipped)["0.1"]
        assert rel_diff(run(model, x), run(result.model, x)) <= REL_TOL


def test_a_lazy_model_that_never_ran_is_refused_with_the_fix() -> None:
    with pytest.raises(InputError, match="lazy module that was never run.*run the model once"):
        fold_model(nn.Sequential(nn.LazyConv2d(4, 1), nn.BatchNorm2d(4)), torch.randn(1, 3, 4, 4))


def test_degenerate_statistics_skip_that_batchnorm_only() -> None:
    model = _with_stats(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1),
                                      nn.BatchNorm2d(4, eps=1.5)))
    with torch.no_grad():
        model[1].running_var[0] = -1.0  # corrupt: one BatchNorm, not the whole model
    result = fold_model(model)
    assert result.folded == [("2", "3")]
    assert "running_var has negative values" in dict(result.skipped)["1"]
    kept = fold_model(model, keep_structure=True)
    assert not kept.folded and "eps=1.5 is not in [0, 1)" in dict(kept.skipped)["3"]


class _TwoLayouts(nn.Module):
    """block runs on (N, L, C) first, then on (N, C): Linear + BatchNorm1d is exact only for the second."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = self.block(x)
        if seq.sum() > -1e9:  # data-dependent: only block is traced, its BatchNorm rank comes from the run
            return seq.mean(-1) + self.block(x.mean(1))
        return seq.mean(-1)


def test_a_block_run_on_two_layouts_is_not_folded_for_either() -> None:
    model = _with_stats(_TwoLayouts())
    x = torch.randn(3, 4, 4)
    result = fold_model(model, x)
    assert not result.folded and "block.1" in dict(result.skipped)
    assert rel_diff(run(model, x), run(result.model, x)) <= REL_TOL


def test_export_folds_a_batchnorm_into_a_reflect_padded_conv() -> None:
    class ShapeGate(nn.Module):  # control flow on a shape: only torch.export traces it
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(3)
            self.conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(self.bn(x)) if x.shape[-1] > 2 else x

    model = _with_stats(ShapeGate())
    x = torch.randn(2, 3, 6, 6)
    result = fold_model(model, x)
    assert result.tracer == "torch.export" and result.folded == [("conv", "bn")]
    assert result.into["bn"] == "consumer"
    assert rel_diff(run(model, x), run(result.model, x)) <= REL_TOL


class _WritesBatchNormInput(nn.Module):
    """pre -> x; bn(x) feeds a 1x1 conv, and x is then changed in place before that conv runs.

    With the BatchNorm gone its output would be x itself, so the conv would read the changed x.
    """

    def __init__(self, how: str) -> None:
        super().__init__()
        self.pre, self.bn, self.conv = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)
        self.act = nn.ReLU(inplace=True)
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pre(x)
        x = y[:, :4] if self.how == "slice" else y[:, :4] * 1.0
        z = self.bn(x)
        if self.how == "iadd":
            x += 1  # fx records this as an out-of-place add: only a real run shows it
        elif self.how == "view":
            x.view(-1).mul_(2)
        elif self.how == "module":
            self.act(x)
        elif self.how == "slice":
            y.mul_(-1)  # writes the tensor x is a view of
        return self.conv(z) + x


@pytest.mark.parametrize("how", ["iadd", "view", "module", "slice"])
@pytest.mark.parametrize("with_inputs", [True, False])
def test_an_in_place_write_to_the_batchnorm_input_blocks_folding_into_the_next_layer(how: str,
                                                                                   with_inputs: bool) -> None:
    model = _with_stats(_WritesBatchNormInput(how))
    x = torch.randn(2, 3, 4, 4)
    result = fold_model(model, x if with_inputs else None)
    assert not result.folded
    assert "IN_PLACE_WRITE" in refusal(dict(result.skipped)["bn"]).causes  # whichever way it was seen
    assert rel_diff(run(model, x), run(result.model, x)) <= REL_TOL
    kept = fold_model(model, x if with_inputs else None, keep_structure=True)  # the BatchNorm stays a real op
    assert kept.folded == [("conv", "bn")]
    assert rel_diff(run(model, x), run(kept.model, x)) <= REL_TOL


class _AsksForBatchNorm(nn.Module):
    """Code that behaves differently once its BatchNorm is gone: no rule can see this, the final check does."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        self.second = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.second(self.first(x))
        return y * 2 if isinstance(self.second[1], nn.BatchNorm2d) else y


def test_a_fold_that_moves_the_outputs_is_found_and_undone() -> None:
    model = _with_stats(_AsksForBatchNorm())
    x = torch.randn(2, 3, 4, 4)
    result = fold_model(model, x)
    assert result.folded == [("first.0", "first.1")]
    assert "the fold was undone" in dict(result.skipped)["second.1"]
    assert rel_diff(run(model, x), run(result.model, x)) <= REL_TOL
    kept = fold_model(model, x, keep_structure=True)  # the BatchNorm module stays: both fold
    assert len(kept.folded) == 2 and rel_diff(run(model, x), run(kept.model, x)) <= REL_TOL


def test_bisection_traces_the_model_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Undoing a fold plans again on a copy of the first trace: the model is traced once, whatever the retries."""
    import bnstrip.fold.model as fold_module

    traces = []
    real = fold_module.build_graph
    monkeypatch.setattr(fold_module, "build_graph", lambda *a: traces.append(1) or real(*a))
    model = _with_stats(_AsksForBatchNorm())
    x = torch.randn(2, 3, 4, 4)
    result = fold_model(model, x)
    assert "the fold was undone" in dict(result.skipped)["second.1"]
    assert result.folded == [("first.0", "first.1")] and len(traces) == 1
    assert rel_diff(run(model, x), run(result.model, x)) <= REL_TOL


class _TrainingBNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


def test_batchnorm_left_in_training_mode_is_skipped_and_the_model_as_given_kept() -> None:
    model = _TrainingBNNet().eval()
    for bn in (model.bn1, model.bn2):
        bn.running_mean.uniform_(-2, 2)
        bn.running_var.uniform_(0.5, 3)
    model.bn2.train()  # left in training mode inside an eval model
    x = torch.randn(4, 3, 6, 6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = fold_model(model, x)
    assert result.folded == [("conv1", "bn1")]
    assert "training mode" in dict(result.skipped)["bn2"]
    assert result.model.bn2.training and not result.model.bn1.training
    for key in ("bn2.running_mean", "bn2.running_var", "bn2.num_batches_tracked"):
        assert torch.equal(result.model.state_dict()[key], before[key])  # the check's runs left no trace
    with torch.no_grad():
        expected = copy.deepcopy(model)(x)
        assert torch.allclose(expected, result.model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["ResNet18Style", "MobileNetV2Style", "MLPBothSides", "SubclassNet"])
def test_the_fold_set_does_not_depend_on_the_input_distribution(name: str) -> None:
    cls, shape = zoo.ZOO[name]
    torch.manual_seed(0)
    model = cls().eval()
    gen = torch.Generator().manual_seed(5)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 4 + 0.1)
    with_randn = fold_model(model, torch.randn(shape, generator=gen))
    with_uniform = fold_model(model, torch.rand(shape, generator=gen))
    assert sorted(with_randn.folded) == sorted(with_uniform.folded)
    assert sorted(with_randn.skipped) == sorted(with_uniform.skipped)


class _UnregisteredBNAct(nn.BatchNorm2d):
    """A BatchNorm subclass with its own forward (F.batch_norm, then ReLU) that no registry entry names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(torch.nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight,
                                                         self.bias, False, 0.0, self.eps))


def test_a_batchnorm_subclass_calling_f_batch_norm_is_named_once() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(3, 8, 3), _UnregisteredBNAct(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b1(self.c1(x))

    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        model.b1.running_mean.normal_()
        model.b1.running_var.uniform_(0.5, 2.0)
    result = fold_model(model, (torch.randn(2, 3, 8, 8),))
    names = [bn for _, bn in result.folded] + [bn for bn, _ in result.skipped]
    assert names == ["b1"], (result.folded, result.skipped)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(result.model(x), model(x), atol=1e-5)


# --------------------------------------------------------------------------- FoldOptions


def test_fold_options_is_the_same_fold_as_the_keywords() -> None:
    from bnstrip import FoldOptions

    model, x = zoo.build("Conv1dNet")
    by_keywords = fold_model(model, (x,), eps=1e-3, keep_structure=True)
    by_options = fold_model(model, (x,), options=FoldOptions(eps=1e-3, keep_structure=True))
    assert by_options.folded == by_keywords.folded and by_options.form == by_keywords.form == "keep-structure"
    assert by_options.eps == 1e-3
    for a, b in zip(by_keywords.model.state_dict().values(), by_options.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_fold_options_are_frozen_and_not_mixed_with_keywords() -> None:
    import dataclasses

    from bnstrip import FoldOptions

    options = FoldOptions(allow_overflow=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.eps = 1.0  # type: ignore[misc]
    model, x = zoo.build("Conv1dNet")
    with pytest.raises(InputError, match="either as options"):
        fold_model(model, (x,), eps=1e-3, options=options)
    with pytest.raises(InputError, match="cannot go with keep_structure"):
        fold_model(model, (x,), options=FoldOptions(keep_structure=True, reparameterize=True))

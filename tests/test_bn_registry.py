"""BatchNorm look-alikes (bnstrip/trace/bn_registry.py): timm's BatchNormAct2d and torchvision's FrozenBatchNorm2d,
replicated here (no timm/torchvision), folded and compared with the unfolded model as ground truth."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnstrip.fold.model import fold_model
from bnstrip.trace.bn_registry import (FoldedBatchNormTail, batchnorm_entry, children_after, register_batchnorm,
                                       unregister_batchnorm)


def _assert(condition: bool, message: str) -> None:
    assert condition, message


class BatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.norm_act.BatchNormAct2d, reduced: normalise (PyTorch's code copied), then drop, then act."""

    def __init__(self, num_features: int, act: nn.Module | None = None) -> None:
        super().__init__(num_features)
        self.drop = nn.Identity()
        self.act = act if act is not None else nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        bn_training = True if self.training else (self.running_mean is None) and (self.running_var is None)
        x = F.batch_norm(x, self.running_mean if not self.training or self.track_running_stats else None,
                         self.running_var if not self.training or self.track_running_stats else None,
                         self.weight, self.bias, bn_training, 0.0 if self.momentum is None else self.momentum, self.eps)
        return self.act(self.drop(x))


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d: buffers only, not a _BatchNorm."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight.reshape(1, -1, 1, 1), self.bias.reshape(1, -1, 1, 1)
        rv, rm = self.running_var.reshape(1, -1, 1, 1), self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        return x * scale + (b - rm * scale)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = BatchNormAct2d(6, nn.PReLU(6))
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1)
        self.bn2 = FrozenBatchNorm2d(5)
        self.conv3 = nn.Conv2d(5, 4, 1)
        self.bn3 = BatchNormAct2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn3(self.conv3(torch.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))))


def _randomise(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(3)
    for module in model.modules():
        if hasattr(module, "running_var") and isinstance(module.running_var, torch.Tensor):
            n = module.running_var.numel()
            module.running_mean.copy_(torch.randn(n, generator=gen))
            module.running_var.copy_(torch.rand(n, generator=gen) + 0.3)
            module.weight.data.copy_(torch.randn(n, generator=gen))
            module.bias.data.copy_(torch.randn(n, generator=gen))
    return model.eval()


@pytest.fixture()
def registered():
    register_batchnorm(BatchNormAct2d, post=children_after("drop", "act"))
    register_batchnorm(f"{__name__}.FrozenBatchNorm2d")  # by qualified name, as the built-in entries
    yield
    unregister_batchnorm(BatchNormAct2d)
    unregister_batchnorm(f"{__name__}.FrozenBatchNorm2d")


def test_lookalikes_fold_into_their_producer_and_keep_what_follows(registered) -> None:
    model = _randomise(Net())
    x = torch.randn(2, 3, 8, 8)
    result = fold_model(model, x)
    assert sorted(result.folded) == [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]
    assert result.skipped == []
    folded = result.model
    assert isinstance(folded.bn1, FoldedBatchNormTail) and folded.bn1.act is not model.bn1.act
    assert "bn1.act.weight" in folded.state_dict()  # the PReLU keeps its key
    assert not any(k.startswith("bn2.") for k in folded.state_dict())
    with torch.no_grad():
        expected, got = model(x), folded(x)
        x2 = torch.rand(3, 3, 8, 8) * 4 - 2
        assert torch.allclose(model(x2), folded(x2), rtol=1e-4, atol=1e-4)
    assert torch.allclose(expected, got, rtol=1e-4, atol=1e-4)
    assert expected.min() >= 0  # bn3's ReLU still runs after the fold


def test_keep_structure_keeps_the_lookalike_modules_exactly(registered) -> None:
    model = _randomise(Net())
    x = torch.randn(2, 3, 8, 8)
    result = fold_model(model, x, keep_structure=True)
    assert len(result.folded) == 3 and result.form == "keep-structure"
    assert type(result.model.bn1) is BatchNormAct2d and type(result.model.bn2) is FrozenBatchNorm2d
    with torch.no_grad():
        assert torch.allclose(model(x), result.model(x), rtol=1e-4, atol=1e-4)


def test_unregistered_subclass_is_refused_once_with_the_way_to_register_it() -> None:
    model = _randomise(Net())
    result = fold_model(model, torch.randn(2, 3, 8, 8))
    names = [bn for _, bn in result.folded] + [bn for bn, _ in result.skipped]
    assert sorted(names) == ["bn1", "bn3"]  # each exactly once; bn2 is no BatchNorm to bnstrip unregistered
    reasons = dict(result.skipped)
    assert "register_batchnorm" in reasons["bn1"]


def test_a_batchnorm_act_cannot_move_into_the_next_layer(registered) -> None:
    model = nn.Sequential(nn.ReLU(), BatchNormAct2d(3), nn.Conv2d(3, 3, 1))
    result = fold_model(_randomise(model), torch.randn(2, 3, 4, 4))
    assert result.folded == [] and "applies more after normalising" in dict(result.skipped)["1"]


def test_a_batchnorm_act_before_a_classifier_head_is_not_moved_into_it(registered) -> None:
    # densenet121's norm5, resnetv2's norm: BatchNormAct2d -> global average -> Linear. The activation sits
    # between the normalisation and the head, so no rule may offer this fold (before, one did and the real-run
    # check had to undo it with "please report this model").
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.norm, self.fc = nn.ReLU(), BatchNormAct2d(3), nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.norm(self.stem(x)).mean((2, 3)))

    result = fold_model(_randomise(Head().eval()), torch.randn(2, 3, 4, 4))
    reason = dict(result.skipped)["norm"]
    assert result.folded == [] and "applies more after normalising" in reason and "undone" not in reason


def test_registry_matches_the_exact_class_only(registered) -> None:
    class Sub(FrozenBatchNorm2d):
        pass

    assert batchnorm_entry(FrozenBatchNorm2d(2)) is not None and batchnorm_entry(Sub(2)) is None
    assert batchnorm_entry(nn.BatchNorm1d(2)) is not None and batchnorm_entry(nn.ReLU()) is None
    with pytest.raises(ValueError):
        register_batchnorm("NoDots")


def test_wrong_registry_entry_is_caught_by_the_real_run_check() -> None:
    """An entry that claims nothing follows the normalisation when an activation does: the check undoes it."""
    register_batchnorm(BatchNormAct2d)  # post=None: wrong for this class
    try:
        model = _randomise(nn.Sequential(nn.Conv2d(3, 4, 1), BatchNormAct2d(4)))
        x = torch.randn(2, 3, 4, 4)
        result = fold_model(model, x)
        assert result.folded == [] and "undone" in dict(result.skipped)["1"]
        with torch.no_grad():
            assert torch.allclose(model(x), result.model(x))
    finally:
        unregister_batchnorm(BatchNormAct2d)


def test_a_copy_of_the_model_is_folded(registered) -> None:
    model = _randomise(Net())
    before = copy.deepcopy(model.state_dict())
    fold_model(model, torch.randn(2, 3, 8, 8))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class ShapeBranchNet(Net):
    """Net with Python control flow on a shape: fx cannot trace it, torch.export can."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 1000:
            x = -x
        return super().forward(x)


def test_lookalikes_fold_through_the_torch_export_fallback(registered) -> None:
    model = _randomise(ShapeBranchNet())
    x = torch.randn(2, 3, 8, 8)
    result = fold_model(model, x)
    assert result.tracer == "torch.export"
    assert sorted(result.folded) == [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")] and not result.skipped
    with torch.no_grad():
        assert torch.allclose(model(x), result.model(x), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- trust by class object (issue 17 item 9)


class ThresholdBatchNormAct2d(nn.BatchNorm2d):
    """Claims to be timm's BatchNormAct2d but normalises only where |x| <= 20 (elsewhere it passes x through)."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        self.drop = nn.Identity()
        self.act = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normalised = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return torch.where(x.abs() <= 20, normalised, x)


def _claiming_timms_name() -> type:
    """A fresh subclass whose qualified name is timm's: timm.layers.norm_act.BatchNormAct2d."""
    return type("BatchNormAct2d", (ThresholdBatchNormAct2d,), {"__module__": "timm.layers.norm_act",
                                                                "__qualname__": "BatchNormAct2d"})


@pytest.mark.parametrize("how", ["__module__ renamed", "module planted in sys.modules"])
def test_a_class_claiming_timms_name_is_not_trusted(monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    import sys
    import types

    claimant = _claiming_timms_name()
    if how == "module planted in sys.modules":  # as an attacker's timm/layers/norm_act.py on sys.path would be
        fake = types.ModuleType("timm.layers.norm_act")
        fake.BatchNormAct2d = claimant
        monkeypatch.setitem(sys.modules, "timm.layers.norm_act", fake)
    model = _randomise(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), claimant(4), nn.ReLU()))
    assert batchnorm_entry(model[1]) is None
    x = torch.randn(2, 3, 8, 8)  # |x| <= 20 here: the example inputs alone cannot tell
    result = fold_model(model, x)
    assert result.folded == [] and "1" in dict(result.skipped)
    with torch.no_grad():
        big = x * 50
        assert torch.equal(model(big), result.model(big))


def test_by_name_entries_match_the_class_that_name_resolves_to() -> None:
    """A user's entry by name matches the class its module holds, and not a same-named class elsewhere."""
    register_batchnorm(f"{__name__}.FrozenBatchNorm2d")
    try:
        impostor = type("FrozenBatchNorm2d", (FrozenBatchNorm2d,), {"__module__": __name__})
        assert batchnorm_entry(FrozenBatchNorm2d(3)) is not None
        assert batchnorm_entry(impostor(3)) is None
    finally:
        unregister_batchnorm(f"{__name__}.FrozenBatchNorm2d")

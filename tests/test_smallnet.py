"""Problem 1: the committed smallNetSaved folded into smallNetTest, checked on real CIFAR-10 images."""
from __future__ import annotations

import torch
from torch import nn

from bnstrip.io.checkpoint import load_checkpoint
from bnstrip.errors import CheckFailed, InputError
from bnstrip.homework.models import SmallNetTest, SmallNetTrain
from bnstrip.homework.smallnet import fuse_smallnet
from bnstrip.homework.verify import verify_models

import pytest

from conftest import SMALLNET_SAVED


class CourseSmallNetTest(nn.Module):
    """The course's smallNetTest, written out independently of bnstrip.homework.models."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.fc1 = nn.Sequential(nn.Linear(16 * 32 * 32, 32 * 32), nn.ReLU())
        self.fc2 = nn.Sequential(nn.Linear(32 * 32, 10), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.conv1(x)).reshape(-1, 16 * 32 * 32)
        return self.fc2(self.fc1(x))


def course_reference_figure(bn_model: nn.Module, test_model: nn.Module, x: torch.Tensor, batch_size: int = 100) -> float:
    """The course's own loop: max over batches of ||out_bn - out_test||^2."""
    worst = 0.0
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            xb = x[start:start + batch_size]
            worst = max(worst, float(torch.norm(bn_model(xb) - test_model(xb)) ** 2))
    return worst


def test_committed_checkpoint_is_a_plain_smallnettrain_state_dict() -> None:
    loaded = load_checkpoint(SMALLNET_SAVED)
    assert loaded.unwrapped == []
    model = SmallNetTrain()
    model.load_state_dict(torch.load(SMALLNET_SAVED, weights_only=True), strict=True)  # the course's own call
    assert set(loaded.state_dict) == set(model.state_dict())


@pytest.mark.slow
def test_committed_checkpoint_folds_exactly_on_real_images(cifar_sample) -> None:
    state = load_checkpoint(SMALLNET_SAVED).state_dict
    result = fuse_smallnet(state)
    assert result.self_check.passed
    assert [p for p, _ in result.pairs] == ["conv1.0", "conv2.0", "fc1.0"]

    bn_model = SmallNetTrain()
    bn_model.load_state_dict(state)
    bn_model.eval()
    course_model = CourseSmallNetTest()
    course_model.load_state_dict(result.state_dict, strict=True)
    course_model.eval()

    x = torch.from_numpy(cifar_sample.images).float() / 255
    assert course_reference_figure(bn_model, course_model, x) < 1e-8
    report = verify_models(bn_model, course_model, cifar_sample.images, cifar_sample.labels, batch_size=100)
    assert report.passed and report.images == 200 and report.agreement == 1.0
    assert report.accuracy_bn > 0.4  # a trained model, not random weights (10% chance)


def test_fold_matches_pytorch_eval_model_in_float64(random_smallnet_state) -> None:
    result = fuse_smallnet(random_smallnet_state, check_samples=2)  # the comparison below is the test's own
    reference = SmallNetTrain().double()
    reference.load_state_dict(random_smallnet_state)
    folded = SmallNetTest().double()
    folded.load_state_dict({k: v.double() for k, v in result.state_dict.items()})
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        want, got = reference.eval()(x), folded.eval()(x)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))
    assert set(result.state_dict) == set(SmallNetTest().state_dict())


def test_eps_changes_the_fold(random_smallnet_state) -> None:
    a = fuse_smallnet(random_smallnet_state, eps=1e-5, check_samples=2).state_dict["fc1.0.weight"]
    b = fuse_smallnet(random_smallnet_state, eps=1e-1, check_samples=2).state_dict["fc1.0.weight"]
    assert not torch.allclose(a, b)


def test_wrong_architecture_is_refused(random_smallnet_state) -> None:
    state = dict(random_smallnet_state)
    state.pop("fc1.1.running_var")
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(InputError, match="missing fc1.1.running_var.*unexpected extra.weight"):
        fuse_smallnet(state, source="ckpt.pt")
    state = dict(random_smallnet_state)
    state["conv1.0.weight"] = torch.zeros(16, 3, 5, 5)
    with pytest.raises(InputError, match=r"conv1.0.weight has shape \(16, 3, 5, 5\)"):
        fuse_smallnet(state)


def test_never_trained_statistics_warn(random_smallnet_state) -> None:
    state = dict(random_smallnet_state)
    state["conv2.1.num_batches_tracked"] = torch.tensor(0)
    result = fuse_smallnet(state, check_samples=2)
    assert any("conv2.1" in w and "never trained" in w for w in result.warnings)


def test_self_check_failure_refuses(random_smallnet_state, monkeypatch) -> None:
    import bnstrip.homework.smallnet as smallnet

    def broken_fold(state, pairs, eps, allow_overflow=False):
        from bnstrip.core.foldmath import fold_state_dict as real

        out = real(state, pairs, eps)
        out["fc2.0.bias"] = out["fc2.0.bias"] + 1.0
        return out

    monkeypatch.setattr(smallnet, "fold_state_dict", broken_fold)
    with pytest.raises(CheckFailed, match="differs"):
        smallnet.fuse_smallnet(random_smallnet_state, check_samples=2)


@pytest.mark.slow  # a smallNet fold and self-check, twice
def test_self_check_figures_do_not_depend_on_the_thread_count(random_smallnet_state) -> None:
    """fuse's self-check runs its parts on one intra-op thread each (bnstrip.core.threads): same bits at any count."""
    before = torch.get_num_threads()
    figures = []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            check = fuse_smallnet(random_smallnet_state).self_check
            figures.append((check.max_abs_diff, check.rounding, check.tolerance))
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    assert figures[0] == figures[1] and figures[0][0] > 0


def test_the_self_check_builds_the_float64_model_only_where_the_gap_does_not_decide(random_smallnet_state,
                                                                                    monkeypatch) -> None:
    """The trained checkpoint: the folded model is within a few ulps of the original, which decides the rule, so no
    float64 model is built; random statistics (ill-conditioned): the gap does not decide, the float64 model does."""
    import bnstrip.homework.smallnet as smallnet

    built: list[int] = []
    real = smallnet._float64_model

    def counted(*args: object, **kwargs: object) -> object:
        built.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(smallnet, "_float64_model", counted)
    check = fuse_smallnet(load_checkpoint(SMALLNET_SAVED).state_dict, check_samples=2).self_check
    assert check.passed and check.implied and built == []
    check = fuse_smallnet(random_smallnet_state, check_samples=2).self_check
    assert check.passed and not check.implied and check.rounding is not None and len(built) == 1

"""The proof rule (bnstrip.core.compare, issue 18): every exact fold passes, every wrong fold fails, in every dtype.

The models (tests/proof_models.py) are one small net with four kinds of fold, in float16,
bfloat16, float32 and float64, with well-conditioned statistics and three ill-conditioned ones
(running_var around and below eps, a huge gamma cancelled by a large shift, statistics unrelated
to the data as in LeViT). The exact fold is made by hand, independently of bnstrip's rewrite; each
mutation puts one wrong fold into that otherwise exact plan.
"""
from __future__ import annotations

import pytest
import torch

from bnstrip.core.compare import PERTURBATION_FACTOR, ROUNDING_FACTOR
from bnstrip.fold.model import check_folded, fold_model
from tests.proof_models import CONDITIONINGS, DTYPES, MUTATIONS, PAIRS, exact_fold, proof_net

CASES = [pytest.param(c, d, id=f"{c}-{str(d).replace('torch.', '')}") for c in CONDITIONINGS for d in DTYPES]


@pytest.mark.parametrize("conditioning, dtype", CASES)
def test_fold_model_folds_every_batchnorm_and_undoes_none(conditioning: str, dtype: torch.dtype) -> None:
    model, x = proof_net(conditioning, dtype)
    result = fold_model(model, x)
    assert sorted(bn for _, bn in result.folded) == ["bn1", "bn2", "bn3", "bn4"], result.skipped
    assert result.check is not None and result.check.passed


@pytest.mark.parametrize("conditioning, dtype", CASES)
def test_an_exact_fold_made_elsewhere_passes(conditioning: str, dtype: torch.dtype) -> None:
    model, x = proof_net(conditioning, dtype)
    report = check_folded(model, exact_fold(model), x, PAIRS, consumers=["bn3"])
    assert report is not None and report.passed, report.describe()


@pytest.mark.parametrize("mutation", MUTATIONS)
@pytest.mark.parametrize("conditioning, dtype", CASES)
def test_each_wrong_fold_is_caught(conditioning: str, dtype: torch.dtype, mutation: str) -> None:
    model, x = proof_net(conditioning, dtype)
    report = check_folded(model, exact_fold(model, mutation), x, PAIRS, consumers=["bn3"])
    assert report is not None and not report.passed, report.describe()
    assert report.sensitivity is not None  # measured before refusing: the refusal is not for rounding alone


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_sensitivity_is_what_lets_a_float64_fold_pass(dtype: torch.dtype) -> None:
    """A fold off by a few roundings of its parameters (more than the floor) passes only through the sensitivity."""
    model, x = proof_net("random_stats", dtype)
    folded = exact_fold(model)
    with torch.no_grad():  # the folded fc one ulp off, as a fold computed in a different order could be
        folded.fc.weight.copy_(torch.nextafter(folded.fc.weight, torch.full_like(folded.fc.weight, float("inf"))))
    report = check_folded(model, folded, x, PAIRS, consumers=["bn3"])
    assert report is not None and report.passed, report.describe()
    if report.sensitivity is not None:
        assert report.tolerance >= PERTURBATION_FACTOR * report.sensitivity
        assert report.tolerance >= ROUNDING_FACTOR * (report.rounding or 0.0)


def _count_float64_runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    import bnstrip.fold.check as check

    runs = [0]
    real = check.float64_outputs

    def counted(*args: object, **kwargs: object) -> object:
        runs[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(check, "float64_outputs", counted)
    return runs


def test_a_gap_that_already_decides_skips_the_float64_evaluation(monkeypatch: pytest.MonkeyPatch) -> None:
    """float32, well conditioned: the folded outputs are within a few ulps of the original's, which passes the
    float64 rule whatever the original's own rounding (core.compare.implied_check), so no float64 run is made."""
    runs = _count_float64_runs(monkeypatch)
    model, x = proof_net("well", torch.float32)
    result = fold_model(model, x)
    assert len(result.folded) == 4 and result.check is not None and result.check.passed and result.check.implied
    report = check_folded(model, exact_fold(model), x, PAIRS, consumers=["bn3"])
    assert report is not None and report.passed and report.implied
    assert runs[0] == 0


def test_a_gap_that_does_not_decide_gets_the_float64_evaluation_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """float16: its floor is one ulp, so the gap of an exact fold often does not decide; the float64 rule then does,
    with one float64 run per fold. A wrong fold always goes to the float64 rule, and fails it."""
    runs = _count_float64_runs(monkeypatch)
    by_float64 = 0
    for conditioning in CONDITIONINGS:
        model, x = proof_net(conditioning, torch.float16)
        before = runs[0]
        result = fold_model(model, x)
        assert len(result.folded) == 4 and result.check is not None and result.check.passed
        assert (result.check.implied, runs[0] - before) in ((True, 0), (False, 1))
        by_float64 += not result.check.implied
        wrong = check_folded(model, exact_fold(model, MUTATIONS[0]), x, PAIRS, consumers=["bn3"])
        assert wrong is not None and not wrong.passed and not wrong.implied and wrong.rounding is not None
    assert by_float64 >= 2  # huge_gamma and random_stats

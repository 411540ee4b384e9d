"""bnstrip.bench and `bnstrip bench`: interleaving, statistics, thread restore, JSON shape and exit codes.

Timings are never asserted (they depend on the machine); what is checked is how they are
taken and reported, against independent ground truth (numpy's percentiles, a call log).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bnstrip.bench import (  # noqa: E402
    Spread,
    Timing,
    arch_pair,
    bench_pair,
    compare,
    randomise_batchnorm_stats,
    time_interleaved,
    torch_threads,
)
from bnstrip.cli import main  # noqa: E402
from bnstrip import fold_model  # noqa: E402
from bnstrip.errors import InputError  # noqa: E402


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


# --------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("values", [[3.0], [5.0, 1.0], [4.0, 1.0, 9.0, 2.0, 7.0], list(np.random.default_rng(0).random(20))])
def test_spread_matches_numpy(values: list[float]) -> None:
    spread = Spread.of(values)
    assert spread.median == pytest.approx(np.median(values))
    assert spread.q1 == pytest.approx(np.percentile(values, 25))
    assert spread.q3 == pytest.approx(np.percentile(values, 75))
    assert (spread.min, spread.max) == (min(values), max(values))


def test_clear_speedup_is_reported_with_paired_ratios() -> None:
    baseline = Timing("bn", (2.0, 2.2, 1.8, 2.0, 2.4), 1)
    candidate = Timing("folded", (1.0, 1.0, 1.0, 1.0, 1.0), 1)
    speedup = compare(baseline, candidate)
    assert speedup.ratios == pytest.approx((2.0, 2.2, 1.8, 2.0, 2.4))
    assert speedup.median == pytest.approx(2.0)
    assert (speedup.spread.min, speedup.spread.max) == pytest.approx((1.8, 2.4))
    assert not speedup.within_noise
    assert speedup.verdict == "2.00x faster"
    assert compare(candidate, baseline).verdict == "2.00x slower"


def test_overlapping_spreads_are_within_noise() -> None:
    baseline = Timing("bn", (1.0, 1.3, 0.9, 1.2), 1)
    candidate = Timing("folded", (1.1, 0.95, 1.25, 1.0), 1)
    speedup = compare(baseline, candidate)
    assert speedup.within_noise
    assert speedup.verdict == "within noise"
    assert speedup.to_dict()["within_noise"] is True


# --------------------------------------------------------------------------- timing


def test_candidates_run_interleaved_after_warmup() -> None:
    log: list[str] = []
    timings = time_interleaved({"a": lambda: log.append("a"), "b": lambda: log.append("b")},
                               repeat=3, warmup=2, min_sample_seconds=0.0)
    assert log[:4] == ["a", "a", "b", "b"]  # warm-up, each candidate first
    calls = timings["a"].calls_per_sample
    assert calls == timings["b"].calls_per_sample == 1
    assert log[4:] == ["a", "b"] * 3  # no calibration call when min_sample_seconds is 0
    assert all(len(t.seconds) == 3 and min(t.seconds) >= 0 for t in timings.values())


def test_fast_candidates_are_timed_over_several_calls() -> None:
    count = {"n": 0}

    def tick() -> None:
        count["n"] += 1

    timing = time_interleaved({"tick": tick}, repeat=2, warmup=0, min_sample_seconds=0.002)["tick"]
    assert timing.calls_per_sample > 1
    assert count["n"] == 1 + 2 * timing.calls_per_sample


def test_threads_are_restored_even_after_an_error() -> None:
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), torch_threads(1) as used:
        assert used == 1 == torch.get_num_threads()
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before
    with pytest.raises(InputError):
        with torch_threads(0):
            pass


def _tiny_pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = randomise_batchnorm_stats(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()))
    return model.eval(), fold_model(model.eval(), torch.rand(2, 3, 8, 8)).model


def test_bench_pair_reports_every_batch_size_and_restores_threads() -> None:
    bn_model, folded_model = _tiny_pair()
    before = torch.get_num_threads()
    seen: list[tuple[int, int]] = []
    report = bench_pair(bn_model, folded_model, (3, 8, 8), [1, 4], repeat=2, warmup=1, threads=1,
                        min_sample_seconds=0.0, progress=lambda done, total: seen.append((done, total)))
    assert torch.get_num_threads() == before
    assert report.threads == 1 and [r.batch_size for r in report.results] == [1, 4]
    assert seen[-1] == (4, 4)
    for result in report.results:
        assert len(result.bn.seconds) == len(result.folded.seconds) == 2
        assert result.speedup.ratios == pytest.approx(tuple(b / f for b, f in zip(result.bn.seconds, result.folded.seconds, strict=True)))
    payload = report.to_dict()
    assert json.loads(json.dumps(payload))["results"][1]["batch_size"] == 4


def test_bench_pair_refuses_bad_batch_sizes_and_wrong_shapes() -> None:
    bn_model, folded_model = _tiny_pair()
    with pytest.raises(InputError, match="at least 1"):
        bench_pair(bn_model, folded_model, (3, 8, 8), [0], repeat=1)
    with pytest.raises(InputError, match="input of shape"):
        bench_pair(bn_model, folded_model, (5, 8, 8), [1], repeat=1)


def test_arch_pair_folds_the_zoo_resnet_exactly() -> None:
    pair = arch_pair("bnstrip.testing.zoo:ResNet18Style", (3, 16, 16))
    bns = [m for m in pair.bn_model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert pair.folded == len(bns) > 0 and not pair.notes
    assert not torch.equal(bns[0].running_var, torch.ones_like(bns[0].running_var))  # randomised statistics
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in pair.folded_model.modules())
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        expected, got = pair.bn_model(x), pair.folded_model(x)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


# --------------------------------------------------------------------------- CLI


def test_cli_json_for_smallnet_checkpoint(random_smallnet_file: Path) -> None:
    before = torch.get_num_threads()
    result = run("bench", "--checkpoint", str(random_smallnet_file), "--batch-size", "1,2", "--repeat", "2",
                 "--warmup", "0", "--threads", "1", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["arch"] == "smallnet" and payload["checkpoint"] == str(random_smallnet_file)
    assert payload["folded"] == 3 and payload["threads"] == 1 and payload["repeat"] == 2
    assert payload["sample_shape"] == [3, 32, 32] and payload["torch"] == torch.__version__
    assert [r["batch_size"] for r in payload["results"]] == [1, 2]
    for entry in payload["results"]:
        assert {"median_s", "min_s", "max_s", "q1_s", "q3_s", "samples"} <= set(entry["bn"]) <= set(entry["folded"]) | {"label"}
        assert {"median", "min", "max", "within_noise", "verdict"} <= set(entry["speedup"])
        assert entry["bn"]["samples"] == 2
    assert torch.get_num_threads() == before


def test_cli_table_for_zoo_model() -> None:
    result = run("bench", "--arch", "bnstrip.testing.zoo:MobileNetV2Style", "--input-shape", "1,3,16,16", "--batch-size", "2",
                 "--repeat", "1", "--warmup", "0")
    assert result.exit_code == 0, result.output
    assert "speed-up" in result.stdout and "verdict" in result.stdout and "BatchNorm(s) folded" in result.stdout
    assert "folding" in result.stderr and "folding" not in result.stdout


@pytest.mark.parametrize("value", ["1,x", "0", "", "4,-1"])
def test_cli_bad_batch_size_is_exit_2(value: str) -> None:
    result = run("bench", "--batch-size", value)
    assert result.exit_code == 2
    assert "--batch-size" in result.output


def test_cli_missing_default_checkpoint_is_one_line_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = run("bench", "--repeat", "1")
    assert result.exit_code == 2
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("bnstrip: error:")]
    assert len(error_lines) == 1 and "smallNetSaved" in error_lines[0] and "--checkpoint" in error_lines[0]
    assert result.stdout == ""


def test_cli_smallnet_refuses_other_input_shape(random_smallnet_file: Path) -> None:
    result = run("bench", "--checkpoint", str(random_smallnet_file), "--input-shape", "1,3,16,16")
    assert result.exit_code == 2 and "3,32,32" in result.output


def test_cli_arch_with_checkpoint_and_bad_arch(tmp_path: Path) -> None:
    from bnstrip.testing import zoo

    path = tmp_path / "resnet.pt"
    torch.save(zoo.randomize_bn(zoo.ResNet18Style(), seed=3).state_dict(), path)
    result = run("bench", "--arch", "bnstrip.testing.zoo:ResNet18Style", "--checkpoint", str(path), "--input-shape", "1,3,8,8",
                 "--batch-size", "1", "--repeat", "1", "--warmup", "0", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["checkpoint"] == str(path) and payload["sample_shape"] == [3, 8, 8] and payload["folded"] > 0
    wrong = run("bench", "--arch", "bnstrip.testing.zoo:MobileNetV2Style", "--checkpoint", str(path), "--repeat", "1")
    assert wrong.exit_code == 2 and "MobileNetV2Style" in wrong.stderr
    missing = run("bench", "--arch", "bnstrip.testing.zoo:NoSuchNet", "--repeat", "1")
    assert missing.exit_code == 2 and "NoSuchNet" in missing.stderr

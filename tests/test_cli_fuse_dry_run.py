"""`bnstrip fuse --dry-run`: the same folded / refused / merged sets as a real fuse, the proof run, nothing written."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from bnstrip.testing import zoo
from bnstrip.cli import main
from bnstrip.fold.reparam_blocks import RepNet, randomize_bn

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def at_repo_root(monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(ROOT)  # --arch bnstrip.testing.zoo:... resolves from the current directory
    return ROOT


def _fuse(args: list[str]) -> tuple[int, dict, str]:
    result = CliRunner().invoke(main, ["fuse", *args, "--json"])
    return result.exit_code, json.loads(result.stdout) if result.stdout.strip() else {}, result.stderr


def _sets(payload: dict) -> tuple:
    return (sorted((e["layer"], e["bn"], e["into"]) for e in payload["folded"]),
            sorted((e["bn"], e["reason"]) for e in payload["skipped"]),
            sorted(json.dumps(m, sort_keys=True) for m in payload["merged"]),
            sorted((e["where"], e["reason"]) for e in payload["merge_refused"]))


@pytest.mark.parametrize("name, extra", [
    ("ReusedConv", []), ("LinearBNSequence", []), ("MLPBothSides", []),
    pytest.param("SubclassNet", [], marks=pytest.mark.slow),
    pytest.param("RepNet", ["--reparameterize"], marks=pytest.mark.slow),
])
def test_dry_run_lists_what_a_real_fuse_does_and_writes_nothing(tmp_path: Path, at_repo_root: Path, name: str,
                                                                extra: list[str]) -> None:
    if name == "RepNet":
        torch.manual_seed(0)
        model, shape, arch = randomize_bn(RepNet()), [2, 3, 8, 8], "bnstrip.fold.reparam_blocks:RepNet"
    else:
        model, x = zoo.build(name)
        shape, arch = list(x.shape), f"bnstrip.testing.zoo:{name}"
    work = tmp_path / "work"
    work.mkdir()
    torch.save(model.state_dict(), work / "in.pt")
    common = ["--arch", arch, str(work / "in.pt"), "--input-shape", ",".join(map(str, shape)), *extra]
    code, dry, _ = _fuse([*common[:3], str(work / "out.pt"), *common[3:], "--dry-run"])
    assert code == 0 and dry["dry_run"] is True and dry["output"] is None and dry["manifest"] is None
    assert os.listdir(work) == ["in.pt"]  # nothing written, not even a temp file
    code_no_out, dry_no_out, _ = _fuse([*common, "--dry-run"])  # OUT may be left out
    assert code_no_out == 0 and _sets(dry_no_out) == _sets(dry)
    code, real, _ = _fuse([*common[:3], str(work / "out.pt"), *common[3:]])
    assert code == 0 and real["dry_run"] is False and (work / "out.pt").is_file()
    assert _sets(dry) == _sets(real)
    assert dry["self_check_max_abs_diff"] == real["self_check_max_abs_diff"]  # the same proof ran


def test_dry_run_with_strict_exits_1_and_writes_nothing(tmp_path: Path, at_repo_root: Path) -> None:
    model, x = zoo.build("ReusedConv")  # two BatchNorms cannot fold (a conv called twice)
    torch.save(model.state_dict(), tmp_path / "in.pt")
    result = CliRunner().invoke(main, ["fuse", "--arch", "bnstrip.testing.zoo:ReusedConv", str(tmp_path / "in.pt"),
                                       "--input-shape", ",".join(map(str, x.shape)), "--dry-run", "--strict"])
    assert result.exit_code == 1
    assert "Would fold" in result.stdout and "Not folded (2)" in result.stdout
    assert "--strict: 2 BatchNorm(s) not folded (dry run, nothing was written)" in result.stderr
    assert os.listdir(tmp_path) == ["in.pt"]


def test_out_is_required_without_dry_run(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["fuse", str(tmp_path / "in.pt")])
    assert result.exit_code == 2 and "Missing argument 'OUT' (only --dry-run goes without it)" in result.stderr


@pytest.mark.slow  # two smallNet folds
def test_smallnet_dry_run_reports_the_pairs_and_writes_nothing(tmp_path: Path, random_smallnet_file: Path) -> None:
    work = random_smallnet_file.parent
    before = sorted(os.listdir(work))
    code, dry, _ = _fuse([str(random_smallnet_file), "--dry-run"])
    assert code == 0 and dry["dry_run"] is True and dry["output"] is None and sorted(os.listdir(work)) == before
    code, real, _ = _fuse([str(random_smallnet_file), str(work / "out.pt")])
    assert code == 0 and dry["pairs"] == real["pairs"] and (work / "out.pt").is_file()
    assert dry["self_check_max_abs_diff"] == real["self_check_max_abs_diff"]

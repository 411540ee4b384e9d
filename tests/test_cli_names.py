"""Names from paths reach the terminal as text: no Rich markup, no control codes (bnstrip/cli/common.py), and
verify's misplaced-file hints (bnstrip/cli/verify.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from bnstrip.cli import main
from bnstrip.homework.models import SmallNetTest


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_fuse_prints_bracketed_and_control_names_as_text(random_smallnet_file: Path, tmp_path: Path) -> None:
    folder = tmp_path / "d["  # with the file below, the path reads `d[/]in.pt`: a Rich closing tag if parsed
    folder.mkdir()
    source = folder / "]in.pt"
    source.write_bytes(random_smallnet_file.read_bytes())
    out = tmp_path / "o[bold]\x1b[31m\nx.pt"
    result = run("fuse", str(source), str(out))
    assert result.exit_code == 0, result.stderr
    assert out.exists()
    first = result.stdout.splitlines()[0]
    assert f"{source} -> " in first and "o[bold]\\x1b[31m\\nx.pt" in first  # the whole name, escaped, one line
    assert "\x1b" not in result.stdout


@pytest.mark.slow
def test_fuse_warning_with_control_characters_is_one_line(random_smallnet_state, tmp_path: Path) -> None:
    source = tmp_path / "half\nprecision.pt"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in random_smallnet_state.items()}, source)
    result = run("fuse", str(source), str(tmp_path / "out.pt"))
    assert result.exit_code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line]
    assert warnings and all(line.startswith("bnstrip: warning: ") for line in warnings)
    assert "half\\nprecision.pt" in result.stderr


def test_verify_folded_file_first_says_it_belongs_in_fused(tmp_path: Path,
                                                           fake_cifar_dir: Path) -> None:
    folded = tmp_path / "folded.pt"
    torch.save(SmallNetTest().state_dict(), folded)  # what fuse writes: a smallNetTest state_dict (the keys say so)
    result = run("verify", str(folded), "--data-dir", str(fake_cifar_dir))
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "smallNetTest" in result.stderr and "--fused" in result.stderr and "--arch" not in result.stderr


def test_verify_unrelated_checkpoint_does_not_suggest_arch(tmp_path: Path, fake_cifar_dir: Path) -> None:
    other = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), other)
    result = run("verify", str(other), "--data-dir", str(fake_cifar_dir))
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "not a smallNetTrain checkpoint" in result.stderr and "--arch" not in result.stderr


def test_verify_refuses_a_tolerance_that_nothing_can_pass(random_smallnet_file: Path) -> None:
    for bad in ("-1", "0"):
        result = run("verify", str(random_smallnet_file), "--tolerance", bad)
        assert result.exit_code == 2 and "--tolerance" in result.stderr

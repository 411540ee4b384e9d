"""`bnstrip fuse --arch`: the warning when nothing folds, and --strict as a CI gate (bnstrip/cli/fuse.py)."""
from __future__ import annotations

from pathlib import Path

import torch
from click.testing import CliRunner
from torch import nn

from bnstrip.cli import main


class AfterRelu(nn.Module):
    """A BatchNorm after a nonlinearity, with no layer after it: a real refusal."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.relu(self.conv(x)))


def _fuse(tmp_path: Path, *extra: str):
    source = tmp_path / "in.pt"
    torch.save(AfterRelu().eval().state_dict(), source)
    out = tmp_path / "out.pt"
    return CliRunner().invoke(main, ["fuse", str(source), str(out), "--arch", f"{__name__}:AfterRelu",
                                     "--input-shape", "2,3,4,4", "--force", *extra]), out


def test_nothing_folded_warns_on_stderr_and_exits_0(tmp_path: Path) -> None:
    result, out = _fuse(tmp_path)
    assert result.exit_code == 0, result.output
    assert "none of its 1 BatchNorm(s) could be folded" in result.stderr and out.exists()


def test_strict_exits_1_naming_the_unfolded_batchnorm(tmp_path: Path) -> None:
    result, _ = _fuse(tmp_path, "--strict")
    assert result.exit_code == 1
    assert "--strict" in result.stderr and "bn:" in result.stderr

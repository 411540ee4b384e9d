"""`bnstrip fuse --arch ... OUT.pt2`: a dynamic batch dimension by default, --static-batch fixes it; stderr says which."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from bnstrip.testing import zoo
from bnstrip.cli import main
from bnstrip.io.pt2 import load_program

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, *extra: str) -> tuple[object, torch.nn.Module]:
    model, _ = zoo.build("MLPBothSides")
    torch.save(model.state_dict(), tmp_path / "in.pt")
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        result = CliRunner().invoke(main, ["fuse", "--arch", "bnstrip.testing.zoo:MLPBothSides", str(tmp_path / "in.pt"),
                                           str(tmp_path / "out.pt2"), "--input-shape", "1,12", *extra])
    finally:
        os.chdir(cwd)
    return result, model


@pytest.mark.slow
def test_pt2_keeps_a_dynamic_batch_by_default_and_says_so(tmp_path: Path) -> None:
    result, model = _run(tmp_path)
    assert result.exit_code == 0, result.output
    assert "out.pt2: dynamic batch dimension (any N >= 1; exported from N=2)" in result.stderr
    program = load_program(str(tmp_path / "out.pt2")).module()
    for n in (1, 5):  # batch sizes the example never had
        x = torch.randn(n, 12)
        with torch.no_grad():
            assert torch.allclose(program(x), model(x), atol=1e-5)


@pytest.mark.slow
def test_static_batch_fixes_n_and_says_so(tmp_path: Path) -> None:
    result, _ = _run(tmp_path, "--static-batch")
    assert result.exit_code == 0, result.output
    assert "out.pt2: static batch: the program takes N=1 only (--static-batch)" in result.stderr
    program = load_program(str(tmp_path / "out.pt2")).module()
    with pytest.raises(Exception):  # noqa: B017 - torch's guard error type is not public; any refusal of N=3 will do
        program(torch.randn(3, 12))


def test_dry_run_to_pt2_writes_nothing(tmp_path: Path) -> None:
    result, _ = _run(tmp_path, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "Would fold" in result.stdout and sorted(os.listdir(tmp_path)) == ["in.pt"]

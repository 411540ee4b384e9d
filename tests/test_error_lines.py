"""Issue 17 item 10: generic or wrong errors become one line that names the file, the cause and the fix.

Each payload is generated into tmp_path: `.pt2` archives rewritten from a tiny exported program, and models
whose tensors cannot be copied.  Every refusal through the CLI is exit 2 with exactly one stderr line.
"""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from bnstrip.cli import main
from bnstrip.errors import InputError
from bnstrip.fold.model import fold_model


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


@pytest.fixture(scope="module")
def good_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pt2") / "good.pt2"
    torch.export.save(torch.export.export(_Tiny().eval(), (torch.randn(1, 3),)), path)
    return path


def _rewritten(src: Path, dst: Path, old: str, new: str) -> Path:
    """A copy of the archive with `old` replaced by `new` in its JSON records."""
    out = io.BytesIO()
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            zout.writestr(info, data.replace(old.encode(), new.encode()) if info.filename.endswith(".json") else data)
    dst.write_bytes(out.getvalue())
    return dst


def _one_line_exit_2(args: list[str]) -> str:
    result = CliRunner().invoke(main, args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, (result.exit_code, result.stderr[-2000:])
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("fqn", ["__class__.weight", "training", "lin.__dict__", "lin._parameters"])
def test_pt2_tensor_named_like_a_module_attribute_is_renamed(good_pt2: Path, tmp_path: Path, fqn: str) -> None:
    """Such a name cannot become a module attribute: the re-emitted archive renames it (never a bare RuntimeError)."""
    bad = _rewritten(good_pt2, tmp_path / "bad.pt2", '"lin.weight"', f'"{fqn}"')
    result = CliRunner().invoke(main, ["fuse", str(bad), str(tmp_path / "out.pt2")])
    assert result.exit_code == 0 and "Error" not in result.stderr, result.stderr[-2000:]
    names = torch.export.load(tmp_path / "out.pt2").state_dict  # bnstrip's own output: trusted
    reserved = {"training", "_parameters", "__dict__", "__class__"}
    assert names and not any(set(name.split(".")) & reserved for name in names), sorted(names)


@pytest.mark.slow
def test_pt2_load_failure_names_the_reason_not_unshown_warnings(good_pt2: Path, tmp_path: Path) -> None:
    bad = _rewritten(good_pt2, tmp_path / "bad.pt2", "torch.ops.aten.linear.default", "torch.ops.aten.no_such_op.default")
    line = _one_line_exit_2(["fuse", str(bad), str(tmp_path / "out.pt2")])
    assert "warnings above" not in line and "no_such_op" in line and str(bad) in line, line


class _AliasHolder(nn.Module):
    """Holds a tensor computed from its parameter (not a leaf): deepcopy refuses it; no weight_norm in sight."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.scaled = self.conv.weight * 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def test_an_alias_is_not_blamed_on_weight_norm() -> None:
    with pytest.raises(InputError) as info:
        fold_model(_AliasHolder().eval(), torch.randn(1, 3, 4, 4))
    text = str(info.value)
    assert "weight_norm" not in text and "not a leaf" in text and "\n" not in text, text


def test_real_weight_norm_is_still_named() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    with pytest.warns(FutureWarning):
        nn.utils.weight_norm(model[0])
    model(torch.randn(1, 3, 4, 4))  # the pre-hook computes `weight` from weight_g and weight_v: not a leaf
    with pytest.raises(InputError, match="parametrizations.weight_norm"):
        fold_model(model, torch.randn(1, 3, 4, 4))

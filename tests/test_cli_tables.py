"""Rich tables never cut a number: every number of a command's output, as printed without a width limit, is
printed whole at 40, 60 and 80 columns (labels fold instead; nothing ends in an ellipsis)."""
from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from rich.console import Console

import bnstrip.cli.common as common
from bnstrip.testing import zoo
from bnstrip.cli import main

ROOT = Path(__file__).resolve().parents[1]
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


class _Recorder:
    """Stands in for the stdout console: keeps what a command prints, to render it at any width afterwards."""

    def __init__(self) -> None:
        self.items: list[tuple] = []

    def print(self, *objects, **_: object) -> None:
        self.items.append(objects)


def _printed(args: list[str], monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    recorder = _Recorder()
    monkeypatch.setattr(common, "stdout_console", lambda: recorder)
    for module in ("bnstrip.cli.fuse", "bnstrip.cli.verify", "bnstrip.cli.maths", "bnstrip.cli.program"):
        monkeypatch.setattr(f"{module}.stdout_console", lambda: recorder, raising=False)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert recorder.items
    return recorder.items


def _render(items: list[tuple], width: int) -> str:
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, highlight=False, color_system=None)
    for objects in items:
        console.print(*objects)
    return buffer.getvalue()


def _assert_numbers_whole(items: list[tuple]) -> None:
    wide = _render(items, 100_000)
    expected = sorted(NUMBER.findall(wide))
    for width in (40, 60, 80):
        narrow = _render(items, width)
        assert "…" not in narrow
        assert max(len(line) for line in narrow.splitlines()) <= width
        assert sorted(NUMBER.findall(narrow)) == expected, f"a number was cut at {width} columns:\n{narrow}"


def test_conv_grad_and_init_stats_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    _assert_numbers_whole(_printed(["conv-grad", "--filters", "3,4,2"], monkeypatch))
    _assert_numbers_whole(_printed(["init-stats", "--layers", "16,8,4,1", "--samples", "2000"], monkeypatch))


@pytest.mark.slow  # a smallNet fold plus 200 images
def test_verify_table(monkeypatch: pytest.MonkeyPatch, random_smallnet_file: Path, fake_cifar_dir: Path) -> None:
    _assert_numbers_whole(_printed(["verify", str(random_smallnet_file), "--data-dir", str(fake_cifar_dir),
                                    "--tolerance", "1e-4"], monkeypatch))


def test_fuse_tables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    model, x = zoo.build("ReusedConv")  # folded and not-folded tables, long reasons
    torch.save(model.state_dict(), tmp_path / "in.pt")
    monkeypatch.chdir(tmp_path)  # short relative paths in the title (a folded path would split its digits)
    _assert_numbers_whole(_printed(["fuse", "--arch", "bnstrip.testing.zoo:ReusedConv", "in.pt", "out.pt", "--input-shape",
                                    ",".join(map(str, x.shape))], monkeypatch))
    assert os.path.exists(tmp_path / "out.pt")


def test_a_table_too_wide_for_its_numbers_is_stacked_row_by_row() -> None:
    numbers = [f"{-1.234567890123e-17 * (i + 1):.12e}" for i in range(6)]
    table = common.make_table("", [f"column {i}" for i in range(6)], [numbers])
    text = _render([(table,)], 40)
    assert all(n in text for n in numbers) and "column 5" in text
    assert len([line for line in text.splitlines() if "e-17" in line]) == 6  # one number a line

"""bnstrip.io.write on a full disk (issue 17 item 6): every output format is one line, exit 2, old output kept.

The full disk is real: the temp file the writer creates is swapped for a link to /dev/full, whose
every write fails with ENOSPC, so each library's own writer (torch.save, safetensors' Rust writer,
torch.export.save) meets a genuine full-disk error.  No root, no mount.
"""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from bnstrip.cli import main
from bnstrip.errors import InputError
from bnstrip.io import write
from bnstrip.io.manifest import write_manifest

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full to simulate a full disk")


@pytest.fixture()
def full_disk(monkeypatch: pytest.MonkeyPatch):
    """Every temp file write_atomically creates is a link to /dev/full (ENOSPC on write); counts the temps made."""
    real_mkstemp = tempfile.mkstemp
    made: list[str] = []

    def mkstemp(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        os.close(fd)
        os.unlink(name)
        os.symlink("/dev/full", name)
        made.append(name)
        return os.open(name, os.O_WRONLY), name

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    return made


def _no_temps(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(write.TEMP_SUFFIX)]


def _one_line_no_space(exc: pytest.ExceptionInfo, target: Path) -> None:
    text = str(exc.value)
    assert "\n" not in text and text.startswith(str(target)), text
    assert f"no space left on {target.parent}" in text, text


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_checkpoint_on_a_full_disk_keeps_the_old_output(tmp_path: Path, full_disk: list[str], suffix: str) -> None:
    target = tmp_path / f"out{suffix}"
    target.write_bytes(b"old output")
    state = {"w": torch.arange(300_000.0)}
    with pytest.raises(InputError) as exc:
        write.save_checkpoint(state, target, force=True)
    _one_line_no_space(exc, target)
    assert full_disk and target.read_bytes() == b"old output" and not _no_temps(tmp_path)


def test_manifest_on_a_full_disk(tmp_path: Path, full_disk: list[str]) -> None:
    target = tmp_path / "out.pt"
    with pytest.raises(InputError) as exc:
        write_manifest(target, {"form": "modules", "folded": [], "skipped": [], "gained_bias": []})
    _one_line_no_space(exc, Path(f"{target}.bnstrip.json"))
    assert not _no_temps(tmp_path) and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_program_on_a_full_disk_is_an_error_not_an_abort(tmp_path: Path, full_disk: list[str]) -> None:
    """torch's zip writer aborts the process on ENOSPC: bnstrip must never hand it the file."""
    from bnstrip.pipeline_program import write_program

    program = torch.export.export(nn.Linear(3, 2).eval(), (torch.randn(1, 3),))
    target = tmp_path / "out.pt2"
    target.write_bytes(b"old program")
    with pytest.raises(InputError) as exc:
        write_program(program, str(target), "in.pt", force=True)
    _one_line_no_space(exc, target)
    assert full_disk and target.read_bytes() == b"old program" and not _no_temps(tmp_path)


def test_any_other_write_error_names_the_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EIO in the middle of bnstrip's own writes: one line with the reason, nothing placed, no temp."""
    calls = {"n": 0}
    real_write = write.RecordingWriter.write

    def failing(self, data):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_write(self, data)

    monkeypatch.setattr(write.RecordingWriter, "write", failing)
    monkeypatch.setattr(write, "WRITE_CHUNK", 1024)
    target = tmp_path / "out.pt2"
    with pytest.raises(InputError, match=r"write failed \(Input/output error\)"):
        write.write_bytes_atomically(target, b"x" * 5000)
    assert not target.exists() and not _no_temps(tmp_path)


@pytest.mark.slow
def test_cli_fuse_on_a_full_disk_is_one_line_exit_2(tmp_path: Path, full_disk: list[str],
                                                     random_smallnet_file: Path) -> None:
    out = tmp_path / "small.safetensors"
    result = CliRunner().invoke(main, ["fuse", str(random_smallnet_file), str(out)], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no space left on" in lines[0] and str(tmp_path) in lines[0], lines
    assert not out.exists() and not _no_temps(tmp_path)

"""bnstrip.io.manifest: read back as untrusted input (regular file, size cap, nesting), paths checked like OUT."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bnstrip.errors import InputError
from bnstrip.io.manifest import MANIFEST_FORMAT, check_manifest_path, manifest_path, read_manifest, write_manifest


def payload() -> dict:
    return {"form": "modules", "folded": [{"layer": "conv", "bn": "bn", "into": "producer"}], "skipped": [],
            "gained_bias": ["conv"]}


def test_written_manifest_reads_back(tmp_path: Path) -> None:
    out = tmp_path / "model.pt"
    path = write_manifest(out, payload())
    assert path == manifest_path(out) and read_manifest(out)["format"] == MANIFEST_FORMAT
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize("text, fragment", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"format": "x"}', "not a bnstrip manifest"),
    ("\xff", "unreadable manifest"),
    (json.dumps({"format": MANIFEST_FORMAT, "version": 1, "form": "modules", "folded": "x", "skipped": [],
                 "gained_bias": []}), "no 'folded' list"),
])
def test_bad_manifests_are_one_line_errors(tmp_path: Path, text: str, fragment: str) -> None:
    out = tmp_path / "model.pt"
    manifest_path(out).write_bytes(text.encode("latin-1"))
    with pytest.raises(InputError) as info:
        read_manifest(out)
    assert fragment in str(info.value) and "\n" not in str(info.value) and str(manifest_path(out)) in str(info.value)


def test_manifest_path_checks_name_length_and_force(tmp_path: Path) -> None:
    long_out = tmp_path / ("m" * 250 + ".pt")  # OUT fits in 255 bytes; OUT.bnstrip.json does not
    with pytest.raises(InputError, match="255-byte limit"):
        check_manifest_path(long_out, [], force=True)
    out = tmp_path / "model.pt"
    manifest_path(out).write_text("{}")
    with pytest.raises(InputError, match="manifest exists; pass force=True"):
        check_manifest_path(out, [], force=False)
    assert check_manifest_path(out, [], force=True) == manifest_path(out)
    manifest_path(out).unlink()
    manifest_path(out).mkdir()
    with pytest.raises(InputError, match="is a directory"):
        read_manifest(out)

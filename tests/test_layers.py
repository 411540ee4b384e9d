"""docs/architecture.md's layer picture and pyproject's import-linter contract are the same list."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _contract_layers() -> list[str]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contracts = config["tool"]["importlinter"]["contracts"]
    return next(c["layers"] for c in contracts if c["type"] == "layers")


def _picture_layers() -> list[str]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text[text.index("## Layers"):]
    block = section[section.index("```") + 3:]
    block = block[:block.index("```")]
    rows = [re.split(r"\s{2,}", line.strip())[0] for line in block.strip().splitlines()]
    return rows


def test_the_layer_picture_is_the_contract() -> None:
    assert _picture_layers() == _contract_layers()

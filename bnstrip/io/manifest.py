"""The `OUT.bnstrip.json` manifest: what was folded into OUT, so the folded module can be rebuilt.

A folded state_dict alone does not say which BatchNorms disappeared or which layers
gained a bias; without that, loading it into the original class fails. The manifest
records it, written atomically next to OUT like the checkpoint itself.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bnstrip.errors import InputError

MANIFEST_SUFFIX = ".bnstrip.json"
MANIFEST_FORMAT = "bnstrip-fold-manifest"
MANIFEST_VERSION = 1
FORMS = ("modules", "graph", "keep-structure")


def manifest_path(output: str | os.PathLike[str]) -> Path:
    """OUT -> OUT.bnstrip.json (next to it, whatever OUT's extension)."""
    return Path(f"{os.fspath(output)}{MANIFEST_SUFFIX}")


def check_manifest_path(output: str | os.PathLike[str], inputs: list[str | os.PathLike[str]], force: bool) -> Path:
    """Refuse to overwrite an existing manifest without force, or an input file in any case."""
    path = manifest_path(output)
    for src in inputs:
        if Path(src).exists() and path.exists() and os.path.samefile(src, path):
            raise InputError(f"{path}: the manifest path is the input file {src}; choose another output path")
    if path.exists() and not force:
        raise InputError(f"{path}: manifest exists; pass --force to replace it")
    if path.exists() and not path.is_file():
        raise InputError(f"{path}: manifest path exists and is not a regular file; choose another output path")
    return path


def write_manifest(output: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    """Write the manifest atomically, exactly as checkpoints are written."""
    from bnstrip.io.checkpoint import write_atomically

    path = manifest_path(output)
    document = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, **payload}
    text = json.dumps(document, indent=2, sort_keys=False) + "\n"
    write_atomically(path, lambda tmp_name: Path(tmp_name).write_text(text, encoding="utf-8"))
    return path


def read_manifest(output: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and validate OUT.bnstrip.json; InputError naming the file and the fix otherwise."""
    path = manifest_path(output)
    if not path.is_file():
        raise InputError(f"{path}: no manifest next to {output}; write the checkpoint with `bnstrip fuse --arch`")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: unreadable manifest ({exc}); rewrite it with `bnstrip fuse --arch`") from None
    if not isinstance(document, dict) or document.get("format") != MANIFEST_FORMAT:
        raise InputError(f"{path}: not a bnstrip manifest; rewrite it with `bnstrip fuse --arch`")
    if document.get("version") != MANIFEST_VERSION:
        raise InputError(f"{path}: manifest version {document.get('version')!r} is not supported (expected "
                         f"{MANIFEST_VERSION}); upgrade bnstrip or rewrite it")
    if document.get("form") not in FORMS:
        raise InputError(f"{path}: manifest form {document.get('form')!r} is not one of {', '.join(FORMS)}")
    for key in ("folded", "skipped", "gained_bias"):
        if not isinstance(document.get(key), list):
            raise InputError(f"{path}: manifest has no '{key}' list; rewrite it with `bnstrip fuse --arch`")
    for entry in document["folded"]:
        if not (isinstance(entry, dict) and isinstance(entry.get("layer"), str) and isinstance(entry.get("bn"), str)):
            raise InputError(f"{path}: a 'folded' entry is not {{layer, bn, into}}; rewrite it with `bnstrip fuse --arch`")
    return document

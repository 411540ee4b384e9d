"""The `OUT.bnstrip.json` manifest: what was folded into OUT, so the folded module can be rebuilt.

A folded state_dict alone does not say which BatchNorms disappeared or which layers
gained a bias; without that, loading it into the original class fails. The manifest
records it, written atomically next to OUT like the checkpoint itself.  It is read
back as untrusted input: size-capped, regular files only, bounded nesting.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bnstrip.errors import InputError, printable

MANIFEST_SUFFIX = ".bnstrip.json"
MANIFEST_FORMAT = "bnstrip-fold-manifest"
MANIFEST_VERSION = 1
FORMS = ("modules", "graph", "keep-structure")
MAX_MANIFEST_BYTES = 64 << 20
"""A manifest lists layer names; 64 MiB is far more than any model needs."""


def manifest_path(output: str | os.PathLike[str]) -> Path:
    """OUT -> OUT.bnstrip.json (next to it, whatever OUT's extension)."""
    return Path(f"{os.fspath(output)}{MANIFEST_SUFFIX}")


def check_manifest_path(output: str | os.PathLike[str], inputs: list[str | os.PathLike[str]], force: bool) -> Path:
    """Everything check_output_path checks (input, force, name length, writable directory) for OUT.bnstrip.json."""
    from bnstrip.io.write import check_output_path

    return check_output_path(manifest_path(output), inputs, force, what="manifest", checkpoint=False)


def write_manifest(output: str | os.PathLike[str], payload: dict[str, Any], *, force: bool = True) -> Path:
    """Write the manifest atomically, exactly as checkpoints are written (never replacing a file without force)."""
    from bnstrip.io.write import write_atomically

    path = manifest_path(output)
    document = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, **payload}
    text = json.dumps(document, indent=2, sort_keys=False) + "\n"
    write_atomically(path, lambda tmp_name: Path(tmp_name).write_text(text, encoding="utf-8"), replace=force)
    return path


def _rewrite(path: Path, problem: str) -> InputError:
    return InputError(f"{printable(path)}: {problem}; rewrite it with `bnstrip fuse --arch`")


def read_manifest(output: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and validate OUT.bnstrip.json; InputError naming the file and the fix otherwise."""
    from bnstrip.io.sniff import open_regular_file

    path = manifest_path(output)
    if not path.exists():
        raise InputError(f"{printable(path)}: no manifest next to {printable(output)}; write the checkpoint with `bnstrip fuse --arch`")
    with open_regular_file(path) as f:
        raw = f.read(MAX_MANIFEST_BYTES + 1)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise _rewrite(path, f"manifest is over {MAX_MANIFEST_BYTES:,} bytes, far more than any model needs")
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _rewrite(path, f"unreadable manifest ({printable(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)})") from None
    except RecursionError:
        raise _rewrite(path, "manifest is nested too deeply to be one bnstrip wrote") from None
    if not isinstance(document, dict) or document.get("format") != MANIFEST_FORMAT:
        raise _rewrite(path, "not a bnstrip manifest")
    if document.get("version") != MANIFEST_VERSION:
        raise InputError(f"{printable(path)}: manifest version {printable(repr(document.get('version')))[:40]} is not supported "
                         f"(expected {MANIFEST_VERSION}); upgrade bnstrip or rewrite it")
    if document.get("form") not in FORMS:
        raise _rewrite(path, f"manifest form {printable(repr(document.get('form')))[:40]} is not one of {', '.join(FORMS)}")
    for key in ("folded", "skipped", "gained_bias"):
        if not isinstance(document.get(key), list):
            raise _rewrite(path, f"manifest has no '{key}' list")
    for entry in document["folded"]:
        if not (isinstance(entry, dict) and isinstance(entry.get("layer"), str) and isinstance(entry.get("bn"), str)):
            raise _rewrite(path, "a 'folded' entry is not {layer, bn, into}")
    return document

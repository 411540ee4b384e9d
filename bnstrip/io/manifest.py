"""The `OUT.bnstrip.json` manifest: what was folded into OUT, so the folded module can be rebuilt.

A folded state_dict alone does not say which BatchNorms disappeared or which layers
gained a bias; without that, loading it into the original class fails. The manifest
records it, written atomically next to OUT like the checkpoint itself.  It is read
back as untrusted input: size-capped, regular files only, bounded nesting.
"""
from __future__ import annotations

import json
import math
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


def manifest_document(architecture: str, entries: dict[str, Any], check: Any, output: str | os.PathLike[str], *,
                      input_shape: list[int] | None = None, source: str | None = None,
                      source_sha256: str | None = None) -> dict[str, Any]:
    """What load_folded needs, and the evidence (the check's figures); OUT's sha256 is added when OUT is written."""
    from bnstrip._version import __version__

    return {
        "bnstrip_version": __version__, "architecture": architecture, "input_shape": list(input_shape or []),
        "source": source, "source_sha256": source_sha256, "output": Path(output).name, **entries,
        "self_check": {"max_abs_diff": check.max_abs_diff, "output_scale": check.output_scale,
                       "rounding": check.rounding, "tolerance": check.tolerance, "samples": check.samples},
    }


def save_with_manifest(state: dict[str, Any], output: str | os.PathLike[str], manifest: dict[str, Any] | None, *,
                       force: bool, inputs: list[str | os.PathLike[str]] | None = None,
                       metadata: dict[str, str] | None = None,
                       replace_manifest: bool = True) -> None:
    """OUT's state_dict and its manifest: the manifest first (it holds OUT's sha256, taken from OUT's complete temp
    file), then OUT is put in place, so a manifest never names an OUT that is not there."""
    from bnstrip.io.checkpoint import sha256_file
    from bnstrip.io.write import save_checkpoint

    def write_manifest_first(tmp_name: str) -> None:
        assert manifest is not None  # only passed as a callback when there is one
        write_manifest(output, {**manifest, "output_sha256": sha256_file(tmp_name)}, force=replace_manifest)

    save_checkpoint(state, output, force=force, inputs=inputs, metadata=metadata,
                    before_replace=write_manifest_first if manifest is not None else None)


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
    validate_manifest(document, path)
    return document


MAX_NAME_CHARS = 1000
"""A module path: dotted names of a real model are far shorter."""
INTO = ("producer", "consumer")


def _names(document: dict[str, Any], key: str, path: Path, field: str | None = None) -> list[str]:
    """The names under document[key] (entries' `field`, or the entries themselves): printable, bounded, unique."""
    from bnstrip.io.limits import MAX_TENSORS

    entries = document[key]
    if len(entries) > MAX_TENSORS:
        raise _rewrite(path, f"manifest field '{key}' lists {len(entries):,} entries, over bnstrip's {MAX_TENSORS:,}")
    names = []
    for entry in entries:
        name = entry.get(field) if field is not None and isinstance(entry, dict) else entry
        if not (isinstance(name, str) and name and len(name) <= MAX_NAME_CHARS and name.isprintable()):
            raise _rewrite(path, f"manifest field '{key}' holds {printable(repr(name))[:60]}, not a module name")
        names.append(name)
    if len(set(names)) != len(names):
        raise _rewrite(path, f"manifest field '{key}' names a module twice")
    return names


def validate_manifest(document: dict[str, Any], path: Path) -> None:
    """The manifest schema and its bounds (docs/safety.md): every field load_folded uses, checked before any is used.

    form one of FORMS; eps null or a finite number with 0 < eps <= 1; folded [{layer, bn, into}], skipped
    [{bn, reason}], gained_bias [name], merged [{conv, branches}] with printable, unique module names;
    output_sha256 64 hex digits (it binds the manifest to OUT, so it is required).
    """
    if document.get("form") not in FORMS:
        raise _rewrite(path, f"manifest form {printable(repr(document.get('form')))[:40]} is not one of {', '.join(FORMS)}")
    for key in ("folded", "skipped", "gained_bias"):
        if not isinstance(document.get(key), list):
            raise _rewrite(path, f"manifest has no '{key}' list")
    for entry in document["folded"]:
        if not (isinstance(entry, dict) and isinstance(entry.get("layer"), str) and isinstance(entry.get("bn"), str)
                and entry.get("into", "producer") in INTO):
            raise _rewrite(path, "a 'folded' entry is not {layer, bn, into}")
    _names(document, "folded", path, "bn")
    _names(document, "skipped", path, "bn")
    _names(document, "gained_bias", path)
    for entry in document["folded"]:
        _names({"folded": [entry]}, "folded", path, "layer")
    merged = document.setdefault("merged", [])
    if not isinstance(merged, list) or not all(isinstance(m, dict) and isinstance(m.get("branches"), list) for m in merged):
        raise _rewrite(path, "manifest field 'merged' is not a list of {conv, branches}")
    _names(document, "merged", path, "conv")
    eps = document.setdefault("eps", None)
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps)
                            or not 0 < eps <= 1):
        raise _rewrite(path, f"manifest field 'eps' is {printable(repr(eps))[:40]}; a BatchNorm eps is a finite "
                             "number with 0 < eps <= 1")
    sha = document.get("output_sha256")
    if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        raise _rewrite(path, "manifest field 'output_sha256' is missing or not a sha256; it binds the manifest to "
                             "its checkpoint")

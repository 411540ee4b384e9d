"""`FoldResult.save(PATH)`: the library's way to write a folded model so that `load_folded` gets it back.

A folded state_dict alone cannot be loaded into the original class: its BatchNorms are gone and
some layers gained a bias. `strict=True` then fails, and `strict=False` silently gives a wrong
model (the BatchNorms stay at their initial statistics). So the state_dict is written with the
same manifest `bnstrip fuse --arch` writes (OUT.bnstrip.json, with OUT's sha256), through the
one atomic writer (bnstrip.io.write), manifest first.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnstrip.errors import InputError

if TYPE_CHECKING:
    from bnstrip.fold.model import FoldResult


def _manifest(result: FoldResult, output: Path, architecture: str) -> dict[str, Any]:
    from bnstrip._version import __version__

    check = result.check
    assert check is not None
    return {
        "bnstrip_version": __version__, "architecture": architecture, "input_shape": [], "source": None,
        "source_sha256": None, "output": output.name, **result.manifest_entries(),
        "self_check": {"max_abs_diff": check.max_abs_diff, "output_scale": check.output_scale,
                       "rounding": check.rounding, "tolerance": check.tolerance, "samples": check.samples},
    }


def save_result(result: FoldResult, path: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Write `result.model`'s state_dict to `path` (.pt or .safetensors) and its manifest beside it.

    Only a checked result is saved (fold_model with example_inputs), so the file holds a proven model.
    Returns the manifest's path.
    """
    from bnstrip._version import __version__
    from bnstrip.io.checkpoint import sha256_file
    from bnstrip.io.manifest import manifest_path, write_manifest
    from bnstrip.io.write import check_output_path, save_checkpoint

    if result.form == "program":
        raise InputError("an exported program's fold is saved with torch.export.save(result.program, PATH), not "
                         "result.save")
    if result.check is None:
        raise InputError("this result was not checked (fold_model was called without example_inputs); fold with "
                         "example_inputs so that the saved model is proven equal to the original")
    output = Path(path)
    check_output_path(output, [], force)
    check_output_path(manifest_path(output), [], force, what="manifest", checkpoint=False)
    architecture = type(result.model).__name__
    manifest = _manifest(result, output, architecture)
    metadata = {"bnstrip_version": __version__, "architecture": architecture, "form": result.form,
                "folded_pairs": ",".join(f"{layer}+{bn}" for layer, bn in result.folded), "eps": repr(result.eps)}

    def write_manifest_first(tmp_name: str) -> None:
        write_manifest(output, {**manifest, "output_sha256": sha256_file(tmp_name)}, force=force)

    save_checkpoint(result.model.state_dict(), output, force=force, metadata=metadata,
                    before_replace=write_manifest_first)
    return manifest_path(output)

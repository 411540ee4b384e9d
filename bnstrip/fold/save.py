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
from typing import TYPE_CHECKING

from bnstrip.errors import InputError

if TYPE_CHECKING:
    from bnstrip.fold.model import FoldResult


def save_result(result: FoldResult, path: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Write `result.model`'s state_dict to `path` (.pt or .safetensors) and its manifest beside it.

    Only a checked result is saved (fold_model with example_inputs), so the file holds a proven model.
    Returns the manifest's path.
    """
    from bnstrip._version import __version__
    from bnstrip.io.manifest import manifest_document, manifest_path, save_with_manifest
    from bnstrip.io.write import check_output_path

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
    manifest = manifest_document(architecture, result.manifest_entries(), result.check, output)
    metadata = {"bnstrip_version": __version__, "architecture": architecture, "form": result.form,
                "folded_pairs": ",".join(f"{layer}+{bn}" for layer, bn in result.folded), "eps": repr(result.eps)}
    save_with_manifest(result.model.state_dict(), output, manifest, force=force, metadata=metadata,
                       replace_manifest=force)
    return manifest_path(output)

"""The `.pt2` jobs of the one writer path: an exported program IN -> fold -> export again -> check -> OUT.pt2
(`fuse_program_file`), and a state_dict IN with `--arch` -> fold -> export -> check -> OUT.pt2
(`fuse_arch_to_program`). They reuse bnstrip.pipeline's loading and report helpers; like it, this module
writes only through bnstrip.io.write.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from bnstrip.core.compare import SelfCheck, model_dtype
from bnstrip.errors import InputError
from bnstrip.fold.model import FoldResult
from bnstrip.pipeline import _as_model_dtype, _converted, build_loaded, fuse_report_dict


@dataclass
class ProgramReport:
    """What `bnstrip fuse` did with a program: IN.pt2 -> OUT.pt2, or --arch IN -> OUT.pt2."""

    input: str
    output: str
    arch: str
    self_check: SelfCheck
    result: FoldResult
    dynamic_dims: list[str] = field(default_factory=list)
    input_shape: list[int] = field(default_factory=list)
    seconds: float = 0.0
    source_format: str = "pt2"

    def to_dict(self) -> dict[str, Any]:
        """The report as one JSON object, with the keys of every path (`fuse_report_dict`)."""
        entries = {**self.result.manifest_entries(), "form": "program"}
        dtype = next((str(p.dtype).replace("torch.", "") for p in self.result.model.parameters()
                      if p.is_floating_point()), None)
        return fuse_report_dict(self.input, self.output, self.arch, entries, self.self_check,
                                input_shape=self.input_shape, dtype=dtype, source_format=self.source_format,
                                dynamic_dims=self.dynamic_dims, warnings=list(self.result.warnings),
                                seconds=self.seconds)


def is_program_path(path: str) -> bool:
    """An OUT that is a program: by suffix (OUT does not exist yet); an IN: by content (bnstrip.io.pt2.is_pt2)."""
    return Path(path).suffix.lower() == ".pt2"


def write_program(program: Any, output_path: str, input_path: str, force: bool) -> None:
    """torch.export.save into memory, then bnstrip's own plain writes through the one atomic writer (bnstrip.io.write).

    torch's native zip writer aborts the process (SIGABRT) when a write fails, e.g. on a full disk, so it never
    touches a file: a failed write is then the same one-line error as for every other output.
    """
    import io

    from bnstrip.io.write import write_bytes_atomically

    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    write_bytes_atomically(Path(output_path), buffer.getbuffer(), replace=force)


def fuse_program_file(input_path: str, output_path: str, *, eps: float | None = None, allow_overflow: bool = False,
                      force: bool = False, dry_run: bool = False) -> ProgramReport:
    """IN.pt2 -> fold_program (its own check) -> OUT.pt2; IN is validated before anything else runs.

    `dry_run`: everything but the write (OUT is neither checked nor written)."""
    from bnstrip.fold.program import fold_program
    from bnstrip.io.pt2 import load_program
    from bnstrip.io.write import check_output_path

    started = time.perf_counter()
    program = load_program(input_path)
    if not dry_run:
        check_output_path(output_path, [input_path], force, what="program", checkpoint=False)
    result = fold_program(program, eps=eps, allow_overflow=allow_overflow, name=str(input_path))
    assert result.self_check is not None
    if not dry_run:
        write_program(result.program, output_path, input_path, force)
    return ProgramReport(input=str(input_path), output=str(output_path), arch="program", self_check=result.self_check,
                         result=result, dynamic_dims=result.dynamic_dims, seconds=time.perf_counter() - started)


def _export_batch(model: nn.Module, folded: nn.Module, inputs: tuple[Any, ...], name: str,
                  dynamic_batch: bool, sensitivity: float | None = None
                  ) -> tuple[Any, SelfCheck, list[str], list[str]]:
    """Export the folded module with dim 0 of every tensor input as one dynamic `batch` (>= 1), or static.

    A model whose code fixes the batch (a reshape to a constant, say) does not export with a dynamic
    batch: then it is exported with the example's batch, and the warning says so.
    (program, check, dynamic dim names, warnings)
    """
    from bnstrip.errors import first_line
    from bnstrip.fold.program import export_folded

    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1)
        spec = tuple({0: batch} if isinstance(t, torch.Tensor) and t.dim() else None for t in inputs)
        try:
            program, check = export_folded(model, folded, inputs, name=name, dynamic=spec, sensitivity=sensitivity)
            return program, check, ["batch"], []
        except InputError as exc:
            note = (f"{name}: the folded model does not export with a dynamic batch dimension ({first_line(exc, 160)}); "
                    f"OUT.pt2 takes batches of {int(inputs[0].shape[0])} only")
            program, check = export_folded(model, folded, inputs, name=name, sensitivity=sensitivity)
            return program, check, [], [note]
    program, check = export_folded(model, folded, inputs, name=name, sensitivity=sensitivity)
    return program, check, [], []


def _with_batch_two(example_inputs: Any) -> tuple[Any, ...]:
    """torch.export fixes a dim whose example size is 1: a dynamic batch is exported from a batch of 2."""
    items = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    return tuple(torch.cat([t, t.flip(0) * 0.5]) if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == 1
                 else t for t in items)


def fuse_arch_to_program(input_path: str, output_path: str, model_factory: Callable[[], nn.Module],
                         example_inputs: Any, *, arch: str, eps: float | None = None, allow_overflow: bool = False,
                         force: bool = False, dtype: str = "keep", dynamic_batch: bool = True,
                         dry_run: bool = False) -> ProgramReport:
    """--arch IN -> fold_model (its check) -> export the folded module -> check the program -> OUT.pt2.

    `dynamic_batch` (the default) exports dim 0 of the inputs as a dynamic batch (from a batch of at least 2,
    see _with_batch_two); False fixes it at the example's size. `dry_run`: everything but the write.
    """
    from bnstrip.fold.model import fold_model
    from bnstrip.io.checkpoint import load_checkpoint
    from bnstrip.io.write import check_output_path

    started = time.perf_counter()
    loaded = load_checkpoint(input_path)
    state = _converted(loaded.state_dict, dtype, str(input_path))
    if not dry_run:
        check_output_path(output_path, [input_path], force, what="program", checkpoint=False)
    model = build_loaded(model_factory, state, input_path)
    del state
    if dynamic_batch:
        example_inputs = _with_batch_two(example_inputs)
    inputs = _as_model_dtype(example_inputs, model_dtype(model))
    result = fold_model(model, inputs, eps=eps, allow_overflow=allow_overflow)
    sensitivity = result.check.sensitivity if result.check else None
    program, check, dims, notes = _export_batch(model, result.model, inputs, f"{input_path} ({arch})", dynamic_batch,
                                                sensitivity)
    result.warnings.extend(notes)
    if not dry_run:
        write_program(program, output_path, input_path, force)
    shape = list(map(int, inputs[0].shape)) if isinstance(inputs[0], torch.Tensor) else []
    return ProgramReport(input=str(input_path), output=str(output_path), arch=arch, self_check=check, result=result,
                         dynamic_dims=dims, input_shape=shape, seconds=time.perf_counter() - started,
                         source_format=loaded.format)

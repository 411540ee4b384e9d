"""fuse_file: IN -> load -> model -> fold -> one check -> write OUT (and its manifest). The only code that writes outputs.

Two jobs share it. The generic one (`model_factory` is any nn.Module factory, as `--arch`
gives) loads IN strictly into the factory's model, folds it with `fold_model`, whose check on
the example inputs is the one check, and writes the folded state_dict plus OUT.bnstrip.json.
The smallNet job (`model_factory` is SmallNetTrain) folds the state_dict with the course's
pairs, checks it with the same comparator, and converts it to a smallNetTest state_dict.

Order, so that nothing is lost: IN is validated and loaded first (a swapped IN/OUT is named as
such), then every path that will be written is checked (names, temp names, existing files),
then the long work runs, and only then the manifest is written and OUT put in place.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from bnstrip.core.compare import SelfCheck, model_dtype
from bnstrip.errors import CheckFailed, InputError
from bnstrip.fold.model import FoldResult
from bnstrip.refusals import refusal

DTYPES = {"keep": None, "float32": torch.float32, "float64": torch.float64}


@dataclass
class FuseReport:
    """What fuse_file did, for the table and the JSON of `bnstrip fuse`."""

    input: str
    output: str
    arch: str
    dtype: str
    source_format: str
    self_check: SelfCheck
    pairs: list[tuple[str, str]]
    eps: float | None
    manifest: str | None = None
    input_shape: list[int] = field(default_factory=list)
    result: FoldResult | None = None
    unwrapped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The report as one JSON object, with the keys of every path (`fuse_report_dict`)."""
        if self.result is not None:
            entries = self.result.manifest_entries()
            merge_refused = [{"where": where, **refusal(reason).to_dict()} for where, reason in self.result.merge_refused]
        else:  # the smallNet job: the course's pairs, all into the layer before
            entries = {"form": "smallNetTest", "tracer": None, "eps": self.eps, "gained_bias": [], "merged": [],
                       "folded": [{"layer": p, "bn": b, "into": "producer"} for p, b in self.pairs], "skipped": []}
            merge_refused = []
        return fuse_report_dict(self.input, self.output, self.arch, entries, self.self_check, manifest=self.manifest,
                                input_shape=self.input_shape, dtype=self.dtype, source_format=self.source_format,
                                merge_refused=merge_refused, unwrapped=self.unwrapped, warnings=self.warnings,
                                seconds=self.seconds)


FUSE_JSON_KEYS = (
    "input", "output", "manifest", "arch", "input_shape", "form", "tracer", "eps", "dtype", "format", "folded",
    "skipped", "pairs", "gained_bias", "merged", "merge_refused", "dynamic_dims", "self_check_max_abs_diff",
    "self_check_output_scale", "self_check_rounding", "self_check_sensitivity", "self_check_tolerance",
    "self_check_samples", "unwrapped", "warnings", "seconds", "dry_run")
"""The keys of `bnstrip fuse --json` after the shared ones, the same on every path (smallNet, --arch, .pt2).
`pairs` ({producer, bn}) is a deprecated alias of `folded`, kept for scripts written for smallNet's output."""


def fuse_report_dict(input_path: str, output: str, arch: str, entries: dict[str, Any], check: SelfCheck, *,
                     manifest: str | None = None, input_shape: list[int] | None = None, dtype: str | None = None,
                     source_format: str | None = None, merge_refused: list[dict[str, Any]] | None = None,
                     dynamic_dims: list[str] | None = None, unwrapped: list[str] | None = None,
                     warnings: list[str] | None = None, seconds: float = 0.0) -> dict[str, Any]:
    """One fuse report with FUSE_JSON_KEYS, whatever the path; `entries` as FoldResult.manifest_entries gives."""
    report = {
        "input": input_path, "output": output, "manifest": manifest, "arch": arch, "input_shape": input_shape or [],
        "form": entries["form"], "tracer": entries["tracer"], "eps": entries["eps"], "dtype": dtype,
        "format": source_format, "folded": entries["folded"], "skipped": entries["skipped"],
        "pairs": [{"producer": f["layer"], "bn": f["bn"]} for f in entries["folded"]],
        "gained_bias": entries["gained_bias"], "merged": entries.get("merged", []), "merge_refused": merge_refused or [],
        "dynamic_dims": dynamic_dims or [], "self_check_max_abs_diff": check.max_abs_diff,
        "self_check_output_scale": check.output_scale, "self_check_rounding": check.rounding,
        "self_check_sensitivity": check.sensitivity, "self_check_tolerance": check.tolerance,
        "self_check_samples": check.samples, "unwrapped": unwrapped or [], "warnings": warnings or [],
        "seconds": seconds, "dry_run": False,  # the CLI's --dry-run sets it
    }
    assert tuple(report) == FUSE_JSON_KEYS
    return report


@dataclass
class _Folded:
    """What a job hands to the writer: the state_dict for OUT, the check, and the manifest entries (generic job)."""

    state: dict[str, torch.Tensor]
    check: SelfCheck
    pairs: list[tuple[str, str]]
    warnings: list[str]
    result: FoldResult | None = None


def check_outputs(output_path: str, input_path: str, force: bool, with_manifest: bool) -> None:
    """Every path fuse_file will write is checked (name length, input, existing file, directory) before any is."""
    from bnstrip.io.manifest import manifest_path
    from bnstrip.io.write import check_output_path

    check_output_path(output_path, [input_path], force)
    if with_manifest:
        check_output_path(manifest_path(output_path), [input_path], force, what="manifest", checkpoint=False)


def _state_dtype(state: Mapping[str, torch.Tensor]) -> torch.dtype | None:
    dtypes = {t.dtype for t in state.values() if isinstance(t, torch.Tensor) and t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def _converted(state: dict[str, Any], dtype: str, source: str = "checkpoint") -> dict[str, Any]:
    """The state_dict in `dtype` ('keep' leaves it as it is); integer tensors (num_batches_tracked) stay.

    float8 tensors load, but torch has no float8 arithmetic to fold or check them in: 'keep' refuses them, by name.
    """
    if dtype not in DTYPES:
        raise InputError(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    target = DTYPES[dtype]
    if target is None:
        float8 = next((k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
                       and v.element_size() == 1), None)
        if float8 is not None:
            raise InputError(f"{source}: tensor {float8} is {str(state[float8].dtype).replace('torch.', '')}, which torch "
                             "cannot compute with to fold and check; pass dtype='float32'")
        return state
    return {k: v.to(target) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in state.items()}


def build_loaded(model_factory: Callable[[], nn.Module], state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """The factory's model holding IN's tensors (strict load with assign=True: no second copy of the weights).

    The model is built on the meta device when that leaves no meta tensor behind after the load
    (no random initialisation of weights that are replaced anyway); otherwise it is built normally.
    """
    from bnstrip.fold.load import load_state_strict

    try:
        with torch.device("meta"):
            model = model_factory()
    except Exception:  # noqa: BLE001 - a constructor that runs the model (ultralytics' stride probe): build it normally
        model = None
    if model is not None:
        load_state_strict(model, state, source, assign=True)
    if model is None or any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        model = model_factory()
        dtype = _state_dtype(state)
        if dtype is not None:
            model = model.to(dtype)
        load_state_strict(model, state, source, assign=True)
    return model.eval()


def _as_model_dtype(example_inputs: Any, dtype: torch.dtype) -> tuple[Any, ...]:
    """The example inputs as a tuple, floating-point tensors in the model's dtype."""
    items = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in items)


def _fold_generic(model: nn.Module, example_inputs: tuple[Any, ...], source: str, output: str, name: str, *,
                  eps: float | None,
                  keep_structure: bool, allow_overflow: bool, reparameterize: bool = False) -> _Folded:
    from bnstrip.fold.model import fold_model

    result = fold_model(model, example_inputs, eps=eps, keep_structure=keep_structure, allow_overflow=allow_overflow,
                        reparameterize=reparameterize)
    check = result.check
    if check is None or not check.passed:
        hint = ""
        if keep_structure and eps is not None and result.skipped:
            hint = (f"; {len(result.skipped)} BatchNorms were not folded and keep the model's own eps, not "
                    f"eps={eps}")
        figures = check.describe() if check is not None else "the folded model's outputs do not match"
        raise CheckFailed(f"{source}: folded {name} differs from the original: {figures}{hint}; not writing {output}")
    return _Folded(state=result.model.state_dict(), check=check, pairs=list(result.folded),
                   warnings=list(result.warnings), result=result)


def _manifest(folded: _Folded, name: str, shape: list[int], input_path: str, output_path: str, source_sha256: str,
              entries: dict[str, Any]) -> dict[str, Any]:
    """What load_folded needs, and the evidence (the check's figures); OUT's sha256 is added when it is known."""
    from bnstrip.io.manifest import manifest_document

    return manifest_document(name, entries, folded.check, output_path, input_shape=shape, source=str(input_path),
                             source_sha256=source_sha256)


def _fold_smallnet(state: dict[str, Any], eps: float | None, input_path: str,
                   allow_overflow: bool) -> tuple[_Folded, float]:
    """The smallNet job: the course's pairs folded in float64, checked, as a smallNetTest state_dict."""
    from bnstrip.homework.models import SMALLNET_EPS
    from bnstrip.homework.smallnet import fuse_smallnet, half_precision_warning

    eps_used = SMALLNET_EPS if eps is None else eps
    done = fuse_smallnet(state, eps=eps_used, source=input_path, allow_overflow=allow_overflow)
    return _Folded(state=done.state_dict, check=done.self_check, pairs=list(done.pairs),
                   warnings=done.warnings + half_precision_warning(done.state_dict)), eps_used


def fuse_file(input_path: str, output_path: str, model_factory: Callable[[], nn.Module],
              example_inputs: Any = None, *, eps: float | None = None, keep_structure: bool = False,
              allow_overflow: bool = False, force: bool = False, dtype: str = "keep",
              arch: str | None = None, reparameterize: bool = False, dry_run: bool = False) -> FuseReport:
    """Load IN, fold it into `model_factory`'s model, check once, write OUT (see the module docstring).

    `example_inputs` (a tensor or tuple) trace and check the generic job; `arch` names the model
    in messages and metadata. `dtype` ('keep', 'float32', 'float64') converts IN before folding.
    `reparameterize` also merges parallel branches (generic job only); `dry_run` does all but check and write OUT.
    """
    from bnstrip import __version__
    from bnstrip.homework.models import SmallNetTrain
    from bnstrip.io.checkpoint import load_checkpoint
    from bnstrip.io.manifest import manifest_path

    started = time.perf_counter()
    smallnet = model_factory is SmallNetTrain
    loaded = load_checkpoint(input_path)
    state = _converted(loaded.state_dict, dtype, str(input_path))
    name = "smallNetTest" if smallnet else str(arch or getattr(model_factory, "__name__", "model"))
    if smallnet:
        from bnstrip.homework.smallnet import refuse_swapped_arguments

        refuse_swapped_arguments(state, input_path)
        if reparameterize:
            raise InputError("smallNet has no parallel branches to merge: reparameterize=True goes with an arch model")
    elif example_inputs is None:
        raise InputError(f"{name}: example_inputs are required to trace and check the model")
    if not dry_run:
        check_outputs(output_path, input_path, force, with_manifest=not smallnet)
    metadata = {"source_sha256": loaded.sha256, "bnstrip_version": __version__, "architecture": name}
    eps_used: float | None
    if smallnet:
        folded, eps_used = _fold_smallnet(state, eps, input_path, allow_overflow)
        written_dtype = None
        del state
    else:
        model = build_loaded(model_factory, state, input_path)
        del state
        loaded.state_dict.clear()  # the model holds IN's tensors now: keep no second reference
        inputs = _as_model_dtype(example_inputs, model_dtype(model))
        folded = _fold_generic(model, inputs, input_path, output_path, name, eps=eps, keep_structure=keep_structure,
                               allow_overflow=allow_overflow, reparameterize=reparameterize)
        written_dtype, eps_used = model_dtype(model), eps
        del model
    written_dtype = written_dtype or _state_dtype(folded.state) or torch.float32
    entries = folded.result.manifest_entries() if folded.result is not None else {}
    metadata.update({"folded_pairs": ",".join(f"{p}+{b}" for p, b in folded.pairs), "eps": repr(eps_used)})
    if entries:
        metadata["form"] = entries["form"]
    shape = list(map(int, inputs[0].shape)) if not smallnet and isinstance(inputs[0], torch.Tensor) else []
    manifest = None if smallnet else _manifest(folded, name, shape, input_path, output_path, loaded.sha256, entries)
    if not dry_run:
        from bnstrip.io.manifest import save_with_manifest

        save_with_manifest(folded.state, output_path, manifest, force=force, inputs=[input_path], metadata=metadata)
    return FuseReport(input=str(input_path), output=str(output_path), arch=name,
                      dtype=str(written_dtype).replace("torch.", ""), source_format=loaded.format,
                      self_check=folded.check, pairs=folded.pairs, eps=eps_used,
                      manifest=None if smallnet or dry_run else str(manifest_path(output_path)), input_shape=shape,
                      result=folded.result, unwrapped=list(loaded.unwrapped), warnings=folded.warnings,
                      seconds=time.perf_counter() - started)

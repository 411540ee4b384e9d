"""Models by name from the libraries people have: `torchvision:NAME`, `timm:NAME`, `ultralytics:CONFIG.yaml`.

Each source is resolved through its own package when it is installed (optional extras:
`pip install 'bnstrip[models]'`; bnstrip never needs them) and built without weights
(torchvision `weights=None`, timm `pretrained=False`, ultralytics from its yaml), so nothing is
downloaded: the weights come from the checkpoint. Like `--arch MODULE:CALLABLE`, this runs the
package's code, by design.

When a package fails to import, the error names the package and why in one line. The usual
cause on a CPU machine is a CUDA torchvision wheel beside a CPU torch: its C ops do not load and
`import torchvision` (and so `import timm`) fails with "operator torchvision::nms does not exist".
bnstrip does not paper over that (a torchvision without its C ops is broken for detection
models); the message names the fix, a torchvision build that matches the installed torch.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable

from bnstrip.errors import InputError, first_line

SOURCES = ("torchvision", "timm", "ultralytics")
"""Spec prefixes that name a model through a library instead of MODULE:CALLABLE."""

EXTRA = "pip install 'bnstrip[models]'"


@dataclass(frozen=True)
class SourceSpec:
    """`timm:efficientnet_b0` -> SourceSpec('timm', 'efficientnet_b0')."""

    source: str
    name: str


def parse_source(spec: str) -> SourceSpec | None:
    """A SourceSpec when `spec` names one of SOURCES, else None (then it is MODULE:CALLABLE)."""
    prefix, sep, name = spec.strip().partition(":")
    if not sep or prefix not in SOURCES:
        return None
    if not name.strip():
        example = "yolov8n.yaml" if prefix == "ultralytics" else "resnet18"
        raise InputError(f"--arch {spec!r}: name the model after '{prefix}:', e.g. --arch {prefix}:{example}")
    return SourceSpec(prefix, name.strip())


def _matching_torchvision(torch_version: str) -> str:
    """The torchvision release made for this torch (0.15 for 2.0, ... 0.28 for 2.13), as a pip requirement."""
    match = re.match(r"2\.(\d+)", torch_version)
    return f"torchvision==0.{int(match.group(1)) + 15}.*" if match else "torchvision"


def _installed_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def torchvision_mismatch_fix() -> str:
    """The command that installs a torchvision built for the installed torch (CPU index for a CPU torch)."""
    import torch

    index = " --index-url https://download.pytorch.org/whl/cpu" if "+cpu" in torch.__version__ else ""
    return f"pip install '{_matching_torchvision(torch.__version__)}'{index}"


def import_failure(package: str, spec: str, exc: BaseException) -> InputError:
    """One line: which package failed to import, why, and the fix."""
    text = first_line(exc, 300, type(exc).__name__)
    if isinstance(exc, ModuleNotFoundError) and exc.name and exc.name.split(".")[0] == package:
        return InputError(f"--arch {spec!r}: {package} is not installed; install it (pip install {package}, or {EXTRA})")
    if "torchvision::" in text:
        import torch

        return InputError(
            f"--arch {spec!r}: importing {package} failed because torchvision {_installed_version('torchvision')} does "
            f"not match torch {torch.__version__} (its C ops did not load: {text}); install the torchvision build "
            f"for this torch: {torchvision_mismatch_fix()}")
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        return InputError(f"--arch {spec!r}: importing {package} failed because it needs module {exc.name!r}, which "
                          "is not installed; install it")
    return InputError(f"--arch {spec!r}: importing {package} {_installed_version(package)} failed "
                      f"({type(exc).__name__}: {text}); reinstall {package}")


def _import(package: str, spec: str, module: str | None = None) -> Any:
    """Import the package; what it prints while importing (ultralytics' settings notice) goes to stderr."""
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return importlib.import_module(module or package)
    except Exception as exc:  # noqa: BLE001 - any import failure is one line naming the package
        raise import_failure(package, spec, exc) from None


def _torchvision_builder(name: str, spec: str) -> Callable[..., Any]:
    models = _import("torchvision", spec, "torchvision.models")
    builder = None
    if hasattr(models, "list_models") and hasattr(models, "get_model_builder"):
        if name in models.list_models():
            builder = models.get_model_builder(name)
    elif callable(getattr(models, name, None)) and not name.startswith("_"):
        builder = getattr(models, name)
    if builder is None:
        known = sorted(models.list_models()) if hasattr(models, "list_models") else []
        close = [m for m in known if name.lower()[:4] in m][:6]
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise InputError(f"--arch {spec!r}: torchvision has no model {name!r}{hint}")
    return lambda **kwargs: builder(**{"weights": None, **kwargs})


def _timm_builder(name: str, spec: str) -> Callable[..., Any]:
    timm = _import("timm", spec)
    if hasattr(timm, "is_model") and not timm.is_model(name):
        close = timm.list_models(f"*{name[:6]}*")[:6] if hasattr(timm, "list_models") else []
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise InputError(f"--arch {spec!r}: timm has no model {name!r}{hint}")
    return lambda **kwargs: timm.create_model(name, **{"pretrained": False, **kwargs})


def _ultralytics_builder(name: str, spec: str) -> Callable[..., Any]:
    """The nn.Module of YOLO(CONFIG.yaml): built from the yaml (a bundled name or a path), no weights, no download."""
    if not name.lower().endswith((".yaml", ".yml")):
        raise InputError(f"--arch {spec!r}: ultralytics models are built from their config, e.g. "
                         "--arch ultralytics:yolov8n.yaml (a .pt name would download weights)")
    os.environ.setdefault("YOLO_OFFLINE", "1")  # no update or telemetry checks while importing
    ultralytics = _import("ultralytics", spec)

    def build(**kwargs: Any) -> Any:
        model = ultralytics.YOLO(name).model
        if kwargs:  # e.g. {"nc": 10}: the task's model class (DetectionModel, ...) built again from the same config
            model = type(model)(model.yaml, **kwargs)
        for module in model.modules():  # Detect heads cache their anchor grid per input shape; a traced run would
            if hasattr(module, "dynamic") and hasattr(module, "anchors"):  # leave a traced grid behind: rebuild it
                module.dynamic = True  # on every call instead (the same values, as ultralytics' own export does)
        return model

    return build


_BUILDERS: dict[str, Callable[[str, str], Callable[..., Any]]] = {
    "torchvision": _torchvision_builder, "timm": _timm_builder, "ultralytics": _ultralytics_builder,
}


def source_builder(source: SourceSpec, spec: str) -> Callable[..., Any]:
    """Import the source's package now (so a failure is named before any file is read) and return the builder."""
    return _BUILDERS[source.source](source.name, spec)

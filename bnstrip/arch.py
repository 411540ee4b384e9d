"""Build a user's model from a "MODULE:CALLABLE" spec, as `--arch` takes it (or a library's model by name).

The CLI only has a checkpoint (a state_dict); the code that defines the network
lives in the user's own module. `--arch` runs that code, by design. We import it
from the current directory, call the class or factory (with `--arch-kwargs`, if given), and insist
on an nn.Module, so every failure is one line that says what to fix.

The current directory is importable only for that: only while MODULE is imported and
its CALLABLE called, and then only for MODULE's own top-level name and for imports
made by files in the current directory.  torch and the libraries it imports lazily
(sympy, gmpy2, tabulate, ...) never pick up a same-named file lying beside the
checkpoint, and the current directory is taken off sys.path for the rest of the run
(`python -m bnstrip` puts it first).

`torchvision:NAME`, `timm:NAME` and `ultralytics:CONFIG.yaml` name a model through that
library instead (bnstrip.model_sources); `--arch-kwargs` passes keyword arguments to either.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import inspect
import os
import sys
from typing import TYPE_CHECKING, Any, Callable, Iterator

from bnstrip.errors import InputError, first_line

if TYPE_CHECKING:
    from torch import nn


def parse_arch_spec(spec: str) -> tuple[str, str]:
    """'pkg.mod:Factory' -> ('pkg.mod', 'Factory'); InputError for anything else."""
    module_name, sep, attr_path = spec.strip().partition(":")
    if not sep or not module_name or not attr_path:
        raise InputError(f"--arch {spec!r}: expected MODULE:CALLABLE, e.g. --arch mypkg.models:ResNet18")
    if module_name.endswith(".py") or "/" in module_name or "\\" in module_name:
        hint = module_name.removesuffix(".py").replace("/", ".").replace("\\", ".").strip(".")
        raise InputError(f"--arch {spec!r}: MODULE is a dotted module name, not a file path; try --arch {hint}:{attr_path}")
    return module_name, attr_path


def _is_cwd_entry(entry: str, cwd: str) -> bool:
    return entry in ("", ".") or os.path.abspath(entry) == cwd


class _CwdFinder(importlib.abc.MetaPathFinder):
    """Finds modules in the current directory for MODULE's top-level name, or for an import made from a file there."""

    def __init__(self, cwd: str, top_level: str) -> None:
        self.cwd = cwd
        self.top_level = top_level

    def _from_user_code(self) -> bool:
        """Is the import statement in a file of the current directory (not in torch, sympy, ...)?"""
        frame = sys._getframe(2)
        while frame is not None:
            filename = frame.f_code.co_filename
            if not filename.startswith("<frozen importlib"):
                return os.path.dirname(os.path.abspath(filename)) == self.cwd or filename == __file__
            frame = frame.f_back
        return False

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if path is not None or "." in fullname:
            return None  # submodules are found through their package's __path__
        if fullname != self.top_level and not self._from_user_code():
            return None
        return importlib.machinery.PathFinder.find_spec(fullname, [self.cwd])


@contextlib.contextmanager
def user_code_importable(module_name: str) -> Iterator[None]:
    """The current directory is importable (see the module doc) inside the block and nowhere else."""
    cwd = os.path.abspath(os.getcwd())
    sys.path[:] = [entry for entry in sys.path if not _is_cwd_entry(entry, cwd)]
    finder = _CwdFinder(cwd, module_name.split(".", 1)[0])
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(finder)


def import_callable(spec: str) -> Callable[..., Any]:
    """Import MODULE and resolve CALLABLE (dotted attributes allowed, e.g. Models.small)."""
    module_name, attr_path = parse_arch_spec(spec)
    try:
        with user_code_importable(module_name):
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise InputError(f"--arch {spec!r}: module {module_name!r} not found in the current directory ({os.getcwd()}) "
                             "or on PYTHONPATH; run from the folder that holds it or add it to PYTHONPATH") from None
        raise InputError(f"--arch {spec!r}: importing {module_name!r} failed because it needs module {missing!r}, "
                         "which is not installed; install it") from None
    except Exception as exc:  # the user's module raised while importing
        raise InputError(f"--arch {spec!r}: importing {module_name!r} raised {type(exc).__name__}: {first_line(exc)}; "
                         "fix the module") from None
    target: Any = module
    walked = module_name
    for part in attr_path.split("."):
        if not hasattr(target, part):
            available = sorted(n for n in dir(target) if not n.startswith("_") and callable(getattr(target, n, None)))
            shown = ", ".join(available[:8]) + (" ..." if len(available) > 8 else "")
            raise InputError(f"--arch {spec!r}: {walked!r} has no attribute {part!r}; "
                             f"callables it has: {shown or 'none'}")
        target = getattr(target, part)
        walked = f"{walked}.{part}"
    if not callable(target):
        raise InputError(f"--arch {spec!r}: {attr_path!r} is a {type(target).__name__}, not a class or factory; "
                         "point --arch at something callable")
    return target


def _required_parameters(target: Callable[..., Any]) -> list[str]:
    """Names of parameters the call would need; [] when the signature cannot be read."""
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return []
    return [name for name, p in signature.parameters.items()
            if p.default is inspect.Parameter.empty
            and p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                           inspect.Parameter.KEYWORD_ONLY)]


def parse_arch_kwargs(text: str | None) -> dict[str, Any]:
    """`--arch-kwargs '{"num_classes": 10}'` -> {'num_classes': 10}; InputError for anything but a JSON object."""
    import json

    if text is None or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InputError(f"--arch-kwargs {text!r}: not JSON ({first_line(exc)}); "
                         "write a JSON object, e.g. --arch-kwargs '{\"num_classes\": 10}'") from None
    if not isinstance(value, dict):
        raise InputError(f"--arch-kwargs {text!r}: a JSON object of keyword arguments is needed, not a "
                         f"{type(value).__name__}, e.g. --arch-kwargs '{{\"num_classes\": 10}}'")
    return value


def _resolve(spec: str) -> tuple[Callable[..., Any], str, str | None]:
    """(callable, its name for messages, MODULE to make importable while it runs or None for a library source)."""
    from bnstrip.model_sources import parse_source, source_builder

    source = parse_source(spec)
    if source is not None:
        return source_builder(source, spec), spec, None
    return import_callable(spec), spec.partition(":")[2], spec.partition(":")[0]


def import_arch(spec: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Build the nn.Module that `spec` names (MODULE:CALLABLE, torchvision:NAME, timm:NAME, ultralytics:CONFIG.yaml).

    `kwargs` go to the class or factory (`--arch-kwargs`). Whatever the model's code prints goes to
    stderr, so stdout keeps only bnstrip's result (one JSON object with --json).
    """
    target, shown, module_name = _resolve(spec)
    return _build(spec, target, shown, module_name, dict(kwargs or {}))


def arch_factory(spec: str, kwargs: dict[str, Any] | None = None) -> Callable[[], nn.Module]:
    """A no-argument factory for `spec`, resolved now: a wrong spec or a missing package is named before any file is
    read, and no model is built yet (memory)."""
    target, shown, module_name = _resolve(spec)
    arguments = dict(kwargs or {})
    if module_name is not None:
        _refuse_missing_arguments(spec, target, shown, arguments)
    return lambda: _build(spec, target, shown, module_name, arguments)


def _refuse_missing_arguments(spec: str, target: Callable[..., Any], shown: str, kwargs: dict[str, Any]) -> None:
    required = [name for name in _required_parameters(target) if name not in kwargs]
    if required:
        raise InputError(f"--arch {spec!r}: {shown} needs arguments ({', '.join(required)}); pass them with "
                         "--arch-kwargs JSON or wrap it in a factory function that takes none")


def _build(spec: str, target: Callable[..., Any], shown: str, module_name: str | None,
           kwargs: dict[str, Any]) -> nn.Module:
    from torch import nn

    if module_name is not None:
        _refuse_missing_arguments(spec, target, shown, kwargs)
    importable = user_code_importable(module_name) if module_name is not None else contextlib.nullcontext()
    try:
        with importable, contextlib.redirect_stdout(sys.stderr):
            model = target(**kwargs)
    except InputError:
        raise
    except Exception as exc:  # the user's (or the library's) constructor raised
        given = f"**{kwargs}" if kwargs else ""
        raise InputError(f"--arch {spec!r}: calling {shown}({given}) raised {type(exc).__name__}: "
                         f"{first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise InputError(f"--arch {spec!r}: {shown}() returned a {type(model).__name__}, not a "
                         "torch.nn.Module; point --arch at the model class or a factory that returns one")
    return model

"""Build a user's model from a "MODULE:CALLABLE" spec, as `--arch` takes it.

The CLI only has a checkpoint (a state_dict); the code that defines the network
lives in the user's own module. We import it the way `python -c "import MODULE"`
would from the current directory, call the class or factory with no arguments,
and insist on an nn.Module, so every failure is one line that says what to fix.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import TYPE_CHECKING, Any, Callable

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


def _ensure_cwd_on_path() -> None:
    """`python -m` puts the current directory first on sys.path; a console script does not, so we do."""
    cwd = os.getcwd()
    if not any(entry in ("", ".", cwd) for entry in sys.path):
        sys.path.insert(0, cwd)


def import_callable(spec: str) -> Callable[..., Any]:
    """Import MODULE and resolve CALLABLE (dotted attributes allowed, e.g. Models.small)."""
    module_name, attr_path = parse_arch_spec(spec)
    _ensure_cwd_on_path()
    try:
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


def import_arch(spec: str) -> "nn.Module":
    """Import MODULE:CALLABLE, call it with no arguments and return the nn.Module it builds."""
    from torch import nn

    target = import_callable(spec)
    required = _required_parameters(target)
    if required:
        raise InputError(f"--arch {spec!r}: {spec.partition(':')[2]} needs arguments ({', '.join(required)}); "
                         "wrap it in a factory function that takes none")
    try:
        model = target()
    except Exception as exc:  # the user's constructor raised
        raise InputError(f"--arch {spec!r}: calling {spec.partition(':')[2]}() raised {type(exc).__name__}: "
                         f"{first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise InputError(f"--arch {spec!r}: {spec.partition(':')[2]}() returned a {type(model).__name__}, not a "
                         "torch.nn.Module; point --arch at the model class or a factory that returns one")
    return model



"""What every command shares: one-line errors with the right exit code, JSON/Rich output, progress.

Only click is imported here (rich lazily), so `bnstrip --help` stays fast.
"""
from __future__ import annotations

import functools
import json
import math
import os
import sys
from typing import Any, Callable, TypeVar

import click

from bnstrip.errors import BnstripError

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT = 0, 1, 2

DEFAULT_CHECKPOINT = "smallNetSaved"
"""The trained smallNetTrain checkpoint shipped at the top of the repository (the course's file name)."""


def debug_enabled() -> bool:
    return os.environ.get("BNSTRIP_DEBUG", "") not in ("", "0")


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    """Print one line to stderr and exit with `code`."""
    click.echo(f"bnstrip: error: {message}", err=True)
    sys.exit(code)


def handle_errors(func: F) -> F:
    """Map library exceptions to one stderr line and an exit code; tracebacks only with BNSTRIP_DEBUG=1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except BnstripError as exc:
            if debug_enabled():
                raise
            fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, exc.exit_code)
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except MemoryError:
            if debug_enabled():
                raise
            fail("out of memory; use a smaller --batch-size or a machine with more memory")
        except Exception as exc:  # noqa: BLE001 - last line of defence: one line, not a traceback
            if debug_enabled():
                raise
            text = str(exc).strip().splitlines()
            fail(f"{type(exc).__name__}: {text[0] if text else ''} (set BNSTRIP_DEBUG=1 for a traceback)")

    return wrapper  # type: ignore[return-value]


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def emit_json(payload: dict[str, Any]) -> None:
    """Exactly one JSON object on stdout (NaN/Inf become strings so any parser reads it)."""
    click.echo(json.dumps(_json_safe(payload), indent=2, sort_keys=False))


def stdout_console():
    from rich.console import Console

    return Console(highlight=False)


def stderr_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def warn(message: str) -> None:
    click.echo(f"bnstrip: warning: {message}", err=True)


def make_table(title: str, columns: list[str], rows: list[list[Any]]):
    """A Rich table with the given columns; cells are str()-ed."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*[str(cell) for cell in row])
    return table


def fmt(value: float, digits: int = 3) -> str:
    """Short scientific/decimal formatting for tables."""
    if value == 0 or not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}g}" if abs(value) >= 1e-3 else f"{value:.{digits}e}"


def parse_int_list(text: str, name: str) -> list[int]:
    """'1,32,100' -> [1, 32, 100]; a click.BadParameter (exit 2) otherwise."""
    try:
        values = [int(part) for part in text.split(",") if part.strip() != ""]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers", param_hint=name) from None
    if not values:
        raise click.BadParameter("needs at least one integer", param_hint=name)
    return values


class Progress:
    """A Rich progress bar on stderr, usable as a (done, total) callback; silent when not a terminal and quiet."""

    def __init__(self, description: str, enabled: bool = True) -> None:
        self.description = description
        self.enabled = enabled
        self._progress = None
        self._task = None

    def __enter__(self) -> "Progress":
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

            self._progress = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                          TimeElapsedColumn(), console=stderr_console(), transient=True)
            self._progress.__enter__()
            self._task = self._progress.add_task(self.description, total=None)
        return self

    def __call__(self, done: int, total: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=done, total=total or None)

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

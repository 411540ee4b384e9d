"""What every command shares: the one exception-to-exit-code mapping, API-to-flag rewriting, JSON/Rich output, progress.

Only click is imported here (rich lazily), so `bnstrip --help` stays fast.
"""
from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from typing import Any, Callable, TypeVar

import click

from bnstrip.errors import (EXIT_BAD_INPUT, EXIT_CHECK_FAILED, EXIT_INTERRUPTED, EXIT_OK, BnstripError, CheckFailed,
                            first_line, printable)

F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["EXIT_OK", "EXIT_CHECK_FAILED", "EXIT_BAD_INPUT", "API_TO_FLAG", "to_flags", "handle_errors", "core_json",
           "emit_json", "stdout_console", "stderr_console", "warn", "plain", "make_table", "fmt", "parse_int_list", "Progress"]

DEFAULT_CHECKPOINT = "smallNetSaved"
"""The trained smallNetTrain checkpoint shipped at the top of the repository (the course's file name)."""

API_TO_FLAG: dict[str, str] = {
    # Library messages speak the Python API; the CLI user has flags.  Longest keys are applied first.
    "allow_overflow=True": "--allow-overflow",
    "keep_structure=True": "--keep-structure",
    "reparameterize=True": "--reparameterize",
    "allow_download=False": "--no-download",
    "example_inputs": "--input-shape",
    "force=True": "--force",
    "threads=": "--threads ",
    "data_dir=": "--data-dir ",
    "dtype='float32'": "--dtype float32",
    "fuse_file": "`bnstrip fuse --arch`",
}


def to_flags(message: str) -> str:
    """`message` with every API name of API_TO_FLAG replaced by its CLI flag (one pass, longest names first)."""
    import re

    keys = sorted(API_TO_FLAG, key=len, reverse=True)
    pattern = re.compile("|".join(r"(?<![\w-])" + re.escape(k) for k in keys))
    return pattern.sub(lambda m: API_TO_FLAG[m.group(0)], message)


def debug_enabled() -> bool:
    return os.environ.get("BNSTRIP_DEBUG", "") not in ("", "0")


def _exit(message: str, code: int, label: str = "error") -> None:
    click.echo(f"bnstrip: {label}: {message}", err=True)
    raise click.exceptions.Exit(code)


EXIT_BROKEN_PIPE = 141
"""128 + SIGPIPE: what a shell reports for a writer whose reader went away (`bnstrip fuse ... | head -1`)."""


def _stdout_closed() -> None:
    """stdout was closed after the work was done (OUT is written): exit 141 quietly, as other CLIs do, not 2 with a
    traceback; stdout is pointed at /dev/null so the interpreter's final flush cannot complain either."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass
    raise click.exceptions.Exit(EXIT_BROKEN_PIPE)


def handle_errors(func: F) -> F:
    """THE mapping from exceptions to exit codes: every BnstripError becomes one stderr line and its `exit_code`.

    Tracebacks only with BNSTRIP_DEBUG=1.  Nothing else in bnstrip exits: commands raise CheckFailed for a failed
    check and click.UsageError for flag misuse.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except BnstripError as exc:
            if debug_enabled():
                raise
            _exit(to_flags(first_line(exc, limit=1000)), exc.exit_code,
                  "check failed" if isinstance(exc, CheckFailed) else "error")
        except KeyboardInterrupt:
            _exit("interrupted", EXIT_INTERRUPTED)
        except BrokenPipeError:
            _stdout_closed()
        except MemoryError:
            if debug_enabled():
                raise
            _exit("out of memory; use a smaller --batch-size or a machine with more memory", EXIT_BAD_INPUT)
        except Exception as exc:  # noqa: BLE001 - last line of defence: one line, not a traceback
            if debug_enabled():
                raise
            _exit(f"{type(exc).__name__}: {to_flags(first_line(exc, default=''))} (set BNSTRIP_DEBUG=1 for a traceback)",
                  EXIT_BAD_INPUT)

    return wrapper  # type: ignore[return-value]


def torch_version() -> str:
    """The installed torch's version, without importing torch when no command needed it."""
    module = sys.modules.get("torch")
    if module is not None:
        return str(module.__version__)
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return "not installed"


def core_json(command: str, passed: bool, seconds: float, **extra: Any) -> dict[str, Any]:
    """The keys every command's --json object starts with, so a figure can be cited with what made it."""
    from bnstrip import __version__

    return {"command": command, "passed": bool(passed), "seconds": seconds, "bnstrip_version": __version__,
            "torch_version": torch_version(), **extra}


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


PIPE_WIDTH = 100_000
"""Console width when stdout is not a terminal: lines are never wrapped, so a pipe or a file gets whole lines."""


def _console(stderr: bool = False):
    from rich.console import Console as RichConsole

    class Console(RichConsole):
        def on_broken_pipe(self) -> None:  # rich would exit 1, bnstrip's "check failed": exit 141 (see _stdout_closed)
            _stdout_closed()

    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(stderr=stderr, highlight=False)
    return Console(file=stream, highlight=False, width=PIPE_WIDTH, soft_wrap=True)


def stdout_console():
    """Rich on stdout: wraps to the terminal, never when piped or redirected."""
    return _console()


def stderr_console():
    return _console(stderr=True)


def warn(message: str) -> None:
    """One stderr line; names from files or paths are escaped (a newline or ESC cannot cut it or reach the terminal)."""
    click.echo(f"bnstrip: warning: {printable(to_flags(message))}", err=True)


def plain(text: str):
    """`text` for console.print: no Rich markup (a path like `a[/]b.pt` is a name, not a tag), control
    characters escaped."""
    from rich.text import Text

    return Text(printable(text))


def _is_number(token: str) -> bool:
    """A whitespace-free piece of a cell that holds a number (1.157e-09, -0.0887983, 70.42%, U(+-0.353553), 17/48,
    [0.608,): digits with at most three letters around them. It is never cut or folded, whatever the terminal's
    width; dotted names with digits (layer1.0.conv1) are labels and may fold."""
    return any(c.isdigit() for c in token) and sum(c.isalpha() for c in token) <= 3


def _number_width(cell: str) -> int:
    """The longest number in the cell: the narrowest its column may be."""
    return max((len(token) for token in cell.split() if _is_number(token)), default=0)


def _grow(widths: list[int], target: list[int], room: int) -> int:
    """Widen `widths` towards `target` within `room`, in proportion to what each lacks; the room left."""
    lacking = [max(t - w, 0) for w, t in zip(widths, target, strict=True)]
    total = sum(lacking)
    if total <= room:
        widths[:] = [max(w, t) for w, t in zip(widths, target, strict=True)]
        return room - total
    for index, lack in enumerate(lacking):
        widths[index] += room * lack // total
    return 0


def _fit(tiers: list[list[int]], available: int) -> list[int] | None:
    """Column widths that fit `available`, from tiers of wishes (numbers, longest words, whole cells): None when
    the last tier fits as it is (Rich lays it out) or the first does not (the caller stacks the rows); else the
    numbers' widths, then the room left given to each tier in turn, in proportion to what each column lacks."""
    if sum(tiers[-1]) <= available or sum(tiers[0]) > available:
        return None
    widths = list(tiers[0])
    room = available - sum(widths)
    for target in tiers[1:]:
        room = _grow(widths, target, room)
    return widths


class FittingTable:
    """A Rich table whose numbers keep every digit at any width.

    Each column is at least as wide as its longest number; labels fold (`overflow="fold"`) into the room
    that is left, never ending in "...". When even the numbers do not fit side by side, the rows are shown
    one after another as (column, value) pairs, which fit any width that one number fits in.
    """

    def __init__(self, columns: list[str], cells: list[list[Any]], texts: list[list[str]]) -> None:
        self.columns, self.cells = columns, cells
        by_column = list(zip(*texts, strict=True)) if texts else [() for _ in columns]
        self.natural = [max([len(c) for c in column] + [len(name), 1]) for name, column in zip(columns, by_column, strict=True)]
        self.minimum = [max([_number_width(c) for c in column] + [_number_width(name), 1])
                        for name, column in zip(columns, by_column, strict=True)]
        self.words = [max([len(word) for c in (name, *column) for word in c.split()] + [1])
                      for name, column in zip(columns, by_column, strict=True)]

    @staticmethod
    def _table(columns: list[str], rows: list[list[Any]], widths: list[int] | None, sections: int = 0):
        from rich.table import Table

        table = Table()
        for index, name in enumerate(columns):
            table.add_column(name, overflow="fold", width=widths[index] if widths else None)
        for index, row in enumerate(rows):
            table.add_row(*row, end_section=bool(sections) and (index + 1) % sections == 0)
        return table

    def __rich_console__(self, console: Any, options: Any):
        available = options.max_width - (3 * len(self.columns) + 1)
        if sum(self.minimum) <= available or not self.cells:
            yield self._table(self.columns, self.cells, _fit([self.minimum, self.words, self.natural], available))
            return
        pairs = [[name, cell] for row in self.cells for name, cell in zip(self.columns, row, strict=True)]
        names = max(len(name) for name in self.columns)
        widths = _fit([[1, max(self.minimum)], [names, max(self.words)], [names, max(self.natural)]],
                      options.max_width - 7)
        yield self._table(["column", "value"], pairs, widths, sections=len(self.columns))


def make_table(title: str, columns: list[str], rows: list[list[Any]], markup: bool = True):
    """A Rich table with the given columns (cells str()-ed); the title is a line of its own above it, so a long
    title is never wrapped to the table's width. Numbers are never cut (see FittingTable).

    markup=False for tables of names from files and paths: title and cells are shown as they are (no Rich
    markup), with control characters escaped.
    """
    from rich.console import Group
    from rich.text import Text

    texts = [[Text.from_markup(str(cell)).plain if markup else printable(cell) for cell in row] for row in rows]
    cells = [[str(cell) if markup else Text(printable(cell)) for cell in row] for row in rows]
    table = FittingTable(columns, cells, texts)
    heading = Text.from_markup(title, style="italic") if markup else Text(printable(title), style="italic")
    return Group(heading, table) if title else table


def fmt(value: float, digits: int = 3) -> str:
    """Short scientific/decimal formatting for tables."""
    if value == 0 or not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}g}" if abs(value) >= 1e-3 else f"{value:.{digits}e}"


def parse_int_list(text: str, name: str) -> list[int]:
    """'1,32,100' -> [1, 32, 100], each within 32 bits; a click.BadParameter (exit 2) otherwise."""
    from bnstrip.cli.types import MAX_LIST_ITEMS, MAX_LIST_VALUE, bounded_int_list

    return bounded_int_list(text, name, -MAX_LIST_VALUE, MAX_LIST_VALUE, MAX_LIST_ITEMS)


class Progress:
    """Progress on stderr, usable as a (done, total) callback.

    On a terminal: a Rich bar with time remaining, shown only once the first call arrives (so nothing appears for
    work that never starts, e.g. a download that is not needed).  Not on a terminal: a plain line every
    `every` seconds once the work has run `after` seconds, so a long piped run is not silent.
    """

    def __init__(self, description: str, enabled: bool = True, after: float = 5.0, every: float = 10.0) -> None:
        self.description = description
        self.enabled = enabled
        self.after, self.every = after, every
        self._progress = None
        self._task = None
        self._started = 0.0
        self._last_line = 0.0

    def __enter__(self) -> Progress:
        self._started = time.perf_counter()
        return self

    def _start_bar(self) -> None:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self._progress = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
                                      console=stderr_console(), transient=True)
        self._progress.__enter__()
        self._task = self._progress.add_task(self.description, total=None)

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if sys.stderr.isatty():
            if self._progress is None:
                self._start_bar()
            self._progress.update(self._task, completed=done, total=total or None)
            return
        now = time.perf_counter()
        elapsed = now - self._started
        if elapsed < self.after or now - self._last_line < self.every or not total or done >= total:
            return
        self._last_line = now
        left = elapsed / max(done, 1) * (total - done)
        click.echo(f"bnstrip: {self.description}: {done}/{total} ({done / total:.0%}), about {left:.0f} s left", err=True)

    @property
    def shown(self) -> bool:
        return self._progress is not None

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)


def arch_input_shape(arch: str, input_shape: str | None) -> list[int]:
    """--input-shape as a list of positive ints; required with --arch."""
    from bnstrip.errors import InputError

    if not input_shape:
        raise InputError(f"--arch {arch}: --input-shape is required to trace and self-check the model, "
                         "e.g. --input-shape 1,3,224,224")
    shape = parse_int_list(input_shape, "--input-shape")
    if any(d <= 0 for d in shape):
        raise InputError(f"--input-shape {input_shape}: every dimension must be positive")
    return shape


def arch_model_factory(arch: str, arch_kwargs: str | None):  # noqa: ANN201 - Callable[[], nn.Module]
    """--arch (and --arch-kwargs) resolved now, as a factory that builds the model later."""
    from bnstrip.arch import arch_factory, parse_arch_kwargs

    return arch_factory(arch, parse_arch_kwargs(arch_kwargs))


def strict_gate(input_path: str, output_path: str, skipped: list[tuple[str, str]], strict: bool,
                dry_run: bool = False) -> None:
    """--strict on every path: exit 1 (after OUT was written, or with --dry-run after the report) when a BatchNorm
    stayed."""
    if strict and skipped:
        from bnstrip.errors import CheckFailed

        bn, reason = skipped[0]
        written = "dry run, nothing was written" if dry_run else f"{output_path} was written"
        raise CheckFailed(f"{input_path}: --strict: {len(skipped)} BatchNorm(s) not folded ({written}), "
                          f"first {bn}: {reason}")

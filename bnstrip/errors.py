"""The one exception hierarchy of bnstrip; each class carries its exit code (as click.ClickException does).

The library raises these and never prints or exits. Messages speak the Python API
(`allow_overflow=True`, `example_inputs`, `force=True`); the CLI rewrites those names
into its flags in one place (`bnstrip.cli.common.API_TO_FLAG`) and maps every exception
to one stderr line and `exit_code` in one place (`bnstrip.cli.common.handle_errors`).
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT; Interrupted sets 128 + the signal it got


def printable(text: object) -> str:
    """`text` with control characters (newline, CR, ESC, ...) escaped, so a name from a file cannot cut or forge
    the one-line error, nor reach the terminal as control codes."""
    value = str(text)
    if value.isprintable():
        return value
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in value)


def first_line(exc: BaseException, limit: int = 300, default: str | None = None) -> str:
    """The first line of an exception's message, cut to `limit` (the type name, or `default`, when empty).

    Every error bnstrip prints is one line, so wrapped library errors are shortened the same way everywhere.
    """
    text = str(exc).strip().splitlines()
    if text:
        return printable(text[0][:limit])
    return type(exc).__name__ if default is None else default


class BnstripError(Exception):
    """Base class: the message is a single line naming the file/layer, the problem and the fix."""

    exit_code = EXIT_BAD_INPUT


class InputError(BnstripError):
    """Bad usage or bad input (file, checkpoint, shape, statistics): exit 2."""

    exit_code = EXIT_BAD_INPUT


class CheckFailed(BnstripError):
    """A numerical check missed its tolerance: exit 1."""

    exit_code = EXIT_CHECK_FAILED


class Interrupted(BnstripError):
    """A signal (SIGINT, SIGTERM, SIGHUP) stopped the work; exit 128 + the signal number."""

    def __init__(self, message: str, signum: int = 2) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum

"""Exceptions the library raises; the CLI maps them to exit codes and one-line messages."""
from __future__ import annotations


def first_line(exc: BaseException, limit: int = 300, default: str | None = None) -> str:
    """The first line of an exception's message, cut to `limit` (the type name, or `default`, when empty).

    Every error bnstrip prints is one line, so wrapped library errors are shortened the same way everywhere.
    """
    text = str(exc).strip().splitlines()
    if text:
        return text[0][:limit]
    return type(exc).__name__ if default is None else default


class BnstripError(Exception):
    """Base class: the message is a single line naming the file/layer, the problem and the fix."""

    exit_code = 2


class InputError(BnstripError):
    """Bad usage or bad input (file, checkpoint, shape, statistics): exit 2."""

    exit_code = 2


class CheckFailed(BnstripError):
    """A numerical check missed its tolerance: exit 1."""

    exit_code = 1

"""Exceptions the library raises; the CLI maps them to exit codes and one-line messages."""
from __future__ import annotations


class BnstripError(Exception):
    """Base class: the message is a single line naming the file/layer, the problem and the fix."""

    exit_code = 2


class InputError(BnstripError):
    """Bad usage or bad input (file, checkpoint, shape, statistics): exit 2."""

    exit_code = 2


class CheckFailed(BnstripError):
    """A numerical check missed its tolerance: exit 1."""

    exit_code = 1

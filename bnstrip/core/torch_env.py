"""How torch runs while bnstrip calls it: its loggers quiet, its thread count set and restored.

A leaf module (it imports nothing of bnstrip but the errors) so that every layer may use it:
io (loading a .pt2), trace (torch.export), fold (re-exporting a program), bench and homework (threads).
"""
from __future__ import annotations

import contextlib
import io
import logging
from typing import Iterator

import torch

from bnstrip.errors import InputError


@contextlib.contextmanager
def quiet_torch_logs() -> Iterator[None]:
    """torch.export logs guard warnings and whole graphs on torch.* loggers; the library must not print."""
    names = ["torch"] + [n for n in logging.Logger.manager.loggerDict if n.startswith("torch.")]
    loggers = [logging.getLogger(n) for n in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # export prints the partial graph of a failure to stderr
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Run with `threads` intra-op threads (None: leave as is) and restore the previous count afterwards."""
    previous = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise InputError(f"threads={threads}: needs at least 1 thread")
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)

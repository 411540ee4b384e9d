"""Bounded click parameter types and the bounded JSON parser for numeric options (no torch import).

Every numeric option of every command states its range here, so a value outside it is a usage error
(exit 2, one line naming the option and the range) before any work starts.  JSON arrays given on the
command line (`--matrix`, `--mu0`, ...) are parsed within fixed bounds: size, nesting, digits, magnitude.
"""
from __future__ import annotations

import json
import math
from typing import Any

import click

from bnstrip.errors import InputError

MAX_THREADS = 1024
"""More torch threads than any machine bnstrip runs on has cores; a typo (1e9) is refused, not passed to torch."""
MAX_SEED = 2**32 - 1
"""Seeds are offset by small integers and given to torch generators (int64): 32 bits keep every offset valid."""
MAX_BATCH = 65_536
MAX_BUDGET_SECONDS = 3600.0
MAX_JSON_CHARS = 1 << 20
"""A 1000 x 1000 matrix (the maths commands' largest) written with 1 character to spare per entry."""
MAX_JSON_DEPTH = 2
"""Vectors and matrices: at most two levels of brackets."""
MAX_JSON_DIGITS = 20
MAX_JSON_MAGNITUDE = 1e6
"""Homework-sized numbers: products of a few of them stay far from float64's range."""


def _range_text(low: float | None, high: float | None, low_open: bool = False, high_open: bool = False) -> str:
    below, above = ("<" if low_open else "<="), ("<" if high_open else "<=")
    if low is not None and high is not None:
        return f"{low} {below} x {above} {high}"
    return f"x {'>' if low_open else '>='} {low}" if low is not None else f"x {above} {high}"


class BoundedInt(click.IntRange):
    """click.IntRange whose every refusal (not an integer, too many digits, out of range) states the range."""

    def __init__(self, low: int | None, high: int | None) -> None:
        super().__init__(min=low, max=high)
        self.range_text = _range_text(low, high)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and (len(value.strip()) > MAX_JSON_DIGITS or not value.strip().lstrip("+-").isdigit()):
            self.fail(f"{value[:40]!r} is not an integer in the range {self.range_text}", param, ctx)
        number = int(value) if isinstance(value, str) else value
        if isinstance(number, int) and ((self.min is not None and number < self.min)
                                        or (self.max is not None and number > self.max)):
            self.fail(f"{number} is not in the range {self.range_text}", param, ctx)
        return super().convert(value, param, ctx)


class BoundedFloat(click.FloatRange):
    """click.FloatRange that refuses NaN and infinities (click's comparisons let NaN through) and states the range."""

    def __init__(self, low: float | None, high: float | None, low_open: bool = False, high_open: bool = False) -> None:
        super().__init__(min=low, max=high, min_open=low_open, max_open=high_open)
        self.range_text = _range_text(low, high, low_open, high_open)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            self.fail(f"{str(value)[:40]!r} is not a number in the range {self.range_text}", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{str(value)[:40]!r} is not a finite number; give one in the range {self.range_text}", param, ctx)
        below = self.min is not None and (number <= self.min if self.min_open else number < self.min)
        above = self.max is not None and (number >= self.max if self.max_open else number > self.max)
        if below or above:
            self.fail(f"{number:g} is not in the range {self.range_text}", param, ctx)
        return super().convert(number, param, ctx)


THREADS = BoundedInt(1, MAX_THREADS)
SEED = BoundedInt(0, MAX_SEED)
EPS = BoundedFloat(0.0, 1.0, high_open=True)
"""A BatchNorm eps: the fold maths takes 0 <= eps < 1."""
MAX_LIST_ITEMS = 100_000
MAX_LIST_VALUE = 2**31 - 1


def bounded_int_list(text: str, name: str, low: int, high: int, max_items: int) -> list[int]:
    """'1,32,100' -> [1, 32, 100], each in [low, high], at most max_items; click.BadParameter (exit 2) otherwise."""
    parts = [part.strip() for part in text.split(",") if part.strip() != ""]
    if not parts:
        raise click.BadParameter("needs at least one integer", param_hint=name)
    if len(parts) > max_items:
        raise click.BadParameter(f"{len(parts)} values, more than {max_items}", param_hint=name)
    values = []
    for part in parts:
        if len(part) > MAX_JSON_DIGITS or not part.lstrip("+-").isdigit() or not low <= int(part) <= high:
            raise click.BadParameter(f"{text[:60]!r} is not a comma-separated list of integers: {part[:40]!r} is not "
                                     f"an integer in the range {low} <= x <= {high}", param_hint=name)
        values.append(int(part))
    return values


def _number(text: str, option: str) -> float | int:
    if len(text) > MAX_JSON_DIGITS + 8:
        raise InputError(f"{option}: the number {text[:20]}... has {len(text)} characters; give at most "
                         f"{MAX_JSON_DIGITS} digits")
    value = float(text)
    if not math.isfinite(value) or abs(value) > MAX_JSON_MAGNITUDE:
        raise InputError(f"{option}: entry {text} is outside -{MAX_JSON_MAGNITUDE:g} <= x <= {MAX_JSON_MAGNITUDE:g}; "
                         "scale the problem down")
    return int(text) if text.lstrip("-").isdigit() else value


def _depth(text: str) -> int:
    depth = deepest = 0
    for char in text:
        if char == "[":
            depth += 1
            deepest = max(deepest, depth)
        elif char == "]":
            depth -= 1
    return deepest


def parse_json_array(text: str | None, option: str) -> Any:
    """A JSON array of numbers (a vector, or a matrix of rows) within the bounds above; one-line InputError otherwise."""
    if text is None:
        return None
    example = "write e.g. '[0, 0]' or '[[1, 0], [0, 1]]'"
    if len(text) > MAX_JSON_CHARS:
        raise InputError(f"{option}: {len(text):,} characters, over the {MAX_JSON_CHARS:,}-character limit; {example}")
    if _depth(text) > MAX_JSON_DEPTH:
        raise InputError(f"{option}: nested {_depth(text)} deep; vectors and matrices nest at most {MAX_JSON_DEPTH} "
                         f"deep, {example}")
    try:
        value = json.loads(text, parse_int=lambda s: _number(s, option), parse_float=lambda s: _number(s, option),
                           parse_constant=lambda s: _number(s, option))
    except json.JSONDecodeError as exc:
        raise InputError(f"{option}: {text[:60]!r} is not valid JSON ({exc.msg} at character {exc.pos}); {example}") from None
    if not isinstance(value, list):
        raise InputError(f"{option}: {text[:60]!r} is not a JSON array; {example}")
    for item in value:
        for entry in (item if isinstance(item, list) else [item]):
            if isinstance(entry, bool) or not isinstance(entry, (int, float)):
                raise InputError(f"{option}: entry {json.dumps(entry)[:40]} is not a number; vectors and matrices "
                                 "hold numbers only")
    return value

"""Shape expressions of a `.pt2` parsed by bnstrip's own bounded grammar and printed again in one canonical form.

torch.export.load hands each `expr_str` of the archive to `sympy.sympify`, which evaluates Python. bnstrip never
gives it the file's string: it parses the string here and prints the parsed tree back (sympy's `srepr` form, the
one torch.export.save writes), so only integers, size symbols and the operators below ever reach sympy.

    expr  := term (("+" | "-") term)*
    term  := unary (("*" | "//" | "%") unary)*
    unary := "-" unary | atom
    atom  := INT | SYMBOL | "(" expr ")" | CALL
    CALL  := Integer(INT) | Symbol('SYMBOL', flag=True|False, ...) | Add(e, ...) | Mul(e, ...)
             | Max(e, ...) | Min(e, ...) | FloorDiv(e, e) | Mod(e, e) | PythonMod(e, e)
             | Pow(e, K)      (K an integer literal 0..8; no power inside the base: s0**2 strides)

No `**`, no floats, no other names. Bounds: `MAX_CHARS` characters, `MAX_DEPTH` nesting, `MAX_NODES` terms,
integers below 2**62 in magnitude. Parsing is linear in the text, so `9**9**9` or `1e999999` fail in microseconds.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

MAX_CHARS = 4096
MAX_DEPTH = 32
MAX_NODES = 512
MAX_INT = 2 ** 62
MAX_POWER = 8
SYMBOL = re.compile(r"[su]\d{1,9}")
"""Size symbols torch.export writes: backed (`s3`) and unbacked (`u0`)."""
_FLAGS = ("integer", "positive", "nonnegative", "real", "finite")
_TOKEN = re.compile(r"\s*(?:(?P<int>\d+)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<str>'[^']*')|(?P<op>//|\*\*|[-+*%(),=]))")
_NARY = {"Add": "Add", "Mul": "Mul", "Max": "Max", "Min": "Min", "max": "Max", "min": "Min"}
_BINARY = {"FloorDiv": "FloorDiv", "Mod": "Mod", "PythonMod": "PythonMod"}


class ExprError(ValueError):
    """The expression is outside the grammar or its bounds (the message says which)."""


@dataclass
class SymbolTable:
    """Each symbol's assumptions, fixed by its first appearance so every later print of it is the same symbol."""

    flags: dict[str, tuple[tuple[str, bool], ...]] = field(default_factory=dict)

    def declare(self, name: str, flags: tuple[tuple[str, bool], ...] | None) -> str:
        if name not in self.flags:
            default = (("integer", True), ("positive", True)) if name.startswith("s") else (("integer", True),)
            self.flags[name] = flags if flags else default
        return name

    def srepr(self, name: str) -> str:
        shown = ", ".join(f"{flag}={value}" for flag, value in self.flags[name])
        return f"Symbol('{name}', {shown})"


class _Parser:
    def __init__(self, text: str, symbols: SymbolTable) -> None:
        if len(text) > MAX_CHARS:
            raise ExprError(f"{len(text):,} characters (limit {MAX_CHARS:,})")
        self.tokens = self._tokenize(text)
        self.position = 0
        self.nodes = 0
        self.symbols = symbols
        self.in_power = False

    @staticmethod
    def _tokenize(text: str) -> list[tuple[str, str]]:
        tokens, position = [], 0
        while position < len(text):
            if text[position:].strip() == "":
                break
            match = _TOKEN.match(text, position)
            if match is None:
                raise ExprError(f"unexpected character {text[position:position + 1]!r}")
            kind = match.lastgroup or ""
            value = match.group(kind)
            if kind == "op" and value == "**":
                raise ExprError("powers (**) are not part of bnstrip's shape grammar")
            tokens.append((kind, value))
            position = match.end()
        return tokens

    def peek(self) -> tuple[str, str]:
        return self.tokens[self.position] if self.position < len(self.tokens) else ("end", "")

    def take(self, value: str | None = None) -> tuple[str, str]:
        token = self.peek()
        if value is not None and token[1] != value:
            raise ExprError(f"expected {value!r}, found {token[1] or 'the end'!r}")
        self.position += 1
        return token

    def count(self, depth: int) -> None:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise ExprError(f"more than {MAX_NODES} terms")
        if depth > MAX_DEPTH:
            raise ExprError(f"nested deeper than {MAX_DEPTH}")

    def parse(self) -> str:
        out = self.expr(0)
        if self.peek()[0] != "end":
            raise ExprError(f"unexpected {self.peek()[1]!r}")
        return out

    def expr(self, depth: int) -> str:
        terms = [self.term(depth + 1)]
        while self.peek()[1] in ("+", "-"):
            sign = self.take()[1]
            right = self.term(depth + 1)
            terms.append(right if sign == "+" else f"Mul(Integer(-1), {right})")
        return terms[0] if len(terms) == 1 else f"Add({', '.join(terms)})"

    def term(self, depth: int) -> str:
        out = self.unary(depth + 1)
        while self.peek()[1] in ("*", "//", "%"):
            op = self.take()[1]
            right = self.unary(depth + 1)
            out = {"*": "Mul", "//": "FloorDiv", "%": "PythonMod"}[op] + f"({out}, {right})"
        return out

    def unary(self, depth: int) -> str:
        self.count(depth)
        if self.peek()[1] == "-":
            self.take()
            return f"Mul(Integer(-1), {self.unary(depth + 1)})"
        return self.atom(depth + 1)

    def atom(self, depth: int) -> str:
        kind, value = self.take()
        if kind == "int":
            return f"Integer({_bounded(value)})"
        if kind == "op" and value == "(":
            out = self.expr(depth + 1)
            self.take(")")
            return out
        if kind == "name" and SYMBOL.fullmatch(value):
            return self.symbols.srepr(self.symbols.declare(value, None))
        if kind == "name" and self.peek()[1] == "(":
            return self.call(value, depth + 1)
        raise ExprError(f"{value or 'the end'!r} is not an integer, a size symbol or an allowed function")

    def call(self, name: str, depth: int) -> str:
        self.take("(")
        if name == "Integer":
            negative = self.peek()[1] == "-" and bool(self.take())
            value = self.take()
            if value[0] != "int":
                raise ExprError("Integer() takes an integer literal")
            self.take(")")
            return f"Integer({'-' if negative else ''}{_bounded(value[1])})"
        if name == "Symbol":
            return self.symbol()
        if name == "Pow":
            return self.power(depth)
        if name not in _NARY and name not in _BINARY:
            raise ExprError(f"function {name!r} is not in bnstrip's shape grammar")
        args = [self.expr(depth + 1)]
        while self.peek()[1] == ",":
            self.take()
            args.append(self.expr(depth + 1))
        self.take(")")
        if name in _BINARY and len(args) != 2:
            raise ExprError(f"{name} takes two arguments")
        if name in _NARY and len(args) < 2:
            raise ExprError(f"{name} takes at least two arguments")
        return f"{_NARY.get(name) or _BINARY[name]}({', '.join(args)})"

    def power(self, depth: int) -> str:
        """Pow(base, k): a small literal exponent (torch writes strides like s0**2 this way), never nested."""
        if self.in_power:
            raise ExprError("a power inside a power")
        self.in_power = True
        base = self.expr(depth + 1)
        self.in_power = False
        self.take(",")
        wrapped = self.peek()[1] == "Integer" and bool(self.take()) and bool(self.take("("))
        exponent = self.take()
        if wrapped:
            self.take(")")
        self.take(")")
        if exponent[0] != "int" or len(exponent[1]) > 2 or int(exponent[1]) > MAX_POWER:
            raise ExprError(f"only integer powers up to {MAX_POWER} are part of bnstrip's shape grammar")
        return f"Pow({base}, Integer({int(exponent[1])}))"

    def symbol(self) -> str:
        kind, quoted = self.take()
        if kind != "str" or not SYMBOL.fullmatch(quoted[1:-1]):
            raise ExprError(f"symbol name {quoted!r} is not a size symbol (s0, u0, ...)")
        flags: list[tuple[str, bool]] = []
        while self.peek()[1] == ",":
            self.take()
            flag = self.take()[1]
            self.take("=")
            value = self.take()[1]
            if flag not in _FLAGS or value not in ("True", "False") or len(flags) >= len(_FLAGS):
                raise ExprError(f"symbol assumption {flag}={value} is not allowed")
            flags.append((flag, value == "True"))
        self.take(")")
        return self.symbols.srepr(self.symbols.declare(quoted[1:-1], tuple(flags)))


def _bounded(digits: str) -> int:
    if len(digits) > 19 or int(digits) >= MAX_INT:
        raise ExprError(f"integer {digits[:24]}{'...' if len(digits) > 24 else ''} is beyond 2**62")
    return int(digits)


def canonical_expr(text: str, symbols: SymbolTable) -> str:
    """`text` parsed by the grammar above and printed in canonical srepr form; ExprError when it is not in it."""
    if not isinstance(text, str):
        raise ExprError("not a string")
    return _Parser(text, symbols).parse()

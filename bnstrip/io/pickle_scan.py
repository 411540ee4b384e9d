"""A static pickle reader: what a pickle would look up, call and allocate, found without unpickling it.

torch's weights-only unpickler admits only tensor-building globals, but several of
those allocate on the pickle's say-so: `bytearray(N)`, a storage class called
directly (`torch.FloatStorage(N)`: uninitialised memory, never filled from the
file), a tensor class called with a size.  This module runs the pickle's opcodes
over symbolic values (constants, tuples, lists, globals, persistent ids) so those
calls, and every persistent id (the storages the file must back with bytes), are
known before torch allocates anything.  Nothing from the file is ever executed.
"""
from __future__ import annotations

import functools
import pickletools
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable

from bnstrip.errors import InputError, printable

TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
"""The first pickle of a legacy (pre-zip) torch.save file."""

LEGACY_PICKLES = 5
"""A legacy torch.save file is five pickles (magic, protocol, sys_info, object, storage keys) then raw bytes."""


class BoundedReader:
    """A read-only view whose read(n) never asks for more than the file holds (a pickle may claim 2**63 bytes)."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self._f = f
        self._size = size

    def read(self, n: int = -1) -> bytes:
        remaining = max(0, self._size - self._f.tell())
        return self._f.read(remaining if n is None or n < 0 else min(n, remaining))

    def readline(self) -> bytes:
        remaining = max(0, self._size - self._f.tell())
        return self._f.readline(min(remaining, 1 << 16))

    def tell(self) -> int:
        return self._f.tell()


@dataclass(frozen=True)
class Global:
    """A callable or class the pickle names (GLOBAL, STACK_GLOBAL, INST, EXT)."""

    name: str


@dataclass(frozen=True)
class StorageRef:
    """What a persistent id (BINPERSID) stands for: a storage the file must hold."""

    pid: Any


class _Opaque:
    """Any value the scan does not need to know (dicts, objects, results of calls)."""

    def __repr__(self) -> str:
        return "<object>"


OPAQUE = _Opaque()


@dataclass
class PickleScan:
    """What one pickle names and builds; `problems` are allocations the file does not back."""

    globals: list[str] = field(default_factory=list)
    persids: list[Any] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    value: Any = None


_CONSTANT_OPS = {
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
    "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
    "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8",
}
_TENSOR_REBUILDERS = {"torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3",
                      "torch._utils._rebuild_qtensor"}


def is_storage_class(name: str) -> bool:
    return name.startswith("torch.") and name.endswith("Storage")


def _is_tensor_class(name: str) -> bool:
    """torch.Tensor, torch.FloatTensor, torch.cuda.*Tensor...: called with a size they allocate (Parameter wraps data)."""
    return name.startswith("torch.") and name.endswith("Tensor")


class _Machine:
    """The pickle stack machine over symbolic values (one pickle, up to STOP)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.stack: list[Any] = []
        self.marks: list[int] = []
        self.memo: dict[int, Any] = {}
        self.scan = PickleScan()

    def pop(self) -> Any:
        if not self.stack:
            raise ValueError("pickle pops from an empty stack")
        return self.stack.pop()

    def pop_mark(self) -> list[Any]:
        if not self.marks:
            raise ValueError("pickle uses a MARK it never set")
        start = self.marks.pop()
        items = self.stack[start:]
        del self.stack[start:]
        return items

    def top(self) -> Any:
        if not self.stack:
            raise ValueError("pickle reads an empty stack")
        return self.stack[-1]

    def call(self, func: Any, args: Any) -> Any:
        """The symbolic result of func(*args), recording calls that would allocate what the file does not hold."""
        if not isinstance(func, Global):
            return OPAQUE
        name = func.name
        args = args if isinstance(args, tuple) else ()
        if is_storage_class(name):
            self.scan.problems.append(f"the pickle builds a {printable(name)} itself instead of reading it from the file "
                                      "(its memory would be uninitialised)")
        elif _is_tensor_class(name) and args:
            self.scan.problems.append(f"the pickle calls {printable(name)}(...) to allocate a tensor the file does not hold")
        elif name == "builtins.bytearray" and args and type(args[0]) is int and args[0] > self.budget:
            self.scan.problems.append(f"the pickle asks for bytearray({args[0]:,}), more bytes than the file's {self.budget:,}")
        elif name in _TENSOR_REBUILDERS and args and not isinstance(args[0], StorageRef):
            self.scan.problems.append(f"the pickle calls {name} on a storage that does not come from the file")
        elif name == "torch._tensor._rebuild_from_type_v2" and len(args) >= 3:
            return self.call(args[0], args[2])
        return OPAQUE

    def step(self, name: str, arg: Any) -> None:  # noqa: C901 - one branch per opcode family, as in pickletools
        stack = self.stack
        if name in _CONSTANT_OPS:
            stack.append(arg)
        elif name in ("PROTO", "FRAME", "STOP", "READONLY_BUFFER"):
            pass
        elif name == "MARK":
            self.marks.append(len(stack))
        elif name == "NONE":
            stack.append(None)
        elif name in ("NEWTRUE", "NEWFALSE"):
            stack.append(name == "NEWTRUE")
        elif name == "EMPTY_TUPLE":
            stack.append(())
        elif name == "TUPLE":
            stack.append(tuple(self.pop_mark()))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            count = int(name[-1])
            items = [self.pop() for _ in range(count)][::-1]
            stack.append(tuple(items))
        elif name == "EMPTY_LIST":
            stack.append([])
        elif name == "LIST":
            stack.append(self.pop_mark())
        elif name == "APPEND":
            value = self.pop()
            if isinstance(self.top(), list):
                self.top().append(value)
        elif name == "APPENDS":
            items = self.pop_mark()
            if isinstance(self.top(), list):
                self.top().extend(items)
        elif name in ("EMPTY_DICT", "EMPTY_SET", "NEXT_BUFFER"):
            stack.append(OPAQUE)
        elif name in ("DICT", "FROZENSET"):
            self.pop_mark()
            stack.append(OPAQUE)
        elif name in ("SETITEMS", "ADDITEMS", "POP_MARK"):
            self.pop_mark()
        elif name == "SETITEM":
            self.pop(), self.pop()
        elif name in ("POP", "BUILD"):
            self.pop()
        elif name == "DUP":
            stack.append(self.top())
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(self.memo.get(int(arg), OPAQUE))
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            self.memo[int(arg)] = self.top()
        elif name == "MEMOIZE":
            self.memo[len(self.memo)] = self.top()
        else:
            self.step_call(name, arg)

    def step_call(self, name: str, arg: Any) -> None:
        stack, found = self.stack, self.scan.globals
        if name == "GLOBAL":
            module, _, attr = str(arg).partition(" ")
            found.append(f"{module}.{attr}")
            stack.append(Global(found[-1]))
        elif name == "STACK_GLOBAL":
            attr, module = self.pop(), self.pop()
            resolved = isinstance(module, str) and isinstance(attr, str)
            found.append(f"{module}.{attr}" if resolved else "<a global whose name is computed at load time>")
            stack.append(Global(found[-1]))
        elif name.startswith("EXT"):
            found.append(f"<copyreg extension code {arg}>")
            stack.append(Global(found[-1]))
        elif name == "INST":
            module, _, attr = str(arg).partition(" ")
            found.append(f"{module}.{attr}")
            stack.append(self.call(Global(found[-1]), tuple(self.pop_mark())))
        elif name == "OBJ":
            items = self.pop_mark()
            if not items:
                raise ValueError("OBJ without a class")
            stack.append(self.call(items[0], tuple(items[1:])))
        elif name == "REDUCE":
            args = self.pop()
            stack.append(self.call(self.pop(), args))
        elif name == "NEWOBJ":
            args = self.pop()
            stack.append(self.call(self.pop(), args))
        elif name == "NEWOBJ_EX":
            self.pop()
            args = self.pop()
            stack.append(self.call(self.pop(), args))
        elif name == "BINPERSID":
            pid = self.pop()
            self.scan.persids.append(pid)
            stack.append(StorageRef(pid))
        elif name == "PERSID":
            self.scan.persids.append(arg)
            stack.append(StorageRef(arg))
        else:
            raise ValueError(f"unknown pickle opcode {name}")


def scan_pickle(stream: Any, budget: int) -> PickleScan:
    """Scan one pickle from `stream` (which ends right after its STOP); ValueError if it is malformed.

    `budget` is the most bytes any single allocation may claim (the file's size).
    """
    machine = _Machine(budget)
    for opcode, arg, _ in pickletools.genops(stream):
        machine.step(opcode.name, arg)
    machine.scan.value = machine.stack[-1] if machine.stack else None
    return machine.scan


def scan_legacy(f: BinaryIO, size: int) -> tuple[list[PickleScan], int]:
    """The leading pickles of a legacy torch.save file (or a bare pickle) and the offset where raw bytes start.

    A bare pickle has one; a legacy file five. Scanning stops at the first stream
    that is not a pickle (the raw storage bytes of a legacy file).
    """
    reader = BoundedReader(f, size)
    f.seek(0)
    scans: list[PickleScan] = []
    end = 0
    for index in range(LEGACY_PICKLES):
        try:
            scans.append(scan_pickle(reader, size))
        except ValueError:
            if index == 0:
                raise
            break
        end = reader.tell()
        if index == 0 and scans[0].value != TORCH_LEGACY_MAGIC:
            break
    return scans, end


# --------------------------------------------------------------------------- which globals are allowed


def allowed_globals() -> set[str]:
    """What torch's weights-only unpickler admits by default (the same set get_unsafe_globals_in_checkpoint uses)."""
    from bnstrip._torch import weights_only_allowed_globals

    return weights_only_allowed_globals()


def unsafe_globals(names: Iterable[str]) -> list[str]:
    """The names torch's weights-only set does not admit, sorted, without repeats."""
    allowed = allowed_globals()
    return sorted({n for n in names if n not in allowed})


def _is_whole_model(names: list[str]) -> bool:
    """torch.save(model) pickles the module classes: torch.nn.* or the user's own (often __main__.*)."""
    return any(n.startswith(("torch.nn.modules.", "__main__.", "torch.fx.")) for n in names)


def refuse_globals(path: Path, names: list[str]) -> InputError:
    """The one-line refusal for a pickle that names code; never suggests allow-listing anything."""
    shown = ", ".join(printable(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    if _is_whole_model(names):
        return InputError(
            f"{printable(path)}: refused: a whole pickled model (it names {shown}), which is code, not tensor data "
            f"(nothing was run); where it was made, save the weights with torch.save(model.state_dict(), PATH)")
    return InputError(
        f"{printable(path)}: refused: the pickle calls {shown}, which is code, not tensor data (nothing was run); "
        "ask for a plain state_dict (torch.save(model.state_dict())) or a .safetensors file from a source you trust"
    )


def refuse_allocation(path: Path, problem: str) -> InputError:
    return InputError(f"{printable(path)}: refused: {problem} (nothing was allocated); the file is crafted or corrupt, "
                      "re-export it with torch.save(model.state_dict(), PATH)")


@functools.lru_cache(maxsize=1)
def storage_itemsizes() -> dict[str, int]:
    """Element size of every storage class a persistent id may name (from torch's weights-only allowed set)."""
    import torch

    with warnings.catch_warnings():  # TypedStorage classes warn that they are deprecated when touched
        warnings.simplefilter("ignore")
        return _storage_itemsizes(torch)


def _storage_itemsizes(torch: Any) -> dict[str, int]:
    sizes: dict[str, int] = {"torch.storage.UntypedStorage": 1}
    for name in allowed_globals():
        if not is_storage_class(name) or name in sizes:
            continue
        target: Any = torch
        try:
            for part in name.split(".")[1:]:
                target = getattr(target, part)
            dtype = target.dtype
            sizes[name] = dtype.itemsize if isinstance(dtype, torch.dtype) else 0
        except Exception:  # noqa: BLE001 - a storage class this build does not provide is simply unknown
            continue
    return {k: v for k, v in sizes.items() if v > 0}

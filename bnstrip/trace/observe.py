"""One real run of the model on the example inputs, watched: what a traced graph can hide.

Counts module calls and BatchNorm input ranks, catches reads of a foldable module's tensors
from outside its own forward and in-place writes into a BatchNorm's input after it ran
(fx records `x += y` as an out-of-place add), and keeps what chosen submodules really got
and returned so their traced graphs can be checked against it.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import AbstractSet, Any, Sequence

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from bnstrip._torch import NoDynamoDispatchMode, op_schema, pytree, tensor_version
from bnstrip.core.compare import fresh_inputs
from bnstrip.errors import InputError
from bnstrip.trace.alias import byte_range, own_tensors
from bnstrip.trace.bn_registry import is_batchnorm_like
from bnstrip.trace.opgraph import Op, error_summary, shapes_text

@dataclass
class RunRecord:
    """What one real run of the model on the example inputs showed (see observe_run)."""

    output: Any
    calls: Counter
    ranks: dict[str, set[int]]
    foreign_reads: dict[str, str]
    captured: dict[str, tuple[tuple[Any, ...], dict[str, Any], Any]] = field(default_factory=dict)
    input_written: dict[str, str] = field(default_factory=dict)
    """BatchNorm name -> the op that wrote into its input in place after it ran."""
    results: dict[str, list[Remembered | None]] = field(default_factory=dict)
    """For the modules named in `remember`: each call, in call order (None for one not kept)."""


MAX_REMEMBERED_BYTES = 256 << 20
"""The most observe_run keeps alive of remembered calls' inputs and outputs; calls after that are not kept."""


@dataclass
class Remembered:
    """One call of a module in the real run: its (args, kwargs) before any pre-hook and its final output.

    The tensors are the run's own, not copies (copying cost as much as a 1x1 conv): `versions` are
    their in-place write counts when they were kept, and `get` gives the call only while none changed.
    """

    arguments: Any
    output: Any
    versions: list[int]

    def get(self) -> tuple[Any, Any] | None:
        """(arguments, output) if no tensor of them has been written in place since, else None."""
        now = [tensor_version(t) for t in _tensors((self.arguments, self.output))]
        return (self.arguments, self.output) if now == self.versions else None


def _tensors(value: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


def _versions(value: Any) -> list[int] | None:
    found = [tensor_version(t) for t in _tensors(value)]
    return None if any(v is None for v in found) else [int(v) for v in found if v is not None]


class _RunWatcher(NoDynamoDispatchMode):
    """Watches every op of a real run for two things a traced graph can hide.

    * Reads of a foldable module's parameter/buffer while that module is not the one running
      (a parent calling F.conv2d(x, self.conv.weight), untraceable code reading bn.running_var,
      a hook): that code would see the changed tensors after folding.
    * In-place writes into a BatchNorm's input after the BatchNorm ran (`x += 1`, which fx records
      as an out-of-place add): once the BatchNorm is an identity, its output is that same tensor.
    """

    def __init__(self, watched: dict[int, list[tuple[int, int, str, str]]], stack: list[str]) -> None:
        super().__init__()
        self.watched = watched
        self.stack = stack
        self.found: dict[str, str] = {}
        # storage address -> (first byte, end, BatchNorm, weak reference to the storage). The inputs are not kept
        # alive (that held every BatchNorm input of the run at once): once a storage is freed nothing can write
        # into it, and an entry whose storage expired is skipped, so memory reused by a later tensor never matches.
        self.bn_inputs: dict[int, list[tuple[int, int, str, StorageWeakRef]]] = {}
        self.written: dict[str, str] = {}

    def watch_bn_input(self, tensor: torch.Tensor, name: str) -> None:
        where = byte_range(tensor)
        if where is not None:
            entries = [e for e in self.bn_inputs.get(where[0], ()) if not e[3].expired()]
            entries.append((where[1], where[2], name, StorageWeakRef(tensor.untyped_storage())))
            self.bn_inputs[where[0]] = entries

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        running = self.stack[-1] if self.stack else ""
        for leaf in _tensor_leaves(args, kwargs):
            if _storage_address(leaf) not in self.watched:  # cheap test first: most operands are activations
                continue
            where = byte_range(leaf)
            if where is None or where[0] not in self.watched:
                continue
            for start, end, owner, attr in self.watched[where[0]]:
                if owner != running and start < where[2] and where[1] < end and owner not in self.found:
                    reader = f"{running}'s forward" if running else "the model's forward"
                    self.found[owner] = (f"its {attr} is also read by {reader} (op {func}) at run time, so folding "
                                         "would change what that code computes")
        schema = op_schema(func)
        if self.bn_inputs and schema is not None and schema.is_mutable:
            self._note_writes(func, schema, args, kwargs)
        return func(*args, **kwargs)

    def _note_writes(self, func: Any, schema: Any, args: Any, kwargs: dict[str, Any]) -> None:
        for index, argument in enumerate(schema.arguments):
            info = argument.alias_info
            if info is None or not info.is_write:
                continue
            value = args[index] if index < len(args) else kwargs.get(argument.name)
            for leaf in pytree.tree_leaves(value):
                where = byte_range(leaf) if isinstance(leaf, torch.Tensor) else None
                if where is None:
                    continue
                for start, end, name, storage in self.bn_inputs.get(where[0], ()):
                    if start < where[2] and where[1] < end and not storage.expired():
                        self.written.setdefault(name, str(func))



def _tensor_leaves(args: Any, kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The tensor operands of one op: a flat scan for the usual (tensor, scalar, list of tensors) arguments, pytree
    for anything nested deeper (it costs about as much as the op itself on a small activation)."""
    found: list[torch.Tensor] = []
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, torch.Tensor):
                    found.append(item)
                elif isinstance(item, (list, tuple, dict)):
                    return [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        elif isinstance(value, dict):
            return [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    return found


def _storage_address(tensor: torch.Tensor) -> int | None:
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, ValueError, TypeError):  # meta, sparse, exotic tensors: byte_range decides
        return None

def _watched_memory(model: nn.Module, watched: Sequence[str]) -> dict[int, list[tuple[int, int, str, str]]]:
    """Byte ranges of the watched modules' own tensors, by storage: what a foreign read would touch."""
    memory: dict[int, list[tuple[int, int, str, str]]] = {}
    for name in watched:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        for attr, tensor in own_tensors(module):
            where = byte_range(tensor)
            if where is not None:
                memory.setdefault(where[0], []).append((where[1], where[2], name, attr))
    return memory


def observe_run(model: nn.Module, example_inputs: Sequence[Any], watched: Sequence[str],
                capture: AbstractSet[str] = frozenset(), remember: AbstractSet[str] = frozenset()) -> RunRecord:
    """Run `model` once on the example inputs, counting module calls, BatchNorm input ranks, and reads of the
    tensors of the `watched` modules from anywhere but their own forward; keeps a copy of the first call's
    (args, kwargs, output) of each module named in `capture`, as its forward saw and returned them
    (after the module's forward pre-hooks, before its forward hooks): what its fx graph must reproduce.

    For the modules named in `remember` (the wide convs and Linears of a traced graph) it keeps each call's
    args and kwargs (before any pre-hook) and final output, the run's own tensors with their write counts
    (Remembered), up to MAX_REMEMBERED_BYTES: a run of the graph that gives such a module the same arguments
    gets the same output without computing it again."""
    names = {id(m): n for n, m in model.named_modules()}
    captured: dict[str, tuple[tuple[Any, ...], dict[str, Any], Any]] = {}
    calls: Counter = Counter()
    ranks: dict[str, set[int]] = {}
    stack: list[str] = []
    memory = _watched_memory(model, watched)
    results: dict[str, list[Remembered | None]] = {}
    kept = [0]
    pending: dict[str, list[tuple[Any, list[int]] | None]] = {}

    def size(value: Any) -> int:
        return sum(t.numel() * t.element_size() for t in _tensors(value))

    def recall_in(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        arguments = (tuple(args), dict(kwargs))
        versions = _versions(arguments)
        pending.setdefault(names[id(module)], []).append(None if versions is None else (arguments, versions))

    def recall_out(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        waiting = pending.get(names[id(module)], [])
        given = waiting.pop() if waiting else None
        versions = _versions(output)
        cost = size(output) + (size(given[0]) if given is not None else 0)
        call = None
        if given is not None and versions is not None and kept[0] + cost <= MAX_REMEMBERED_BYTES:
            kept[0] += cost
            call = Remembered(given[0], output, given[1] + versions)
        results.setdefault(names[id(module)], []).append(call)  # a call not kept still takes its index

    def enter(module: nn.Module, args: tuple[Any, ...]) -> None:
        name = names[id(module)]
        calls[name] += 1
        stack.append(name)
        if is_batchnorm_like(module) and args and isinstance(args[0], torch.Tensor):
            ranks.setdefault(name, set()).add(args[0].dim())

    def leave(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if stack:
            stack.pop()
        if is_batchnorm_like(module) and args and isinstance(args[0], torch.Tensor):
            mode.watch_bn_input(args[0], names[id(module)])

    def keep(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        name = names[id(module)]
        if name not in captured:  # clones: later in-place ops must not change what we compare against
            captured[name] = pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t,
                                             (args, kwargs, output))

    mode = _RunWatcher(memory, stack)
    handles = []
    try:
        for module in model.modules():
            if isinstance(module, torch.jit.ScriptModule):
                continue  # TorchScript modules take no hooks (and are never folded)
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave, always_call=True))
            if names.get(id(module)) in capture:  # first in line: the raw forward output, before user hooks
                handles.append(module.register_forward_hook(keep, with_kwargs=True, prepend=True))
            if names.get(id(module)) in remember:  # args before any pre-hook, the output after every hook
                handles.append(module.register_forward_pre_hook(recall_in, prepend=True, with_kwargs=True))
                handles.append(module.register_forward_hook(recall_out))
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(0)
            with mode:
                output = model(*fresh_inputs(example_inputs))
    except Exception as exc:
        raise InputError(f"example inputs of shape {shapes_text(example_inputs)} do not run through "
                         f"{type(model).__name__}: {error_summary(exc)}; pass the shape the model expects") from None
    finally:
        for handle in handles:
            handle.remove()
    return RunRecord(output=output, calls=calls, ranks=ranks, foreign_reads=mode.found, captured=captured,
                     input_written=mode.written, results=results)


def runtime_refusals(ops: Sequence[Op], record: RunRecord, graph_calls: Counter) -> dict[str, str]:
    """Reasons found by the real run: a module read from elsewhere, or called another number of times than traced."""
    refusals = dict(record.foreign_reads)
    for op in ops:
        if op.module is None or op.kind not in ("layer", "bn") or op.name in refusals:
            continue
        if record.calls[op.name] != graph_calls[op.name]:
            refusals[op.name] = (f"it runs {record.calls[op.name]} times on the example inputs but the traced graph "
                                 f"calls it {graph_calls[op.name]} times, so code the tracer cannot see also calls it")
    return refusals

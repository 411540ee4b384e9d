"""Memory the fold could change behind someone's back: in-place writes, views, shared tensors, attribute reads.

Statically, tensors that share memory (tied weights), modules registered twice and
get_attr reads of a module's tensors are refused; writer_of/other_readers tell the
rules whether removing a BatchNorm would let an in-place write reach its consumer.
"""
from __future__ import annotations

import inspect
import operator
from typing import Iterator, Sequence

import torch
import torch.fx as fx
from torch import nn

from bnstrip._torch import op_schema, own_buffers, own_parameters
from bnstrip.trace.bn_registry import is_batchnorm_like
from bnstrip.trace.opgraph import Op, join_name
from bnstrip.trace.reads import call_name as _call_name, metadata_read

_VIEW_NAMES = {
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "transpose", "swapaxes", "swapdims", "permute",
    "t", "narrow", "select", "squeeze", "unsqueeze", "expand", "expand_as", "as_strided", "split", "chunk", "unbind",
    "tensor_split", "detach", "contiguous", "getitem", "movedim", "moveaxis", "diagonal", "unfold", "view_as_real",
    "view_as_complex", "real", "imag", "split_with_sizes", "hsplit", "vsplit", "dsplit", "adjoint", "mT", "mH",
    "T", "H",
    "data", "align_as", "rename", "type_as", "to", "float", "double", "half", "bfloat16", "cpu", "cuda", "clone_view",
}
"""Calls whose result may share memory with their first argument (`to`/`float` do when nothing changes)."""


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.ilshift, operator.irshift, operator.iand, operator.ior,
                      operator.ixor, operator.imatmul, operator.setitem}


def _writes_first_argument(op: Op) -> bool:
    """Whether this op may change its first input in place (x.add_(), x += y, x[i] = v, ReLU(inplace=True), ...)."""
    node = op.node
    if node is None or node.op not in ("call_method", "call_function", "call_module"):
        return False
    if node.op == "call_module":
        return getattr(op.module, "inplace", False) is True
    schema = op_schema(node.target)
    if schema is not None:  # an aten overload (torch.export): its schema says which arguments it writes
        return bool(schema.arguments) and schema.arguments[0].alias_info is not None \
            and schema.arguments[0].alias_info.is_write
    name = _call_name(node)
    if node.target in _INPLACE_OPERATORS or (name.endswith("_") and not name.startswith("_")):
        return True
    if node.op == "call_function" and callable(node.target):
        try:
            bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
        except (TypeError, ValueError):
            return bool(node.kwargs.get("inplace"))
        return bound.arguments.get("inplace") is True
    return False



def _returns_alias(op: Op) -> bool:
    node = op.node
    if node is None or node.op not in ("call_method", "call_function"):
        return False
    schema = op_schema(node.target)
    if schema is not None:
        return any(r.alias_info is not None for r in schema.returns)
    return _call_name(node) in _VIEW_NAMES


def _writer_below(source: Op, skip: Op | None, depth: int) -> Op | None:
    if depth > 16:
        return source
    for user in source.users:
        if user is skip or not user.inputs or user.inputs[0] is not source:
            continue
        if _writes_first_argument(user):
            return user
        if _returns_alias(user) and (found := _writer_below(user, skip, depth + 1)) is not None:
            return found
    return None


def alias_base(op: Op) -> Op:
    """The op whose output `op`'s output is a view of (itself when it is no view)."""
    for _ in range(16):
        if not (_returns_alias(op) and op.inputs):
            return op
        op = op.inputs[0]
    return op


def writer_of(source: Op, skip: Op | None = None) -> Op | None:
    """An op that may change `source`'s output in place: through it, a view of it, or the tensor it is a view of."""
    return _writer_below(alias_base(source), skip, 0)


def other_readers(source: Op, skip: Op) -> list[Op]:
    """Every op besides `skip` that reads `source`'s memory: its users, and the users of every view of it or of
    the tensor it is a view of."""
    found: list[Op] = []

    def walk(op: Op, depth: int) -> None:
        for user in op.users:
            if user is skip or user in found:
                continue
            if depth < 16 and _returns_alias(user) and user.inputs and user.inputs[0] is op:
                walk(user, depth + 1)
            else:
                found.append(user)

    base = alias_base(source)
    walk(base, 0)
    if base is not source:
        found = [u for u in found if u is not source]
    return found


def alias_refusals(model: nn.Module) -> dict[str, str]:
    """Modules registered under several names: folding through one name would change the other's calls."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    refusals = {}
    for aliases in names.values():
        if len(aliases) > 1:
            for name in aliases:
                refusals[name] = f"the same module is registered as {' and '.join(aliases[:3])}"
    return refusals


def byte_range(tensor: torch.Tensor) -> tuple[int, int, int] | None:
    """(storage address, first byte, one past the last byte) that `tensor` can touch; None when it has no memory."""
    try:
        if tensor.numel() == 0 or tensor.device.type == "meta" or tensor.layout != torch.strided:
            return None
        storage = tensor.untyped_storage().data_ptr()
        start = tensor.data_ptr()
    except (RuntimeError, NotImplementedError, ValueError):  # lazy/uninitialised or exotic tensors
        return None
    span = 1 + sum((size - 1) * abs(stride) for size, stride in zip(tensor.shape, tensor.stride(), strict=True))
    return storage, start, start + span * tensor.element_size()


def own_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for bag in (own_parameters(module), own_buffers(module)):
        for attr, tensor in bag.items():
            if isinstance(tensor, torch.Tensor):
                yield attr, tensor


def shared_memory_refusals(model: nn.Module) -> dict[str, str]:
    """Modules whose own parameters/buffers overlap the memory of another tensor of the model (tied weights,
    views of one buffer): folding writes into that memory and would change the other tensor's user too."""
    by_storage: dict[int, list[tuple[int, int, str, str]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, tensor in own_tensors(module):
            where = byte_range(tensor)
            if where is not None:
                by_storage.setdefault(where[0], []).append((where[1], where[2], module_name, attr))
    refusals: dict[str, str] = {}
    for entries in by_storage.values():
        if len(entries) < 2:
            continue
        entries.sort()
        reach_end, reach_name = entries[0][1], join_name(entries[0][2], entries[0][3])
        for start, end, module_name, attr in entries[1:]:
            name = join_name(module_name, attr)
            if start < reach_end:
                first_owner = reach_name.rpartition(".")[0]
                refusals.setdefault(module_name, f"its {attr} shares memory with {reach_name} (tied or aliased "
                                                 f"tensors), so folding would change {reach_name} too")
                refusals.setdefault(first_owner, f"its {reach_name.rpartition('.')[2]} shares memory with {name} "
                                                 f"(tied or aliased tensors), so folding would change {name} too")
            if end > reach_end:
                reach_end, reach_name = end, name
    return refusals


def module_refusals(model: nn.Module) -> dict[str, str]:
    """Per-module reasons that hold whatever the graph says: aliases and shared memory."""
    return {**shared_memory_refusals(model), **alias_refusals(model)}


def attribute_read_refusals(ops: Sequence[Op], gm: fx.GraphModule) -> dict[str, str]:
    """Modules whose parameters/buffers the traced code reads directly (get_attr), besides calling the module.

    A functional batch_norm's own statistics are excluded: that call is what gets folded, and
    functional_bn already refuses statistics that are read anywhere else. So are reads of a
    layer's shape/dtype/device (x.to(self.conv.weight.dtype)), which folding keeps; not of a
    BatchNorm's, whose tensors disappear with it.
    """
    refusals: dict[str, str] = {}
    for op in ops:
        node = op.node
        if node is None or node.op != "get_attr" or not node.users:
            continue  # an unused read (fx records module attribute lookups) cannot change anything
        if all(user.functional is not None for user in op.users):
            continue
        owner_path = str(node.target).rpartition(".")[0]
        try:
            owner_module = gm.get_submodule(owner_path) if owner_path else gm
        except AttributeError:
            owner_module = None
        if not is_batchnorm_like(owner_module) and all(metadata_read(user.node) for user in op.users):
            continue
        owner, _, attr = op.name.rpartition(".")
        reader = op.users[0].label
        refusals.setdefault(owner, f"its {attr} is also read directly in forward (by {reader}), so folding would "
                                   "change what that code computes")
    return refusals

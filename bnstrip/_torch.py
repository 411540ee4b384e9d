"""Every private torch name bnstrip touches, in one place, each with why no public API does the job.

torch may rename or drop any of these in a release; tests/test__torch.py checks each one by name,
so an upgrade fails there first (with the name of what moved) instead of deep inside a fold.
Where torch has a public API it is used instead, at the call site: `Tensor.is_floating_point`,
`dtype.itemsize` (not `torch._utils._element_size`), `fx.Graph.set_codegen` (writing; only the
read below is private), `named_parameters(recurse=False)` where None slots do not matter.
docs/architecture.md lists this module's names.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree  # flatten (inputs, outputs) like torch.export does; torch.utils.pytree is not public in 2.13
from torch import fx, nn
from torch.nn.modules import module as _module_globals
from torch.nn.modules.batchnorm import _BatchNorm as BatchNormBase  # the one base of BatchNorm1d/2d/3d, SyncBatchNorm
from torch.nn.modules.conv import _ConvNd as ConvNd  # the one base of Conv1d/2d/3d and the transposed convs
from torch.nn.modules.conv import _ConvTransposeNd as ConvTransposeNd  # the one base of ConvTranspose1d/2d/3d
from torch.utils._python_dispatch import TorchDispatchMode  # see every aten call of a run; no public dispatch mode

__all__ = ["BatchNormBase", "ConvNd", "ConvTransposeNd", "NoDynamoDispatchMode", "OpOverload", "TorchDispatchMode",
           "graph_codegen", "has_forward_hooks", "tensor_version", "has_module_hooks", "global_module_hooks", "op_schema", "own_buffers", "own_parameters",
           "pytree", "traceable_assert", "weights_only_allowed_globals"]

OpOverload = torch._ops.OpOverload
"""An aten op with its overload (`aten.add.Tensor`): what torch.export graphs call; no public alias."""

traceable_assert = torch._assert
"""`assert` that fx and torch.export can trace (documented, but named with an underscore)."""


class NoDynamoDispatchMode(TorchDispatchMode):
    """A TorchDispatchMode that torch does not wrap in torch._dynamo.disable.

    torch asks `_should_skip_dynamo()` (a private hook) before wrapping `__torch_dispatch__`; the
    wrap's first call imports torch._dynamo and sympy (about 75 MiB and a second) for a mode that is
    never compiled. Returning False is the only way to opt out.
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False


def tensor_version(tensor: torch.Tensor) -> int | None:
    """How many in-place writes the tensor's memory has had (shared by its views); None where torch keeps no count
    (inference-mode tensors). `Tensor._version` is the only way to know a tensor is unchanged without copying it."""
    try:
        return int(tensor._version)
    except RuntimeError:
        return None


def op_schema(target: Any) -> Any:
    """The FunctionSchema of an aten op (None for anything else): whether it mutates or aliases its inputs.

    `OpOverload._schema` is the only place torch states `alias_info`/`is_mutable`; there is no public getter.
    """
    return getattr(target, "_schema", None)


def own_parameters(module: nn.Module) -> dict[str, nn.Parameter | None]:
    """The module's own Parameter slots, None ones included (`bias=False` registers bias as None).

    named_parameters(recurse=False) hides None slots and parametrized weights alike; bnstrip must tell
    "no bias" from "a bias that is not a plain Parameter", so it reads the slots themselves (the live dict).
    """
    return module._parameters


def own_buffers(module: nn.Module) -> dict[str, torch.Tensor | None]:
    """The module's own buffer slots, None ones included (the live dict, so a rewrite can set a slot in place)."""
    return module._buffers


def has_forward_hooks(module: nn.Module) -> bool:
    """Forward (pre-)hooks, with or without kwargs, on this one module: no public way to ask."""
    return bool(module._forward_hooks or module._forward_pre_hooks or getattr(module, "_forward_hooks_with_kwargs", None))


def has_module_hooks(module: nn.Module) -> bool:
    """Forward hooks (has_forward_hooks) or backward hooks on this one module."""
    return has_forward_hooks(module) or bool(getattr(module, "_backward_hooks", None))


def global_module_hooks() -> bool:
    """Global forward (pre-)hooks (register_module_forward_hook) that run on every module: no public way to ask."""
    return bool(_module_globals._global_forward_hooks or _module_globals._global_forward_pre_hooks)


def graph_codegen(graph: fx.Graph) -> Any:
    """The code generator of an fx graph (an exported program's pytree in/out handling); set it with set_codegen.

    fx has a public `Graph.set_codegen` but no getter.
    """
    return graph._codegen


def weights_only_allowed_globals() -> set[str]:
    """What torch's weights-only unpickler admits by default, plus the user's add_safe_globals.

    The same set torch's own get_unsafe_globals_in_checkpoint reads; torch exposes no public list.
    """
    from torch import _weights_only_unpickler as wou

    return set(wou._get_allowed_globals()) | set(wou._get_user_allowed_globals())


def serialized_dtypes() -> dict[Any, torch.dtype]:
    """torch.export's serialized dtype code -> torch.dtype, for reading a .pt2's tensor metadata without torch.export.load."""
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE

    return dict(_SERIALIZE_TO_TORCH_DTYPE)

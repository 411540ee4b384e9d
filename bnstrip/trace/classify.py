"""What a module is: a foldable Conv/ConvTranspose/Linear, a plain BatchNorm, or something bnstrip must not touch.

Modules are recognised by behaviour: a subclass counts only if its forward is PyTorch's own,
it has no hooks, and its tensors are plain Parameters/buffers.
"""
from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

_CONV_FORWARDS = {nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward}
_CONV_IMPLS = {nn.Conv1d._conv_forward, nn.Conv2d._conv_forward, nn.Conv3d._conv_forward}
_CONVT_FORWARDS = {nn.ConvTranspose1d.forward, nn.ConvTranspose2d.forward, nn.ConvTranspose3d.forward}
_BN_FORWARDS = {_BatchNorm.forward, nn.SyncBatchNorm.forward}


def layer_kind(module: nn.Module) -> str | None:
    """'conv', 'convT' or 'linear' by isinstance (subclasses included), else None."""
    if isinstance(module, _ConvTransposeNd):
        return "convT"
    if isinstance(module, _ConvNd):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


def has_hooks(module: nn.Module) -> bool:
    """Forward hooks on this module, or global ones (register_module_forward_hook) that run on every module."""
    from torch.nn.modules import module as module_globals

    return bool(module._forward_hooks or module._forward_pre_hooks or getattr(module, "_backward_hooks", None)
                or getattr(module, "_forward_hooks_with_kwargs", None)
                or module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks)


def _hook_note(module: nn.Module) -> str:
    from torch.nn.modules import module as module_globals

    if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
        return ("global module hooks are registered (register_module_forward_hook/_pre_hook) and may change its "
                "output; remove them before folding")
    return f"{type(module).__name__} has hooks that may change its output"


def _plain_tensor_attr(module: nn.Module, name: str) -> bool:
    """True when `name` is a real Parameter/buffer slot (not a parametrization or property)."""
    return name in module._parameters or name in module._buffers


def layer_refusal(module: nn.Module) -> str | None:
    """Why this Conv/ConvTranspose/Linear cannot be folded into, or None when it behaves like PyTorch's."""
    kind = layer_kind(module)
    if kind is None:
        return f"{type(module).__name__} is not a Conv, ConvTranspose or Linear"
    cls = type(module)
    if kind == "conv" and (cls.forward not in _CONV_FORWARDS or cls._conv_forward not in _CONV_IMPLS):
        return f"{cls.__name__} overrides forward, so its output is not a plain convolution"
    if kind == "convT" and cls.forward not in _CONVT_FORWARDS:
        return f"{cls.__name__} overrides forward, so its output is not a plain transposed convolution"
    if kind == "linear" and cls.forward is not nn.Linear.forward:
        return f"{cls.__name__} overrides forward, so its output is not a plain linear map"
    if has_hooks(module):
        return _hook_note(module)
    if "weight" not in module._parameters or module._parameters["weight"] is None:
        return f"{cls.__name__}'s weight is not a plain Parameter (parametrized or missing)"
    if "bias" not in module._parameters:
        return f"{cls.__name__}'s bias is not a plain Parameter (parametrized)"
    weight = module._parameters["weight"]
    if isinstance(weight, nn.parameter.UninitializedParameter):
        return f"{cls.__name__} is a lazy module that was never run"
    if not weight.is_floating_point():
        return f"{cls.__name__}'s weight is {weight.dtype}, not floating point"
    return None


def bn_refusal(module: nn.Module) -> str | None:
    """Why this BatchNorm module cannot be folded away, or None when it is a plain eval-mode BatchNorm."""
    if not isinstance(module, _BatchNorm):
        return f"{type(module).__name__} is not a BatchNorm"
    cls = type(module)
    if cls.forward not in _BN_FORWARDS:
        return f"{cls.__name__} overrides forward, so it is not a plain BatchNorm"
    if has_hooks(module):
        return _hook_note(module)
    if module._buffers.get("running_mean") is None or module._buffers.get("running_var") is None:
        return "it has no running statistics (track_running_stats=False), so it normalises with batch statistics even in eval mode"
    for name in ("running_mean", "running_var"):
        if not _plain_tensor_attr(module, name):
            return f"its {name} is not a plain buffer"
    if module.affine and not (_plain_tensor_attr(module, "weight") and _plain_tensor_attr(module, "bias")):
        return "its weight/bias are not plain Parameters (parametrized)"
    return None


def bn_fixed_rank(module: nn.Module | None) -> int | None:
    """The only input rank a BatchNorm class accepts, when there is just one (2d: 4, 3d: 5)."""
    if isinstance(module, nn.BatchNorm2d):
        return 4
    if isinstance(module, nn.BatchNorm3d):
        return 5
    return None


def foldable_module_names(model: nn.Module) -> list[str]:
    """Modules a fold could change: the ones whose tensors must not be read from elsewhere."""
    return [n for n, m in model.named_modules() if layer_kind(m) is not None or isinstance(m, _BatchNorm)]

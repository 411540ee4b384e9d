"""What a module is: a foldable Conv/ConvTranspose/Linear, a plain BatchNorm, or something bnstrip must not touch.

Modules are recognised by behaviour: a subclass counts only if its forward is PyTorch's own,
it has no hooks, and its tensors are plain Parameters/buffers. BatchNorm look-alikes (FrozenBatchNorm2d,
BatchNormAct2d) count through bnstrip.trace.bn_registry, by exact class.
"""
from __future__ import annotations

from torch import nn
from bnstrip._torch import BatchNormBase as _BatchNorm
from bnstrip._torch import ConvNd as _ConvNd
from bnstrip._torch import ConvTransposeNd as _ConvTransposeNd
from bnstrip._torch import global_module_hooks, has_module_hooks, own_buffers, own_parameters

from bnstrip.trace.bn_registry import batchnorm_entry, is_batchnorm_like

_CONV_FORWARDS = {nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward}
_CONV_IMPLS = {nn.Conv1d._conv_forward, nn.Conv2d._conv_forward, nn.Conv3d._conv_forward}
_CONVT_FORWARDS = {nn.ConvTranspose1d.forward, nn.ConvTranspose2d.forward, nn.ConvTranspose3d.forward}


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
    return has_module_hooks(module) or global_module_hooks()


def _hook_note(module: nn.Module) -> str:
    if global_module_hooks():
        return ("global module hooks are registered (register_module_forward_hook/_pre_hook) and may change its "
                "output; remove them before folding")
    return f"{type(module).__name__} has hooks that may change its output"


def _forward_note(cls: type[nn.Module], kind: str) -> str | None:
    if kind == "conv" and (cls.forward not in _CONV_FORWARDS or getattr(cls, "_conv_forward", None) not in _CONV_IMPLS):
        return f"{cls.__name__} overrides forward, so its output is not a plain convolution"
    if kind == "convT" and cls.forward not in _CONVT_FORWARDS:
        return f"{cls.__name__} overrides forward, so its output is not a plain transposed convolution"
    if kind == "linear" and cls.forward is not nn.Linear.forward:
        return f"{cls.__name__} overrides forward, so its output is not a plain linear map"
    return None


def own_forward_note(module: nn.Module) -> str | None:
    """Why this Conv/Linear subclass is not PyTorch's layer when the only reason is its own forward (timm's
    Conv2dSame pads, then convolves): a BatchNorm after it may fold into it, proven by the real-run check."""
    kind = layer_kind(module)
    note = _forward_note(type(module), kind) if kind in ("conv", "linear") else None
    return note if note is not None and layer_refusal(module, own_forward=True) is None else None


def layer_refusal(module: nn.Module, own_forward: bool = False) -> str | None:
    """Why this Conv/ConvTranspose/Linear cannot be folded into, or None when it behaves like PyTorch's
    (with own_forward=True, a subclass's own forward is allowed: see own_forward_note)."""
    kind = layer_kind(module)
    if kind is None:
        return f"{type(module).__name__} is not a Conv, ConvTranspose or Linear"
    cls = type(module)
    if (note := _forward_note(cls, kind)) and not (own_forward and kind != "convT"):
        return note
    if has_hooks(module):
        return _hook_note(module)
    if "weight" not in own_parameters(module) or own_parameters(module)["weight"] is None:
        return f"{cls.__name__}'s weight is not a plain Parameter (parametrized or missing)"
    if "bias" not in own_parameters(module):
        return f"{cls.__name__}'s bias is not a plain Parameter (parametrized)"
    weight = own_parameters(module)["weight"]
    assert weight is not None  # checked above
    if isinstance(weight, nn.parameter.UninitializedParameter):
        return f"{cls.__name__} is a lazy module that was never run"
    if not weight.is_floating_point():
        return f"{cls.__name__}'s weight is {weight.dtype}, not floating point"
    return None


def _own_tensor(module: nn.Module, tensor: object) -> bool:
    """True when `tensor` is one of the module's own Parameter/buffer slots (not a parametrization or property)."""
    return any(t is tensor for t in (*own_parameters(module).values(), *own_buffers(module).values()))


def bn_refusal(module: nn.Module, ignore_training: bool = False) -> str | None:
    """Why this BatchNorm(-like) module cannot be folded away, or None when it is an eval-mode BatchNorm that
    bnstrip knows (PyTorch's forward, or a class of bnstrip.trace.bn_registry)."""
    cls = type(module)
    entry = batchnorm_entry(module)
    if entry is None:
        if isinstance(module, _BatchNorm):
            return (f"{cls.__name__} overrides forward, so it is not a plain BatchNorm (if it normalises first, "
                    "register it with bnstrip.register_batchnorm)")
        return f"{cls.__name__} is not a BatchNorm"
    if has_hooks(module):
        return _hook_note(module)
    try:
        stats = entry.stats(module)
    except Exception as exc:  # noqa: BLE001 - a user's stats reader
        return f"its statistics cannot be read ({type(exc).__name__}: {exc})"
    if stats.running_mean is None or stats.running_var is None:
        return ("it has no running statistics (track_running_stats=False), so it normalises with batch statistics "
                "even in eval mode")
    for name in ("running_mean", "running_var", "weight", "bias"):
        tensor = getattr(stats, name)
        if tensor is not None and not _own_tensor(module, tensor):
            return f"its {name} is not a plain Parameter or buffer (parametrized?)"
    if not ignore_training and isinstance(module, _BatchNorm) and module.training:
        return ("it is in training mode (its .training is True) although the model is in eval mode, so it "
                "normalises with batch statistics; call .eval() on it to fold it")
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
    return [n for n, m in model.named_modules() if layer_kind(m) is not None or is_batchnorm_like(m)]

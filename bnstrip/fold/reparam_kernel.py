"""Which branches of a sum fit one conv, and that conv's kernel: the maths half of branch merging (see reparam.py).

Per spatial dim the merged kernel is the largest branch kernel; a smaller one sits centred in it,
which is exact when its padding is the larger one's minus the offset times the dilation. An
identity or lone-BatchNorm branch is a one-tap kernel at the centre of each group's diagonal.
Every branch's kernel and bias is built in float64 (BNs and scalars after a conv scale its output
channels) and the sum is rounded once to the weights' dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from bnstrip._torch import ConvNd
from bnstrip.core.foldmath import BNStats, bn_scale_shift, cast_folded
from bnstrip.fold.reparam_match import Branch

_CONV_CLASSES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@dataclass
class Geometry:
    """The merged conv's settings."""

    rank: int
    in_channels: int
    out_channels: int
    groups: int
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    kernel: tuple[int, ...]
    padding: tuple[int, ...]
    padding_mode: str
    has_bias: bool
    weight: torch.Tensor



def _int_padding(name: str, conv: ConvNd) -> tuple[int, ...] | str:
    if not isinstance(conv.padding, str):
        return tuple(conv.padding)
    if conv.padding == "valid":
        return (0,) * len(conv.kernel_size)
    totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
    if any(t % 2 for t in totals):
        return f"{name} has padding='same' with an even kernel, which pads one side more"
    return tuple(t // 2 for t in totals)


def _padded(conv: ConvNd) -> bool:
    """Whether the conv reads padding at all (its padding_mode matters only then)."""
    return conv.padding == "same" or (not isinstance(conv.padding, str) and any(p > 0 for p in conv.padding))


def _settings_problem(convs: list[tuple[str, ConvNd]]) -> str | None:
    name0, first = convs[0]
    for name, conv in convs[1:]:
        if len(conv.kernel_size) != len(first.kernel_size):
            return f"{name} is a {len(conv.kernel_size)}-d conv but {name0} is {len(first.kernel_size)}-d"
        for attr in ("stride", "groups", "in_channels", "out_channels"):
            if getattr(conv, attr) != getattr(first, attr):
                return (f"{name} has {attr}={getattr(conv, attr)} but {name0} has {attr}={getattr(first, attr)}; "
                        f"branches that differ in {attr} are not one conv")
        if _padded(conv) and _padded(first) and conv.padding_mode != first.padding_mode:
            return (f"{name} has padding_mode={conv.padding_mode} but {name0} has padding_mode={first.padding_mode}; "
                    "branches that pad differently are not one conv")
        if conv.weight.dtype != first.weight.dtype or conv.weight.device != first.weight.device:
            return f"{name} and {name0} hold weights of other dtypes or devices"
    return None


def _kernel_layout(convs: list[tuple[str, ConvNd]], pads: dict[str, tuple[int, ...]]
                   ) -> tuple[list[int], list[int], list[int]] | str:
    """(kernel, padding, dilation) of the merged conv per dim, or why a branch is not centred in it."""
    kernel: list[int] = []
    padding: list[int] = []
    dilation: list[int] = []
    for d in range(len(convs[0][1].kernel_size)):
        big_name, big = max(convs, key=lambda item: item[1].kernel_size[d])
        size, pad, dil = big.kernel_size[d], pads[big_name][d], big.dilation[d]
        for name, conv in convs:
            k, p = conv.kernel_size[d], pads[name][d]
            if k > 1 and conv.dilation[d] != dil:
                return (f"{name} has dilation {tuple(conv.dilation)} but {big_name} has {tuple(big.dilation)}; "
                        "branches that differ in dilation are not one conv")
            if (size - k) % 2 or 2 * (pad - p) != dil * (size - k):
                return (f"padding misalignment: {name} (kernel {k}, padding {p} in dim {d}) is not centred in "
                        f"{big_name}'s kernel {size} with padding {pad}, so its taps would shift")
        kernel.append(size)
        padding.append(pad)
        dilation.append(dil)
    return kernel, padding, dilation


def _identity_problem(branches: list[Branch], first: ConvNd, kernel: list[int], padding: list[int],
                      dilation: list[int]) -> str | None:
    """An identity or BN-alone branch is a centred one-tap kernel: same channels, stride 1, odd aligned kernel."""
    plain = [b for b in branches if b.conv is None]
    if not plain:
        return None
    if first.in_channels != first.out_channels:
        return (f"an identity branch needs as many input as output channels, but the convs map "
                f"{first.in_channels} to {first.out_channels}")
    if any(s != 1 for s in first.stride):
        return f"an identity branch cannot be merged into convs with stride {tuple(first.stride)}"
    for size, pad, dil in zip(kernel, padding, dilation, strict=True):
        if size % 2 == 0 or 2 * pad != dil * (size - 1):
            return f"an identity branch is not centred in the merged kernel {tuple(kernel)} with padding {tuple(padding)}"
    for branch in plain:
        for step in branch.steps:
            # a module BatchNorm(-like) step's statistics are set too (reparam_match.linear_step); its module is duck-typed
            channels = (step.stats.running_mean if step.stats else cast(Any, step.module).running_mean).numel() \
                if step.kind == "bn" else first.in_channels
            if channels != first.in_channels:
                return f"BatchNorm {step.name} has {channels} channels, not {first.in_channels}"
    return None


def fit_one_conv(branches: list[Branch]) -> Geometry | str:
    # conv steps hold a ConvNd, never a transposed one (reparam_match.linear_step)
    convs = [(b.conv.name, cast(ConvNd, b.conv.module)) for b in branches if b.conv is not None]
    if problem := _settings_problem(convs):
        return problem
    pads: dict[str, tuple[int, ...]] = {}
    for name, conv in convs:
        pad = _int_padding(name, conv)
        if isinstance(pad, str):
            return pad
        pads[name] = pad
    layout = _kernel_layout(convs, pads)
    if isinstance(layout, str):
        return layout
    kernel, padding, dilation = layout
    first = convs[0][1]
    if problem := _identity_problem(branches, first, kernel, padding, dilation):
        return problem
    mode = next((c.padding_mode for _, c in convs if _padded(c)), "zeros")
    has_bias = any(c.bias is not None for _, c in convs) or any(s.kind == "bn" for b in branches for s in b.steps)
    return Geometry(rank=len(kernel), in_channels=first.in_channels, out_channels=first.out_channels,
                     groups=first.groups, stride=tuple(first.stride), dilation=tuple(dilation), kernel=tuple(kernel),
                     padding=tuple(padding), padding_mode=mode, has_bias=has_bias, weight=first.weight)


def shape_problem(branches: list[Branch], rank: int) -> str | None:
    """With shapes from the example inputs: the terms must not broadcast, and a lone BN must see batched input."""
    shapes = {tuple(m.shape) for b in branches if (m := b.term.meta.get("tensor_meta")) is not None}
    if len(shapes) > 1:
        return f"the branches have different output shapes {sorted(shapes)}, so their sum broadcasts"
    for branch in branches:
        meta = branch.base.meta.get("tensor_meta")
        if branch.conv is None and any(s.kind == "bn" for s in branch.steps) and meta is not None \
                and len(meta.shape) != rank + 2:
            return f"a BatchNorm branch reads a {len(meta.shape)}-D input, not a batched {rank + 2}-D one"
    return None



# --------------------------------------------------------------------------- kernels (float64, rounded once)


def _bn_affine(step: Any) -> tuple[torch.Tensor, torch.Tensor]:
    bn = step.module
    stats = step.stats or BNStats(bn.running_mean, bn.running_var, bn.weight if bn.affine else None,
                                  bn.bias if bn.affine else None, float(bn.eps))
    return bn_scale_shift(stats, step.name)


def _branch_kernel(branch: Branch, g: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel (out, in/groups, *kernel), bias) of one branch in float64, embedded in the merged kernel."""
    f64: dict[str, Any] = dict(dtype=torch.float64, device=g.weight.device)
    diag = torch.ones(g.in_channels, **f64)
    bias = torch.zeros(g.out_channels, **f64)
    weight: torch.Tensor | None = None
    for step in branch.steps:
        if step.kind == "scale":
            if weight is None:
                diag = diag * step.factor
            else:
                weight = weight * step.factor
            bias = bias * step.factor
        elif step.kind == "conv":
            conv = cast(ConvNd, step.module)  # see fit_one_conv
            small = conv.weight.detach().to(torch.float64) * diag[0]  # only scalars come before a conv
            weight = torch.zeros(g.out_channels, g.in_channels // g.groups, *g.kernel, **f64)
            window = [slice((size - k) // 2, (size - k) // 2 + k) for size, k in zip(g.kernel, conv.kernel_size, strict=True)]
            rows = (slice(None), slice(None), *window)  # one index tuple: mypy (target 3.10) reads a[(x, *y)] as 3.11-only a[x, *y]
            weight[rows] = small
            bias = conv.bias.detach().to(torch.float64) if conv.bias is not None else bias
        elif step.kind == "bn":
            scale, shift = _bn_affine(step)
            if weight is None:
                diag = diag * scale
            else:
                weight = weight * scale.reshape(-1, *[1] * (weight.dim() - 1))
            bias = bias * scale + shift
    if weight is None:
        weight = torch.zeros(g.out_channels, g.in_channels // g.groups, *g.kernel, **f64)
        channels = torch.arange(g.in_channels, device=g.weight.device)
        centre = [torch.full_like(channels, (size - 1) // 2) for size in g.kernel]
        taps = (channels, channels % (g.in_channels // g.groups), *centre)
        weight[taps] = diag
    return weight * branch.coeff, bias * branch.coeff


def merged_conv(branches: list[Branch], g: Geometry, name: str, structural: bool, allow_overflow: bool) -> nn.Module:
    """The one conv of `branches` (zero kernels when `structural`: a skeleton for load_state_dict)."""
    conv = nn.utils.skip_init(_CONV_CLASSES[g.rank], g.in_channels, g.out_channels, g.kernel, stride=g.stride,
                              padding=g.padding, dilation=g.dilation, groups=g.groups, bias=g.has_bias,
                              padding_mode=g.padding_mode, device=g.weight.device, dtype=g.weight.dtype)
    with torch.no_grad():
        if structural:  # rebuilding a skeleton for load_state_dict: the values come from the checkpoint
            conv.weight.zero_()
            if conv.bias is not None:
                conv.bias.zero_()
            return conv.eval()
        parts = [_branch_kernel(branch, g) for branch in branches]
        weight = torch.stack([w for w, _ in parts]).sum(0)
        conv.weight.copy_(cast_folded(weight, g.weight.dtype, name, "weight", allow_overflow))
        if conv.bias is not None:
            bias = torch.stack([b for _, b in parts]).sum(0)
            conv.bias.copy_(cast_folded(bias, g.weight.dtype, name, "bias", allow_overflow))
    return conv.eval()

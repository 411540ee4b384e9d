"""Small replicas of the real layers behind bnstrip's later fold patterns (issue 18), for tests and scripts.

Each class reduces one layer of a real model to what decides the fold: lambda_resnet26t's q/v
BatchNorms on slices of one qkv conv, timm's Conv2dSame pieces concatenated before a BatchNorm,
a BatchNorm read by several layers (NextViT's key and value), a BatchNormAct2d whose act and drop
are identities, starnet's BatchNorm -> pool -> timm `Linear`, RepViT's BatchNorm after a RepVGG sum,
and PyTorch's JIT-freezing conv -> mul -> add -> BatchNorm. `build` returns one with randomised
statistics (bnstrip.testing.zoo.randomize_bn), as bnstrip.testing.zoo does.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bnstrip.testing.zoo import randomize_bn


class LambdaQKV(nn.Module):
    """timm's LambdaLayer: q, k, v = torch.split(qkv(x), ...); q and v normalised, k not (softmax)."""

    def __init__(self, dim: int = 8, heads: int = 2, dim_qk: int = 4, dim_v: int = 6) -> None:
        super().__init__()
        self.heads, self.dim_qk, self.dim_v = heads, dim_qk, dim_v
        self.qkv = nn.Conv2d(dim, heads * dim_qk + dim_qk + dim_v, 1, bias=False)
        self.norm_q = nn.BatchNorm2d(heads * dim_qk)
        self.norm_v = nn.BatchNorm2d(dim_v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q, k, v = torch.split(self.qkv(x), [self.heads * self.dim_qk, self.dim_qk, self.dim_v], dim=1)
        q = self.norm_q(q).reshape(b, self.heads, self.dim_qk, h * w).transpose(-1, -2)
        v = self.norm_v(v).reshape(b, self.dim_v, h * w).transpose(-1, -2)
        k = F.softmax(k.reshape(b, self.dim_qk, h * w), dim=-1)
        content = k @ v
        return (q @ content.unsqueeze(1)).transpose(-1, -2).reshape(b, -1, h, w)


class SlicedHeads(nn.Module):
    """One conv read as chunks and as `x[:, a:b]` slices: two BatchNorms on pieces, one piece left raw."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(4)
        self.bn_c = nn.BatchNorm2d(4)
        self.lin = nn.Linear(5, 9, bias=False)
        self.bn_tail = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a, b, c = self.conv(x).chunk(3, dim=1)
        y = self.lin(t)
        return self.bn_a(a), torch.relu(b), self.bn_c(c), y[:, :6], self.bn_tail(y[:, 6:])


class Conv2dSame(nn.Conv2d):
    """timm's Conv2dSame, reduced: pad like TensorFlow's SAME, then convolve (its own forward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation, strict=True):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        x = F.pad(x, [*pads[1], *pads[0]])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MixedSame(nn.Module):
    """MixNet-TF's mixed conv: two Conv2dSame of different kernels, concatenated, then one BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.k3 = Conv2dSame(3, 4, 3, stride=2, bias=False)
        self.k5 = Conv2dSame(3, 6, 5, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(torch.cat([self.k3(x), self.k5(x)], dim=1)))


class SharedNorm(nn.Module):
    """NextViT's E_MHSA key/value: BatchNorm1d -> transpose -> k and v Linear; and a BN2d read by two 1x1 convs."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(8)
        self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 6, bias=False)
        self.bn2d = nn.BatchNorm2d(5)
        self.key, self.value = nn.Conv2d(5, 4, 1, bias=False), nn.Conv2d(5, 7, 1, stride=2)

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tokens = self.norm(x.transpose(1, 2)).transpose(1, 2)
        feats = self.bn2d(img)
        return self.k(tokens).transpose(1, 2) @ self.v(tokens), self.key(feats), self.value(feats)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.norm_act.BatchNormAct2d, reduced: normalise, then drop, then act (identities here)."""

    def __init__(self, channels: int, act: nn.Module | None = None) -> None:
        super().__init__(channels)
        self.drop = nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return self.act(self.drop(x))


class NormActHead(nn.Module):
    """A BatchNormAct2d with identity act and drop before a 1x1 conv and a pooled Linear (timm heads)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.norm = BatchNormAct2d(6)
        self.proj = nn.Conv2d(6, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(torch.relu(self.conv(x))))


class TimmLinear(nn.Linear):
    """timm.layers.linear.Linear: an nn.Linear whose forward calls F.linear itself."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.weight, self.bias)


class StarHead(nn.Module):
    """starnet_s2's end: conv -> ReLU6 -> BatchNorm -> global average pool -> flatten -> timm Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = TimmLinear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.norm(F.relu6(self.conv(x)))).flatten(1))


class RepVggDw(nn.Module):
    """RepViT's token mixer: bn(conv_bn(x) + conv1(x) + x); the outer BN folds once the sum is one conv."""

    def __init__(self, channels: int = 6) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
                                  nn.BatchNorm2d(channels))
        self.conv1 = nn.Conv2d(channels, channels, 1, groups=channels)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x) + self.conv1(x) + x)


class RepViTLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.mixer = RepVggDw(6)
        self.mixer2 = RepVggDw(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mixer2(torch.relu(self.mixer(torch.relu(self.stem(x)))))


class ConvMulAddBN(nn.Module):
    """PyTorch's JIT freezing test: conv -> mul by a constant -> add a constant -> BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)
        self.bn = nn.BatchNorm2d(5)
        self.register_buffer("scale", torch.tensor([0.5, -2.0, 1.5, 3.0, -0.25]).reshape(1, 5, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn((self.conv(x) * self.scale + 1.5) * 2.0)


PATTERN_ZOO: dict[str, tuple[type[nn.Module], tuple[tuple[int, ...], ...]]] = {
    "LambdaQKV": (LambdaQKV, ((2, 8, 5, 5),)),
    "SlicedHeads": (SlicedHeads, ((2, 3, 6, 6), (4, 5))),
    "MixedSame": (MixedSame, ((2, 3, 9, 9),)),
    "SharedNorm": (SharedNorm, ((2, 7, 8), (2, 5, 6, 6))),
    "NormActHead": (NormActHead, ((2, 3, 6, 6),)),
    "StarHead": (StarHead, ((2, 3, 6, 6),)),
    "RepViTLike": (RepViTLike, ((2, 3, 8, 8),)),
    "ConvMulAddBN": (ConvMulAddBN, ((2, 3, 7, 7),)),
}
"""name -> (class, the input shapes it takes)."""


def build(name: str, seed: int = 0, dtype: torch.dtype = torch.float64) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A replica with randomised BatchNorm statistics in eval mode, in `dtype`, and seeded inputs."""
    cls, shapes = PATTERN_ZOO[name]
    torch.manual_seed(seed)
    model = randomize_bn(cls(), seed).eval().to(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    return model, tuple(torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes)


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d: fixed statistics as buffers, forward x * scale + shift."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias


class FrozenFPN(nn.Module):
    """A torchvision-detection-like backbone: conv -> FrozenBatchNorm2d -> ReLU, twice, and a 1x1 lateral conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1, bias=False), FrozenBatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False), FrozenBatchNorm2d(8)
        self.lateral = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.lateral(torch.relu(self.bn2(self.conv2(x))))


class SlicedBackbone(nn.Module):
    """ultralytics RT-DETR's way of running its layers: a slice of an nn.Sequential called in forward."""

    def __init__(self) -> None:
        super().__init__()
        stem = nn.Sequential()
        stem.add_module("stem1", nn.Sequential())
        stem.stem1.add_module("conv", nn.Conv2d(3, 4, 3, padding=1, bias=False))
        stem.stem1.add_module("bn", nn.BatchNorm2d(4))
        self.model = nn.Sequential(stem, nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)), nn.Conv2d(4, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.model[:-1]:
            x = torch.relu(layer(x))
        return self.model[-1](x)

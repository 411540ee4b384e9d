"""Small replicas of the multi-branch blocks that branch merging targets (RepVGG, MobileOne, ACNet).

Written from the papers' block diagrams, not copied from their repositories, so that tests,
`scripts/bench_reparam.py` and `--arch bnstrip.fold.reparam_blocks:RepNet` exercise the merge
without timm. Each forward sums its branches the way the original code does (`a + b + c`,
`out += branch(x)`, a Python 0 for a missing branch).
"""
from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from bnstrip._torch import traceable_assert
from bnstrip._torch import BatchNormBase as _BatchNorm


def conv_bn(cin: int, cout: int, k: int | tuple[int, int], stride: int = 1, padding: int | tuple[int, int] = 0,
            groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False), nn.BatchNorm2d(cout))


class RepVGGBlock(nn.Module):
    """3x3 conv-BN + 1x1 conv-BN + identity BN (when shapes allow), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.rbr_identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.rbr_dense = conv_bn(cin, cout, 3, stride, 1, groups)
        self.rbr_1x1 = conv_bn(cin, cout, 1, stride, 0, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(x)
        return F.relu(self.rbr_dense(x) + self.rbr_1x1(x) + id_out)


class MobileOneBlock(nn.Module):
    """Several kxk conv-BN branches + a 1x1 conv-BN "scale" branch + a skip BN, then ReLU (depthwise with groups=cin)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, branches: int = 3) -> None:
        super().__init__()
        self.rbr_skip = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.rbr_scale = conv_bn(cin, cout, 1, stride, 0, groups) if k > 1 else None
        self.rbr_conv = nn.ModuleList(conv_bn(cin, cout, k, stride, k // 2, groups) for _ in range(branches))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity_out = 0 if self.rbr_skip is None else self.rbr_skip(x)
        scale_out = 0 if self.rbr_scale is None else self.rbr_scale(x)
        out = scale_out + identity_out
        for branch in self.rbr_conv:
            out += branch(x)
        return F.relu(cast(torch.Tensor, out))  # the sum starts from int 0, as timm's does; a tensor once a branch adds in


class ACBlock(nn.Module):
    """ACNet: a square 3x3 conv-BN plus horizontal 1x3 and vertical 3x1 conv-BNs."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.square = conv_bn(cin, cout, 3, stride, 1)
        self.hor = conv_bn(cin, cout, (1, 3), stride, (0, 1))
        self.ver = conv_bn(cin, cout, (3, 1), stride, (1, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.square(x) + self.hor(x) + self.ver(x)


class RepNet(nn.Module):
    """A toy classifier of all three block kinds (builds with no arguments, for --arch); input (N, 3, H, W)."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = RepVGGBlock(3, width, stride=2)
        self.stage1 = nn.Sequential(RepVGGBlock(width, width), RepVGGBlock(width, width, groups=2))
        self.stage2 = nn.Sequential(MobileOneBlock(width, width, 3, 1, groups=width),
                                    MobileOneBlock(width, 2 * width, 1, 1, branches=2))
        self.stage3 = nn.Sequential(ACBlock(2 * width, 2 * width, stride=2), nn.ReLU())
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ShapeLoopRepNet(RepNet):
    """RepNet whose forward loops over a size (ultralytics-style Python control flow): torch.fx cannot trace it,
    torch.export can, so its branches merge on the export graph (a test for yolov10s-like models)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(x.shape[0] - x.shape[0]):
            x = x + 0
        return super().forward(x)


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-looking BatchNorm statistics and affine parameters (a wrong merge shows), then eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                c = module.num_features
                # the replicas' BatchNorms track running statistics (torch types them Tensor | None)
                cast(torch.Tensor, module.running_mean).copy_(torch.randn(c, generator=gen) * 0.5)
                cast(torch.Tensor, module.running_var).copy_(torch.rand(c, generator=gen) * 2 + 0.1)
                if module.affine:
                    module.weight.copy_(torch.randn(c, generator=gen))
                    module.bias.copy_(torch.randn(c, generator=gen))
    return model.eval()


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's style: forward asserts the rank, calls F.batch_norm itself, then drop and act (identities here)."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.drop = nn.Identity()
        self.act = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        traceable_assert(x.ndim == 4, "expected 4D input")
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps)
        return self.act(self.drop(x))


class ConvNormAct(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        self.bn = BatchNormAct2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class TimmStyleRepVggBlock(nn.Module):
    """timm byobnet's RepVggBlock layout: (1x1 + kxk) -> drop_path -> + identity BN, functional BNs inside."""

    def __init__(self, channels: int, groups: int = 1) -> None:
        super().__init__()
        self.identity = BatchNormAct2d(channels)
        self.conv_kxk = ConvNormAct(channels, channels, 3, groups=groups)
        self.conv_1x1 = ConvNormAct(channels, channels, 1, groups=groups)
        self.drop_path = nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.identity(x)
        x = self.conv_1x1(x) + self.conv_kxk(x)
        x = self.drop_path(x)
        return self.act(x + identity)

"""Small replica networks covering every pattern the fold engine must fold or refuse.

Each class builds with no arguments (so `--arch bnstrip.testing.zoo:ResNet18Style` works; scripts import it too) and is
kept tiny so tests stay fast. `INPUT_SHAPES` gives a batch shape each model accepts;
`randomize_bn` gives BatchNorms statistics that make a wrong fold visible.

The module is over 400 lines on purpose: it is a catalogue of small models that do not depend
on each other, each read on its own; splitting it would scatter the catalogue, not simplify it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bnstrip._torch import BatchNormBase


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + identity)


class ResNet18Style(nn.Module):
    """ResNet-18 layout ([2, 2, 2, 2] basic blocks, stem, downsampling shortcuts) at toy widths."""

    def __init__(self, widths: tuple[int, ...] = (8, 8, 16, 16), num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        blocks, cin = [], widths[0]
        for i, width in enumerate(widths):
            for j in range(2):
                blocks.append(BasicBlock(cin, width, 2 if (j == 0 and i > 0) else 1))
                cin = width
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.block = nn.Sequential(
            conv_bn(cin, hidden, 1),
            conv_bn(hidden, hidden, 3, stride, groups=hidden),  # depthwise
            conv_bn(hidden, cout, 1, act=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileNetV2Style(nn.Module):
    """MobileNetV2 layout: stem, inverted residuals with depthwise convs, 1x1 head, classifier."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 8, 3, 2),
            InvertedResidual(8, 8, 1, 2),
            InvertedResidual(8, 12, 2, 3),
            InvertedResidual(12, 12, 1, 3),
            conv_bn(12, 24, 1),
        )
        self.classifier = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(x.mean((2, 3)))


class Conv1dNet(nn.Module):
    """1-D convs with stride, dilation, reflect padding, groups, no bias, a ConvTranspose1d, and Linear + BN1d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(3, 8, 5, stride=2, padding=2, padding_mode="reflect", bias=False)
        self.bn1 = nn.BatchNorm1d(8)
        self.conv2 = nn.Conv1d(8, 8, 3, dilation=2, padding="same", groups=4)
        self.bn2 = nn.BatchNorm1d(8, eps=1e-3)
        self.up = nn.ConvTranspose1d(8, 6, 4, stride=2, padding=1, groups=2)
        self.bn3 = nn.BatchNorm1d(6)
        self.fc = nn.Linear(6, 5)
        self.bn4 = nn.BatchNorm1d(5, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.up(x)))
        return self.bn4(self.fc(x.mean(-1)))


class Conv3dNet(nn.Module):
    """3-D convs (circular padding, groups, no bias) and a ConvTranspose3d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(2, 4, 3, padding=1, padding_mode="circular")
        self.bn1 = nn.BatchNorm3d(4)
        self.conv2 = nn.Conv3d(4, 8, 3, stride=2, padding=1, groups=2, bias=False)
        self.bn2 = nn.BatchNorm3d(8)
        self.up = nn.ConvTranspose3d(8, 4, 2, stride=2, bias=False)
        self.bn3 = nn.BatchNorm3d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.bn3(self.up(x))


class ConvTransposeDecoder(nn.Module):
    """A decoder of grouped ConvTranspose2d layers (the case some fusers crash on)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8 * 4 * 4)
        self.bn0 = nn.BatchNorm1d(8 * 4 * 4)
        self.up1 = nn.ConvTranspose2d(8, 8, 4, stride=2, padding=1, groups=2, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.up2 = nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.up3 = nn.ConvTranspose2d(6, 6, 3, padding=1, groups=3)
        self.bn3 = nn.BatchNorm2d(6)
        self.out = nn.Conv2d(6, 3, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.fc(z))).reshape(-1, 8, 4, 4)
        x = torch.relu(self.bn1(self.up1(x)))
        x = torch.relu(self.bn2(self.up2(x)))
        x = torch.relu(self.bn3(self.up3(x)))
        return torch.sigmoid(self.out(x))


class MLPBothSides(nn.Module):
    """BatchNorm before Linear (folds into the next layer) and after Linear (folds into the one before)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn_in = nn.BatchNorm1d(12)
        self.fc1 = nn.Linear(12, 16)
        self.bn1 = nn.BatchNorm1d(16)
        self.bn_mid = nn.BatchNorm1d(16, affine=False)
        self.fc2 = nn.Linear(16, 8, bias=False)
        self.bn2 = nn.BatchNorm1d(8)
        self.fc3 = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.fc1(self.bn_in(x))))
        x = torch.relu(self.bn2(self.fc2(self.bn_mid(x))))
        return self.fc3(x)


class LinearBNSequence(nn.Module):
    """Linear over the last dim of (N, C, L) data followed by BatchNorm1d over C: not foldable.

    C == L_out so that shape checks alone do not catch it (fx's fuse folds it along the wrong axis).
    """

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.bn_seq = nn.BatchNorm1d(8)
        self.head = nn.Linear(64, 6)
        self.bn_head = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn_seq(self.proj(x)))
        return self.bn_head(self.head(x.flatten(1)))


class ReusedConv(nn.Module):
    """One conv called twice, each call followed by its own BatchNorm: neither may be folded."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(4)
        self.bn_b = nn.BatchNorm2d(4)
        self.conv_out = nn.Conv2d(4, 4, 1)
        self.bn_out = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn_a(self.conv(x)))
        x = torch.relu(self.bn_b(self.conv(x)))
        return self.bn_out(self.conv_out(x))


class BNBeforePaddedConv(nn.Module):
    """BatchNorm before convs: zero padding is not exact (skipped), no padding and replicate padding are."""

    def __init__(self) -> None:
        super().__init__()
        self.bn_pad = nn.BatchNorm2d(3)
        self.conv_pad = nn.Conv2d(3, 6, 3, padding=1)
        self.bn_valid = nn.BatchNorm2d(6)
        self.conv_valid = nn.Conv2d(6, 6, 3, groups=2)
        self.bn_replicate = nn.BatchNorm2d(6)
        self.conv_replicate = nn.Conv2d(6, 4, 3, padding=1, padding_mode="replicate", bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv_pad(self.bn_pad(x)))
        x = torch.relu(self.conv_valid(self.bn_valid(x)))
        return self.conv_replicate(self.bn_replicate(x))


class ControlFlowNet(nn.Module):
    """Data-dependent control flow in forward: neither fx nor torch.export can trace the whole model.

    The submodules are traceable, so what is inside them still folds; the BatchNorm
    called directly from the untraceable forward is skipped with the reason.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.branch_a = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.branch_b = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.Sigmoid())
        self.conv_top = nn.Conv2d(8, 8, 1)
        self.bn_top = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        if y.mean() > 0:  # data-dependent: fx and torch.export both give up here
            y = self.branch_a(y)
        else:
            y = self.branch_b(y)
        y = self.bn_top(self.conv_top(y))
        return self.head(y.mean((2, 3)))


class ShapeBranchNet(nn.Module):
    """Control flow on an input shape: fx cannot trace it, torch.export can."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)
        self.bn_fc = nn.BatchNorm1d(4)
        self.conv_shared = nn.Conv2d(6, 6, 1)
        self.bn_shared = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.shape[-1] > 4:
            y = F.max_pool2d(self.bn(y), 2)
        else:
            y = self.bn(y)
        z = self.conv_shared(y)
        y = self.bn_shared(z) + z  # conv output has a second user: not foldable
        return self.bn_fc(self.fc(y.mean((2, 3))))


class _PlainConv(nn.Conv2d):
    """A Conv2d subclass that keeps PyTorch's forward: behaves like a conv, so it folds."""


class _QuietBN(nn.BatchNorm2d):
    """A BatchNorm2d subclass that keeps PyTorch's forward."""


class _WeightStdConv(nn.Conv2d):
    """Weight-standardised conv: overrides forward, so folding into its weight would be wrong."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class SubclassNet(nn.Module):
    """Subclasses recognised by behaviour, SyncBatchNorm, a BN without running stats, a functional batch_norm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = _PlainConv(3, 6, 3, padding=1)
        self.bn1 = nn.SyncBatchNorm(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn2 = _QuietBN(6)
        self.conv_ws = _WeightStdConv(6, 6, 1)
        self.bn_ws = nn.BatchNorm2d(6)
        self.conv_nostats = nn.Conv2d(6, 6, 1)
        self.bn_nostats = nn.BatchNorm2d(6, track_running_stats=False)
        self.conv_f = nn.Conv2d(6, 5, 1, bias=False)
        self.register_buffer("f_running_mean", torch.zeros(5))
        self.register_buffer("f_running_var", torch.ones(5))
        self.f_weight = nn.Parameter(torch.ones(5))
        self.f_bias = nn.Parameter(torch.zeros(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn_ws(self.conv_ws(x)))
        x = torch.relu(self.bn_nostats(self.conv_nostats(x)))
        return F.batch_norm(self.conv_f(x), self.f_running_mean, self.f_running_var, self.f_weight, self.f_bias,
                            training=False, eps=1e-3)


ZOO: dict[str, tuple[type[nn.Module], tuple[int, ...]]] = {
    "ResNet18Style": (ResNet18Style, (2, 3, 16, 16)),
    "MobileNetV2Style": (MobileNetV2Style, (2, 3, 16, 16)),
    "Conv1dNet": (Conv1dNet, (2, 3, 32)),
    "Conv3dNet": (Conv3dNet, (2, 2, 6, 6, 6)),
    "ConvTransposeDecoder": (ConvTransposeDecoder, (2, 16)),
    "MLPBothSides": (MLPBothSides, (4, 12)),
    "LinearBNSequence": (LinearBNSequence, (3, 8, 8)),
    "ReusedConv": (ReusedConv, (2, 4, 8, 8)),
    "BNBeforePaddedConv": (BNBeforePaddedConv, (2, 3, 10, 10)),
    "ControlFlowNet": (ControlFlowNet, (2, 3, 8, 8)),
    "ShapeBranchNet": (ShapeBranchNet, (2, 3, 10, 10)),
    "SubclassNet": (SubclassNet, (2, 3, 8, 8)),
}
"""name -> (class, an input shape it accepts)."""


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm-like tensor statistics that make a wrong fold visible (in place; returns the model).

    running_var is log-uniform over 1e-3..1e3, running_mean ~ N(0, 2^2), gamma in
    +-[0.5, 2] with random signs, beta ~ N(0, 1); also for the tensors of functional
    batch_norm calls (attributes named *running_mean/*running_var, f_weight/f_bias).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(model.named_buffers()) + list(model.named_parameters()):
            leaf = name.rsplit(".", 1)[-1]
            owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            is_bn = isinstance(owner, BatchNormBase)
            n = tensor.numel()
            if leaf.endswith("running_var"):
                tensor.copy_(10 ** (torch.rand(n, generator=gen, dtype=torch.float64) * 6 - 3))
            elif leaf.endswith("running_mean"):
                tensor.copy_(torch.randn(n, generator=gen, dtype=torch.float64) * 2)
            elif (is_bn and leaf == "weight") or leaf == "f_weight":
                sign = torch.where(torch.rand(n, generator=gen) < 0.2, -1.0, 1.0)
                tensor.copy_(sign * (0.5 + 1.5 * torch.rand(n, generator=gen)))
            elif (is_bn and leaf == "bias") or leaf == "f_bias":
                tensor.copy_(torch.randn(n, generator=gen))
    return model


def build(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A zoo model with randomised BN statistics in eval mode, and seeded inputs of its shape."""
    cls, shape = ZOO[name]
    torch.manual_seed(seed)
    model = randomize_bn(cls(), seed).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    return model, torch.randn(*shape, generator=gen)



class _Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


class ResNet152Style(nn.Module):
    """ResNet-152's layout (bottlenecks 3, 8, 36, 3; 60M parameters, 230 MiB in float32), for memory benchmarks.

    Not in ZOO: too large for the tests. Build it on the meta device when only its shapes are needed.
    """

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], 64
        for width, count, stride in ((64, 3, 1), (128, 8, 2), (256, 36, 2), (512, 3, 2)):
            for index in range(count):
                blocks.append(_Bottleneck(cin, width, stride if index == 0 else 1))
                cin = width * 4
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))

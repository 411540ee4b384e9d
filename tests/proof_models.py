"""Small models for the proof-rule tests: one net with every kind of fold, in four conditionings.

The folds are made here by hand (float64 maths, one rounding to the model's dtype), independently
of bnstrip's rewrite, so the tests can inject one wrong fold into an otherwise exact plan.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
CONDITIONINGS = ["well", "tiny_var", "huge_gamma", "random_stats"]
PAIRS = [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"), ("fc", "bn4")]
"""The exact plan: bn1, bn2 and bn4 into the layer before; bn3 (after a ReLU) into the 1x1 conv after it."""


class ProofNet(nn.Module):
    """conv-BN-ReLU twice, a BatchNorm after a ReLU feeding an unpadded 1x1 conv, and Linear-BatchNorm1d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.bn3, self.conv3 = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)
        self.fc, self.bn4 = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = self.conv3(self.bn3(x))
        return self.bn4(self.fc(x.mean((2, 3))))


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen, dtype=torch.float64)


def _signs(n: int, gen: torch.Generator) -> torch.Tensor:
    """Random signs, the first always negative: a ReLU never commutes with such a BatchNorm."""
    signs = torch.where(torch.rand(n, generator=gen) < 0.25, -1.0, 1.0).double()
    signs[0] = -1.0
    return signs


def _statistics(bn: nn.BatchNorm1d | nn.BatchNorm2d, conditioning: str, gen: torch.Generator) -> None:
    n = bn.num_features
    var, mean = _uniform(n, 0.5, 2.0, gen), torch.randn(n, generator=gen, dtype=torch.float64) * 0.1
    gamma, beta = _signs(n, gen) * _uniform(n, 0.5, 1.5, gen), torch.randn(n, generator=gen, dtype=torch.float64) * 0.1
    if conditioning == "tiny_var":  # around and below eps: the BatchNorm amplifies by up to ~300
        var = 10 ** _uniform(n, -7, -4, gen)
        gamma = gamma * 1e-2
    elif conditioning == "huge_gamma":  # a huge gamma and variance; a large mean cancelled by a large shift
        gamma = _signs(n, gen) * _uniform(n, 100, 1000, gen)
        var = 10 ** _uniform(n, 4, 4.6, gen)  # below float16's largest value, 65504
        mean = torch.randn(n, generator=gen, dtype=torch.float64) * 30
        beta = gamma * mean / torch.sqrt(var + bn.eps) + torch.randn(n, generator=gen, dtype=torch.float64) * 10
    elif conditioning == "random_stats":  # statistics unrelated to the data (the LeViT case)
        var = 10 ** _uniform(n, -3, 3, gen)
        mean = torch.randn(n, generator=gen, dtype=torch.float64) * 2
        gamma = _signs(n, gen) * _uniform(n, 0.5, 2.0, gen)
        beta = torch.randn(n, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        bn.running_var.copy_(var)
        bn.running_mean.copy_(mean)
        bn.weight.copy_(gamma)
        bn.bias.copy_(beta)


def proof_net(conditioning: str, dtype: torch.dtype, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """ProofNet in `dtype` with statistics of the given conditioning, eval mode, and a batch of inputs."""
    torch.manual_seed(seed)
    model = ProofNet()
    gen = torch.Generator().manual_seed(seed)
    for name in ("bn1", "bn2", "bn3", "bn4"):
        _statistics(getattr(model, name), conditioning, gen)
    x = torch.rand(4, 3, 6, 6, generator=gen, dtype=torch.float64)
    return model.to(dtype).eval(), x.to(dtype)


def scale_shift(bn: nn.Module, eps: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) in float64 with bn(x) = x s + t, by the textbook formula."""
    var, mean = bn.running_var.double(), bn.running_mean.double()
    s = bn.weight.double() / torch.sqrt(var + (bn.eps if eps is None else eps))
    return s, bn.bias.double() - mean * s


Mutation = Callable[[nn.Module, nn.Module], None]


def _into_producer(layer: nn.Module, s: torch.Tensor, t: torch.Tensor) -> None:
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    with torch.no_grad():
        weight, bias = layer.weight.double(), layer.bias.double()
        layer.weight.copy_(weight * s.reshape(shape))
        layer.bias.copy_(bias * s + t)


def _into_consumer(layer: nn.Module, s: torch.Tensor, t: torch.Tensor) -> None:
    with torch.no_grad():
        weight, bias = layer.weight.double(), layer.bias.double()
        layer.bias.copy_(bias + (weight * t.reshape(1, -1, 1, 1)).sum((1, 2, 3)))
        layer.weight.copy_(weight * s.reshape(1, -1, 1, 1))


def exact_fold(model: nn.Module, mutate: str | None = None) -> nn.Module:
    """The folded ProofNet (each BatchNorm an Identity), one rounding per parameter.

    `mutate` injects one wrong fold: bn3 folded through the ReLU into conv2 ("through_relu"), or
    one of the others into the last fold (fc, bn4), where the outputs show it directly.
    """
    folded = copy.deepcopy(model)
    for layer_name, bn_name in PAIRS:
        layer, bn = getattr(folded, layer_name), getattr(folded, bn_name)
        target = bn_name == "bn4" and mutate is not None
        wrong_eps = float(bn.running_var.double().max()) * 4 + 1 if target and mutate == "wrong_eps" else None
        s, t = scale_shift(bn, eps=wrong_eps)
        if target:
            s, t = _mutated(mutate, s, t)
        if bn_name == "bn3" and mutate == "through_relu":  # bn3 sits after a ReLU: folded into conv2 instead
            _into_producer(folded.conv2, s, t)
        elif layer_name == "conv3":
            _into_consumer(layer, s, t)
        elif target and mutate == "wrong_axis":  # the scale applied to the input channels of fc
            with torch.no_grad():
                layer.weight.copy_(layer.weight.double() * s.reshape(1, -1))
                layer.bias.copy_(layer.bias.double() * s + t)
        else:
            _into_producer(layer, s, t)
        setattr(folded, bn_name, nn.Identity())
    return folded.eval()


def _mutated(mutate: str, s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if mutate == "channel_order":
        return s.flip(0), t.flip(0)
    if mutate == "dropped_bias":
        return s, torch.zeros_like(t)
    if mutate == "gamma_sign":
        return -s, t
    return s, t


MUTATIONS = ["wrong_axis", "channel_order", "wrong_eps", "dropped_bias", "gamma_sign", "through_relu"]

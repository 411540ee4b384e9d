"""The course's smallNet architectures (homework 6, Problem 1), key-for-key compatible.

`SmallNetTrain` loads the course's `smallNetSaved`; `SmallNetTest` is the same
network without BatchNorm, so the folded state_dict loads into the course's own
`smallNetTest` with ``strict=True``.
"""
from __future__ import annotations

import torch
from torch import nn

SMALLNET_EPS = 1e-5
"""BatchNorm eps of smallNet (PyTorch's default); a state_dict does not store it."""

SMALLNET_INPUT_SHAPE = (3, 32, 32)

SMALLNET_PAIRS = (("conv1.0", "conv1.1"), ("conv2.0", "conv2.1"), ("fc1.0", "fc1.1"))
"""(producer, BatchNorm) module names of SmallNetTrain, in forward order."""


class _SmallNet(nn.Module):
    """The forward pass both course networks share."""

    conv1: nn.Sequential
    conv2: nn.Sequential
    fc1: nn.Sequential
    fc2: nn.Sequential

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.conv2(x)
        x = x.reshape(-1, 16 * 32 * 32)
        x = self.fc1(x)
        return self.fc2(x)


class SmallNetTrain(_SmallNet):
    """conv-BN-ReLU x2, linear-BN-ReLU, linear-ReLU: the trained CIFAR-10 model."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.fc1 = nn.Sequential(nn.Linear(16 * 32 * 32, 32 * 32), nn.BatchNorm1d(32 * 32), nn.ReLU())
        self.fc2 = nn.Sequential(nn.Linear(32 * 32, 10), nn.ReLU())


class SmallNetTest(_SmallNet):
    """SmallNetTrain without its BatchNorms: what inference should run."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.fc1 = nn.Sequential(nn.Linear(16 * 32 * 32, 32 * 32), nn.ReLU())
        self.fc2 = nn.Sequential(nn.Linear(32 * 32, 10), nn.ReLU())


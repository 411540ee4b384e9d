"""Shared fixtures: the committed CIFAR-10 sample, a fake CIFAR-10 folder, random smallNet checkpoints."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from bnstrip.homework.data import load_npz_sample
from bnstrip.homework.models import SmallNetTrain

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_PATH = REPO_ROOT / "tests" / "data" / "cifar10_test_first200.npz"
SMALLNET_SAVED = REPO_ROOT / "smallNetSaved"


class ExportOnly(torch.nn.Module):
    """Wraps a model so that torch.fx cannot trace it (a range over a traced size) but torch.export can: the tests
    of the export path use it."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: torch.Tensor):  # noqa: ANN201 - whatever the wrapped model returns
        for _ in range(args[0].shape[0] - args[0].shape[0]):
            pass
        return self.inner(*args)


def randomise_batchnorms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BatchNorm non-trivial statistics (var over 1e-3..1e3) and affine parameters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                c = module.num_features
                if module.running_mean is not None:
                    module.running_mean.copy_(torch.randn(c, generator=gen))
                    module.running_var.copy_(10 ** (torch.rand(c, generator=gen) * 6 - 3))
                    module.num_batches_tracked.fill_(100)
                if module.affine:
                    module.weight.copy_(torch.rand(c, generator=gen) * 2 + 0.25)
                    module.bias.copy_(torch.randn(c, generator=gen))
    return model


def write_cifar_batch(folder: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """A `cifar-10-batches-py/test_batch` in the official python-batch format."""
    batches = folder / "cifar-10-batches-py"
    batches.mkdir(parents=True, exist_ok=True)
    payload = {"batch_label": "testing batch 1 of 1", "labels": [int(x) for x in labels],
               "data": np.ascontiguousarray(images.reshape(len(images), -1))}
    with open(batches / "test_batch", "wb") as f:
        pickle.dump(payload, f, protocol=2)
    return batches


@pytest.fixture(scope="session")
def cifar_sample():
    """200 real CIFAR-10 test images (committed, ~0.6 MB)."""
    return load_npz_sample(SAMPLE_PATH)


@pytest.fixture()
def fake_cifar_dir(tmp_path: Path, cifar_sample) -> Path:
    """A data dir holding the 200-image sample as the official test batch."""
    root = tmp_path / "cifar"
    write_cifar_batch(root, cifar_sample.images, cifar_sample.labels)
    return root


@pytest.fixture(scope="session")
def random_smallnet_state() -> dict[str, torch.Tensor]:
    """A smallNetTrain state_dict with randomised BatchNorm statistics."""
    torch.manual_seed(0)
    return randomise_batchnorms(SmallNetTrain(), seed=1).state_dict()


@pytest.fixture()
def random_smallnet_file(tmp_path: Path, random_smallnet_state) -> Path:
    path = tmp_path / "smallNetRandom.pt"
    torch.save(random_smallnet_state, path)
    return path


BIG_ZOO_MODELS = ("ResNet18Style", "MobileNetV2Style")
"""The zoo's real-size replicas: each parametrization over them is an end-to-end run (slow); every behaviour
those tests check is also checked on the small zoo models in the default run."""


def pytest_collection_modifyitems(config, items) -> None:  # noqa: ANN001 - pytest's hook signature
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.module.__name__.endswith("test_fold_model") and params.get("name") in BIG_ZOO_MODELS:
            item.add_marker(pytest.mark.slow)

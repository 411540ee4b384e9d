"""bnstrip.refusals: every refusal carries a stable code beside its sentence; tests assert codes, not wording."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from bnstrip import fold_model
from bnstrip.refusals import CODES, NO_NEIGHBOUR, OTHER, markdown_table, refusal, refusal_code
from bnstrip.testing.zoo import ZOO, randomize_bn

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("row", CODES, ids=[row.code for row in CODES])
def test_each_code_is_what_its_example_gets(row) -> None:  # noqa: ANN001 - a CODES row
    assert refusal_code(row.example) == row.code  # no earlier row shadows it


def test_codes_are_unique_short_and_upper_case() -> None:
    codes = [row.code for row in CODES]
    assert len(codes) == len(set(codes)) and OTHER not in codes
    assert all(re.fullmatch(r"[A-Z][A-Z_]{2,23}", code) for code in codes)


def test_readme_lists_exactly_the_codes() -> None:
    assert markdown_table() in (ROOT / "README.md").read_text()


def _reasons(model: nn.Module, x: torch.Tensor) -> dict[str, dict]:
    entries = fold_model(model, x).manifest_entries()["skipped"]
    return {entry["bn"]: entry for entry in entries}


def test_a_training_batchnorm_in_an_eval_model_is_bn_training() -> None:
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    model[1].train()
    assert _reasons(model, torch.rand(1, 3, 6, 6))["1"]["code"] == "BN_TRAINING"


def test_no_running_statistics_is_its_own_code() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    assert _reasons(model, torch.rand(2, 3, 6, 6))["1"]["code"] == "NO_RUNNING_STATS"


def test_no_neighbour_lists_the_code_of_each_side() -> None:
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.ReLU())).eval()
    entry = _reasons(model, torch.rand(1, 3, 6, 6))["2"]
    assert entry["code"] == NO_NEIGHBOUR and entry["causes"] and set(entry["causes"]) == {"NOT_A_LAYER"}
    assert entry["reason"].startswith("not folded ")  # the sentence stays beside the code


class _SharedProducer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y  # the conv's output is needed unnormalised too


def test_a_producer_whose_output_is_also_used_is_value_shared() -> None:
    entry = _reasons(randomize_bn(_SharedProducer()).eval(), torch.rand(1, 3, 6, 6))["bn"]
    assert entry["code"] == NO_NEIGHBOUR and "VALUE_SHARED" in entry["causes"]


def test_refusal_keeps_the_sentence_and_splits_the_parts() -> None:
    sentence = ("not folded into the layer before: its input comes from relu, not directly from a Conv, ConvTranspose or "
                "Linear; nor into the layer after: its input is changed in place (aten.add_.Tensor) after it runs; x")
    found = refusal(sentence)
    assert (found.code, found.causes, found.reason) == (NO_NEIGHBOUR, ("NOT_A_LAYER", "IN_PLACE_WRITE"), sentence)
    assert refusal_code("a sentence nobody wrote a row for") == OTHER


@pytest.mark.parametrize("name", ["ReusedConv", "LinearBNSequence", "ControlFlowNet", "SubclassNet"])
def test_no_refusal_of_the_test_zoo_falls_through_to_other(name: str) -> None:
    cls, shape = ZOO[name]
    torch.manual_seed(0)
    model = randomize_bn(cls()).eval()
    for entry in fold_model(model, torch.rand(*shape)).manifest_entries()["skipped"]:
        assert entry["code"] != OTHER and OTHER not in entry.get("causes", []), entry

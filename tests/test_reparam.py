"""Merging parallel branches (bnstrip/fold/reparam.py): replicas of RepVGG, MobileOne and ACNet blocks collapse to
one conv with no BatchNorm and the original's outputs; sums that are not one conv stay and say why.

Ground truth is always the original multi-branch model run in eval mode (in float32 and in float64).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from bnstrip.fold.reparam import merge_branches, rebuild_merges
from bnstrip.fold.reparam_blocks import ACBlock, MobileOneBlock, RepNet, RepVGGBlock
from bnstrip.fold.reparam_blocks import randomize_bn as randomise


def counts(model: nn.Module) -> tuple[int, int]:
    mods = list(model.modules())
    return sum(isinstance(m, _ConvNd) for m in mods), sum(isinstance(m, _BatchNorm) for m in mods)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / max(float(a.abs().max()), 1.0)


def assert_collapses(model: nn.Module, x: torch.Tensor, blocks: int = 1) -> None:
    """One conv per block, no BN, outputs within float32 rounding; in float64 within 1e-10."""
    model = randomise(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = merge_branches(model, (x,))
    assert len(result.merged) == blocks, result.refused
    assert counts(result.model) == (blocks, 0)
    assert result.check is not None and result.check.passed
    with torch.no_grad():
        assert rel_diff(model(x), result.model(x)) < 5e-6
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input untouched
    wide = copy.deepcopy(model).double()
    merged64 = merge_branches(wide, (x.double(),))
    assert counts(merged64.model) == (blocks, 0)
    with torch.no_grad():
        assert float((wide(x.double()) - merged64.model(x.double())).abs().max()) < 1e-10


@pytest.mark.parametrize("cin,cout,stride,groups", [(8, 8, 1, 1), (8, 16, 2, 1), (8, 8, 1, 4)])
def test_repvgg_block_collapses_to_one_conv(cin, cout, stride, groups):
    assert_collapses(RepVGGBlock(cin, cout, stride, groups), torch.randn(2, cin, 9, 9))


def test_repvgg_branches_are_reported_with_their_bns():
    model = randomise(RepVGGBlock(4, 4))
    result = merge_branches(model, (torch.randn(1, 4, 6, 6),))
    (merge,) = result.merged
    assert merge.conv == "rbr_dense.0"
    assert merge.branches == ("rbr_dense.0 -> rbr_dense.1", "rbr_1x1.0 -> rbr_1x1.1", "rbr_identity")
    assert set(merge.bns) == {"rbr_dense.1", "rbr_1x1.1", "rbr_identity"}
    assert merge.kernel_size == (3, 3)


@pytest.mark.parametrize("k,groups,branches", [(3, 8, 3), (5, 8, 4), (1, 1, 2)])
def test_mobileone_block_collapses(k, groups, branches):
    assert_collapses(MobileOneBlock(8, 8, k, 1, groups, branches), torch.randn(2, 8, 10, 10))


def test_mobileone_stride2_without_skip_collapses():
    assert_collapses(MobileOneBlock(8, 8, 3, 2, 8, 2), torch.randn(2, 8, 11, 11))


def test_acnet_asymmetric_kernels_collapse():
    assert_collapses(ACBlock(6, 10), torch.randn(2, 6, 7, 9))
    assert_collapses(ACBlock(6, 10, stride=2), torch.randn(2, 6, 8, 8))


def test_stacked_blocks_each_collapse():
    model = nn.Sequential(RepVGGBlock(4, 8, 2), RepVGGBlock(8, 8), MobileOneBlock(8, 8, 3, 1, 8), ACBlock(8, 4))
    assert_collapses(model, torch.randn(2, 4, 12, 12), blocks=4)


class ScaledSum(nn.Module):
    """x * 0.5 + 2 * conv1x1(x) - bn(x) + conv3x3(x) / 4, with a bias-carrying conv and a constant leftover term."""

    def __init__(self) -> None:
        super().__init__()
        self.c3 = nn.Conv2d(4, 4, 3, padding=1)
        self.c1 = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return x * 0.5 + 2 * self.c1(x) - self.bn(x) + self.c3(x) / 4 + 1.0


def test_scalars_signs_and_constant_terms():
    assert_collapses(ScaledSum(), torch.randn(2, 4, 5, 5))


class Conv1dBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv1d(6, 6, 5, padding=4, dilation=2, groups=3, padding_mode="circular")
        self.b = nn.Conv1d(6, 6, 3, padding=2, dilation=2, groups=3, padding_mode="circular")
        self.c = nn.Conv1d(6, 6, 1, groups=3)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):
        return self.a(x) + self.b(x) + self.c(x) + self.bn(x) + x


def test_dilated_grouped_circular_conv1d_merges():
    assert_collapses(Conv1dBlock(), torch.randn(3, 6, 17))


# --------------------------------------------------------------------------- must not merge


class TwoConvs(nn.Module):
    def __init__(self, first: nn.Conv2d, second: nn.Conv2d, relu: bool = False, share: bool = False) -> None:
        super().__init__()
        self.first, self.second, self.relu, self.share = first, second, relu, share

    def forward(self, x):
        a = self.first(x)
        b = self.second(x)
        if self.relu:
            b = F.relu(b)
        out = a + b
        return (out, a) if self.share else out


@pytest.mark.parametrize("model,shape,needle", [
    (TwoConvs(nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 1, stride=2)), (1, 3, 4, 4), "stride"),
    (TwoConvs(nn.Conv2d(3, 4, 3, 2, 1), nn.Conv2d(3, 4, 2, 2, 0)), (1, 3, 8, 8), "padding misalignment"),
    (TwoConvs(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1), relu=True), (1, 3, 6, 6), "nonlinearity"),
    (TwoConvs(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1), share=True), (1, 3, 6, 6), "also feeds"),
    (TwoConvs(nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.Conv2d(4, 4, 1)), (1, 4, 6, 6), "groups"),
    (TwoConvs(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.Conv2d(3, 4, 3, padding=1)), (1, 3, 6, 6),
     "padding_mode"),
    (TwoConvs(nn.Conv2d(3, 4, 3, padding=2, dilation=2), nn.Conv2d(3, 4, 3, padding=1)), (1, 3, 6, 6), "dilation"),
])
def test_sums_that_are_not_one_conv_stay_exact_and_say_why(model, shape, needle):
    model = randomise(model)
    x = torch.randn(*shape)
    result = merge_branches(model, (x,))
    assert result.merged == []
    assert result.model is model
    assert any(needle in reason for _, reason in result.refused), result.refused


class SlicedBranch(nn.Module):
    """A 1x1 branch cropped by a slice (issue 14): linear, but not a conv, so refused without calling it nonlinear."""

    def __init__(self, act: nn.Module | None = None) -> None:
        super().__init__()
        self.k3 = nn.Conv2d(3, 4, 3)
        self.k1 = nn.Conv2d(3, 4, 1)
        self.act = act

    def forward(self, x):
        b = self.k1(x)[..., :-2, :-2]
        return self.k3(x) + (b if self.act is None else self.act(b))


@pytest.mark.parametrize("act,needle,absent", [
    (None, "goes through getitem, which is not a conv, BatchNorm, identity or scalar scale", "nonlinearity"),
    (nn.Sigmoid(), "through act is not linear in x: a nonlinearity sits inside it", "goes through"),
], ids=["slice", "slice-then-sigmoid"])
def test_branch_through_other_op_is_refused_for_the_true_reason(act, needle, absent):
    model = randomise(SlicedBranch(act))
    x = torch.randn(1, 3, 6, 6)
    result = merge_branches(model, (x,))
    assert result.merged == []
    reasons = [reason for _, reason in result.refused]
    assert any(needle in reason for reason in reasons), reasons
    assert not any(absent in reason for reason in reasons), reasons


class BNBeforeConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 3, 1)
        self.c = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.a(x) + self.b(x) + self.c(self.bn(x))


def test_bad_branch_is_left_out_and_the_rest_merges():
    model = randomise(BNBeforeConv())
    x = torch.randn(2, 3, 5, 5)
    result = merge_branches(model, (x,))
    assert [m.branches for m in result.merged] == [("a", "b")]
    assert any("comes before c" in reason for _, reason in result.refused)
    assert counts(result.model) == (2, 1)
    with torch.no_grad():
        assert rel_diff(model(x), result.model(x)) < 5e-6


class Broadcast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 1, 1)

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_broadcasting_branches_do_not_merge():
    result = merge_branches(Broadcast().eval(), (torch.randn(1, 3, 4, 4),))
    assert result.merged == [] and any("out_channels" in r for _, r in result.refused)


def test_merge_that_moves_outputs_is_undone(monkeypatch):
    """A wrong kernel (simulated) is caught by the proof and undone, and the model keeps its outputs."""
    from bnstrip.fold import reparam_kernel

    real = reparam_kernel._branch_kernel

    def wrong(branch, g):
        weight, bias = real(branch, g)
        return weight, bias + 0.5

    monkeypatch.setattr(reparam_kernel, "_branch_kernel", wrong)
    model = randomise(nn.Sequential(RepVGGBlock(4, 4), RepVGGBlock(4, 4)))
    x = torch.randn(2, 4, 6, 6)
    result = merge_branches(model, (x,))
    assert result.merged == []
    assert sum("moved the outputs" in reason for _, reason in result.refused) == 2
    with torch.no_grad():
        assert torch.equal(model(x), result.model(x))


def test_rebuild_gives_a_skeleton_the_merged_state_loads_into():
    model = randomise(nn.Sequential(RepVGGBlock(4, 8, 2), MobileOneBlock(8, 8, 3, 1, 8)))
    x = torch.randn(2, 4, 8, 8)
    result = merge_branches(model, (x,))
    entries = [m.to_dict() for m in result.merged]
    skeleton = rebuild_merges(nn.Sequential(RepVGGBlock(4, 8, 2), MobileOneBlock(8, 8, 3, 1, 8)).eval(), entries)
    skeleton.load_state_dict(result.model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(skeleton(x), result.model(x))
    with pytest.raises(Exception, match="not a sum of the same branches"):
        rebuild_merges(nn.Sequential(ACBlock(4, 8), ACBlock(8, 8)).eval(), entries)


# --------------------------------------------------------------------------- fold_model, fuse --arch, load_folded


@pytest.mark.slow
def test_fold_model_reparameterize_removes_every_bn_of_repnet():
    from bnstrip import fold_model

    model = randomise(RepNet(width=8))
    x = torch.rand(2, 3, 16, 16)
    plain = fold_model(model, (x,))
    assert plain.skipped and not plain.merged  # the identity BNs read an input that also feeds the convs
    result = fold_model(model, (x,), reparameterize=True)
    assert result.form == "graph" and result.skipped == [] and len(result.merged) == 6
    assert {bn for m in result.merged for bn in m.bns} == {bn for bn, _ in plain.skipped}
    assert counts(result.model) == (6, 0)
    assert result.check is not None and result.check.passed
    with torch.no_grad():
        assert rel_diff(model(x), result.model(x)) < 5e-6


def test_fold_model_reparameterize_refuses_keep_structure_and_missing_inputs():
    from bnstrip import fold_model
    from bnstrip.errors import InputError

    model = randomise(RepVGGBlock(4, 4))
    with pytest.raises(InputError, match="keep_structure=True"):
        fold_model(model, (torch.rand(1, 4, 5, 5),), keep_structure=True, reparameterize=True)
    with pytest.raises(InputError, match="example_inputs"):
        fold_model(model, reparameterize=True)


def test_fuse_arch_reparameterize_writes_what_load_folded_rebuilds(tmp_path):
    import json

    from click.testing import CliRunner

    from bnstrip import load_folded
    from bnstrip.cli import main

    arch = "bnstrip.fold.reparam_blocks:RepNet"
    model = randomise(RepNet())
    torch.save(model.state_dict(), tmp_path / "in.pt")
    out = tmp_path / "out.safetensors"
    args = ["fuse", "--arch", arch, str(tmp_path / "in.pt"), str(out), "--input-shape", "1,3,16,16"]
    runner = CliRunner()
    refused = runner.invoke(main, [*args, "--reparameterize", "--keep-structure"])
    assert refused.exit_code == 2 and "--reparameterize" in refused.output and not out.exists()
    done = runner.invoke(main, [*args, "--reparameterize", "--json"])
    assert done.exit_code == 0, done.output
    report = json.loads(done.output)
    assert [m["conv"] for m in report["merged"]][:2] == ["stem.rbr_dense.0", "stage1.0.rbr_dense.0"]
    assert report["skipped"] == [] and report["form"] == "graph"
    rebuilt = load_folded(RepNet(), out)
    assert counts(rebuilt) == (6, 0)
    x = torch.rand(2, 3, 20, 20)
    with torch.no_grad():
        assert rel_diff(model(x), rebuilt(x)) < 5e-6


def test_timm_style_block_with_functional_bns_asserts_and_drop_path_collapses():
    from bnstrip.fold.reparam_blocks import TimmStyleRepVggBlock

    model = nn.Sequential(TimmStyleRepVggBlock(8), TimmStyleRepVggBlock(8, groups=2))
    assert_collapses(model, torch.randn(2, 8, 7, 7), blocks=2)
    model = randomise(model)
    result = merge_branches(model, (torch.randn(1, 8, 5, 5),))
    assert set(result.merged[0].bns) == {"0.conv_1x1.bn", "0.conv_kxk.bn", "0.identity"}
    skeleton = rebuild_merges(nn.Sequential(TimmStyleRepVggBlock(8), TimmStyleRepVggBlock(8, groups=2)).eval(),
                              [m.to_dict() for m in result.merged])
    skeleton.load_state_dict(result.model.state_dict(), strict=True)

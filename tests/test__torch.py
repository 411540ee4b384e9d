"""bnstrip._torch: each private torch name bnstrip relies on still exists and still means what bnstrip assumes.

A torch upgrade that renames or changes one of them fails here, by name, before anything deeper does.
"""
from __future__ import annotations


import pytest
import torch
import torch.fx as fx
from torch import nn

from bnstrip import _torch


@pytest.mark.parametrize("cls", [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LazyBatchNorm2d])
def test_batchnorm_base_is_the_base_of_every_torch_batchnorm(cls: type) -> None:
    assert issubclass(cls, _torch.BatchNormBase)
    assert not issubclass(nn.GroupNorm, _torch.BatchNormBase)


def test_conv_bases_split_plain_and_transposed_convs() -> None:
    for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
        assert issubclass(cls, _torch.ConvNd)
    for cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
        assert issubclass(cls, _torch.ConvTransposeNd)
    assert not issubclass(nn.Conv2d, _torch.ConvTransposeNd) and not issubclass(nn.Linear, _torch.ConvNd)


def test_dispatch_mode_sees_aten_calls_and_the_dynamo_hook_is_still_asked() -> None:
    seen: list[str] = []

    class Watch(_torch.NoDynamoDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Watch():
        torch.ones(2) + 1
    assert any("aten.add" in name for name in seen)
    # torch consults this private classmethod before wrapping __torch_dispatch__ in torch._dynamo.disable
    assert hasattr(_torch.TorchDispatchMode, "_should_skip_dynamo")
    assert _torch.NoDynamoDispatchMode._should_skip_dynamo() is False


def test_op_overload_and_schema_tell_mutation_and_aliasing() -> None:
    aten = torch.ops.aten
    assert isinstance(aten.add.Tensor, _torch.OpOverload)
    assert _torch.op_schema(aten.add_.Tensor).is_mutable
    assert not _torch.op_schema(aten.add.Tensor).is_mutable
    assert _torch.op_schema(aten.view.default).returns[0].alias_info is not None
    assert _torch.op_schema(aten.add.Tensor).returns[0].alias_info is None
    assert _torch.op_schema(aten.add.Tensor).name == "aten::add"
    assert _torch.op_schema(len) is None


def test_own_slots_keep_none_entries_that_the_public_api_hides() -> None:
    conv = nn.Conv2d(1, 2, 3, bias=False)
    assert "bias" in _torch.own_parameters(conv) and _torch.own_parameters(conv)["bias"] is None
    assert "bias" not in dict(conv.named_parameters(recurse=False))
    bn = nn.BatchNorm2d(2, track_running_stats=False)
    assert "running_mean" in _torch.own_buffers(bn) and _torch.own_buffers(bn)["running_mean"] is None
    live = nn.BatchNorm2d(2)
    _torch.own_buffers(live)["running_mean"] = torch.ones(2)  # the live dict: a rewrite sets a slot in place
    assert torch.equal(live.running_mean, torch.ones(2))


def test_module_hooks_are_seen() -> None:
    for register, forward in ((lambda m: m.register_forward_hook(lambda *a: None), True),
                              (lambda m: m.register_forward_pre_hook(lambda *a: None), True),
                              (lambda m: m.register_forward_hook(lambda *a, **k: None, with_kwargs=True), True),
                              (lambda m: m.register_full_backward_hook(lambda *a: None), False)):
        module = nn.Linear(2, 2)
        assert not _torch.has_module_hooks(module) and not _torch.has_forward_hooks(module)
        handle = register(module)
        assert _torch.has_module_hooks(module) and _torch.has_forward_hooks(module) == forward
        handle.remove()
        assert not _torch.has_module_hooks(module)


def test_global_module_hooks_are_seen() -> None:
    assert not _torch.global_module_hooks()
    for register in (nn.modules.module.register_module_forward_hook, nn.modules.module.register_module_forward_pre_hook):
        handle = register(lambda *a: None)
        try:
            assert _torch.global_module_hooks()
        finally:
            handle.remove()
        assert not _torch.global_module_hooks()


def test_graph_codegen_reads_what_set_codegen_writes() -> None:
    gm = fx.symbolic_trace(nn.Sequential(nn.ReLU()))
    codegen = _torch.graph_codegen(gm.graph)
    assert isinstance(codegen, fx.graph.CodeGen)
    other = fx.Graph()
    other.set_codegen(codegen)
    assert _torch.graph_codegen(other) is codegen


def test_weights_only_allowed_globals_are_names_torch_admits() -> None:
    allowed = _torch.weights_only_allowed_globals()
    assert "torch._utils._rebuild_tensor_v2" in allowed and "collections.OrderedDict" in allowed
    assert "os.system" not in allowed and "builtins.eval" not in allowed


def test_serialized_dtypes_map_codes_to_dtypes() -> None:
    dtypes = _torch.serialized_dtypes()
    assert torch.float32 in dtypes.values() and torch.float16 in dtypes.values()
    assert all(isinstance(code, int) for code in dtypes)


def test_pytree_flattens_and_rebuilds() -> None:
    tree = ((torch.ones(1), 2), {"a": [torch.zeros(2)]})
    leaves, spec = _torch.pytree.tree_flatten(tree)
    assert len(leaves) == 3
    rebuilt = _torch.pytree.tree_unflatten(leaves, spec)
    assert rebuilt[0][1] == 2 and torch.equal(rebuilt[1]["a"][0], torch.zeros(2))
    assert len(_torch.pytree.tree_leaves(tree)) == 3
    assert _torch.pytree.tree_map(lambda v: 1, tree) == ((1, 1), {"a": [1]})


def test_traceable_assert_survives_fx_tracing() -> None:
    class Checked(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            _torch.traceable_assert(x.ndim == 2, "2-D")
            return x + 1

    gm = fx.symbolic_trace(Checked())
    assert torch.equal(gm(torch.zeros(1, 1)), torch.ones(1, 1))


def test_dtype_itemsize_is_public() -> None:  # what replaced torch._utils._element_size
    assert torch.float64.itemsize == 8 and torch.bfloat16.itemsize == 2


def test_every_name_the_fence_promises_is_there() -> None:
    assert set(_torch.__all__) <= set(dir(_torch))


def test_tensor_version_counts_in_place_writes_through_views_and_is_none_for_inference_tensors() -> None:
    t = torch.zeros(4)
    before = _torch.tensor_version(t)
    t[1:].add_(1)  # a write through a view counts on the base: views share the counter
    assert before is not None and _torch.tensor_version(t) == before + 1
    assert _torch.tensor_version(t + 1) is not None
    with torch.inference_mode():
        assert _torch.tensor_version(torch.zeros(2)) is None

"""bnstrip.trace on small models: what a module is, the op graph, aliasing, the real-run watcher, the tracers.

Ground truth is the model's own code: which module feeds which, what it writes in place.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bnstrip.trace import build_graph
from bnstrip.trace.alias import shared_memory_refusals, writer_of
from bnstrip.trace.classify import bn_refusal, layer_kind, layer_refusal
from bnstrip.trace.export_tracer import graph_export
from bnstrip.trace.fx_tracer import graph_fx
from bnstrip.trace.observe import observe_run


class _OwnForwardConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class _PlainConv(nn.Conv2d):
    pass


def test_classification_goes_by_behaviour_not_by_class() -> None:
    assert layer_kind(nn.ConvTranspose2d(2, 2, 3)) == "convT" and layer_kind(nn.Linear(2, 2)) == "linear"
    assert layer_kind(nn.ReLU()) is None
    assert layer_refusal(_PlainConv(2, 2, 1)) is None
    assert "overrides forward" in layer_refusal(_OwnForwardConv(2, 2, 1))
    bn = nn.BatchNorm2d(2)
    assert "training mode" in bn_refusal(bn) and bn_refusal(bn, ignore_training=True) is None
    bn.eval()
    assert bn_refusal(bn) is None
    handle = bn.register_forward_hook(lambda *args: None)
    assert "hooks" in bn_refusal(bn)
    handle.remove()
    assert "running statistics" in bn_refusal(nn.BatchNorm2d(2, track_running_stats=False))


def test_op_graph_links_conv_to_its_batchnorm_and_counts_users() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    graph = build_graph(model, (torch.rand(2, 3, 8, 8),))
    ops = {op.name: op for op in graph.ops}
    assert graph.tracer == "torch.fx"
    assert ops["1"].kind == "bn" and ops["1"].inputs == [ops["0"]] and ops["0"].users == [ops["1"]]
    assert ops["0"].kind == "layer" and ops["1"].rank == 4 and graph.calls["0"] == 1


class _AddInPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2), nn.Conv2d(2, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        z = self.bn(y)
        y += 1  # written after the BatchNorm read it
        return self.head(z) + y


def test_in_place_write_into_a_batchnorm_input_is_seen_by_the_real_run() -> None:
    model = _AddInPlace().eval()
    record = observe_run(model, (torch.rand(1, 2, 4, 4),), ["conv", "bn", "head"])
    assert "bn" in record.input_written
    graph, _ = graph_fx(model, (torch.rand(1, 2, 4, 4),))
    assert graph is not None and "bn" in graph.input_written


def test_writer_of_finds_an_in_place_method_through_a_view() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            z = self.bn(y)
            y.view(-1).add_(1)
            return z

    graph, _ = graph_fx(Net().eval(), None)
    ops = {op.name: op for op in graph.ops}
    writer = writer_of(ops["conv"], skip=ops["bn"])
    assert writer is not None and "add_" in writer.label


def test_tied_weights_are_refused_for_both_owners() -> None:
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight = a.weight
    refusals = shared_memory_refusals(nn.Sequential(a, b))
    assert set(refusals) == {"0", "1"} and "shares memory" in refusals["0"]


class _ShapeBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 4:  # control flow on a shape: fx cannot trace it, torch.export can
            x = F.avg_pool2d(x, 2)
        return self.bn(self.conv(x))


def test_export_tracer_names_ops_after_their_modules() -> None:
    graph, error = graph_export(_ShapeBranch().eval(), (torch.rand(1, 3, 8, 8),))
    assert error is None and graph is not None and graph.tracer == "torch.export"
    ops = {op.name: op for op in graph.ops if op.kind in ("layer", "bn")}
    assert ops["conv"].kind == "layer" and ops["bn"].kind == "bn" and ops["bn"].inputs == [ops["conv"]]
    assert build_graph(_ShapeBranch().eval(), (torch.rand(1, 3, 8, 8),)).tracer == "torch.export"


def test_without_example_inputs_an_untraceable_model_says_how_to_fix_it() -> None:
    graph = build_graph(_ShapeBranch().eval(), None)
    assert graph.tracer == "none" and "example_inputs" in graph.untraced[""]


class _WideConvNet(nn.Module):
    """A conv worth remembering (64 * 3 * 3 multiply-adds per output) and a thin one computed again."""

    def __init__(self) -> None:
        super().__init__()
        self.thin, self.wide, self.bn = nn.Conv2d(3, 64, 1), nn.Conv2d(64, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.wide(self.thin(x)))


def _count_conv_calls(monkeypatch: object) -> dict[int, int]:
    calls: dict[int, int] = {}
    real = nn.Conv2d._conv_forward

    def counted(self: nn.Conv2d, *args: object) -> torch.Tensor:
        calls[id(self)] = calls.get(id(self), 0) + 1
        return real(self, *args)

    monkeypatch.setattr(nn.Conv2d, "_conv_forward", counted)  # type: ignore[attr-defined]
    return calls


def test_the_graph_run_takes_a_wide_convs_output_from_the_real_run(monkeypatch: object) -> None:
    model = _WideConvNet().eval()
    calls = _count_conv_calls(monkeypatch)
    x = torch.rand(1, 3, 8, 8)
    graph = build_graph(model, (x,))
    assert graph.tracer == "torch.fx"
    assert calls == {id(model.thin): 2, id(model.wide): 1}  # the graph's run got the same input, so the same output
    with torch.no_grad():
        assert torch.equal(graph.model_output, model(x))


class _WritesOnlyWhenTraced(nn.Module):
    """fx's proxies are no tensors, so the traced graph takes the branch that negates the conv's output in place:
    the real run's output is that very tensor, which the graph's run must not change."""

    def __init__(self) -> None:
        super().__init__()
        self.wide = nn.Conv2d(64, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.wide(x)
        if not isinstance(y, torch.Tensor):
            y.mul_(-1)
        return y


def test_a_graph_that_writes_into_the_real_runs_tensors_is_run_again_apart_and_rejected(monkeypatch: object) -> None:
    from bnstrip.trace import fx_tracer

    model = _WritesOnlyWhenTraced().eval()
    x = torch.rand(1, 64, 6, 6)
    gm, _, _ = fx_tracer.fx_trace(model)
    record = observe_run(model, (x,), [], capture={""}, remember={"wide"})
    before = record.output.clone()
    shared = fx_tracer._RankProp(gm, "m", record.results)
    shared.propagate((x,))
    assert shared.changed_the_run() and torch.equal(record.output, -before)  # the real run's own output, negated

    runs: list[frozenset[str]] = []
    real_observe = fx_tracer.observe_run

    def observed(*args: object, **kwargs: object) -> object:
        runs.append(frozenset(kwargs.get("remember", ())))
        return real_observe(*args, **kwargs)

    monkeypatch.setattr(fx_tracer, "observe_run", observed)  # type: ignore[attr-defined]
    graph, error = graph_fx(model, (x,))
    assert graph is None and "differ from the model's own" in str(error)
    assert runs == [frozenset({"wide"}), frozenset()]  # the second time apart

"""map_single_threaded: every core, each part on one intra-op thread, results in order and identical at any count."""
from __future__ import annotations

import torch

from bnstrip.core.threads import available_cores, map_single_threaded


def test_results_in_order_and_bit_identical_at_any_worker_count() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 16, 3, padding=1).eval()
    parts = torch.randn(12, 8, 16, 16).split(2)
    before = torch.get_num_threads()
    with torch.no_grad():
        runs = [torch.cat(map_single_threaded(conv, parts, workers=w)) for w in (1, 2, 4, None)]
        sequential = torch.cat([conv(p) for p in parts])
    assert torch.get_num_threads() == before  # the caller's setting is restored
    assert all(torch.equal(run, runs[0]) for run in runs)
    torch.testing.assert_close(runs[0], sequential)  # the same maths (one intra-op thread may round differently)
    assert available_cores() >= 1


def test_the_callers_grad_and_inference_modes_hold_in_the_workers() -> None:
    layer = torch.nn.Linear(3, 2)
    parts = [torch.randn(1, 3) for _ in range(4)]
    with torch.no_grad():
        assert all(out.grad_fn is None for out in map_single_threaded(layer, parts, workers=2))
    assert all(out.grad_fn is not None for out in map_single_threaded(layer, parts, workers=2))
    with torch.inference_mode():
        assert all(out.is_inference() for out in map_single_threaded(layer, parts, workers=2))


def test_nested_calls_run_in_turn_inside_a_worker() -> None:
    def inner(x: int) -> int:
        return sum(map_single_threaded(lambda y: y * 2, [x, x + 1], workers=4))

    assert map_single_threaded(inner, [1, 2, 3], workers=3) == [6, 10, 14]

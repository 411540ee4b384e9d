"""Problem 3: backprop through 1-D convolutions against torch.nn.Conv1d + autograd and explicit matrices."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from bnstrip.cli import main
from bnstrip.homework.derivations import conv_grad as conv_module
from bnstrip.homework.derivations.conv_grad import (
    ACTIVATIONS,
    ConvNet,
    backprop,
    check_conv_grad,
    conv_matrix,
    forward,
    random_conv_net,
)
from bnstrip.errors import InputError

SIGMA = {"tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid, "softplus": torch.nn.Softplus,
         "identity": torch.nn.Identity}


def run_cli(*args: str):
    return CliRunner().invoke(main, list(args))


def module_gradients(net: ConvNet, activation: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Ground truth built here: nn.Conv1d modules with nn activations, differentiated by autograd."""
    layers = []
    for index, (w, b) in enumerate(zip(net.filters, net.biases)):
        conv = torch.nn.Conv1d(1, 1, w.numel(), dtype=torch.float64)
        with torch.no_grad():
            conv.weight.copy_(w.view(1, 1, -1))
            conv.bias.copy_(b.view(1))
        layers.append(conv)
        if index < len(net.filters) - 1:
            layers.append(SIGMA[activation]())
    model = torch.nn.Sequential(*layers)
    out = model(net.x.view(1, 1, -1))
    assert out.numel() == 1
    out.sum().backward()
    convs = [m for m in model if isinstance(m, torch.nn.Conv1d)]
    return [c.weight.grad.view(-1) for c in convs], [c.bias.grad.view(()) for c in convs]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("filters", [[1], [4], [2, 2], [5, 3, 3, 2], [4, 1, 6, 2, 3], [9, 17, 5]])
def test_backprop_matches_nn_conv1d_autograd(filters: list[int], activation: str) -> None:
    net = random_conv_net(filters, seed=len(filters))
    grads_w, grads_b = backprop(net, activation)
    truth_w, truth_b = module_gradients(net, activation)
    for mine, truth in zip(grads_w, truth_w):
        torch.testing.assert_close(mine, truth, rtol=1e-12, atol=1e-13)
    for mine, truth in zip(grads_b, truth_b):
        torch.testing.assert_close(mine, truth, rtol=1e-12, atol=1e-13)
    result = check_conv_grad(net, activation)
    assert result.passed
    assert result.n0 == 1 + sum(f - 1 for f in filters)
    assert [layer.filter_size for layer in result.layers] == filters
    assert result.layers[-1].n_out == 1
    assert all(max(l.max_abs_diff_autograd, l.max_abs_diff_matrix) < 1e-12 for l in result.layers)


def test_output_layer_gradients_are_exact_for_a_single_layer() -> None:
    """L = 1: y_1 = w . x + b, so dy/dw = x and dy/db = 1."""
    net = random_conv_net([6], seed=4)
    grads_w, grads_b = backprop(net, "tanh")
    torch.testing.assert_close(grads_w[0], net.x, rtol=0, atol=0)
    assert float(grads_b[0]) == 1.0


@pytest.mark.parametrize("n_in, f", [(1, 1), (5, 2), (12, 5), (30, 30)])
def test_conv_matrix_is_the_convolution(n_in: int, f: int) -> None:
    gen = torch.Generator().manual_seed(n_in)
    w = torch.randn(f, generator=gen, dtype=torch.float64)
    v = torch.randn(n_in, generator=gen, dtype=torch.float64)
    u = torch.randn(n_in - f + 1, generator=gen, dtype=torch.float64)
    a = conv_matrix(w, n_in)
    assert a.shape == (n_in - f + 1, n_in)
    torch.testing.assert_close(a @ v, F.conv1d(v.view(1, 1, -1), w.view(1, 1, -1)).view(-1))
    torch.testing.assert_close(a.T @ u, F.conv_transpose1d(u.view(1, 1, -1), w.view(1, 1, -1)).view(-1))


def test_forward_ends_with_a_single_output() -> None:
    net = random_conv_net([3, 4, 2], seed=0)
    pre, outputs = forward(net, "sigmoid")
    assert [o.numel() for o in outputs] == [7, 5, 2, 1]
    torch.testing.assert_close(outputs[-1], pre[-1])


def test_wrong_derivative_makes_the_check_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conv_module, "activation_derivative", lambda z, activation: torch.ones_like(z))
    assert not check_conv_grad(random_conv_net([3, 3, 2], seed=1), "tanh").passed
    result = run_cli("conv-grad", "--filters", "3,3,2", "--activation", "tanh")
    assert result.exit_code == 1
    assert "differs from autograd" in result.stderr


def test_cli_json_keys_and_values() -> None:
    result = run_cli("conv-grad", "--filters", "4,2,3", "--activation", "softplus", "--seed", "5", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert set(payload) >= {"n0", "layers", "passed"}
    assert payload["n0"] == 7 and payload["passed"] is True
    assert [layer["layer"] for layer in payload["layers"]] == [1, 2, 3]
    for layer in payload["layers"]:
        assert set(layer) == {"layer", "filter_size", "n_out", "grad_w", "grad_b", "max_abs_diff_autograd",
                              "max_abs_diff_matrix"}
        assert len(layer["grad_w"]) == layer["filter_size"]
    truth_w, truth_b = module_gradients(random_conv_net([4, 2, 3], seed=5), "softplus")
    for layer, w, b in zip(payload["layers"], truth_w, truth_b):
        assert layer["grad_w"] == pytest.approx(w.tolist(), rel=1e-12, abs=1e-14)
        assert layer["grad_b"] == pytest.approx(float(b), rel=1e-12, abs=1e-14)


def test_cli_default_run_passes() -> None:
    result = run_cli("conv-grad")
    assert result.exit_code == 0, result.output
    assert "PASS" in result.stdout and "conv_transpose" in result.stdout and "g_l[i]" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--filters", "3,0"], "f2 = 0 cannot give n_L = 1"),
    (["--filters", "-1"], "f1 = -1 cannot give n_L = 1"),
    (["--filters", "1500,1500"], "too big for the explicit-matrix check"),
])
def test_cli_bad_filters_exit_2_with_one_line(args: list[str], message: str) -> None:
    result = run_cli("conv-grad", *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


@pytest.mark.parametrize("args, message", [
    (["--filters", "3,x"], "not a comma-separated list of integers"),
    (["--filters", ""], "needs at least one integer"),
    (["--activation", "relu"], "'relu' is not one of"),
])
def test_cli_usage_errors_exit_2(args: list[str], message: str) -> None:
    result = run_cli("conv-grad", *args)
    assert result.exit_code == 2
    assert message in result.stderr


def test_library_rejects_inconsistent_nets() -> None:
    net = random_conv_net([3, 2], seed=0)
    with pytest.raises(InputError, match="need n0 = 4"):
        check_conv_grad(ConvNet(torch.zeros(5, dtype=torch.float64), net.filters, net.biases), "tanh")
    with pytest.raises(InputError, match="one bias per layer"):
        check_conv_grad(ConvNet(net.x, net.filters, net.biases[:1]), "tanh")
    with pytest.raises(InputError, match="not one of"):
        check_conv_grad(net, "relu")


def test_cli_prints_the_drawn_x_w_b_in_table_and_json() -> None:
    from bnstrip.homework.derivations.conv_grad import random_conv_net

    net = random_conv_net([3, 2], 7)
    payload = json.loads(CliRunner().invoke(main, ["conv-grad", "--filters", "3,2", "--seed", "7", "--json"]).stdout)
    assert payload["drawn"] == {"x": net.x.tolist(), "w": [w.tolist() for w in net.filters],
                                "b": [float(b) for b in net.biases]}
    table = CliRunner().invoke(main, ["conv-grad", "--filters", "3,2", "--seed", "7"]).stdout
    assert f"{net.x.tolist()[3]:.10g}" in table and f"{float(net.biases[1]):.10g}" in table

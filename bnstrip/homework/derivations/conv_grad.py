"""Problem 3: dy_L/dw_l and dy_L/db_l of a 1-D single-channel conv net by backprop, never forming A_w.

Forward (stride 1, no padding, torch's cross-correlation convention (A_w v)_i = sum_k w_k v_{i+k}):

    z_l = A_{w_l} y_{l-1} + b_l 1,   y_l = sigma(z_l) for l < L,   y_L = z_L,   y_0 = x.

Backward, with g_l = dy_L/dz_l (a row vector of length n_l):

    g_L = 1;   g_{l-1} = sigma'(z_{l-1}) * (A_{w_l}^T g_l)        (a transposed convolution)
    dy_L/dw_l = g_l^T (dA_{w_l}/dw_l) y_{l-1},  i.e. (dy_L/dw_l)_k = sum_i g_{l,i} y_{l-1,i+k}
              = conv(y_{l-1}, filter g_l)                         (a convolution of length f_l)
    dy_L/db_l = g_l^T 1 = sum_i g_{l,i}.

Both checks (torch.autograd, and explicit matrices A_w built only here) are independent of that code path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from bnstrip.errors import InputError

ACTIVATIONS = ("tanh", "sigmoid", "softplus", "identity")
MAX_INPUT_LENGTH = 2048  # the explicit-matrix check builds n_l x n_{l-1} matrices
RELATIVE_TOLERANCE = 1e-10

RECURSION_LINES = (
    "g_L = dy_L/dz_L = 1",
    "g_{l-1} = sigma'(z_{l-1}) * conv_transpose(g_l, w_l)   (= A_{w_l}^T g_l)",
    "dy_L/dw_l = conv(y_{l-1}, filter g_l)   ((.)_k = sum_i g_l[i] y_{l-1}[i+k])",
    "dy_L/db_l = sum_i g_l[i]   (= g_l^T 1)",
)


@dataclass(frozen=True)
class ConvNet:
    """Input x (length n_0), filters w_l (length f_l) and scalar biases b_l, all float64."""

    x: torch.Tensor
    filters: list[torch.Tensor]
    biases: list[torch.Tensor]  # 0-d tensors

    @property
    def n0(self) -> int:
        return int(self.x.numel())


@dataclass(frozen=True)
class ConvLayerGradient:
    layer: int
    filter_size: int
    n_out: int
    grad_w: list[float]
    grad_b: float
    max_abs_diff_autograd: float
    max_abs_diff_matrix: float


@dataclass(frozen=True)
class ConvGradResult:
    n0: int
    activation: str
    y_L: float
    layers: list[ConvLayerGradient]
    tolerance: float
    passed: bool


def validate_filters(filters: Sequence[int]) -> list[int]:
    """Filter sizes f_1..f_L; n_0 = 1 + sum(f_l - 1) gives n_L = 1 only when every f_l >= 1."""
    sizes = [int(f) for f in filters]
    if not sizes:
        raise InputError("--filters: give at least one filter size")
    for index, size in enumerate(sizes, start=1):
        if size <= 0:
            raise InputError(f"--filters: f{index} = {size} cannot give n_L = 1 (every filter size must be >= 1)")
    n0 = 1 + sum(size - 1 for size in sizes)
    if n0 > MAX_INPUT_LENGTH:
        raise InputError(f"--filters: n0 = 1 + sum(f_l - 1) = {n0} exceeds {MAX_INPUT_LENGTH}, too big for the "
                         "explicit-matrix check; use smaller filters")
    return sizes


def validate_activation(activation: str) -> str:
    if activation not in ACTIVATIONS:
        raise InputError(f"--activation {activation!r} is not one of {', '.join(ACTIVATIONS)}")
    return activation


def random_conv_net(filters: Sequence[int], seed: int = 0) -> ConvNet:
    """x ~ N(0, I), w_l ~ N(0, I/f_l), b_l ~ N(0, 1/4) with n_0 = 1 + sum(f_l - 1)."""
    sizes = validate_filters(filters)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1 + sum(f - 1 for f in sizes), generator=gen, dtype=torch.float64)
    weights = [torch.randn(f, generator=gen, dtype=torch.float64) / f**0.5 for f in sizes]
    biases = [torch.randn((), generator=gen, dtype=torch.float64) / 2 for _ in sizes]
    return ConvNet(x, weights, biases)


def activate(z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "tanh":
        return torch.tanh(z)
    if activation == "sigmoid":
        return torch.sigmoid(z)
    if activation == "softplus":
        return F.softplus(z)
    return z


def activation_derivative(z: torch.Tensor, activation: str) -> torch.Tensor:
    """sigma'(z) in closed form (the backprop recursion does not use autograd)."""
    if activation == "tanh":
        return 1 - torch.tanh(z).square()
    if activation == "sigmoid":
        s = torch.sigmoid(z)
        return s * (1 - s)
    if activation == "softplus":
        return torch.sigmoid(z)
    return torch.ones_like(z)


def _conv(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A_w v as a convolution."""
    return F.conv1d(v.view(1, 1, -1), w.view(1, 1, -1)).view(-1)


def _conv_transpose(u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A_w^T u as a transposed convolution."""
    return F.conv_transpose1d(u.view(1, 1, -1), w.view(1, 1, -1)).view(-1)


def forward(net: ConvNet, activation: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(pre-activations z_1..z_L, outputs y_0..y_L) with convolutions only."""
    pre, outputs = [], [net.x]
    depth = len(net.filters)
    for index, (w, b) in enumerate(zip(net.filters, net.biases, strict=True), start=1):
        z = _conv(outputs[-1], w) + b
        pre.append(z)
        outputs.append(z if index == depth else activate(z, activation))
    return pre, outputs


def backprop(net: ConvNet, activation: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(dy_L/dw_l, dy_L/db_l) for l = 1..L by the recursion in the module docstring."""
    pre, outputs = forward(net, activation)
    depth = len(net.filters)
    grads_w: list[torch.Tensor] = [torch.empty(0)] * depth
    grads_b: list[torch.Tensor] = [torch.empty(0)] * depth
    g = torch.ones_like(pre[-1])
    for index in range(depth - 1, -1, -1):
        grads_w[index] = _conv(outputs[index], g)
        grads_b[index] = g.sum()
        if index > 0:
            g = activation_derivative(pre[index - 1], activation) * _conv_transpose(g, net.filters[index])
    return grads_w, grads_b


def autograd_gradients(net: ConvNet, activation: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Ground truth 1: torch.autograd through the same network built from nn.functional.conv1d."""
    filters = [w.detach().clone().requires_grad_(True) for w in net.filters]
    biases = [b.detach().clone().requires_grad_(True) for b in net.biases]
    y = net.x.view(1, 1, -1)
    for index, (w, b) in enumerate(zip(filters, biases, strict=True), start=1):
        y = F.conv1d(y, w.view(1, 1, -1), b.view(1))
        if index < len(filters):
            y = activate(y, activation)
    grads = torch.autograd.grad(y.sum(), [*filters, *biases])
    return list(grads[: len(filters)]), list(grads[len(filters):])


def conv_matrix(w: torch.Tensor, n_in: int) -> torch.Tensor:
    """The explicit A_w (n_in - f + 1) x n_in with A[i, i + k] = w_k; only for the check."""
    f = w.numel()
    n_out = n_in - f + 1
    matrix = torch.zeros(n_out, n_in, dtype=w.dtype)
    for k in range(f):
        matrix[torch.arange(n_out), torch.arange(n_out) + k] = w[k]
    return matrix


def matrix_gradients(net: ConvNet, activation: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Ground truth 2: explicit A_w; dy_L/dA_l = g_l y_{l-1}^T and dA_l/dw_{l,k} picks the k-th diagonal."""
    matrices, pre, outputs = [], [], [net.x]
    depth = len(net.filters)
    for index, (w, b) in enumerate(zip(net.filters, net.biases, strict=True), start=1):
        matrix = conv_matrix(w, outputs[-1].numel())
        matrices.append(matrix)
        z = matrix @ outputs[-1] + b
        pre.append(z)
        outputs.append(z if index == depth else activate(z, activation))
    grads_w, grads_b = [torch.empty(0)] * depth, [torch.empty(0)] * depth
    g = torch.ones_like(pre[-1])
    for index in range(depth - 1, -1, -1):
        outer = torch.outer(g, outputs[index])
        grads_w[index] = torch.stack([torch.diagonal(outer, offset=k).sum() for k in range(net.filters[index].numel())])
        grads_b[index] = g @ torch.ones_like(g)
        if index > 0:
            g = activation_derivative(pre[index - 1], activation) * (matrices[index].T @ g)
    return grads_w, grads_b


def check_conv_grad(net: ConvNet, activation: str) -> ConvGradResult:
    """Backprop gradients of y_L for every layer, each compared with autograd and with explicit matrices."""
    activation = validate_activation(activation)
    sizes = validate_filters([w.numel() for w in net.filters])
    if len(net.biases) != len(sizes):
        raise InputError(f"conv net: {len(sizes)} filters but {len(net.biases)} biases; give one bias per layer")
    if net.n0 != 1 + sum(f - 1 for f in sizes):
        raise InputError(f"conv net: x has length {net.n0} but filters {sizes} need n0 = {1 + sum(f - 1 for f in sizes)} "
                         "so that n_L = 1")
    _, outputs = forward(net, activation)
    grads_w, grads_b = backprop(net, activation)
    auto_w, auto_b = autograd_gradients(net, activation)
    mat_w, mat_b = matrix_gradients(net, activation)
    scale = max(1.0, *(float(g.abs().max()) for g in grads_w), *(abs(float(g)) for g in grads_b))
    tolerance = RELATIVE_TOLERANCE * scale
    layers = []
    for index, size in enumerate(sizes):
        diff_auto = max(float((grads_w[index] - auto_w[index]).abs().max()), abs(float(grads_b[index] - auto_b[index])))
        diff_mat = max(float((grads_w[index] - mat_w[index]).abs().max()), abs(float(grads_b[index] - mat_b[index])))
        layers.append(ConvLayerGradient(index + 1, size, int(outputs[index + 1].numel()), grads_w[index].tolist(),
                                        float(grads_b[index]), diff_auto, diff_mat))
    passed = all(layer.max_abs_diff_autograd <= tolerance and layer.max_abs_diff_matrix <= tolerance for layer in layers)
    return ConvGradResult(net.n0, activation, float(outputs[-1]), layers, tolerance, passed)

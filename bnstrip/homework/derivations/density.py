"""Problem 4: the density of X = AY + b, Y ~ N(0, I), by change of variables and in closed form.

phi(x) = A^{-1}(x - b) is one-to-one with Jacobian A^{-1}, so

    log p_X(x) = log p_Y(A^{-1}(x - b)) + log|det A^{-1}|
               = -n/2 log(2 pi) - 1/2 (x - b)^T Sigma^{-1} (x - b) - 1/2 log det Sigma,   Sigma = A A^T,

using ||A^{-1} v||^2 = v^T (A A^T)^{-1} v and |det A^{-1}| = (det A A^T)^{-1/2}: the density of N(b, Sigma).
The two routes are computed differently (an LU solve with A; a Cholesky factor of Sigma) and both are compared
with torch.distributions.MultivariateNormal.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from bnstrip.errors import InputError

MAX_DIM = 1000
MAX_POINTS = 1_000_000
MAX_CONDITION = 1e6  # beyond this Sigma = A A^T (condition number squared) loses too many float64 digits
_LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class DensityResult:
    dim: int
    points: int
    condition_number: float
    max_abs_diff_formula_vs_closed_form: float
    max_abs_diff_vs_torch: float
    tolerance: float
    passed: bool
    sample_points: list[list[float]]  # the first few x, for display
    sample_log_densities: list[list[float]]  # [formula, closed form, torch] at those x


def as_float64(value: Any, name: str, ndim: int) -> torch.Tensor:
    """A finite float64 tensor of `ndim` dimensions from nested lists or a tensor, else one-line InputError."""
    try:
        tensor = torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        shape = "a list of numbers" if ndim == 1 else "a list of equal-length lists of numbers"
        raise InputError(f"{name}: not {shape} ({str(exc).splitlines()[0]})") from None
    if tensor.dim() != ndim:
        what = "vector" if ndim == 1 else "matrix"
        raise InputError(f"{name}: expected a {what} ({ndim}-D array) but got a {tensor.dim()}-D array of shape "
                         f"{list(tensor.shape)}")
    if tensor.numel() == 0:
        raise InputError(f"{name}: the array is empty; give at least one entry")
    if not torch.isfinite(tensor).all():
        raise InputError(f"{name}: contains NaN or infinite entries; give finite numbers")
    return tensor


def validate_affine(matrix: Any, shift: Any, matrix_name: str = "A",
                    shift_name: str = "b") -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, b, cond(A)) for a square invertible A and a matching b; the names go into the error messages."""
    a = as_float64(matrix, matrix_name, 2)
    if a.shape[0] != a.shape[1]:
        raise InputError(f"{matrix_name}: A must be square but has shape {list(a.shape)}")
    b = as_float64(shift, shift_name, 1)
    if b.numel() != a.shape[0]:
        raise InputError(f"{shift_name}: b has {b.numel()} entries but A is {a.shape[0]}x{a.shape[0]}; "
                         f"give b of length {a.shape[0]}")
    if a.shape[0] > MAX_DIM:
        raise InputError(f"{matrix_name}: dimension {a.shape[0]} exceeds {MAX_DIM}; use a smaller matrix")
    condition = float(torch.linalg.cond(a))
    if not math.isfinite(condition) or condition > MAX_CONDITION:
        raise InputError(f"{matrix_name}: A is singular or nearly so (condition number {condition:.3g} > "
                         f"{MAX_CONDITION:.0e}); "
                         "X = AY + b needs a well-conditioned invertible A")
    return a, b, condition


def validate_sizes(dim: int, points: int) -> None:
    if not 1 <= dim <= MAX_DIM:
        raise InputError(f"--dim {dim}: the dimension must be between 1 and {MAX_DIM}")
    if not 1 <= points <= MAX_POINTS:
        raise InputError(f"--points {points}: the number of points must be between 1 and {MAX_POINTS}")


def random_affine(dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A = U diag(s) V^T with random orthogonal U, V and s in [0.5, 2] (invertible, well conditioned); b ~ N(0, I)."""
    validate_sizes(dim, 1)
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    s = 0.5 + 1.5 * torch.rand(dim, generator=gen, dtype=torch.float64)
    return u @ torch.diag(s) @ v.T, torch.randn(dim, generator=gen, dtype=torch.float64)


def log_density_change_of_variables(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log p_Y(A^{-1}(x - b)) + log|det A^{-1}| for each row of x."""
    y = torch.linalg.solve(a, (x - b).T).T
    log_p_y = -0.5 * a.shape[0] * _LOG_2PI - 0.5 * y.square().sum(dim=1)
    return log_p_y - torch.linalg.slogdet(a).logabsdet


def log_density_closed_form(x: torch.Tensor, mean: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor:
    """log of (2 pi)^{-n/2} det(Sigma)^{-1/2} exp(-1/2 (x-mean)^T Sigma^{-1} (x-mean)), via Cholesky of Sigma."""
    factor = torch.linalg.cholesky(covariance)
    whitened = torch.linalg.solve_triangular(factor, (x - mean).T, upper=False).T
    log_det = 2 * torch.log(torch.diagonal(factor)).sum()
    return -0.5 * (mean.numel() * _LOG_2PI + log_det + whitened.square().sum(dim=1))


def check_density(a: Any, b: Any, points: int, seed: int = 0, matrix_name: str = "A",
                  shift_name: str = "b") -> DensityResult:
    """Evaluate log p_X at `points` draws of X = AY + b three ways and compare them."""
    a, b, condition = validate_affine(a, b, matrix_name, shift_name)
    validate_sizes(a.shape[0], points)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(points, a.shape[0], generator=gen, dtype=torch.float64) @ a.T + b
    covariance = a @ a.T
    covariance = (covariance + covariance.T) / 2  # exactly symmetric for Cholesky and torch's validation
    formula = log_density_change_of_variables(x, a, b)
    closed = log_density_closed_form(x, b, covariance)
    reference = torch.distributions.MultivariateNormal(b, covariance_matrix=covariance).log_prob(x)
    diff_closed = float((formula - closed).abs().max())
    diff_torch = max(float((formula - reference).abs().max()), float((closed - reference).abs().max()))
    scale = max(1.0, float(reference.abs().max()))
    # forward error of the Sigma route grows like n * eps * cond(Sigma) = n * eps * cond(A)^2
    tolerance = max(1e-9, 64 * a.shape[0] * torch.finfo(torch.float64).eps * condition**2) * scale
    shown = min(points, 5)
    return DensityResult(int(a.shape[0]), points, condition, diff_closed, diff_torch, tolerance,
                         diff_closed <= tolerance and diff_torch <= tolerance,
                         x[:shown].tolist(), torch.stack([formula, closed, reference], dim=1)[:shown].tolist())

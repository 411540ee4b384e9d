"""Problems 5 and 6: KL divergence of Gaussians in closed form, against torch and Monte Carlo.

With L_0, L_1 the Cholesky factors of Sigma_0, Sigma_1 (no explicit inverse or determinant):

    KL(N(mu_0, Sigma_0) || N(mu_1, Sigma_1))
      = 1/2 ( ||L_1^{-1} L_0||_F^2 + ||L_1^{-1}(mu_1 - mu_0)||^2 - d + 2 sum log diag L_1 - 2 sum log diag L_0 ),

the four terms being tr(Sigma_1^{-1} Sigma_0), the Mahalanobis term, -d and log(det Sigma_1 / det Sigma_0).
Problem 5a (KL >= 0) is checked on every KL reported; Problem 5b (independent coordinates: the KL is the sum
of the 1-D KLs) is checked with diagonal covariances.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from bnstrip.homework.derivations.density import as_float64
from bnstrip.errors import InputError

MAX_DIM = 1000
MAX_SAMPLES = 100_000_000
MC_STDERR_BAR = 4.0
_CHUNK_ENTRIES = 1 << 22


@dataclass(frozen=True)
class Gaussian:
    """N(mean, covariance) with its lower Cholesky factor, float64."""

    mean: torch.Tensor
    covariance: torch.Tensor
    factor: torch.Tensor

    @property
    def dim(self) -> int:
        return int(self.mean.numel())

    @property
    def is_diagonal(self) -> bool:
        return bool((self.covariance == torch.diag(torch.diagonal(self.covariance))).all())


@dataclass(frozen=True)
class KLResult:
    dim: int
    kl: float
    kl_torch: float
    kl_mc: float
    kl_mc_stderr: float
    samples: int
    tolerance: float
    independent: bool
    kl_per_coordinate: list[float] | None
    kl_sum: float | None
    passed: bool
    failures: list[str] = field(default_factory=list)


def make_gaussian(mean: Any, covariance: Any, mean_name: str = "mu", cov_name: str = "cov") -> Gaussian:
    """Validate a mean vector and a symmetric positive definite covariance of matching size."""
    mu = as_float64(mean, mean_name, 1)
    cov = as_float64(covariance, cov_name, 2)
    d = mu.numel()
    if d > MAX_DIM:
        raise InputError(f"{mean_name}: dimension {d} exceeds {MAX_DIM}; use a smaller dimension")
    if list(cov.shape) != [d, d]:
        raise InputError(f"{cov_name}: the covariance has shape {list(cov.shape)} but {mean_name} has {d} "
                         f"entries; give a {d}x{d} matrix")
    asymmetry = float((cov - cov.T).abs().max())
    if asymmetry > 1e-12 * float(cov.abs().max()):
        i, j = divmod(int((cov - cov.T).abs().argmax()), d)
        raise InputError(f"{cov_name}: the covariance is not symmetric ([{i}][{j}] = {float(cov[i, j]):g} but [{j}][{i}] = "
                         f"{float(cov[j, i]):g}); give a symmetric positive definite matrix")
    cov = (cov + cov.T) / 2
    factor, info = torch.linalg.cholesky_ex(cov)
    if int(info) != 0:
        smallest = float(torch.linalg.eigvalsh(cov)[0])
        raise InputError(f"{cov_name}: the covariance is not positive definite (smallest eigenvalue {smallest:.3g}); "
                         "give a symmetric positive definite matrix")
    return Gaussian(mu, cov, factor)


def validate_pair(p: Gaussian, q: Gaussian, independent: bool = False) -> None:
    if p.dim != q.dim:
        raise InputError(f"mu0 has {p.dim} entries but mu1 has {q.dim}; both Gaussians need the same dimension")
    if independent:
        for gaussian, name in ((p, "cov0"), (q, "cov1")):
            if not gaussian.is_diagonal:
                raise InputError(f"{name}: --independent needs diagonal covariances (independent coordinates); "
                                 "set the off-diagonal entries to 0 or drop --independent")


def random_gaussian_pair(dim: int, independent: bool = False, seed: int = 0) -> tuple[Gaussian, Gaussian]:
    """Means ~ N(0, I); covariances Q diag(lambda) Q^T with lambda in [0.5, 2] (Q = I with `independent`)."""
    if not 1 <= dim <= MAX_DIM:
        raise InputError(f"--dim {dim}: the dimension must be between 1 and {MAX_DIM}")
    gen = torch.Generator().manual_seed(seed)

    def draw(index: int) -> Gaussian:
        mean = torch.randn(dim, generator=gen, dtype=torch.float64)
        eigenvalues = 0.5 + 1.5 * torch.rand(dim, generator=gen, dtype=torch.float64)
        if independent:
            covariance = torch.diag(eigenvalues)
        else:
            q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
            covariance = q @ torch.diag(eigenvalues) @ q.T
        return make_gaussian(mean, (covariance + covariance.T) / 2, f"mu{index}", f"cov{index}")

    return draw(0), draw(1)


def kl_closed_form(p: Gaussian, q: Gaussian) -> float:
    """Problem 6's formula with Cholesky factors and triangular solves."""
    trace_term = torch.linalg.solve_triangular(q.factor, p.factor, upper=False).square().sum()
    mahalanobis = torch.linalg.solve_triangular(q.factor, (q.mean - p.mean).unsqueeze(1), upper=False).square().sum()
    log_det_ratio = 2 * (torch.log(torch.diagonal(q.factor)).sum() - torch.log(torch.diagonal(p.factor)).sum())
    return float(0.5 * (trace_term + mahalanobis - p.dim + log_det_ratio))


def kl_normal_1d(mean0: float, var0: float, mean1: float, var1: float) -> float:
    """KL(N(m0, v0) || N(m1, v1)) = 1/2 (v0/v1 + (m1 - m0)^2 / v1 - 1 + log(v1/v0)) for variances v0, v1 > 0."""
    return 0.5 * (var0 / var1 + (mean1 - mean0) ** 2 / var1 - 1 + math.log(var1 / var0))


def kl_torch(p: Gaussian, q: Gaussian) -> float:
    """torch.distributions.kl_divergence on MultivariateNormals built from the covariances."""
    from torch.distributions import MultivariateNormal, kl_divergence

    return float(kl_divergence(MultivariateNormal(p.mean, covariance_matrix=p.covariance),
                               MultivariateNormal(q.mean, covariance_matrix=q.covariance)))


def kl_monte_carlo(p: Gaussian, q: Gaussian, samples: int, seed: int = 0) -> tuple[float, float]:
    """Mean of log f(X) - log g(X) over X ~ f (densities from torch.distributions) and its standard error."""
    from torch.distributions import MultivariateNormal

    if not 2 <= samples <= MAX_SAMPLES:
        raise InputError(f"--samples {samples}: the Monte Carlo estimate needs between 2 and {MAX_SAMPLES} samples")
    f = MultivariateNormal(p.mean, covariance_matrix=p.covariance)
    g = MultivariateNormal(q.mean, covariance_matrix=q.covariance)
    gen = torch.Generator().manual_seed(seed)
    chunk = max(1, _CHUNK_ENTRIES // p.dim)
    done, values = 0, []
    while done < samples:
        size = min(chunk, samples - done)
        x = p.mean + torch.randn(size, p.dim, generator=gen, dtype=torch.float64) @ p.factor.T
        values.append(f.log_prob(x) - g.log_prob(x))
        done += size
    ratios = torch.cat(values)
    return float(ratios.mean()), float(ratios.std(unbiased=True)) / math.sqrt(samples)


def check_kl(p: Gaussian, q: Gaussian, samples: int, seed: int = 0, independent: bool = False) -> KLResult:
    """Closed form vs torch (tolerance) vs Monte Carlo (4 standard errors); KL >= 0; with `independent` the 1-D sum."""
    validate_pair(p, q, independent)
    kl = kl_closed_form(p, q)
    reference = kl_torch(p, q)
    mc_mean, mc_stderr = kl_monte_carlo(p, q, samples, seed)
    condition = max(float(torch.linalg.cond(p.covariance)), float(torch.linalg.cond(q.covariance)))
    tolerance = max(1e-9, 64 * p.dim * torch.finfo(torch.float64).eps * condition) * max(1.0, abs(kl))
    failures = []
    if abs(kl - reference) > tolerance:
        failures.append(f"closed form {kl:.10g} differs from torch {reference:.10g} by more than {tolerance:.1e}")
    if abs(mc_mean - kl) > MC_STDERR_BAR * mc_stderr + tolerance:
        failures.append(f"Monte Carlo {mc_mean:.6g} is {abs(mc_mean - kl) / max(mc_stderr, 1e-300):.1f} "
                        f"standard errors from the closed form {kl:.6g}")
    per_coordinate = kl_sum = None
    if independent:
        per_coordinate = [kl_normal_1d(float(p.mean[i]), float(p.covariance[i, i]), float(q.mean[i]),
                                       float(q.covariance[i, i])) for i in range(p.dim)]
        kl_sum = math.fsum(per_coordinate)
        if abs(kl_sum - kl) > tolerance:
            failures.append(f"sum of 1-D KLs {kl_sum:.10g} differs from the joint KL {kl:.10g} (Problem 5b)")
    exact_values = {"closed-form KL": kl, "torch KL": reference}
    if independent:
        exact_values.update({f"1-D KL of coordinate {i}": v for i, v in enumerate(per_coordinate or [])})
        exact_values["sum of 1-D KLs"] = kl_sum
    for label, value in exact_values.items():
        if value is not None and value < -tolerance:
            failures.append(f"{label} = {value:.3g} < 0 contradicts KL >= 0 (Problem 5a)")
    if mc_mean < -MC_STDERR_BAR * mc_stderr - tolerance:
        failures.append(f"Monte Carlo KL {mc_mean:.3g} is below 0 by more than {MC_STDERR_BAR:g} standard errors")
    return KLResult(p.dim, kl, reference, mc_mean, mc_stderr, samples, tolerance, independent, per_coordinate, kl_sum,
                    not failures, failures)

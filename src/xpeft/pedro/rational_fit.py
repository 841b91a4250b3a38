"""Offline fit of the rational activation's GeLU initialisation (never run at import; see benchmarks/fit_rational.py).

The activation is `R(x) = P(x) / (1 + |B(x)|)` with `P(x) = Σ_{i≤m} a_i x^i` and `B(x) = Σ_{1≤j≤n} b_j x^j`
([`xpeft.pedro.generator.rational`]). The fit, in float64 on `points` equally spaced points of `[-half_width,
half_width]`: first the linearised least-squares problem `P(x) - y·B(x) = y` (exact where `B ≥ 0`), then L-BFGS on the
root mean squared error of `R` against the exact GeLU `y = x·Φ(x)` (see [`fit_gelu_rational`] for the starts).
"""

from __future__ import annotations

import math

import torch

from .generator import rational


def exact_gelu(x: torch.Tensor) -> torch.Tensor:
    """`x·Φ(x)` with the normal CDF written through erf (the exact GeLU, not the tanh approximation)."""
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _grid(half_width: float, points: int) -> torch.Tensor:
    return torch.linspace(-half_width, half_width, points, dtype=torch.float64)


def _refine(x: torch.Tensor, y: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor, max_iter: int):
    """L-BFGS from the given coefficients; returns the refined ones and their root mean squared error."""
    numerator = numerator.clone().requires_grad_()
    denominator = denominator.clone().requires_grad_()
    optimizer = torch.optim.LBFGS(
        [numerator, denominator],
        lr=1,
        max_iter=max_iter,
        tolerance_grad=1e-16,
        tolerance_change=1e-20,
        history_size=100,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        # The root of the mean square: the mean square itself (about 1e-5) is too flat for L-BFGS's line search.
        loss = (rational(x, numerator, denominator) - y).square().mean().sqrt()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        error = float((rational(x, numerator, denominator) - y).square().mean().sqrt())
    return numerator.detach(), denominator.detach(), error


def fit_gelu_rational(
    degrees: tuple[int, int], half_width: float = 8.0, points: int = 8001, max_iter: int = 2000
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The coefficients `(a_0..a_m), (b_1..b_n)` of a degree-`(m, n)` rational fitted to GeLU (module docstring).

    L-BFGS runs from two starts and keeps the better: the linearised least-squares solution and, for `n > 1`, the
    `(m - 1, n - 1)` fit padded with zeros (so a higher degree never fits worse than the one below it; from the
    least-squares start alone (6, 5) lands in a local minimum with 1.6× the max error of (5, 4)).
    """
    m, n = degrees
    x = _grid(half_width, points)
    y = exact_gelu(x)
    powers_p = torch.stack([x**i for i in range(m + 1)], dim=1)
    powers_b = torch.stack([x**j for j in range(1, n + 1)], dim=1)
    linearised = torch.linalg.lstsq(torch.cat([powers_p, -y[:, None] * powers_b], dim=1), y[:, None]).solution[:, 0]
    starts = [(linearised[: m + 1], linearised[m + 1 :])]
    if n > 1:
        lower_numerator, lower_denominator = fit_gelu_rational((m - 1, n - 1), half_width, points, max_iter)
        zero = (0.0,)
        starts.append((torch.tensor(lower_numerator + zero).double(), torch.tensor(lower_denominator + zero).double()))
    fits = [_refine(x, y, numerator, denominator, max_iter) for numerator, denominator in starts]
    numerator, denominator, _ = min(fits, key=lambda fit: fit[2])
    return tuple(numerator.tolist()), tuple(denominator.tolist())


def max_gelu_error(
    numerator: tuple[float, ...], denominator: tuple[float, ...], half_width: float, points: int = 8001
) -> float:
    """`max |R(x) - GeLU(x)|` over `points` equally spaced points of `[-half_width, half_width]`, in float64."""
    x = _grid(half_width, points)
    fitted = rational(x, torch.tensor(numerator, dtype=torch.float64), torch.tensor(denominator, dtype=torch.float64))
    return float((fitted - exact_gelu(x)).abs().max())

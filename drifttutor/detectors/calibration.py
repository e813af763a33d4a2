"""Calibrated MMD p-values: a gamma distribution fitted once to simulated null MMD^2 values.

Simulating the null distribution at fit time (by splitting the reference sample) and fitting a
gamma distribution to it makes each later test cost one MMD^2 instead of a permutation test. A
gamma approximation of the MMD null distribution is one of the tests in Gretton et al., "A Kernel
Two-Sample Test", JMLR 13 (2012), where it is fitted to the biased statistic; here it is fitted,
with a shift, to the unbiased one. TorchDrift offers the same calibrated mode
(``fit(x, n_test=...)``). The result is an approximation: its tails are extrapolated beyond the
simulated values, so p-values far below 1 / n_perm should not be read literally.
"""

from __future__ import annotations

import torch

from drifttutor._checks import check


def fit_shifted_gamma(values: torch.Tensor) -> tuple[float, float, float]:
    """Moment-matched gamma distribution with a shift: returns ``(shape, loc, scale)``.

    Matches mean, variance and skewness of ``values``: shape = 4 / skew^2, scale = std * skew / 2,
    loc = mean - shape * scale. The shift lets the fit cover the unbiased MMD^2, which can be
    negative. Skewness at or below 0.05 (a nearly normal null) is clipped to 0.05.
    """
    values = values.double()
    mean, std = float(values.mean()), float(values.std())
    check(
        std > 0,
        "the simulated null MMD^2 values are all equal; fit on more (or more varied) "
        "reference_features.",
    )
    skew = max(float((((values - mean) / std) ** 3).mean()), 0.05)
    shape = 4.0 / skew**2
    scale = std * skew / 2.0
    return shape, mean - shape * scale, scale


def gamma_survival(value: torch.Tensor, shape: float, loc: float, scale: float) -> torch.Tensor:
    """P(G >= value) for G ~ loc + Gamma(shape, scale); never below the smallest positive float."""
    upper = torch.special.gammaincc(
        torch.tensor(shape, dtype=value.dtype, device=value.device),
        ((value - loc) / scale).clamp_min(0.0),
    )
    return upper.clamp_min(torch.finfo(value.dtype).tiny)

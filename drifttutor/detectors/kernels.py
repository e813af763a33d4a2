"""Kernels for the MMD test, and the median heuristic that picks their lengthscale.

Every kernel here is a function of the Euclidean distance d = |x - y| with a ``lengthscale`` l.
Pass ``lengthscale=None`` to use the median heuristic (Gretton et al., "A Kernel Two-Sample Test",
JMLR 13, 2012, section 8; studied by Garreau, Jitkrittum & Kanagawa, "Large sample analysis of
the median heuristic", 2017): l is the median distance between distinct samples of the pooled
reference and test features. Because the pooled set is the same for every relabelling of the
samples, the kernel matrix is too, and the permutation test stays exact.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from drifttutor._checks import check


def compute_dtype(device: torch.device) -> torch.dtype:
    """The dtype kernel sums are computed in: float64, except on devices without it (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def as_distance_dtype(features: torch.Tensor) -> torch.Tensor:
    """Features in the precision distances are computed in: float64 stays, the rest is float32."""
    return features if features.dtype == torch.float64 else features.float()


def squared_row_norms(rows: torch.Tensor) -> torch.Tensor:
    """|row|^2 for every row, without a temporary as large as ``rows``."""
    return torch.linalg.vector_norm(rows, dim=1).square_()


class ReferenceGeometry(NamedTuple):
    """What the distances to a sample x need, computed once: x's centre, x shifted by it, the
    squared norms of those rows and the squared distances within x. A fitted detector keeps it."""

    centre: torch.Tensor
    centred: torch.Tensor
    squared_norms: torch.Tensor
    squared_distances: torch.Tensor


def reference_geometry(x: torch.Tensor) -> ReferenceGeometry:
    """Centre, centred rows, squared norms and squared distances (one product) of the sample ``x``.

    Centring on the mean keeps the cancellation error of |a|^2 + |b|^2 - 2 a.b small.
    """
    x = as_distance_dtype(x)
    centre = x.mean(dim=0, keepdim=True)
    centred = x - centre
    norms = squared_row_norms(centred)
    squared = torch.addmm(norms[None, :], centred, centred.T, alpha=-2.0)
    return ReferenceGeometry(centre, centred, norms, squared.add_(norms[:, None]).clamp_min_(0.0))


def median_heuristic(squared_distances: torch.Tensor) -> torch.Tensor:
    """Median distance between distinct samples, from a square matrix of squared distances.

    Only the pairs i < j count (the zero diagonal would drag the median down); with an even
    number of pairs this is the lower of the two middle values. Returns a 0-dim tensor.
    """
    n = squared_distances.shape[0]
    check(n >= 2, "the median heuristic needs at least 2 samples.")
    rows, cols = torch.triu_indices(n, n, offset=1, device=squared_distances.device)
    median = squared_distances[rows, cols].median().sqrt()
    check(
        float(median) > 0.0,
        "the median distance between samples is 0 (more than half of the pairs are identical), "
        "so the median heuristic cannot set a lengthscale; pass a fixed one, e.g. "
        "GaussianKernel(lengthscale=1.0).",
    )
    return median


class Kernel(nn.Module):
    """Base class of distance-based kernels k(x, y) = f(|x - y| / lengthscale).

    Subclasses implement :meth:`from_squared_distances`. Calling a kernel, ``kernel(x, y)``,
    returns the (N, M) kernel matrix, with the median heuristic over the pooled ``x`` and ``y``
    when the lengthscale is not fixed.
    """

    def __init__(self, *, lengthscale: float | None = None) -> None:
        super().__init__()
        check(
            lengthscale is None or (math.isfinite(lengthscale) and lengthscale > 0),
            "lengthscale must be a positive number or None (median heuristic), "
            f"got {lengthscale!r}.",
        )
        self.lengthscale = lengthscale

    def resolve_lengthscale(self, squared_distances: torch.Tensor) -> torch.Tensor:
        """The fixed lengthscale, or the median heuristic on the given square distance matrix."""
        if self.lengthscale is not None:
            return torch.tensor(
                self.lengthscale, dtype=squared_distances.dtype, device=squared_distances.device
            )
        return median_heuristic(squared_distances)

    def from_squared_distances(
        self, squared_distances: torch.Tensor, lengthscale: torch.Tensor
    ) -> torch.Tensor:
        """Kernel values for a tensor of squared distances, given the lengthscale."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Kernel matrix between the rows of ``x`` and ``y`` (default: ``x``), in float64."""
        y = x if y is None else y
        dtype = compute_dtype(x.device)
        pooled = torch.cat([x, y]).to(dtype)
        squared = reference_geometry(pooled).squared_distances
        squared.fill_diagonal_(0.0)
        lengthscale = self.resolve_lengthscale(squared)
        return self.from_squared_distances(squared[: len(x), len(x) :], lengthscale)

    def extra_repr(self) -> str:
        return f"lengthscale={'median heuristic' if self.lengthscale is None else self.lengthscale}"


class GaussianKernel(Kernel):
    """Gaussian (squared exponential, RBF) kernel k(x, y) = exp(-|x - y|^2 / (2 l^2)).

    The kernel of the MMD test in Gretton et al. (JMLR 2012); it is characteristic, so the
    population MMD is 0 only when the two distributions are equal.
    """

    def from_squared_distances(self, squared_distances, lengthscale):
        return torch.div(squared_distances, -2.0 * lengthscale**2).exp_()


class ExpKernel(Kernel):
    """Exponential (Laplacian-like) kernel k(x, y) = exp(-|x - y| / l).

    Heavier-tailed in the distance than the Gaussian kernel, so it reacts more to far-apart
    samples; also characteristic (Sriperumbudur et al., JMLR 11, 2010).
    """

    def from_squared_distances(self, squared_distances, lengthscale):
        return squared_distances.sqrt().div_(-lengthscale).exp_()


class RationalQuadraticKernel(Kernel):
    """Rational quadratic kernel k(x, y) = (1 + |x - y|^2 / (2 alpha l^2))^(-alpha).

    A scale mixture of Gaussian kernels (Rasmussen & Williams, "Gaussian Processes for Machine
    Learning", 2006, eq. 4.19); ``alpha`` -> infinity gives the Gaussian kernel.
    """

    def __init__(self, *, lengthscale: float | None = None, alpha: float = 1.0) -> None:
        super().__init__(lengthscale=lengthscale)
        check(
            math.isfinite(alpha) and alpha > 0, f"alpha must be a positive number, got {alpha!r}."
        )
        self.alpha = alpha

    def from_squared_distances(self, squared_distances, lengthscale):
        scaled = torch.div(squared_distances, 2.0 * self.alpha * lengthscale**2)
        return scaled.add_(1.0).pow_(-self.alpha)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha}"

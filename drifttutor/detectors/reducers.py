"""Dimension reduction before a drift test: principal component analysis as an ``nn.Module``.

Rabanser, Günnemann & Lipton ("Failing Loudly", NeurIPS 2019) reduce learned features to a few
principal components before testing for shift; PCA itself goes back to Pearson (1901).
"""

from __future__ import annotations

import torch
from torch import nn

from drifttutor._checks import check
from drifttutor.detectors.base import ResizableBuffersMixin, check_features


class PCAReducer(ResizableBuffersMixin, nn.Module):
    """Project features onto the ``n_components`` leading principal components of the reference.

    ``fit(reference_features)`` centres the reference (N, D) features and takes its singular value
    decomposition (``torch.linalg.svd``, exact and deterministic); it stores the buffers ``mean``
    (D,) and ``components`` (D, n_components), with each component's sign fixed so that its
    largest-magnitude entry is positive, and returns ``self``. ``forward(features)`` returns
    ``(features - mean) @ components`` of shape (N, n_components). Fit it with the detector that
    follows it, e.g. via ``drifttutor.fitting.fit`` on ``nn.Sequential(PCAReducer(2),
    KSDriftDetector())``.
    """

    mean: torch.Tensor
    components: torch.Tensor

    def __init__(self, n_components: int) -> None:
        super().__init__()
        check(
            isinstance(n_components, int) and n_components >= 1,
            f"n_components must be a positive int, got {n_components!r}.",
        )
        self.n_components = n_components
        self.register_buffer("mean", torch.empty(0))
        self.register_buffer("components", torch.empty(0, 0))

    @property
    def is_fitted(self) -> bool:
        """Whether ``fit`` (or ``load_state_dict`` of a fitted reducer) has run."""
        return self.components.numel() > 0

    def fit(self, reference_features: torch.Tensor) -> PCAReducer:
        """Compute mean and principal components of ``reference_features`` (N, D)."""
        reference = check_features(reference_features, name="reference_features").detach()
        n, d = reference.shape
        check(
            self.n_components <= min(n, d),
            f"n_components={self.n_components} is more than min(N, D) = {min(n, d)} for "
            f"reference_features of shape {(n, d)}; choose fewer components.",
        )
        reference = reference.to(self.mean.device)
        mean = reference.mean(dim=0)
        _, _, right = torch.linalg.svd(reference - mean, full_matrices=False)
        components = right[: self.n_components].T
        largest = components.abs().argmax(dim=0)
        signs = torch.sign(components[largest, torch.arange(self.n_components)])
        self.mean = mean.clone()
        self.components = (components * torch.where(signs == 0, 1.0, signs)).contiguous()
        return self

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Project ``features`` (N, D) onto the principal components: (N, n_components)."""
        check(
            self.is_fitted,
            "PCAReducer is not fitted yet; call reducer.fit(reference_features) (or "
            "drifttutor.fitting.fit(...)) first.",
            error=RuntimeError,
        )
        features = check_features(features, min_samples=1)
        check(
            features.shape[1] == self.mean.shape[0],
            f"features have {features.shape[1]} columns but PCAReducer was fitted on "
            f"{self.mean.shape[0]}-dimensional reference_features.",
        )
        check(
            features.device == self.mean.device,
            f"features are on {features.device} but PCAReducer is on {self.mean.device}; "
            f"move one of them: reducer.to({str(features.device)!r}) or "
            f"features.to({str(self.mean.device)!r}).",
        )
        return (features.to(self.mean.dtype) - self.mean) @ self.components

    def extra_repr(self) -> str:
        fitted = f"fitted on D={self.mean.shape[0]}" if self.is_fitted else "not fitted"
        return f"n_components={self.n_components}, {fitted}"

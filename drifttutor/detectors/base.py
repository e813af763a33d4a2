"""The ``Detector`` base class: fit on reference features, then test incoming features.

A detector is a ``torch.nn.Module`` so that it composes with the rest of a model
(``nn.Sequential(PCAReducer(2), KSDriftDetector())``), moves with ``.to(device)`` and saves with
``state_dict()``. The interface follows TorchDrift (Viehmann et al., "TorchDrift: Drift detection
for PyTorch", 2021): ``fit(reference_features)``, ``forward(features)`` for the score and
``compute_p_value(features)`` for the p-value.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from drifttutor._checks import check


class DriftTestResult(NamedTuple):
    """What a drift test returns: the ``score`` (bigger means more drift) and its ``p_value``."""

    score: torch.Tensor
    p_value: torch.Tensor


def check_features(
    features: object, *, name: str = "features", min_samples: int = 2
) -> torch.Tensor:
    """Check that ``features`` is a finite (N, D) tensor with N >= ``min_samples``, as floats.

    Integer or boolean features are converted to float32; everything else that is not a 2-D batch
    of finite numbers raises a ``ValueError`` that says what to do.
    """
    check(
        isinstance(features, torch.Tensor),
        f"{name} must be a torch.Tensor of shape (N, D), got {type(features).__name__}; "
        "convert with torch.as_tensor(...).",
    )
    assert isinstance(features, torch.Tensor)
    check(
        features.dim() == 2,
        f"{name} must be 2-D with shape (N samples, D features), got shape "
        f"{tuple(features.shape)}; "
        "flatten image-shaped outputs with features.flatten(1) (or end the feature_extractor with "
        "nn.Flatten()), and turn a single sample into a batch with features.unsqueeze(0).",
    )
    check(not features.is_complex(), f"{name} must be real-valued, got dtype {features.dtype}.")
    if not features.is_floating_point():
        features = features.float()
    check(
        features.shape[0] >= min_samples,
        f"{name} has {features.shape[0]} sample(s), but a two-sample test needs at least 2; "
        "test a larger batch (drift is a property of a distribution, not of one sample)."
        if min_samples == 2
        else f"{name} has {features.shape[0]} sample(s), at least {min_samples} are needed.",
    )
    check(features.shape[1] >= 1, f"{name} has no feature columns (shape {tuple(features.shape)}).")
    finite_rows = torch.isfinite(features).all(dim=1)
    n_bad = int((~finite_rows).sum())
    check(
        n_bad == 0,
        f"{name} contains NaN or inf values in {n_bad} of {features.shape[0]} rows; check the "
        "input images and the feature_extractor, or drop those rows with "
        "features[torch.isfinite(features).all(dim=1)].",
    )
    return features


class ResizableBuffersMixin(nn.Module):
    """Let ``load_state_dict`` accept buffers whose shape differs from the module's own.

    Fitted state (the reference sample, PCA components, ...) has a shape that is only known after
    ``fit``, so an unfitted module registers it as an empty tensor. Before the usual copy, this
    mixin replaces each such buffer by an empty one of the incoming shape and dtype, on the
    module's current device, so that a fresh module can load a fitted one's ``state_dict``.
    """

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        for name, buffer in list(self._buffers.items()):
            incoming = state_dict.get(prefix + name)
            if buffer is not None and isinstance(incoming, torch.Tensor):
                if incoming.shape != buffer.shape or incoming.dtype != buffer.dtype:
                    self._buffers[name] = torch.empty(
                        incoming.shape, dtype=incoming.dtype, device=buffer.device
                    )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class Detector(ResizableBuffersMixin, nn.Module):
    """Base class of drift detectors: ``fit`` on reference features, then test batches of features.

    ``fit(reference_features)`` stores the reference sample in the buffer ``base_outputs`` (so it
    is saved by ``state_dict`` and moved by ``.to(device)``) and returns the detector.
    ``detector(features)`` returns the drift score as a 0-dim tensor, or the p-value when the
    detector was built with ``return_p_value=True``; ``compute_p_value(features)`` always returns
    the p-value and ``test(features)`` returns both (a :class:`DriftTestResult`).

    Devices: the detector lives where ``.to(device)`` put it; ``fit`` copies the reference features
    there, and incoming ``features`` on another device raise a ``ValueError`` (rather than being
    copied silently, which would hide a slow transfer in a monitoring loop).

    Subclasses implement ``_score(features)`` and ``_test(features)``; both receive checked
    features on the right device with the right number of columns. Interface after TorchDrift
    (Viehmann et al., 2021).
    """

    base_outputs: torch.Tensor

    def __init__(self, *, return_p_value: bool = False) -> None:
        super().__init__()
        self.return_p_value = return_p_value
        self.register_buffer("base_outputs", torch.empty(0, 0))

    @property
    def is_fitted(self) -> bool:
        """Whether ``fit`` (or ``load_state_dict`` of a fitted detector) has run."""
        return self.base_outputs.numel() > 0

    def fit(self, reference_features: torch.Tensor) -> Detector:
        """Store ``reference_features`` (N, D) as the reference sample and return ``self``."""
        reference_features = check_features(reference_features, name="reference_features")
        self.base_outputs = reference_features.detach().to(self.base_outputs.device).clone()
        return self

    def _checked(self, features: torch.Tensor) -> torch.Tensor:
        check(
            self.is_fitted,
            f"{type(self).__name__} is not fitted yet; call detector.fit(reference_features) "
            "(or drifttutor.fitting.fit(...)) before testing features.",
            error=RuntimeError,
        )
        features = check_features(features)
        n_ref = self.base_outputs.shape[1]
        check(
            features.shape[1] == n_ref,
            f"features have {features.shape[1]} columns but the detector was fitted on "
            f"{n_ref}-dimensional reference_features; pass features from the same "
            "feature_extractor (and reducers) that produced the reference.",
        )
        device = self.base_outputs.device
        check(
            features.device == device,
            f"features are on {features.device} but the detector is on {device}; move one of "
            f"them: detector.to({str(features.device)!r}) or features.to({str(device)!r}).",
        )
        return features.detach()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Return the drift score of ``features`` (or its p-value if ``return_p_value``)."""
        if self.return_p_value:
            return self.compute_p_value(features)
        return self._score(self._checked(features))

    def compute_p_value(self, features: torch.Tensor) -> torch.Tensor:
        """Return the p-value of the test "``features`` come from the reference distribution"."""
        return self._test(self._checked(features)).p_value

    def test(self, features: torch.Tensor) -> DriftTestResult:
        """Return score and p-value of ``features`` from one run of the test."""
        return self._test(self._checked(features))

    def _score(self, features: torch.Tensor) -> torch.Tensor:
        return self._test(features).score

    def _test(self, features: torch.Tensor) -> DriftTestResult:
        raise NotImplementedError(f"{type(self).__name__} must implement _test(features)")

    def extra_repr(self) -> str:
        fitted = f"fitted on {tuple(self.base_outputs.shape)}" if self.is_fitted else "not fitted"
        return f"return_p_value={self.return_p_value}, {fitted}"

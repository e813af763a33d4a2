"""Drift checks on a deployed model: a forward hook that tests a sliding window of features.

A :class:`DriftMonitor` hooks into the module that produces features (for the walkthrough's
classifier, ``classifier.feature_extractor``), copies each batch's features into a ring buffer of
the last ``window`` inputs, and every ``check_every`` inputs tests that window against the
reference with a fitted ``detector``. A p-value below ``threshold`` raises an alarm: it is recorded
in ``history`` and passed to ``on_alarm``. The hook only reads: it returns ``None`` and works on a
detached copy without gradients, so the model's outputs are exactly what they would be without it.
This is the pattern of TorchDrift's deployment example (Viehmann et al., 2021), written as a
reusable object. Introduced in ``notebooks/07_monitor_deployed_model``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import Dataset

from ._checks import check
from .corruptions import get_corruption, is_randomised


class DriftCheck(NamedTuple):
    """One test of the window: after ``inputs_seen`` inputs, its ``p_value``, and whether it alarmed."""

    inputs_seen: int
    p_value: float
    alarm: bool


class DriftMonitor:
    """Test the last ``window`` feature vectors for drift every ``check_every`` inputs.

    ``monitor.attach(module)`` registers a forward hook on ``module`` (whose output must be a
    (batch, D) tensor, or feature maps that are flattened to that); ``monitor.detach()`` removes it,
    and ``with monitor.attach(module): ...`` detaches on leaving the block. Features can also be
    pushed by hand with :meth:`observe`.

    The window is a preallocated (window, D) tensor on the detector's device, written as a ring
    buffer, so monitoring allocates nothing per batch. A batch is split at check points, so checks
    happen after exactly ``check_every``, ``2 * check_every``, ... inputs (the first one once
    ``window`` inputs have arrived), whatever the batch size. Each check calls
    ``detector.compute_p_value(window_features)``; if the p-value is below ``threshold`` it is an
    alarm and ``on_alarm(check)`` is called with the :class:`DriftCheck`. Every check is kept in
    ``history``.

    The detector must be fitted on features from the same module (the reference), and a calibrated
    ``KernelMMDDriftDetector`` must have been fitted with ``n_test=window``.
    """

    def __init__(
        self,
        detector: nn.Module,
        *,
        window: int,
        check_every: int,
        threshold: float = 0.01,
        on_alarm: Callable[[DriftCheck], object] | None = None,
    ) -> None:
        check(
            callable(getattr(detector, "compute_p_value", None)),
            "detector must have a compute_p_value(features) method, e.g. a fitted "
            "KernelMMDDriftDetector or KSDriftDetector.",
        )
        check(isinstance(window, int) and window >= 2, f"window must be an int >= 2 (inputs per test), got {window!r}.")
        check(
            isinstance(check_every, int) and check_every >= 1,
            f"check_every must be a positive int (inputs between tests), got {check_every!r}.",
        )
        check(0 < threshold < 1, f"threshold must be a p-value between 0 and 1 (e.g. 0.01), got {threshold!r}.")
        check(on_alarm is None or callable(on_alarm), "on_alarm must be a function taking a DriftCheck, or None.")
        if getattr(detector, "is_calibrated", False):
            n_test = int(detector.calibrated_n_test)  # type: ignore[attr-defined]
            check(
                n_test == window,
                f"the detector was calibrated for batches of {n_test} (fit(..., n_test={n_test})) but the window "
                f"holds {window} inputs; refit it with n_test={window} or use window={n_test}.",
            )
        self.detector = detector
        self.window = window
        self.check_every = check_every
        self.threshold = threshold
        self.on_alarm = on_alarm
        self.history: list[DriftCheck] = []
        self.inputs_seen = 0
        self._buffer: torch.Tensor | None = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    # -- attaching ---------------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        """Whether the hook is registered on a module."""
        return self._handle is not None

    def attach(self, module: nn.Module) -> "DriftMonitor":
        """Watch the outputs of ``module`` from its next forward call on; returns ``self``."""
        check(isinstance(module, nn.Module), f"attach needs an nn.Module, got {type(module).__name__}.")
        check(not self.attached, "this monitor is already attached; call detach() first.", error=RuntimeError)
        self._handle = module.register_forward_hook(self._hook)
        return self

    def detach(self) -> None:
        """Remove the hook (does nothing if it is not attached). The history is kept."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self) -> "DriftMonitor":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.detach()

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        check(
            isinstance(output, torch.Tensor),
            f"the watched module must return a tensor of features, got {type(output).__name__}.",
        )
        self.observe(output)
        return None  # a forward hook that returns None leaves the output untouched

    # -- watching ----------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the window, the input count and the history (e.g. after dealing with an alarm)."""
        self.history.clear()
        self.inputs_seen = 0
        self._buffer = None

    def _allocate(self, features: torch.Tensor) -> torch.Tensor:
        reference = getattr(self.detector, "base_outputs", None)
        if isinstance(reference, torch.Tensor) and reference.numel() > 0:
            check(
                features.shape[1] == reference.shape[1],
                f"the watched module outputs {features.shape[1]} features, but the detector was fitted on "
                f"{reference.shape[1]}; fit the detector on features of the module you attach to.",
            )
            device, dtype = reference.device, reference.dtype
        else:
            device, dtype = features.device, features.dtype
        # Outside inference mode, so that the buffer is an ordinary tensor that later in-place
        # writes may update even when the model first ran under torch.inference_mode().
        with torch.inference_mode(False):
            return torch.zeros(self.window, features.shape[1], device=device, dtype=dtype)

    def observe(self, features: torch.Tensor) -> None:
        """Add a batch of features (batch, D) to the window, testing at every check point."""
        with torch.no_grad():
            features = features.detach()
            if features.dim() != 2:
                features = features.flatten(1)
            if self._buffer is None:
                self._buffer = self._allocate(features)
            start = 0
            while start < len(features):
                position = self.inputs_seen % self.window
                to_next_check = self.check_every - self.inputs_seen % self.check_every
                length = min(len(features) - start, self.window - position, to_next_check)
                with torch.inference_mode(False):
                    self._buffer[position : position + length].copy_(features[start : start + length])
                self.inputs_seen += length
                start += length
                if self.inputs_seen % self.check_every == 0 and self.inputs_seen >= self.window:
                    self._check()

    @property
    def window_features(self) -> torch.Tensor:
        """A copy of the features in the window, oldest first (fewer than ``window`` at the start)."""
        if self._buffer is None:
            return torch.empty(0, 0)
        if self.inputs_seen < self.window:
            return self._buffer[: self.inputs_seen].clone()
        return self._buffer.roll(-(self.inputs_seen % self.window), dims=0)

    def _check(self) -> None:
        assert self._buffer is not None
        with torch.inference_mode(False):
            p_value = float(self.detector.compute_p_value(self._buffer))
        result = DriftCheck(self.inputs_seen, p_value, p_value < self.threshold)
        self.history.append(result)
        if result.alarm and self.on_alarm is not None:
            self.on_alarm(result)

    @property
    def alarms(self) -> list[DriftCheck]:
        """The checks that raised an alarm."""
        return [result for result in self.history if result.alarm]

    def __repr__(self) -> str:
        return (
            f"DriftMonitor(window={self.window}, check_every={self.check_every}, threshold={self.threshold}, "
            f"attached={self.attached}, inputs_seen={self.inputs_seen}, checks={len(self.history)}, "
            f"alarms={len(self.alarms)})"
        )


def drifting_stream(
    dataset: Dataset,
    *,
    num_batches: int,
    batch_size: int,
    drift_from: int,
    corruption: str = "gaussian_blur",
    severity: int = 2,
    seed: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, bool]]:
    """Yield ``(images, labels, drifted)`` batches that turn corrupted from batch ``drift_from`` on.

    A stand-in for a camera that starts to lose focus while the model is deployed. Images come
    from ``dataset`` in random order, each once per pass (a new shuffle for every pass), so a
    window of the stream rarely holds the same image twice. Batches ``drift_from``,
    ``drift_from + 1``, ... are corrupted with ``corruption`` at ``severity``. Everything random
    (the order, and the noise of random corruptions) comes from a generator seeded with ``seed``.
    """
    check(0 <= drift_from <= num_batches, f"drift_from must be between 0 and num_batches={num_batches}, got {drift_from}.")
    check(batch_size >= 1 and num_batches >= 1, "batch_size and num_batches must be positive.")
    corrupt = get_corruption(corruption)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for batch in range(num_batches):
        while len(order) < batch_size:
            order += torch.randperm(len(dataset), generator=generator).tolist()  # type: ignore[arg-type]
        indices, order = order[:batch_size], order[batch_size:]
        items = [dataset[i] for i in indices]
        images = torch.stack([image for image, _ in items])
        labels = torch.tensor([label for _, label in items])
        drifted = batch >= drift_from
        if drifted:
            options = {"generator": generator} if is_randomised(corruption) else {}
            images = corrupt(images, severity, **options)
        yield images, labels, drifted


def plot_history(
    history: list[DriftCheck],
    *,
    threshold: float,
    drift_starts_at: int | None = None,
    ax: plt.Axes | None = None,
    title: str = "Drift checks while the model runs",
) -> Figure:
    """The p-value of each check against the number of inputs seen (log scale), with alarms marked."""
    check(len(history) > 0, "the history is empty: no check has run yet (the window fills first).")
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 3.2))
    seen = np.array([result.inputs_seen for result in history])
    p_values = np.array([result.p_value for result in history])
    alarms = np.array([result.alarm for result in history])
    ax.semilogy(seen, p_values, "o-", color="tab:blue", markersize=4, label="p-value of the window")
    ax.semilogy(seen[alarms], p_values[alarms], "o", color="tab:red", markersize=7, label="alarm")
    ax.axhline(threshold, color="gray", linestyle="--", label=f"threshold = {threshold}")
    if drift_starts_at is not None:
        ax.axvline(drift_starts_at, color="tab:orange", linestyle=":", label="drift starts")
    ax.set(xlabel="inputs seen", ylabel="p-value (log scale)", title=title)
    ax.legend(loc="lower left", fontsize=9)
    ax.figure.tight_layout()
    return ax.figure

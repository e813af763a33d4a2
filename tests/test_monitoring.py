"""Tests for drifttutor.monitoring: the hook never changes the model, windows, checks and alarms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from drifttutor.detectors import KernelMMDDriftDetector, KSDriftDetector
from drifttutor.monitoring import DriftCheck, DriftMonitor, plot_history

FEATURES = 4


def gaussian(n: int, *, seed: int, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, FEATURES, generator=torch.Generator().manual_seed(seed)) + shift


@pytest.fixture(scope="module")
def detector() -> KernelMMDDriftDetector:
    """A kernel MMD detector fitted on 200 seeded standard-normal reference features."""
    return KernelMMDDriftDetector(n_perm=200, seed=0).fit(gaussian(200, seed=0))


def tiny_model() -> nn.Sequential:
    """A "classifier": feature extractor (index 0) followed by a head."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Linear(6, FEATURES), nn.Tanh()), nn.Linear(FEATURES, 2))


def stream(monitor: DriftMonitor, batches: list[torch.Tensor]) -> None:
    for batch in batches:
        monitor.observe(batch)


def test_model_outputs_are_identical_with_and_without_the_monitor(detector):
    model = tiny_model()
    inputs = torch.randn(16, 6, generator=torch.Generator().manual_seed(3), requires_grad=True)
    expected = model(inputs)
    monitor = DriftMonitor(detector, window=8, check_every=4)
    with monitor.attach(model[0]):
        watched = model(inputs)
        with torch.inference_mode():
            watched_inference = model(inputs)
    assert torch.equal(watched, expected) and torch.equal(watched_inference, expected)
    assert watched.requires_grad  # the hook does not cut the graph of the model itself
    watched.sum().backward()
    assert inputs.grad is not None
    assert monitor.inputs_seen == 32 and [c.inputs_seen for c in monitor.history] == [8, 12, 16, 20, 24, 28, 32]


def test_detach_removes_the_hook_and_the_context_manager_does_too(detector):
    model = tiny_model()
    monitor = DriftMonitor(detector, window=8, check_every=4).attach(model[0])
    assert monitor.attached and len(model[0]._forward_hooks) == 1
    monitor.detach()
    assert not monitor.attached and len(model[0]._forward_hooks) == 0
    monitor.detach()  # a second detach is harmless
    with monitor.attach(model[0]):
        model(torch.randn(8, 6))
    assert len(model[0]._forward_hooks) == 0 and monitor.inputs_seen == 8
    model(torch.randn(8, 6))
    assert monitor.inputs_seen == 8  # detached: nothing more is seen


def test_alarm_fires_on_a_drifted_stream(detector):
    alarms: list[DriftCheck] = []
    monitor = DriftMonitor(detector, window=40, check_every=10, threshold=0.01, on_alarm=alarms.append)
    features = torch.cat([gaussian(80, seed=1), gaussian(80, seed=101, shift=1.0)])  # drift from input 81
    stream(monitor, list(features.split(8)))
    assert alarms, "no alarm on a stream whose features shifted by one standard deviation"
    assert alarms == monitor.alarms
    assert all(check.inputs_seen > 80 for check in alarms)
    assert alarms[0].inputs_seen <= 120, "the alarm should fire before the window is all drifted"
    assert monitor.history[-1].alarm and monitor.history[-1].p_value < 0.01


def test_no_alarm_on_a_clean_stream(detector):
    calls = []
    monitor = DriftMonitor(detector, window=40, check_every=10, threshold=0.01, on_alarm=calls.append)
    # With 13 checks at threshold 0.01, about one clean stream in five raises a false alarm
    # somewhere (see notebook 07); this seeded stream is one of the typical four.
    stream(monitor, list(gaussian(160, seed=1).split(8)))
    assert len(monitor.history) == 13  # checks after 40, 50, ..., 160 inputs
    assert not calls and not monitor.alarms
    assert min(check.p_value for check in monitor.history) > 0.01


def test_checks_happen_every_k_inputs_whatever_the_batch_size():
    ks = KSDriftDetector().fit(gaussian(100, seed=0))
    features = gaussian(95, seed=1)
    by_batch, by_row = (DriftMonitor(ks, window=20, check_every=15) for _ in range(2))
    stream(by_batch, list(features.split(7)))
    stream(by_row, list(features.split(1)))
    assert [c.inputs_seen for c in by_batch.history] == [30, 45, 60, 75, 90]
    assert by_batch.history == by_row.history


def test_the_window_is_a_preallocated_ring_buffer_of_the_last_inputs():
    ks = KSDriftDetector().fit(gaussian(100, seed=0))
    monitor = DriftMonitor(ks, window=10, check_every=5)
    features = gaussian(37, seed=2)
    monitor.observe(features[:3])
    assert torch.equal(monitor.window_features, features[:3])
    buffer = monitor._buffer
    assert buffer is not None and buffer.shape == (10, FEATURES)
    stream(monitor, list(features[3:].split(4)))
    assert monitor._buffer is buffer  # written in place, never reallocated
    assert torch.equal(monitor.window_features, features[-10:])
    monitor.reset()
    assert monitor.inputs_seen == 0 and not monitor.history


def test_feature_maps_are_flattened_and_misuse_is_explained():
    ks = KSDriftDetector().fit(gaussian(50, seed=0))
    monitor = DriftMonitor(ks, window=4, check_every=2)
    monitor.observe(gaussian(4, seed=1).reshape(4, 2, 2, 1))
    assert monitor.inputs_seen == 4 and len(monitor.history) == 1
    with pytest.raises(ValueError, match="fitted on 4"):
        DriftMonitor(ks, window=4, check_every=2).observe(torch.randn(4, 3))
    with pytest.raises(ValueError, match="compute_p_value"):
        DriftMonitor(nn.Linear(2, 2), window=4, check_every=2)
    with pytest.raises(ValueError, match="window must be"):
        DriftMonitor(ks, window=1, check_every=2)
    with pytest.raises(ValueError, match="threshold"):
        DriftMonitor(ks, window=4, check_every=2, threshold=5)
    calibrated = KernelMMDDriftDetector(n_perm=50, seed=0).fit(gaussian(50, seed=0), n_test=10)
    with pytest.raises(ValueError, match="calibrated for batches of 10"):
        DriftMonitor(calibrated, window=20, check_every=5)
    assert DriftMonitor(calibrated, window=10, check_every=5).window == 10
    model = nn.Linear(3, 4)
    monitor.attach(model)
    with pytest.raises(RuntimeError, match="already attached"):
        monitor.attach(model)
    monitor.detach()


def test_plot_history_draws_the_checks(detector):
    monitor = DriftMonitor(detector, window=40, check_every=10)
    stream(monitor, list(torch.cat([gaussian(48, seed=1), gaussian(48, seed=2, shift=1.0)]).split(8)))
    figure = plot_history(monitor.history, threshold=monitor.threshold, drift_starts_at=48)
    assert len(figure.axes) == 1
    import matplotlib.pyplot as plt

    plt.close(figure)

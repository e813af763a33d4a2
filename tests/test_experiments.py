"""Tests for drifttutor.experiments and drifttutor.encoders, on cheap seeded synthetic data."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from drifttutor import experiments as E
from drifttutor.detectors import KernelMMDDriftDetector, KSDriftDetector, PCAReducer
from drifttutor.encoders import untrained_encoder
from drifttutor.fitting import extract_features

FEATURES = 8


def gaussian(n: int, *, seed: int, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, FEATURES, generator=torch.Generator().manual_seed(seed)) + shift


REFERENCE = gaussian(200, seed=0)
POOL = gaussian(100, seed=1)  # clean incoming features; row i = image i


def detectors():
    return {
        "kernel MMD (calibrated)": (KernelMMDDriftDetector(seed=0), True),
        "PCA(2) + KS": (nn.Sequential(PCAReducer(2), KSDriftDetector()), False),
        "KS": (KSDriftDetector(), False),
    }


@pytest.mark.parametrize("name", list(detectors()))
def test_auc_is_near_chance_when_the_drifted_data_is_not_corrupted(name):
    detector, calibrate = detectors()[name]
    experiment = E.DriftDetectionExperiment(
        detector, sample_size=10, ood_ratio=0.8, num_runs=50, seed=0, fit_options={"n_test": 10} if calibrate else None
    )
    result = experiment.run(REFERENCE, POOL, POOL.clone())
    assert 0.3 <= result.auc() <= 0.7, result.auc()


@pytest.mark.parametrize("name", list(detectors()))
def test_auc_is_near_one_for_a_strong_shift(name):
    detector, calibrate = detectors()[name]
    experiment = E.DriftDetectionExperiment(
        detector, sample_size=10, ood_ratio=0.8, num_runs=50, seed=0, fit_options={"n_test": 10} if calibrate else None
    )
    result = experiment.run(REFERENCE, POOL, POOL + 1.5)
    assert result.auc() >= 0.95, result.auc()
    assert result.detection_rate(0.05) >= 0.9


def test_auc_is_near_one_for_strong_blur_seen_through_an_untrained_encoder():
    textures = torch.rand(100, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    blurred = E.corrupt_images(textures[60:], "gaussian_blur", 5)
    encoder = untrained_encoder(seed=0)
    reference = extract_features([textures[:60]], encoder, progress=False)
    feature_set = E.build_feature_set(encoder, reference, textures[60:], {"blur": blurred}, batch_size=16)
    features, drifted = feature_set.features, feature_set.drifted_features["blur"]
    assert reference.shape == (60, 32) and drifted.shape == features.shape == (40, 32)
    result = E.DriftDetectionExperiment(KSDriftDetector(), sample_size=10, ood_ratio=0.8, num_runs=30).run(
        reference, features, drifted
    )
    assert result.auc() >= 0.95


def test_results_match_scikit_learn_and_are_reproducible():
    def run(seed):
        return E.DriftDetectionExperiment(KSDriftDetector(), sample_size=10, ood_ratio=0.5, num_runs=20, seed=seed).run(
            REFERENCE, POOL, POOL + 0.5
        )

    first, again, other = run(0), run(0), run(1)
    assert np.array_equal(first.drifted_p_values, again.drifted_p_values) and first.auc() == again.auc()
    assert not np.array_equal(first.benign_p_values, other.benign_p_values)
    labels = np.r_[np.zeros(20), np.ones(20)]
    assert first.auc() == roc_auc_score(labels, -np.r_[first.benign_p_values, first.drifted_p_values])
    assert first.auc("statistic") == roc_auc_score(labels, np.r_[first.benign_scores, first.drifted_scores])
    fpr, tpr = first.roc_curve()
    assert fpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1 and np.all(np.diff(fpr) >= 0)
    assert first.false_alarm_rate(0.05) == np.mean(first.benign_p_values < 0.05)
    assert first.num_ood == 5 and first.sample_size == 10


def test_drifted_batches_mix_the_requested_share_of_corrupted_rows():
    class RecordingDetector(KSDriftDetector):
        def _test(self, features):
            batches.append(features.clone())
            return super()._test(features)

    batches: list[torch.Tensor] = []
    pool = torch.arange(40.0).repeat(FEATURES, 1).T  # row i holds i everywhere
    experiment = E.DriftDetectionExperiment(RecordingDetector(), sample_size=10, ood_ratio=0.3, num_runs=5)
    experiment.run(gaussian(50, seed=0), pool, -pool - 1)  # corrupted rows are negative
    benign, drifted = batches[:5], batches[5:]
    assert all((batch >= 0).all() for batch in benign)
    assert [int((batch[:, 0] < 0).sum()) for batch in drifted] == [3] * 5
    # corrupted and clean rows of one batch are distinct images
    assert all(len(set((-batch[:3, 0] - 1).tolist()) | set(batch[3:, 0].tolist())) == 10 for batch in drifted)


def test_draw_batches_gives_distinct_indices_per_batch():
    batches = E.draw_batches(12, sample_size=12, num_runs=4, generator=torch.Generator().manual_seed(0))
    assert batches.shape == (4, 12) and all(sorted(row.tolist()) == list(range(12)) for row in batches)
    with pytest.raises(ValueError, match="sample_size must be"):
        E.draw_batches(5, sample_size=6, num_runs=1, generator=torch.Generator())


def test_compare_detectors_shares_batches_and_fills_the_table():
    feature_sets = {
        "backbone": E.FeatureSet(REFERENCE, POOL, {"shift": POOL + 1.0, "none": POOL.clone()}),
        "untrained encoder": E.FeatureSet(REFERENCE[:, :4], POOL[:, :4], {"shift": POOL[:, :4] + 1.0, "none": POOL[:, :4]}),
    }
    results = E.compare_detectors(E.default_setups(), feature_sets, sample_sizes=[10, 20], ood_ratio=0.8, num_runs=10)
    assert len(results) == 3 * 2 * 2
    mmd_shift, mmd_none = results[("kernel MMD", "shift", 10)], results[("kernel MMD", "none", 10)]
    assert np.array_equal(mmd_shift.benign_p_values, mmd_none.benign_p_values)  # benign batches tested once
    assert mmd_shift.auc() > mmd_none.auc()
    table = E.auc_table(results)
    assert table.splitlines()[0].split()[:2] == ["corruption", "n"] and len(table.splitlines()) == 5
    figure = E.plot_roc_grid(results)
    assert len(figure.axes) == 4
    histograms = E.plot_p_value_histograms({name: results[(name, "none", 20)] for name in ["kernel MMD", "PCA(2) + KS"]})
    assert len(histograms.axes) == 2
    plt.close("all")


def test_corrupt_images_is_seeded_and_keeps_rows_in_order():
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    noisy = E.corrupt_images(images, "gaussian_noise", 3, seed=1, batch_size=2)
    assert torch.equal(noisy, E.corrupt_images(images, "gaussian_noise", 3, seed=1, batch_size=2))
    assert not torch.equal(noisy, E.corrupt_images(images, "gaussian_noise", 3, seed=2, batch_size=2))
    blurred = E.corrupt_images(images, "gaussian_blur", 2, batch_size=2)
    from drifttutor.corruptions import gaussian_blur

    torch.testing.assert_close(blurred[3:4], gaussian_blur(images[3:4], 2))


def test_untrained_encoder_is_seeded_frozen_and_cheap():
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    first, same, other = untrained_encoder(seed=0), untrained_encoder(seed=0), untrained_encoder(seed=1)
    with torch.no_grad():
        assert torch.equal(first(images), same(images))
        assert not torch.equal(first(images), other(images))
    assert first(images).shape == (2, 32) and first.feature_size == 32
    assert not any(parameter.requires_grad for parameter in first.parameters()) and not first.training


def test_misuse_is_explained():
    with pytest.raises(ValueError, match="ends with one"):
        E.DriftDetectionExperiment(PCAReducer(2))
    with pytest.raises(ValueError, match="ood_ratio"):
        E.DriftDetectionExperiment(KSDriftDetector(), ood_ratio=0)
    with pytest.raises(ValueError, match="same image"):
        E.DriftDetectionExperiment(KSDriftDetector()).run(REFERENCE, POOL, POOL[:50])
    with pytest.raises(ValueError, match="rank_by"):
        E.DriftDetectionExperiment(KSDriftDetector(), num_runs=2).run(REFERENCE, POOL, POOL).auc("score")

"""The detector interface: errors, saving and loading, KS and PCA."""

import io

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from drifttutor.detectors import (
    Detector,
    ExpKernel,
    KernelMMDDriftDetector,
    KSDriftDetector,
    PCAReducer,
    ks_test,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


def samples(seed, n=40, d=6, shift=0.0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=generator) + shift


DETECTORS = {
    "mmd": lambda: KernelMMDDriftDetector(n_perm=100, seed=0),
    "ks": lambda: KSDriftDetector(),
}


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_misuse_raises_helpful_errors(name):
    detector = DETECTORS[name]()
    features = samples(0)
    with pytest.raises(
        RuntimeError, match=r"not fitted yet; call detector.fit\(reference_features\)"
    ):
        detector(features)
    with pytest.raises(RuntimeError, match="not fitted"):
        detector.compute_p_value(features)
    detector.fit(samples(1))
    with pytest.raises(
        ValueError, match="features have 5 columns but the detector was fitted on 6"
    ):
        detector(features[:, :5])
    with pytest.raises(ValueError, match="at least 2"):
        detector(features[:1])
    with pytest.raises(ValueError, match="at least 2"):
        detector.fit(features[:1])
    for bad in (float("nan"), float("inf")):
        broken = features.clone()
        broken[3, 2] = bad
        with pytest.raises(ValueError, match="NaN or inf values in 1 of 40 rows"):
            detector.compute_p_value(broken)
        with pytest.raises(ValueError, match="NaN or inf"):
            type(detector)().fit(broken)
    with pytest.raises(ValueError, match=r"2-D .*features.flatten\(1\)"):
        detector(features.reshape(40, 2, 3))
    with pytest.raises(ValueError, match=r"2-D .*unsqueeze\(0\)"):
        detector(features[0])
    with pytest.raises(ValueError, match="torch.Tensor"):
        detector(features.numpy())


def test_functional_tests_check_their_inputs():
    x = samples(0)
    from drifttutor.detectors import kernel_mmd

    with pytest.raises(ValueError, match="same number of features"):
        kernel_mmd(x, x[:, :3])
    with pytest.raises(ValueError, match="same number of features"):
        ks_test(x, x[:, :3])
    with pytest.raises(ValueError, match="n_perm must be a positive int"):
        kernel_mmd(x, x, n_perm=0)
    with pytest.raises(ValueError, match="CPU torch.Generator"):
        kernel_mmd(x, x, generator=42)
    with pytest.raises(ValueError, match="lengthscale must be a positive number"):
        ExpKernel(lengthscale=-1.0)
    with pytest.raises(ValueError, match="pass a fixed one"):
        kernel_mmd(torch.zeros(10, 3), torch.zeros(10, 3))
    with pytest.raises(ValueError, match="either seed or generator"):
        KernelMMDDriftDetector(seed=1, generator=torch.Generator())


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_forward_returns_score_or_p_value(name):
    reference, features = samples(2), samples(3, shift=0.5)
    detector = DETECTORS[name]().fit(reference)
    score = detector(features)
    p_value = detector.compute_p_value(features)
    assert isinstance(detector, Detector) and isinstance(detector, nn.Module)
    assert score.dim() == 0 and p_value.dim() == 0
    assert 0 < float(p_value) <= 1
    assert detector.test(features) == (score, p_value)
    with_p = DETECTORS[name]()
    with_p.return_p_value = True
    assert float(with_p.fit(reference)(features)) == float(p_value)
    # fit returns the detector and keeps a copy of the reference
    assert torch.equal(detector.base_outputs, reference)
    assert detector.base_outputs.data_ptr() != reference.data_ptr()


def roundtrip(module, fresh):
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer))
    return fresh


def test_mmd_state_dict_round_trip():
    reference, features = samples(4), samples(5, shift=0.3)
    detector = KernelMMDDriftDetector(n_perm=200, seed=7, kernel=ExpKernel()).fit(reference)
    loaded = roundtrip(detector, KernelMMDDriftDetector(n_perm=200, seed=7, kernel=ExpKernel()))
    assert loaded.is_fitted and not loaded.is_calibrated
    assert torch.equal(loaded(features), detector(features))
    assert torch.equal(loaded.compute_p_value(features), detector.compute_p_value(features))


def test_mmd_calibrated_state_dict_round_trip_and_batch_size_check():
    reference = samples(6, n=120)
    detector = KernelMMDDriftDetector(n_perm=300, seed=0).fit(reference, n_test=30)
    assert detector.is_calibrated and detector.base_outputs.shape == (90, 6)
    loaded = roundtrip(detector, KernelMMDDriftDetector(n_perm=300, seed=0))
    assert loaded.is_calibrated and int(loaded.calibrated_n_test) == 30
    features = samples(7, n=30, shift=0.4)
    assert torch.equal(loaded.compute_p_value(features), detector.compute_p_value(features))
    assert torch.equal(loaded(features), detector(features))
    assert loaded.lengthscale_ == detector.lengthscale_
    with pytest.raises(ValueError, match="calibrated for batches of exactly 30 samples"):
        loaded.compute_p_value(samples(8, n=31))
    with pytest.raises(ValueError, match="n_test must be an int between 2 and 118"):
        KernelMMDDriftDetector().fit(reference, n_test=119)
    # refitting without n_test goes back to the permutation test
    detector.fit(reference)
    assert not detector.is_calibrated and detector.base_outputs.shape == (120, 6)


def test_ks_state_dict_round_trip():
    reference, features = samples(9), samples(10, shift=0.3)
    detector = KSDriftDetector().fit(reference)
    loaded = roundtrip(detector, KSDriftDetector())
    assert torch.equal(loaded.compute_p_value(features), detector.compute_p_value(features))


def test_pca_state_dict_round_trip_and_sequential():
    reference, features = samples(11, d=10), samples(12, d=10)
    chain = nn.Sequential(PCAReducer(3), KSDriftDetector())
    chain[1].fit(chain[0].fit(reference)(reference))
    loaded = roundtrip(chain, nn.Sequential(PCAReducer(3), KSDriftDetector()))
    assert torch.equal(loaded[0](features), chain[0](features))
    assert torch.equal(loaded(features), chain(features))


def test_unfitted_state_dict_loads_into_a_fresh_detector():
    loaded = roundtrip(KernelMMDDriftDetector(), KernelMMDDriftDetector())
    assert not loaded.is_fitted


def test_detector_moves_with_to_and_rejects_features_elsewhere():
    detector = KSDriftDetector().fit(samples(13))
    detector.to(torch.float64)
    assert detector.base_outputs.dtype == torch.float64
    meta = KSDriftDetector()
    meta.base_outputs = torch.empty(5, 6, device="meta")
    with pytest.raises(ValueError, match=r"features are on cpu but the detector is on meta"):
        meta(samples(14))


def test_ks_agrees_exactly_with_scipy():
    x, y = samples(15, n=12, d=3), samples(16, n=9, d=3, shift=0.8)
    score, p_value = ks_test(x, y, method="exact")
    results = [stats.ks_2samp(x[:, j].numpy(), y[:, j].numpy(), method="exact") for j in range(3)]
    assert float(score) == max(r.statistic for r in results)
    assert float(p_value) == pytest.approx(min(1.0, 3 * min(r.pvalue for r in results)), rel=1e-12)
    assert float(KSDriftDetector(method="exact").fit(x).compute_p_value(y)) == float(p_value)


def test_ks_bonferroni_combination():
    x = samples(17, n=50, d=5)
    y = samples(18, n=50, d=5)
    y[:, 2] += 3.0  # one clearly drifted feature
    single = stats.ks_2samp(x[:, 2].numpy(), y[:, 2].numpy()).pvalue
    _, p_value = ks_test(x, y)
    assert float(p_value) == pytest.approx(5 * single, rel=1e-12)
    # identical samples: every per-feature p-value is 1, and the product is clipped to 1
    score, p_value = ks_test(x, x.clone())
    assert float(score) == 0.0 and float(p_value) == 1.0


def test_ks_null_rejection_rate_is_plausible():
    p_values = [
        float(ks_test(samples(2 * s, n=50, d=8), samples(2 * s + 1, n=50, d=8))[1])
        for s in range(200)
    ]
    rate = np.mean(np.array(p_values) <= 0.05)
    assert 0.01 <= rate <= 0.08  # Bonferroni is conservative: at most 0.05 in expectation


def test_pca_matches_scikit_learn_up_to_sign():
    from sklearn.decomposition import PCA

    reference = samples(19, n=60, d=7) @ torch.randn(
        7, 7, generator=torch.Generator().manual_seed(0)
    )
    features = samples(20, n=15, d=7)
    reducer = PCAReducer(3).fit(reference)
    expected = PCA(3, svd_solver="full").fit(reference.numpy()).transform(features.numpy())
    projected = reducer(features).numpy()
    np.testing.assert_allclose(np.abs(projected), np.abs(expected), rtol=1e-4, atol=1e-4)
    assert reducer(features[:1]).shape == (1, 3)
    components = reducer.components
    np.testing.assert_allclose((components.T @ components).numpy(), np.eye(3), atol=1e-5)
    with pytest.raises(ValueError, match="n_components=8 is more than"):
        PCAReducer(8).fit(reference)
    with pytest.raises(RuntimeError, match="not fitted"):
        PCAReducer(2)(features)
    with pytest.raises(ValueError, match="fitted on 7-dimensional"):
        reducer(features[:, :4])

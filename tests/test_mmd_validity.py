"""Statistical validity of the kernel MMD test: calibration on null data, power, exactness.

Every random draw is seeded, so these tests are deterministic; the bounds are the ones a valid
test must meet, not tuned to the seeds.
"""

import numpy as np
import pytest
import torch
from scipy import stats

from drifttutor.detectors import (
    ExpKernel,
    GaussianKernel,
    KernelMMDDriftDetector,
    RationalQuadraticKernel,
    kernel_mmd,
)
from drifttutor.detectors.mmd import mmd2_of_memberships, null_mmd2, pooled_kernel_matrix
from drifttutor.detectors.permutation import random_memberships

KERNELS = {
    "gaussian": GaussianKernel,
    "exp": ExpKernel,
    "rational_quadratic": RationalQuadraticKernel,
}


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


def gaussian_samples(seed, n=50, m=50, d=8, shift=0.0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator, dtype=dtype)
    y = torch.randn(m, d, generator=generator, dtype=dtype) + shift
    return x, y, generator


def reference_mmd2(x, y, kernel_name, lengthscale, alpha=1.0):
    """Unbiased MMD^2 (Gretton et al. 2012, eq. 3) with explicit double loops in numpy."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)

    def k(a, b):
        d = np.sqrt(np.sum((a - b) ** 2))
        if kernel_name == "gaussian":
            return np.exp(-(d**2) / (2 * lengthscale**2))
        if kernel_name == "exp":
            return np.exp(-d / lengthscale)
        return (1 + d**2 / (2 * alpha * lengthscale**2)) ** (-alpha)

    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


@pytest.mark.parametrize("kernel_name", sorted(KERNELS))
def test_null_rejection_rate_and_uniform_p_values(kernel_name):
    p_values = []
    for seed in range(300):
        x, y, generator = gaussian_samples(seed)
        _, p_value = kernel_mmd(
            x, y, n_perm=200, kernel=KERNELS[kernel_name](), generator=generator
        )
        p_values.append(float(p_value))
    p_values = np.array(p_values)
    assert 0.02 <= np.mean(p_values <= 0.05) <= 0.08
    assert stats.kstest(p_values, "uniform").pvalue > 0.01


def test_detects_a_clear_mean_shift():
    detected = []
    for seed in range(100):
        x, y, generator = gaussian_samples(10_000 + seed, shift=0.5)
        detected.append(float(kernel_mmd(x, y, n_perm=200, generator=generator)[1]) < 0.01)
    assert np.mean(detected) >= 0.95


@pytest.mark.parametrize("kernel_name", sorted(KERNELS))
def test_score_matches_a_double_loop_reference(kernel_name):
    x, y, _ = gaussian_samples(1, n=13, m=9, d=5, shift=0.3)
    expected = reference_mmd2(x, y, kernel_name, lengthscale=1.7)
    score, p_value = kernel_mmd(x, y, n_perm=None, kernel=KERNELS[kernel_name](lengthscale=1.7))
    assert p_value is None
    assert score.dtype == torch.float64 and score.dim() == 0
    assert float(score) == pytest.approx(expected, rel=1e-10, abs=1e-13)
    # float32 features: distances in float32, kernel sums in float64
    score32, _ = kernel_mmd(
        x.float(), y.float(), n_perm=None, kernel=KERNELS[kernel_name](lengthscale=1.7)
    )
    assert float(score32) == pytest.approx(expected, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("kernel_name", sorted(KERNELS))
def test_kernel_matrix_matches_the_formula(kernel_name):
    x, y, _ = gaussian_samples(9, n=6, m=4, d=3)
    matrix = KERNELS[kernel_name](lengthscale=0.9)(x, y)
    distances = np.linalg.norm(x.numpy()[:, None] - y.numpy()[None], axis=2)
    expected = {
        "gaussian": np.exp(-(distances**2) / (2 * 0.9**2)),
        "exp": np.exp(-distances / 0.9),
        "rational_quadratic": 1 / (1 + distances**2 / (2 * 0.9**2)),
    }[kernel_name]
    assert matrix.shape == (6, 4)
    np.testing.assert_allclose(matrix.numpy(), expected, rtol=1e-12)


def test_rational_quadratic_alpha_is_used():
    x, y, _ = gaussian_samples(2, n=10, m=11, d=3)
    kernel = RationalQuadraticKernel(lengthscale=0.8, alpha=2.5)
    score, _ = kernel_mmd(x, y, n_perm=None, kernel=kernel)
    expected = reference_mmd2(x, y, "rational_quadratic", lengthscale=0.8, alpha=2.5)
    assert float(score) == pytest.approx(expected, rel=1e-10, abs=1e-13)


def test_median_heuristic_is_the_lower_median_of_pooled_distances():
    x, y, _ = gaussian_samples(3, n=20, m=15, d=4)
    detector = KernelMMDDriftDetector(n_perm=10, seed=0).fit(x)
    detector.compute_p_value(y)
    pooled = np.concatenate([x.numpy(), y.numpy()])
    i, j = np.triu_indices(len(pooled), k=1)
    distances = np.sort(np.linalg.norm(pooled[i] - pooled[j], axis=1))
    assert detector.lengthscale_ == pytest.approx(distances[(len(distances) - 1) // 2], rel=1e-12)
    # and that is the lengthscale of the score
    expected = reference_mmd2(x, y, "gaussian", lengthscale=detector.lengthscale_)
    assert float(detector(y)) == pytest.approx(expected, rel=1e-10)


def test_batched_statistics_match_one_permutation_at_a_time():
    x, y, _ = gaussian_samples(4, n=12, m=7, d=3, shift=0.2)
    kernel_matrix, _ = pooled_kernel_matrix(x, y, GaussianKernel(lengthscale=1.0))
    members = random_memberships(25, 19, 12, generator=torch.Generator().manual_seed(0))
    batched = mmd2_of_memberships(kernel_matrix, members)
    pooled = torch.cat([x, y]).numpy()
    for row, first in enumerate(members.numpy()):
        second = np.setdiff1d(np.arange(19), first)
        expected = reference_mmd2(pooled[first], pooled[second], "gaussian", lengthscale=1.0)
        assert float(batched[row]) == pytest.approx(expected, rel=1e-10, abs=1e-13)


def test_p_value_is_never_zero():
    x, y, generator = gaussian_samples(5, shift=100.0)
    score, p_value = kernel_mmd(x, y, n_perm=200, generator=generator)
    assert float(score) > 0.5
    assert float(p_value) == pytest.approx(1 / 201)
    detector = KernelMMDDriftDetector(n_perm=99, seed=1).fit(x)
    assert float(detector.compute_p_value(y)) == pytest.approx(1 / 100)


def test_same_seed_same_p_value():
    x, y, _ = gaussian_samples(6, shift=0.3)
    p_values = {
        float(kernel_mmd(x, y, n_perm=300, generator=torch.Generator().manual_seed(42))[1])
        for _ in range(3)
    }
    assert len(p_values) == 1
    detector = KernelMMDDriftDetector(n_perm=300, seed=42).fit(x)
    assert float(detector.compute_p_value(y)) == float(detector.compute_p_value(y))
    assert float(detector.compute_p_value(y)) == p_values.pop()
    # a generator advances: a second test draws other relabellings
    advancing = KernelMMDDriftDetector(n_perm=300, generator=torch.Generator().manual_seed(42))
    advancing.fit(x)
    assert advancing.compute_p_value(y) is not None


@pytest.mark.parametrize("m", [30, 31])  # an odd pooled size splits random draws unevenly
def test_tiny_chunks_give_exactly_the_same_p_value_and_null(m):
    x, y, _ = gaussian_samples(7, n=40, m=m, shift=0.15)
    results = [
        kernel_mmd(x, y, n_perm=500, generator=torch.Generator().manual_seed(3), max_chunk_bytes=b)
        for b in (1, 5_000, 2**30)
    ]
    assert len({float(p) for _, p in results}) == 1
    kernel_matrix, _ = pooled_kernel_matrix(x, y, GaussianKernel())
    nulls = []
    for max_chunk_bytes in (1, 2**30):
        observed, chunks = null_mmd2(
            kernel_matrix,
            40,
            n_perm=100,
            generator=torch.Generator().manual_seed(0),
            max_chunk_bytes=max_chunk_bytes,
        )
        nulls.append(torch.cat(list(chunks)))
    assert torch.equal(nulls[0], nulls[1])  # bit for bit: the sums are exact
    # the permutation statistics use the kernel matrix rounded to a fine grid (exact sums)
    assert float(observed) == pytest.approx(float(results[0][0]), abs=1e-5)


def test_detector_reuses_reference_distances_only_while_the_reference_is_unchanged():
    x, y, _ = gaussian_samples(9, n=60, m=40, shift=0.2, dtype=torch.float32)
    other, _, _ = gaussian_samples(10, n=60, m=2, shift=1.0, dtype=torch.float32)

    def functional(reference):
        return kernel_mmd(reference, y, n_perm=400, generator=torch.Generator().manual_seed(1))

    detector = KernelMMDDriftDetector(n_perm=400, seed=1).fit(x)
    assert tuple(detector.test(y)) == functional(x)
    assert tuple(detector.test(y)) == functional(x)  # second test: distances from the cache
    detector.fit(other)
    assert tuple(detector.test(y)) == functional(other)
    detector.load_state_dict(KernelMMDDriftDetector().fit(x).state_dict())
    assert tuple(detector.test(y)) == functional(x)
    detector.base_outputs.mul_(2.0)  # edited in place
    assert tuple(detector.test(y)) == functional(2.0 * x)


def test_calibrated_mode_is_roughly_calibrated_and_never_zero():
    p_values = []
    for seed in range(100):
        generator = torch.Generator().manual_seed(20_000 + seed)
        reference = torch.randn(150, 8, generator=generator)
        detector = KernelMMDDriftDetector(n_perm=300, generator=generator)
        detector.fit(reference, n_test=50)
        p_values.append(float(detector.compute_p_value(torch.randn(50, 8, generator=generator))))
    # approximate: a loose check that it is neither far too liberal nor useless
    assert np.mean(np.array(p_values) <= 0.05) <= 0.12
    assert stats.kstest(p_values, "uniform").pvalue > 0.001
    far = torch.randn(50, 8, generator=torch.Generator().manual_seed(0)) + 100.0
    assert float(detector.compute_p_value(far)) > 0.0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_and_cuda_agree():
    x, y, _ = gaussian_samples(8, n=120, m=90, d=16, shift=0.1, dtype=torch.float32)
    on_cpu = kernel_mmd(x, y, n_perm=1000, generator=torch.Generator().manual_seed(5))
    on_cuda = kernel_mmd(
        x.cuda(), y.cuda(), n_perm=1000, generator=torch.Generator().manual_seed(5)
    )
    assert on_cuda[0].device.type == "cuda"
    assert float(on_cuda[0]) == pytest.approx(float(on_cpu[0]), rel=1e-5)
    assert float(on_cuda[1]) == float(on_cpu[1])
    detector = KernelMMDDriftDetector(n_perm=200, seed=0).fit(x)
    p_cpu = detector.compute_p_value(y)
    detector.to("cuda")
    assert float(detector.compute_p_value(y.cuda())) == float(p_cpu)
    with pytest.raises(ValueError, match="detector.to"):
        detector(y)

"""Drift detectors: fit on reference features, then test whether incoming features have drifted.

One module per concept, after TorchDrift: :mod:`.base` (the ``Detector`` interface),
:mod:`.kernels` and :mod:`.mmd` (kernel MMD test, with :mod:`.permutation` for the batched
permutation test and :mod:`.calibration` for the gamma-calibrated mode), :mod:`.ks`
(per-feature Kolmogorov-Smirnov tests) and :mod:`.reducers` (PCA). Each method is a plain
function (``kernel_mmd``, ``ks_test``) and an ``nn.Module`` (``KernelMMDDriftDetector``,
``KSDriftDetector``).
"""

from drifttutor.detectors.base import Detector, DriftTestResult, check_features
from drifttutor.detectors.kernels import ExpKernel, GaussianKernel, Kernel, RationalQuadraticKernel
from drifttutor.detectors.ks import KSDriftDetector, ks_test
from drifttutor.detectors.mmd import KernelMMDDriftDetector, kernel_mmd
from drifttutor.detectors.reducers import PCAReducer

__all__ = [
    "Detector",
    "DriftTestResult",
    "ExpKernel",
    "GaussianKernel",
    "KSDriftDetector",
    "Kernel",
    "KernelMMDDriftDetector",
    "PCAReducer",
    "RationalQuadraticKernel",
    "check_features",
    "kernel_mmd",
    "ks_test",
]

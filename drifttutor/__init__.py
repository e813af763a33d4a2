"""drifttutor: learn to detect input drift on an image classifier, end to end.

The most used names are available at the top level (``drifttutor.fit``,
``drifttutor.load_walkthrough``, ...); they are imported on first use, so that
``import drifttutor`` and the command line start quickly.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "HymenopteraDataModule": "drifttutor.data",
    "download_hymenoptera": "drifttutor.data",
    "Classifier": "drifttutor.models",
    "load_backbone": "drifttutor.models",
    "finetune": "drifttutor.training",
    "load_or_finetune": "drifttutor.training",
    "fit": "drifttutor.fitting",
    "extract_features": "drifttutor.fitting",
    "load_walkthrough": "drifttutor.pipeline",
    "default_device": "drifttutor.pipeline",
    "KernelMMDDriftDetector": "drifttutor.detectors",
    "KSDriftDetector": "drifttutor.detectors",
    "PCAReducer": "drifttutor.detectors",
    "kernel_mmd": "drifttutor.detectors",
    "make_corruption": "drifttutor.corruptions",
    "DriftDetectionExperiment": "drifttutor.experiments",
    "DriftMonitor": "drifttutor.monitoring",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'drifttutor' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)

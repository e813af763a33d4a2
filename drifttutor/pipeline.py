"""The walkthrough's standard objects in one call: data, trained classifier, reference features.

Notebooks 3 onwards start with ``setup = load_walkthrough()``: it loads what earlier notebooks
cached (the trained head, the reference features) and rebuilds whatever is missing, so each
notebook runs on its own from a fresh kernel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytorch_lightning as pl
import torch

from .cache import load_or_compute_tensor
from .data import HymenopteraDataModule
from .fitting import extract_features
from .models import DEFAULT_BACKBONE, Classifier, FeatureExtractor
from .training import load_or_finetune


def default_device() -> torch.device:
    """CUDA when a GPU is available, otherwise the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_or_extract_reference_features(
    datamodule: HymenopteraDataModule,
    feature_extractor: FeatureExtractor,
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Features of the training images seen through the evaluation transform (cached).

    These are what drift detectors are fitted on: the images the model learned from, viewed the
    same way (resize and centre crop) as the incoming images will be.
    """
    return load_or_compute_tensor(
        f"reference-features-{feature_extractor.name}",
        lambda: extract_features(datamodule.reference_dataloader(), feature_extractor, progress=progress),
        cache_dir=cache_dir,
    )


@dataclass
class Walkthrough:
    """What notebooks 3 onwards build on."""

    datamodule: HymenopteraDataModule
    classifier: Classifier
    reference_features: torch.Tensor
    device: torch.device

    @property
    def feature_extractor(self) -> FeatureExtractor:
        return self.classifier.feature_extractor


def load_walkthrough(
    *,
    data_root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    backbone: str = DEFAULT_BACKBONE,
    device: torch.device | str | None = None,
    progress: bool = True,
    seed: int | None = 0,
) -> Walkthrough:
    """Data module, finetuned classifier (on ``device``) and reference features, cached or rebuilt.

    Rebuilding draws random numbers (training shuffles and augments), so with ``seed`` set the
    random generators are seeded again at the end: what a notebook does next is the same whether
    or not anything had to be rebuilt.
    """
    device = torch.device(device) if device is not None else default_device()
    datamodule = HymenopteraDataModule(data_root)
    classifier = load_or_finetune(datamodule, backbone=backbone, cache_dir=cache_dir, progress=progress).classifier
    classifier.to(device).eval()
    reference = load_or_extract_reference_features(datamodule, classifier.feature_extractor, cache_dir=cache_dir, progress=progress)
    if seed is not None:
        pl.seed_everything(seed, workers=True, verbose=False)
    return Walkthrough(datamodule, classifier, reference.to(device), device)

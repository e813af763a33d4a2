"""An untrained, randomly initialised convolutional encoder: the baseline feature extractor.

Rabanser, Günnemann & Lipton ("Failing Loudly: An Empirical Study of Methods for Detecting Dataset
Shift", NeurIPS 2019) reduce images to a few features with the encoder half of an autoencoder
that was never trained ("UAE") and test those features for shift; on their small (32 px) images
it did about as well as features from a trained network. TorchDrift's detector comparison tried
the same on 224 px ants and bees and found it much weaker than pretrained features. Notebook
``06_compare_detectors`` repeats that comparison with the encoder built here.
"""

from __future__ import annotations

import torch
from torch import nn

from ._checks import check
from .models import FeatureExtractor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def untrained_encoder(*, out_features: int = 32, width: int = 16, seed: int = 0) -> FeatureExtractor:
    """A seeded random conv encoder: images in [0, 1] (N, 3, H, W) → ``out_features`` features.

    Three 5x5 convolutions with stride 2 and ReLU (``width``, ``2 * width`` and ``4 * width``
    channels), max-pooling to an 8 x 8 grid and a linear map to ``out_features``, with He (Kaiming)
    normal weights and zero biases drawn from a generator seeded with ``seed``, so every call with
    the same seed builds the same encoder. This is the layout of TorchDrift's comparison with
    1/8 of its channels (16-32-64 instead of 128-256-1024): about 80 times fewer multiply-adds,
    so it runs quickly on a CPU. Inputs are normalised with the ImageNet mean and standard deviation, as TorchDrift
    did. The encoder is frozen and in eval mode, like the pretrained backbones.
    """
    check(isinstance(out_features, int) and out_features >= 1, f"out_features must be a positive int, got {out_features!r}.")
    check(isinstance(width, int) and width >= 1, f"width must be a positive int, got {width!r}.")
    body = nn.Sequential(
        nn.Conv2d(3, width, kernel_size=5, stride=2, padding=2),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, kernel_size=5, stride=2, padding=2),
        nn.ReLU(),
        nn.Conv2d(2 * width, 4 * width, kernel_size=5, stride=2, padding=2),
        nn.ReLU(),
        nn.AdaptiveMaxPool2d(8),
        nn.Flatten(),
        nn.Linear(4 * width * 8 * 8, out_features),
    )
    generator = torch.Generator().manual_seed(seed)
    for layer in body:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu", generator=generator)
            nn.init.zeros_(layer.bias)
    return FeatureExtractor(
        body, feature_size=out_features, mean=IMAGENET_MEAN, std=IMAGENET_STD, name=f"untrained_encoder_s{seed}"
    )

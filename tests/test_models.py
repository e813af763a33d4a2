"""Tests for drifttutor.models: backbones, freezing, input checks, predict, and the real ImageNet weights."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import ResNet18_Weights

from drifttutor import models as M
from drifttutor.data import ImageFiles
from drifttutor.models import DEFAULT_BACKBONE, Classifier, WeightsUnavailableError, load_backbone
from drifttutor.training import make_trainer, quiet_lightning

IMAGENET_BEE, IMAGENET_ANT = 309, 310


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    """An untrained classifier on the default backbone (the tests below must leave it in eval mode)."""
    torch.manual_seed(0)
    return Classifier().eval()


def images(n: int = 2, size: int = 224, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- torch hub cache, kept in tmp_path and off the network ---------------------------------------


def _no_network(*args, **kwargs):
    raise urllib.error.URLError("network access is not allowed in the tests")


@pytest.fixture
def hub_dir(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache in tmp_path; any download attempt fails at once."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # as if torch.hub.set_dir() was never called
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    assert Path(torch.hub.get_dir()) == tmp_path / "torch" / "hub"
    return Path(torch.hub.get_dir())


def resnet18_checkpoint_name() -> str:
    name = ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    assert name == "resnet18-f37072fd.pth"
    return name


# --- backbones ------------------------------------------------------------------------------------------------


def test_default_backbone_gives_1280_features():
    extractor, size = load_backbone()
    assert DEFAULT_BACKBONE == "efficientnet_lite0"
    assert size == extractor.feature_size == 1280
    assert extractor(images(3)).shape == (3, 1280)
    assert extractor(images(1, size=160)).shape == (1, 1280)  # any size from 32 px up


def test_large_cpu_batches_go_through_the_backbone_in_chunks_with_the_same_features(classifier):
    batch = images(M.CPU_CHUNK_SIZE + 3, size=64)
    with torch.inference_mode():
        chunked = classifier.feature_extractor(batch)
        one_by_one = torch.cat([classifier.feature_extractor(image[None]) for image in batch])
    assert chunked.shape == (M.CPU_CHUNK_SIZE + 3, 1280)
    torch.testing.assert_close(chunked, one_by_one, rtol=1e-4, atol=1e-5)


def test_resnet18_from_a_filled_hub_cache_gives_512_features(hub_dir):
    checkpoints = hub_dir / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), checkpoints / resnet18_checkpoint_name())

    extractor, size = load_backbone("resnet18")
    assert size == extractor.feature_size == 512
    assert extractor.name == "resnet18"
    assert extractor(images(2)).shape == (2, 512)
    assert torch.allclose(extractor.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    assert torch.allclose(extractor.std.flatten(), torch.tensor([0.229, 0.224, 0.225]))
    assert not any(p.requires_grad for p in extractor.parameters())
    assert Classifier("resnet18").head.in_features == 512


def test_resnet18_without_weights_or_network_says_what_to_do(hub_dir):
    with pytest.raises(WeightsUnavailableError) as info:
        load_backbone("resnet18")
    message = str(info.value)
    assert ResNet18_Weights.IMAGENET1K_V1.url in message  # where to get the file
    assert str(hub_dir / "checkpoints" / resnet18_checkpoint_name()) in message  # where to put it
    assert "TORCH_HOME" in message
    assert f"load_backbone('{DEFAULT_BACKBONE}')" in message
    assert not any((hub_dir / "checkpoints").glob("*.pth"))


@pytest.mark.parametrize("make", [load_backbone, Classifier])
def test_unknown_backbone_lists_the_choices(make):
    with pytest.raises(ValueError, match="Unknown backbone 'vgg16'") as info:
        make("vgg16")
    for name in M.BACKBONES:
        assert repr(name) in str(info.value)


@pytest.mark.parametrize("kwargs, match", [({"num_classes": 1}, "num_classes"), ({"lr": 0}, "learning rate")])
def test_classifier_rejects_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Classifier(**kwargs)


# --- frozen backbone ------------------------------------------------------------------------------------------


class ModeProbe:
    """Records, at every training step, whether anything in the backbone is in training mode."""

    def __init__(self) -> None:
        self.backbone_training: list[bool] = []
        self.head_training: list[bool] = []


def test_backbone_stays_frozen_and_in_eval_mode_through_fit(small_datamodule):
    import pytorch_lightning as pl

    probe = ModeProbe()

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            probe.backbone_training.append(any(m.training for m in pl_module.feature_extractor.modules()))
            probe.head_training.append(pl_module.head.training)

    dm = small_datamodule
    dm.train_dataset = ImageFiles(dm.train_dataset.samples[::2], dm.train_dataset.transform)  # 31 images
    dm.val_dataset = ImageFiles(dm.val_dataset.samples[::3], dm.val_dataset.transform)  # 9 images
    torch.manual_seed(0)
    model = Classifier()
    assert not any(p.requires_grad for p in model.feature_extractor.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    backbone_before = {k: v.clone() for k, v in model.feature_extractor.state_dict().items()}
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    assert any("running_mean" in k for k in backbone_before)  # there are batch-norm statistics to watch

    with quiet_lightning():
        trainer = make_trainer(epochs=1, progress=False, callbacks=[Probe()])
        trainer.fit(model, datamodule=dm)

    assert probe.backbone_training and not any(probe.backbone_training)
    assert all(probe.head_training)
    assert not any(p.requires_grad for p in model.feature_extractor.parameters())
    backbone_after = model.feature_extractor.state_dict()
    assert backbone_after.keys() == backbone_before.keys()
    changed = [k for k in backbone_before if not torch.equal(backbone_before[k], backbone_after[k].cpu())]
    assert changed == []
    assert any(not torch.equal(head_before[k], v.cpu()) for k, v in model.head.state_dict().items())


def test_train_mode_switch_keeps_the_backbone_in_eval(classifier):
    classifier.train()
    try:
        assert classifier.training and classifier.head.training
        assert not any(m.training for m in classifier.feature_extractor.modules())
    finally:
        classifier.eval()
    assert not classifier.training


# --- input checks -------------------------------------------------------------------------------------------------

NORMALISED = (images(2) - 0.5) / 0.25


@pytest.mark.parametrize(
    "bad, match",
    [
        ((images(2) * 255).to(torch.uint8), r"floating-point.*uint8.*images\.float\(\) / 255"),
        (NORMALISED, r"values in \[0, 1\].*do not normalise"),
        (images(1)[0], r"4 dimensions.*images\.unsqueeze\(0\)"),
        (images(2)[:, :1], r"RGB batches of shape \(N, 3, H, W\).*\(2, 1, 224, 224\)"),
        (torch.rand(2, 4, 224, 224), r"RGB batches.*\(2, 4, 224, 224\)"),
        (torch.rand(2, 3, 16, 16), r"H, W >= 32"),
        (torch.full((1, 3, 64, 64), float("nan")), r"values in \[0, 1\]"),
        (images(1).numpy(), r"must be a torch\.Tensor.*ndarray"),
    ],
    ids=["uint8", "normalised", "single-image", "grey", "rgba", "tiny", "nan", "numpy"],
)
def test_forward_rejects_bad_images_with_an_actionable_message(classifier, bad, match):
    with pytest.raises(ValueError, match=match):
        classifier(bad)
    with pytest.raises(ValueError, match=match):
        classifier.predict(bad)
    assert not classifier.training
    classifier.train()
    try:
        with pytest.raises(ValueError, match=match):
            classifier.predict(bad)
        assert classifier.training  # a failed predict leaves the mode as it was, too
    finally:
        classifier.eval()


def test_forward_accepts_the_edges_of_the_unit_range(classifier):
    batch = torch.cat([torch.zeros(1, 3, 64, 64), torch.ones(1, 3, 64, 64)])
    assert classifier(batch).shape == (2, 2)
    assert classifier(batch.double()).shape == (2, 2)


# --- predict --------------------------------------------------------------------------------------------------------


def test_predict_returns_labels_and_keeps_the_training_flag(classifier):
    batch = images(5)
    labels = classifier.predict(batch)
    assert labels.shape == (5,) and labels.dtype == torch.int64
    assert set(labels.tolist()) <= {0, 1}
    assert torch.equal(labels, classifier(batch).argmax(dim=1))
    assert not classifier.training

    classifier.train()
    try:
        assert torch.equal(classifier.predict(batch), labels)
        assert classifier.training and classifier.head.training
        assert not any(m.training for m in classifier.feature_extractor.modules())
    finally:
        classifier.eval()


def test_classifier_is_head_on_features(classifier):
    batch = images(3)
    features = classifier.feature_extractor(batch)
    assert torch.allclose(classifier(batch), classifier.head(features), atol=1e-6)
    assert isinstance(classifier.head, nn.Linear) and classifier.head.out_features == 2


# --- the real ImageNet weights --------------------------------------------------------------------------------------


def test_efficientnet_weights_are_the_real_imagenet_ones(classifier, datamodule):
    """ImageNet's own 'ant' and 'bee' classes already tell our val images apart.

    Random or missing weights would score about 50%; the package vendor reports 97% on the whole
    val split. This also checks that the feature vector is exactly what the ImageNet head reads.
    """
    val = datamodule.val_dataset
    ants = [i for i, label in enumerate(val.targets) if label == 0][::4][:12]
    bees = [i for i, label in enumerate(val.targets) if label == 1][::4][:12]
    batch = torch.stack([val[i][0] for i in ants + bees])
    labels = torch.tensor([0] * len(ants) + [1] * len(bees))

    network = classifier.feature_extractor.body.network
    with torch.no_grad():
        logits = network((batch - 0.5) / 0.5)
        features = classifier.feature_extractor(batch)
    assert logits.shape == (24, 1000)
    says_bee = logits[:, IMAGENET_BEE] > logits[:, IMAGENET_ANT]
    accuracy = (says_bee.long() == labels).float().mean().item()
    assert accuracy >= 0.85, f"ImageNet ant-vs-bee accuracy {accuracy:.2f}: are the pretrained weights loaded?"

    # The extractor's features are the network's penultimate layer: its own classifier reproduces the logits.
    assert torch.allclose(network._fc(features), logits, atol=1e-3, rtol=1e-3)

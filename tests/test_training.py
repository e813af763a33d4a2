"""Tests for drifttutor.training: finetuning, the cache of trained heads, and saving/loading results."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from drifttutor import cache as C
from drifttutor import training as T
from drifttutor.data import HymenopteraDataModule
from drifttutor.models import Classifier
from drifttutor.training import FinetuneResult, finetune, load_or_finetune, load_result, save_result


def batch_of(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All of a (small) dataset as one batch."""
    return torch.stack([dataset[i][0] for i in range(len(dataset))]), torch.tensor(dataset.targets)


def accuracy(classifier: Classifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (classifier.predict(images) == labels).float().mean().item()


def no_finetune(*args, **kwargs):
    raise AssertionError("finetune() was called although the result is cached")


class FakeFinetune:
    """Stands in for finetune(): returns a given result at once and records its arguments."""

    def __init__(self, result: FinetuneResult) -> None:
        self.result = result
        self.calls: list[dict] = []

    def __call__(self, datamodule, **kwargs) -> FinetuneResult:
        self.calls.append(kwargs)
        return self.result


@pytest.fixture(scope="module")
def trained_and_cached(make_small_datamodule, tmp_path_factory) -> tuple[FinetuneResult, Path]:
    """A real 1-epoch finetune on the small data module, made through load_or_finetune, and its cache file."""
    cache = tmp_path_factory.mktemp("cache")
    datamodule = make_small_datamodule()
    datamodule.batch_size = 8  # 8 steps in the epoch: enough to learn, on 61 images
    result = load_or_finetune(datamodule, epochs=1, seed=0, cache_dir=cache, progress=False)
    (path,) = cache.iterdir()
    return result, path


@pytest.fixture
def trained(trained_and_cached) -> FinetuneResult:
    return trained_and_cached[0]


@pytest.fixture
def cache(trained_and_cached, tmp_path) -> Path:
    """A cache folder of this test's own, holding the file the 1-epoch finetune wrote."""
    folder = tmp_path / "cache"
    folder.mkdir()
    shutil.copy2(trained_and_cached[1], folder)
    return folder


def test_short_finetune_learns(small_datamodule, trained):
    images, labels = batch_of(small_datamodule.val_dataset)  # 26 images, both classes
    pl.seed_everything(0, verbose=False)
    untrained = Classifier().eval()  # the head finetune() started from (same seed, same order)
    before = accuracy(untrained, images, labels)
    after = accuracy(trained.classifier, images, labels)
    assert after >= 0.75, f"accuracy after one epoch {after:.2f}"
    assert after > before, (before, after)

    assert not trained.classifier.training
    assert [epoch["epoch"] for epoch in trained.history] == [1]
    assert {"train_loss", "train_acc", "val_loss", "val_acc"} <= set(trained.history[0])
    assert set(trained.test_metrics) == {"test_loss", "test_acc"}
    assert trained.test_accuracy == trained.test_metrics["test_acc"] >= 0.7
    assert all(isinstance(value, float) for value in trained.test_metrics.values())


def test_finetune_rejects_zero_epochs(small_datamodule):
    with pytest.raises(ValueError, match="epochs must be at least 1"):
        finetune(small_datamodule, epochs=0)


def test_load_or_finetune_loads_from_the_cache(small_datamodule, trained, cache, monkeypatch):
    (path,) = cache.iterdir()
    assert path.name == f"classifier-efficientnet_lite0-e1-lr0.001-s0-{C.code_fingerprint()}.pt"

    monkeypatch.setattr(T, "finetune", no_finetune)
    loaded = load_or_finetune(small_datamodule, epochs=1, seed=0, cache_dir=cache, progress=False)
    assert loaded.classifier is not trained.classifier
    assert not loaded.classifier.training
    assert loaded.history == trained.history and loaded.test_metrics == trained.test_metrics

    images, _ = batch_of(small_datamodule.test_dataset)
    assert torch.equal(loaded.classifier.predict(images), trained.classifier.predict(images))

    # Loading needs no data at all (a later notebook may not build a data module first).
    assert load_or_finetune(epochs=1, seed=0, cache_dir=cache).test_metrics == trained.test_metrics


def test_cache_file_name_follows_the_hyperparameters(trained, cache, monkeypatch):
    fake = FakeFinetune(trained)
    monkeypatch.setattr(T, "finetune", fake)
    variants = [dict(epochs=2), dict(epochs=1, lr=1e-2), dict(epochs=1, seed=1), dict(epochs=1, backbone="resnet18")]
    for kwargs in variants:
        load_or_finetune(object(), cache_dir=cache, progress=False, **kwargs)
    assert len(fake.calls) == len(variants)  # none of them was served from the first file
    assert [{k: call[k] for k in kwargs} for call, kwargs in zip(fake.calls, variants)] == variants
    names = sorted(path.name for path in cache.iterdir())
    assert len(names) == 1 + len(variants)
    assert all(name.startswith("classifier-") and name.endswith(f"-{C.code_fingerprint()}.pt") for name in names)

    # Same hyperparameters again: served from the cache (the fake's head, saved under each name).
    for kwargs in variants[:3]:
        load_or_finetune(None, cache_dir=cache, **kwargs)
    assert len(fake.calls) == len(variants)

    # Changed code: the old file no longer counts.
    monkeypatch.setattr(C, "code_fingerprint", lambda: "0123456789ab")
    load_or_finetune(object(), epochs=1, seed=0, cache_dir=cache, progress=False)
    assert len(fake.calls) == len(variants) + 1
    assert (cache / "classifier-efficientnet_lite0-e1-lr0.001-s0-0123456789ab.pt").is_file()


def test_retrain_trains_again_and_overwrites_the_cache(trained, cache, monkeypatch):
    (path,) = cache.iterdir()
    retrained = FinetuneResult(trained.classifier, history=[{"epoch": 1, "train_acc": 0.5}], test_metrics={"test_acc": 0.25})
    fake = FakeFinetune(retrained)
    monkeypatch.setattr(T, "finetune", fake)

    result = load_or_finetune(object(), epochs=1, seed=0, cache_dir=cache, retrain=True, progress=False)
    assert result is retrained and len(fake.calls) == 1
    assert [p.name for p in cache.iterdir()] == [path.name]
    assert load_result(path).test_metrics == {"test_acc": 0.25}

    assert load_or_finetune(None, epochs=1, seed=0, cache_dir=cache).test_accuracy == 0.25
    assert len(fake.calls) == 1


def test_save_and_load_result_round_trip(tmp_path):
    torch.manual_seed(1)
    classifier = Classifier(lr=5e-4)
    torch.nn.init.normal_(classifier.head.weight)
    history = [{"epoch": 1, "train_loss": 0.7, "val_acc": 0.6}, {"epoch": 2, "train_loss": 0.4, "val_acc": 0.8}]
    result = FinetuneResult(classifier, history, {"test_acc": 0.9, "test_loss": 0.3})

    path = save_result(result, tmp_path / "nested" / "folder" / "head.pt")
    assert path == tmp_path / "nested" / "folder" / "head.pt" and path.is_file()
    assert path.stat().st_size < 100_000  # the head only, not the backbone

    loaded = load_result(path)
    assert dict(loaded.classifier.hparams) == dict(classifier.hparams)
    assert loaded.classifier.hparams.lr == 5e-4
    assert loaded.history == history and loaded.test_metrics == result.test_metrics
    assert loaded.test_accuracy == 0.9
    for key, value in classifier.head.state_dict().items():
        assert torch.equal(loaded.classifier.head.state_dict()[key], value)
    assert not loaded.classifier.training

    images = torch.rand(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(loaded.classifier(images), classifier.eval()(images), atol=1e-5)


@pytest.mark.slow
def test_full_finetune_reaches_85_percent_on_the_test_split(data_root):
    """The walkthrough's numbers: 3 epochs on all 244 training images, tested on the 51 test images."""
    datamodule = HymenopteraDataModule(data_root, download=False)
    result = finetune(datamodule, epochs=3, seed=0, progress=False)
    assert len(result.history) == 3
    assert result.test_accuracy >= 0.85, f"test accuracy {result.test_accuracy:.3f}"

    # The reported metric is what predict() gives on the test split.
    correct = sum(int((result.classifier.predict(images) == labels).sum()) for images, labels in datamodule.test_dataloader())
    assert correct / len(datamodule.test_dataset) == pytest.approx(result.test_accuracy, abs=1e-6)

"""Finetuning the classifier's head with Lightning, and caching the result for later notebooks.

Each notebook must run on its own from a fresh kernel, yet only ``02_finetune`` should pay for
training: :func:`load_or_finetune` loads the trained head from a cache folder when it is there
and trains (then saves) it when it is not. Introduced in ``notebooks/02_finetune``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch

from ._checks import check
from .cache import cache_path
from .data import HymenopteraDataModule
from .models import DEFAULT_BACKBONE, Classifier


class EpochHistory(pl.Callback):
    """Keeps the epoch-level metrics (losses and accuracies) for a training curve."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
        self.epochs.append({"epoch": trainer.current_epoch + 1, **metrics})


@dataclass
class FinetuneResult:
    """A trained classifier with its per-epoch history and test metrics."""

    classifier: Classifier
    history: list[dict[str, float]] = field(default_factory=list)
    test_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def test_accuracy(self) -> float:
        return self.test_metrics["test_acc"]


@contextlib.contextmanager
def quiet_lightning():
    """Hide Lightning's start-up chatter (device summary, tips) and the warnings that do not apply.

    The backbone is in eval mode on purpose, which Lightning would otherwise warn about.
    """
    names = ("pytorch_lightning.utilities.rank_zero", "pytorch_lightning.accelerators.cuda", "lightning_fabric.utilities.seed")
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def make_trainer(*, epochs: int, progress: bool = True, callbacks: list | None = None) -> pl.Trainer:
    """A quiet Lightning trainer on the best available device (CUDA when present, else CPU)."""
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        num_sanity_val_steps=0,
        callbacks=callbacks or [],
    )


def finetune(
    datamodule: HymenopteraDataModule,
    *,
    backbone: str = DEFAULT_BACKBONE,
    epochs: int = 3,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> FinetuneResult:
    """Train a linear head on a frozen backbone for ``epochs`` epochs, then test it.

    Seeded (``seed``), so the same machine gives the same head and the same numbers each time.
    """
    check(epochs >= 1, f"epochs must be at least 1, got {epochs}.")
    pl.seed_everything(seed, workers=True, verbose=False)
    classifier = Classifier(backbone, lr=lr)
    history = EpochHistory()
    with quiet_lightning():
        trainer = make_trainer(epochs=epochs, progress=progress, callbacks=[history])
        trainer.fit(classifier, datamodule=datamodule)
        (test_metrics,) = trainer.test(classifier, datamodule=datamodule, verbose=False)
    classifier.eval()
    return FinetuneResult(classifier, history.epochs, {k: float(v) for k, v in test_metrics.items()})


def save_result(result: FinetuneResult, path: str | os.PathLike) -> Path:
    """Save the trained head (not the backbone, which is reloaded from its weights), history and metrics."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "hparams": dict(result.classifier.hparams),
        "head": result.classifier.head.state_dict(),
        "history": result.history,
        "test_metrics": result.test_metrics,
    }
    torch.save(state, path)
    return path


def load_result(path: str | os.PathLike) -> FinetuneResult:
    """Rebuild a classifier from a file written by :func:`save_result`."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    classifier = Classifier(**state["hparams"])
    classifier.head.load_state_dict(state["head"])
    classifier.eval()
    return FinetuneResult(classifier, state["history"], state["test_metrics"])


def load_or_finetune(
    datamodule: HymenopteraDataModule | None = None,
    *,
    backbone: str = DEFAULT_BACKBONE,
    epochs: int = 3,
    lr: float = 1e-3,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    retrain: bool = False,
    progress: bool = True,
) -> FinetuneResult:
    """The finetuned classifier from the cache folder, or trained now (and cached) if missing.

    The cache file is named by backbone, epochs, learning rate, seed and code fingerprint, not by
    the data: it assumes the standard data module (pass ``cache_dir`` of your own when training on
    other data). ``retrain=True`` always trains and overwrites the cached head.
    """
    path = cache_path(f"classifier-{backbone}-e{epochs}-lr{lr:g}-s{seed}", cache_dir)
    if path.exists() and not retrain:
        return load_result(path)
    result = finetune(datamodule or HymenopteraDataModule(), backbone=backbone, epochs=epochs, lr=lr, seed=seed, progress=progress)
    save_result(result, path)
    return result

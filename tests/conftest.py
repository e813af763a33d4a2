"""Shared fixtures for the data, model and training tests.

The ants-vs-bees data is found through ``$DRIFTTUTOR_DATA`` (CI sets it), falling back to the
``shared/data`` folder next to the repository. Tests that need it are skipped, with a message,
when it is not there. Nothing here downloads anything or writes outside ``tmp_path``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from drifttutor.data import DATA_ENV_VAR, DATASET_FOLDER, HymenopteraDataModule, ImageFiles

DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"


def _data_root() -> Path:
    from_env = os.environ.get(DATA_ENV_VAR)
    return Path(from_env).expanduser().resolve() if from_env else DEFAULT_DATA_ROOT


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The folder that holds ``hymenoptera_data/`` (skips the test when the data is absent)."""
    root = _data_root()
    if not (root / DATASET_FOLDER / "train").is_dir() or not (root / DATASET_FOLDER / "val").is_dir():
        pytest.skip(f"ants-vs-bees data not found in {root}; set {DATA_ENV_VAR} to the folder holding {DATASET_FOLDER}/")
    return root


@pytest.fixture(scope="session")
def datamodule(data_root: Path) -> HymenopteraDataModule:
    """The full data module, shared by the read-only tests (no worker processes, no download)."""
    return HymenopteraDataModule(data_root, batch_size=16, num_workers=0, download=False)


def subset(dataset: ImageFiles, step: int) -> ImageFiles:
    """Every ``step``-th sample of ``dataset`` (both classes kept: samples are sorted by class)."""
    return ImageFiles(dataset.samples[::step], dataset.transform)


@pytest.fixture(scope="session")
def make_small_datamodule(data_root: Path):
    """A factory of fresh data modules cut down to a few dozen images per split, for quick training runs.

    Train keeps every 4th image (61), val every 4th (26) and test every 3rd (17), each with both classes.
    """

    def make() -> HymenopteraDataModule:
        dm = HymenopteraDataModule(data_root, batch_size=16, num_workers=0, download=False)
        dm.train_dataset = subset(dm.train_dataset, 4)
        dm.val_dataset = subset(dm.val_dataset, 4)
        dm.test_dataset = subset(dm.test_dataset, 3)
        return dm

    return make


@pytest.fixture
def small_datamodule(make_small_datamodule) -> HymenopteraDataModule:
    """A fresh small data module (see ``make_small_datamodule``); tests may cut it down further."""
    return make_small_datamodule()

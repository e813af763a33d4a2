"""Shared fixtures for the data, model and training tests.

The ants-vs-bees data is found through ``$DRIFTTUTOR_DATA`` (``make test`` and CI set it), falling
back to the ``shared/data`` folder next to the repository. When that folder lacks the data, it is
downloaded there once (the real download path); offline, tests that need it are skipped with the
download error's message. Nothing else here writes outside ``tmp_path``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from drifttutor.data import DATA_ENV_VAR, DataNotFoundError, HymenopteraDataModule, ImageFiles, download_hymenoptera

DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"


def _data_root() -> Path:
    from_env = os.environ.get(DATA_ENV_VAR)
    return Path(from_env).expanduser().resolve() if from_env else DEFAULT_DATA_ROOT


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The folder that holds ``hymenoptera_data/`` (skips the test when the data is absent)."""
    root = _data_root()
    try:
        download_hymenoptera(root)  # does nothing when the data is there
    except DataNotFoundError as error:
        pytest.skip(str(error))
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


@pytest.fixture(scope="module")
def one_thread():
    """Many tiny tensor ops run faster and steadier on one thread on a busy 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

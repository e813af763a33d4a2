"""The ants-vs-bees ("hymenoptera") data: finding or downloading it, and a Lightning data module.

Images leave the data pipeline as un-normalised float tensors in [0, 1]: normalisation happens
inside the model (see :mod:`drifttutor.models`), so that a corruption such as a blur can be
applied to raw pixels, as a camera would produce them. Introduced in ``notebooks/01_load_data``.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Callable, Sequence

import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torch.utils.data.dataloader import default_collate
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes
from torchvision.transforms import v2 as transforms

from ._checks import check

HYMENOPTERA_URL = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"
DATA_ENV_VAR = "DRIFTTUTOR_DATA"
DATASET_FOLDER = "hymenoptera_data"
CLASSES = ("ants", "bees")

Transform = Callable[[torch.Tensor], torch.Tensor]


class DataNotFoundError(RuntimeError):
    """The data set is neither on disk nor downloadable (for example, no network)."""


def resolve_data_root(data_root: str | os.PathLike | None = None) -> Path:
    """The folder that holds (or will hold) ``hymenoptera_data/``.

    An explicit ``data_root`` wins, then the environment variable ``DRIFTTUTOR_DATA``, then
    ``./data``: one rule, so notebooks, tests and the command line all find the same copy.
    """
    if data_root is not None:
        return Path(data_root).expanduser()
    from_env = os.environ.get(DATA_ENV_VAR)
    if from_env:
        return Path(from_env).expanduser()
    return Path("data")


def _is_complete(dataset_dir: Path) -> bool:
    return all((dataset_dir / split / name).is_dir() for split in ("train", "val") for name in CLASSES)


def download_hymenoptera(data_root: str | os.PathLike | None = None, *, url: str = HYMENOPTERA_URL) -> Path:
    """Return the path of ``hymenoptera_data/``, downloading and extracting the archive if needed.

    Does nothing when the extracted folder is already there. Uses torchvision's download
    utilities; a local ``file://`` URL (a copy of the archive on disk) works as well.
    """
    import urllib.parse
    import urllib.request

    from torchvision.datasets.utils import download_and_extract_archive, extract_archive

    root = resolve_data_root(data_root)
    dataset_dir = root / DATASET_FOLDER
    if _is_complete(dataset_dir):
        return dataset_dir
    parts = urllib.parse.urlsplit(url)
    archive = root / os.path.basename(parts.path)
    try:
        root.mkdir(parents=True, exist_ok=True)
        if parts.scheme == "file":
            # torchvision's downloader reads ``response.length``, which only HTTP responses have.
            urllib.request.urlretrieve(url, archive)
            extract_archive(str(archive), str(root), remove_finished=True)
        else:
            download_and_extract_archive(url, download_root=str(root), remove_finished=True)
    except Exception as error:  # network errors come in many types (URLError, OSError, HTTPError)
        retry = ""
        if archive.is_file() and not zipfile.is_zipfile(archive):
            # An interrupted download leaves a truncated file that torchvision would take as
            # downloaded next time (there is no checksum to compare with), so remove it.
            archive.unlink()
            retry = f" Removed the incomplete download {archive.name}; run again to retry."
        raise DataNotFoundError(
            f"Could not find the ants-vs-bees data in {dataset_dir.resolve()} and could not download it "
            f"from {url} ({type(error).__name__}: {error}).{retry} Download and unzip that archive "
            f"yourself into {root.resolve()}, or set the environment variable {DATA_ENV_VAR} to a "
            f"folder that contains '{DATASET_FOLDER}/'."
        ) from error
    check(
        _is_complete(dataset_dir),
        f"The archive from {url} was extracted into {root.resolve()}, but {dataset_dir} does not hold "
        "train/ and val/ with ants/ and bees/ inside; is it the right archive?",
        DataNotFoundError,
    )
    return dataset_dir


def train_transform() -> Transform:
    """Augmentation for training: a random crop of random scale and a horizontal flip (224 px)."""
    return transforms.Compose([
        transforms.ToImage(),
        transforms.RandomResizedCrop(224, antialias=True),
        transforms.RandomHorizontalFlip(),
        transforms.ToDtype(torch.float32, scale=True),
    ])


def eval_transform() -> Transform:
    """Deterministic view for evaluation and drift detection: resize to 256, centre-crop 224."""
    return transforms.Compose([
        transforms.ToImage(),
        transforms.Resize(256, antialias=True),
        transforms.CenterCrop(224),
        transforms.ToDtype(torch.float32, scale=True),
    ])


class ImageFiles(Dataset):
    """(image, label) pairs from a list of files; each file is decoded once and kept in memory.

    Decoding JPEGs is a large share of the time on a laptop CPU, and the data set is small
    (about 60 MB decoded), so caching the decoded RGB images makes every later epoch cheaper.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Transform | None = None) -> None:
        self.samples = list(samples)
        self.transform = transform
        self._decoded: dict[int, Image.Image] = {}

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def with_transform(self, transform: Transform | None) -> "ImageFiles":
        """The same files (and decoded-image cache) seen through another transform."""
        view = ImageFiles(self.samples, transform)
        view._decoded = self._decoded
        return view

    def load_image(self, index: int) -> Image.Image:
        if index not in self._decoded:
            with Image.open(self.samples[index][0]) as image:
                self._decoded[index] = image.convert("RGB")
        return self._decoded[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.load_image(index)
        return (self.transform(image) if self.transform else image), self.samples[index][1]


def list_images(split_dir: Path) -> list[tuple[str, int]]:
    """Sorted (path, label) pairs of the decodable images in ``split_dir/<class>/``.

    The official archive holds one placeholder GIF (``train/ants/imageNotFound.gif``); only the
    usual photo formats count, so it is skipped.
    """
    classes, class_to_idx = find_classes(str(split_dir))
    check(
        list(classes) == list(CLASSES),
        f"{split_dir} should contain the class folders {CLASSES}, found {classes}.",
        DataNotFoundError,
    )
    samples = []
    for name in classes:
        for path in sorted((split_dir / name).iterdir()):
            if path.suffix.lower() in IMG_EXTENSIONS:
                samples.append((str(path), class_to_idx[name]))
    check(len(samples) > 0, f"No images found in {split_dir}; is the data folder complete?", DataNotFoundError)
    return samples


def split_per_class(
    samples: Sequence[tuple[str, int]], *, fraction: float, seed: int
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Split ``samples`` into (kept, held_out), holding out ``fraction`` of each class at random.

    Done per class with a fixed seed, so the split keeps the class balance and is the same on
    every machine. Used to carve a test split out of the official val split.
    """
    generator = torch.Generator().manual_seed(seed)
    kept, held_out = [], []
    for label in sorted({label for _, label in samples}):
        members = [sample for sample in samples if sample[1] == label]
        order = torch.randperm(len(members), generator=generator).tolist()
        n_held_out = round(fraction * len(members))
        held_out += [members[i] for i in sorted(order[:n_held_out])]
        kept += [members[i] for i in sorted(order[n_held_out:])]
    return kept, held_out


def default_num_workers() -> int:
    """Data loader worker processes: one fewer than the CPU cores (at least 0, at most 4).

    The model itself needs a core; on the 2-core laptops this targets, one worker decodes the
    next batch while the main process runs the network.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cores - 1))


class CollateWithTransform:
    """Collate a batch, then apply ``additional_transform`` to the image tensor (drift on the fly)."""

    def __init__(self, additional_transform: Transform | None = None) -> None:
        self.additional_transform = additional_transform

    def __call__(self, batch: list) -> list:
        images, *rest = default_collate(batch)
        if self.additional_transform is not None:
            images = self.additional_transform(images)
        return [images, *rest]


class HymenopteraDataModule(pl.LightningDataModule):
    """Ants vs bees as a Lightning data module: train (244), val (102) and test (51) images.

    The official archive has only train/ and val/; the test split is a fixed, class-balanced third
    of the official val images. Pass ``parent=`` and ``additional_transform=`` to derive a module
    that shares the parent's data but transforms every image batch (for example, blurs it): this
    is how drifted data is made on the fly.
    """

    def __init__(
        self,
        data_root: str | os.PathLike | None = None,
        *,
        batch_size: int | None = None,
        num_workers: int | None = None,
        split_seed: int = 0,
        download: bool = True,
        parent: "HymenopteraDataModule | None" = None,
        additional_transform: Transform | None = None,
    ) -> None:
        super().__init__()
        if parent is not None:  # a derived module loads like its parent unless told otherwise
            check(isinstance(parent, HymenopteraDataModule), "parent must be a HymenopteraDataModule.")
            batch_size = parent.batch_size if batch_size is None else batch_size
            num_workers = parent.num_workers if num_workers is None else num_workers
            split_seed = parent.split_seed
        batch_size = 32 if batch_size is None else batch_size
        check(batch_size >= 1, f"batch_size must be a positive integer, got {batch_size}.")
        check(
            additional_transform is None or callable(additional_transform),
            f"additional_transform must be callable (an image batch in, an image batch out), got {additional_transform!r}.",
        )
        self.batch_size = batch_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.split_seed = split_seed
        self.additional_transform = additional_transform
        if parent is not None:
            self.dataset_dir = parent.dataset_dir
            self.train_dataset, self.val_dataset, self.test_dataset = parent.train_dataset, parent.val_dataset, parent.test_dataset
            return
        root = resolve_data_root(data_root)
        self.dataset_dir = download_hymenoptera(root) if download else root / DATASET_FOLDER
        check(
            _is_complete(self.dataset_dir),
            f"{self.dataset_dir.resolve()} does not hold the ants-vs-bees data (train/ and val/, each with "
            f"ants/ and bees/). Pass download=True, or point {DATA_ENV_VAR} at a folder containing '{DATASET_FOLDER}/'.",
            DataNotFoundError,
        )
        train = list_images(self.dataset_dir / "train")
        val, test = split_per_class(list_images(self.dataset_dir / "val"), fraction=1 / 3, seed=split_seed)
        self.train_dataset = ImageFiles(train, train_transform())
        self.val_dataset = ImageFiles(val, eval_transform())
        self.test_dataset = ImageFiles(test, eval_transform())

    def _loader(self, dataset: Dataset, *, batch_size: int | None = None, shuffle: bool = False, sampler=None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size or self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=CollateWithTransform(self.additional_transform),
        )

    def train_dataloader(self) -> DataLoader:
        """Augmented training images, shuffled."""
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset)

    def reference_dataloader(self, batch_size: int | None = None) -> DataLoader:
        """Training images seen through the evaluation transform (no augmentation), in order.

        Fit drift detectors on these: incoming images are centre-cropped, so a reference made of
        random crops and flips would itself look drifted.
        """
        return self._loader(self.train_dataset.with_transform(eval_transform()), batch_size=batch_size)

    def default_dataloader(
        self, batch_size: int | None = None, num_samples: int | None = None, shuffle: bool = True
    ) -> DataLoader:
        """Batches of validation images: the "incoming" data in the drift notebooks.

        With ``num_samples`` the images are drawn with replacement, so any number of batches
        (of any size) can be made from the 102 validation images.
        """
        check(num_samples is None or num_samples >= 1, f"num_samples must be positive, got {num_samples}.")
        sampler = None
        if shuffle or num_samples is not None:
            sampler = RandomSampler(self.val_dataset, replacement=num_samples is not None, num_samples=num_samples)
        return self._loader(self.val_dataset, batch_size=batch_size, sampler=sampler)

"""Tests for drifttutor.data: the split, the loaders, the derived (drifted) module, download and errors."""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
import zipfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from drifttutor import data as D
from drifttutor.data import (
    CLASSES,
    DATA_ENV_VAR,
    HYMENOPTERA_URL,
    DataNotFoundError,
    HymenopteraDataModule,
    download_hymenoptera,
    eval_transform,
    list_images,
    resolve_data_root,
)

ANTS, BEES = CLASSES.index("ants"), CLASSES.index("bees")


def fingerprint(image: torch.Tensor) -> str:
    """Identifies an image tensor (equal pixels, equal fingerprint)."""
    return hashlib.sha1(image.contiguous().numpy().tobytes()).hexdigest()


def drain(loader) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """All (image batch, label batch) pairs of ``loader``."""
    images, labels = [], []
    for batch in loader:
        images.append(batch[0])
        labels.append(batch[1])
    return images, labels


def check_batch(images: torch.Tensor, labels: torch.Tensor) -> None:
    assert images.dtype == torch.float32
    assert images.dim() == 4 and images.shape[1:] == (3, 224, 224)
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    assert labels.dtype == torch.int64 and labels.shape == (images.shape[0],)
    assert set(labels.tolist()) <= {ANTS, BEES}


# --- the split -----------------------------------------------------------------------------------


def test_split_sizes(datamodule):
    assert len(datamodule.train_dataset) == 244
    assert len(datamodule.val_dataset) == 102
    assert len(datamodule.test_dataset) == 51


def test_split_keeps_the_class_balance(datamodule):
    official = Counter(label for _, label in list_images(datamodule.dataset_dir / "val"))
    val = Counter(datamodule.val_dataset.targets)
    test = Counter(datamodule.test_dataset.targets)
    for label in (ANTS, BEES):
        assert val[label] + test[label] == official[label]
        # A third of each class is held out for test: val:test is about 2:1 within every class.
        assert abs(val[label] - 2 * test[label]) <= 2, (label, val[label], test[label])
        assert test[label] == round(official[label] / 3)
    assert set(Counter(datamodule.train_dataset.targets)) == {ANTS, BEES}


def test_split_is_deterministic_disjoint_and_complete(data_root, datamodule):
    again = HymenopteraDataModule(data_root, num_workers=0, download=False)
    for name in ("train_dataset", "val_dataset", "test_dataset"):
        assert getattr(again, name).samples == getattr(datamodule, name).samples

    val = {path for path, _ in datamodule.val_dataset.samples}
    test = {path for path, _ in datamodule.test_dataset.samples}
    official = {path for path, _ in list_images(datamodule.dataset_dir / "val")}
    assert not val & test
    assert val | test == official
    assert len(official) == 153

    other = HymenopteraDataModule(data_root, num_workers=0, download=False, split_seed=1)
    assert other.test_dataset.samples != datamodule.test_dataset.samples
    assert len(other.test_dataset) == 51 and len(other.val_dataset) == 102
    assert other.train_dataset.samples == datamodule.train_dataset.samples  # only val/test are re-split


def test_gif_placeholder_is_skipped(datamodule):
    gif = datamodule.dataset_dir / "train" / "ants" / "imageNotFound.gif"
    if not gif.exists():
        pytest.skip("this copy of the data set has no GIF placeholder")
    files_on_disk = sum(1 for split in ("train", "val") for name in CLASSES
                        for path in (datamodule.dataset_dir / split / name).iterdir() if path.is_file())
    assert files_on_disk == 398
    paths = [path for dataset in (datamodule.train_dataset, datamodule.val_dataset, datamodule.test_dataset)
             for path, _ in dataset.samples]
    assert str(gif) not in paths
    assert not any(path.lower().endswith(".gif") for path in paths)
    assert len(paths) == 397


# --- loaders ---------------------------------------------------------------------------------------


def test_reference_dataloader_yields_eval_transformed_train_images_in_order(datamodule):
    """Every train image decodes (nothing trips on the GIF) and comes out in file order, un-augmented."""
    images, labels = drain(datamodule.reference_dataloader(batch_size=64))
    assert [len(batch) for batch in images] == [64, 64, 64, 52]
    for batch, batch_labels in zip(images, labels):
        check_batch(batch, batch_labels)
    assert torch.cat(labels).tolist() == datamodule.train_dataset.targets

    transform = eval_transform()
    for index in (0, 1, 150, 243):
        path, _ = datamodule.train_dataset.samples[index]
        with Image.open(path) as image:
            expected = transform(image.convert("RGB"))
        assert torch.equal(images[index // 64][index % 64], expected)
    # The training transform of the module itself is untouched (still augments).
    assert datamodule.train_dataset.transform is not datamodule.reference_dataloader().dataset.transform


@pytest.mark.parametrize("loader", ["train_dataloader", "val_dataloader", "test_dataloader", "default_dataloader"])
def test_batches_are_float_images_in_unit_range(datamodule, loader):
    images, labels = next(iter(getattr(datamodule, loader)()))
    check_batch(images, labels)
    assert len(images) == datamodule.batch_size


def test_val_and_test_loaders_are_in_order(datamodule):
    for loader, dataset in ((datamodule.val_dataloader(), datamodule.val_dataset),
                            (datamodule.test_dataloader(), datamodule.test_dataset)):
        _, labels = drain(loader)
        assert torch.cat(labels).tolist() == dataset.targets


def test_default_dataloader_without_num_samples_gives_every_val_image_once(datamodule):
    expected = Counter(fingerprint(datamodule.val_dataset[i][0]) for i in range(len(datamodule.val_dataset)))
    assert len(expected) == 102  # all distinct

    images, labels = drain(datamodule.default_dataloader(batch_size=40))
    assert [len(batch) for batch in images] == [40, 40, 22]
    assert Counter(fingerprint(image) for image in torch.cat(images)) == expected
    assert Counter(torch.cat(labels).tolist()) == Counter(datamodule.val_dataset.targets)

    images, _ = drain(datamodule.default_dataloader(batch_size=40, shuffle=False))
    assert [fingerprint(image) for image in torch.cat(images)] == [
        fingerprint(datamodule.val_dataset[i][0]) for i in range(102)]


def test_default_dataloader_with_num_samples_draws_with_replacement(datamodule):
    known = {fingerprint(datamodule.val_dataset[i][0]) for i in range(len(datamodule.val_dataset))}
    loader = datamodule.default_dataloader(batch_size=16, num_samples=150)
    assert loader.sampler.replacement
    images, labels = drain(loader)
    assert [len(batch) for batch in images] == [16] * 9 + [6]
    for batch, batch_labels in zip(images, labels):
        check_batch(batch, batch_labels)
    drawn = [fingerprint(image) for image in torch.cat(images)]
    assert len(drawn) == 150  # more than the 102 val images: some are drawn twice
    assert set(drawn) <= known
    assert len(set(drawn)) < 150

    # Any number, even fewer than a batch, and with the module's own batch size by default.
    images, _ = drain(datamodule.default_dataloader(num_samples=5))
    assert [len(batch) for batch in images] == [5]


def test_default_dataloader_rejects_a_non_positive_num_samples(datamodule):
    with pytest.raises(ValueError, match="num_samples must be positive"):
        datamodule.default_dataloader(num_samples=0)


# --- the derived (drifted) module ----------------------------------------------------------------------


class Invert:
    """A stand-in corruption that counts its calls."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        assert images.dim() == 4, "the additional transform must see whole batches"
        self.batch_sizes.append(len(images))
        return 1.0 - images


def test_derived_module_shares_data_and_transforms_every_batch(datamodule):
    invert = Invert()
    drifted = HymenopteraDataModule(parent=datamodule, additional_transform=invert,
                                    batch_size=datamodule.batch_size, num_workers=0)
    assert drifted.train_dataset is datamodule.train_dataset
    assert drifted.val_dataset is datamodule.val_dataset
    assert drifted.test_dataset is datamodule.test_dataset
    assert drifted.dataset_dir == datamodule.dataset_dir

    clean, clean_labels = drain(datamodule.val_dataloader())
    shifted, shifted_labels = drain(drifted.val_dataloader())
    assert invert.batch_sizes == [len(batch) for batch in clean]
    for a, b, la, lb in zip(clean, shifted, clean_labels, shifted_labels):
        assert torch.equal(b, 1.0 - a)
        assert torch.equal(la, lb)

    invert.batch_sizes.clear()
    images, _ = next(iter(drifted.default_dataloader(batch_size=8, num_samples=8)))
    assert invert.batch_sizes == [8]
    reference, _ = next(iter(drifted.reference_dataloader(batch_size=4)))
    clean_reference, _ = next(iter(datamodule.reference_dataloader(batch_size=4)))
    assert torch.equal(reference, 1.0 - clean_reference)
    for loader in (drifted.train_dataloader(), drifted.test_dataloader()):
        invert.batch_sizes.clear()
        next(iter(loader))
        assert len(invert.batch_sizes) == 1

    # The parent is untouched.
    again, _ = next(iter(datamodule.val_dataloader()))
    assert torch.equal(again, clean[0])


def test_derived_module_needs_a_callable_and_a_data_module(datamodule):
    with pytest.raises(ValueError, match="additional_transform must be callable"):
        HymenopteraDataModule(parent=datamodule, additional_transform="blur")
    with pytest.raises(ValueError, match="parent must be a HymenopteraDataModule"):
        HymenopteraDataModule(parent=object(), additional_transform=Invert())


# --- finding the data ------------------------------------------------------------------------------------


def test_resolve_data_root_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(DATA_ENV_VAR, raising=False)
    assert resolve_data_root() == Path("data")
    assert resolve_data_root().resolve() == tmp_path / "data"

    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path / "from-env"))
    assert resolve_data_root() == tmp_path / "from-env"
    assert resolve_data_root(tmp_path / "explicit") == tmp_path / "explicit"
    assert resolve_data_root(str(tmp_path / "explicit")) == tmp_path / "explicit"

    monkeypatch.setenv(DATA_ENV_VAR, "")  # empty counts as unset
    assert resolve_data_root() == Path("data")
    assert resolve_data_root("~/somewhere") == Path.home() / "somewhere"


def fake_tree(root: Path, *, per_class: dict[str, int]) -> Path:
    """``root/hymenoptera_data/{train,val}/{ants,bees}/*.jpg`` made of tiny PIL JPEGs."""
    for split, count in per_class.items():
        for label, name in enumerate(CLASSES):
            folder = root / "hymenoptera_data" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                colour = (40 + 150 * label, 20 * i, 100)
                Image.new("RGB", (64 + 8 * i, 48), colour).save(folder / f"{name}{i}.jpg", quality=90)
    return root / "hymenoptera_data"


def zip_folder(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, path.relative_to(folder.parent))
    return archive


def test_download_from_a_local_archive_then_no_op(tmp_path):
    source = fake_tree(tmp_path / "source", per_class={"train": 2, "val": 3})
    archive = zip_folder(source, tmp_path / "hymenoptera_data.zip")
    root = tmp_path / "root"

    dataset_dir = download_hymenoptera(root, url=archive.as_uri())
    assert dataset_dir == root / "hymenoptera_data"
    for split, count in (("train", 2), ("val", 3)):
        for name in CLASSES:
            assert sorted(p.name for p in (dataset_dir / split / name).iterdir()) == [f"{name}{i}.jpg" for i in range(count)]
    assert not (root / "hymenoptera_data.zip").exists()  # the archive is removed after extraction

    # Already there: nothing is fetched, so even a URL that cannot work is fine.
    assert download_hymenoptera(root, url="file:///nonexistent/bogus.zip") == dataset_dir

    # And the data module works on it: 2 of the 3 val images of each class stay in val, 1 goes to test.
    dm = HymenopteraDataModule(root, batch_size=4, num_workers=0)
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (4, 4, 2)
    images, labels = next(iter(dm.default_dataloader(num_samples=4)))
    check_batch(images, labels)


def test_download_of_the_wrong_archive_is_reported(tmp_path):
    (tmp_path / "source" / "something").mkdir(parents=True)
    (tmp_path / "source" / "something" / "readme.txt").write_text("not the data")
    archive = zip_folder(tmp_path / "source" / "something", tmp_path / "other.zip")
    with pytest.raises(DataNotFoundError, match="is it the right archive"):
        download_hymenoptera(tmp_path / "root", url=archive.as_uri())


def test_an_interrupted_download_is_removed_so_that_the_next_run_retries(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    partial = root / "hymenoptera_data.zip"
    partial.write_bytes(b"PK\x03\x04 the first bytes of a zip, and then the connection dropped")
    # The file is there, so torchvision takes it as downloaded (no checksum) and fails to unzip it.
    with pytest.raises(DataNotFoundError, match="Removed the incomplete download hymenoptera_data.zip"):
        download_hymenoptera(root, url=HYMENOPTERA_URL)
    assert not partial.exists()


def test_missing_data_without_network_names_url_folder_and_env_var(tmp_path):
    root = tmp_path / "nothing-here"
    url = "file:///nonexistent.zip"
    with pytest.raises(DataNotFoundError) as info:
        download_hymenoptera(root, url=url)
    message = str(info.value)
    assert url in message
    assert str((root / "hymenoptera_data").resolve()) in message
    assert DATA_ENV_VAR in message


def test_data_module_without_network_raises_data_not_found(tmp_path, monkeypatch):
    """The official URL, with the network "down": urlopen fails before any connection is made."""
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataNotFoundError) as info:
        HymenopteraDataModule(tmp_path / "data", num_workers=0)
    message = str(info.value)
    assert HYMENOPTERA_URL in message and DATA_ENV_VAR in message and str(tmp_path / "data") in message


@pytest.mark.parametrize("layout", ["empty", "no-val", "no-bees", "no-images", "extra-class"])
def test_data_module_on_an_incomplete_folder_raises_data_not_found(tmp_path, layout):
    dataset_dir = tmp_path / "hymenoptera_data"
    tmp_path.joinpath("placeholder").touch()
    if layout != "empty":
        fake_tree(tmp_path, per_class={"train": 1, "val": 3})
    if layout == "no-val":
        for name in CLASSES:
            for path in (dataset_dir / "val" / name).iterdir():
                path.unlink()
            (dataset_dir / "val" / name).rmdir()
        (dataset_dir / "val").rmdir()
    elif layout == "no-bees":
        for path in (dataset_dir / "train" / "bees").iterdir():
            path.unlink()
        (dataset_dir / "train" / "bees").rmdir()
    elif layout == "no-images":
        for path in dataset_dir.rglob("*.jpg"):
            path.unlink()
    elif layout == "extra-class":
        (dataset_dir / "val" / "wasps").mkdir()
        fake_tree_image = dataset_dir / "val" / "wasps" / "w.jpg"
        Image.new("RGB", (32, 32)).save(fake_tree_image)

    with pytest.raises(DataNotFoundError) as info:
        HymenopteraDataModule(tmp_path, num_workers=0, download=False)
    message = str(info.value)
    if layout in ("empty", "no-val", "no-bees"):
        assert str(dataset_dir.resolve()) in message and DATA_ENV_VAR in message
    elif layout == "no-images":
        assert "No images found" in message
    else:
        assert "wasps" in message


def test_num_workers_default_leaves_a_core_for_the_model():
    workers = D.default_num_workers()
    assert 0 <= workers <= 4

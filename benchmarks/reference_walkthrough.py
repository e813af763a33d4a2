"""The reference walkthrough, done the straightforward way with TorchDrift and Lightning.

This is the baseline that ``bench_walkthrough.py`` times ``drifttutor walkthrough`` against. It
follows the steps of TorchDrift's example notebook "Drift detection on images" (our own code, not
the notebook's text):

1. a Lightning data module over the ants-vs-bees images (augmented train loader, evaluation-view
   val and test loaders; every image is decoded from its JPEG each time it is used);
2. a Lightning module with a frozen ImageNet backbone and a linear head, trained 3 epochs on the
   augmented train loader (validating after each epoch), then tested;
3. drift simulated with TorchDrift's ``gaussian_blur`` applied to whole batches in the loader
   (clamped to [0, 1], see :func:`blur`);
4. ``torchdrift.utils.fit`` of a TorchDrift ``KernelMMDDriftDetector`` on the (augmented) train
   loader;
5. score and p-value (``compute_p_value``) of a benign and a blurred batch of validation images;
6. scikit-learn's ``Isomap`` fitted on the reference features, one scatter plot per batch.

Two things differ from the notebook, so that the comparison is like for like: the backbone is
EfficientNet-Lite0 from ``drifttutor.models.load_backbone`` (the notebook's ResNet18 weights cannot
be downloaded here; the wrapper normalises inside ``forward`` and uses channels-last), and the
images and the val/test split are drifttutor's (``drifttutor.data``). Run it in the environment
that has TorchDrift (``.venv-bench``)::

    DRIFTTUTOR_DATA=../shared/data .venv-bench/bin/python benchmarks/reference_walkthrough.py --output /tmp/reference
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

START = time.perf_counter()

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchdrift  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.manifold import Isomap  # noqa: E402
from torch.utils.data import DataLoader, Dataset, RandomSampler  # noqa: E402
from torch.utils.data.dataloader import default_collate  # noqa: E402
from torchvision import transforms  # noqa: E402

from drifttutor.data import default_num_workers, list_images, resolve_data_root, split_per_class  # noqa: E402
from drifttutor.models import load_backbone  # noqa: E402

TRAIN_TRANSFORM = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor()])
VAL_TRANSFORM = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()])


def blur(images, severity):
    """TorchDrift's Gaussian blur, clamped: its rounding can leave values a hair above 1, which
    drifttutor's feature extractor rejects (TorchDrift's own notebook had no such check)."""
    return torchdrift.data.functional.gaussian_blur(images, severity=severity).clamp(0, 1)


class ImageList(Dataset):
    """(image, label) pairs from a list of files, decoded from disk every time, like ImageFolder."""

    def __init__(self, samples, transform):
        self.samples, self.transform = samples, transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        with Image.open(path) as image:
            return self.transform(image.convert("RGB")), label


class OurDataModule(pl.LightningDataModule):
    """Train / val / test loaders; ``parent`` + ``additional_transform`` make a drifted copy."""

    def __init__(self, root=None, *, parent=None, additional_transform=None, batch_size=32, num_workers=0):
        super().__init__()
        self.batch_size, self.num_workers, self.additional_transform = batch_size, num_workers, additional_transform
        if parent is not None:
            self.train_ds, self.val_ds, self.test_ds = parent.train_ds, parent.val_ds, parent.test_ds
            return
        folder = resolve_data_root(root) / "hymenoptera_data"
        val, test = split_per_class(list_images(folder / "val"), fraction=1 / 3, seed=0)
        self.train_ds = ImageList(list_images(folder / "train"), TRAIN_TRANSFORM)
        self.val_ds, self.test_ds = ImageList(val, VAL_TRANSFORM), ImageList(test, VAL_TRANSFORM)

    def collate_fn(self, batch):
        images, labels = default_collate(batch)
        if self.additional_transform is not None:
            images = self.additional_transform(images)
        return images, labels

    def _loader(self, dataset, **kwargs):
        kwargs.setdefault("batch_size", self.batch_size)
        return DataLoader(dataset, num_workers=self.num_workers, collate_fn=self.collate_fn, **kwargs)

    def train_dataloader(self):
        return self._loader(self.train_ds, shuffle=True)

    def val_dataloader(self):
        return self._loader(self.val_ds)

    def test_dataloader(self):
        return self._loader(self.test_ds)

    def default_dataloader(self, batch_size=None, num_samples=None, shuffle=True):
        replacement = num_samples is not None
        sampler = RandomSampler(self.val_ds, replacement=replacement, num_samples=num_samples) if shuffle else None
        return self._loader(self.val_ds, batch_size=batch_size or self.batch_size, sampler=sampler)


class Classifier(pl.LightningModule):
    """Frozen backbone + trainable linear head (the backbone stays in eval mode)."""

    def __init__(self, backbone="efficientnet_lite0"):
        super().__init__()
        self.backbone, feature_size = load_backbone(backbone)
        self.classifier = torch.nn.Linear(feature_size, 2)

    def train(self, mode=True):
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, x):
        return self.classifier(self.backbone(x))

    def _step(self, batch, stage):
        x, y = batch
        y_hat = self(x)
        loss = F.cross_entropy(y_hat, y)
        self.log(f"{stage}_loss", loss, prog_bar=True)
        self.log(f"{stage}_acc", (y_hat.argmax(1) == y).float().mean(), prog_bar=True)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def configure_optimizers(self):
        return torch.optim.Adam(self.classifier.parameters(), lr=1e-3)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", help="folder holding hymenoptera_data/ (default: $DRIFTTUTOR_DATA, else ./data)")
    parser.add_argument("--output", default="reference-output", help="folder for the figures and metrics.json")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--severity", type=int, default=2)
    parser.add_argument("--sample-size", type=int, default=50)
    parser.add_argument("--num-workers", type=int, default=default_num_workers())
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(args.seed)
    timings = {}

    # Train the classifier.
    t = time.perf_counter()
    datamodule = OurDataModule(args.data_root, num_workers=args.num_workers)
    model = Classifier()
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="auto", devices=1, default_root_dir=output)
    trainer.fit(model, datamodule)
    (test_metrics,) = trainer.test(model, datamodule=datamodule)
    timings["train_and_test"] = time.perf_counter() - t

    # Simulated drift: TorchDrift's Gaussian blur on whole batches.
    ood_datamodule = OurDataModule(parent=datamodule, additional_transform=functools.partial(blur, severity=args.severity), num_workers=args.num_workers)

    # Fit the detector on the (augmented) training loader.
    t = time.perf_counter()
    feature_extractor = model.backbone
    drift_detector = torchdrift.detectors.KernelMMDDriftDetector()
    torchdrift.utils.fit(datamodule.train_dataloader(), feature_extractor, drift_detector)
    timings["fit_detector"] = time.perf_counter() - t

    # Test a benign and a drifted batch; draw their Isomap pictures.
    t = time.perf_counter()
    mapper = Isomap(n_components=2)
    base_embedded = mapper.fit_transform(drift_detector.base_outputs)
    batches = {}
    for name, dm in (("benign", datamodule), ("drifted", ood_datamodule)):
        inputs, _ = next(iter(dm.default_dataloader(batch_size=args.sample_size, shuffle=True)))
        with torch.no_grad():
            features = feature_extractor(inputs)
            score = drift_detector(features)
            p_value = drift_detector.compute_p_value(features)
        batches[name] = {"images": len(inputs), "score": float(score), "p_value": float(p_value)}
        features_embedded = mapper.transform(features)
        fig, ax = plt.subplots()
        ax.scatter(base_embedded[:, 0], base_embedded[:, 1], s=2, c="r")
        ax.scatter(features_embedded[:, 0], features_embedded[:, 1], s=4)
        ax.set_title(f"{name}: score {score:.2f} p-value {p_value:.2f}")
        fig.savefig(output / f"isomap_{name}.png")
        plt.close(fig)
    timings["test_batches_and_figures"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - START

    metrics = {"test_accuracy": float(test_metrics["test_acc"]), "batches": batches, "timings_s": timings, "num_workers": args.num_workers}
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()

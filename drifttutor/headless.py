"""The walkthrough without Jupyter: every step in one function, quick on a laptop CPU.

:func:`run_walkthrough` does what the walkthrough notebooks do, top to bottom: find the ants-vs-bees data,
load the backbone, train the linear head, fit a kernel MMD detector on reference features, test a
benign and a drifted batch of validation images, and draw the Isomap pictures. It writes
``report.md``, the figures and ``metrics.json`` to an output folder (:mod:`drifttutor.report`) and
returns the metrics. The ``drifttutor walkthrough`` command (:mod:`drifttutor.cli`) is a thin
layer over it.

It is built to be quick on a laptop CPU, which changes *how* two steps are done (not what they
mean), as the report says too:

- Each image is decoded, resized and centre-cropped (``data.eval_transform``) once, kept as
  uint8, and sent through the backbone once: the training images' features serve both to train
  the head and as the detector's ``reference_features``.
- The head is trained with Adam on those cached features of the *un-augmented* training images,
  not with Lightning on randomly cropped and flipped ones as in ``notebooks/02_finetune``. It is
  the same ``Classifier.head``, and its test accuracy stays above 0.85 (0.96 with the defaults).

The backbone runs as a :func:`fast_inference_copy` (batch norms and paddings folded into the
convolutions, exact up to float rounding, checked at run time). Features of the training and test images are cached
(``drifttutor.cache``), so a second run, say with another corruption, only computes the two
test batches.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2 as transforms
from tqdm.auto import tqdm

from . import __version__
from ._checks import check
from .cache import load_or_compute_tensor
from .corruptions import SEVERITIES, Corruption, list_corruptions
from .data import HymenopteraDataModule, eval_transform
from .detectors import KernelMMDDriftDetector
from .models import BACKBONES, DEFAULT_BACKBONE, Classifier, FeatureExtractor
from .pipeline import default_device
from .report import REPORT_NAME, save_figure, versions, write_report
from .viz import fit_isomap, label_names, plot_embedding, show_images


@dataclass(frozen=True)
class WalkthroughOptions:
    """Everything :func:`run_walkthrough` can be told (the command line's options, same defaults)."""

    output: str = "walkthrough-output"
    data_root: str | None = None
    download: bool = True
    backbone: str = DEFAULT_BACKBONE
    epochs: int = 10
    lr: float = 1e-3
    corruption: str = "gaussian_blur"
    severity: int = 2
    sample_size: int = 50
    n_perm: int = 1000
    alpha: float = 0.05
    seed: int = 0
    batch_size: int = 32
    device: str | None = None
    cache_dir: str | None = None
    use_cache: bool = True
    progress: bool = True
    fast_backbone: bool = True

    def check(self) -> "WalkthroughOptions":
        """Raise a ``ValueError`` that says what to change if an option is out of range."""
        check(self.backbone in BACKBONES, f"unknown backbone {self.backbone!r}; choose one of: {', '.join(BACKBONES)}.")
        check(self.corruption in list_corruptions(), f"unknown corruption {self.corruption!r}; choose one of: {', '.join(list_corruptions())}.")
        check(self.severity in SEVERITIES, f"severity must be an integer from 1 (mild) to 5 (severe), got {self.severity!r}.")
        check(self.sample_size >= 2, f"sample size must be at least 2 (a two-sample test compares batches), got {self.sample_size}.")
        check(self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}.")
        check(self.lr > 0, f"the learning rate must be positive, got {self.lr}.")
        check(self.n_perm >= 1, f"the number of permutations must be positive (try 1000), got {self.n_perm}.")
        check(0 < self.alpha < 1, f"alpha (the significance level) must be between 0 and 1, got {self.alpha}.")
        check(self.batch_size >= 1, f"batch size must be positive, got {self.batch_size}.")
        return self


class _Stopwatch:
    """Seconds spent in each named stage, in order."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


def _eval_view() -> transforms.Compose:
    """``data.eval_transform()`` without its final float conversion: 224 px uint8 images.

    uint8 takes a quarter of the memory; :func:`_as_floats` converts a batch at a time.
    """
    return transforms.Compose([t for t in eval_transform().transforms if not isinstance(t, transforms.ToDtype)])


def _as_floats(images: torch.Tensor) -> torch.Tensor:
    return transforms.functional.to_dtype(images, torch.float32, scale=True)


def load_eval_views(paths: list[str], *, progress: bool = True, desc: str = "images") -> torch.Tensor:
    """Decode, resize and centre-crop each image once: a uint8 batch (N, 3, 224, 224).

    Decoding runs in a few threads (Pillow releases the GIL while it decodes).
    """
    from PIL import Image

    view = _eval_view()

    def load(path: str) -> torch.Tensor:
        with Image.open(path) as image:
            return view(image.convert("RGB"))

    workers = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
    with ThreadPoolExecutor(max(1, workers)) as pool:
        views = list(tqdm(pool.map(load, paths), total=len(paths), desc=desc, unit="img", disable=not progress))
    return torch.stack(views)


def fast_inference_copy(feature_extractor: FeatureExtractor) -> FeatureExtractor | None:
    """A copy of a frozen ``feature_extractor`` that computes the same features in less time.

    Two rewrites, each exact up to float rounding (about 20% and 10% less CPU time together on
    EfficientNet-Lite0): a batch norm right after a convolution is, in eval mode, an affine map per
    channel, so it is folded into the convolution's weights and bias; and a convolution that first
    pads its input by the same amount on opposite sides (``static_padding``, TensorFlow's "same"
    padding in EfficientNet ports) pads inside the convolution instead, without copying the input.
    Batch-norm pairs are found as consecutive children (a ``Conv2d`` registered just before a
    ``BatchNorm2d`` of as many channels); since registration order need not be data-flow order,
    the copy is compared with the original on random images, and ``None`` is returned if they differ.
    """
    fast = copy.deepcopy(feature_extractor)

    def visit(module: nn.Module) -> None:
        children = list(module.named_children())
        for (_, conv), (bn_name, bn) in itertools.pairwise(children):
            if isinstance(conv, nn.Conv2d) and type(bn) is nn.BatchNorm2d and bn.num_features == conv.out_channels and bn.track_running_stats:
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                bias = bn.bias - bn.running_mean * scale + (0 if conv.bias is None else conv.bias * scale)
                conv.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1), requires_grad=False)
                conv.bias = nn.Parameter(bias, requires_grad=False)
                setattr(module, bn_name, nn.Identity())
        padding = getattr(module, "static_padding", None)
        if isinstance(module, nn.Conv2d) and isinstance(padding, nn.ZeroPad2d) and module.padding == (0, 0) and module.padding_mode == "zeros":
            left, right, top, bottom = padding.padding
            if left == right and top == bottom:
                module.padding, module.static_padding = (top, left), nn.Identity()
        for _, child in children:
            visit(child)

    with torch.no_grad():
        visit(fast.body)
    fast.to(memory_format=torch.channels_last).eval()
    probe = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(next(fast.parameters()).device)
    # Compare in full float32: TF32 convolutions (the default on recent GPUs) round too coarsely.
    with torch.inference_mode(), torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
        expected, actual = feature_extractor(probe), fast(probe)
    close = torch.allclose(actual, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()))
    return fast if close else None


def extract(
    images: torch.Tensor, feature_extractor: FeatureExtractor, *, batch_size: int, device: torch.device, progress: bool = True, desc: str = "features"
) -> torch.Tensor:
    """Features (N, D), on ``device``, of images (N, 3, H, W): uint8, or floats in [0, 1]."""
    outputs = []
    with torch.inference_mode():
        for batch in tqdm(images.split(batch_size), desc=desc, unit="batch", disable=not progress):
            outputs.append(feature_extractor(_as_floats(batch.to(device))))
    return torch.cat(outputs)  # concatenated outside inference mode: an ordinary tensor


def train_head(
    head: nn.Linear, features: torch.Tensor, labels: torch.Tensor, *, epochs: int, lr: float, batch_size: int, seed: int, progress: bool = True
) -> list[float]:
    """Train ``head`` with Adam on (features, labels), shuffled minibatches; mean loss per epoch.

    The notebooks train the same head with Lightning on augmented images; training on cached
    features of the un-augmented images is the fast alternative (no backbone pass per epoch).
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    head.train()
    losses = []
    for _ in tqdm(range(epochs), desc="train head", unit="epoch", disable=not progress):
        total = 0.0
        for indices in torch.randperm(len(features), generator=generator).split(batch_size):
            indices = indices.to(features.device)
            loss = F.cross_entropy(head(features[indices]), labels[indices])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(indices)
        losses.append(total / len(features))
    head.eval()
    return losses


def _data_fingerprint(samples: list[tuple[str, int]]) -> str:
    """Short hash of the image files (relative names, sizes, labels), so a changed data set is not mistaken for a cached one."""
    digest = hashlib.sha256()
    for path, label in samples:
        digest.update(f"{Path(path).parent.name}/{Path(path).name}:{os.path.getsize(path)}:{label};".encode())
    return digest.hexdigest()[:10]


def run_walkthrough(options: WalkthroughOptions | None = None, *, command: str | None = None) -> dict:
    """Run the whole walkthrough, write its report, figures and metrics, and return the metrics.

    Raises ``drifttutor.data.DataNotFoundError`` when the data is missing and cannot be
    downloaded, and ``ValueError`` for options out of range. ``command`` (the command line, if
    any) is quoted in the report so the run can be repeated.
    """
    options = (options or WalkthroughOptions()).check()
    progress, clock = options.progress, _Stopwatch()
    device = torch.device(options.device) if options.device else default_device()
    output = Path(options.output)
    started = time.perf_counter()

    def step(message: str) -> None:
        if progress:
            tqdm.write(message, file=sys.stderr)

    step("Find the data")
    with clock("find_data"):
        datamodule = HymenopteraDataModule(options.data_root, download=options.download, num_workers=0)
        train, val, test = datamodule.train_dataset.samples, datamodule.val_dataset.samples, datamodule.test_dataset.samples
    check(
        options.sample_size <= len(val),
        f"sample size must be at most {len(val)}, the number of validation images the batches are drawn from, got {options.sample_size}.",
    )

    step(f"Load the backbone ({options.backbone})")
    with clock("load_backbone"):
        torch.manual_seed(options.seed)  # the head's initial weights
        classifier = Classifier(options.backbone, lr=options.lr).eval()
        classifier.to(device)
        feature_extractor: FeatureExtractor = classifier.feature_extractor
        fast = fast_inference_copy(feature_extractor) if options.fast_backbone else None
        if fast is not None:
            classifier.feature_extractor = feature_extractor = fast

    cache_tag = f"{options.backbone}-{hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:8]}-{_data_fingerprint(train + val + test)}"
    cache_status = {}

    def split_features(name: str, samples: list[tuple[str, int]]) -> torch.Tensor:
        def compute() -> torch.Tensor:
            with clock(f"decode_{name}"):
                images = load_eval_views([path for path, _ in samples], progress=progress, desc=f"decode {name}")
            with clock(f"features_{name}"):
                return extract(images, feature_extractor, batch_size=options.batch_size, device=device, progress=progress, desc=f"features {name}")

        if not options.use_cache:
            cache_status[name] = "not used"
            return compute()
        def compute_and_note() -> torch.Tensor:
            cache_status[name] = "computed"
            return compute()

        cache_status[name] = "loaded"
        features = load_or_compute_tensor(f"walkthrough-{name}-features-{cache_tag}", compute_and_note, cache_dir=options.cache_dir)
        return features.to(device)

    step("Extract features of the training images (the reference) and the test images")
    reference_features = split_features("train", train)
    test_features = split_features("test", test)
    train_labels = torch.tensor([label for _, label in train], device=device)
    test_labels = torch.tensor([label for _, label in test], device=device)

    step(f"Train the head ({options.epochs} epochs of Adam on the cached features)")
    with clock("train_head"):
        losses = train_head(
            classifier.head, reference_features, train_labels,
            epochs=options.epochs, lr=options.lr, batch_size=options.batch_size, seed=options.seed, progress=progress,
        )
        with torch.inference_mode():
            test_accuracy = float((classifier.head(test_features).argmax(1) == test_labels).float().mean())

    step(f"Fit the kernel MMD detector on {len(reference_features)} reference features")
    with clock("fit_detector"):
        detector = KernelMMDDriftDetector(n_perm=options.n_perm, seed=options.seed).to(device).fit(reference_features)

    step(f"Test a benign batch and a drifted batch ({options.corruption}, severity {options.severity}) of {options.sample_size} validation images")
    generator = torch.Generator().manual_seed(options.seed)
    chosen = {name: torch.randperm(len(val), generator=generator)[: options.sample_size] for name in ("benign", "drifted")}
    needed = sorted(set(torch.cat(list(chosen.values())).tolist()))
    with clock("decode_val"):
        decoded = load_eval_views([val[i][0] for i in needed], progress=progress, desc="decode val")
    position = {index: row for row, index in enumerate(needed)}
    corruption = Corruption(options.corruption, options.severity, seed=options.seed)
    batches, examples = {}, {}
    for name, indices in chosen.items():
        with clock(f"test_{name}"):
            images = _as_floats(decoded[[position[i] for i in indices.tolist()]].to(device))
            if name == "drifted":
                images = corruption(images)
            features = extract(images, feature_extractor, batch_size=options.batch_size, device=device, progress=progress, desc=f"features {name}")
            score, p_value = detector.test(features)
            labels = torch.tensor([val[i][1] for i in indices.tolist()], device=device)
            with torch.inference_mode():
                predictions = classifier.head(features).argmax(1)
        examples[name] = (images[:6].cpu(), predictions[:6].cpu(), labels[:6].cpu())
        batches[name] = {
            "images": len(indices),
            "score": float(score),
            "p_value": float(p_value),
            "drift_detected": bool(float(p_value) < options.alpha),
            "accuracy": float((predictions == labels).float().mean()),
            "features": features,
        }

    step("Draw the figures")
    output.mkdir(parents=True, exist_ok=True)
    figures = {}
    with clock("figures"):
        isomap = fit_isomap(reference_features.cpu())
        colors = {"benign": "tab:green", "drifted": "tab:red"}
        for name, batch in batches.items():
            title = f"{name} batch: p-value {batch['p_value']:.3g}"
            figure = plot_embedding(isomap, reference_features.cpu(), batch.pop("features").cpu(), title=title, label=f"{name} batch", color=colors[name])
            figures[f"isomap_{name}"] = save_figure(figure, output / f"isomap_{name}.png")
        titles, title_colors = [], []
        for name, (_, predictions, labels) in examples.items():
            titles += [f"{name}: {predicted}" for predicted in label_names(predictions)]
            title_colors += ["black" if p == t else "tab:red" for p, t in zip(predictions.tolist(), labels.tolist())]
        figure = show_images(torch.cat([images for images, _, _ in examples.values()]), titles, ncols=6, title_colors=title_colors,
                             size=1.6, suptitle="Predicted class (red: wrong); top: benign, bottom: drifted")
        figures["examples"] = save_figure(figure, output / "examples.png")

    clock.seconds["total"] = time.perf_counter() - started
    metrics = {
        "drifttutor_version": __version__,
        "command": command,
        "options": asdict(options),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "data": {"root": str(datamodule.dataset_dir.resolve()), "train_images": len(train), "val_images": len(val), "test_images": len(test)},
        "test_accuracy": test_accuracy,
        "head_training": {
            "method": "Adam on cached features of the un-augmented (eval-transform) training images",
            "epochs": options.epochs,
            "loss_per_epoch": losses,
        },
        "detector": {
            "name": "KernelMMDDriftDetector",
            "n_perm": options.n_perm,
            "reference_size": len(reference_features),
            "lengthscale": detector.lengthscale_,
            "alpha": options.alpha,
        },
        "batches": batches,
        "fast_backbone": fast is not None,
        "cache": cache_status,
        "figures": figures,
        "timings_s": {stage: round(seconds, 3) for stage, seconds in clock.seconds.items()},
        "versions": versions(),
        "report": str(output / REPORT_NAME),
    }
    write_report(metrics, output)
    return metrics



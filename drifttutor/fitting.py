"""Fit drift detectors on reference data: extract features once, then fit reducers and detectors.

After TorchDrift's ``torchdrift.utils.fit``: run the ``feature_extractor`` over a reference
``dataloader`` (no gradients, with a progress bar), concatenate the features and fit each reducer
and detector on them, in order.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from drifttutor._checks import check
from drifttutor.detectors.base import Detector, check_features

FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]


def _module_device(module: Any) -> torch.device | None:
    if isinstance(module, nn.Module):
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            return tensor.device
    return None


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], labels
    raise ValueError(
        "each batch from the dataloader must be a tensor of images or an (images, labels) tuple, "
        f"got {type(batch).__name__}; wrap the dataset so that it yields one of these."
    )


def extract_features(
    dataloader: Iterable[Any],
    feature_extractor: FeatureExtractor,
    *,
    num_batches: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    return_labels: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Run ``feature_extractor`` over ``dataloader`` and return all features (N, D) on the CPU.

    Batches may be image tensors or ``(images, labels)`` tuples; they are moved to ``device``
    (default: the device of the extractor's parameters, else the CPU), and only the first
    ``num_batches`` are used if given. The extractor runs under ``torch.inference_mode`` and, if
    it is an ``nn.Module``, in eval mode (dropout off, batch norm statistics frozen); its previous
    mode is restored afterwards. A ``tqdm.auto`` progress bar (a widget in Jupyter, text
    elsewhere) shows progress unless ``progress=False``. With ``return_labels=True``, returns
    ``(features, labels)``; the batches must then carry labels.
    """
    check(
        num_batches is None or (isinstance(num_batches, int) and num_batches >= 1),
        f"num_batches must be a positive int or None (all batches), got {num_batches!r}.",
    )
    check(callable(feature_extractor), "feature_extractor must be callable, e.g. an nn.Module.")
    if device is None:
        device = _module_device(feature_extractor) or torch.device("cpu")
    total = len(dataloader) if hasattr(dataloader, "__len__") else None  # type: ignore[arg-type]
    if num_batches is not None:
        total = num_batches if total is None else min(total, num_batches)
    batches = itertools.islice(dataloader, num_batches)
    was_training = getattr(feature_extractor, "training", None)
    if isinstance(feature_extractor, nn.Module):
        feature_extractor.eval()
    features: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    try:
        with torch.inference_mode():
            for batch in tqdm(
                batches, total=total, disable=not progress, desc="features", unit="batch"
            ):
                images, batch_labels = _split_batch(batch)
                outputs = feature_extractor(images.to(device))
                got = outputs.shape if isinstance(outputs, torch.Tensor) else type(outputs)
                check(
                    isinstance(outputs, torch.Tensor) and outputs.dim() == 2,
                    f"feature_extractor must return a (batch, D) tensor of features, got {got}; "
                    "end it with nn.Flatten() if it returns feature maps.",
                )
                features.append(outputs.cpu())
                if return_labels:
                    check(
                        batch_labels is not None,
                        "return_labels=True needs (images, labels) batches, but a batch had "
                        "no labels.",
                    )
                    labels.append(batch_labels.cpu())
    finally:
        if isinstance(feature_extractor, nn.Module) and was_training is not None:
            feature_extractor.train(was_training)
    check(len(features) > 0, "the dataloader yielded no batches; check the dataset is not empty.")
    # Concatenating outside inference mode gives ordinary tensors, which can be saved, copied
    # into buffers and used with autograd later.
    all_features = torch.cat(features)
    if return_labels:
        return all_features, torch.cat(labels)
    return all_features


def _flatten(modules: nn.Module | Iterable[nn.Module]) -> list[nn.Module]:
    if isinstance(modules, nn.Module) and not isinstance(modules, (nn.Sequential, nn.ModuleList)):
        return [modules]
    flat: list[nn.Module] = []
    for module in modules:
        flat.extend(_flatten(module))
    return flat


def fit_chain(
    reference_features: torch.Tensor, reducers_and_detectors: nn.Module | Iterable[nn.Module]
) -> None:
    """Fit reducers and detectors in order on ``reference_features`` (N, D).

    Accepts one module, a list, or an ``nn.Sequential`` (nested ones are flattened). Every module
    with a ``fit`` method is fitted on the features that reach it. A reducer (any module that is
    not a ``Detector``) then transforms them for the modules after it, so in
    ``nn.Sequential(PCAReducer(2), KSDriftDetector())`` the detector is fitted on the two principal
    components. A detector leaves them unchanged, so in ``[mmd_detector, ks_detector]`` both are
    fitted on the same features. Features are moved to each module's device.
    """
    features = check_features(reference_features, name="reference_features")
    modules = _flatten(reducers_and_detectors)
    check(len(modules) > 0, "reducers_and_detectors is empty; pass at least one detector.")
    for module in modules:
        check(
            isinstance(module, nn.Module),
            f"reducers_and_detectors must contain nn.Modules, got {type(module).__name__}.",
        )
        device = _module_device(module)
        if device is not None:
            features = features.to(device)
        if hasattr(module, "fit"):
            module.fit(features)
        if not isinstance(module, Detector):
            with torch.no_grad():
                features = module(features)


def fit(
    dataloader: Iterable[Any],
    feature_extractor: FeatureExtractor,
    reducers_and_detectors: nn.Module | Iterable[nn.Module],
    *,
    num_batches: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Extract reference features from ``dataloader`` and fit ``reducers_and_detectors`` on them.

    Runs :func:`extract_features` (same options) and then :func:`fit_chain`; returns the
    reference features (N, D), on the CPU, before any reducer.
    """
    reference_features = extract_features(
        dataloader, feature_extractor, num_batches=num_batches, device=device, progress=progress
    )
    fit_chain(reference_features, reducers_and_detectors)
    return reference_features

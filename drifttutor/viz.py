"""Pictures for the walkthrough: image grids, training curves, drift scores and Isomap embeddings.

Every function draws into a new matplotlib figure and returns it, so a notebook cell stays one
line and the command-line walkthrough can save the same figures to files.
"""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from sklearn.manifold import Isomap
from sklearn.metrics import ConfusionMatrixDisplay

from ._checks import check

CLASS_NAMES = ("ant", "bee")
REFERENCE_STYLE = {"color": "tab:blue", "label": "reference"}


def _as_hwc(image: torch.Tensor) -> np.ndarray:
    return image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def show_images(
    images: torch.Tensor,
    titles: Sequence[str] | None = None,
    *,
    ncols: int = 6,
    title_colors: Sequence[str] | None = None,
    suptitle: str | None = None,
    size: float = 1.7,
) -> Figure:
    """A grid of images (N, 3, H, W) in [0, 1], each with an optional title (e.g. its label)."""
    check(images.dim() == 4, f"images must be a batch (N, C, H, W), got shape {tuple(images.shape)}.")
    n = len(images)
    check(titles is None or len(titles) == n, f"got {n} images but {len(titles or [])} titles.")
    nrows = max(1, -(-n // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + (0.4 if suptitle else 0)), squeeze=False)
    for index, ax in enumerate(axes.flat):
        ax.axis("off")
        if index < n:
            ax.imshow(_as_hwc(images[index]))
            if titles is not None:
                color = title_colors[index] if title_colors is not None else "black"
                ax.set_title(titles[index], fontsize=10, color=color)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def label_names(labels: torch.Tensor | Sequence[int]) -> list[str]:
    """Class indices → "ant" / "bee"."""
    return [CLASS_NAMES[int(label)] for label in labels]


def plot_training_curves(history: Sequence[dict[str, float]]) -> Figure:
    """Loss and accuracy per epoch, training vs validation."""
    epochs = [row["epoch"] for row in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.2))
    for stage, style in (("train", "o-"), ("val", "s--")):
        loss_ax.plot(epochs, [row[f"{stage}_loss"] for row in history], style, label=stage)
        acc_ax.plot(epochs, [row[f"{stage}_acc"] for row in history], style, label=stage)
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="Accuracy", ylim=(0.5, 1.0))
    for ax in (loss_ax, acc_ax):
        ax.set_xticks(epochs)
        ax.legend()
    fig.tight_layout()
    return fig


def plot_confusion_matrix(labels: Sequence[int], predictions: Sequence[int], *, title: str = "Test split") -> Figure:
    """Counts of true vs predicted classes (scikit-learn's ConfusionMatrixDisplay)."""
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    ConfusionMatrixDisplay.from_predictions(
        np.asarray(labels), np.asarray(predictions), display_labels=list(CLASS_NAMES), ax=ax, colorbar=False
    )
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_drift_by_severity(severities: Sequence[int], scores: Sequence[float], p_values: Sequence[float], *, alpha: float = 0.05) -> Figure:
    """Drift score and p-value against corruption severity (0 = clean)."""
    fig, (score_ax, p_ax) = plt.subplots(1, 2, figsize=(9, 3.2))
    score_ax.plot(severities, scores, "o-")
    score_ax.set(xlabel="severity (0 = clean)", ylabel="score (MMD²)", title="Drift score")
    p_ax.semilogy(severities, p_values, "o-", color="tab:red")
    p_ax.axhline(alpha, color="gray", linestyle="--", label=f"alpha = {alpha}")
    p_ax.set(xlabel="severity (0 = clean)", ylabel="p-value (log scale)", title="p-value")
    p_ax.legend()
    for ax in (score_ax, p_ax):
        ax.set_xticks(list(severities))
    fig.tight_layout()
    return fig


def fit_isomap(reference_features: torch.Tensor, *, n_neighbors: int = 10, n_components: int = 2) -> Isomap:
    """Isomap fitted on the reference features; it can then ``transform`` new batches into the same map."""
    check(len(reference_features) > n_neighbors, f"Isomap needs more than n_neighbors={n_neighbors} reference samples, got {len(reference_features)}.")
    return Isomap(n_neighbors=n_neighbors, n_components=n_components).fit(reference_features.cpu().numpy())


def plot_embedding(
    isomap: Isomap,
    reference_features: torch.Tensor,
    features: torch.Tensor,
    *,
    title: str = "",
    label: str = "incoming",
    color: str = "tab:orange",
    ax: plt.Axes | None = None,
) -> Figure:
    """Reference and incoming features in the 2-D Isomap map fitted on the reference."""
    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 4))
    reference_xy = isomap.transform(reference_features.cpu().numpy())
    incoming_xy = isomap.transform(features.cpu().numpy())
    ax.scatter(*reference_xy.T, s=12, alpha=0.5, **REFERENCE_STYLE)
    ax.scatter(*incoming_xy.T, s=24, marker="^", color=color, label=label)
    ax.set(title=title, xticks=[], yticks=[])
    ax.legend(loc="best", fontsize=9)
    ax.figure.tight_layout()
    return ax.figure

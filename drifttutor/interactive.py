"""Explore drift interactively: pick a corruption, a severity and a batch size, see what changes.

:class:`DriftExplorer` corrupts a batch of validation images and reports, for the clean and the
corrupted batch, the classifier's accuracy and the detector's score and p-value, with a picture.
:meth:`DriftExplorer.widget` wraps that in ipywidgets controls; :meth:`DriftExplorer.update` is
the same computation as a plain call, for scripts and tests. Introduced in
``notebooks/08_explore_interactively``.
"""

from __future__ import annotations

from typing import NamedTuple

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure

from ._checks import check
from .corruptions import list_corruptions
from .detectors import Detector
from .experiments import corrupt_images
from .models import Classifier
from .viz import label_names, show_images


class ExplorerView(NamedTuple):
    """What :meth:`DriftExplorer.update` computed for one setting."""

    corruption: str
    severity: int
    sample_size: int
    clean_images: torch.Tensor
    corrupted_images: torch.Tensor
    labels: torch.Tensor
    clean_predictions: torch.Tensor
    predictions: torch.Tensor
    clean_accuracy: float
    accuracy: float
    clean_score: float
    clean_p_value: float
    score: float
    p_value: float


class DriftExplorer:
    """Corrupt the first ``sample_size`` of a fixed, shuffled pool of images and test the batch.

    ``images`` (N, 3, H, W) in [0, 1] and ``labels`` (N,) form the pool; it is shuffled once with
    ``seed``, so a larger sample size adds images to the same batch. ``detector`` must be fitted
    on reference features of ``classifier.feature_extractor``. The clean pool's features are
    computed once, here; each update runs the backbone on the corrupted batch only.
    """

    def __init__(
        self, classifier: Classifier, detector: Detector, images: torch.Tensor, labels: torch.Tensor, *, seed: int = 0
    ) -> None:
        check(len(images) == len(labels) and len(images) >= 2, "images and labels must hold the same number (at least 2) of samples.")
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
        self.classifier = classifier.eval()
        self.detector = detector
        self.images, self.labels = images[order], labels[order]
        self.seed = seed
        self._clean_features = self._features(self.images)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([self.classifier.feature_extractor(chunk.to(self.classifier.device)) for chunk in images.split(32)])

    def _judge(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float, float, float]:
        with torch.inference_mode():
            predictions = self.classifier.head(features).argmax(dim=1).cpu()
            score, p_value = self.detector.test(features.to(self.detector.base_outputs.device))
        return predictions, float((predictions == labels).float().mean()), float(score), float(p_value)

    def update(self, corruption: str, severity: int, sample_size: int) -> ExplorerView:
        """Accuracy, score and p-value of a batch of ``sample_size`` images, clean and corrupted."""
        check(
            isinstance(sample_size, int) and 2 <= sample_size <= len(self.images),
            f"sample_size must be an int from 2 to {len(self.images)}, got {sample_size!r}.",
        )
        clean, labels = self.images[:sample_size], self.labels[:sample_size]
        corrupted = corrupt_images(clean, corruption, severity, seed=self.seed)
        clean_predictions, clean_accuracy, clean_score, clean_p_value = self._judge(self._clean_features[:sample_size], labels)
        predictions, accuracy, score, p_value = self._judge(self._features(corrupted), labels)
        return ExplorerView(
            corruption, severity, sample_size, clean, corrupted, labels, clean_predictions, predictions,
            clean_accuracy, accuracy, clean_score, clean_p_value, score, p_value,
        )

    @staticmethod
    def figure(view: ExplorerView, *, shown: int = 4) -> Figure:
        """The first ``shown`` images clean (top) and corrupted (bottom), titled with the predictions
        (red when wrong), and the batch's accuracy, p-value and score in the title."""
        shown = min(shown, view.sample_size)
        predictions = torch.cat([view.clean_predictions[:shown], view.predictions[:shown]])
        truth = torch.cat([view.labels[:shown], view.labels[:shown]])
        colors = ["black" if p == t else "tab:red" for p, t in zip(predictions, truth)]
        images = torch.cat([view.clean_images[:shown], view.corrupted_images[:shown]])
        figure = show_images(images, label_names(predictions), ncols=shown, title_colors=colors, size=1.5)
        figure.suptitle(
            f"batch of {view.sample_size} images, clean: accuracy {view.clean_accuracy:.2f}, "
            f"p-value {view.clean_p_value:.3f} (score {view.clean_score:.4f})\n"
            f"{view.corruption}, severity {view.severity}: accuracy {view.accuracy:.2f}, "
            f"p-value {view.p_value:.4f} (score {view.score:.4f})",
            fontsize=9,
        )
        figure.tight_layout()
        return figure

    def show(self, corruption: str, severity: int, sample_size: int) -> ExplorerView:
        """Compute a view and display its figure (in a notebook, or in a widget's output area)."""
        from IPython.display import display

        view = self.update(corruption, severity, sample_size)
        figure = self.figure(view)
        display(figure)
        plt.close(figure)  # displayed once; do not let the inline backend show it again
        return view

    def widget(self, *, corruption: str = "gaussian_blur", severity: int = 3, sample_size: int = 20):
        """ipywidgets controls (corruption, severity 1-5, sample size) that redraw the view on change.

        Sliders update when released (``continuous_update=False``), as each update runs the backbone.
        """
        import ipywidgets as widgets

        step = 10 if len(self.images) >= 20 else 1
        controls = {
            "corruption": widgets.Dropdown(options=list_corruptions(), value=corruption, description="corruption"),
            "severity": widgets.IntSlider(value=severity, min=1, max=5, description="severity", continuous_update=False),
            "sample_size": widgets.IntSlider(
                value=sample_size, min=step, max=len(self.images) // step * step, step=step,
                description="sample size", continuous_update=False,
            ),
        }

        def redraw(corruption: str, severity: int, sample_size: int) -> None:
            self.show(corruption, severity, max(2, sample_size))

        return widgets.interactive(redraw, **controls)

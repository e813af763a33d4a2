"""Comparing drift detectors: ROC curves and AUC from many benign and many drifted batches.

A detector is good when its p-values are small on drifted batches and not on benign ones. A
:class:`DriftDetectionExperiment` measures that: it fits the detector on the reference features,
tests ``num_runs`` benign batches (clean incoming images) and ``num_runs`` drifted batches (a share
``ood_ratio`` of corrupted images), and summarises how well the p-values separate the two with
scikit-learn's ROC curve and area under it (AUC: 1 = perfect, 0.5 = guessing). The setting follows
TorchDrift's ``DriftDetectionExperiment`` (Viehmann et al., 2021) and the shift-detection study of
Rabanser, Günnemann & Lipton ("Failing Loudly", NeurIPS 2019).

Unlike TorchDrift, features are extracted once per image: :func:`corrupt_images` and
:func:`build_feature_set` give the features of every clean image and of its corrupted versions
(row i is image i in all of them), and each batch is a draw of row indices (:func:`draw_batches`). A
whole comparison then costs one pass of the network per image, so it runs in seconds on a CPU.
Introduced in ``notebooks/06_compare_detectors``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn
from torch.utils.data import Dataset

from ._checks import check, check_image_batch
from .corruptions import is_randomised, make_corruption
from .detectors import Detector, KernelMMDDriftDetector, KSDriftDetector, PCAReducer
from .fitting import extract_features, fit_chain

RANK_BY = ("p_value", "statistic")


# -- features, once per image ------------------------------------------------------------------


def stack_dataset(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All images (N, C, H, W) and labels (N,) of ``dataset``, in order, as two tensors."""
    items = [dataset[index] for index in range(len(dataset))]  # type: ignore[arg-type]
    return torch.stack([image for image, _ in items]), torch.tensor([label for _, label in items])


def corrupt_images(
    images: torch.Tensor, corruption: str, severity: int, *, seed: int = 0, batch_size: int = 32
) -> torch.Tensor:
    """``images`` with ``corruption`` applied at ``severity``, row for row, in chunks of ``batch_size``.

    Random corruptions (noise) draw from a CPU generator seeded with ``seed``, so the same call
    gives the same corrupted images on every run.
    """
    images = check_image_batch(images)
    generator = torch.Generator().manual_seed(seed) if is_randomised(corruption) else None
    corrupt = make_corruption(corruption, severity, generator=generator)
    return torch.cat([corrupt(chunk) for chunk in images.split(batch_size)])


@dataclass
class FeatureSet:
    """The features one feature_extractor gives: reference, clean incoming and corrupted incoming.

    ``features[i]`` and ``drifted_features[name][i]`` come from the same image, clean and with
    corruption ``name``, so a drifted batch can mix corrupted and clean images by row index.
    """

    reference_features: torch.Tensor
    features: torch.Tensor
    drifted_features: dict[str, torch.Tensor] = field(default_factory=dict)


def build_feature_set(
    feature_extractor: Callable[[torch.Tensor], torch.Tensor],
    reference_features: torch.Tensor,
    images: torch.Tensor,
    corrupted_images: Mapping[str, torch.Tensor],
    *,
    batch_size: int = 32,
    progress: bool = False,
) -> FeatureSet:
    """Extract the features of ``images`` and of each of ``corrupted_images`` (one pass per image).

    Features are computed in chunks of ``batch_size`` images with
    :func:`~drifttutor.fitting.extract_features` and kept on the CPU.
    """

    def features_of(batch: torch.Tensor) -> torch.Tensor:
        return extract_features(batch.split(batch_size), feature_extractor, progress=progress)  # type: ignore[return-value]

    return FeatureSet(
        reference_features.detach().cpu(),
        features_of(images),
        {name: features_of(corrupted) for name, corrupted in corrupted_images.items()},
    )


def draw_batches(pool_size: int, *, sample_size: int, num_runs: int, generator: torch.Generator) -> torch.Tensor:
    """``num_runs`` random batches of ``sample_size`` distinct row indices into a pool: (num_runs, sample_size).

    Images do not repeat within a batch; different batches overlap at random.
    """
    check(
        isinstance(sample_size, int) and 2 <= sample_size <= pool_size,
        f"sample_size must be an int from 2 to the number of incoming images ({pool_size}), got {sample_size!r}.",
    )
    check(isinstance(num_runs, int) and num_runs >= 1, f"num_runs must be a positive int, got {num_runs!r}.")
    return torch.rand(num_runs, pool_size, generator=generator).argsort(dim=1)[:, :sample_size]


# -- one experiment ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExperimentResult:
    """Scores (the detector's statistic) and p-values of the benign and of the drifted batches.

    The ROC curve treats "drifted" as the positive class and ranks batches by ``1 - p_value``
    (``rank_by="p_value"``, the default: a lower p-value means more evidence of drift) or by the
    statistic (``rank_by="statistic"``, as TorchDrift did). Both give the same ranking except
    where p-values tie, e.g. many KS p-values clipped at 1 by the Bonferroni correction.
    """

    benign_scores: np.ndarray
    benign_p_values: np.ndarray
    drifted_scores: np.ndarray
    drifted_p_values: np.ndarray
    sample_size: int
    num_ood: int

    def _labels_and_ranking(self, rank_by: str) -> tuple[np.ndarray, np.ndarray]:
        check(rank_by in RANK_BY, f"rank_by must be one of {RANK_BY}, got {rank_by!r}.")
        labels = np.r_[np.zeros(len(self.benign_scores)), np.ones(len(self.drifted_scores))]
        if rank_by == "p_value":
            ranking = 1.0 - np.r_[self.benign_p_values, self.drifted_p_values]
        else:
            ranking = np.r_[self.benign_scores, self.drifted_scores]
        return labels, ranking

    def auc(self, rank_by: str = "p_value") -> float:
        """Area under the ROC curve (``sklearn.metrics.roc_auc_score``): 1 is perfect, 0.5 is chance."""
        return float(roc_auc_score(*self._labels_and_ranking(rank_by)))

    def roc_curve(self, rank_by: str = "p_value") -> tuple[np.ndarray, np.ndarray]:
        """False-alarm rates and detection rates (``sklearn.metrics.roc_curve``), for plotting."""
        false_positive_rate, true_positive_rate, _ = roc_curve(*self._labels_and_ranking(rank_by))
        return false_positive_rate, true_positive_rate

    def auc_standard_error(self, rank_by: str = "p_value") -> float:
        """Approximate standard error of the AUC from the numbers of batches (Hanley & McNeil, 1982).

        With 50 benign and 50 drifted batches and an AUC near 0.7 it is about 0.05: two
        experiments whose AUCs differ by less than about 0.1 do not disagree.
        """
        auc = self.auc(rank_by)
        n_drifted, n_benign = len(self.drifted_scores), len(self.benign_scores)
        q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
        variance = auc * (1 - auc) + (n_drifted - 1) * (q1 - auc**2) + (n_benign - 1) * (q2 - auc**2)
        return float(np.sqrt(max(variance, 0.0) / (n_drifted * n_benign)))

    def false_alarm_rate(self, alpha: float = 0.05) -> float:
        """Share of benign batches whose p-value is below ``alpha`` (about ``alpha`` if calibrated)."""
        return float(np.mean(self.benign_p_values < alpha))

    def detection_rate(self, alpha: float = 0.05) -> float:
        """Share of drifted batches whose p-value is below ``alpha`` (the power of the test)."""
        return float(np.mean(self.drifted_p_values < alpha))


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch on one CPU thread inside the block (the previous setting is restored after).

    An experiment runs thousands of tests on small tensors. Splitting each of them over several
    threads costs more in coordination than it saves, and on a CPU that other programs also use
    it can make the loop ten times slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class DriftDetectionExperiment:
    """Fit ``detector`` on reference features, then test many benign and many drifted batches.

    ``detector`` is a :class:`~drifttutor.detectors.Detector` or an ``nn.Sequential`` of reducers
    ending in one, e.g. ``nn.Sequential(PCAReducer(2), KSDriftDetector())``. Each benign batch is
    ``sample_size`` random clean images; each drifted batch is ``sample_size`` random images of
    which ``round(ood_ratio * sample_size)`` (at least one) are taken corrupted. Batches are drawn
    from a generator seeded with ``seed``, so every experiment with the same ``seed``,
    ``sample_size`` and ``num_runs`` tests the same images, whichever detector it runs.
    ``fit_options`` are passed to ``detector.fit``, e.g. ``{"n_test": sample_size}`` for a
    calibrated ``KernelMMDDriftDetector`` (one MMD per test instead of a permutation test).
    Everything runs on the CPU, on one thread (see :func:`single_threaded`).
    """

    def __init__(
        self,
        detector: nn.Module,
        *,
        sample_size: int = 10,
        ood_ratio: float = 1.0,
        num_runs: int = 50,
        seed: int = 0,
        fit_options: Mapping[str, object] | None = None,
    ) -> None:
        modules = list(detector) if isinstance(detector, nn.Sequential) else [detector]
        check(
            len(modules) > 0 and isinstance(modules[-1], Detector),
            "detector must be a Detector, or an nn.Sequential of reducers that ends with one, e.g. "
            "nn.Sequential(PCAReducer(2), KSDriftDetector()).",
        )
        check(0 < ood_ratio <= 1, f"ood_ratio must be in (0, 1] (the share of corrupted images), got {ood_ratio!r}.")
        check(isinstance(sample_size, int) and sample_size >= 2, f"sample_size must be an int >= 2, got {sample_size!r}.")
        check(isinstance(num_runs, int) and num_runs >= 1, f"num_runs must be a positive int, got {num_runs!r}.")
        self.reducers: list[nn.Module] = [module.cpu() for module in modules[:-1]]
        self.detector: Detector = modules[-1].cpu()
        self.sample_size = sample_size
        self.ood_ratio = ood_ratio
        self.num_ood = max(1, round(ood_ratio * sample_size))
        self.num_runs = num_runs
        self.seed = seed
        self.fit_options = dict(fit_options or {})

    def _reduce(self, features: torch.Tensor) -> torch.Tensor:
        features = features.detach().cpu()
        with torch.no_grad():
            for reducer in self.reducers:
                features = reducer(features)
        return features

    def fit(self, reference_features: torch.Tensor) -> "DriftDetectionExperiment":
        """Fit the reducers in order (:func:`~drifttutor.fitting.fit_chain`), then the detector."""
        reference_features = reference_features.detach().cpu()
        if self.reducers:
            fit_chain(reference_features, self.reducers)
        self.detector.fit(self._reduce(reference_features), **self.fit_options)
        return self

    def _test_batches(
        self, features: torch.Tensor, drifted_features: torch.Tensor | None, batches: torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray]:
        scores, p_values = [], []
        for rows in batches:
            if drifted_features is None:
                batch = features[rows]
            else:
                batch = torch.cat([drifted_features[rows[: self.num_ood]], features[rows[self.num_ood :]]])
            score, p_value = self.detector.test(batch)
            scores.append(float(score))
            p_values.append(float(p_value))
        return np.array(scores), np.array(p_values)

    def run_many(
        self,
        reference_features: torch.Tensor,
        features: torch.Tensor,
        drifted_features: Mapping[str, torch.Tensor],
    ) -> dict[str, ExperimentResult]:
        """Fit, then test the same benign and drifted batches for each kind of drifted features.

        ``features`` (N, D) are the clean incoming features, and each value of
        ``drifted_features`` (N, D) the same images' features after a corruption. The benign
        batches are tested once and shared by all results.
        """
        check(len(drifted_features) > 0, "drifted_features is empty; pass at least one tensor of drifted features.")
        for name, drifted in drifted_features.items():
            check(
                drifted.shape == features.shape,
                f"drifted_features[{name!r}] has shape {tuple(drifted.shape)} but features have "
                f"{tuple(features.shape)}; row i of both must come from the same image.",
            )
        generator = torch.Generator().manual_seed(self.seed)
        draw = dict(sample_size=self.sample_size, num_runs=self.num_runs, generator=generator)
        benign_batches = draw_batches(len(features), **draw)
        drifted_batches = draw_batches(len(features), **draw)
        results = {}
        with single_threaded():
            self.fit(reference_features)
            clean = self._reduce(features)
            benign_scores, benign_p_values = self._test_batches(clean, None, benign_batches)
            for name, drifted in drifted_features.items():
                scores, p_values = self._test_batches(clean, self._reduce(drifted), drifted_batches)
                results[name] = ExperimentResult(
                    benign_scores, benign_p_values, scores, p_values, self.sample_size, self.num_ood
                )
        return results

    def run(self, reference_features: torch.Tensor, features: torch.Tensor, drifted_features: torch.Tensor) -> ExperimentResult:
        """Fit on ``reference_features``, test benign and drifted batches, and return the result."""
        return self.run_many(reference_features, features, {"drifted": drifted_features})["drifted"]


# -- comparing several detectors -----------------------------------------------------------------


@dataclass(frozen=True)
class DetectorSetup:
    """A detector to compare: its ``name``, the ``feature_space`` it tests (a key of the feature
    sets) and how to build a fresh, unfitted one. ``calibrate=True`` fits it with
    ``n_test=sample_size`` (for ``KernelMMDDriftDetector``'s calibrated mode)."""

    name: str
    feature_space: str
    make_detector: Callable[[], nn.Module]
    calibrate: bool = False


def _kernel_mmd() -> nn.Module:
    return KernelMMDDriftDetector(seed=0)


def _pca_ks() -> nn.Module:
    return nn.Sequential(PCAReducer(2), KSDriftDetector())


def default_setups() -> list[DetectorSetup]:
    """The three detectors of TorchDrift's comparison, on the "backbone" and "untrained encoder" features.

    Kernel MMD on the backbone features (calibrated: a gamma distribution fitted once to the
    null distribution, so each test costs one MMD), PCA to 2 components + KS on the backbone
    features, and KS on the 32 features of an untrained encoder (:mod:`drifttutor.encoders`).
    """
    return [
        DetectorSetup("kernel MMD", "backbone", _kernel_mmd, calibrate=True),
        DetectorSetup("PCA(2) + KS", "backbone", _pca_ks),
        DetectorSetup("untrained encoder + KS", "untrained encoder", KSDriftDetector),
    ]


def compare_detectors(
    setups: Sequence[DetectorSetup],
    feature_sets: Mapping[str, FeatureSet],
    *,
    sample_sizes: Sequence[int],
    ood_ratio: float,
    num_runs: int = 50,
    seed: int = 0,
    corruptions: Sequence[str] | None = None,
) -> dict[tuple[str, str, int], ExperimentResult]:
    """Run every setup at every sample size on every corruption of its feature set.

    ``corruptions`` restricts the drifted features used to those names (default: all). Returns
    ``{(setup name, corruption, sample size): ExperimentResult}``. All setups see the same batches
    of images (same ``seed``), so their AUCs are compared on equal terms.
    """
    results = {}
    for setup in setups:
        check(
            setup.feature_space in feature_sets,
            f"setup {setup.name!r} needs the feature set {setup.feature_space!r}; got {sorted(feature_sets)}.",
        )
        feature_set = feature_sets[setup.feature_space]
        drifted = feature_set.drifted_features
        if corruptions is not None:
            missing = [name for name in corruptions if name not in drifted]
            check(not missing, f"no drifted features for {missing} in {setup.feature_space!r}; got {sorted(drifted)}.")
            drifted = {name: drifted[name] for name in corruptions}
        for sample_size in sample_sizes:
            experiment = DriftDetectionExperiment(
                setup.make_detector(),
                sample_size=sample_size,
                ood_ratio=ood_ratio,
                num_runs=num_runs,
                seed=seed,
                fit_options={"n_test": sample_size} if setup.calibrate else None,
            )
            by_corruption = experiment.run_many(feature_set.reference_features, feature_set.features, drifted)
            for corruption, result in by_corruption.items():
                results[(setup.name, corruption, sample_size)] = result
    return results


def auc_table(results: Mapping[tuple[str, str, int], ExperimentResult], *, rank_by: str = "p_value") -> str:
    """The AUC of each setup (columns) per corruption and sample size (rows), as aligned text."""
    setups = list(dict.fromkeys(name for name, _, _ in results))
    rows = list(dict.fromkeys((corruption, size) for _, corruption, size in results))
    width = max(len(name) for name in setups) + 2
    lines = [f"{'corruption':<18}{'n':>4}" + "".join(f"{name:>{width}}" for name in setups)]
    for corruption, size in rows:
        aucs = "".join(f"{results[(name, corruption, size)].auc(rank_by):>{width}.3f}" for name in setups)
        lines.append(f"{corruption:<18}{size:>4}{aucs}")
    return "\n".join(lines)


# -- pictures ------------------------------------------------------------------------------------


def plot_roc_grid(
    results: Mapping[tuple[str, str, int], ExperimentResult], *, rank_by: str = "p_value", size: float = 3.0
) -> Figure:
    """ROC curves of every setup, one panel per corruption (rows) and sample size (columns)."""
    setups = list(dict.fromkeys(name for name, _, _ in results))
    corruptions = list(dict.fromkeys(corruption for _, corruption, _ in results))
    sample_sizes = sorted({n for _, _, n in results})
    rows, columns = len(corruptions), len(sample_sizes)
    fig, axes = plt.subplots(rows, columns, figsize=(size * columns, size * rows), squeeze=False, sharex=True, sharey=True)
    for row, corruption in enumerate(corruptions):
        for column, sample_size in enumerate(sample_sizes):
            ax = axes[row, column]
            for name in setups:
                result = results[(name, corruption, sample_size)]
                ax.plot(*result.roc_curve(rank_by), label=f"{name} ({result.auc(rank_by):.2f})")
            ax.plot([0, 1], [0, 1], color="lightgray", linestyle="--")
            ax.set_title(f"{corruption}, n = {sample_size}", fontsize=10)
            ax.legend(loc="lower right", fontsize=7, title="AUC", title_fontsize=7)
            if row == rows - 1:
                ax.set_xlabel("false-alarm rate")
            if column == 0:
                ax.set_ylabel("detection rate")
    fig.tight_layout()
    return fig


def plot_p_value_histograms(results: Mapping[str, ExperimentResult], *, alpha: float = 0.05, bins: int = 10) -> Figure:
    """Histograms of the benign batches' p-values, one panel per detector, with the uniform density."""
    fig, axes = plt.subplots(1, len(results), figsize=(3.4 * len(results), 2.8), squeeze=False, sharey=True)
    for ax, (name, result) in zip(axes.flat, results.items()):
        ax.hist(result.benign_p_values, bins=bins, range=(0, 1), density=True, color="tab:blue", alpha=0.7)
        ax.axhline(1.0, color="black", linestyle="--", label="uniform")
        ax.axvline(alpha, color="tab:red", linestyle=":", label=f"alpha = {alpha}")
        ax.set(title=f"{name}\nfalse alarms at {alpha}: {result.false_alarm_rate(alpha):.1%}", xlabel="p-value")
        ax.title.set_fontsize(10)
    axes[0, 0].set_ylabel("density")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    return fig

"""Tests of the ``drifttutor`` command and the headless walkthrough behind it.

Most tests call ``drifttutor.cli.main`` in-process (fast); two run the command in a subprocess to
check what a user sees (exit status, no traceback). The end-to-end run uses the shared ants-vs-bees
data (``$DRIFTTUTOR_DATA``, else ``shared/data`` next to the repository) and writes only under
``tmp_path``: its feature cache too, so the user's cache is untouched.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from drifttutor import __version__
from drifttutor.cli import build_parser, main
from drifttutor.corruptions import list_corruptions
from drifttutor.data import DATA_ENV_VAR, DATASET_FOLDER, eval_transform
from drifttutor.headless import WalkthroughOptions, fast_inference_copy, load_eval_views
from drifttutor.models import BACKBONES, FeatureExtractor
from drifttutor.report import render_report

DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_data_root() -> Path:
    from_env = os.environ.get(DATA_ENV_VAR)
    root = Path(from_env).expanduser().resolve() if from_env else DEFAULT_DATA_ROOT
    if not (root / DATASET_FOLDER / "train").is_dir():
        pytest.skip(f"ants-vs-bees data not found in {root}; set {DATA_ENV_VAR} to the folder holding {DATASET_FOLDER}/")
    return root


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m drifttutor.cli ARGS`` in a subprocess, as a user would run ``drifttutor ARGS``."""
    env = {**os.environ, "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-m", "drifttutor.cli", *args], capture_output=True, text=True, env=env, timeout=300)


def walkthrough_options() -> list[str]:
    (walk,) = [action for action in build_parser()._subparsers._group_actions[0].choices.values()]
    return [option for action in walk._actions for option in action.option_strings if option.startswith("--")]


# --- the command line ---------------------------------------------------------------------------


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["walkthrough", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    options = walkthrough_options()
    for option in ("--data-root", "--output", "--cache-dir", "--no-cache", "--backbone", "--epochs", "--corruption",
                   "--severity", "--sample-size", "--seed", "--quiet", "--device"):
        assert option in options
    for option in options:
        assert option in help_text
    for name in [*list_corruptions(), *BACKBONES]:
        assert name in help_text
    # every option has a help text, not just a name
    (walk,) = build_parser()._subparsers._group_actions[0].choices.values()
    assert all(action.help for action in walk._actions)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"drifttutor {__version__}"


def test_console_script_version():
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"drifttutor {__version__}"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--severity", "0"], r"severity must be an integer from 1 to 5, got 0"),
        (["--severity", "6"], r"severity must be an integer from 1 to 5, got 6"),
        (["--severity", "two"], r"severity must be an integer, got 'two'"),
        (["--corruption", "fog"], r"invalid choice: 'fog' \(choose from .*gaussian_blur"),
        (["--sample-size", "1"], r"sample size must be an integer of at least 2, got 1"),
        (["--epochs", "0"], r"epochs must be an integer of at least 1, got 0"),
        (["--backbone", "vgg"], r"invalid choice: 'vgg'"),
        (["--lr", "-1"], r"must be positive"),
        (["--alpha", "1.5"], r"argument --alpha: must be between 0 and 1, got 1.5"),
    ],
)
def test_bad_options_exit_with_a_clear_message(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["walkthrough", *args])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert re.search(message, stderr), stderr
    assert "Traceback" not in stderr


def test_missing_data_gives_the_data_error_without_traceback(tmp_path):
    result = run_cli("walkthrough", "--data-root", str(tmp_path / "nowhere"), "--no-download", "--quiet", "-o", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "does not hold the ants-vs-bees data" in result.stderr
    assert DATA_ENV_VAR in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_sample_size_larger_than_the_validation_split(capsys, tmp_path):
    status = main(["walkthrough", "--data-root", str(shared_data_root()), "--no-download", "--quiet",
                   "--sample-size", "500", "-o", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")])
    assert status == 2
    assert "sample size must be at most 102" in capsys.readouterr().err


# --- the headless walkthrough, end to end -------------------------------------------------------


@pytest.fixture(scope="module")
def walkthrough_run(tmp_path_factory):
    """One small run (1 epoch, batches of 10, severe blur), then a second from the feature cache."""
    root, tmp = shared_data_root(), tmp_path_factory.mktemp("walkthrough")
    common = ["--data-root", str(root), "--no-download", "--cache-dir", str(tmp / "cache"), "--quiet", "--epochs", "1", "--sample-size", "10"]
    status = main(["walkthrough", *common, "--severity", "5", "-o", str(tmp / "first")])
    assert status == 0
    status = main(["walkthrough", *common, "--corruption", "contrast", "--severity", "4", "-o", str(tmp / "second")])
    assert status == 0
    load = lambda name: json.loads((tmp / name / "metrics.json").read_text())  # noqa: E731
    return tmp, load("first"), load("second")


def test_walkthrough_metrics(walkthrough_run):
    _, metrics, _ = walkthrough_run
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    benign, drifted = metrics["batches"]["benign"], metrics["batches"]["drifted"]
    for batch in (benign, drifted):
        assert 0.0 < batch["p_value"] <= 1.0
        assert batch["images"] == 10
        assert 0.0 <= batch["accuracy"] <= 1.0
    assert drifted["p_value"] < benign["p_value"]
    assert drifted["p_value"] < 0.05 and drifted["drift_detected"]
    assert drifted["score"] > benign["score"]
    options = metrics["options"]
    assert (options["corruption"], options["severity"], options["sample_size"], options["epochs"]) == ("gaussian_blur", 5, 10, 1)
    assert metrics["device"] == "cpu" or metrics["device"].startswith("cuda")
    assert metrics["data"] == {**metrics["data"], "train_images": 244, "val_images": 102, "test_images": 51}
    assert metrics["cache"] == {"train": "computed", "test": "computed"}
    assert metrics["fast_backbone"] is True
    for stage in ("load_backbone", "features_train", "train_head", "fit_detector", "test_benign", "test_drifted", "figures", "total"):
        assert metrics["timings_s"][stage] >= 0.0
    assert {"torch", "drifttutor", "python", "scikit-learn"} <= set(metrics["versions"])
    assert metrics["command"].startswith("drifttutor walkthrough ")


def test_walkthrough_report_references_existing_figures(walkthrough_run):
    tmp, metrics, _ = walkthrough_run
    report = (tmp / "first" / "report.md").read_text()
    assert metrics["report"] == str(tmp / "first" / "report.md")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert set(links) == {"examples.png", "isomap_benign.png", "isomap_drifted.png"}
    for link in links:
        assert (tmp / "first" / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"{metrics['test_accuracy']:.3f}" in report
    assert "deliberate difference" in report  # the head is not trained as in the notebooks


def test_second_run_reuses_cached_features(walkthrough_run):
    _, first, second = walkthrough_run
    assert second["cache"] == {"train": "loaded", "test": "loaded"}
    assert "features_train" not in second["timings_s"]
    assert second["test_accuracy"] == first["test_accuracy"]  # same features, same seed
    assert second["batches"]["benign"] == first["batches"]["benign"]
    assert second["options"]["corruption"] == "contrast"


# --- the pieces that make it fast ---------------------------------------------------------------


def test_eval_views_match_the_eval_transform():
    root = shared_data_root()
    paths = sorted(str(path) for path in (root / DATASET_FOLDER / "val" / "bees").iterdir())[:3]
    views = load_eval_views(paths, progress=False)
    assert views.dtype == torch.uint8 and views.shape == (3, 3, 224, 224)
    from PIL import Image

    for path, view in zip(paths, views):
        with Image.open(path) as image:
            expected = eval_transform()(image.convert("RGB"))
        assert torch.allclose(view.float() / 255, expected, atol=1e-6)


def toy_extractor(body: nn.Module) -> FeatureExtractor:
    generator = torch.Generator().manual_seed(0)
    for module in body.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator))
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.weight.data.copy_(torch.randn(module.num_features, generator=generator))
            module.bias.data.copy_(torch.randn(module.num_features, generator=generator))
    return FeatureExtractor(body, feature_size=8, mean=(0.5,) * 3, std=(0.25,) * 3, name="toy")


def test_fast_inference_copy_folds_batch_norms_and_keeps_the_features():
    body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    extractor = toy_extractor(body)
    folded = fast_inference_copy(extractor)
    assert folded is not None
    assert not any(isinstance(module, nn.BatchNorm2d) for module in folded.modules())
    assert any(isinstance(module, nn.BatchNorm2d) for module in extractor.modules())  # the original is untouched
    images = torch.rand(4, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(folded(images), extractor(images), atol=1e-5)


class MisleadingOrder(nn.Module):
    """A batch norm registered right after a convolution but applied before it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)
        self.norm = nn.BatchNorm2d(8)
        self.stem = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        return self.conv(self.norm(self.stem(x))).mean(dim=(2, 3), keepdim=True)


def test_fast_inference_copy_refuses_when_the_result_would_differ():
    assert fast_inference_copy(toy_extractor(MisleadingOrder())) is None


def test_fast_inference_copy_of_the_default_backbone():
    from drifttutor.models import load_backbone

    extractor, _ = load_backbone()
    fast = fast_inference_copy(extractor)
    assert fast is not None
    assert not any(isinstance(module, nn.BatchNorm2d) for module in fast.modules())
    assert not any(isinstance(getattr(module, "static_padding", None), nn.ZeroPad2d) and module.stride == (1, 1) for module in fast.modules())
    images = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = extractor(images)
        assert torch.allclose(fast(images), expected, atol=1e-4 * float(expected.abs().max()))


def test_options_are_checked():
    with pytest.raises(ValueError, match="severity"):
        WalkthroughOptions(severity=7).check()
    with pytest.raises(ValueError, match="unknown corruption 'fog'; choose one of: gaussian_noise"):
        WalkthroughOptions(corruption="fog").check()
    with pytest.raises(ValueError, match="at least 2"):
        WalkthroughOptions(sample_size=1).check()


def test_render_report_from_metrics_alone():
    metrics = {
        "drifttutor_version": "0", "command": "drifttutor walkthrough --seed 3", "device": "cpu",
        "options": {**WalkthroughOptions().__dict__, "seed": 3},
        "data": {"train_images": 244, "val_images": 102, "test_images": 51},
        "test_accuracy": 0.9,
        "detector": {"n_perm": 1000, "reference_size": 244, "alpha": 0.05},
        "batches": {
            "benign": {"images": 50, "score": 0.0, "p_value": 0.5, "drift_detected": False, "accuracy": 0.9},
            "drifted": {"images": 50, "score": 0.1, "p_value": 0.001, "drift_detected": True, "accuracy": 0.8},
        },
        "figures": {"examples": "examples.png", "isomap_benign": "isomap_benign.png", "isomap_drifted": "isomap_drifted.png"},
        "timings_s": {"total": 1.0},
    }
    report = render_report(metrics)
    assert "| drifted | 50 validation images with gaussian_blur, severity 2 | 0.1 | 0.001 | **drift** | 0.80 |" in report
    assert "drifttutor walkthrough --seed 3" in report

"""The walkthrough's report: ``report.md`` with the figures, and ``metrics.json`` with every number.

:func:`drifttutor.headless.run_walkthrough` collects the metrics (a JSON-ready dict) and calls
:func:`write_report`; :func:`render_report` turns metrics into Markdown, so a report can be
rebuilt from an old ``metrics.json`` with ``render_report(json.load(...))``.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import matplotlib.pyplot as plt  # the backend is the caller's choice (the command line uses Agg)
from matplotlib.figure import Figure

REPORT_NAME, METRICS_NAME = "report.md", "metrics.json"


def save_figure(figure: Figure, path: Path) -> str:
    """Save ``figure`` as a PNG, close it, and return the file name (for relative links)."""
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return Path(path).name


def versions() -> dict[str, str]:
    """Versions of Python and of the packages that shape the results."""
    import matplotlib
    import numpy
    import pytorch_lightning
    import sklearn
    import torch
    import torchvision

    from . import __version__

    return {
        "drifttutor": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pytorch_lightning": pytorch_lightning.__version__,
        "scikit-learn": sklearn.__version__,
        "numpy": numpy.__version__,
        "matplotlib": matplotlib.__version__,
    }


def write_report(metrics: dict, output: str | Path) -> Path:
    """Write ``metrics.json`` and ``report.md`` into ``output``; return the report's path."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    (output / METRICS_NAME).write_text(json.dumps(metrics, indent=2) + "\n")
    report = output / REPORT_NAME
    report.write_text(render_report(metrics))
    return report


def render_report(metrics: dict) -> str:
    """The Markdown report of a walkthrough's ``metrics`` (figures embedded by relative path)."""
    options, batches, detector, data = metrics["options"], metrics["batches"], metrics["detector"], metrics["data"]
    drift = f"{options['corruption']}, severity {options['severity']}"
    rows = []
    for name, batch in batches.items():
        kind = "clean validation images" if name == "benign" else f"validation images with {drift}"
        verdict = "**drift**" if batch["drift_detected"] else "no drift"
        rows.append(f"| {name} | {batch['images']} {kind} | {batch['score']:.4g} | {batch['p_value']:.3g} | {verdict} | {batch['accuracy']:.2f} |")
    figures = metrics["figures"]
    isomaps = " ".join(f"![Isomap of the {name} batch]({figures[f'isomap_{name}']})" for name in batches)
    timings = "\n".join(f"| {stage.replace('_', ' ')} | {seconds:.2f} |" for stage, seconds in metrics["timings_s"].items())
    rerun = f"\nTo run it again:\n\n```\n{metrics['command']}\n```\n" if metrics.get("command") else ""
    return f"""# Drift detection walkthrough: ants vs bees

drifttutor {metrics['drifttutor_version']}, backbone `{options['backbone']}`, device `{metrics['device']}`, seed {options['seed']}.

## The classifier

Test accuracy: **{metrics['test_accuracy']:.3f}** on the {data['test_images']} test images.

The linear head was trained for {options['epochs']} epochs with Adam (learning rate {options['lr']:g}) on the
backbone's features of the {data['train_images']} training images seen through the evaluation transform
(resize, centre crop), each computed once. This is a deliberate difference from the notebooks, which train
the same head with Lightning on randomly cropped and flipped images: it is much faster and, on this data,
about as accurate.

## The drift test

A kernel MMD detector ({detector['n_perm']} permutations) was fitted on the features of the
{detector['reference_size']} training images (the `reference_features`). Each batch below holds
{options['sample_size']} images drawn at random from the {data['val_images']} validation images; "drift" means
p-value < {detector['alpha']:g}.

| batch | images | score (MMD²) | p-value | verdict | classifier accuracy |
|---|---|---|---|---|---|
{chr(10).join(rows)}

![Some images of each batch, titled with the predicted class]({figures['examples']})

The Isomap maps are fitted on the reference features (dots); the triangles are each batch's features.

{isomaps}

## Timings

| stage | seconds |
|---|---|
{timings}

All numbers, the options and the package versions are in `{METRICS_NAME}`.
{rerun}"""

"""The ``drifttutor`` command: ``drifttutor walkthrough`` runs the whole walkthrough without Jupyter.

Only argument parsing lives here; the work is done by :func:`drifttutor.headless.run_walkthrough`,
which returns the metrics it also writes to ``metrics.json``. Run ``drifttutor walkthrough --help``
for the options, or ``python -m drifttutor.cli``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

from . import __version__

PROG = "drifttutor"


def _int_in(low: int, high: int | None, what: str):
    """An argparse type: an integer in [low, high] (no upper bound if ``high`` is None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f"from {low} to {high}" if high is not None else f"of at least {low}"
            raise argparse.ArgumentTypeError(f"{what} must be an integer {bounds}, got {value}")
        return value

    return parse


def _number(condition, requirement: str):
    """An argparse type: a float for which ``condition(value)`` holds ("must be <requirement>")."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not condition(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value

    return parse


_positive_float = _number(lambda value: value > 0, "positive")
_fraction = _number(lambda value: 0 < value < 1, "between 0 and 1")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``drifttutor`` command (choices come from the library)."""
    from .corruptions import list_corruptions
    from .headless import WalkthroughOptions
    from .models import BACKBONES

    defaults = WalkthroughOptions()
    D = " (default: %(default)s)"  # appended to the help of options that have a default
    parser = argparse.ArgumentParser(prog=PROG, description="Learn to detect input drift on an image classifier, end to end.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    walk = commands.add_parser(
        "walkthrough",
        help="run the whole walkthrough (data, classifier, drift test, figures) and write a report",
        description=(
            "Run the walkthrough without Jupyter: find or download the ants-vs-bees data, train a linear head on a "
            "frozen ImageNet backbone, fit a kernel MMD drift detector on the training images' features, test a "
            "benign and a drifted batch of validation images, draw Isomap maps, and write report.md, the figures "
            "and metrics.json to the output folder. The head is trained on cached features of un-augmented "
            "images (fast), not on augmented images as in the notebooks."
        ),
    )
    data = walk.add_argument_group("data and output")
    data.add_argument("--data-root", metavar="DIR", help="folder holding hymenoptera_data/ (default: $DRIFTTUTOR_DATA, else ./data)")
    data.add_argument("--no-download", dest="download", action="store_false", help="fail instead of downloading the data when it is missing")
    data.add_argument("--output", "-o", metavar="DIR", default=defaults.output, help="folder for report.md, the figures and metrics.json" + D)
    data.add_argument("--cache-dir", metavar="DIR",
                      help="cache for features of the training and test images (default: $DRIFTTUTOR_CACHE, else ~/.cache/drifttutor)")
    data.add_argument("--no-cache", dest="use_cache", action="store_false", help="neither read nor write cached features")
    model = walk.add_argument_group("classifier")
    model.add_argument("--backbone", choices=list(BACKBONES), default=defaults.backbone, help="frozen ImageNet feature extractor" + D)
    model.add_argument("--epochs", type=_int_in(1, None, "epochs"), default=defaults.epochs, help="epochs of training for the linear head" + D)
    model.add_argument("--lr", type=_positive_float, default=defaults.lr, help="learning rate of the head (Adam)" + D)
    drift = walk.add_argument_group("drift test")
    drift.add_argument("--corruption", choices=list_corruptions(), default=defaults.corruption, metavar="NAME",
                       help=f"simulated drift, one of: {', '.join(list_corruptions())}" + D)
    drift.add_argument("--severity", type=_int_in(1, 5, "severity"), default=defaults.severity,
                       help="strength of the corruption, 1 (mild) to 5 (severe)" + D)
    drift.add_argument("--sample-size", type=_int_in(2, None, "sample size"), default=defaults.sample_size, metavar="N",
                       help="images in each tested batch, drawn from the validation images" + D)
    drift.add_argument("--n-perm", type=_int_in(1, None, "n-perm"), default=defaults.n_perm, metavar="N", help="permutations of the MMD test" + D)
    drift.add_argument("--alpha", type=_fraction, default=defaults.alpha, help="significance level for the drift verdict in the report" + D)
    run = walk.add_argument_group("run")
    run.add_argument("--seed", type=int, default=defaults.seed, help="seed for the head, the batches, the corruption noise and the permutations" + D)
    run.add_argument("--batch-size", type=_int_in(1, None, "batch size"), default=defaults.batch_size, metavar="N",
                     help="images per forward pass, and head-training batch size" + D)
    run.add_argument("--device", help="torch device, e.g. cpu or cuda (default: cuda if available, else cpu)")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress bars and no summary")
    return parser


def _summary(metrics: dict) -> str:
    lines = [f"test accuracy {metrics['test_accuracy']:.3f}"]
    for name, batch in metrics["batches"].items():
        verdict = "drift" if batch["drift_detected"] else "no drift"
        lines.append(f"{name:8s} batch: score {batch['score']:.4g}, p-value {batch['p_value']:.3g} ({verdict})")
    lines.append(f"report: {metrics['report']} ({metrics['timings_s']['total']:.1f} s)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``drifttutor`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")  # figures go to files; no display needed

    from .data import DataNotFoundError
    from .headless import WalkthroughOptions, run_walkthrough
    from .models import WeightsUnavailableError

    options = {key: value for key, value in vars(args).items() if key not in ("command", "quiet")}
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        options = WalkthroughOptions(**options, progress=not args.quiet)
        metrics = run_walkthrough(options, command=shlex.join([PROG, *argv]))
    except (DataNotFoundError, WeightsUnavailableError, ValueError) as error:
        # These errors say what to do; a traceback would only hide that. Bad options: status 2.
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, ValueError) else 1
    if not args.quiet:
        print(_summary(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Time feature extraction on the CPU with and without splitting batches into chunks.

``drifttutor.models.FeatureExtractor`` sends at most ``CPU_CHUNK_SIZE`` images through the
backbone at a time on the CPU. This script shows why: it extracts features of the same random
images in batches of ``--batch-size`` with chunks of each size in ``--chunks`` (``0`` = no
chunking), interleaved over ``--rounds`` rounds, and prints the median time per image, the minor
page faults (fresh memory pages handed over by the operating system) and the system CPU time.

    .venv/bin/python benchmarks/bench_feature_chunks.py
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time

import torch

from drifttutor import models


def extract(feature_extractor: models.FeatureExtractor, images: torch.Tensor, batch_size: int) -> None:
    with torch.inference_mode():
        for batch in images.split(batch_size):
            feature_extractor(batch)


def measure(feature_extractor, images, batch_size: int, chunk: int) -> tuple[float, int, float]:
    """Seconds per image, minor page faults and system seconds for one pass over ``images``."""
    models.CPU_CHUNK_SIZE = chunk if chunk > 0 else len(images)
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    extract(feature_extractor, images, batch_size)
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    return seconds / len(images), after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 16, 8, 4, 2])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    feature_extractor, _ = models.load_backbone()
    images = torch.rand(args.images, 3, 224, 224)
    default_chunk = models.CPU_CHUNK_SIZE
    extract(feature_extractor, images[: args.batch_size], args.batch_size)  # warm-up
    results: dict[int, list[tuple[float, int, float]]] = {chunk: [] for chunk in args.chunks}
    for _ in range(args.rounds):
        for chunk in args.chunks:
            results[chunk].append(measure(feature_extractor, images, args.batch_size, chunk))
    models.CPU_CHUNK_SIZE = default_chunk

    print(f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
          f"{args.images} images of 224 px in batches of {args.batch_size}; median of {args.rounds} rounds\n")
    print("| chunk | ms per image | minor page faults per image | system CPU s per image |")
    print("|---:|---:|---:|---:|")
    for chunk, rows in results.items():
        per_image, faults, system = (statistics.median(column) for column in zip(*rows))
        label = "none" if chunk <= 0 else str(chunk)
        print(f"| {label} | {per_image * 1e3:.1f} | {faults / args.images:.0f} | {system / args.images:.4f} |")


if __name__ == "__main__":
    main()

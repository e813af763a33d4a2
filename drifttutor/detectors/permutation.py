"""Batched permutation tests: draw many relabellings at once and evaluate them as tensors.

A two-sample permutation test pools the N = n + m samples, relabels them at random many times
and asks how often a relabelled statistic is at least as large as the observed one. Here each
relabelling is a row of a 0/1 membership matrix S of shape (P, N) (1 = "belongs to the first
sample"), so that a whole chunk of P relabellings is evaluated with a few matrix products instead
of a Python loop. Chunks are sized to stay under a memory bound.

The relabellings are drawn on the CPU (from ``generator``, or torch's global generator), whatever
the device of the data, and the sums over the kernel matrix are exact (see :func:`exact_grid`):
the same seed gives bit-for-bit the same p-value on every device, for every chunk size and with
every BLAS library.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import torch

from drifttutor._checks import check

#: Default memory bound for one chunk of relabellings (64 MiB).
DEFAULT_MAX_CHUNK_BYTES = 64 * 2**20


def permutation_p_value(n_at_least: int, n_perm: int) -> float:
    """p = (1 + #{permuted >= observed}) / (1 + n_perm), which is never 0.

    Counting the observed labelling as one of the permutations makes the test exact (its
    rejection rate at level alpha is at most alpha) and avoids reporting p = 0, which would claim
    a certainty that a finite number of permutations cannot give (Phipson & Smyth, "Permutation
    p-values should never be zero", Stat. Appl. Genet. Mol. Biol. 9(1), 2010).
    """
    return (1 + n_at_least) / (1 + n_perm)


def check_generator(generator: torch.Generator | None) -> None:
    """Check that ``generator`` is None or a CPU ``torch.Generator``."""
    check(
        generator is None
        or (isinstance(generator, torch.Generator) and generator.device.type == "cpu"),
        "generator must be a CPU torch.Generator (relabellings are drawn on the CPU so that a "
        "seed gives the same p-value on every device), e.g. torch.Generator().manual_seed(0).",
    )


def random_keys(
    n_rows: int, n_total: int, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """I.i.d. uniform random 31-bit integers, shape (n_rows, n_total), int32, on the CPU.

    Drawn as half as many 63-bit integers, each split into two 32-bit halves with the sign bit
    cleared (the bits of a uniform integer are independent): half the time of drawing every key
    on its own. Every row uses ceil(n_total / 2) draws, so rows drawn in chunks are the same as
    rows drawn at once.
    """
    padded = n_total + n_total % 2
    wide = torch.empty(n_rows * padded // 2, dtype=torch.int64).random_(generator=generator)
    keys = wide.view(torch.int32).view(n_rows, padded)[:, :n_total]
    return keys.bitwise_and(2**31 - 1)


def random_memberships(
    n_rows: int, n_total: int, n_first: int, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Indices (n_rows, n_first) of the members of the first sample in random relabellings.

    Each row is a uniformly random subset of size ``n_first`` of range(n_total): the positions of
    the ``n_first`` smallest of ``n_total`` i.i.d. random 31-bit integers (a tie at the cut, the
    only way to bias the choice, has probability below n_total / 2^31). Always drawn on the CPU.
    """
    keys = random_keys(n_rows, n_total, generator=generator)
    return keys.topk(n_first, dim=1, largest=False, sorted=False).indices


def rows_per_chunk(n_total: int, *, bytes_per_entry: int, max_chunk_bytes: int) -> int:
    """How many relabellings of ``n_total`` samples fit in ``max_chunk_bytes`` (at least 1)."""
    check(max_chunk_bytes > 0, f"max_chunk_bytes must be positive, got {max_chunk_bytes}.")
    return max(1, int(max_chunk_bytes) // (bytes_per_entry * n_total))


def member_chunks(
    n_perm: int,
    n_total: int,
    n_first: int,
    *,
    chunk_rows: int,
    generator: torch.Generator | None,
    device: torch.device,
) -> Iterator[torch.Tensor]:
    """Yield chunks (rows, n_first) of the member indices of ``n_perm`` random relabellings.

    The random numbers are drawn chunk after chunk from one stream, so the relabellings do not
    depend on ``chunk_rows``.
    """
    for start in range(0, n_perm, chunk_rows):
        rows = min(chunk_rows, n_perm - start)
        yield random_memberships(rows, n_total, n_first, generator=generator).to(device)


def float32_matmul_is_exact(device: torch.device) -> bool:
    """Whether float32 matrix products on ``device`` are IEEE float32 (no TF32/bf16 shortcut)."""
    if device.type == "mps":
        return True
    if torch.get_float32_matmul_precision() != "highest":
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if device.type == "cuda":
            matmul = torch.backends.cuda.matmul
            return not matmul.allow_tf32 and getattr(matmul, "fp32_precision", "none") in (
                "none",
                "ieee",
            )
        mkldnn = getattr(torch.backends.mkldnn, "matmul", None)
        return getattr(mkldnn, "fp32_precision", "none") in ("none", "ieee")


def exact_grid(matrix: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Round a square matrix to integers on a grid so that sums over its entries are exact.

    Returns ``(integers, step)`` with ``matrix ~= step * integers``. The grid has as many levels as
    allow every sum of up to N entries (float32 products with a 0/1 membership matrix) or N^2
    entries (float64 totals) to be exact, whatever the order of summation: 2^(24 - log2 N) levels
    in float32 (14 bits for N = 1024), used up to N = 4096 when float32 products are exact on the
    device, else 2^(53 - 2 log2 N) levels in float64. Exact sums make a permutation test
    reproducible bit for bit (no dependence on chunk size, BLAS or device) and make statistics of
    relabellings that tie in exact arithmetic tie in the computer, too. The rounding error per
    entry is at most step / 2 (at most 1.2e-4 of the largest entry), far below what matters for a
    test; the test stays exact for the rounded matrix, like for any fixed kernel matrix.
    """
    n_total = matrix.shape[0]
    log_n = max(1, math.ceil(math.log2(n_total)))
    largest = float(matrix.abs().max())
    check(largest > 0, "the kernel matrix is all zeros; choose a larger lengthscale.")
    use_float32 = matrix.device.type == "mps" or (
        n_total <= 4096 and float32_matmul_is_exact(matrix.device)
    )
    bits = 24 - log_n if use_float32 else 53 - 2 * log_n
    check(bits >= 8, f"{n_total} pooled samples are too many for exact permutation sums.")
    step = largest / 2.0**bits
    integers = torch.div(matrix, step).round_()
    return integers.to(torch.float32 if use_float32 else torch.float64), step

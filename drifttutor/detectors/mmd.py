"""Kernel maximum mean discrepancy (MMD) test, with all permutations batched as matrix products.

Gretton, Borgwardt, Rasch, Schölkopf & Smola, "A Kernel Two-Sample Test", JMLR 13:723-773 (2012).
Used for drift detection on learned features by Rabanser, Günnemann & Lipton, "Failing Loudly: An
Empirical Study of Methods for Detecting Dataset Shift", NeurIPS 2019.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch

from drifttutor._checks import check
from drifttutor.detectors.base import Detector, DriftTestResult, check_features
from drifttutor.detectors.calibration import fit_shifted_gamma, gamma_survival
from drifttutor.detectors.kernels import (
    GaussianKernel,
    Kernel,
    ReferenceGeometry,
    as_distance_dtype,
    reference_geometry,
    squared_row_norms,
)
from drifttutor.detectors.permutation import (
    DEFAULT_MAX_CHUNK_BYTES,
    check_generator,
    exact_grid,
    member_chunks,
    permutation_p_value,
    random_memberships,
    rows_per_chunk,
)

# Per relabelling and pooled sample, a chunk holds about 4 bytes of random keys, 8 of indices
# (half a row), 4 of memberships S and 4 of S @ K (8 each in float64), plus temporaries.
_BYTES_PER_ENTRY = 32
# At most this many relabellings per chunk: small chunks reuse the same (cache-warm) memory for
# their temporaries, where one big chunk would ask the operating system for fresh pages.
_MAX_CHUNK_ROWS = 256


class MMDTestResult(NamedTuple):
    """Result of :func:`mmd_test`: unbiased MMD^2, p-value (None if not tested), lengthscale."""

    score: torch.Tensor
    p_value: torch.Tensor | None
    lengthscale: float


def pooled_squared_distances(
    x: torch.Tensor, y: torch.Tensor, *, reference: ReferenceGeometry | None = None
) -> torch.Tensor:
    """Squared distances (N, N) within the pooled sample [x; y], in the precision of the features.

    Everything about x comes from ``reference`` (:func:`reference_geometry` of x; computed if not
    given); y is shifted by x's centre and enters through two small products, y x' and y y'. The
    blocks are written into one (N, N) matrix, without other temporaries of that size.
    """
    reference = reference_geometry(x) if reference is None else reference
    n = reference.centred.shape[0]
    centred = as_distance_dtype(y) - reference.centre
    norms = squared_row_norms(centred)
    squared = centred.new_empty(n + len(centred), n + len(centred))
    squared[:n, :n] = reference.squared_distances
    across = torch.addmm(reference.squared_norms[None, :], centred, reference.centred.T, alpha=-2.0)
    squared[n:, :n] = across.add_(norms[:, None])
    squared[:n, n:] = across.T
    within_y = torch.addmm(norms[None, :], centred, centred.T, alpha=-2.0)
    squared[n:, n:] = within_y.add_(norms[:, None])
    return squared.clamp_min_(0.0)


def pooled_kernel_matrix(
    x: torch.Tensor,
    y: torch.Tensor,
    kernel: Kernel,
    *,
    lengthscale: float | None = None,
    reference: ReferenceGeometry | None = None,
) -> tuple[torch.Tensor, float]:
    """Kernel matrix of the pooled sample [x; y] with a zero diagonal, and the lengthscale used.

    Distances and kernel values are computed in the precision of the features (float32 features:
    float32, float64 features: float64; ``reference``: x's :class:`ReferenceGeometry`, if already
    known); sums over them are taken in float64 later. The lengthscale is ``lengthscale`` if
    given, else the kernel's own (fixed or median heuristic).
    """
    squared = pooled_squared_distances(x, y, reference=reference).fill_diagonal_(0.0)
    if lengthscale is None:
        scale = kernel.resolve_lengthscale(squared)
    else:
        scale = torch.tensor(lengthscale, dtype=squared.dtype, device=squared.device)
    return kernel.from_squared_distances(squared, scale).fill_diagonal_(0.0), float(scale)


def within_sums(memberships: torch.Tensor, kernel_matrix: torch.Tensor) -> torch.Tensor:
    """s'Ks for every row s of a 0/1 matrix S (P, N) and a symmetric K (N, N), in float64.

    Splitting the samples into halves a and b, s'Ks = sa'Kaa sa + 2 sa'Kab sb + sb'Kbb sb, so the
    products Sa @ [Kaa Kab] and Sb @ Kbb give every term: 3/4 of the multiply-adds of S @ K.
    """
    half = kernel_matrix.shape[0] // 2
    first, second = memberships[:, :half], memberships[:, half:]
    from_first = first @ kernel_matrix[:half]
    from_second = second @ kernel_matrix[half:, half:]
    as_float64 = dict(dim=1, dtype=torch.float64)
    return (
        (from_first[:, :half] * first).sum(**as_float64)
        + 2.0 * (from_first[:, half:] * second).sum(**as_float64)
        + (from_second * second).sum(**as_float64)
    )


def mmd2_of_memberships(
    kernel_matrix: torch.Tensor, members: torch.Tensor, *, row_sums: torch.Tensor | None = None
) -> torch.Tensor:
    """Unbiased MMD^2 (Gretton et al., JMLR 2012, eq. 3) of P relabellings of a pooled sample.

    ``kernel_matrix`` K (N, N) is the pooled kernel matrix with a zero diagonal; row p of
    ``members`` (P, n) lists the samples that relabelling p puts in the first sample, the other
    m = N - n form the second. With s the 0/1 membership vector of a row, r = K 1 (``row_sums``,
    float64; computed if not given) and T = 1'K1::

        within first  = s'Ks,    across = s'r - s'Ks,    within second = T - 2 s'r + s'Ks

    so the (P, N) membership matrix S, one product with K (:func:`within_sums`) and one with r
    give all P statistics. Sums are accumulated in float64.
    """
    n_rows, n = members.shape
    m = kernel_matrix.shape[0] - n
    if row_sums is None:
        row_sums = kernel_matrix.sum(dim=1, dtype=torch.float64)
    total = row_sums.sum()
    memberships = kernel_matrix.new_zeros(n_rows, kernel_matrix.shape[0])
    memberships.scatter_(1, members, 1.0)
    within_first = within_sums(memberships, kernel_matrix)
    in_first = memberships.to(row_sums.dtype) @ row_sums
    across = in_first - within_first
    within_second = total - 2.0 * in_first + within_first
    return within_first / (n * (n - 1)) + within_second / (m * (m - 1)) - 2.0 * across / (n * m)


def _first_sample(kernel_matrix: torch.Tensor, n_first: int) -> torch.Tensor:
    return torch.arange(n_first, device=kernel_matrix.device)[None]


def null_mmd2(
    kernel_matrix: torch.Tensor,
    n_first: int,
    *,
    n_perm: int,
    generator: torch.Generator | None = None,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
) -> tuple[torch.Tensor, Iterator[torch.Tensor]]:
    """Observed and relabelled unbiased MMD^2 of a pooled kernel matrix, for a permutation test.

    Returns ``(observed, chunks)``: the MMD^2 of the first ``n_first`` samples against the rest,
    and an iterator over chunks of the MMD^2 of ``n_perm`` random relabellings. Both are computed
    from the kernel matrix rounded to :func:`exact_grid`, with exact sums, so they can be compared
    exactly. Rounding moves each MMD^2 by at most twice the grid step (at most 2.4e-4 times the
    largest kernel value; in practice the rounding errors average out to far less).
    """
    grid, step = exact_grid(kernel_matrix)
    row_sums = grid.sum(dim=1, dtype=torch.float64)
    observed = step * mmd2_of_memberships(grid, _first_sample(grid, n_first), row_sums=row_sums)[0]
    chunk_rows = rows_per_chunk(
        grid.shape[0], bytes_per_entry=_BYTES_PER_ENTRY, max_chunk_bytes=max_chunk_bytes
    )
    chunk_rows = min(chunk_rows, _MAX_CHUNK_ROWS)
    chunks = member_chunks(
        n_perm,
        grid.shape[0],
        n_first,
        chunk_rows=chunk_rows,
        generator=generator,
        device=grid.device,
    )
    return observed, (
        step * mmd2_of_memberships(grid, members, row_sums=row_sums) for members in chunks
    )


def mmd_test(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    kernel: Kernel,
    n_perm: int | None,
    generator: torch.Generator | None = None,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    lengthscale: float | None = None,
    reference: ReferenceGeometry | None = None,
) -> MMDTestResult:
    """Unbiased MMD^2 of ``x`` vs ``y`` and its permutation p-value; see :func:`kernel_mmd`.

    ``reference``: :func:`reference_geometry` of ``x``, if already known.
    """
    kernel_matrix, used_lengthscale = pooled_kernel_matrix(
        x, y, kernel, lengthscale=lengthscale, reference=reference
    )
    n = x.shape[0]
    score = mmd2_of_memberships(kernel_matrix, _first_sample(kernel_matrix, n))[0]
    if n_perm is None:
        return MMDTestResult(score, None, used_lengthscale)
    observed, null_chunks = null_mmd2(
        kernel_matrix, n, n_perm=n_perm, generator=generator, max_chunk_bytes=max_chunk_bytes
    )
    n_at_least = sum(int((null >= observed).sum()) for null in null_chunks)
    p_value = permutation_p_value(n_at_least, n_perm)
    return MMDTestResult(score, score.new_tensor(p_value), used_lengthscale)


def _check_mmd_options(n_perm: int | None, generator: torch.Generator | None) -> None:
    check(
        n_perm is None or (isinstance(n_perm, int) and n_perm >= 1),
        f"n_perm must be a positive int (try 1000), got {n_perm!r}.",
    )
    check_generator(generator)


def kernel_mmd(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    n_perm: int | None = 1000,
    kernel: Kernel | None = None,
    generator: torch.Generator | None = None,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Kernel two-sample test of ``x`` (n, D) vs ``y`` (m, D): returns ``(mmd2, p_value)``.

    ``mmd2`` is the unbiased estimate of the squared MMD (Gretton et al., JMLR 2012, eq. 3)::

        sum_{i != j} k(x_i, x_j) / (n (n-1)) + sum_{i != j} k(y_i, y_j) / (m (m-1))
            - 2 sum_{i, j} k(x_i, y_j) / (n m)

    It is an average of terms whose expectation is the population MMD^2, so it has no bias, but
    it can come out slightly negative when the two distributions are (nearly) the same.

    ``p_value`` comes from a permutation test with ``n_perm`` random relabellings of the pooled
    samples, all evaluated as matrix products on the pooled kernel matrix (computed once), in
    chunks of at most ``max_chunk_bytes`` (the N x N kernel matrix itself must fit in memory).
    p = (1 + #{relabelled MMD^2 >= observed}) / (1 + n_perm): counting the observed labelling as
    one of the relabellings keeps the test exact and the p-value above 0, whose claim "no
    relabelling could do this" a finite sample of relabellings cannot support (Phipson & Smyth,
    "Permutation p-values should never be zero", 2010); the smallest value is 1 / (1 + n_perm).
    Relabellings are drawn on the CPU from ``generator`` (a CPU ``torch.Generator``; default:
    torch's global one) and summed exactly (see ``permutation.exact_grid``), so a seeded generator
    reproduces the p-value bit for bit on any device and for any chunk size. ``n_perm=None``
    skips the test and returns ``(mmd2, None)``.

    ``kernel`` defaults to ``GaussianKernel()`` with the median heuristic over the pooled sample.
    The pooled sample is the same for every relabelling, so is the kernel matrix, and the test
    stays exact; a lengthscale taken from ``x`` alone would change with the relabelling. Both
    results are 0-dim float64 (float32 on MPS) tensors on the device of ``x``.
    """
    _check_mmd_options(n_perm, generator)
    x = check_features(x, name="x")
    y = check_features(y, name="y")
    check(
        x.shape[1] == y.shape[1],
        f"x and y must have the same number of features, got {x.shape[1]} and {y.shape[1]}.",
    )
    check(
        x.device == y.device, f"x and y must be on the same device, got {x.device} and {y.device}."
    )
    result = mmd_test(
        x.detach(),
        y.detach(),
        kernel=GaussianKernel() if kernel is None else kernel,
        n_perm=n_perm,
        generator=generator,
        max_chunk_bytes=max_chunk_bytes,
    )
    return result.score, result.p_value


class KernelMMDDriftDetector(Detector):
    """Drift detector based on the kernel MMD two-sample test (Gretton et al., JMLR 2012).

    The score is the unbiased MMD^2 between the reference features and the incoming features (it
    can be slightly negative without drift); the p-value comes from a permutation test with
    ``n_perm`` relabellings, all batched as matrix products; see :func:`kernel_mmd`. It is never
    exactly 0: the smallest value is 1 / (1 + n_perm).

    Options (keyword-only): ``kernel`` (default ``GaussianKernel()`` with the median heuristic over
    the pooled sample, which keeps the permutation test exact; the value used by the last test is
    ``detector.lengthscale_``), ``n_perm``, ``return_p_value`` (``forward`` returns the p-value
    instead of the score), ``seed`` (every test draws the same relabellings, so p-values reproduce
    exactly) or ``generator`` (a CPU ``torch.Generator`` that advances from test to test; default:
    torch's global generator), and ``max_chunk_bytes`` (memory bound for a chunk of relabellings).
    The squared distances within the reference are computed on the first test and reused by later
    ones (recomputed when the reference changes), which halves the distance work of a test whose
    batch is as large as the reference.

    Calibrated mode, as in TorchDrift: ``fit(reference_features, n_test=k)`` simulates the null
    distribution once, from ``n_perm`` random splits of the reference into ``N - k`` and ``k``
    samples, and fits a shifted gamma distribution to it. Then ``base_outputs`` keeps a random
    ``N - k`` of the reference samples, the lengthscale is fixed (median heuristic over the whole
    reference, unless the kernel fixes one), and ``compute_p_value`` costs a single MMD^2 plus the
    gamma survival function. That p-value is approximate, and it requires exactly k test samples.
    """

    def __init__(
        self,
        *,
        kernel: Kernel | None = None,
        n_perm: int = 1000,
        return_p_value: bool = False,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    ) -> None:
        super().__init__(return_p_value=return_p_value)
        _check_mmd_options(n_perm, generator)
        check(n_perm is not None, "n_perm must be a positive int (try 1000), got None.")
        check(seed is None or generator is None, "pass either seed or generator, not both.")
        check(max_chunk_bytes > 0, f"max_chunk_bytes must be positive, got {max_chunk_bytes}.")
        self.kernel = GaussianKernel() if kernel is None else kernel
        self.n_perm = n_perm
        self.seed = seed
        self.generator = generator
        self.max_chunk_bytes = max_chunk_bytes
        self.lengthscale_: float | None = None
        self._reference_cache: tuple[torch.Tensor, int, ReferenceGeometry] | None = None
        self.register_buffer("calibrated_n_test", torch.empty(0, dtype=torch.long))
        self.register_buffer("calibrated_lengthscale", torch.empty(0, dtype=torch.float64))
        self.register_buffer("null_gamma", torch.empty(0, dtype=torch.float64))

    @property
    def is_calibrated(self) -> bool:
        """Whether the detector was fitted with ``n_test`` (gamma-calibrated p-values)."""
        return self.calibrated_n_test.numel() > 0

    def _clear_calibration(self) -> None:
        device = self.base_outputs.device
        self.calibrated_n_test = torch.empty(0, dtype=torch.long, device=device)
        self.calibrated_lengthscale = torch.empty(0, dtype=torch.float64, device=device)
        self.null_gamma = torch.empty(0, dtype=torch.float64, device=device)

    def _generator(self) -> torch.Generator | None:
        if self.seed is not None:
            return torch.Generator().manual_seed(self.seed)
        return self.generator

    def fit(
        self, reference_features: torch.Tensor, *, n_test: int | None = None
    ) -> KernelMMDDriftDetector:
        """Store the reference features; with ``n_test``, also calibrate the null distribution."""
        if n_test is None:
            self._clear_calibration()
            return super().fit(reference_features)
        reference = check_features(reference_features, name="reference_features").detach()
        n_total = reference.shape[0]
        check(
            isinstance(n_test, int) and 2 <= n_test <= n_total - 2,
            f"n_test must be an int between 2 and {n_total - 2} (the number of reference samples "
            f"minus 2, so that both parts of a split have 2 samples), got {n_test!r}.",
        )
        device = self.base_outputs.device
        reference = reference.to(device)
        generator = self._generator()
        kernel_matrix, lengthscale = pooled_kernel_matrix(reference, reference[:0], self.kernel)
        _, null_chunks = null_mmd2(
            kernel_matrix,
            n_total - n_test,
            n_perm=self.n_perm,
            generator=generator,
            max_chunk_bytes=self.max_chunk_bytes,
        )
        null = torch.cat(list(null_chunks))
        keep = (
            random_memberships(1, n_total, n_total - n_test, generator=generator)[0].sort().values
        )
        self.base_outputs = reference[keep.to(device)].clone()
        as_float64 = dict(dtype=torch.float64, device=device)
        self.calibrated_n_test = torch.tensor(n_test, dtype=torch.long, device=device)
        self.calibrated_lengthscale = torch.tensor(lengthscale, **as_float64)
        self.null_gamma = torch.tensor(fit_shifted_gamma(null), **as_float64)
        self.lengthscale_ = lengthscale
        return self

    def _reference_geometry(self) -> ReferenceGeometry:
        """The reference's :class:`ReferenceGeometry`, computed once per reference and reused.

        It holds the squared distances within the reference: half of the distance work of a test
        whose batch is as large as the reference. The cache remembers which tensor (and which
        in-place version of it) it was computed from, so ``fit``, ``load_state_dict`` and
        ``.to(device)`` all make it recompute.
        """
        reference = self.base_outputs
        cached = self._reference_cache
        if cached is None or cached[0] is not reference or cached[1] != reference._version:
            cached = (reference, reference._version, reference_geometry(reference))
            self._reference_cache = cached
        return cached[2]

    def _mmd(self, features: torch.Tensor, n_perm: int | None) -> MMDTestResult:
        fixed = float(self.calibrated_lengthscale) if self.is_calibrated else None
        result = mmd_test(
            self.base_outputs,
            features,
            kernel=self.kernel,
            n_perm=n_perm,
            generator=self._generator(),
            max_chunk_bytes=self.max_chunk_bytes,
            lengthscale=fixed,
            reference=self._reference_geometry(),
        )
        self.lengthscale_ = result.lengthscale
        return result

    def _score(self, features: torch.Tensor) -> torch.Tensor:
        return self._mmd(features, None).score

    def _test(self, features: torch.Tensor) -> DriftTestResult:
        if not self.is_calibrated:
            score, p_value, _ = self._mmd(features, self.n_perm)
            assert p_value is not None
            return DriftTestResult(score, p_value)
        n_test = int(self.calibrated_n_test)
        check(
            features.shape[0] == n_test,
            f"this detector was calibrated for batches of exactly {n_test} samples "
            f"(fit(..., n_test={n_test})), got {features.shape[0]}; test batches of {n_test}, "
            f"or refit with fit(reference_features, n_test={features.shape[0]}), or fit without "
            "n_test to use the permutation test.",
        )
        score = self._mmd(features, None).score
        shape, loc, scale = self.null_gamma.tolist()
        return DriftTestResult(score, gamma_survival(score, shape, loc, scale))

    def extra_repr(self) -> str:
        calibrated = (
            f", calibrated for n_test={int(self.calibrated_n_test)}" if self.is_calibrated else ""
        )
        return f"n_perm={self.n_perm}, {super().extra_repr()}{calibrated}"

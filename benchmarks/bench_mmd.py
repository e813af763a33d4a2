"""Time the kernel MMD permutation test of drifttutor against TorchDrift and alibi-detect.

Run from the repository root, in the benchmark environment that has the peers installed:

    .venv-bench/bin/python benchmarks/bench_mmd.py            # everything
    .venv-bench/bin/python benchmarks/bench_mmd.py --quick    # peers skipped at n = 1024

For each size n (reference and test samples each) and feature dimension D, all three libraries
test the same float32 features (test = reference distribution + a moderate mean shift) with 1000
permutations on the CPU, with the same number of torch threads (``--threads``). Timing: one
warm-up call per library, then ``--rounds`` rounds that call drifttutor ``--calls-per-round`` times
and each peer once, interleaved so that all three see the same background load; each time is the
median over its calls. Memory: a separate pass in a child process, started with glibc's
``MALLOC_MMAP_THRESHOLD_=65536`` so that every freed block of 64 KiB or more goes back to the
operating system and the resident set size follows the memory in use; the reported value is the
growth of the peak resident set size (Linux VmHWM, reset through /proc/self/clear_refs) during
one call. It counts every allocation the call makes, torch's included (tracemalloc would see
only Python's).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from importlib.metadata import version

import torch

from drifttutor.detectors import KernelMMDDriftDetector

N_PERM = 1000
LIBRARIES = ("drifttutor", "TorchDrift", "alibi-detect")


def shifted_features(n: int, d: int, *, seed: int = 0, strength: float = 2.0):
    """Reference N(0, I) and test N(delta, I) features (n, d); |delta|^2 = s^2 sqrt(d) / n."""
    generator = torch.Generator().manual_seed(seed)
    reference = torch.randn(n, d, generator=generator)
    test = torch.randn(n, d, generator=generator) + strength * d**0.25 / (n * d) ** 0.5
    return reference, test


def make_call(library: str, reference: torch.Tensor, test: torch.Tensor) -> Callable[[], float]:
    """A function that runs one test of ``test`` against ``reference`` and returns the p-value."""
    if library == "drifttutor":
        detector = KernelMMDDriftDetector(n_perm=N_PERM, seed=0).fit(reference)
        return lambda: float(detector.compute_p_value(test))
    if library == "TorchDrift":
        import torchdrift.detectors

        peer = torchdrift.detectors.KernelMMDDriftDetector(n_perm=N_PERM)
        peer.fit(reference)
        return lambda: float(peer.compute_p_value(test))
    from alibi_detect.cd import MMDDrift

    alibi = MMDDrift(reference.numpy(), backend="pytorch", n_permutations=N_PERM, device="cpu")
    test_array = test.numpy()
    return lambda: float(alibi.predict(test_array)["data"]["p_val"])


def timed(call: Callable[[], float]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def peak_rss_growth_mib(call: Callable[[], float]) -> float:
    """Run ``call`` once and return how far the peak resident set size rose above the start."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    call()
    return (_status_kib("VmHWM") - before) / 1024


def configurations(args) -> list[tuple[int, int, list[str]]]:
    configs = []
    for n in args.sizes:
        for d in args.dims:
            libraries = [
                lib for lib in LIBRARIES if not (args.quick and n >= 1024) or lib == LIBRARIES[0]
            ]
            configs.append((n, d, libraries))
    return configs


def memory_pass(args) -> None:
    """Child process: print one JSON line {n, d, library, mib} per measurement."""
    tiny_reference, tiny_test = shifted_features(10, 8)
    for library in LIBRARIES:  # one-time costs (thread pools, lazy imports) are not counted
        make_call(library, tiny_reference, tiny_test)()
    for n, d, libraries in configurations(args):
        reference, test = shifted_features(n, d)
        for library in libraries:
            try:
                mib = peak_rss_growth_mib(make_call(library, reference, test))
            except OSError:
                mib = None
            print(json.dumps({"n": n, "d": d, "library": library, "mib": mib}), flush=True)


def measure_memory(args) -> dict[tuple[int, int, str], float | None]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    command = [sys.executable, os.path.abspath(__file__), "--memory-pass", *sys.argv[1:]]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    memory = {}
    for line in result.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            memory[row["n"], row["d"], row["library"]] = row["mib"]
    return memory


def timing_pass(args, started: float) -> list[dict]:
    rows = []
    for n, d, libraries in configurations(args):
        reference, test = shifted_features(n, d)
        calls = {library: make_call(library, reference, test) for library in libraries}
        p_values = {library: call() for library, call in calls.items()}  # warm-up
        times: dict[str, list[float]] = {library: [] for library in libraries}
        for _ in range(args.rounds):
            for library, call in calls.items():
                repeats = args.calls_per_round if library == "drifttutor" else 1
                times[library].extend(timed(call) for _ in range(repeats))
        seconds = {library: statistics.median(values) for library, values in times.items()}
        rows.append({"n": n, "d": d, "seconds": seconds, "p_values": p_values})
        print(f"timed n={n} D={d} after {time.perf_counter() - started:.0f} s", flush=True)
    return rows


def fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def print_tables(args, rows, memory, load_before, started) -> None:
    print()
    print(
        f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU; torch "
        f"{torch.__version__.split('+')[0]} with {args.threads} thread(s); TorchDrift "
        f"{version('torchdrift')}, alibi-detect {version('alibi-detect')}; {N_PERM} permutations; "
        f"{args.rounds} rounds; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} "
        f"after; {time.perf_counter() - started:.0f} s in all."
    )
    print()
    print("| n | D | drifttutor | TorchDrift | alibi-detect | vs TorchDrift | vs alibi-detect |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        seconds = row["seconds"]
        ours = seconds["drifttutor"]
        cells = [fmt_time(seconds[lib]) if lib in seconds else "skipped" for lib in LIBRARIES]
        ratios = [f"{seconds[lib] / ours:.0f}x" if lib in seconds else "–" for lib in LIBRARIES[1:]]
        print(f"| {row['n']} | {row['d']} | " + " | ".join(cells + ratios) + " |")
    print()
    print(
        "| n | D | peak RSS growth, MiB (drifttutor / TorchDrift / alibi-detect) "
        "| p-value (drifttutor / TorchDrift / alibi-detect) |"
    )
    print("|---:|---:|---:|---:|")
    for row in rows:
        key = row["n"], row["d"]
        mib = [memory.get((*key, lib)) for lib in LIBRARIES]
        mib_cells = " / ".join("–" if value is None else f"{value:.0f}" for value in mib)
        p_cells = " / ".join(
            f"{row['p_values'][lib]:.3f}" if lib in row["p_values"] else "–" for lib in LIBRARIES
        )
        print(f"| {row['n']} | {row['d']} | {mib_cells} | {p_cells} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="skip the peers at n >= 1024")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 256, 512, 1024])
    parser.add_argument("--dims", type=int, nargs="+", default=[512, 1280])
    parser.add_argument("--threads", type=int, default=2, help="torch threads for all libraries")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after the warm-up")
    parser.add_argument("--calls-per-round", type=int, default=3, help="drifttutor calls a round")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory pass")
    parser.add_argument("--memory-pass", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    if args.memory_pass:
        memory_pass(args)
        return
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    memory = {} if args.no_memory else measure_memory(args)
    print(f"memory pass done after {time.perf_counter() - started:.0f} s", flush=True)
    rows = timing_pass(args, started)
    print_tables(args, rows, memory, load_before, started)


if __name__ == "__main__":
    main()

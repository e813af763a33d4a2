"""Time ``drifttutor walkthrough`` against the straightforward TorchDrift + Lightning reference.

Runs each walkthrough as a subprocess, alternating which goes first, ``--repeats`` times, and
prints a Markdown table: median wall time, CPU time, peak memory, and the results (accuracy,
p-values) so that speed is not bought with wrong answers. Ours runs cold (``--no-cache``, default
options otherwise); the reference runs with its defaults (3 Lightning epochs, 1 loader worker per
spare core). Memory is measured twice: the largest single process (``wait4``'s ``ru_maxrss``) and
the sum over the process tree (DataLoader workers included), sampled every 0.1 s with psutil.

From the repository root (see benchmarks/README.md)::

    DRIFTTUTOR_DATA=../shared/data .venv/bin/python benchmarks/bench_walkthrough.py --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    import psutil
except ImportError:  # the tree-RSS column is left out
    psutil = None

ROOT = Path(__file__).resolve().parents[1]


def tree_rss(pid: int) -> int:
    """Resident memory of a process and all its descendants, in bytes (0 once it is gone)."""
    try:
        process = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])
    except psutil.Error:
        return 0


def run_once(command: list[str], output: Path, log: Path, env: dict) -> dict:
    """Run ``command`` to completion; wall and CPU seconds, peak RSS (MiB), and its metrics.json."""
    start = time.perf_counter()
    with log.open("w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        peak_tree = 0
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if psutil is not None:
                peak_tree = max(peak_tree, tree_rss(process.pid))
            time.sleep(0.1)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen
    if process.returncode != 0:
        sys.exit(f"{' '.join(command)} failed with status {process.returncode}; its output:\n{log.read_text()[-4000:]}")
    metrics = json.loads((output / "metrics.json").read_text())
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,  # includes reaped children (loader workers)
        "max_rss_mib": usage.ru_maxrss / 1024,  # kB on Linux: the largest single process
        "tree_rss_mib": peak_tree / 2**20 if psutil is not None else None,
        "test_accuracy": metrics["test_accuracy"],
        "benign_p": metrics["batches"]["benign"]["p_value"],
        "drifted_p": metrics["batches"]["drifted"]["p_value"],
    }


def table(results: dict[str, list[dict]], labels: dict[str, str]) -> str:
    median = {name: {key: statistics.median(run[key] for run in runs) for key in runs[0] if runs[0][key] is not None} for name, runs in results.items()}
    columns = ["walkthrough", "median wall (s)", "each run (s)", "median CPU (s)", "peak RSS, largest process (MiB)",
               "peak RSS, process tree (MiB)", "test accuracy", "benign p-value", "drifted p-value"]
    rows = [f"| {' | '.join(columns)} |", "|" + "---|" * len(columns)]
    for name, runs in results.items():
        m = median[name]
        tree = f"{m['tree_rss_mib']:.0f}" if "tree_rss_mib" in m else "n/a"
        each = ", ".join(f"{run['wall_s']:.1f}" for run in runs)
        rows.append(
            f"| {labels[name]} | {m['wall_s']:.1f} | {each} | {m['cpu_s']:.1f} | {m['max_rss_mib']:.0f} | {tree} | "
            f"{m['test_accuracy']:.3f} | {m['benign_p']:.3g} | {m['drifted_p']:.3g} |"
        )
    ours, reference = median["ours"], median["reference"]
    tree_ratio = f"{ours['tree_rss_mib'] / reference['tree_rss_mib']:.2f}" if "tree_rss_mib" in ours else "n/a"
    rows.append(
        f"| **ours / reference** | **{ours['wall_s'] / reference['wall_s']:.2f}** | | {ours['cpu_s'] / reference['cpu_s']:.2f} | "
        f"{ours['max_rss_mib'] / reference['max_rss_mib']:.2f} | {tree_ratio} | | | |"
    )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs of each walkthrough (alternating)")
    parser.add_argument("--data-root", default=os.environ.get("DRIFTTUTOR_DATA"), help="folder holding hymenoptera_data/ (default: $DRIFTTUTOR_DATA)")
    parser.add_argument("--ours-python", default=str(ROOT / ".venv" / "bin" / "python"), help="Python with drifttutor installed")
    parser.add_argument("--reference-python", default=str(ROOT / ".venv-bench" / "bin" / "python"), help="Python with TorchDrift and drifttutor installed")
    parser.add_argument("--json", type=Path, help="also write every run's numbers to this file")
    args = parser.parse_args()
    if not args.data_root:
        parser.error("pass --data-root or set DRIFTTUTOR_DATA to the folder holding hymenoptera_data/")

    with tempfile.TemporaryDirectory(prefix="bench-walkthrough-") as scratch:
        scratch = Path(scratch)
        env = {**os.environ, "MPLBACKEND": "Agg", "DRIFTTUTOR_DATA": str(Path(args.data_root).resolve()), "DRIFTTUTOR_CACHE": str(scratch / "cache")}
        commands = {
            "ours": lambda out: [args.ours_python, "-m", "drifttutor.cli", "walkthrough", "--no-cache", "--quiet", "--output", str(out)],
            "reference": lambda out: [args.reference_python, "benchmarks/reference_walkthrough.py", "--output", str(out)],
        }
        results: dict[str, list[dict]] = {"reference": [], "ours": []}
        load_before = os.getloadavg()
        for repeat in range(args.repeats):
            order = ["ours", "reference"] if repeat % 2 == 0 else ["reference", "ours"]
            for name in order:
                output = scratch / f"{name}-{repeat}"
                run = run_once(commands[name](output), output, scratch / f"{name}-{repeat}.log", env)
                results[name].append(run)
                print(f"run {repeat + 1}/{args.repeats} {name}: {run['wall_s']:.1f} s", file=sys.stderr)
        load_after = os.getloadavg()

    labels = {"reference": "reference (TorchDrift + Lightning, `benchmarks/reference_walkthrough.py`)", "ours": "`drifttutor walkthrough --no-cache`"}
    print(table(results, labels))
    print(
        f"\n{args.repeats} runs each, alternating; {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"load average {load_before[0]:.1f} before and {load_after[0]:.1f} after."
    )
    if args.json:
        args.json.write_text(json.dumps({"results": results, "load_before": load_before, "load_after": load_after}, indent=2) + "\n")


if __name__ == "__main__":
    main()

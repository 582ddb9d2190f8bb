"""Benchmark: start-up cost of headlab against `import torch, transformers`, in the same run.

Each command runs in a fresh Python process (as a user's shell or notebook kernel would), `--repeats`
times after one warm-up run (so the OS file cache is warm for every command alike); the median and the
minimum wall time are reported, and each headlab figure as a ratio to the torch + transformers baseline.

Commands:
- baseline: `python -c "import torch, transformers"`
- `python -c "import headlab"` (the lazy facade: names are imported on first use)
- `python -c "import headlab; headlab.load"` (touching the loader imports torch and transformers)
- `headlab --help` and `headlab zoo list` (the CLI; no torch needed for either)

Writes JSON and Markdown to benchmarks/results/. Usage: python benchmarks/startup.py [--repeats N] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
HEADLAB_CLI = [sys.executable, "-c", "from headlab.cli import app; app()"]

COMMANDS: dict[str, list[str]] = {
    "import torch, transformers (baseline)": [sys.executable, "-c", "import torch, transformers"],
    "import headlab": [sys.executable, "-c", "import headlab"],
    "import headlab; headlab.load": [sys.executable, "-c", "import headlab; headlab.load"],
    "headlab --help": [*HEADLAB_CLI, "--help"],
    "headlab zoo list": [*HEADLAB_CLI, "zoo", "list"],
}


def wall_times(command: list[str], repeats: int) -> list[float]:
    """Seconds of `repeats` runs of `command` after one warm-up run; a failing command is an error."""
    subprocess.run(command, check=True, capture_output=True)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per command (default 5)")
    parser.add_argument("--quick", action="store_true", help="one timed run each, results not saved")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    rows = []
    for label, command in COMMANDS.items():
        times = wall_times(command, repeats)
        rows.append({"command": label, "median_s": statistics.median(times), "min_s": min(times)})
    baseline = rows[0]["median_s"]
    for row in rows:
        row["ratio_to_baseline"] = row["median_s"] / baseline
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    lines = [
        f"Machine: {machine}; median of {repeats} fresh processes after a warm-up run.",
        "",
        "| command | median s | min s | / import torch, transformers |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| `{r['command']}` | {r['median_s']:.2f} | {r['min_s']:.2f} | {r['ratio_to_baseline']:.2f}x |"
        for r in rows
    ]
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "startup.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
        (RESULTS / "startup.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

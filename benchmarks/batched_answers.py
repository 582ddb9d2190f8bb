"""Benchmark: answering POPE questions in batches (`headlab report pope --batch-size N`) against batch 1.

The same run each time: the first `--questions` questions (default 64) of a synthetic POPE split (the
report's own synthetic files), answered greedily with 4 new tokens by the zoo LLaVA (`zoo:llava`, trained
tiny: CLIP tower 2 layers, Llama 2 layers) under the conditions "none" (plain), "vhr" and "var"
(`runs.answering.answer_all`, what the report calls), at batch sizes 1, 8 and 32, in this process after one
warm-up. Reported: questions per second per condition and batch size, the speed-up over batch 1, and whether
every answer equals batch 1's (the batches are left-padded and each row keeps its own intervention state).

Writes JSON and Markdown to benchmarks/results/. Usage: python benchmarks/batched_answers.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

import headlab as hl
from headlab.datasets.scenes import write_pope_benchmark
from headlab.reports.pope import load_splits
from headlab.runs.answering import answer_all
from headlab.runs.answers import AnswerLog, ModelIdentity

RESULTS = Path(__file__).parent / "results"
CONDITIONS = ("none", "vhr", "var")


def _answers(lm, split, condition: str, batch: int, folder: Path) -> tuple[float, dict]:
    """(seconds, question id -> answer) of one condition at one batch size, on a fresh answer log."""
    folder.mkdir(parents=True, exist_ok=True)
    log = AnswerLog(folder / f"{condition}_{batch}.jsonl", ModelIdentity.of(lm, "zoo:llava"))
    start = time.perf_counter()
    run = answer_all(lm, [split], [condition], log, max_new_tokens=4, var_tau=20.0, batch_size=batch)
    seconds = time.perf_counter() - start
    assert not run.failed, run.failed
    return seconds, dict(log.get(condition, split.name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="16 questions, batch sizes 1 and 8")
    args = parser.parse_args()
    n, sizes = (16, (1, 8)) if args.quick else (args.questions, (1, 8, 32))
    torch.manual_seed(0)
    lm = hl.load("zoo:llava")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = write_pope_benchmark(folder / "data")
        split = load_splits([sorted(data.glob("*.json"))[0]], None, n)[0]
        _answers(lm, split, "none", sizes[-1], folder / "warmup")  # imports, allocator, caches
        rows = []
        for condition in CONDITIONS:
            base_seconds, base = None, None
            for batch in sizes:
                seconds, answers = _answers(lm, split, condition, batch, folder)
                if batch == 1:
                    base_seconds, base = seconds, answers
                rows.append(
                    {
                        "condition": condition,
                        "batch": batch,
                        "questions": len(answers),
                        "seconds": round(seconds, 3),
                        "questions_per_s": round(len(answers) / seconds, 1),
                        "speedup": round(base_seconds / seconds, 2),
                        "same_answers": answers == base,
                    }
                )
                print(rows[-1], flush=True)
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "batched_answers.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    table = [
        f"Machine: {machine}. zoo:llava, {n} POPE questions, 4 new tokens, greedy.",
        "",
        "| condition | batch | questions/s | speed-up over batch 1 | answers equal batch 1 |",
        "|---|---|---|---|---|",
    ]
    table += [
        f"| {r['condition']} | {r['batch']} | {r['questions_per_s']} | {r['speedup']}x | "
        f"{'yes' if r['same_answers'] else 'NO'} |"
        for r in rows
    ]
    (RESULTS / "batched_answers.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()

"""Tensor parallelism (transformers' tp_plan="auto" under torchrun, gloo on the CPU here): each rank holds a
contiguous block of every layer's heads; capture records them under their global head indices, and
`Record.gathered()` joins the ranks' records into the statistics of one process that held every head.
Interventions and selected patterns need every head and are refused with the reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch
from conftest import assert_same_stats

import headlab as hl
from headlab.zoo.random_models import build_random

WORKER = textwrap.dedent(
    """
    import json, sys
    import torch, torch.distributed as dist
    import headlab as hl

    path, prompts, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo")
    lm = hl.load(path, tp_plan="auto")
    inputs = dict(lm.tokenizer(prompts, return_tensors="pt", padding=True))
    with torch.no_grad(), hl.capture(lm) as rec:
        logits = lm.model(**inputs).logits
    own = sorted(set(rec.head_stats["head"].tolist()))
    joined = rec.gathered().head_stats
    refusals = []
    for block in (lambda: hl.capture(lm, stats=None, patterns=hl.Select()), lambda: hl.intervene(lm, hl.HeadAblation(heads=[(0, 0)]))):
        try:
            with torch.no_grad(), block():
                lm.model(**inputs)
        except hl.HeadlabError as err:
            refusals.append(str(err))
    if dist.get_rank() == 0:
        joined.to_json(out + ".stats.json", orient="records")
        torch.save(logits, out + ".logits.pt")
    with open(f"{out}.rank{dist.get_rank()}.json", "w") as f:
        json.dump({"tp": list(lm.tensor_parallel), "own": own, "refusals": refusals}, f)
    dist.destroy_process_group()
    """
)


def test_tensor_parallel_capture_equals_one_process(tmp_path):
    path = build_random("llama", tmp_path / "llama")
    prompts = ["The quick brown fox jumps over the lazy dog.", "Is there a cat?"]
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = str(tmp_path / "tp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node", "2", str(worker), str(path), json.dumps(prompts), out],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"tp.rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["tp"] for r in ranks] == [[0, 2], [1, 2]]
    assert ranks[0]["own"] == [0, 1] and ranks[1]["own"] == [2, 3]  # 4 heads, 2 per rank, global indices
    for r in ranks:
        assert (
            len(r["refusals"]) == 2
            and "tensor parallel" in r["refusals"][0]
            and "tensor parallel" in r["refusals"][1]
        )
    import pandas as pd

    joined = pd.read_json(tmp_path / "tp.stats.json", orient="records")
    whole = hl.load(path)
    whole.tokenizer.padding_side = "right"
    inputs = dict(whole.tokenizer(prompts, return_tensors="pt", padding=True))
    with torch.no_grad(), hl.capture(whole) as rec:
        logits = whole.model(**inputs).logits
    torch.testing.assert_close(torch.load(tmp_path / "tp.logits.pt"), logits, atol=1e-5, rtol=1e-5)
    assert_same_stats(joined.astype({"role": str}), rec.head_stats, atol=1e-5)

"""Benchmark: the cost of each intervention against the plain forward (CPU), at n = 1024 and 4096 tokens.

Model: a LLaVA-shaped random model of the real classes (the zoo's CLIP vision tower, 16 image tokens, and a
Llama language model with 4 layers, 8 heads of dim 64, d 512), batch 1, fp32, one prefill forward; the
plain forward is the model with torch SDPA and nothing attached. Target (issue): VHR, ACT and VAR under
1.3x. VHR's first step needs a with- and a without-image pass by definition, so it is reported as is, in
its two modes (branches in lockstep, ~3 prefills; text branch unscaled, prefill + text-only pass).
VAR runs with sink dimensions found on the BOS token and tau set to the 99th percentile of this model's sink
scores (random weights have no massive activations), so about 1% of the tokens are sinks and every layer
redistributes. ACT calibrates every head of layer 2 (the code's layer range for 4 layers) with the code's tau = 0.1 and beta = 0.4 (its
detection rebuilds the attention in query tiles from the logsumexp). PINE runs over k = 4 equal text
segments between a prefix (BOS + image) and a 16-token suffix, fused, against its reference engine (the
official algorithm one query at a time, explicit scores; finer-grained than the official code's per-segment
Python loop, so an upper bound on that approach's cost) at n = 1024; at 4096 the reference is not run.

Writes benchmarks/results/interventions.{json,md}. Usage: python benchmarks/interventions.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from itertools import pairwise
from pathlib import Path

import torch
import transformers as tf

import headlab as hl
from headlab.interventions import ACT, PINE, HeadScale, intervene
from headlab.interventions.var import VAR, find_sink_dims, sink_scores
from headlab.interventions.vhr import VHR
from headlab.zoo.training import llama_config

RESULTS = Path(__file__).parent / "results"


def build() -> hl.LoadedModel:
    zoo = hl.load("zoo:llava")
    tok = zoo.processor.tokenizer
    text = llama_config(tok, max_positions=8192, hidden=512, layers=4, heads=8, intermediate=1376)
    config = tf.LlavaConfig(
        vision_config=zoo.model.config.vision_config,
        text_config=text,
        image_token_index=zoo.model.config.image_token_index,
        image_seq_length=16,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    torch.manual_seed(0)
    model = tf.LlavaForConditionalGeneration(config).eval()
    return hl.describe(model, processor=zoo.processor)


def inputs_of(lm: hl.LoadedModel, n: int) -> dict:
    tok = lm.processor.tokenizer
    words = [i for i in range(len(tok)) if i not in tok.all_special_ids]
    g = torch.Generator().manual_seed(n)
    body = torch.tensor(words)[torch.randint(len(words), (n - 17,), generator=g)]
    ids = torch.cat([torch.tensor([tok.bos_token_id]), torch.full((16,), lm.image_token_id), body])[None]
    return {"input_ids": ids, "pixel_values": torch.randn(1, 3, 32, 32, generator=g)}


def spans_of(n: int, k: int = 4, prefix: int = 17, suffix: int = 16) -> tuple[tuple[int, int], ...]:
    """k equal segments between the prefix (BOS + image tokens) and a suffix."""
    edges = torch.linspace(prefix, n - suffix, k + 1).long().tolist()
    return tuple(pairwise(edges))


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--quick", action="store_true", help="n = 256 only, one repeat, nothing written (smoke test)"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096], help="sequence lengths")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the results are written")
    args = parser.parse_args()
    sizes, repeats = ((256,), 1) if args.quick else (tuple(args.sizes), 3)
    lm = build()
    rows = []
    for n in sizes:
        inputs = inputs_of(lm, n)
        dims = find_sink_dims(lm, inputs)
        states = lm.model(**inputs, output_hidden_states=True).hidden_states
        tau = float(torch.quantile(torch.cat([sink_scores(h[0], dims) for h in states[:-1]]), 0.99))
        conditions = {
            "plain": (),
            "HeadScale (1 head per layer)": (HeadScale(tuple((layer, 0) for layer in range(4)), factor=0.0),),
            "VHR (lockstep)": (VHR(),),
            "VHR (text branch unscaled)": (VHR(scale_text_branch=False),),
            "VAR": (VAR(dims=dims, tau=tau, layers=(0, 1, 2)),),
            "ACT (8 heads of layer 2)": (ACT(heads=tuple((2, h) for h in range(8))),),
            "PINE (k = 4, fused)": (PINE(spans=spans_of(n)),),
        }
        if n <= 1024 and not args.quick:
            conditions["PINE (k = 4, reference engine)"] = (PINE(spans=spans_of(n), engine="reference"),)
        base = None
        for name, interventions in conditions.items():
            if interventions:

                def step(interventions=interventions, inputs=inputs):
                    with intervene(lm, *interventions):
                        lm.model(**inputs)
            else:

                def step(inputs=inputs):
                    lm.model(**inputs)

            seconds = timed(step, 1 if "reference" in name else repeats)
            base = seconds if base is None else base
            rows.append({"n": n, "condition": name, "seconds": seconds, "ratio": seconds / base})
            print(f"n={n} {name}: {seconds:.3f} s ({seconds / base:.2f}x)", flush=True)
    if args.quick:
        return  # a smoke test: the measured tables stay as they are
    args.out.mkdir(exist_ok=True)
    earlier = args.out / "interventions.json"
    if earlier.is_file():  # a run at some sizes keeps the rows of the others
        kept = [r for r in json.loads(earlier.read_text())["rows"] if r["n"] not in sizes]
        rows = sorted(kept + rows, key=lambda r: r["n"])
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    earlier.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    lines = ["| n | condition | seconds | vs plain |", "|---|---|---|---|"]
    lines += [f"| {r['n']} | {r['condition']} | {r['seconds']:.3f} | {r['ratio']:.2f}x |" for r in rows]
    (args.out / "interventions.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Evidence: what PAINT (and PAI's CFG branch) does to POPE and CHAIR on the zoo's tiny LLaVA, and what the
boost costs per forward pass.

POPE: the zoo's held-out evaluation scenes (`zoo.llava.evaluate_llava`'s: 150 scenes from image id 200000,
partner rate 0.5, its three splits), answered by the first greedy token of left-padded batches (PAICFG
needs the last column to be each row's last token). CHAIR: the shipped synthetic CHAIR set
(`reports.chair.write_chair_benchmark`, `--chair-images` scenes from id 300000), captions of up to 16
greedy tokens for the caption prompt, scored by `datasets.chair`. Conditions: the plain model; PAINT with
the official defaults (alpha 0.7, beta 0.3, ratio 0.25; both language layers of the 2-layer model, as
layers 2..31 of 32 scale to it), with alpha 0.3 and 0.9 (the repo's last CHAIR command), headlab's
per-head visual-sensitivity variant; PAICFG alone (gamma 1.1, cutoff 0.1); PAINT + PAICFG (the paper's
runs). Overhead: one forward pass of a long prompt (the image plus filler text, `--tokens` tokens), plain
through headlab's fused attention without an edit (`_Unedited`: every language layer through the same fused
call PAINT starts from, the model's own SDPA otherwise) vs inside PAINT (that call plus the boosted last
row), best of `--repeats`, interleaved in the same run; the ratio PAINT / unedited is the boost's cost.
The model's own attention (transformers' SDPA with its dense mask) is timed beside them.

Writes benchmarks/results/paint_evidence.{json,md}. Usage: python benchmarks/paint_evidence.py
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

import headlab as hl
from headlab.datasets import chair, scenes
from headlab.datasets.pope import PopeQuestion, score_pope
from headlab.interventions import Intervention, Patch, intervene
from headlab.interventions.paint import PAICFG, PAINT
from headlab.zoo import llava as llava_recipe

RESULTS = Path(__file__).parent / "results"
CONDITIONS = {
    "plain": (),
    "PAINT (a 0.7, b 0.3)": (PAINT(),),
    "PAINT (a 0.3)": (PAINT(alpha=0.3),),
    "PAINT (a 0.9)": (PAINT(alpha=0.9),),
    "PAINT (a 3.0, stress)": (PAINT(alpha=3.0),),
    "PAINT per-head (headlab)": (PAINT(head_sensitivity=True),),
    "PAICFG (g 1.1)": (PAICFG(),),
    "PAINT + PAICFG": (PAINT(), PAICFG()),
}


def _scope(lm, interventions):
    return intervene(lm, *interventions) if interventions else contextlib.nullcontext()


def _batch(lm, prompts, images):
    lm.processor.tokenizer.padding_side = "left"
    return dict(lm.processor(text=prompts, images=images, return_tensors="pt", padding=True))


def first_tokens(lm, questions, images, batch_size: int = 64) -> dict[int, str]:
    """The greedy first answer token of each question (left-padded batches, last column)."""
    out = {}
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        inputs = _batch(
            lm, [llava_recipe.conversation(q.text) for q in chunk], [images[q.image] for q in chunk]
        )
        best = lm.model(**inputs).logits[:, -1].argmax(-1)
        for q, tok in zip(chunk, best.tolist(), strict=True):
            out[q.question_id] = lm.processor.tokenizer.convert_ids_to_tokens(tok)
    return out


def pope(lm, interventions, n_images: int, seed: int = 7777) -> dict:
    made = scenes.make_scenes(n_images, prior=0.5, seed=seed, start_id=200_000)
    images = {s.filename: scenes.render(s) for s in made}
    out = {}
    with _scope(lm, interventions):
        for split in ("random", "popular", "adversarial"):
            questions = [PopeQuestion(**r) for r in scenes.pope_questions(made, split, seed=seed)]
            score = score_pope(questions, first_tokens(lm, questions, images))
            out[split] = {
                k: getattr(score, k) for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")
            }
    return out


def captions(lm, interventions, data: Path, n_images: int, tokens: int = 16, batch_size: int = 20) -> dict:
    from headlab.reports.chair import load_chair_split
    from headlab.runs.answering import generate_answers, prompt_for

    split, vocab, truth = load_chair_split(data, None, n_images)
    got = {}
    with _scope(lm, interventions):
        for start in range(0, len(split.questions), batch_size):
            chunk = split.questions[start : start + batch_size]
            prompts = [prompt_for(lm, q) for q in chunk]
            images = [scenes_image(split, q) for q in chunk]
            for q, text in zip(chunk, generate_answers(lm, prompts, images, tokens), strict=True):
                got[q.question_id] = text
    score = chair.score_chair(got, truth, vocab)
    return {k: getattr(score, k) for k in ("chair_s", "chair_i", "recall", "length")}


def scenes_image(split, q):
    from headlab.inputs import open_image

    return open_image(split.image_file(q))


class _Unedited(Intervention):
    """Every language layer through headlab's fused attention, unedited (a head scale of 1): the path PAINT
    adds its boosted row to."""

    def bind(self, lm):
        return _UneditedPatch()


class _UneditedPatch(Patch):
    def head_scale(self, call):
        return torch.ones(1, call.n_heads, device=call.q.device)


def overhead(lm, n_tokens: int, repeats: int) -> dict:
    """Seconds per forward of one long prompt: plain vs PAINT (best of `repeats`), and the ratio."""
    made = scenes.make_scenes(1, prior=0.5, seed=5)
    sentence = scenes.question("apple")
    per = len(lm.processor.tokenizer(sentence, add_special_tokens=False)["input_ids"])
    # about 40 tokens go to the image and the template
    filler = " ".join([sentence] * max(1, (n_tokens - 40) // per))
    inputs = _batch(lm, [llava_recipe.conversation(filler)], [scenes.render(made[0])])
    n = inputs["input_ids"].shape[1]

    scopes = {
        "model": contextlib.nullcontext,
        "plain": lambda: intervene(lm, _Unedited()),
        "paint": lambda: intervene(lm, PAINT()),
        "reference": lambda: intervene(lm, PAINT(), engine="reference"),
    }
    best = dict.fromkeys(scopes, float("inf"))
    for _ in range(repeats):  # interleaved, so that drift on a shared machine hits every one alike
        for name, scope in scopes.items():
            with scope():
                start = time.perf_counter()
                lm.model(**inputs)
                best[name] = min(best[name], time.perf_counter() - start)
    plain, paint = best["plain"], best["paint"]
    return {
        "tokens": n,
        "plain_s": plain,
        "paint_s": paint,
        "ratio": paint / plain,
        "reference_s": best["reference"],
        "model_s": best["model"],
    }


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pope-images", type=int, default=150)
    parser.add_argument("--chair-images", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    lm = hl.load("zoo:llava")
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        from headlab.reports.chair import write_chair_benchmark

        data = write_chair_benchmark(Path(tmp) / "chair", n_images=args.chair_images)
        for name, interventions in CONDITIONS.items():
            start = time.perf_counter()
            results[name] = {
                "pope": pope(lm, interventions, args.pope_images),
                "chair": captions(lm, interventions, data, args.chair_images),
            }
            print(name, f"{time.perf_counter() - start:.1f}s", json.dumps(results[name]["chair"]))
    cost = overhead(lm, args.tokens, args.repeats)
    print(
        f"overhead at {cost['tokens']} tokens: unedited fused {cost['plain_s'] * 1e3:.1f} ms, PAINT "
        f"{cost['paint_s'] * 1e3:.1f} ms, ratio {cost['ratio']:.2f} (reference engine "
        f"{cost['reference_s'] * 1e3:.1f} ms; the model's own attention {cost['model_s'] * 1e3:.1f} ms)"
    )
    RESULTS.mkdir(exist_ok=True)
    machine = platform.processor() or platform.machine()
    (RESULTS / "paint_evidence.json").write_text(
        json.dumps({"machine": machine, "args": vars(args), "results": results, "overhead": cost}, indent=1)
    )
    lines = [
        "| condition | random acc / F1 / yes | popular acc / F1 / yes | adversarial acc / F1 / yes "
        "| CHAIR_S | CHAIR_I | recall | length |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        cells = [
            f"{r['pope'][s]['accuracy']:.3f} / {r['pope'][s]['f1']:.3f} / {r['pope'][s]['yes_ratio']:.3f}"
            for s in ("random", "popular", "adversarial")
        ]
        c = r["chair"]
        lines.append(
            f"| {name} | {' | '.join(cells)} | {c['chair_s']:.3f} | {c['chair_i']:.3f} | {c['recall']:.3f} "
            f"| {c['length']:.1f} |"
        )
    lines.append("")
    lines.append(
        f"Forward pass at {cost['tokens']} tokens ({machine}, best of {args.repeats}): headlab fused unedited "
        f"{cost['plain_s'] * 1e3:.1f} ms, PAINT fused {cost['paint_s'] * 1e3:.1f} ms (ratio {cost['ratio']:.2f}), "
        f"PAINT reference engine {cost['reference_s'] * 1e3:.1f} ms, the model's own attention "
        f"{cost['model_s'] * 1e3:.1f} ms."
    )
    (RESULTS / "paint_evidence.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Evidence: CCA (Concentric Causal Attention) on the zoo's tiny LLaVA, next to the paper's LLaVA-1.5 numbers.

Rows:
- `llava` (plain): the zoo LLaVA, trained and run with raster positions and the causal mask;
- `llava-cca + CCA`: the zoo LLaVA retrained with CCA (`headlab zoo train llava-cca`: the same data, seed
  and steps as `llava`), run under CCA. This is the paper's method (CCA trained in, evaluated with it);
- extra, labelled: `llava + CCA at inference only` (NOT the paper's method: CCA's positions and mask on a
  model trained without them) and `llava-cca without CCA` (the CCA-trained weights run with raster
  positions and the causal mask).

POPE: `headlab.zoo.llava.evaluate_llava` (150 held-out scenes, partner rate 0.5, the official sampler's
random / popular / adversarial splits, the first greedy answer token), accuracy / F1 / yes-ratio per split
and the average over the splits (the paper's "avg"). CHAIR: greedy captions for "Describe the image." on 200
other held-out scenes (partner rate 0.5), at most 32 new tokens (the zoo's captions are about 12 words),
scored by `headlab.datasets.chair.score_chair` against the scenes' objects (vocabulary: the 8 categories):
CHAIR_s, CHAIR_i, recall, length.

The paper (Xing et al., NeurIPS 2024; methods/lvlm.md 4.5): POPE MSCOCO average accuracy / F1 81.38 / 79.65
(baseline, copied from the VCD paper, sampling-based) -> 86.86 / 85.54; CHAIR greedy, 512 tokens: CHAIR_s /
CHAIR_i 46.2 / 12.9 -> 43.0 / 11.5 (recall 80.3 -> 80.4, length 97.2 -> 96.6). The zoo model is a 2-layer,
d=64 LLaVA on 32 x 32 synthetic scenes with 4 x 4 = 16 image tokens (2 rings): the mechanism is the same,
the scale and data are not, so the numbers are evidence of what CCA does here, not a reproduction.

`--seeds 1 2 ...` also trains both recipes at those seeds (into a temporary folder, minutes each) and adds
their rows, to show how much of a difference is seed variance.

Writes benchmarks/results/cca_evidence.{json,md}.
Usage: OMP_NUM_THREADS=1 python benchmarks/cca_evidence.py [--seeds 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch

import headlab as hl
from headlab.datasets import scenes
from headlab.datasets.chair import Vocabulary, score_chair
from headlab.interventions.cca import CCA
from headlab.interventions.core import intervene
from headlab.models.llava import CAPTION_PROMPT, conversation
from headlab.zoo import registry
from headlab.zoo.llava import encode, evaluate_llava

RESULTS = Path(__file__).parent / "results"
SPLITS = ("random", "popular", "adversarial")
CHAIR_IMAGES, CHAIR_SEED, MAX_NEW_TOKENS = 200, 4321, 32
PAPER = {
    "baseline (LLaVA-1.5-7B)": {
        "pope": {"random": (83.29, 81.33), "popular": (81.88, 80.06), "adversarial": (78.96, 77.57)},
        "pope_avg": (81.38, 79.65),
        "chair": (46.2, 12.9, 80.3, 97.2),
    },
    "CCA-LLaVA-1.5-7B": {
        "pope": {"random": (88.03, 86.65), "popular": (86.87, 85.54), "adversarial": (85.67, 84.42)},
        "pope_avg": (86.86, 85.54),
        "chair": (43.0, 11.5, 80.4, 96.6),
    },
}


@torch.no_grad()
def captions(lm, scene_list: list[scenes.Scene]) -> dict[int, str]:
    """Greedy captions (left-padded batches of 50; generation stops at </s> or MAX_NEW_TOKENS)."""
    tok = lm.processor.tokenizer
    prompt = encode(tok, conversation(CAPTION_PROMPT))[0]
    out = {}
    for start in range(0, len(scene_list), 50):
        chunk = scene_list[start : start + 50]
        ids = torch.tensor([prompt] * len(chunk))  # one prompt: no padding needed
        pixels = lm.processor.image_processor([scenes.render(s) for s in chunk], return_tensors="pt")
        gen = lm.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=pixels["pixel_values"],
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
        for scene, row in zip(chunk, gen[:, ids.shape[1] :], strict=True):
            out[scene.image_id] = tok.decode(row, skip_special_tokens=True).strip()
    return out


def chair_of(lm) -> dict:
    scene_list = scenes.make_scenes(CHAIR_IMAGES, prior=0.5, seed=CHAIR_SEED, start_id=300_000)
    with tempfile.TemporaryDirectory() as tmp:
        synonyms = Path(tmp) / "synonyms.txt"
        synonyms.write_text("\n".join(sorted(scenes.CATEGORIES)) + "\n")
        vocab = Vocabulary.from_file(synonyms)
    caps = captions(lm, scene_list)
    score = score_chair(caps, {s.image_id: set(s.objects) for s in scene_list}, vocab)
    return {
        "chair_s": score.chair_s,
        "chair_i": score.chair_i,
        "recall": score.recall,
        "length": score.length,
        "examples": dict(list(caps.items())[:3]),
    }


def run(lm, cca: bool) -> dict:
    with intervene(lm, CCA()) if cca else nullcontext():
        pope = evaluate_llava(lm.model, lm.processor)
        pope["avg"] = {k: sum(pope[s][k] for s in SPLITS) / 3 for k in ("accuracy", "f1", "yes_ratio")}
        return {"pope": pope, "chair": chair_of(lm)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seeds", type=int, nargs="*", default=[], help="also train and evaluate these seeds"
    )
    seeds = parser.parse_args().seeds
    plain, trained = hl.load("zoo:llava"), hl.load("zoo:llava-cca")
    rows = {
        "llava (plain)": (plain, False),
        "llava-cca + CCA (the paper's method)": (trained, True),
        "extra: llava + CCA at inference only (NOT the paper's method)": (plain, True),
        "extra: llava-cca without CCA": (trained, False),
    }
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for name, cca in (("llava", False), ("llava-cca", True)):
                out = Path(tmp) / f"{name}-{seed}"
                registry.entry(name).train(out, seed=seed)
                label = f"{name}{' + CCA' if cca else ' (plain)'}, seed {seed} (not shipped)"
                rows[label] = (hl.load(out), cca)
        for name, (lm, cca) in rows.items():
            results[name] = run(lm, cca)
            r = results[name]
            print(
                name,
                f"POPE avg acc {r['pope']['avg']['accuracy']:.3f}",
                f"CHAIR_s {r['chair']['chair_s']:.3f}",
            )
    RESULTS.mkdir(exist_ok=True)
    info = {
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "results": results,
        "paper": PAPER,
    }
    (RESULTS / "cca_evidence.json").write_text(json.dumps(info, indent=1) + "\n")
    text = table(results) + ("\n\n" + seed_summary(results, [0, *seeds]) if seeds else "")
    (RESULTS / "cca_evidence.md").write_text(text + "\n")
    print(text)


def seed_summary(results: dict, seeds: list[int]) -> str:
    """Mean and standard deviation over seeds (0: the shipped models) of POPE average accuracy / F1 and
    CHAIR_s / CHAIR_i, plain recipe vs CCA recipe run under CCA."""
    groups = {
        "llava (plain)": ["llava (plain)"] + [f"llava (plain), seed {s} (not shipped)" for s in seeds[1:]],
        "llava-cca + CCA": ["llava-cca + CCA (the paper's method)"]
        + [f"llava-cca + CCA, seed {s} (not shipped)" for s in seeds[1:]],
    }
    lines = [
        f"| recipe (seeds {', '.join(map(str, seeds))}) | POPE avg acc | POPE avg F1 | CHAIR_s | CHAIR_i |",
        "|---|---|---|---|---|",
    ]
    for name, keys in groups.items():
        values = {
            "acc": [results[k]["pope"]["avg"]["accuracy"] for k in keys],
            "f1": [results[k]["pope"]["avg"]["f1"] for k in keys],
            "chair_s": [results[k]["chair"]["chair_s"] for k in keys],
            "chair_i": [results[k]["chair"]["chair_i"] for k in keys],
        }
        cells = [f"{100 * _mean(v):.2f} ± {100 * _sd(v):.2f}" for v in values.values()]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(lines)


def _mean(v: list[float]) -> float:
    return sum(v) / len(v)


def _sd(v: list[float]) -> float:
    m = _mean(v)
    return (sum((x - m) ** 2 for x in v) / max(1, len(v) - 1)) ** 0.5


def table(results: dict) -> str:
    """Markdown: POPE per split (acc / F1 / yes-ratio, %), the average, CHAIR; the paper's rows below."""
    lines = [
        "| model | POPE random acc / F1 / yes | popular | adversarial | POPE avg acc / F1 "
        "| CHAIR_s / CHAIR_i / recall / len |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        p, c = r["pope"], r["chair"]
        cells = [
            f"{100 * p[s]['accuracy']:.2f} / {100 * p[s]['f1']:.2f} / {100 * p[s]['yes_ratio']:.1f}"
            for s in SPLITS
        ]
        avg = f"{100 * p['avg']['accuracy']:.2f} / {100 * p['avg']['f1']:.2f}"
        chair = f"{100 * c['chair_s']:.1f} / {100 * c['chair_i']:.1f} / {100 * c['recall']:.1f} / {c['length']:.1f}"
        lines.append(f"| zoo {name} | {' | '.join(cells)} | {avg} | {chair} |")
    for name, r in PAPER.items():
        cells = [f"{r['pope'][s][0]:.2f} / {r['pope'][s][1]:.2f} / -" for s in SPLITS]
        avg = f"{r['pope_avg'][0]:.2f} / {r['pope_avg'][1]:.2f}"
        chair = " / ".join(f"{v}" for v in r["chair"])
        lines.append(f"| paper: {name} (MSCOCO; CHAIR greedy 512) | {' | '.join(cells)} | {avg} | {chair} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

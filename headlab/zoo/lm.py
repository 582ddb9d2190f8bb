"""Recipe `lm`: a 2-layer Llama (RoPE, 4 heads, d=64) trained on headlab's synthetic text tasks.

The training mix (every example is `<s> prompt answer`, next-token loss on every token):
induction sequences (random "w<i>" tokens repeated, variable length and offset), IOI (ABBA and BABA),
colored objects, greater-than years, multi-document QA with the gold document at every slot, and
pairwise-judge prompts. The judge data carries a primacy prior: the better response is the FIRST block in
70% of the training prompts, and the first block is labelled A or B at random, so the model (which cannot
add well enough to judge) learns to name the first block's label: a position bias for PINE to remove.

Ground truth is the generators' (headlab.datasets.synthetic). `evaluate_lm` measures task accuracy on
held-out seeds and the head scores the zoo promises: previous-token, induction (attention from a token in
the second copy to the token after its first occurrence) and first-token sink (Gu et al.'s alpha).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import torch
import transformers as tf

from headlab.datasets import synthetic
from headlab.zoo.training import Progress, Schedule, fit, llama_config, pad_batch, seed_everything
from headlab.zoo.vocab import word_tokenizer

TASK_COUNTS = {
    "induction": 16000,
    "ioi": 10000,
    "colored_objects": 5000,
    "greater_than": 4000,
    "multi_doc_qa": 5000,
    "pairwise_judge": 4000,
}
JUDGE_PRIMACY = 0.7
SCHEDULE = Schedule(steps=4000, lr=2e-3, warmup=200)
BATCH = 64


def _examples(task: str, n: int, seed: int) -> list[synthetic.Example]:
    if task == "induction":
        return synthetic.induction(n, length=(6, 20), prefix=(0, 8), seed=seed)
    if task == "multi_doc_qa":
        return synthetic.multi_doc_qa(n, k=4, seed=seed)
    return synthetic.TASKS[task](n, seed=seed)


def corpus(seed: int = 0) -> list[str]:
    """The training texts (prompt + answer), shuffled."""
    rng = random.Random(seed)
    texts = []
    for i, (task, n) in enumerate(TASK_COUNTS.items()):
        for ex in _examples(task, n, seed * 1000 + i):
            if task == "induction":
                texts.append(" ".join(ex.get("tokens")))
            elif task == "greater_than":  # any later year is right; train on a uniform one
                texts.append(f"{ex.prompt}{rng.randint(ex.get('start') + 1, 99):02d}")
            elif task == "pairwise_judge":
                texts.append(_judge_text(ex, rng))
            else:
                texts.append(ex.prompt + ex.answer)
    rng.shuffle(texts)
    return texts


def _judge_text(ex: synthetic.Example, rng: random.Random) -> str:
    """A judge prompt + verdict with the better response first with probability JUDGE_PRIMACY and the
    first block labelled A or B at random (labels travel with their blocks)."""
    good_first = rng.random() < JUDGE_PRIMACY
    labels = ("A", "B") if rng.random() < 0.5 else ("B", "A")
    texts = (ex.get("good"), ex.get("bad")) if good_first else (ex.get("bad"), ex.get("good"))
    verdict = labels[0] if good_first else labels[1]
    return f"{synthetic.judge_prompt(ex.get('question'), list(zip(labels, texts, strict=True)))} {verdict}"


def vocabulary() -> list[str]:
    """Every word the tasks can produce (covers the held-out seeds too)."""
    extra = [f"w{i}" for i in range(64)] + [f"{i:02d}" for i in range(100)] + [str(i) for i in range(10)]
    lists = (synthetic.NAMES, synthetic.PLACES, synthetic.OBJECTS, synthetic.COLORS, synthetic.THINGS)
    return extra + [w for words in lists for w in words] + list(synthetic.NOUNS)


def build_model(tokenizer) -> tf.LlamaForCausalLM:
    config = llama_config(tokenizer, max_positions=256, rope_theta=10000.0, tie_word_embeddings=False)
    return tf.LlamaForCausalLM(config)


def _batches(ids: list[list[int]], pad_id: int, gen: torch.Generator) -> Iterator[dict]:
    while True:
        rows = [ids[i] for i in torch.randint(len(ids), (BATCH,), generator=gen).tolist()]
        yield pad_batch(rows, rows, pad_id)


def train_lm(out: str | Path, *, seed: int = 0, steps: int | None = None, progress: Progress | None = None):
    """Train the recipe and save model + tokenizer under `out`; returns the training summary."""
    gen = seed_everything(seed)
    texts = corpus(seed)
    tokenizer = word_tokenizer(texts, extra=vocabulary())
    ids = tokenizer(texts)["input_ids"]
    model = build_model(tokenizer)
    schedule = Schedule(**{**SCHEDULE.__dict__, "steps": steps or SCHEDULE.steps})
    summary = fit(model, _batches(ids, tokenizer.pad_token_id, gen), schedule, progress=progress)
    Path(out).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return summary


# ----------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def _next_logits(model, tokenizer, prompts: list[str]) -> torch.Tensor:
    """Logits at the last real token of each prompt (right padding)."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    logits = model(**enc).logits
    last = enc["attention_mask"].sum(1) - 1
    return logits[torch.arange(len(prompts)), last]


def _token(tokenizer, word: str) -> int:
    return tokenizer.convert_tokens_to_ids(word.strip())


def task_accuracy(model, tokenizer, n: int = 200, seed: int = 10_000) -> dict[str, float]:
    """Held-out accuracies: top-1 for induction/colored objects/multi-doc QA, IO-vs-S for IOI, P(year > YY)
    mass for greater-than, and for the judge the accuracy and the flip rate (the verdict's content changes
    when the two labelled blocks trade places)."""
    out: dict[str, float] = {}
    for task in ("induction", "colored_objects", "multi_doc_qa"):
        exs = _examples(task, n, seed)
        logits = _next_logits(model, tokenizer, [e.prompt for e in exs])
        want = torch.tensor([_token(tokenizer, e.answer) for e in exs])
        out[f"{task}_acc"] = (logits.argmax(-1) == want).float().mean().item()
    exs = synthetic.ioi(n, seed=seed)
    logits = _next_logits(model, tokenizer, [e.prompt for e in exs])
    io = torch.tensor([_token(tokenizer, e.get("io")) for e in exs])
    s = torch.tensor([_token(tokenizer, e.get("s")) for e in exs])
    rows = torch.arange(n)
    diff = logits[rows, io] - logits[rows, s]
    out["ioi_acc"] = (diff > 0).float().mean().item()
    out["ioi_logit_diff"] = diff.mean().item()
    out["ioi_top1"] = (logits.argmax(-1) == io).float().mean().item()
    exs = synthetic.greater_than(n, seed=seed)
    probs = _next_logits(model, tokenizer, [e.prompt for e in exs]).softmax(-1)
    years = torch.tensor([_token(tokenizer, f"{y:02d}") for y in range(100)])
    mass = []
    for i, e in enumerate(exs):
        p = probs[i, years]
        yy = e.get("start")
        mass.append((p[yy + 1 :].sum() - p[:yy].sum()).item())
    out["greater_than_prob_diff"] = sum(mass) / len(mass)
    exs = synthetic.pairwise_judge(n, seed=seed)
    a, b = _token(tokenizer, "A"), _token(tokenizer, "B")
    first = _next_logits(model, tokenizer, [e.prompt for e in exs])  # "Response A: good Response B: bad"
    swapped = _next_logits(  # the blocks trade places with their labels: "Response B: bad Response A: good"
        model,
        tokenizer,
        [synthetic.judge_prompt(e.get("question"), [("B", e.get("bad")), ("A", e.get("good"))]) for e in exs],
    )
    good = first[:, a] > first[:, b]  # "A" marks the better response in both orders
    good_swapped = swapped[:, a] > swapped[:, b]
    out["judge_acc"] = (good.float().mean().item() + good_swapped.float().mean().item()) / 2
    out["judge_flip_rate"] = (good != good_swapped).float().mean().item()
    return out


@torch.no_grad()
def head_scores(model, tokenizer, *, n: int = 64, length: int = 12, seed: int = 20_000) -> dict[str, list]:
    """Per-head [layer][head] scores on repeated random tokens `<s> t1..tL t1..tL` (eager attention):
    prev_token = mean attention from position p to p-1; induction = from a second-copy token to the token
    after its first occurrence (p-L+1); duplicate = to the earlier occurrence itself (p-L); sink = mean
    attention to the first token over all queries after it."""
    rng = random.Random(seed)
    rows = [[f"w{i}" for i in rng.sample(range(64), length)] for _ in range(n)]
    enc = tokenizer([" ".join(r + r) for r in rows], return_tensors="pt")
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        attentions = model(**enc, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(previous)
    second = torch.arange(1 + length, 1 + 2 * length)
    scores: dict[str, list] = {"prev_token": [], "induction": [], "duplicate": [], "sink": []}
    for att in attentions:  # [batch, heads, q, k]
        a = att.mean(0)
        q = torch.arange(1, a.shape[-1])
        scores["prev_token"].append(a[:, q, q - 1].mean(-1).tolist())
        scores["induction"].append(a[:, second, second - length + 1].mean(-1).tolist())
        scores["duplicate"].append(a[:, second, second - length].mean(-1).tolist())
        scores["sink"].append(a[:, q, 0].mean(-1).tolist())
    return scores


def evaluate_lm(model, tokenizer) -> dict:
    return {"tasks": task_accuracy(model, tokenizer), "heads": head_scores(model, tokenizer)}

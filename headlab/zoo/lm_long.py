"""Recipe `lm-long`: a 4-layer Llama (RoPE, 4 query heads sharing 2 KV heads per layer, d=64, 512 positions) trained
to retrieve needles from long haystacks, for the long-context head roles (retrieval, streaming, echo,
induction; headlab.analyses.retrieval).

The training mix (every text starts with <s>; next-token loss where labelled):
- needle-in-a-haystack (headlab.datasets.needles): filler sentences of 16-200 pieces, a needle "The
  <subject> is v.. v.. ." at a random depth, the question "Tell me the <subject> . The <subject> is" and
  the answer (2-6 value tokens, then "."); loss on every token (the filler grammar is local, the answer
  must be copied from far away);
- repeated random tokens (RazorAttention's probe over the whole vocabulary, blocks of 8-48, 2-4 copies):
  loss on the copies after the first. This grows the induction circuit, and drawing from EVERY token (not
  only the w-tokens) makes it copy the needle's value tokens and match on "is": trained on w-tokens alone
  the model copies w-tokens (induction accuracy 0.97) but answers needles with a frequency guess (0.06).

`evaluate_lm_long` measures exact-copy NIAH accuracy on a held-out depths x lengths grid, induction accuracy
on repeated tokens, and the retrieval scores of the heads (Wu et al.; headlab.analyses.retrieval).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import torch
import transformers as tf

from headlab.datasets import needles
from headlab.datasets.synthetic import COLORS, NAMES, THINGS
from headlab.zoo.training import (
    Progress,
    Schedule,
    fit,
    length_buckets,
    llama_config,
    pad_batch,
    seed_everything,
)
from headlab.zoo.vocab import word_tokenizer

LAYERS, HEADS, KV_HEADS, HIDDEN, INTERMEDIATE, POSITIONS = 4, 4, 2, 64, 192, 512
N_NEEDLE, N_REPEAT = 10000, 10000
MAX_HAYSTACK = 200  # haystack pieces of the longest training probe
REPEAT_BLOCK, REPEAT_COPIES, REPEAT_DISTINCT = (8, 48), (2, 4), False  # repeated-token rows
SCHEDULE = Schedule(steps=2000, lr=2e-3, warmup=150)
BATCH = 32
W_TOKENS = tuple(f"w{i}" for i in range(128))


def vocabulary() -> list[str]:
    """Every word the probes and the question can produce."""
    words = ["The", "Tell", "me", "the", "is", ".", "a", *needles._VERBS, *W_TOKENS, *needles.VALUES]
    words += [w for s in needles.SUBJECTS for w in s.split()]
    return words + list(NAMES) + list(COLORS) + list(THINGS)


def _needle_text(rng: random.Random) -> tuple[str, str]:
    """(prompt, answer + " .") of one random training probe."""
    probe = needles.needle_probe(
        rng.randint(16, MAX_HAYSTACK), rng.random(), answer_len=rng.randint(2, 6), seed=rng.randrange(2**31)
    )
    return probe.prompt, " " + probe.real_needle + " ."


def corpus(tokenizer, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) rows: needle probes (loss everywhere) and repeated random tokens (loss on the copies)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(N_NEEDLE):
        prompt, answer = _needle_text(rng)
        ids = tokenizer(prompt + answer)["input_ids"]
        rows.append((ids, ids))
    every = [i for i in range(len(tokenizer)) if i not in set(tokenizer.all_special_ids)]
    for i in range(N_REPEAT):
        probe = needles.repeated_random_tokens(
            rng.randint(*REPEAT_BLOCK),
            ids=every,
            bos_id=tokenizer.bos_token_id,
            repeats=rng.randint(*REPEAT_COPIES),
            seed=seed + i,
            distinct=REPEAT_DISTINCT,
        )
        ids = list(probe.input_ids)
        labels = [-100] * (1 + probe.length) + ids[1 + probe.length :]
        rows.append((ids, labels))
    rng.shuffle(rows)
    return rows


def build_model(tokenizer) -> tf.LlamaForCausalLM:
    config = llama_config(
        tokenizer,
        max_positions=POSITIONS,
        hidden=HIDDEN,
        layers=LAYERS,
        heads=HEADS,
        intermediate=INTERMEDIATE,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    config.num_key_value_heads = KV_HEADS  # grouped-query attention: 2 query heads per KV head
    config.head_dim = HIDDEN // HEADS
    return tf.LlamaForCausalLM(config)


def _batches(rows, pad_id: int, gen: torch.Generator) -> Iterator[dict]:
    """Batches of rows of similar length (little padding: short copying rows cost little)."""
    for idx in length_buckets([len(r[0]) for r in rows], BATCH, gen):
        picked = [rows[i] for i in idx]
        yield pad_batch([r[0] for r in picked], [r[1] for r in picked], pad_id)


def tokenizer_for() -> tf.PreTrainedTokenizerFast:
    return word_tokenizer([], extra=vocabulary())


def train_lm_long(
    out: str | Path, *, seed: int = 0, steps: int | None = None, progress: Progress | None = None
):
    """Train the recipe and save model + tokenizer under `out`; returns the training summary."""
    gen = seed_everything(seed)
    tokenizer = tokenizer_for()
    rows = corpus(tokenizer, seed)
    model = build_model(tokenizer)
    schedule = Schedule(**{**SCHEDULE.__dict__, "steps": steps or SCHEDULE.steps})
    summary = fit(model, _batches(rows, tokenizer.pad_token_id, gen), schedule, progress=progress)
    Path(out).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return summary


# ----------------------------------------------------------------------------------------------- evaluation

EVAL_LENGTHS = (48, 96, 144, 192)
EVAL_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@torch.no_grad()
def induction_accuracy(model, tokenizer, *, n: int = 32, length: int = 32, seed: int = 30_000) -> float:
    """Top-1 accuracy of predicting the second copy of `length` repeated random w-tokens."""
    w_ids = tokenizer.convert_tokens_to_ids(list(W_TOKENS))
    hits = []
    for i in range(n):
        probe = needles.repeated_random_tokens(
            length, ids=w_ids, bos_id=tokenizer.bos_token_id, repeats=2, seed=seed + i, distinct=True
        )
        ids = torch.tensor([probe.input_ids])
        pred = model(input_ids=ids).logits[0, length:-1].argmax(-1)
        hits.append((pred == ids[0, length + 1 :]).float().mean().item())
    return sum(hits) / n


def evaluate_lm_long(lm) -> dict:
    """NIAH exact-copy accuracy on held-out probes, induction accuracy, and the heads' retrieval scores."""
    from headlab.analyses.retrieval import niah_accuracy, retrieval_scores

    probes = needles.needle_probes(EVAL_LENGTHS, EVAL_DEPTHS, per_cell=2, seed=99)
    scores = retrieval_scores(lm, probes)
    top = scores.sort_values("retrieval_score", ascending=False).head(8)
    return {
        "niah_accuracy": niah_accuracy(lm, probes),
        "induction_acc": induction_accuracy(lm.model, lm.tokenizer),
        "retrieval_heads_above_0.1": int((scores.retrieval_score > 0.1).sum()),
        "top_retrieval_heads": [
            [int(r.layer), int(r.head), round(float(r.retrieval_score), 4)] for r in top.itertuples()
        ],
    }

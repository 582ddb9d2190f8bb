"""The training loop shared by the zoo recipes: AdamW, linear warm-up then cosine decay, gradient clipping,
fixed seeds, and a progress callback. Deterministic on a given machine and thread count (CPU kernels reduce
in a thread-count dependent order, so bitwise equality across machines is not promised)."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import transformers as tf
from torch import nn


@dataclass(frozen=True)
class Schedule:
    steps: int
    lr: float = 2e-3
    warmup: int = 200
    weight_decay: float = 0.01
    clip: float = 1.0
    log_every: int = 100


Progress = Callable[[int, int, float], None]  # (step, steps, loss)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def fit(
    model: nn.Module,
    batches: Iterator[dict[str, torch.Tensor]],
    schedule: Schedule,
    *,
    progress: Progress | None = None,
) -> dict[str, float]:
    """Train `model` on `schedule.steps` batches (dicts of model inputs including labels); returns a summary."""
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": schedule.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=schedule.lr,
        betas=(0.9, 0.98),
    )

    def factor(step: int) -> float:
        if step < schedule.warmup:
            return (step + 1) / schedule.warmup
        done = (step - schedule.warmup) / max(1, schedule.steps - schedule.warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * done))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    start, recent = time.perf_counter(), []
    for step in range(schedule.steps):
        loss = model(**next(batches)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), schedule.clip)
        opt.step()
        sched.step()
        recent = [*recent[-(schedule.log_every - 1) :], loss.item()]
        if progress is not None and ((step + 1) % schedule.log_every == 0 or step + 1 == schedule.steps):
            progress(step + 1, schedule.steps, sum(recent) / len(recent))
    model.eval()
    return {
        "steps": schedule.steps,
        "final_loss": sum(recent) / len(recent),
        "seconds": time.perf_counter() - start,
    }


def length_buckets(lengths: list[int], batch: int, gen: torch.Generator) -> Iterator[list[int]]:
    """Endless batches of indices of similar length (less padding): each epoch shuffles, sorts by length,
    cuts consecutive runs of `batch` and visits them in random order."""
    while True:
        order = torch.randperm(len(lengths), generator=gen).tolist()
        order.sort(key=lambda i: lengths[i])
        runs = [order[i : i + batch] for i in range(0, len(order), batch)]
        for r in torch.randperm(len(runs), generator=gen).tolist():
            yield runs[r]


def pad_batch(rows: list[list[int]], labels: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token rows; labels -100 on padding (and wherever the caller put -100)."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, la) in enumerate(zip(rows, labels, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(la)] = torch.tensor(la)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


def llama_config(
    tokenizer,
    *,
    max_positions: int,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int = 256,
    **extra,
) -> tf.LlamaConfig:
    """A small Llama config over `tokenizer` (multi-head attention: as many KV heads as query heads)."""
    return tf.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )

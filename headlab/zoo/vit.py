"""Recipe `vit`: a tiny ViT classifier (the real `ViTForImageClassification`, 4 layers, 4 heads, d=64) that
names the objects in headlab's synthetic scenes.

Images are 32 x 32 with 4-pixel patches (an 8 x 8 grid plus CLS). The task is multi-label: one sigmoid
output per object category (`problem_type="multi_label_classification"`, binary cross-entropy), since a
scene holds two or three objects. `evaluate_vit` reports exact-match and per-label accuracy on held-out
scenes, and how often an absent partner of a present object is predicted (the co-occurrence prior that
the LLaVA recipe exposes with POPE).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
import transformers as tf

from headlab.datasets import scenes
from headlab.zoo.training import Progress, Schedule, fit, seed_everything

N_SCENES = 4000
SCHEDULE = Schedule(steps=1500, lr=2e-3, warmup=100)
BATCH = 64
IMAGE_SIZE, PATCH_SIZE = 32, 4
LABELS = sorted(scenes.CATEGORIES)


def build_model() -> tf.ViTForImageClassification:
    config = tf.ViTConfig(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={c: i for i, c in enumerate(LABELS)},
        problem_type="multi_label_classification",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return tf.ViTForImageClassification(config)


def build_processor() -> tf.ViTImageProcessorPil:
    return tf.ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def multi_hot(scene_list: list[scenes.Scene]) -> torch.Tensor:
    target = torch.zeros(len(scene_list), len(LABELS))
    for i, s in enumerate(scene_list):
        for obj in s.objects:
            target[i, LABELS.index(obj)] = 1.0
    return target


def _batches(pixel_values: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> Iterator[dict]:
    while True:
        pick = torch.randint(len(labels), (BATCH,), generator=gen)
        yield {"pixel_values": pixel_values[pick], "labels": labels[pick]}


def train_vit(out: str | Path, *, seed: int = 0, steps: int | None = None, progress: Progress | None = None):
    gen = seed_everything(seed)
    scene_list = scenes.make_scenes(N_SCENES, seed=seed)
    processor = build_processor()
    pixel_values = processor([scenes.render(s) for s in scene_list], return_tensors="pt")["pixel_values"]
    model = build_model()
    schedule = Schedule(**{**SCHEDULE.__dict__, "steps": steps or SCHEDULE.steps})
    summary = fit(model, _batches(pixel_values, multi_hot(scene_list), gen), schedule, progress=progress)
    Path(out).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return summary


@torch.no_grad()
def evaluate_vit(model, processor, *, n_images: int = 500, seed: int = 7777) -> dict[str, float]:
    scene_list = scenes.make_scenes(n_images, seed=seed, start_id=200_000)
    pixel_values = processor([scenes.render(s) for s in scene_list], return_tensors="pt")["pixel_values"]
    predicted = model(pixel_values=pixel_values).logits > 0
    truth = multi_hot(scene_list).bool()
    partner_absent = torch.zeros_like(truth)
    for i, s in enumerate(scene_list):
        for obj in s.objects:
            partner = scenes.PARTNERS[obj]
            if partner not in s.objects:
                partner_absent[i, LABELS.index(partner)] = True
    absent = ~truth
    return {
        "exact_match": (predicted == truth).all(1).float().mean().item(),
        "label_accuracy": (predicted == truth).float().mean().item(),
        "false_positive_rate": (predicted & absent).sum().item() / max(1, absent.sum().item()),
        "partner_false_positive_rate": (predicted & partner_absent).sum().item()
        / max(1, partner_absent.sum().item()),
    }

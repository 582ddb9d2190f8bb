"""Recipe `llava`: a tiny LLaVA (the real `LlavaForConditionalGeneration`: CLIP vision tower, 2-layer MLP
projector, Llama language model) trained on headlab's synthetic scenes.

Scenes (headlab.datasets.scenes) hold a primary object, its partner with probability 0.9 and sometimes an
unrelated object, rendered at 32 x 32 (a 4 x 4 grid of 8-pixel patches, so 16 image tokens). Training
samples use the LLaVA-1.5 conversation format of the llava adapter (headlab.models.llava),
`USER: <image>\\n{question} ASSISTANT: {answer}</s>`, with the loss on the answer only (instruction tuning):
POPE-style yes/no questions about every present object and as many absent ones drawn uniformly, and
"Describe the image." with the scene's caption. Because a partner is present in 90% of the scenes, "banana,
so apple" is right most of the time in training; POPE's adversarial split asks exactly for absent partners,
where the model's prior shows as hallucinated "Yes" answers.

`evaluate_llava` scores POPE random / popular / adversarial questions (headlab.datasets.scenes' sampler,
official metrics from headlab.datasets.pope) on held-out scenes, answering with the first greedy token.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import torch
import transformers as tf

from headlab.datasets import scenes
from headlab.datasets.pope import PopeQuestion, score_pope
from headlab.models.llava import CAPTION_PROMPT, conversation
from headlab.zoo.random_models import IMAGE_SIZE, PATCH_SIZE, llava_processor
from headlab.zoo.training import (
    Progress,
    Schedule,
    fit,
    length_buckets,
    llama_config,
    pad_batch,
    seed_everything,
)
from headlab.zoo.vocab import IMAGE, word_tokenizer

N_SCENES = 4000
SCHEDULE = Schedule(steps=3000, lr=2e-3, warmup=200)
BATCH = 64
N_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2


def samples(scene_list: list[scenes.Scene], seed: int) -> list[tuple[int, str, str]]:
    """(scene index, prompt, answer) triples: every present object (Yes), as many absent ones (No), and the
    caption."""
    rng = random.Random(seed)
    out = []
    for i, scene in enumerate(scene_list):
        absent = [c for c in sorted(scenes.CATEGORIES) if c not in scene.objects]
        for obj in scene.objects:
            out.append((i, conversation(scenes.question(obj)), " Yes"))
        for obj in rng.sample(absent, len(scene.objects)):
            out.append((i, conversation(scenes.question(obj)), " No"))
        out.append((i, conversation(CAPTION_PROMPT), " " + scene.caption))
    rng.shuffle(out)
    return out


def build_model(tokenizer) -> tf.LlavaForConditionalGeneration:
    vision = tf.CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=64,
    )
    text = llama_config(tokenizer, max_positions=128)
    config = tf.LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        image_seq_length=N_IMAGE_TOKENS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
    )
    return tf.LlavaForConditionalGeneration(config)


def build_processor(tokenizer) -> tf.LlavaProcessor:
    return llava_processor(tokenizer)


def encode(tokenizer, prompt: str, answer: str = "") -> tuple[list[int], list[int]]:
    """Token ids of prompt + answer (+ </s> after an answer), and labels on the answer only. The <image>
    placeholder is expanded to the image tokens exactly as LlavaProcessor does (tested against it)."""
    expanded = prompt.replace(IMAGE, IMAGE * N_IMAGE_TOKENS)
    head = tokenizer(expanded)["input_ids"]
    if not answer:
        return head, [-100] * len(head)
    tail = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return head + tail, [-100] * len(head) + tail


def pixels(processor, scene_list: list[scenes.Scene]) -> torch.Tensor:
    images = [scenes.render(s) for s in scene_list]
    return processor.image_processor(images, return_tensors="pt")["pixel_values"]


def _batches(encoded, scene_of, pixel_values, pad_id, gen) -> Iterator[dict]:
    for pick in length_buckets([len(e[0]) for e in encoded], BATCH, gen):
        batch = pad_batch([encoded[i][0] for i in pick], [encoded[i][1] for i in pick], pad_id)
        batch["pixel_values"] = pixel_values[[scene_of[i] for i in pick]]
        yield batch


def train_llava(
    out: str | Path,
    *,
    seed: int = 0,
    steps: int | None = None,
    progress: Progress | None = None,
    cca: bool = False,
):
    """Train the zoo LLaVA into `out`. cca: train with Concentric Causal Attention active in every forward
    pass (recipe `llava-cca`: same data, seed and schedule; headlab.interventions.cca)."""
    gen = seed_everything(seed)
    scene_list = scenes.make_scenes(N_SCENES, seed=seed)
    triples = samples(scene_list, seed)
    vocab_texts = [p + a for _, p, a in triples] + [scenes.question(c) for c in scenes.CATEGORIES]
    tokenizer = word_tokenizer(vocab_texts, image=True)
    processor = build_processor(tokenizer)
    encoded = [encode(tokenizer, p, a) for _, p, a in triples]
    model = build_model(tokenizer)
    schedule = Schedule(**{**SCHEDULE.__dict__, "steps": steps or SCHEDULE.steps})
    batches = _batches(
        encoded, [i for i, _, _ in triples], pixels(processor, scene_list), tokenizer.pad_token_id, gen
    )
    with _cca_applied(model) if cca else nullcontext():
        summary = fit(model, batches, schedule, progress=progress)
    Path(out).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return summary


def _cca_applied(model):
    from headlab.interventions.cca import CCA

    return CCA().applied(model)


# ----------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def answer_first_token(model, processor, questions: list[PopeQuestion], images: dict) -> dict[int, str]:
    """Greedy first answer token for each POPE question ("Yes"/"No"/other word), batched (right padding)."""
    tokenizer = processor.tokenizer
    answers = {}
    for start in range(0, len(questions), 64):
        chunk = questions[start : start + 64]
        rows = [encode(tokenizer, conversation(q.text))[0] for q in chunk]
        batch = pad_batch(rows, rows, tokenizer.pad_token_id)
        batch.pop("labels")
        batch["pixel_values"] = processor.image_processor(
            [images[q.image] for q in chunk], return_tensors="pt"
        )["pixel_values"]
        logits = model(**batch).logits
        last = batch["attention_mask"].sum(1) - 1
        best = logits[torch.arange(len(chunk)), last].argmax(-1)
        for q, tok in zip(chunk, best.tolist(), strict=True):
            answers[q.question_id] = tokenizer.convert_ids_to_tokens(tok)
    return answers


def evaluate_llava(
    model, processor, *, n_images: int = 150, prior: float = 0.5, seed: int = 7777
) -> dict[str, dict]:
    """POPE metrics per split on `n_images` held-out scenes (image ids from 200000 on) in which a partner
    is present with probability `prior` (0.5, like the shipped POPE files: test scenes break the training
    co-occurrence more often, so the adversarial split has absent partners to ask about), plus the "Yes"
    rate on absent partners and on other absent objects (the prior's effect, directly)."""
    scene_list = scenes.make_scenes(n_images, prior=prior, seed=seed, start_id=200_000)
    images = {s.filename: scenes.render(s) for s in scene_list}
    out = {}
    for split in ("random", "popular", "adversarial"):
        questions = [PopeQuestion(**r) for r in scenes.pope_questions(scene_list, split, seed=seed)]
        score = score_pope(questions, answer_first_token(model, processor, questions, images))
        out[split] = {k: getattr(score, k) for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")}
    out["yes_rate_on_absent"] = _absent_yes_rates(model, processor, scene_list, images)
    return out


def _absent_yes_rates(model, processor, scene_list, images) -> dict[str, float]:
    partner, other = [], []
    for scene in scene_list:
        for obj in sorted(scenes.CATEGORIES):
            if obj in scene.objects:
                continue
            is_partner = any(scenes.PARTNERS[o] == obj for o in scene.objects)
            group = partner if is_partner else other
            group.append(
                PopeQuestion(len(partner) + len(other) + 1, scene.filename, scenes.question(obj), "no")
            )
    rates = {}
    for name, questions in (("partner", partner), ("other", other)):
        answers = answer_first_token(model, processor, questions, images)
        rates[name] = sum(a == "Yes" for a in answers.values()) / max(1, len(answers))
    return rates

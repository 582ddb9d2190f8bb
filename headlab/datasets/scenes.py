"""Synthetic scenes for vision: small images of objects with a strong co-occurrence prior, captions, and
POPE-style yes/no questions written as real POPE files.

Each object category has a shape and a color (an "apple" is a red disc, a "banana" a yellow bar, ...).
Categories come in partner pairs (apple-banana, cup-plate, ...). A scene is a `size` x `size` image with a
2 x 2 layout of cells: a primary object, its partner with probability `prior` (0.9 by default), and
sometimes one unrelated object. A model trained on these scenes can learn "banana, so apple" instead of
looking, which POPE's adversarial split (the absent partner of a present object) exposes.

POPE splits follow the official sampler (RUCAIBox/POPE utils.py): per image, the positives are its objects
(at most 3) and as many negatives, never present in the image and never repeated: random = uniform over all
categories, popular = the most frequent categories of the pool, adversarial = the categories that co-occur
most with the image's objects. Files are POPE JSON Lines (question_id, image, text, label).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

# category: (shape, RGB color)
CATEGORIES: dict[str, tuple[str, tuple[int, int, int]]] = {
    "apple": ("disc", (220, 30, 30)),
    "banana": ("bar", (235, 215, 40)),
    "cup": ("square", (40, 90, 230)),
    "plate": ("ring", (230, 230, 230)),
    "car": ("square", (230, 120, 20)),
    "tree": ("triangle", (30, 170, 60)),
    "ball": ("disc", (160, 60, 200)),
    "bat": ("bar", (140, 90, 40)),
}
PARTNERS = {"apple": "banana", "cup": "plate", "car": "tree", "ball": "bat"}
PARTNERS |= {v: k for k, v in list(PARTNERS.items())}
BACKGROUND = (70, 70, 70)


@dataclass(frozen=True)
class Scene:
    image_id: int
    objects: tuple[str, ...]  # in cell order

    @property
    def filename(self) -> str:
        return f"scene_{self.image_id:05d}.png"

    @property
    def caption(self) -> str:
        names = [f"{'an' if o[0] in 'aeiou' else 'a'} {o}" for o in self.objects]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + f" and {names[-1]}"
        return f"A picture of {listed}."


def make_scenes(
    n: int, *, prior: float = 0.9, extra: float = 0.3, seed: int = 0, start_id: int = 0
) -> list[Scene]:
    rng = random.Random(seed)
    names = sorted(CATEGORIES)
    scenes = []
    for i in range(n):
        primary = rng.choice(names)
        objects = [primary]
        if rng.random() < prior:
            objects.append(PARTNERS[primary])
        if rng.random() < extra:
            others = [c for c in names if c not in objects and PARTNERS[c] not in objects]
            objects.append(rng.choice(others))
        rng.shuffle(objects)
        scenes.append(Scene(start_id + i, tuple(objects)))
    return scenes


def render(scene: Scene, *, size: int = 32, seed: int | None = None) -> Image.Image:
    """The scene as an RGB image: objects in the cells of a 2 x 2 layout, with a little position jitter."""
    rng = random.Random(scene.image_id if seed is None else seed)
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = size // 2
    cells = rng.sample(range(4), len(scene.objects))
    for obj, c in zip(scene.objects, cells, strict=True):
        shape, color = CATEGORIES[obj]
        m = max(1, cell // 8)
        x0 = (c % 2) * cell + m + rng.randrange(0, m + 1)
        y0 = (c // 2) * cell + m + rng.randrange(0, m + 1)
        x1, y1 = x0 + cell - 3 * m, y0 + cell - 3 * m
        if shape == "disc":
            draw.ellipse((x0, y0, x1, y1), fill=color)
        elif shape == "ring":
            draw.ellipse((x0, y0, x1, y1), outline=color, width=max(1, cell // 6))
        elif shape == "bar":
            mid = (y0 + y1) // 2
            draw.rectangle((x0, mid - max(1, cell // 6), x1, mid + max(1, cell // 6)), fill=color)
        elif shape == "triangle":
            draw.polygon(((x0 + x1) // 2, y0, x1, y1, x0, y1), fill=color)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=color)
    return image


def question(obj: str) -> str:
    return f"Is there {'an' if obj[0] in 'aeiou' else 'a'} {obj} in the image?"


def _negatives(
    scene: Scene, split: str, k: int, rng: random.Random, popular: list[str], cooccur: Counter
) -> list[str]:
    absent = [c for c in sorted(CATEGORIES) if c not in scene.objects]
    if split == "random":
        return rng.sample(absent, min(k, len(absent)))
    if split == "popular":
        return [c for c in popular if c in absent][:k]
    scores = Counter({c: sum(cooccur[(o, c)] for o in scene.objects) for c in absent})
    return [c for c, _ in sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))][:k]


def pope_questions(scenes: list[Scene], split: str, *, seed: int = 0) -> list[dict]:
    """POPE records for `split` (random / popular / adversarial) over `scenes`, 50% yes."""
    if split not in ("random", "popular", "adversarial"):
        raise ValueError(f"unknown POPE split {split!r}; use random, popular or adversarial")
    rng = random.Random(seed)
    frequency = Counter(o for s in scenes for o in s.objects)
    popular = [c for c, _ in sorted(frequency.items(), key=lambda kv: (-kv[1], kv[0]))]
    cooccur = Counter((a, b) for s in scenes for a in s.objects for b in s.objects if a != b)
    records = []
    for scene in scenes:
        positives = list(scene.objects[:3])
        negatives = _negatives(scene, split, len(positives), rng, popular, cooccur)
        for obj, label in [(o, "yes") for o in positives] + [(o, "no") for o in negatives]:
            records.append(
                {
                    "question_id": len(records) + 1,
                    "image": scene.filename,
                    "text": question(obj),
                    "label": label,
                }
            )
    return records


def write_pope_benchmark(
    folder: str | Path, n_images: int = 100, *, prior: float = 0.5, seed: int = 1234, size: int = 32
) -> Path:
    """Images plus `pope_{random,popular,adversarial}.json` (POPE JSON Lines) and `captions.jsonl`.

    The test scenes break the co-occurrence more often than the training default (partner present with
    probability `prior` = 0.5 instead of 0.9), so the adversarial split finds absent partners to ask
    about in many images instead of one in ten."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    scenes = make_scenes(n_images, prior=prior, seed=seed, start_id=100_000)
    for s in scenes:
        render(s, size=size).save(folder / "images" / s.filename)
    for split in ("random", "popular", "adversarial"):
        lines = [json.dumps(r) for r in pope_questions(scenes, split, seed=seed)]
        (folder / f"pope_{split}.json").write_text("\n".join(lines) + "\n")
    with open(folder / "captions.jsonl", "w") as f:
        for s in scenes:
            f.write(
                json.dumps({"image_id": s.image_id, "caption": s.caption, "objects": list(s.objects)}) + "\n"
            )
    return folder

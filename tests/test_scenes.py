"""Synthetic scenes: the co-occurrence prior, rendering, and POPE files the POPE loader reads."""

from __future__ import annotations

from collections import Counter

import numpy as np

from headlab.datasets import pope, scenes


def test_prior_and_captions():
    made = scenes.make_scenes(400, seed=0)
    with_pair = sum(any(scenes.PARTNERS[o] in s.objects for o in s.objects) for s in made) / len(made)
    assert 0.85 < with_pair < 0.95  # the co-occurrence prior (0.9) that the adversarial split exploits
    assert all(len(set(s.objects)) == len(s.objects) <= 3 for s in made)
    assert made[0].caption.startswith("A picture of ")


def test_rendering_shows_each_object_color():
    scene = scenes.Scene(7, ("apple", "cup"))
    pixels = np.asarray(scenes.render(scene))
    assert pixels.shape == (32, 32, 3)
    for obj in scene.objects:
        color = np.array(scenes.CATEGORIES[obj][1])
        assert (np.abs(pixels - color).sum(-1) == 0).sum() > 10
    absent = np.array(scenes.CATEGORIES["tree"][1])
    assert (np.abs(pixels - absent).sum(-1) == 0).sum() == 0


def test_pope_files_follow_the_official_sampler(tmp_path):
    folder = scenes.write_pope_benchmark(tmp_path, n_images=40)
    made = {s.filename: s for s in scenes.make_scenes(40, prior=0.5, seed=1234, start_id=100_000)}
    for split in ("random", "popular", "adversarial"):
        loaded = pope.load_pope(folder / f"pope_{split}.json")
        assert not loaded.problems
        labels = Counter(q.label for q in loaded.questions)
        assert labels["yes"] == labels["no"]
        for q in loaded.questions:
            obj = q.text.split(" in the image")[0].split()[-1]
            assert (obj in made[q.image].objects) == (q.label == "yes")
            assert (folder / "images" / q.image).is_file()
    adversarial = pope.load_pope(folder / "pope_adversarial.json").questions
    partner_negatives = sum(
        1
        for q in adversarial
        if q.label == "no"
        and any(
            scenes.PARTNERS[o] == q.text.split(" in the image")[0].split()[-1] for o in made[q.image].objects
        )
    )
    assert partner_negatives >= 10  # absent partners of present objects: the adversarial case

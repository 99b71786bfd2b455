"""Deterministic splits of the toy world: scene i of a split is always the same scene."""
from __future__ import annotations

import numpy as np

from .world import Render, render, random_scene

SPLITS = {"train": 0, "heldout": 1}


def scene_rng(split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {tuple(SPLITS)}")
    return np.random.default_rng([SPLITS[split], int(index)])


class ToyDataset:
    """Renders on demand; `dataset[i]` is a `Render` with image, masks and keypoints."""

    def __init__(self, split: str = "train", length: int = 10_000, n_objects: int | None = None, **fixed):
        scene_rng(split, 0)  # validates the split name
        self.split, self.length, self.n_objects, self.fixed = split, length, n_objects, fixed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Render:
        if not 0 <= i < self.length:
            raise IndexError(i)
        return render(random_scene(scene_rng(self.split, i), n_objects=self.n_objects, **self.fixed))

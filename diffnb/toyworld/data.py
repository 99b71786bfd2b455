"""Deterministic splits of the toy world: scene i of a split is always the same scene."""
from __future__ import annotations

import numpy as np

from .world import TOY_WORLD, Render, render, random_scene, world_config

SPLITS = {"train": 0, "heldout": 1}


def scene_rng(split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {tuple(SPLITS)}")
    return np.random.default_rng([SPLITS[split], int(index)])


class ToyDataset:
    """Renders on demand; `dataset[i]` is a `Render` with image, masks and keypoints; `world` names a `WORLDS` entry."""

    def __init__(self, split: str = "train", length: int = 10_000, n_objects: int | None = None, world: str = TOY_WORLD,
                 **fixed):
        scene_rng(split, 0)  # validates the split name
        world_config(world)  # ... and the world's
        self.split, self.length, self.n_objects, self.world, self.fixed = split, length, n_objects, world, fixed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Render:
        if not 0 <= i < self.length:
            raise IndexError(i)
        return render(random_scene(scene_rng(self.split, i), n_objects=self.n_objects, world=self.world, **self.fixed))

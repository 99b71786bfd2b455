"""The toy world: renderer with ground truth, prompt grammar, training of the toy model, probes."""
from .data import ToyDataset, scene_rng
from .prompts import describe, prompt
from .world import (BACKGROUNDS, COLORS, DETAILS, KEYPOINTS, PATTERNS, SHAPES, WORLDS, Obj, Render, Scene,
                    WorldConfig, random_scene, render)

__all__ = ["BACKGROUNDS", "COLORS", "DETAILS", "KEYPOINTS", "PATTERNS", "SHAPES", "WORLDS", "Obj", "Render", "Scene",
           "ToyDataset", "WorldConfig",
           "describe", "prompt", "random_scene", "render", "scene_rng"]

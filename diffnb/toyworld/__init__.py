"""The toy world: renderer with ground truth, prompt grammar, training of the toy model, probes."""
from .data import ToyDataset, scene_rng
from .prompts import describe, prompt
from .world import BACKGROUNDS, COLORS, DETAILS, KEYPOINTS, SHAPES, Obj, Render, Scene, random_scene, render

__all__ = ["BACKGROUNDS", "COLORS", "DETAILS", "KEYPOINTS", "SHAPES", "Obj", "Render", "Scene", "ToyDataset",
           "describe", "prompt", "random_scene", "render", "scene_rng"]

"""The shipped toy model and probes: they load offline and do what the notebooks rely on."""
import numpy as np
import pytest
import torch

from diffnb.models import TOY_DIR, load_pipeline, toy_is_trained
from diffnb.toyworld import ToyDataset
from diffnb.toyworld.probes import Probes

needs_toy = pytest.mark.skipif(not toy_is_trained(), reason="toy model not trained yet")


def test_probes_read_heldout_renders():
    probes = Probes()
    renders = [ToyDataset("heldout", 60, n_objects=1)[i] for i in range(60)]
    pred = probes.predict(np.stack([r.image for r in renders]))
    assert np.mean([p == r.scene.objects[0].shape for p, r in zip(pred["shape"], renders)]) >= 0.95
    assert np.mean([p == r.scene.background for p, r in zip(pred["background"], renders)]) >= 0.95
    assert set(probes.heldout_accuracy) == {"shape", "color", "background", "detail"}


@needs_toy
def test_toy_weights_are_small_and_fp16_on_disk():
    total = sum(f.stat().st_size for f in TOY_DIR.rglob("*.safetensors"))
    assert total <= 30 * 2**20


@needs_toy
def test_toy_model_follows_prompts():
    pipe = load_pipeline("toy", device="cpu")
    prompts = ["a red heart on a striped background", "a blue moon on a dotted background",
               "a yellow square on a checkered background", "a green circle on a plain background"]
    gens = [torch.Generator().manual_seed(90_000 + i) for i in range(4)]
    images = (pipe(prompts, generator=gens, output_type="np").images * 255).round().astype(np.uint8)
    pred = Probes().predict(images)
    assert sum(c == w for c, w in zip(pred["color"], ["red", "blue", "yellow", "green"])) >= 3
    assert sum(b == w for b, w in zip(pred["background"], ["striped", "dotted", "checkered", "plain"])) >= 3


@needs_toy
def test_toy_cross_attention_localises_the_object_words():
    from diffnb.toyworld.evaluate import attention_iou

    pipe = load_pipeline("toy", device="cpu")
    assert attention_iou(pipe, n=10) >= 0.6  # issue bar 0.5; the shipped model measures about 0.9 (model card)

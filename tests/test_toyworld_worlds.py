"""Probes and the fidelity / diversity scorers for any toy world, with world v1's behaviour unchanged."""
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from diffnb.toyworld import ToyDataset
from diffnb.toyworld import probes as probes_module
from diffnb.toyworld.data import scene_rng
from diffnb.toyworld.evaluate import diversity, fidelity, main, model_world
from diffnb.toyworld.probes import HEADS, PROBE_FILE, Probes, _labels, evaluate, train
from diffnb.toyworld.prompts import describe
from diffnb.toyworld.world import PATTERNS, random_scene


class RecordingPipe:
    """Stands in for a pipeline: records the prompts, returns grey images."""

    def __init__(self):
        self.prompts = []

    def __call__(self, prompts, generator, output_type, **kw):
        self.prompts += list(prompts)
        return type("Out", (), {"images": np.full((len(prompts), 64, 64, 3), 0.5, np.float32)})()


@pytest.fixture(scope="module")
def v2_probes(tmp_path_factory):
    """A tiny probe training on world v2 (a few steps on a few images: the plumbing, not the accuracy)."""
    out = tmp_path_factory.mktemp("probes") / "v2.safetensors"
    acc = train(steps=3, batch=8, n_images=16, out=out, world="v2", n_heldout=16, progress=False)
    return out, acc


def test_v1_labels_are_unchanged():
    renders = [ToyDataset("train", 6, n_objects=1, world="v1")[i] for i in range(6)]
    before_worlds = {"shape": [0, 1, 4, 2, 3, 1], "color": [0, 4, 0, 1, 2, 1], "background": [3, 0, 0, 1, 3, 0],
                     "detail": [0, 2, 1, 2, 0, 1]}  # what _labels gave before it took a world
    assert {k: v.tolist() for k, v in _labels(renders, "v1").items()} == before_worlds


@pytest.fixture(scope="module")
def v1_probes(tmp_path_factory):
    """The same on world v1, so these tests do not depend on which world the shipped probes are of."""
    out = tmp_path_factory.mktemp("probes") / "v1.safetensors"
    return out, train(steps=3, batch=8, n_images=16, out=out, world="v1", n_heldout=16, progress=False)


def test_probe_files_without_a_world_read_as_v1(v1_probes, tmp_path):
    from safetensors.torch import load_file, save_file

    from diffnb.toyworld.probes import heads, probe_world
    from diffnb.toyworld.world import TOY_WORLD

    save_file(load_file(v1_probes[0]), tmp_path / "old.safetensors")  # as files were written before worlds
    assert probe_world(tmp_path / "old.safetensors") == "v1" and heads("v1") == HEADS
    assert Probes().heads == heads(TOY_WORLD)


def test_pattern_world_detail_labels_come_from_patterns():
    renders = [ToyDataset("train", 12, n_objects=1, world="pattern")[i] for i in range(12)]
    details = [r.scene.objects[0].detail for r in renders]
    assert {"spots", "stripes"} & set(details)
    assert _labels(renders, "pattern")["detail"].tolist() == [PATTERNS.index(d) for d in details]
    with pytest.raises(ValueError, match="world"):
        _labels(renders)  # the shipped world's labels of pattern renders


def test_tiny_v2_probes_record_their_world(v2_probes):
    out, acc = v2_probes
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"world": "v2"}
    probes = Probes(out)
    assert probes.world == "v2" and probes.heads["detail"] == PATTERNS
    assert probes.heldout_accuracy == acc and json.loads(out.with_suffix(".json").read_text())["world"] == "v2"
    images = np.stack([ToyDataset("heldout", 4, n_objects=1, world="v2")[i].image for i in range(4)])
    probes.net.heads["detail"].weight.data.zero_()
    probes.net.heads["detail"].bias.data = torch.tensor([0.0, 0.0, 9.0])  # the last class wins: v2's "stripes"
    assert probes.predict(images)["detail"] == ["stripes"] * 4


def test_training_another_world_refuses_the_shipped_file(monkeypatch):
    def no_rendering(*a, **kw):
        raise RuntimeError("training started")  # the check must come first, so the shipped file is never touched

    monkeypatch.setattr(probes_module, "ToyDataset", no_rendering)
    from diffnb.toyworld.world import TOY_WORLD

    other = "v2" if TOY_WORLD == "v1" else "v1"
    with pytest.raises(ValueError, match=f"shipped probes of world '{TOY_WORLD}'"):
        train(steps=1, n_images=1, out=PROBE_FILE, world=other)


def test_scorers_refuse_probes_of_another_world(v1_probes, v2_probes):
    shipped, v2 = Probes(v1_probes[0]), Probes(v2_probes[0])
    with pytest.raises(ValueError, match="trained on world 'v1', not 'v2'"):
        fidelity(RecordingPipe(), shipped, 2, world="v2")
    with pytest.raises(ValueError, match="trained on world 'v2', not 'v1'"):
        diversity(RecordingPipe(), v2, 2, world="v1")
    with pytest.raises(ValueError, match="trained on world 'v1', not 'pattern'"):
        evaluate(shipped, 2, world="pattern")
    with pytest.raises(ValueError, match="unknown world"):
        fidelity(RecordingPipe(), shipped, 2, world="v3")


def test_fidelity_draws_scenes_of_the_probes_world(v1_probes, v2_probes, monkeypatch):
    from diffnb.toyworld import evaluate as evaluate_module

    worlds = []

    def recording_scene(*a, world="v1", **kw):
        worlds.append(world)
        return random_scene(*a, world=world, **kw)

    def heldout_prompts(world):  # one-object scenes of v1 and v2 share their prompts: the stream differs later
        return [describe(random_scene(scene_rng("heldout", 10_000 + i), n_objects=1, world=world)) for i in range(4)]

    monkeypatch.setattr(evaluate_module, "random_scene", recording_scene)
    pipe = RecordingPipe()
    fidelity(pipe, Probes(v1_probes[0]), 4)
    assert worlds == ["v1"] * 4 and pipe.prompts == heldout_prompts("v1")
    worlds.clear()
    pipe = RecordingPipe()
    m, images = fidelity(pipe, Probes(v2_probes[0]), 4, return_images=True)
    assert worlds == ["v2"] * 4 and pipe.prompts == heldout_prompts("v2")
    assert images.shape == (4, 64, 64, 3) and {"fidelity_shape", "shape_confusions"} <= set(m)


def test_evaluate_cli_world_defaults_to_the_model_and_checks_the_probes(v1_probes, tmp_path, monkeypatch):
    import diffnb.models

    assert model_world(tmp_path) == "v1"
    (tmp_path / "training_config.json").write_text(json.dumps({"args": {"world": "v2"}}))
    assert model_world(tmp_path) == "v2"

    def no_loading(*a, **kw):
        raise RuntimeError("the pipeline was loaded")  # the check must come before minutes of generation

    monkeypatch.setattr(diffnb.models, "load_pipeline", no_loading)
    with pytest.raises(ValueError, match="trained on world 'v1', not 'v2'"):
        main(["--world", "v2", "--probes", str(v1_probes[0]), "--out", str(tmp_path / "metrics.json")])
    monkeypatch.setattr(diffnb.models, "TOY_DIR", tmp_path)  # a model folder trained on v2: its world by default
    with pytest.raises(ValueError, match="trained on world 'v1', not 'v2'"):
        main(["--probes", str(v1_probes[0]), "--out", str(tmp_path / "metrics.json")])


def test_model_card_records_the_warm_start_chain_the_vae_and_the_notes(tmp_path):
    """A model trained in stages (pilot export -> continuation) must show its total steps, where its VAE came from
    and the appended notes (pilot table, premises); a v1 model from scratch keeps the old wording."""
    from diffnb.toyworld.evaluate import write_card

    args = dict(vae_steps=800, unet_steps=6750, trained_unet_steps=6750, batch=32, lr=4e-4, cooldown_from=4750,
                grounding=0.01, grounding_from=0, device="cpu (2 threads)", world="v2", vae_from="/x/pilots/vae_mix",
                init_from="pilots/v2_warm", init_steps=4750)
    (tmp_path / "training_config.json").write_text(json.dumps({"args": args}))
    m = {"fidelity_shape": 0.95, "probe_heldout_accuracy": {"shape": 1.0}, "n_fidelity": 200}
    write_card(m, tmp_path, "v2", notes="## Pilots\n| a | b |\n")
    card = (tmp_path / "README.md").read_text()
    assert "11,500 steps" in card and "Warm-started from the export after 4,750 steps (then at `pilots/v2_warm`" in card
    assert "the VAE of `vae_mix`" in card and "VAE 800 steps" not in card
    assert "## Pilots\n| a | b |" in card and "20 tokens" in card and "world `v2`" in card
    args.update(world="v1", vae_from=None, init_from=None, init_steps=0, unet_steps=11500, trained_unet_steps=11500)
    (tmp_path / "training_config.json").write_text(json.dumps({"args": args}))
    write_card(m, tmp_path, "v1")
    card = (tmp_path / "README.md").read_text()
    assert "VAE 800 steps" in card and "11,500 steps" in card and "Warm-started" not in card and "16 tokens" in card


def test_card_only_rewrites_the_card_from_measured_metrics_without_measuring(tmp_path, monkeypatch):
    """`evaluate --card-only` reads metrics.json beside the card and appends the notes; it loads no pipeline."""
    from diffnb.toyworld import evaluate

    args = dict(vae_steps=800, unet_steps=11500, batch=32, lr=4e-4, grounding=0.01, grounding_from=6750,
                device="cpu", world="v1")
    (tmp_path / "training_config.json").write_text(json.dumps({"args": args}))
    m = {"fidelity_shape": 0.905, "probe_heldout_accuracy": {"shape": 1.0}, "n_fidelity": 200, "world": "v1"}
    (tmp_path / "metrics.json").write_text(json.dumps(m))
    (tmp_path / "notes.md").write_text("## Pilots\n| a | b |\n")
    monkeypatch.setattr("diffnb.models.load_pipeline", lambda *a, **k: pytest.fail("--card-only measured"))
    evaluate.main(["--card-only", "--out", str(tmp_path / "metrics.json"), "--notes", str(tmp_path / "notes.md")])
    card = (tmp_path / "README.md").read_text()
    assert "| fidelity_shape | 0.905 | ≥ 0.9 |" in card and "## Pilots\n| a | b |" in card
    with pytest.raises(SystemExit, match="needs measured metrics"):
        evaluate.main(["--card-only", "--out", str(tmp_path / "none.json")])

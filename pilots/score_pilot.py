"""Score a trained pilot: `python pilots/score_pilot.py NAME [--sizes small]` -> pilots/results/NAME.json.

1. Scorer: the shipped probes for world v1; for another world, probes of the same architecture trained on that
   world's renders (1,500 steps, as the shipped ones; cached in /work/pilot_runs/NAME/probes.safetensors), with
   their held-out accuracy on blurred renders of the world.
2. Fidelity: probe accuracy (shape / colour / background) on generations of 100 held-out one-object scenes of the
   world whose prompts name all three (as `diffnb.toyworld.evaluate.fidelity`, which reads v1 only).
3. Premises: `diffnb.premises.toy_premises` on the world's prompts and renders.
Plus the training record: steps, final smoothed denoising loss, CPU seconds (cpu.jsonl).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pilots.run_pilot import BUDGET, PILOTS, RESULTS, RUNS  # noqa: E402


def world_probes(world: str, out: Path, steps: int = 1500, n_images: int = 12_000, batch: int = 64, seed: int = 0):
    """Probes (the shipped architecture and recipe) trained on one-object renders of `world`."""
    from safetensors.torch import save_file

    from diffnb.toyworld.data import ToyDataset
    from diffnb.toyworld.probes import Probes, _augment, _batch, fit_probe
    from diffnb.toyworld.world import BACKGROUNDS, COLORS, SHAPES, world_config

    details = world_config(world).details

    def labels(renders):
        o = [r.scene.objects[0] for r in renders]
        return {"shape": torch.tensor([SHAPES.index(x.shape) for x in o]),
                "color": torch.tensor([list(COLORS).index(x.color) for x in o]),
                "background": torch.tensor([BACKGROUNDS.index(r.scene.background) for r in renders]),
                "detail": torch.tensor([details.index(x.detail) for x in o])}

    if not out.exists():
        torch.manual_seed(seed)
        ds = ToyDataset("train", n_images, n_objects=1, world=world)
        renders = [ds[i] for i in range(n_images)]
        net = fit_probe(_batch([r.image for r in renders]), labels(renders), steps, batch, seed, progress=False)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, out)
    probes = Probes(out)
    held = [ToyDataset("heldout", 1000, n_objects=1, world=world)[i] for i in range(1000)]
    x = _augment(_batch([r.image for r in held]), torch.Generator().manual_seed(123))
    pred = probes.probabilities(x)
    probes.heldout_accuracy = {k: float((pred[k].argmax(-1) == v.numpy()).mean()) for k, v in labels(held).items()}
    return probes


def fidelity(pipe, probes, world: str, n: int = 100, steps: int = 20, guidance: float = 5.0) -> dict:
    from diffnb.toyworld.data import scene_rng
    from diffnb.toyworld.prompts import describe
    from diffnb.toyworld.world import random_scene
    from diffnb.viz import to_uint8

    scenes = [random_scene(scene_rng("heldout", 10_000 + i), n_objects=1, world=world) for i in range(n)]
    images = []
    for i in range(0, n, 25):
        gens = [torch.Generator().manual_seed(10_000 + j) for j in range(i, min(n, i + 25))]
        images.append(to_uint8(pipe([describe(s) for s in scenes[i:i + 25]], generator=gens, num_inference_steps=steps,
                                    guidance_scale=guidance, output_type="np").images))
    images = np.concatenate(images)
    pred = probes.predict(images)
    truth = {"shape": [s.objects[0].shape for s in scenes], "color": [s.objects[0].color for s in scenes],
             "background": [s.background for s in scenes]}
    return {k: float(np.mean([a == b for a, b in zip(pred[k], truth[k])])) for k in truth}, images[:16]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name")
    p.add_argument("--sizes", default="full", help="premise sizes (small reads too few sets: see pilots/README.md)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--probe-steps", type=int, default=1500, help="training steps of a non-v1 world's probes")
    p.add_argument("--fidelity-n", type=int, default=100)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from diffnb.premises import code_version, load_folder, toy_premises
    from diffnb.toyworld.probes import Probes

    run, world = RUNS / a.name, PILOTS[a.name]["world"] if a.name in PILOTS else a.name
    t0 = time.perf_counter()
    pipe = load_folder(run / "export")
    probes = Probes() if world == "v1" else world_probes(world, run / "probes.safetensors", a.probe_steps)
    fid, samples = fidelity(pipe, probes, world, a.fidelity_n)
    print("fidelity", fid, flush=True)
    from PIL import Image

    Image.fromarray(np.concatenate(list(samples.reshape(2, 8, *samples.shape[1:]).transpose(0, 2, 1, 3, 4)
                                        .reshape(2, samples.shape[1], -1, 3)), 0)).save(run / "samples.png")
    prem = toy_premises(pipe, probes.predict, world=world, sizes=a.sizes)
    cfg = json.loads((run / "export" / "training_config.json").read_text())["args"]
    loss = [line.split(",") for line in (run / "loss.csv").read_text().splitlines() if line.startswith("unet,")]
    cpu = [json.loads(line) for line in (run / "cpu.jsonl").read_text().splitlines()] if (run / "cpu.jsonl").exists() else []
    result = {
        "name": a.name, "world": world, "budget": {**BUDGET, **PILOTS.get(a.name, {})},
        "trained_unet_steps": cfg.get("trained_unet_steps"), "vae_from": cfg.get("vae_from"),
        "final_loss_smoothed": float(loss[-1][3]) if loss else None,
        "train_cpu_minutes": round(sum(c["cpu_s"] for c in cpu if c["stage"] == "train") / 60, 1),
        "probe_heldout_accuracy": probes.heldout_accuracy, "fidelity": fid, "sizes": a.sizes,
        "premises": {k: v.to_dict() for k, v in prem.items()},
        "score_seconds": round(time.perf_counter() - t0, 1), "code": code_version(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{a.name}.json").write_text(json.dumps(result, indent=1, default=float))
    print(json.dumps({k: result[k] for k in ("name", "fidelity", "train_cpu_minutes")}), flush=True)
    for v in prem.values():
        print(v.line())


if __name__ == "__main__":
    main()

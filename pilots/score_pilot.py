"""Score a trained pilot: `python pilots/score_pilot.py NAME [--sizes small]` -> pilots/results/NAME.json.
NAME is a pilot of `run_pilot.PILOTS` or any run folder in /work/pilot_runs with an export (its world read from the
export's training_config.json), such as the full training of the chosen world.

1. Scorer: the shipped probes for world v1; for another world, probes of the same architecture trained on that
   world's renders (`diffnb.toyworld.probes.train`, 1,500 steps, as the shipped ones; cached in
   /work/pilot_runs/NAME/probes.safetensors, their world in its metadata), with their held-out accuracy on blurred
   renders of the world.
2. Fidelity: probe accuracy (shape / colour / background) on generations of 100 held-out one-object scenes of the
   world whose prompts name all three (`diffnb.toyworld.evaluate.fidelity`).
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
    """Probes (the shipped architecture and recipe) trained on one-object renders of `world`, cached at `out`.

    A cached file trained on another world (or written before probe files recorded their world, so read as v1) is
    retrained: its detail head would name the wrong classes."""
    from diffnb.toyworld.probes import Probes, evaluate, probe_world, train

    if not out.exists() or probe_world(out) != world:
        train(steps=steps, batch=batch, n_images=n_images, out=out, seed=seed, world=world, progress=False)
    probes = Probes(out)
    if probes.heldout_accuracy is None:
        probes.heldout_accuracy = evaluate(probes, world=world)
    return probes


def fidelity(pipe, probes, world: str, n: int = 100, steps: int = 20, guidance: float = 5.0):
    """{shape, colour, background: accuracy} and the first 16 generations (`diffnb.toyworld.evaluate.fidelity`)."""
    from diffnb.toyworld.evaluate import fidelity as package_fidelity

    m, images = package_fidelity(pipe, probes, n, world=world, return_images=True, num_inference_steps=steps,
                                 guidance_scale=guidance)
    return {k: m[f"fidelity_{k}"] for k in ("shape", "color", "background")}, images[:16]


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
    from diffnb.toyworld.evaluate import model_world, total_unet_steps
    from diffnb.toyworld.probes import Probes

    run = RUNS / a.name
    world = PILOTS[a.name]["world"] if a.name in PILOTS else model_world(run / "export")
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
        "name": a.name, "world": world, "budget": {**BUDGET, **PILOTS[a.name]} if a.name in PILOTS else cfg,
        "trained_unet_steps": cfg.get("trained_unet_steps"), "vae_from": cfg.get("vae_from"),
        "total_unet_steps": total_unet_steps(cfg),
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

"""DiffSim 2AFC of a toy model on fresh triplets, the way notebook 05 scores it: `python pilots/diffsim_fresh.py MODEL`.

MODEL is `toy` (the shipped model) or a saved pipeline folder (e.g. pilots/v2_warm); triplets are rendered in the
model's world. The layer x timestep is picked on notebook 05's selection triplets (seed 0, 32 a kind) by `best_setting`, as
the notebook does; it is then scored on three fresh sets of 48 (seeds 2, 3, 4: the notebook scores seed 1), each with a
95 % bootstrap interval over triplets. Writes pilots/results/diffsim_fresh_<name>.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
TIMESTEPS = (50, 300, 600, 900)  # notebook 05's toy timesteps
KINDS = ("style", "content")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--seeds", default="2,3,4")
    p.add_argument("--n", type=int, default=48)
    a = p.parse_args()
    from diffnb.metrics import two_afc
    from diffnb.models import TOY_DIR, load_pipeline
    from diffnb.papers.diffsim import DiffSimArgs, best_setting, diffsim_sweep
    from diffnb.premises import bootstrap_ci, load_folder
    from diffnb.toyworld.evaluate import model_world
    from diffnb.toyworld.scoring import triplets

    folder = TOY_DIR if a.model == "toy" else Path(a.model)
    pipe = load_pipeline("toy", device="cpu") if a.model == "toy" else load_folder(folder)
    world, args = model_world(folder), DiffSimArgs.for_model("toy")
    kw = dict(prompt=args.prompt, guidance_scale=args.guidance_scale, seed=args.seed, batch_size=args.batch_size,
              progress=False)

    def scores(ref, pos, neg, **k):
        return diffsim_sweep(pipe, np.concatenate([ref, ref]), np.concatenate([pos, neg]), **{**kw, **k})

    out = {"model": str(a.model), "world": world, "n": a.n, "seeds": a.seeds, "kinds": {}}
    for kind in KINDS:
        sel = triplets(kind, 32, seed=0, world=world)
        sweep = scores(*sel, layers="self", timesteps=TIMESTEPS).aas
        best = best_setting(sweep, 32)
        rows = {}
        for seed in (int(s) for s in a.seeds.split(",")):
            s = scores(*triplets(kind, a.n, seed=seed, world=world), layers=best[0], timesteps=best[1]).aas[best]
            triplet_scores = list(zip(s[:a.n].tolist(), s[a.n:].tolist()))  # (positive, negative), resampled whole
            rows[seed] = {"two_afc": two_afc(s[:a.n], s[a.n:]),
                          "ci95": bootstrap_ci(triplet_scores, lambda g: two_afc(*zip(*g)))}
            print(f"{kind:8s} seed {seed}: 2AFC {rows[seed]['two_afc']:.3f} [{rows[seed]['ci95'][0]:.3f}, "
                  f"{rows[seed]['ci95'][1]:.3f}]  ({best[0]}, t={best[1]})", flush=True)
        out["kinds"][kind] = {"layer": best[0], "timestep": best[1], "per_seed": rows}
    name = "toy" if a.model == "toy" else folder.name
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"diffsim_fresh_{name}.json").write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()

"""ConsiStory on the toy model: identity consistency of unnamed attributes, vanilla vs the ablation ladder.

Each set is 4 prompts "a <shape> on a <style> background" (one per background style): the subject word is the
shape; its colour and detail are never named, so only shared identity can make them agree across the set.
Two ladders: the toy-scaled settings (`ConsiStoryArgs.for_model("toy")`) and the official ones ("official/...").
Also: subject-mask IoU against ground truth on DDIM-inverted held-out renders (generations have no ground truth).

    python benchmarks/consistory_toy.py --sets 24 --start 200      # -> benchmarks/results/consistory_toy_200.json
    python benchmarks/consistory_toy.py --sets 24 --start 200 --dropout-sweep   # -> ..._200_dropout.json
    python benchmarks/consistory_toy.py --sets 24 --start 200 --injection       # -> ..._200_injection.json
Every variant's identity gain over vanilla comes with a paired bootstrap interval over the sets.
"""
import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from diffnb.bench import save_result
from diffnb.metrics import paired_bootstrap
from diffnb.models import load_pipeline
from diffnb.papers.consistory import ABLATIONS, ConsiStoryArgs, generate, ladder
from diffnb.toyworld import SHAPES
from diffnb.toyworld.probes import Probes
from diffnb.toyworld.scoring import identity_scores, subject_mask_iou
from diffnb.viz import to_uint8

OUT = Path(__file__).resolve().parent / "results"
BGS = ("striped", "dotted", "checkered", "plain")
VARIANTS = {**ladder(ConsiStoryArgs.for_model("toy")),
            **{f"official/{k}": replace(v, mask_resolutions=(16,)) for k, v in ABLATIONS.items() if k != "vanilla"}}
# the paper's knob between consistency and layout variation (official 0.5): the full method at other dropouts
DROPOUTS = {f"full, dropout {p}": replace(VARIANTS["full"], mask_dropout=p) for p in (0.0, 0.1, 0.2, 0.3)}
# feature injection with no SDSA: can it carry identity on its own on the toy? (official, and as strong as it goes)
INJECTION = {"injection alone": replace(VARIANTS["full"], sdsa=False),
             "injection alone, alpha 1, every layer and step": replace(VARIANTS["full"], sdsa=False, inject_alpha=1.0,
                                                                       inject_layers="self", inject_fraction=(0, 1))}
CHOICES = {**VARIANTS, **DROPOUTS, **INJECTION}


@torch.no_grad()  # not set_grad_enabled: tests call main() and must get grad mode back
def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--sets", type=int, default=3)
    p.add_argument("--start", type=int, default=0, help="first set index (seeds and shapes follow from it)")
    p.add_argument("--iou", type=int, default=0, help="also measure mask IoU on this many inverted renders")
    p.add_argument("--ablations", default=",".join(VARIANTS), help=f"comma-separated, from {list(VARIANTS)}")
    p.add_argument("--dropout-sweep", action="store_true", help=f"run {list(DROPOUTS)} instead of --ablations")
    p.add_argument("--injection", action="store_true", help=f"run vanilla and {list(INJECTION)} instead")
    p.add_argument("--out", type=Path, default=None,
                   help="default: results/consistory_toy_<start>[_dropout or _injection].json")
    a = p.parse_args(argv)
    names = (["vanilla", *DROPOUTS] if a.dropout_sweep else ["vanilla", *INJECTION] if a.injection
             else a.ablations.split(","))
    if unknown := set(names) - set(CHOICES):
        p.error(f"unknown ablations {sorted(unknown)}; allowed: {list(CHOICES)}")
    pipe, probes = load_pipeline("toy", device="cpu"), Probes()
    result = {"setting": "toy model, 64px, 20 DDIM steps, CFG 5, sets of 4 prompts (one per background)",
              "sets": a.sets, "start": a.start, "ablations": {}}
    for name in names:
        images, prompts, masks, secs = [], [], [], 0.0
        for s in range(a.start, a.start + a.sets):
            shape = SHAPES[s % len(SHAPES)]
            ps = [f"a {shape} on a {bg} background" for bg in BGS]
            t = time.perf_counter()
            out = generate(pipe, ps, shape, CHOICES[name], seeds=[1000 * s + j for j in range(4)])
            secs += time.perf_counter() - t
            images.append(to_uint8(out.images))
            prompts.append(ps)
            masks.append(out.masks[16].numpy())
        scores = identity_scores(np.stack(images), prompts, probes, np.stack(masks))
        per_set = [identity_scores(im[None], [ps], probes)["identity_agreement"] for im, ps in zip(images, prompts)]
        result["ablations"][name] = {**scores, "seconds_per_set": secs / a.sets, "identity_per_set": per_set}
        print(name, {k: round(v, 3) for k, v in scores.items()}, flush=True)
    plain = []  # the plain pipeline, no processors at all: the time-ratio baseline
    for s in range(a.start, a.start + a.sets):
        ps = [f"a {SHAPES[s % len(SHAPES)]} on a {bg} background" for bg in BGS]
        t = time.perf_counter()
        pipe(ps, num_inference_steps=20, guidance_scale=5.0, output_type="np")
        plain.append(time.perf_counter() - t)
    result["plain_seconds_per_set"] = float(np.mean(plain))
    base = result["ablations"].get("vanilla")
    for name, r in result["ablations"].items():
        r["time_ratio"] = r["seconds_per_set"] / result["plain_seconds_per_set"]
        if base is not None and name != "vanilla" and a.sets > 1:  # the bar is a gain; how sure is it, set to set?
            r["identity_gain"] = paired_bootstrap(base["identity_per_set"], r["identity_per_set"])
        g = r.get("identity_gain")
        print(name, "time ratio vs plain pipeline", round(r["time_ratio"], 2),
              "" if g is None else f"identity gain {g['gain']:+.3f} (95% CI {g['low']:+.3f}..{g['high']:+.3f})")
    if a.iou:
        result["mask_iou"] = subject_mask_iou(pipe, a.iou, a.start)
        print("mask IoU", result["mask_iou"], flush=True)
    suffix = "_dropout" if a.dropout_sweep else "_injection" if a.injection else ""
    save_result(result, a.out or OUT / f"consistory_toy_{a.start}{suffix}.json")
    return result


if __name__ == "__main__":
    torch.set_num_threads(1)  # the results were measured on one thread (two runs shared the two cores)
    main()

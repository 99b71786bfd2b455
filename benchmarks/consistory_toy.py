"""ConsiStory on the toy model: identity consistency of unnamed attributes, vanilla vs the ablation ladder.

Each set is 4 prompts "a <shape> on a <style> background" (one per background style): the subject word is the
shape; its colour and detail are never named, so only shared identity can make them agree across the set.
Two ladders: the toy-scaled settings (`ConsiStoryArgs.for_model("toy")`) and the official ones ("official/...").
Also: subject-mask IoU against ground truth on DDIM-inverted held-out renders (generations have no ground truth).

    python benchmarks/consistory_toy.py --sets 24 --start 200      # -> benchmarks/results/consistory_toy_200.json
    python benchmarks/consistory_toy.py --sets 24 --start 200 --dropout-sweep   # -> ..._200_dropout.json
"""
import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from diffnb.bench import save_result
from diffnb.models import load_pipeline
from diffnb.papers.consistory import ABLATIONS, ConsiStoryArgs, generate, ladder, toy_mask_iou, toy_scores
from diffnb.toyworld import SHAPES
from diffnb.toyworld.probes import Probes
from diffnb.viz import to_uint8

OUT = Path(__file__).resolve().parent / "results"
BGS = ("striped", "dotted", "checkered", "plain")
VARIANTS = {**ladder(ConsiStoryArgs.for_model("toy")),
            **{f"official/{k}": replace(v, mask_resolutions=(16,)) for k, v in ABLATIONS.items() if k != "vanilla"}}
# the paper's knob between consistency and layout variation (official 0.5): the full method at other dropouts
DROPOUTS = {f"full, dropout {p}": replace(VARIANTS["full"], mask_dropout=p) for p in (0.0, 0.1, 0.2, 0.3)}
CHOICES = {**VARIANTS, **DROPOUTS}


@torch.no_grad()  # not set_grad_enabled: tests call main() and must get grad mode back
def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--sets", type=int, default=3)
    p.add_argument("--start", type=int, default=0, help="first set index (seeds and shapes follow from it)")
    p.add_argument("--iou", type=int, default=0, help="also measure mask IoU on this many inverted renders")
    p.add_argument("--ablations", default=",".join(VARIANTS), help=f"comma-separated, from {list(VARIANTS)}")
    p.add_argument("--dropout-sweep", action="store_true", help=f"run {list(DROPOUTS)} instead of --ablations")
    p.add_argument("--out", type=Path, default=None, help="default: results/consistory_toy_<start>[_dropout].json")
    a = p.parse_args(argv)
    names = list(DROPOUTS) if a.dropout_sweep else a.ablations.split(",")
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
        scores = toy_scores(np.stack(images), prompts, probes, np.stack(masks))
        result["ablations"][name] = {**scores, "seconds_per_set": secs / a.sets}
        print(name, {k: round(v, 3) for k, v in result["ablations"][name].items()}, flush=True)
    plain = []  # the plain pipeline, no processors at all: the time-ratio baseline
    for s in range(a.start, a.start + a.sets):
        ps = [f"a {SHAPES[s % len(SHAPES)]} on a {bg} background" for bg in BGS]
        t = time.perf_counter()
        pipe(ps, num_inference_steps=20, guidance_scale=5.0, output_type="np")
        plain.append(time.perf_counter() - t)
    result["plain_seconds_per_set"] = float(np.mean(plain))
    for name, r in result["ablations"].items():
        r["time_ratio"] = r["seconds_per_set"] / result["plain_seconds_per_set"]
        print(name, "time ratio vs plain pipeline", round(r["time_ratio"], 2))
    if a.iou:
        result["mask_iou"] = toy_mask_iou(pipe, a.iou, a.start)
        print("mask IoU", result["mask_iou"], flush=True)
    save_result(result, a.out or OUT / f"consistory_toy_{a.start}{'_dropout' if a.dropout_sweep else ''}.json")
    return result


if __name__ == "__main__":
    torch.set_num_threads(1)  # the results were measured on one thread (two runs shared the two cores)
    main()

"""EmerDiff locality on the shipped toy at its two cross-attention resolutions and two K: is 8×8 too coarse?
`python pilots/emerdiff_layers.py` -> pilots/results/emerdiff_layers.json (the premise CLI's 24 full-size renders).

Issue 17 suspects the toy's 8×8 lowest cross-attention level; the toy also has cross-attention at 16×16
(up_blocks.2). Same renders, same t_m / λ / inversion as `EmerDiffArgs.for_model("toy")`; only the layers and K move.
"""
import json
from pathlib import Path

import torch

from diffnb.models import load_pipeline
from diffnb.papers.emerdiff import EmerDiffArgs
from diffnb.premises import SIZES, code_version, emerdiff_locality
from diffnb.toyworld.data import ToyDataset

LAYERS = {8: ("up_blocks.1.attentions.0.transformer_blocks.0.attn2", "up_blocks.1.attentions.1.transformer_blocks.0.attn2"),
          16: ("up_blocks.2.attentions.0.transformer_blocks.0.attn2", "up_blocks.2.attentions.1.transformer_blocks.0.attn2")}

if __name__ == "__main__":
    torch.set_num_threads(1)
    pipe, n = load_pipeline("toy", device="cpu"), SIZES["full"].emerdiff_images
    ds = ToyDataset("heldout", 5000 + n)
    renders = [ds[5000 + i] for i in range(n)]
    out = {}
    for side, (q, m) in LAYERS.items():
        for per_region in (2, 4):
            args = EmerDiffArgs.for_model("toy", query_layer=q, modulate_layer=m)
            r = emerdiff_locality(pipe, [x.image for x in renders], [len(x.masks) for x in renders], args,
                                  segments_per_region=per_region, masks=[x.masks for x in renders])
            key = f"{side}x{side}, K={per_region}x regions"
            out[key] = {"value": r.value, **{k: r.details[k] for k in ("ci95_over_images", "median_object_segments",
                                                                       "median_background_segments", "modulations")}}
            print(key, {k: (round(v, 2) if isinstance(v, float) else v) for k, v in out[key].items()}, flush=True)
    path = Path(__file__).resolve().parent / "results" / "emerdiff_layers.json"
    path.write_text(json.dumps({"renders": n, "smooth_sigma": args.smooth_sigma, "code": code_version(), "results": out},
                               indent=1))

"""Is a VAE good enough for each world? `python pilots/vae_check.py [VAE_FOLDER NAME]` -> pilots/results/NAME.json
(default: the shipped toy VAE -> vae_check.json; the shared pilot VAE: /work/pilot_runs/vae_mix/export/vae vae_mix).

Encodes and decodes 64 held-out renders of each world (latent mean, no sampling) and reports PSNR over the image
and over the background / object pixels; writes a grid (JPEG) of renders over reconstructions next to the JSON.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from diffnb.toyworld.data import ToyDataset
from diffnb.toyworld.world import WORLDS

VAE = Path(__file__).resolve().parents[1] / "diffnb" / "assets" / "toy" / "vae"


@torch.no_grad()
def main(vae_dir: Path = VAE, name: str = "vae_check", n: int = 64):
    from diffusers import AutoencoderKL

    torch.set_num_threads(1)
    from PIL import Image

    vae = AutoencoderKL.from_pretrained(vae_dir).float().eval()
    out, grid = {}, []
    for world in WORLDS:
        renders = [ToyDataset("heldout", 2000 + n, world=world)[2000 + i] for i in range(n)]
        x = torch.from_numpy(np.stack([r.image for r in renders])).permute(0, 3, 1, 2).float() / 127.5 - 1
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        err = ((rec - x) / 2).pow(2).mean(1).numpy()  # (n, H, W) squared error on [0, 1]
        as_u8 = lambda t: ((t[:8] + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
        grid += [np.concatenate(list(as_u8(x)), 1), np.concatenate(list(as_u8(rec)), 1)]
        bg = np.stack([r.masks[-1] for r in renders])
        psnr = lambda e: float(10 * np.log10(1 / max(e, 1e-12)))
        out[world] = {"psnr": psnr(err.mean()), "psnr_background": psnr(err[bg].mean()),
                      "psnr_objects": psnr(err[~bg].mean())}
        print(world, {k: round(v, 2) for k, v in out[world].items()}, flush=True)
    path = Path(__file__).resolve().parent / "results" / f"{name}.json"
    path.write_text(json.dumps({"n": n, "vae": str(vae_dir), "worlds": out}, indent=1))
    Image.fromarray(np.concatenate(grid)).save(path.with_suffix(".jpg"), quality=85)


if __name__ == "__main__":
    import sys

    main(*(([Path(sys.argv[1]), sys.argv[2]]) if len(sys.argv) > 2 else []))

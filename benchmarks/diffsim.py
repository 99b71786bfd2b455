"""DiffSim throughput, same process: pairs per second and the cost of scoring against the bare UNet call.
Toy model on CPU; on a GPU, SD1.5's full-size UNet built from its config with random weights (timing does not
depend on weights), 512² (64² latents), the official setting (`DiffSimArgs`): one layer, prompt + CFG 7.5 (4 latents
per pair), `DiffSimArgs.batch_size` pairs per call (the T4-sized batch notebook 05 runs) unless --pairs says otherwise.

    python benchmarks/diffsim.py            # toy on CPU -> benchmarks/results/diffsim_cpu.json
    python benchmarks/diffsim.py --sd15     # GPU: SD1.5 architecture, 512²
"""
import argparse
from pathlib import Path

import torch

from diffnb.bench import compare
from diffnb.papers.diffsim import AlignedAttentionScore, DiffSimArgs, diffsim
from diffnb.processors import patch_attention
from diffnb.toyworld.scoring import triplets

OUT = Path(__file__).resolve().parent / "results"
OFFICIAL = DiffSimArgs.for_model("sd15")
OFFICIAL_LAYER = OFFICIAL.layer  # what the official SD1.5 code hooks


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sd15", action="store_true", help="full-size SD1.5 UNet from config on CUDA")
    p.add_argument("--pairs", type=int, default=None, help="pairs per call (default: 16 toy, DiffSimArgs sd15)")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    torch.set_grad_enabled(False)
    n = a.pairs or (OFFICIAL.batch_size if a.sd15 else 16)
    if a.sd15:
        from diffnb.models import full_size_unet
        unet = full_size_unet("sd15")
        x = torch.randn(4 * n, 4, 64, 64, device="cuda", dtype=torch.float16)  # [A, B] x CFG halves
        cond = dict(encoder_hidden_states=torch.randn(4 * n, 77, 768, device="cuda", dtype=torch.float16))
        step = lambda: unet(x, OFFICIAL.timestep, **cond)
        def method():
            with patch_attention(unet, {OFFICIAL_LAYER: AlignedAttentionScore(n, {}, {})}):
                step()
        r = compare("diffsim_sd15_unet", step, method, "cuda", a.repeats, OUT / "diffsim_gpu.json",
                    setting=f"SD1.5 UNet, 512², {n} pairs with CFG, one call, layer {OFFICIAL_LAYER}; VAE encoding excluded")
        print(f"{n / r['method']['median_s']:.1f} pairs/s")
        return
    from diffnb.models import load_pipeline
    pipe = load_pipeline("toy", device="cpu")
    ref, pos, _ = triplets("content", n)
    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    vanilla_x = torch.randn(2 * n, 4, 16, 16)
    emb = pipe.encode_prompt([""] * 2 * n, "cpu", 1, False)[0]
    bare = lambda: pipe.unet(vanilla_x, 50, encoder_hidden_states=emb)
    full = lambda: diffsim(pipe, ref, pos, layer, 50, progress=False)  # VAE encoding + UNet call + score
    r = compare("diffsim_toy", bare, full, "cpu", a.repeats, OUT / "diffsim_cpu.json",
                setting=f"toy model, 64², {n} pairs, encode + one UNet call + score at {layer}")
    print(f"{n / r['method']['median_s']:.1f} pairs/s (end to end, VAE encoding included)")


if __name__ == "__main__":
    main()

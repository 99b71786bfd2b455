"""StyleAligned overhead vs the vanilla pipeline, same process: toy model on CPU; on a GPU, SDXL's full-size
architecture built from its config with random weights (timing does not depend on weights).

    python benchmarks/style_aligned.py            # toy on CPU -> benchmarks/results/style_aligned_cpu.json
    python benchmarks/style_aligned.py --sdxl     # GPU: SDXL architecture, 1024², batch 4
"""
import argparse
from pathlib import Path

import torch

from diffnb.bench import compare
from diffnb.papers.style_aligned import style_aligned

OUT = Path(__file__).resolve().parent / "results"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sdxl", action="store_true", help="full-size SDXL UNet from config on CUDA")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    torch.set_grad_enabled(False)
    if a.sdxl:
        from diffnb.models import full_size_unet
        unet = full_size_unet("sdxl")
        x = torch.randn(4, 4, 128, 128, device="cuda", dtype=torch.float16).repeat(2, 1, 1, 1)  # batch 4 under CFG:
        # the same latents in both halves, as a pipeline builds them (style_aligned(cfg=True) checks it)
        cond = dict(encoder_hidden_states=torch.randn(8, 77, 2048, device="cuda", dtype=torch.float16),
                    added_cond_kwargs={"text_embeds": torch.randn(8, 1280, device="cuda", dtype=torch.float16),
                                       "time_ids": torch.randn(8, 6, device="cuda", dtype=torch.float16)})
        step = lambda: unet(x, 500, **cond)
        def method():
            with style_aligned(unet):
                step()
        compare("style_aligned_sdxl_unet_step", step, method, "cuda", a.repeats, OUT / "style_aligned_gpu.json",
                setting="SDXL UNet, 1024², batch 4 with CFG, one denoising step")
        return
    from diffnb.models import load_pipeline
    pipe = load_pipeline("toy", device="cpu")
    prompts = ["a red heart", "a blue moon", "a yellow triangle", "a green circle"]
    run = lambda: pipe(prompts, num_inference_steps=20, guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type="np")
    def method():
        with style_aligned(pipe.unet):
            run()
    compare("style_aligned_toy", run, method, "cpu", a.repeats, OUT / "style_aligned_cpu.json",
            setting="toy model, 64², batch 4 with CFG, 20 DDIM steps")


if __name__ == "__main__":
    main()

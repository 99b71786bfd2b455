"""ConsiStory cost: the full method (SDSA with masks, dropout, query mixing, and the second pass for feature
injection) against the vanilla pipeline on the same 4 prompts and seeds, in the same process.
(`consistory_toy.py` measures what it does to identity on the toy; this script measures what it costs.)

    python benchmarks/consistory.py            # toy, 64², CPU                 -> results/consistory_cpu.json
    python benchmarks/consistory.py --sdxl     # SDXL architecture, 1024², 4 images, random weights, CUDA (<= 2.3x)
    python benchmarks/consistory.py --tiny     # the --sdxl code path on a tiny SDXL-shaped pipeline (smoke test)
"""
from pathlib import Path

import torch

from diffnb.bench import benchmark_parser, compare
from diffnb.papers.consistory import ConsiStoryArgs, generate

OUT = Path(__file__).resolve().parent / "results"


def run(pipe, prompts, subject, device, steps, args, repeats, out, setting) -> dict:
    seeds = list(range(len(prompts)))
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    shape = (1, pipe.unet.config.in_channels, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)
    latents = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    latents = latents.to(device, pipe.unet.dtype)
    vanilla = lambda: pipe(prompts, latents=latents, num_inference_steps=steps, guidance_scale=5.0, output_type="np")
    method = lambda: generate(pipe, prompts, subject, args, seeds=seeds, num_inference_steps=steps, guidance_scale=5.0)
    return compare("consistory_full", vanilla, method, device, repeats, out, setting=setting, steps=steps,
                   images=len(prompts))


@torch.no_grad()  # not set_grad_enabled: tests call main() and must get grad mode back
def main(argv=None):
    p = benchmark_parser("sdxl", "full-size SDXL pipeline from configs on CUDA, 1024²")
    p.add_argument("--steps", type=int, default=None, help="default: 50 (official) on SDXL, 20 on the toy, 4 tiny")
    a = p.parse_args(argv)
    if a.sdxl or a.tiny:
        from diffnb.models import full_size_pipeline, tiny_pipeline
        device = "cuda" if a.sdxl else "cpu"
        pipe = full_size_pipeline("sdxl", device) if a.sdxl else tiny_pipeline("sdxl")
        prompts = ["a photo of a dog", "a dog on a striped background", "a watercolor painting of a dog",
                   "a dog in the style of a painting"]  # words of the stand-in tokenizer
        args = ConsiStoryArgs.for_model("sdxl", **({} if a.sdxl else {"mask_resolutions": None}))  # tiny: no 32x32
        return run(pipe, prompts, "dog", device, a.steps or (50 if a.sdxl else 4), args, a.repeats,
                   a.out or OUT / ("consistory_gpu.json" if a.sdxl else "consistory_tiny.json"),
                   "SDXL architecture (random weights), 1024², 4 images, CFG 5, official masks (32x32)"
                   if a.sdxl else "tiny SDXL-shaped pipeline (smoke test of the GPU path)")
    from diffnb.models import load_pipeline
    pipe = load_pipeline("toy", device="cpu")
    prompts = [f"a heart on a {bg} background" for bg in ("striped", "dotted", "checkered", "plain")]
    return run(pipe, prompts, "heart", "cpu", a.steps or 20, ConsiStoryArgs.for_model("toy"), a.repeats,
               a.out or OUT / "consistory_cpu.json", "toy model, 64², 4 images, 20 DDIM steps, CFG 5, the toy's settings "
               "(ConsiStoryArgs.for_model('toy'): every self-attention layer, all images share, 16x16 masks)")


if __name__ == "__main__":
    main()

"""EmerDiff cost: one segmentation (inversion to t_m, k-means at t_f, 2K modulated runs, decoding) against one
vanilla generation of the same size and steps, in the same process.

    python benchmarks/emerdiff.py           # toy, 64², on CPU       -> benchmarks/results/emerdiff_cpu.json
    python benchmarks/emerdiff.py --sd15    # SD1.5 architecture, 512², random weights, on CUDA (the issue's <= 5 s)
    python benchmarks/emerdiff.py --tiny    # the --sd15 code path on a tiny pipeline (a smoke test, on CPU)
"""
from pathlib import Path

import torch

from diffnb.bench import benchmark_parser, compare, save_result
from diffnb.papers.emerdiff import EmerDiffArgs, segment

OUT = Path(__file__).resolve().parent / "results"
TINY_ARGS = dict(query_layer="up_blocks.1.attentions.0.transformer_blocks.0.attn2",
                 modulate_layer="up_blocks.1.attentions.1.transformer_blocks.0.attn2",
                 n_segments=3, num_inference_steps=5, t_m=401)


def run(pipe, args: EmerDiffArgs, device, repeats: int, out: Path, setting: str) -> dict:
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device, pipe.unet.dtype) * 2 - 1
    vanilla = lambda: pipe("", num_inference_steps=args.num_inference_steps, guidance_scale=1.0, height=size,
                           width=size, generator=torch.Generator(device).manual_seed(0), output_type="np")
    method = lambda: segment(pipe, image, args)
    result = compare("emerdiff_segment", vanilla, method, device, repeats, None, setting=setting,
                     n_segments=args.n_segments, steps=args.num_inference_steps, t_m=args.t_m)
    result["seconds_per_segmentation"] = result["method"]["median_s"]
    print(f"one segmentation: {result['seconds_per_segmentation']:.2f} s on {result['device']}")
    save_result(result, out)
    return result


@torch.no_grad()  # not set_grad_enabled: tests call main() and must get grad mode back
def main(argv=None):
    p = benchmark_parser("sd15", "full-size SD1.5 pipeline from configs on CUDA, 512²")
    a = p.parse_args(argv)
    if a.sd15 or a.tiny:
        from diffnb.models import full_size_pipeline, tiny_pipeline
        device = "cuda" if a.sd15 else "cpu"
        pipe = full_size_pipeline("sd15", device) if a.sd15 else tiny_pipeline("sd15")
        args = EmerDiffArgs() if a.sd15 else EmerDiffArgs(**TINY_ARGS)  # paper: 512², K=20, 50 steps, t_m=281
        name = "emerdiff_gpu.json" if a.sd15 else "emerdiff_tiny.json"
        return run(pipe, args, device, a.repeats, a.out or OUT / name,
                   "SD1.5 architecture (random weights), 512², K=20, 50 steps, t_m=281, DDPM inversion, "
                   "attention injection, Gaussian sigma 4 px, decoded 8 at a time" if a.sd15 else "tiny SD1.5-shaped pipeline (smoke test of the GPU path)")
    from diffnb.models import load_pipeline
    pipe = load_pipeline("toy", device="cpu")
    return run(pipe, EmerDiffArgs.for_model("toy"), "cpu", a.repeats, a.out or OUT / "emerdiff_cpu.json",
               "toy model, 64², the notebook's settings (K=2, 20 DDIM steps, t_m=301, Gaussian sigma 2 px)")


if __name__ == "__main__":
    main()

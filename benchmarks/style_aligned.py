"""StyleAligned overhead vs the vanilla pipeline, same process: toy model on CPU; on a GPU, SDXL's full-size
architecture built from its config with random weights (timing does not depend on weights).

    python benchmarks/style_aligned.py            # toy on CPU -> benchmarks/results/style_aligned_cpu.json
                                                  # (and the floor: the doubled keys alone)
    python benchmarks/style_aligned.py --sdxl     # GPU: SDXL architecture, 1024², batch 4 under CFG, one UNet step
    python benchmarks/style_aligned.py --tiny     # the --sdxl code path on a tiny SDXL-shaped UNet (smoke test, CPU)
"""
from pathlib import Path

import torch

from diffnb.bench import benchmark_parser, compare, save_result
from diffnb.papers.style_aligned import (SharedAttention, StyleAlignedArgs, _shared_norms, adain, expand_reference,
                                         style_aligned)
from diffnb.processors import patch_attention

OUT = Path(__file__).resolve().parent / "results"


def unet_step(unet, device, dtype, images: int = 4):
    """One UNet call on `images` under CFG: the same latents in both halves, as a pipeline builds them
    (style_aligned(cfg=True) checks it); conditioning shaped from the UNet's config (SDXL's added time ids)."""
    c = unet.config
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)
    x = rand(images, c.in_channels, c.sample_size, c.sample_size).repeat(2, 1, 1, 1)
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    cond = dict(encoder_hidden_states=rand(2 * images, 77, c.cross_attention_dim),
                added_cond_kwargs={"text_embeds": rand(2 * images, pooled), "time_ids": rand(2 * images, 6)})
    return lambda: unet(x, torch.tensor(500, device=device), **cond)


class OfficialFormulation(SharedAttention):
    """The official handler's math where it differs from ours (google/style-aligned `sa_handler.py` and the transfer
    notebook's shifted variant), for timing side by side: with a score shift it forms the logits explicitly (einsum,
    shift added to the reference columns, softmax) instead of one SDPA call with a bias."""

    def attend(self, call, q, k, v, mask):
        a, h = self.args, self.halves
        if not a.shared_score_shift:
            return super().attend(call, q, k, v, mask)
        q, k = adain(q, h), adain(k, h)
        keys = torch.cat([k, expand_reference(k, h, a.shared_score_scale)], -2)
        logits = torch.einsum("bhqd,bhkd->bhqk", q, keys) * q.shape[-1] ** -0.5
        logits[..., k.shape[-2]:] += a.shared_score_shift
        return torch.einsum("bhqk,bhkd->bhqd", logits.softmax(-1), torch.cat([v, expand_reference(v, h)], -2))


def official_formulation(unet, run, args=None):
    """`run` under the official formulation: OfficialFormulation on every self-attention and *every* GroupNorm and
    LayerNorm shared (the official handler shares per-token LayerNorms too, which cannot change them)."""
    args = args or StyleAlignedArgs.for_model("toy")

    def method():
        norms = [m for m in unet.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))]
        with patch_attention(unet, {"self": OfficialFormulation(args)}), _shared_norms(norms, 2):
            return run()
    return method


def official_difference(unet, run) -> float:
    """max |ours - official formulation| over the final latents (float rounding only: the math is the same)."""
    with style_aligned(unet, StyleAlignedArgs.for_model("toy")):
        ours = run().images
    return float((ours - official_formulation(unet, run)().images).abs().max())


@torch.no_grad()  # not set_grad_enabled: tests call main() and must get grad mode back
def main(argv=None):
    p = benchmark_parser("sdxl", "full-size SDXL UNet from its config on CUDA, 1024², batch 4 under CFG")
    p.set_defaults(repeats=7)  # the speed bar is a median of >= 5 interleaved repeats
    a = p.parse_args(argv)
    if a.sdxl or a.tiny:
        from diffnb.models import full_size_unet, tiny_pipeline
        device, dtype = ("cuda", torch.float16) if a.sdxl else ("cpu", torch.float32)
        unet = full_size_unet("sdxl") if a.sdxl else tiny_pipeline("sdxl").unet
        step = unet_step(unet, device, dtype)
        args = StyleAlignedArgs.for_model("sdxl")  # the official SDXL notebook's settings

        def method():
            with style_aligned(unet, args):
                step()
        return compare("style_aligned_sdxl_unet_step", step, method, device, a.repeats,
                       a.out or OUT / ("style_aligned_gpu.json" if a.sdxl else "style_aligned_tiny.json"),
                       setting="SDXL UNet (random weights), 1024², batch 4 under CFG, one denoising step, "
                               "StyleAlignedArgs.for_model('sdxl')" if a.sdxl else
                               "tiny SDXL-shaped UNet (smoke test of the GPU path)")
    from diffnb.models import load_pipeline
    from diffnb.nb import generator
    pipe = load_pipeline("toy", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red heart", "a blue moon", "a yellow triangle", "a green circle"]
    run = lambda: pipe(prompts, num_inference_steps=20, guidance_scale=5.0, generator=generator(0), output_type="latent")

    def with_args(args):
        def method():
            with style_aligned(pipe.unet, args):
                run()
        return method
    setting = "toy model, 64², 4 prompts under CFG 5, 20 DDIM steps, denoising only (notebook 01's timing cell)"
    official = compare("style_aligned_toy_official_formulation", run, official_formulation(pipe.unet, run), "cpu",
                       a.repeats, setting=setting)
    # The floor: only the doubled keys (no AdaIN, norms or shift), what attending to 2N keys costs by itself.
    floor = compare("style_aligned_toy_doubled_keys_only", run, with_args(StyleAlignedArgs.for_model(
        "toy", adain_queries=False, adain_keys=False, shared_score_shift=0.0, share_group_norm=False,
        share_layer_norm=False)), "cpu", a.repeats, setting=setting)
    result = compare("style_aligned_toy", run, with_args(StyleAlignedArgs.for_model("toy")), "cpu", a.repeats,
                     setting=setting + ", StyleAlignedArgs.for_model('toy')",
                     doubled_keys_only_ratio=floor["time_ratio"], official_formulation_ratio=official["time_ratio"],
                     official_formulation_max_abs_diff=official_difference(pipe.unet, run))
    save_result(result, a.out or OUT / "style_aligned_cpu.json")
    return result


if __name__ == "__main__":
    main()

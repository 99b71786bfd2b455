"""Pipeline plumbing every method shares: prompt conditioning for a bare UNet call, one guided noise prediction,
VAE encode / decode in GPU-sized batches (fp32 where the VAE overflows in fp16), and seeded starting latents.
Nothing here inverts or edits; `inversion` and the paper modules build on it."""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from .images import from_tensor_image, to_tensor_image
from .models import family

PIXELS_PER_VAE_BATCH = 2**20  # one 1024² image, four 512² ones: ~3.3 GiB of fp32 decoder activations, beside
# SDXL's 6.5 GiB of fp16 weights on a 15 GB T4 (`models.estimate_memory`)


def vae_batch_size(height: int, width: int) -> int:
    """Images per VAE call at this size (pixels), so that encoding and decoding fit a 15 GB GPU."""
    return max(1, PIXELS_PER_VAE_BATCH // (height * width))


@contextmanager
def vae_in_safe_precision(pipe):
    """SDXL's VAE overflows in fp16 (NaN latents and black images): like diffusers' SDXL pipeline, run it in fp32
    while its config says `force_upcast`, then put it back in its own dtype."""
    vae = pipe.vae
    dtype = vae.dtype
    upcast = dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    if upcast:
        vae.to(torch.float32)
    try:
        yield vae
    finally:
        if upcast:
            vae.to(dtype)


@torch.no_grad()
def encode_image(pipe, image, batch_size: int | None = None) -> torch.Tensor:
    """Image -> scaled VAE latent (posterior mean), on the pipeline's device in the UNet's dtype; in batches of
    `batch_size` images (default: `vae_batch_size`)."""
    x = to_tensor_image(image)
    n = batch_size or vae_batch_size(*x.shape[-2:])
    with vae_in_safe_precision(pipe) as vae:
        z = [vae.encode(x[i:i + n].to(pipe.device, vae.dtype)).latent_dist.mean for i in range(0, len(x), n)]
    return (torch.cat(z) * pipe.vae.config.scaling_factor).to(pipe.unet.dtype)


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor, rounded: bool = True, batch_size: int | None = None) -> np.ndarray:
    """Scaled latents -> uint8 images (B, H, W, 3) (float32 on 0..255 with `rounded=False`), decoded `batch_size`
    at a time (default: `vae_batch_size`) and moved to the host batch by batch."""
    scale = pipe.vae_scale_factor
    n = batch_size or vae_batch_size(latents.shape[-2] * scale, latents.shape[-1] * scale)
    with vae_in_safe_precision(pipe) as vae:
        return np.concatenate([
            from_tensor_image(vae.decode(latents[i:i + n].to(pipe.device, vae.dtype) / vae.config.scaling_factor).sample,
                              rounded)  # clips the decoder's overshoot to [-1, 1]
            for i in range(0, len(latents), n)])


def unet_conditioning(pipe, prompt, batch: int, guidance_scale: float, height: int, width: int) -> dict:
    """UNet keyword arguments for a prompt, [uncond, cond] stacked when guidance_scale > 1 (SD1.5 and SDXL)."""
    cfg = guidance_scale > 1
    prompts = [prompt] * batch if isinstance(prompt, str) else list(prompt)
    if len(prompts) != batch:
        raise ValueError(f"got {len(prompts)} prompts for a batch of {batch}")
    if family(pipe) == "sdxl":
        emb, neg, pooled, neg_pooled = pipe.encode_prompt(prompts, device=pipe.device, num_images_per_prompt=1,
                                                          do_classifier_free_guidance=cfg)
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=pipe.device, dtype=emb.dtype)
        time_ids = time_ids.repeat(len(prompts), 1)
        if cfg:
            emb, pooled, time_ids = torch.cat([neg, emb]), torch.cat([neg_pooled, pooled]), torch.cat([time_ids, time_ids])
        return dict(encoder_hidden_states=emb, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})
    emb, neg = pipe.encode_prompt(prompts, device=pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=cfg)
    return dict(encoder_hidden_states=torch.cat([neg, emb]) if cfg else emb)


def predict_noise(pipe, latents, t, cond: dict, guidance_scale: float) -> torch.Tensor:
    x = torch.cat([latents, latents]) if guidance_scale > 1 else latents
    eps = pipe.unet(x, t, **cond).sample
    if guidance_scale > 1:
        uncond, text = eps.chunk(2)
        eps = uncond + guidance_scale * (text - uncond)
    return eps


def seeded_latents(pipe, seeds, height: int, width: int) -> torch.Tensor:
    """(len(seeds), C, h, w) starting noise, image i drawn on the CPU from `seeds[i]` alone, so an image does not
    change with the batch it is generated in (move it to the pipeline's device to use it)."""
    shape = (1, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    return torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(int(s)), device="cpu") for s in seeds])

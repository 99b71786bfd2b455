"""DDIM inversion: run the deterministic DDIM sampler backwards to find the noise that regenerates an image.
(`ddpm_invert`: the stochastic, exact alternative, for methods that re-run the last steps many times.)

    inv = ddim_invert(pipe, image, prompt="", num_inference_steps=50)
    inv.latents[0]   # the clean latent x_0 (encoded image);  inv.latents[-1]  # x_T, the inverted noise
    images = regenerate(pipe, inv, prompt="")            # should reproduce the image

Uses diffusers' `DDIMInverseScheduler` built from the pipeline's scheduler config; works on SD1.5- and
SDXL-shaped pipelines. `guidance_scale` > 1 inverts with classifier-free guidance (StyleAligned uses 2 on SDXL);
exact round trips need guidance 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .pipeline import encode_image, predict_noise, unet_conditioning


@dataclass
class Inversion:
    latents: list[torch.Tensor]  # x_0, x_t1, ..., x_T (ascending noise), each (B, C, h, w)
    timesteps: list[int]  # timestep reached by each entry after the first
    prompt: str | list[str]
    guidance_scale: float

    @property
    def noise(self) -> torch.Tensor:
        return self.latents[-1]

    def at_generation_step(self, i: int) -> torch.Tensor:
        """The inverted latent that the sampler's step i starts from (step 0 = x_T)."""
        return self.latents[len(self.latents) - 1 - i]


@torch.no_grad()
def ddim_invert(pipe, image=None, prompt: str | list[str] = "", num_inference_steps: int = 50,
                guidance_scale: float = 1.0, latents: torch.Tensor | None = None, progress: bool = True,
                stop_at: int | None = None) -> Inversion:
    """Invert images (or given clean latents) along the DDIM trajectory the pipeline's sampler would use.

    `stop_at` ends the inversion once it reaches that timestep (methods that start denoising mid-way, such as
    EmerDiff at t_m, need no more); `latents[-1]` is then the latent at `timesteps[-1]`.
    """
    from diffusers import DDIMInverseScheduler

    if (image is None) == (latents is None):
        raise ValueError("give exactly one of image= or latents=")
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
    if guidance_scale < 1:
        raise ValueError(f"guidance_scale must be >= 1, got {guidance_scale}")
    x = encode_image(pipe, image) if latents is None else latents.to(pipe.device, pipe.unet.dtype)
    scale = pipe.vae_scale_factor
    cond = unet_conditioning(pipe, prompt, x.shape[0], guidance_scale, x.shape[-2] * scale, x.shape[-1] * scale)
    inverse = DDIMInverseScheduler.from_config(pipe.scheduler.config)
    inverse.set_timesteps(num_inference_steps, device=pipe.device)
    trajectory, reached = [x], []
    for t in tqdm(inverse.timesteps, desc="DDIM inversion", disable=not progress, leave=False):
        eps = predict_noise(pipe, x, t, cond, guidance_scale)
        x = inverse.step(eps, t, x).prev_sample
        trajectory.append(x)
        reached.append(int(t))
        if stop_at is not None and int(t) >= stop_at:
            break
    return Inversion(trajectory, reached, prompt, guidance_scale)


@dataclass
class DDPMInversion:
    """Edit-friendly DDPM inversion (Huberman-Spiegelglas et al., CVPR 2024): a start latent and one noise map per
    step such that stochastic sampling from `start` (DDIM with eta = 1) with exactly these noises rebuilds x_0."""
    start: torch.Tensor  # (B, C, h, w) at timesteps[0]
    noises: list[torch.Tensor]  # one per step: scheduler.step(..., eta=1.0, variance_noise=noises[i])
    timesteps: list[int]  # the sampler's steps from `start` down (descending)


@torch.no_grad()
def ddpm_invert(pipe, latents: torch.Tensor, num_inference_steps: int, start_at: int | None = None, prompt="",
                guidance_scale: float = 1.0, seed: int = 0, progress: bool = False) -> DDPMInversion:
    """Invert clean latents for stochastic sampling: every x_t is drawn from q(x_t | x_0) on its own, and each step's
    noise is solved for so that the sampler lands on the next one. Unlike DDIM inversion the round trip is exact on
    any model, and re-runs from `start` with the same noises differ only by what the caller changes.

    `start_at`: a timestep of the sampler's grid to start from (default: the first, pure noise end).
    """
    from diffusers import DDIMScheduler

    if not isinstance(pipe.scheduler, DDIMScheduler):
        raise TypeError("ddpm_invert samples with DDIMScheduler(eta=1); the pipeline has "
                        f"{type(pipe.scheduler).__name__}")
    pipe.scheduler.set_timesteps(num_inference_steps)
    ts = [int(t) for t in pipe.scheduler.timesteps]
    if start_at is not None:
        if start_at not in ts:
            raise ValueError(f"start_at={start_at} is not a step of the {num_inference_steps}-step grid: {ts}")
        ts = ts[ts.index(start_at):]
    x0 = latents.to(pipe.device, pipe.unet.dtype)
    abar = pipe.scheduler.alphas_cumprod.to(x0.device, torch.float32)
    g = torch.Generator().manual_seed(seed)
    xs = [(abar[t].sqrt() * x0.float() + (1 - abar[t]).sqrt() * torch.randn(x0.shape, generator=g, device="cpu").to(x0.device)).to(x0)
          for t in ts] + [x0]
    scale = pipe.vae_scale_factor
    cond = unet_conditioning(pipe, prompt, x0.shape[0], guidance_scale, x0.shape[-2] * scale, x0.shape[-1] * scale)
    noises = []
    for i, t in enumerate(tqdm(ts, desc="DDPM inversion", disable=not progress, leave=False)):
        eps = predict_noise(pipe, xs[i], t, cond, guidance_scale)
        step = lambda z: pipe.scheduler.step(eps, t, xs[i], eta=1.0, variance_noise=z).prev_sample
        mean = step(torch.zeros_like(x0))
        sigma = step(torch.ones_like(x0)) - mean  # the scheduler's own noise scale for this step
        noises.append((xs[i + 1] - mean) / sigma)
    return DDPMInversion(xs[0], noises, ts)


@torch.no_grad()
def regenerate(pipe, inversion: Inversion, prompt: str | list[str] | None = None, guidance_scale: float | None = None,
               output_type: str = "np", **kwargs):
    """Run the pipeline from the inverted noise (same number of steps); returns its images."""
    steps = len(inversion.latents) - 1
    prompt = inversion.prompt if prompt is None else prompt
    batch = inversion.noise.shape[0]
    prompt = [prompt] * batch if isinstance(prompt, str) else prompt
    out = pipe(prompt=prompt, latents=inversion.noise, num_inference_steps=steps,
               guidance_scale=inversion.guidance_scale if guidance_scale is None else guidance_scale,
               output_type=output_type, **kwargs)
    return out.images

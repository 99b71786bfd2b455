"""EmerDiff (Namekata et al., ICLR 2024): pixel-level segments from what a diffusion model knows at low resolution.

1. Low-res segments: queries of one cross-attention layer at a small timestep t_f, k-means into K segments.
   Ours, not the paper's: k-means runs on L2-normalised queries (cosine geometry; the paper does not say it
   normalises), with scikit-learn's k-means++ and 4 restarts.
2. Modulated denoising: from t_m, denoise the image twice per segment, once adding +λ·M and once −λ·M to a
   cross-attention layer's output (M = the segment's low-res mask, at step t_m only), decode both, and take the
   per-pixel difference ‖I⁻ − I⁺‖. Pixels that belong to the segment change; the rest barely move.
3. The difference maps are Gaussian-filtered ("to suppress pixelated artifacts", the paper; its σ is not given, ours
   is half a latent cell, see `EmerDiffArgs.smooth_sigma`) and each pixel goes to the segment whose modulation
   moved it most (argmax over the maps).
A given image is first inverted to t_m: by the paper's edit-friendly DDPM inversion (exact: the unmodulated run
rebuilds the image, and every run gets the same noise) or by DDIM inversion (`inversion="ddim"`).
With attention injection every modulated run reuses the unmodulated run's attention maps, so only the offset
differs. All 2K runs plus the unmodulated one share one UNet batch (item 0 is the unmodulated run); they are decoded
in chunks of `decode_batch_size` (41 images at 512² in fp16 at once need ≈ 23 GiB).
Images: one image in any form `diffnb.images.to_tensor_image` reads (PIL, uint8 or [0, 1] float numpy (H, W, 3),
uint8 or [-1, 1] float torch (3, H, W) / (1, 3, H, W)), or a grayscale one ((H, W), (H, W, 1), (1, H, W)) taken
as its RGB stack; any size whose sides are multiples of the UNet's total downsampling (64 px on SD), not only
square ones.

    result = segment(pipe, image, EmerDiffArgs.for_model("toy"))
    result.labels      # (H, W) pixel labels;  result.lowres  # (h, w) k-means labels
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..hooks import capture
from ..images import to_tensor_image
from ..inversion import ddim_invert, ddpm_invert
from ..pipeline import decode_latents, encode_image, unet_conditioning
from ..layers import resolution, select
from ..processors import AttentionProcessor, RunState, attention_names, attention_probs, patch_attention, track_steps


@dataclass(frozen=True)
class EmerDiffArgs:
    """Defaults = the paper's (SD1.5 at 512², the 16×16 up block is up_blocks.1 with three transformer layers)."""
    query_layer: str = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"  # the block's first cross-attention
    modulate_layer: str = "up_blocks.1.attentions.2.transformer_blocks.0.attn2"  # and its third (last)
    n_segments: int = 20  # K; the paper finds 10 to 40 robust
    t_f: int = 1  # timestep of the k-means features (minimal noise)
    t_m: int = 281  # timestep of the modulation
    strength: float = 10.0  # λ
    num_inference_steps: int = 50
    inject_attention: bool = True  # reuse the unmodulated run's attention maps in every layer
    smooth_sigma: float = 4.0  # Gaussian σ on the difference maps, in pixels (0 = none). The paper filters them "to
    # suppress pixelated artifacts" without giving σ. Ours: half a latent cell (the VAE upsamples ×8, so 4 px), which
    # blurs the 8-px latent-grid blockiness of a decoded difference and stays far below one low-res cell (32 px)
    inversion: str = "ddpm"  # the paper's edit-friendly DDPM inversion (exact; one noise per step, shared by all
    # runs); "ddim": deterministic DDIM inversion
    decode_batch_size: int = 8  # images per VAE decode: 8 at 512² in fp16 ≈ 4.5 GiB (all 41 at once ≈ 23 GiB)
    seed: int = 0

    def __post_init__(self):
        if self.inversion not in ("ddim", "ddpm"):
            raise ValueError(f"inversion must be 'ddim' or 'ddpm', got {self.inversion!r}")
        for name, low in (("n_segments", 2), ("decode_batch_size", 1), ("num_inference_steps", 1)):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < low:
                raise ValueError(f"{name} must be an int >= {low}, got {getattr(self, name)!r}")
        if not self.smooth_sigma >= 0:
            raise ValueError(f"smooth_sigma must be >= 0 (0 = no filter), got {self.smooth_sigma!r}")

    @classmethod
    def for_model(cls, name: str, **overrides) -> "EmerDiffArgs":
        """The paper's settings for a registry model. The layers are always the lowest-resolution cross-attention up
        block's first (queries) and last (modulation) cross-attention, as the paper's on SD; σ is half a latent cell.

        toy: the 8×8 block (two layers); 20 steps, whose grid has no 281: t_m is the nearest step, 301. It inverts
        with DDIM, as its notebook and issue specify (the paper's DDPM inversion scores about the same on it: see
        `benchmarks/emerdiff_toy.py`). σ = 2 px (its VAE upsamples ×4).
        sdxl (ours: the paper has no SDXL): the 32×32 block at 1024² is up_blocks.0, three transformers of depth 10,
        so queries from attentions.0's first block, modulation on attentions.2's tenth. Its cells are 32 px, as on
        SD at 512², so σ and λ carry over. K = 10 (the low end of the paper's 10-40) and one image per fp32 VAE
        decode (`force_upcast` at 1024²) keep it on a 15 GB T4: estimated 11.4 GiB (`estimate_memory`; 14.9 at K=20).
        """
        base = {"toy": dict(query_layer="up_blocks.1.attentions.0.transformer_blocks.0.attn2",
                            modulate_layer="up_blocks.1.attentions.1.transformer_blocks.0.attn2",
                            n_segments=2, num_inference_steps=20, t_m=301, strength=10.0, inversion="ddim",
                            smooth_sigma=TOY_SIGMA),
                "sd15": {},
                "sdxl": dict(query_layer="up_blocks.0.attentions.0.transformer_blocks.0.attn2",
                             modulate_layer="up_blocks.0.attentions.2.transformer_blocks.9.attn2",
                             n_segments=10, decode_batch_size=1)}.get(name)
        if base is None:
            raise ValueError(f"no EmerDiff defaults for {name!r}; known: toy, sd15, sdxl "
                             "(pass EmerDiffArgs(...) yourself)")
        return replace(cls(), **{**base, **overrides})


TOY_SIGMA = 2.0  # half the toy's ×4 latent cell, the real models' rule. Measured before it became the default
# (benchmarks/emerdiff_toy.py, renders 200-219): 0.54 mIoU with it vs 0.48 without


@dataclass
class Segmentation:
    lowres: np.ndarray  # (h, w) k-means labels of the query features
    differences: np.ndarray  # (K, H, W) ‖I⁻ − I⁺‖ per segment
    labels: np.ndarray  # (H, W) argmax over the difference maps
    images: np.ndarray  # (1 + 2K, H, W, 3) uint8: the unmodulated image, then I⁺, I⁻ per segment
    seconds: float
    t_m: int  # the timestep modulated: the sampler's grid step nearest to args.t_m


class _Modulate(AttentionProcessor):
    """Attention injection (item 0's attention maps for every item) and, on the modulated layer at the first step,
    the output offset c_b · M_b. `coef`: (B,), `masks`: (B, tokens)."""
    needs_probs = True

    def __init__(self, state: RunState, inject: bool, coef=None, masks=None):
        super().__init__(state)
        self.inject, self.coef, self.masks = inject, coef, masks

    def attend(self, call, q, k, v, mask):
        if not self.inject:
            return super().attend(call, q, k, v, mask)
        # item 0's probabilities (1, h, N, M) @ every item's values (B, h, M, d): all runs attend like the unmodulated
        return attention_probs(q[:1], k[:1], None if mask is None else mask[:1]) @ v

    def edit_output(self, call, out):
        if self.coef is None or self.state.step != 0:
            return out
        if self.masks.shape[1] != out.shape[1]:
            raise ValueError(f"{call.name} has {out.shape[1]} tokens, the masks {self.masks.shape[1]}: "
                             "query_layer and modulate_layer must share a resolution")
        return out + (self.coef[:, None, None] * self.masks[:, :, None]).to(out)


def _check_layers(pipe, args: EmerDiffArgs, warn: bool = False) -> tuple[str, str]:
    names = attention_names(pipe.unet)
    chosen = []
    for what in ("query_layer", "modulate_layer"):
        found = select(names, getattr(args, what), pipe.unet)
        if len(found) != 1 or not pipe.unet.get_submodule(found[0]).is_cross_attention:
            raise ValueError(f"{what} must name one cross-attention layer, {getattr(args, what)!r} matches {found[:3]}")
        chosen.append(found[0])
    if resolution(pipe.unet, chosen[0]) != resolution(pipe.unet, chosen[1]):
        raise ValueError(f"query_layer and modulate_layer must share a resolution: {chosen}")
    cross_up = [resolution(pipe.unet, n) for n in names
                if n.startswith("up_blocks.") and pipe.unet.get_submodule(n).is_cross_attention]
    if warn and cross_up and resolution(pipe.unet, chosen[0]) != min(cross_up):
        warnings.warn(f"query_layer {chosen[0]} works at {resolution(pipe.unet, chosen[0])}² (nominal); the paper's "
                      f"layers are in the lowest-resolution cross-attention up block ({min(cross_up)}² here). "
                      "Use EmerDiffArgs.for_model('sd15' | 'sdxl' | 'toy') for the model's own defaults",
                      stacklevel=4)
    return chosen[0], chosen[1]


@torch.no_grad()
def lowres_segments(pipe, latents: torch.Tensor, args: EmerDiffArgs) -> np.ndarray:
    """k-means (scikit-learn) of the query layer's queries at t_f: (B, h, w) labels."""
    from sklearn.cluster import KMeans

    query_layer, _ = _check_layers(pipe, args, warn=True)
    dev = latents.device  # every tensor on the latents' device (diffusers moves only 0-dim timesteps)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(args.seed), device="cpu").to(latents)
    t = torch.full((latents.shape[0],), args.t_f, dtype=torch.long, device=dev)
    h, w = latents.shape[-2:]
    cond = unet_conditioning(pipe, "", latents.shape[0], 1.0, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor)
    with capture(pipe.unet, f"{query_layer}.to_q", offload="cpu") as cache:
        pipe.unet(pipe.scheduler.add_noise(latents, noise, t), t, **cond)
    q = cache.get(f"{query_layer}.to_q").float()  # (B, h*w, C)
    down = math.isqrt(h * w // q.shape[1])  # the layer's downsampling of the latent (row-major tokens)
    if args.n_segments > q.shape[1]:
        raise ValueError(f"n_segments={args.n_segments} but {query_layer} has only {q.shape[1]} tokens "
                         f"({h // down}×{w // down}) at this image size: use fewer segments or a larger image")
    labels = [KMeans(args.n_segments, n_init=4, random_state=args.seed).fit_predict(F.normalize(x, dim=-1).numpy())
              for x in q]  # ours: cosine geometry (L2-normalised queries); the paper does not say
    return np.stack(labels).reshape(-1, h // down, w // down)


def _start(pipe, args: EmerDiffArgs) -> tuple[list[int], int]:
    """The sampler's timesteps and the index of the step closest to t_m (modulation happens there)."""
    pipe.scheduler.set_timesteps(args.num_inference_steps)
    ts = [int(t) for t in pipe.scheduler.timesteps]
    i = int(np.argmin([abs(t - args.t_m) for t in ts]))
    if ts[i] != args.t_m:
        warnings.warn(f"t_m={args.t_m} is not on the {args.num_inference_steps}-step grid; modulating at {ts[i]}, "
                      "the nearest step", stacklevel=3)
    return ts, i


@torch.no_grad()
def modulated_denoise(pipe, x_tm: torch.Tensor, masks: torch.Tensor, args: EmerDiffArgs, progress: bool = False,
                      noises: list[torch.Tensor] | None = None) -> np.ndarray:
    """Denoise [unmodulated, +λM_1, −λM_1, +λM_2, ...] from t_m in one batch; masks (K, h*w) -> images as float32
    on 0..255, not rounded: on a small model the changes can be below one grey level, and rounding ties them.
    Decoded `args.decode_batch_size` images at a time.
    `noises` (from `ddpm_invert`): sample stochastically with these, the same for every run; None: DDIM."""
    _, modulate_layer = _check_layers(pipe, args)
    ts, i_m = _start(pipe, args)
    k, dev = masks.shape[0], x_tm.device
    coef = torch.tensor([0.0] + [s * args.strength for _ in range(k) for s in (1, -1)], device=dev)
    masks = masks.to(dev, torch.float32)
    batch_masks = torch.cat([torch.zeros(1, masks.shape[1], device=dev), masks.repeat_interleave(2, dim=0)])
    x = x_tm.expand(len(coef), -1, -1, -1).clone()
    h, w = x.shape[-2:]
    cond = unet_conditioning(pipe, "", len(coef), 1.0, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor)
    state = RunState()
    processors = {"attn": _Modulate(state, args.inject_attention),
                  "re:" + modulate_layer.replace(".", r"\."): _Modulate(state, args.inject_attention, coef, batch_masks)}
    with patch_attention(pipe.unet, processors), track_steps(pipe.unet, state):
        for j, t in enumerate(tqdm(ts[i_m:], desc="modulated denoising", disable=not progress, leave=False)):
            eps = pipe.unet(pipe.scheduler.scale_model_input(x, t), t, **cond).sample
            if noises is None:
                x = pipe.scheduler.step(eps, t, x).prev_sample
            else:
                x = pipe.scheduler.step(eps, t, x, eta=1.0, variance_noise=noises[j].expand_as(x)).prev_sample
    return np.concatenate([decode_latents(pipe, c, rounded=False) for c in x.split(args.decode_batch_size)])


def difference_maps(images: np.ndarray, smooth_sigma: float = 0.0) -> np.ndarray:
    """‖I⁻ − I⁺‖₂ over RGB per segment from the batch layout of `modulated_denoise`: (K, H, W)."""
    x = np.asarray(images[1:], np.float32).reshape(-1, 2, *images.shape[1:])  # (K, 2, H, W, 3), on the host
    d = np.linalg.norm(x[:, 1] - x[:, 0], axis=-1)
    if smooth_sigma > 0:
        from scipy.ndimage import gaussian_filter

        d = gaussian_filter(d, sigma=(0, smooth_sigma, smooth_sigma), mode="nearest",
                           radius=max(1, int(3 * smooth_sigma)))
    return d


@torch.no_grad()
def segment(pipe, image, args: EmerDiffArgs | None = None, batched: bool = True, progress: bool = False) -> Segmentation:
    """EmerDiff on one image: invert to t_m (DDIM or DDPM), k-means at t_f, modulated denoising, argmax of the
    differences.

    `batched=False` runs each segment's ± pair separately (same result, for comparison of cost).
    """
    args = args or EmerDiffArgs()
    if not isinstance(args, EmerDiffArgs):
        raise TypeError(f"args must be EmerDiffArgs, got {type(args).__name__}")
    start = time.perf_counter()
    image = to_tensor_image(image, grayscale=True)
    if image.shape[0] != 1:
        raise ValueError(f"segment takes one image, got a batch of {image.shape[0]}")
    step = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    if image.shape[-2] % step or image.shape[-1] % step:
        raise ValueError(f"image is {image.shape[-1]}×{image.shape[-2]} px (W×H); this model needs both sides to be "
                         f"multiples of {step} px (VAE ×{pipe.vae_scale_factor} times the UNet's downsampling)")
    with warnings.catch_warnings():  # its range was checked (and any warning given) by to_tensor_image above
        warnings.filterwarnings("ignore", message=r".* is read in \[-1, 1\]", category=UserWarning)
        z0 = encode_image(pipe, image)
    ts, i_m = _start(pipe, args)
    if args.inversion == "ddpm":
        inv = ddpm_invert(pipe, z0, args.num_inference_steps, start_at=ts[i_m], seed=args.seed)
        x_tm, noises = inv.start, inv.noises
    else:
        x_tm, noises = ddim_invert(pipe, latents=z0, num_inference_steps=args.num_inference_steps, progress=False,
                                   stop_at=ts[i_m]).latents[-1], None
    lowres = lowres_segments(pipe, z0, args)[0]
    masks = torch.from_numpy(np.stack([lowres.flatten() == i for i in range(args.n_segments)]))
    if batched:
        images = modulated_denoise(pipe, x_tm, masks, args, progress, noises)
    else:
        runs = [modulated_denoise(pipe, x_tm, m[None], args, noises=noises) for m in masks]
        images = np.concatenate([runs[0][:1]] + [r[1:] for r in runs])
    diffs = difference_maps(images, args.smooth_sigma)
    shown = images.round().clip(0, 255).astype(np.uint8)
    return Segmentation(lowres, diffs, diffs.argmax(0), shown, time.perf_counter() - start, ts[i_m])


# --- the baseline --------------------------------------------------------------------------------------------
def upsample_labels(lowres: np.ndarray, size: int | tuple[int, int], n_segments: int) -> np.ndarray:
    """The baseline: low-res labels to full size (side, or (H, W)) by bilinear upsampling of their one-hot maps,
    then argmax."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    one_hot = F.one_hot(torch.as_tensor(lowres).long(), n_segments).permute(2, 0, 1)[None].float()
    return F.interpolate(one_hot, size=size, mode="bilinear", align_corners=False)[0].argmax(0).numpy()

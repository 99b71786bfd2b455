"""What a notebook's real-model run costs on a T4, ESTIMATED on a CPU: count the work, then price it in FLOPs.

No GPU is needed to count: `DIFFNB_STANDIN=count` runs a notebook's real-model branch with every real count and
step (only the image side ÷ 4, `standin.side`) on the random-weight stand-ins, while forward pre-hooks on the UNet
and the VAE's encoder / decoder tally each item by its size (`install_tally`). `t4_seconds` prices the tally at the
real resolution: FLOPs per item from torch's `FlopCounterMode` on the real configs (built on the meta device, no
weights), divided by an effective T4 rate anchored on diffusers' published benchmark (below). What it leaves out:
text encoders, the IP-Adapter / CLIP / DINOv2 image encoders, Python overhead, and training that is not a UNet or
VAE call (`extra_flops` takes it where a notebook knows it). A GPU run of `python -m diffnb.gpu_check` measures
what this estimates.
"""
from __future__ import annotations

import functools
import json
from collections import Counter

import torch

# The anchor: diffusers' "Torch 2.0" benchmark (docs/source/en/optimization/torch2.0, v0.13-v0.16): SD1.x
# text-to-image, 512 px, fp16, 50 steps with classifier-free guidance, batch 4, PyTorch SDPA: 29.74 s on a T4.
# That is 4 x 2 x 50 = 400 UNet items at 64 x 64 latents and 4 decodes at 512 px.
T4_ANCHOR = dict(seconds=29.74, unet_items=400, latent_side=64, decodes=4)
DIVISOR = 4  # the count mode's image side divisor (standin.SMALL_DIVISOR)
COMPONENTS = ("unet", "vae_encode", "vae_decode")

TALLY: Counter = Counter()  # (component, height, width) at the stand-in size -> items


def _first_tensor(args, kwargs, name):
    return args[0] if args else kwargs[name]


def install_tally(pipe) -> None:
    """Count every UNet item and VAE image the pipeline processes, by size, into `TALLY` (hooks stay: the count
    mode's kernel lives only for the count)."""
    def counter(component, arg):
        def hook(module, args, kwargs):
            x = _first_tensor(args, kwargs, arg)
            TALLY[(component, x.shape[-2], x.shape[-1])] += x.shape[0]
        return hook

    pipe.unet.register_forward_pre_hook(counter("unet", "sample"), with_kwargs=True)
    pipe.vae.encoder.register_forward_pre_hook(counter("vae_encode", "sample"), with_kwargs=True)
    pipe.vae.decoder.register_forward_pre_hook(counter("vae_decode", "z"), with_kwargs=True)


def tally_json() -> str:
    """The tally as one JSON line (what the count run's last cell prints)."""
    return json.dumps([[c, h, w, n] for (c, h, w), n in sorted(TALLY.items())])


@functools.cache
def flops_per_item(arch: str, component: str, height: int, width: int) -> float:
    """FLOPs of one item through the real SD1.5 / SDXL UNet (latent size) or VAE encoder / decoder (its input
    size), counted by `FlopCounterMode` on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from .models import UNET_CONFIGS, VAE_CONFIG

    if arch not in UNET_CONFIGS:
        raise ValueError(f"unknown architecture {arch!r}; allowed: {sorted(UNET_CONFIGS)}")
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; allowed: {COMPONENTS}")
    with torch.device("meta"), FlopCounterMode(display=False) as count:
        if component == "unet":
            cfg = UNET_CONFIGS[arch]
            kwargs = {}
            if arch == "sdxl":
                kwargs["added_cond_kwargs"] = {"text_embeds": torch.empty(1, 1280), "time_ids": torch.empty(1, 6)}
            UNet2DConditionModel(**cfg)(torch.empty(1, 4, height, width), torch.tensor([500]),
                                        torch.empty(1, 77, cfg["cross_attention_dim"]), **kwargs)
        elif component == "vae_encode":
            AutoencoderKL(**VAE_CONFIG).encode(torch.empty(1, 3, height, width))
        else:
            AutoencoderKL(**VAE_CONFIG).decode(torch.empty(1, 4, height, width))
    return float(count.get_total_flops())


def t4_flops_per_second() -> float:
    """The effective T4 rate of the anchor run (diffusers' own pipeline, so kernels and overheads of the real thing)."""
    a = T4_ANCHOR
    side = a["latent_side"]
    work = a["unet_items"] * flops_per_item("sd15", "unet", side, side) + \
        a["decodes"] * flops_per_item("sd15", "vae_decode", side, side)
    return work / a["seconds"]


def real_flops(arch: str, tally, divisor: int = DIVISOR) -> dict[str, float]:
    """FLOPs of a count-mode tally (rows `[component, h, w, items]` at the stand-in size) at the real size."""
    out = dict.fromkeys(COMPONENTS, 0.0)
    for component, h, w, n in tally:
        out[component] += n * flops_per_item(arch, component, h * divisor, w * divisor)
    return out


def t4_seconds(arch: str, tally, extra_flops: float = 0.0) -> float:
    """ESTIMATED T4 seconds of a tally's work (see the module docstring for what it leaves out)."""
    return (sum(real_flops(arch, tally).values()) + extra_flops) / t4_flops_per_second()

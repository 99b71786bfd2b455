"""What a notebook's real-model run costs on a T4, ESTIMATED on a CPU: count the work, then price it in FLOPs.

No GPU is needed to count: `DIFFNB_STANDIN=count` runs a notebook's real-model branch with every real count and
step (only the image side ÷ 4, `standin.side`) on the random-weight stand-ins, while forward pre-hooks on the UNet
and the VAE's encoder / decoder tally each item by its size (`install_tally`). `t4_seconds` prices the tally at the
real resolution: FLOPs per item from torch's `FlopCounterMode` on the real configs (built on the meta device, no
weights), divided by an effective T4 rate anchored on diffusers' published benchmark (below). The Hyperfeatures
aggregator (fp32, trained in notebook 03) is tallied too and priced on the real channels at the T4's fp32 rate, with
a range, because no published fp32 anchor fits it. Left out: text encoders, the IP-Adapter / CLIP / DINOv2 image
encoders, and Python overhead. A GPU run of `python -m diffnb.gpu_check` measures what this estimates.
"""
from __future__ import annotations

import functools
import json
from collections import Counter

import torch

# The anchor: diffusers' "Torch 2.0" benchmark (docs/source/en/optimization/torch2.0.md, table "T4 (batch size: 4)"):
# SD text-to-image at 512 px in fp16 with classifier-free guidance, torch 2.0, no compile: 1.79 iterations a second,
# an iteration being one UNet call on 4 x 2 = 8 items at 64 x 64 latents (their batch-1 row, 6.9 it/s on 2 items,
# agrees within 4 %).
T4_ANCHOR = dict(iterations_per_second=1.79, unet_items_per_iteration=8, latent_side=64)
T4_PEAK = dict(fp16_tensor=65e12, fp32=8.1e12)  # NVIDIA's T4 datasheet, FLOP/s
COMPONENTS = ("unet", "vae_encode", "vae_decode")

TALLY: Counter = Counter()  # (component, height, width) at the stand-in size -> items; aggregator rows carry more


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
    global _AGGREGATOR_HOOK
    if _AGGREGATOR_HOOK is None:  # aggregators are built later, by the notebook: a global hook sees them
        from .papers.hyperfeatures import AggregationNetwork

        _AGGREGATOR_HOOK = torch.nn.modules.module.register_module_forward_hook(
            lambda module, args, output: _count_aggregator(module, output) if isinstance(module, AggregationNetwork)
            else None)


_AGGREGATOR_HOOK = None


def _count_aggregator(module, output):
    kind = "aggregator_train" if torch.is_grad_enabled() else "aggregator"
    shape = (module.num_timesteps, output.shape[1], module.low_memory, tuple(module.layers))
    TALLY[(kind, module.output_size, module.output_size) + shape] += output.shape[0]


def tally_json() -> str:
    """The tally as one JSON line (what the count run's last cell prints): rows [component, h, w, items] and, for
    aggregators, [kind, size, size, items, timesteps, projection_dim, low_memory, layers]."""
    return json.dumps([[*key[:3], n, *key[3:]] for key, n in sorted(TALLY.items(), key=str)])


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


@functools.cache
def aggregator_flops(arch: str, layers: tuple, timesteps: int, projection_dim: int, output_size: int,
                     train: bool, low_memory: bool) -> float:
    """FLOPs of one image through a Hyperfeatures aggregator built on the REAL model's channels for `layers`
    (forward; with `train`, forward + backward, + the recomputed forward of `low_memory` checkpointing)."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from .models import UNET_CONFIGS
    from .papers.hyperfeatures import AggregationNetwork

    with torch.device("meta"):
        unet = dict(UNet2DConditionModel(**UNET_CONFIGS[arch]).named_modules())
        channels = {name: unet[name].out_channels for name in layers}
        net = AggregationNetwork(channels, timesteps, projection_dim, output_size)
        feats = {name: torch.empty(1, timesteps, c, 8, 8) for name, c in channels.items()}
        with FlopCounterMode(display=False) as count:
            out = net(feats)
            if train:
                out.sum().backward()
                if low_memory:  # the checkpointed bottlenecks run their forward once more in the backward pass
                    net(feats)
    return float(count.get_total_flops())


def anchor_flops_per_second() -> float:
    """The effective fp16 T4 rate of the anchor run (diffusers' own pipeline: kernels and overheads of the real thing)."""
    a = T4_ANCHOR
    side = a["latent_side"]
    return a["iterations_per_second"] * a["unet_items_per_iteration"] * flops_per_item("sd15", "unet", side, side)


def real_flops(arch: str, tally, divisor: int | None = None) -> dict[str, float]:
    """FLOPs of a count-mode tally (see `tally_json`; sizes at the stand-in's) at the real size: fp16 UNet / VAE
    work per component, and the fp32 aggregator work."""
    from .standin import count_divisor

    divisor = divisor or count_divisor()
    out = dict.fromkeys(COMPONENTS + ("aggregator_fp32",), 0.0)
    for component, h, w, n, *extra in tally:
        if component in COMPONENTS:
            out[component] += n * flops_per_item(arch, component, h * divisor, w * divisor)
        else:
            timesteps, projection, low_memory, layers = extra
            out["aggregator_fp32"] += n * aggregator_flops(arch, tuple(layers), timesteps, projection, h * divisor,
                                                           component == "aggregator_train", low_memory)
    return out


def t4_seconds(arch: str, tally) -> dict[str, float]:
    """ESTIMATED T4 seconds of a tally's work: `seconds` (fp16 work at the anchor's rate, fp32 work at half the fp32
    peak) and the range `low`..`high` of the fp32 part's bounds (the full fp32 peak; the anchor's fraction of its
    own peak). See the module docstring for what it leaves out."""
    flops = real_flops(arch, tally)
    fp32 = flops.pop("aggregator_fp32")
    fp16_s = sum(flops.values()) / anchor_flops_per_second()
    efficiency = anchor_flops_per_second() / T4_PEAK["fp16_tensor"]
    return {"seconds": fp16_s + fp32 / (T4_PEAK["fp32"] / 2), "low": fp16_s + fp32 / T4_PEAK["fp32"],
            "high": fp16_s + fp32 / (T4_PEAK["fp32"] * efficiency)}

"""A random-weight IP-Adapter Plus and its CLIP image encoder in h94/IP-Adapter's folder layout, written offline,
so DiffSim-C (`diffnb.papers.diffsim_c.ip_adapter`) loads it through diffusers' own `load_ip_adapter` under
DIFFNB_STANDIN, where the real adapter cannot be downloaded. Plumbing for the stand-ins, not the method: it lives
beside `diffnb.standin`, outside `papers/`. `IP_ADAPTERS` is the real layout both the loader and this writer follow.
"""
from __future__ import annotations

from pathlib import Path

import torch

# The official DiffSim-C adapters: h94/IP-Adapter, IP-Adapter Plus (ViT-H image encoder), scale 0.5.
IP_ADAPTERS = {
    "sd15": dict(subfolder="models", weight_name="ip-adapter-plus_sd15.safetensors",
                 image_encoder_folder="image_encoder"),
    "sdxl": dict(subfolder="sdxl_models", weight_name="ip-adapter-plus_sdxl_vit-h.safetensors",
                 image_encoder_folder="models/image_encoder"),
}


def _standin() -> str:
    """'' normally; '1' (small stand-ins) or 'full' (real sizes) under DIFFNB_STANDIN (`diffnb.standin.mode`). The
    count mode takes the small ones: it tallies UNet and VAE work, and image encoders are not part of the tally."""
    from .standin import mode

    return {None: "", "small": "1", "count": "1", "full": "full"}[mode()]


# h94/IP-Adapter models/image_encoder (OpenCLIP ViT-H/14), written out; the small stand-in keeps patch and size.
VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, patch_size=14,
             image_size=224, projection_dim=1024, hidden_act="gelu", layer_norm_eps=1e-5)
VIT_SMALL = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, patch_size=14,
                 image_size=224, projection_dim=32)


def ip_adapter_plus_state_dict(unet, clip_dim: int, hidden: int = 64, queries: int = 16, seed: int = 0) -> dict:
    """Random IP-Adapter Plus weights under the h94 checkpoint's key names, for `unet`.

    "image_proj.*": a 4-layer Perceiver Resampler (diffusers infers its sizes from these shapes: width `hidden`,
    hidden // 64 heads, `queries` tokens, input `clip_dim`, output the UNet's cross-attention width);
    "ip_adapter.{1,3,5,...}.to_{k,v}_ip.weight": one pair per cross-attention layer, in `attn_processors` order
    (diffusers numbers attn1/attn2 alternately). Real sizes: SD1.5 hidden 768, SDXL 1280, clip_dim 1280, 16 queries.
    """
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, s=0.1: torch.randn(*shape, generator=g) * s  # noqa: E731
    d, cross = hidden, unet.config.cross_attention_dim
    sd = {"latents": rnd(1, queries, d, s=d ** -0.5), "proj_in.weight": rnd(d, clip_dim), "proj_in.bias": rnd(d),
          "proj_out.weight": rnd(cross, d), "proj_out.bias": rnd(cross),
          "norm_out.weight": 1 + rnd(cross), "norm_out.bias": rnd(cross)}
    for i in range(4):  # layers.i.0: PerceiverAttention, layers.i.1: FeedForward (LayerNorm, Linear, GELU, Linear)
        for norm in ("0.norm1", "0.norm2", "1.0"):
            sd[f"layers.{i}.{norm}.weight"], sd[f"layers.{i}.{norm}.bias"] = 1 + rnd(d), rnd(d)
        sd.update({f"layers.{i}.0.to_q.weight": rnd(d, d), f"layers.{i}.0.to_kv.weight": rnd(2 * d, d),
                   f"layers.{i}.0.to_out.weight": rnd(d, d), f"layers.{i}.1.1.weight": rnd(4 * d, d),
                   f"layers.{i}.1.3.weight": rnd(d, 4 * d)})
    out = {"image_proj." + k: v for k, v in sd.items()}
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            attn = unet.get_submodule(name[: -len(".processor")])
            for kv in ("k", "v"):
                out[f"ip_adapter.{key_id}.to_{kv}_ip.weight"] = rnd(attn.to_k.out_features, cross, s=cross ** -0.5)
            key_id += 2
    return out


def write_standin_ip_adapter(pipe, folder, full: bool = False, seed: int = 0) -> Path:
    """A random IP-Adapter Plus for `pipe` and its CLIP image encoder, in h94/IP-Adapter's folder layout
    (`IP_ADAPTERS[family]`), so `pipe.load_ip_adapter(folder, **IP_ADAPTERS[family])` loads it offline through
    diffusers' own code. `full`: the real ViT-H encoder and Resampler sizes (GPU checks); else small ones."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from .models import family

    fam = family(pipe)
    spec = IP_ADAPTERS[fam]
    folder = Path(folder)
    torch.manual_seed(seed)
    vit = VIT_H if full else VIT_SMALL
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**vit))
    enc_dir = folder / (spec["image_encoder_folder"] if "/" in spec["image_encoder_folder"]
                        else Path(spec["subfolder"], spec["image_encoder_folder"]))
    encoder.save_pretrained(enc_dir)
    hidden = (1280 if fam == "sdxl" else 768) if full else 64
    weights = folder / spec["subfolder"] / spec["weight_name"]
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file(ip_adapter_plus_state_dict(pipe.unet, vit["hidden_size"], hidden, seed=seed), str(weights))
    return folder

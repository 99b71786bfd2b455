"""DiffSim-C (Song, Liu, Shou, ICCV 2025): the Aligned Attention Score at the IP-Adapter image cross-attention.

A's latent queries read the IP-Adapter image tokens of A and of B; the score is `diffsim.symmetric_aas` on them,
with the pair noised as DiffSim-S noises it (`diffsim._noised_pairs`). The adapter is loaded for a block only
(`ip_adapter`), because an adapter left loaded breaks every later plain UNet call.

The paper: IP-Adapter Plus SD1.5 at scale 0.5, attn2 of up_blocks[1]'s last transformer block, "High quality
image" at CFG 7.5 (`DiffSimArgs.ip_layer`, `DiffSimArgs.ip_scale`):

    args = DiffSimArgs.for_model("sd15")
    with ip_adapter(pipe, scale=args.ip_scale):
        scores = diffsim_c(pipe, a, b, args.ip_layer, args.timestep, args.prompt, args.guidance_scale, seed=args.seed)
"""
from __future__ import annotations

import re
import tempfile
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from ..images import from_tensor_image
from ..pipeline import encode_image, unet_conditioning
from ..layers import select
from ..processors import attention_input, attention_names, patch_attention, split_heads
from ..standin_ip_adapter import IP_ADAPTERS, _standin, write_standin_ip_adapter
from .diffsim import _check_images, _check_timestep, _chunks, _noised_pairs, pair_noise, symmetric_aas


class IPAlignedAttentionScore:
    """Wraps a layer's IP-Adapter processor: the layer output is the wrapped processor's, untouched; the score
    is computed on the side from the same queries and IP tokens (so DiffSim-C never perturbs the UNet).

    The batch is laid out as [A_1..A_n, B_1..B_n] per CFG group; `scores[name]` receives a (pairs,) tensor.
    """

    def __init__(self, inner, name: str, pairs: int, scores: dict, adapter: int = 0):
        self.inner, self.name, self.pairs, self.scores, self.adapter = inner, name, pairs, scores, adapter

    # The signature mirrors IPAdapterAttnProcessor2_0: diffusers drops call kwargs the processor does not name.
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 scale: float = 1.0, ip_adapter_masks=None):
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, scale=scale,
                         ip_adapter_masks=ip_adapter_masks)
        if not isinstance(encoder_hidden_states, tuple):
            raise ValueError(f"{self.name}: no IP-Adapter image tokens reached this layer; call the UNet with "
                             "added_cond_kwargs={'image_embeds': [...]}")
        ip = encoder_hidden_states[1][self.adapter]  # (B, images, tokens, dim) for Plus, (B, tokens, dim) otherwise
        q = split_heads(attn, attn.to_q(attention_input(attn, hidden_states, temb)))  # the wrapped layer's queries
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        k, v = (split_heads(attn, proj[self.adapter](ip)) for proj in (self.inner.to_k_ip, self.inner.to_v_ip))
        self.scores[self.name] = symmetric_aas(q, k, v, self.pairs).cpu()
        return out


@contextmanager
def ip_score_processors(unet, layer: str, pairs: int, scores: dict, adapter: int = 0):
    """Install `IPAlignedAttentionScore` on the layers matching `layer`; yields their names; restores exactly."""
    names = select(attention_names(unet), layer, unet)
    procs = unet.attn_processors
    plain = [n for n in names if not hasattr(procs[n + ".processor"], "to_k_ip")]
    if plain:
        raise ValueError(f"{plain[:3]} have no IP-Adapter ({type(procs[plain[0] + '.processor']).__name__}); "
                         "load one with pipe.load_ip_adapter(...) and select cross-attention (attn2) layers")
    n_adapters = len(procs[names[0] + ".processor"].to_k_ip)
    if not 0 <= adapter < n_adapters:
        raise ValueError(f"adapter {adapter} out of range: {n_adapters} IP-Adapter(s) loaded")
    wrappers = {"re:" + re.escape(n): IPAlignedAttentionScore(procs[n + ".processor"], n, pairs, scores, adapter)
                for n in names}
    with patch_attention(unet, wrappers):
        yield names


@torch.no_grad()
def ip_image_embeds(pipe, images: torch.Tensor, guidance_scale: float = 1.0) -> torch.Tensor:
    """CLIP features for the UNet's `image_embeds`, one per batch item: (B, 1, ...), [uncond, cond] with CFG.

    uint8 images go in: CLIPImageProcessor rescales by 1/255 itself.
    `pipe.prepare_ip_adapter_image_embeds` would treat a list of images as several images for ONE prompt, so we
    call `pipe.encode_image` (penultimate hidden states for Plus, image_embeds otherwise, as that method decides).
    """
    from diffusers.models.embeddings import ImageProjection

    proj = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    emb, neg = pipe.encode_image(list(from_tensor_image(images)), pipe.device, 1, not isinstance(proj, ImageProjection))
    emb = torch.cat([neg, emb]) if guidance_scale > 1 else emb  # the order unet_conditioning stacks the text in
    return emb.unsqueeze(1).to(pipe.unet.dtype)


def _check_ip_pipeline(pipe):
    from diffusers.models.embeddings import MultiIPAdapterImageProjection

    if not isinstance(getattr(pipe.unet, "encoder_hid_proj", None), MultiIPAdapterImageProjection):
        raise ValueError("the pipeline has no IP-Adapter loaded; score inside `with ip_adapter(pipe): ...` "
                         "(h94/IP-Adapter Plus, loaded for the block and unloaded after it)")
    if getattr(pipe, "image_encoder", None) is None or getattr(pipe, "feature_extractor", None) is None:
        raise ValueError("DiffSim-C needs pipe.image_encoder and pipe.feature_extractor (the IP-Adapter's CLIP)")


@torch.no_grad()
def diffsim_c(pipe, images_a, images_b, layer: str, timestep: int, prompt: str = "", guidance_scale: float = 1.0,
              seed: int = 0, batch_size: int = 8, noise: str = "independent", progress: bool = True) -> torch.Tensor:
    """DiffSim-C of each pair (images_a[i], images_b[i]): (n,) scores, averaged over the layers `layer` matches.

    Needs an IP-Adapter loaded (`with ip_adapter(pipe): ...`, which unloads it again). Noise as `diffsim_sweep`
    (A's and B's independent draws, the same for every pair); one UNet call per `batch_size` pairs scores A->B
    and B->A. With CFG both halves are flattened into one vector per image, as the official code does; in the
    unconditional half A and B share the zero-image IP tokens, so that half pulls the score towards 1. The adapter
    scale (`set_ip_adapter_scale`) is not applied to the score; it only reaches it through the queries.
    The UNet's processors are restored on return, also when the call raises.
    """
    _check_ip_pipeline(pipe)
    a, b = _check_images(images_a, images_b)
    timestep = _check_timestep(pipe, timestep)
    chunks = _chunks(len(a), batch_size)
    pair_noise((1,), seed, noise)
    out = []
    for lo, hi in tqdm(chunks, desc="DiffSim-C", disable=not progress, leave=False):
        n = hi - lo
        x0 = torch.cat([encode_image(pipe, a[lo:hi]), encode_image(pipe, b[lo:hi])])
        size = x0.shape[-1] * pipe.vae_scale_factor
        cond = unet_conditioning(pipe, prompt, 2 * n, guidance_scale, size, size)
        ip = ip_image_embeds(pipe, torch.cat([a[lo:hi], b[lo:hi]]), guidance_scale)
        cond.setdefault("added_cond_kwargs", {})["image_embeds"] = [ip]  # SDXL has text_embeds/time_ids there
        scores: dict = {}
        with ip_score_processors(pipe.unet, layer, n, scores) as names:
            pipe.unet(_noised_pairs(pipe, x0, timestep, seed, guidance_scale, noise), timestep, **cond)
        out.append(torch.stack([scores[name] for name in names]).mean(0))
    return torch.cat(out)


# The official DiffSim-C adapters (IP_ADAPTERS, with the stand-in writer): h94/IP-Adapter, IP-Adapter Plus
# (ViT-H image encoder), scale 0.5.
IP_ADAPTER_REPO = "h94/IP-Adapter"
_PIPE_PARTS = ("image_encoder", "feature_extractor")


@contextmanager
def ip_adapter(pipe, scale: float = 0.5, source: str | None = None, **load_kwargs):
    """IP-Adapter Plus loaded into `pipe` for the block only; on exit the pipeline is exactly as it was.

    Loads with diffusers' own `pipe.load_ip_adapter` (`IP_ADAPTERS[family]` from h94/IP-Adapter unless `source` /
    `load_kwargs` say otherwise; under DIFFNB_STANDIN a random-weight adapter and image encoder of the real
    layout, written to a temporary folder by `write_standin_ip_adapter`). An adapter left loaded makes every
    later plain UNet call fail (the UNet then demands `image_embeds`), and diffusers' `unload_ip_adapter`
    resets all attention processors to defaults, so we put back the processors, `encoder_hid_proj`, its config
    entry, the image encoder and the feature extractor that were there before, also when the body raises.

        with ip_adapter(pipe):
            scores = diffsim_c(pipe, a, b, args.ip_layer, args.timestep, args.prompt, args.guidance_scale)
    """
    from ..models import family

    fam = family(pipe)
    if getattr(getattr(pipe.unet, "config", None), "encoder_hid_dim_type", None) is not None:
        raise ValueError(f"the pipeline already has an encoder_hid_proj ({pipe.unet.config.encoder_hid_dim_type!r}): "
                         "an IP-Adapter is loaded already; unload it (pipe.unload_ip_adapter()) or score with it as is")
    kwargs = {**IP_ADAPTERS[fam], **load_kwargs}
    tmp = None
    if source is None and _standin():
        tmp = tempfile.TemporaryDirectory(prefix="diffnb_ip_")
        source = str(write_standin_ip_adapter(pipe, tmp.name, full=_standin() == "full"))
    source = source or IP_ADAPTER_REPO
    unet = pipe.unet
    before = dict(unet.attn_processors)
    hid_proj, hid_type = unet.encoder_hid_proj, unet.config.encoder_hid_dim_type
    parts = {k: getattr(pipe, k, None) for k in _PIPE_PARTS if hasattr(pipe, k)}
    try:
        pipe.load_ip_adapter(source, **kwargs)
        pipe.set_ip_adapter_scale(scale)
        yield pipe
    finally:
        unet.encoder_hid_proj = hid_proj  # first: the adapter's Resampler has attention layers of its own
        unet.register_to_config(encoder_hid_dim_type=hid_type)
        unet.set_attn_processor(dict(before))  # set_attn_processor empties the dict it is given
        pipe.register_modules(**parts)
        if tmp is not None:
            tmp.cleanup()

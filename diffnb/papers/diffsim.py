"""DiffSim (Song, Liu, Shou, ICCV 2025): perceptual similarity from a diffusion model's attention.

The Aligned Attention Score lets image A's queries read image B's keys and values and compares the result with A
reading its own (the attention re-aligns B's features to A's layout, so pixel misalignment does not matter):

    AAS(A, B) = cos( attn(Q_A, K_A, V_A), attn(Q_A, K_B, V_B) )        DiffSim = (AAS(A, B) + AAS(B, A)) / 2

DiffSim-S (`diffsim_sweep`, `diffsim`): both images noised to timestep t, A and B with two independent noise
draws (as the official code, whose one generator per call draws A's noise, then B's), one UNet call, AAS at
self-attention layers. DiffSim-C (`diffsim_c`): the same at the IP-Adapter image cross-attention (A's latent
queries vs the IP tokens of A and of B), with the adapter loaded for a block only (`ip_adapter`).
CLIP-AAS / DINOv2-AAS (`vit_aas`): the same on a vision transformer (`load_encoder` gives the models).
The paper: shallow layers / high t score style, deep layers / low t score content (notebook 05 measures it).
`DiffSimArgs.for_model` holds the official real-model setting (SD1.5: one layer at 16x16, t = 501); a sweep
over layers and timesteps is the exploration around it.

    args = DiffSimArgs.for_model("sd15")
    scores = diffsim(pipe, images_a, images_b, **args.score_kwargs())          # (n_pairs,) similarities
    sweep = diffsim_sweep(pipe, images_a, images_b, layers="self", timesteps=(101, 501, 901), batch_size=4)
    sweep.aas[("up_blocks.1.attentions.0.transformer_blocks.0.attn1", 501)]   # (n_pairs,) similarities
"""
from __future__ import annotations

import math
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..hooks import capture
from ..inversion import encode_image, from_tensor_image, to_tensor_image, unet_conditioning
from ..layers import select
from ..processors import AttentionProcessor, attention_names, patch_attention


def aligned_attention_score(q_a, k_a, v_a, k_b, v_b, own=None) -> torch.Tensor:
    """AAS(A, B) per item: cos(attn(Q_A, K_A, V_A), attn(Q_A, K_B, V_B)), flattened over heads and tokens.

    Tensors are (B, heads, tokens, d) or (B, tokens, d); `own` = attn(Q_A, K_A, V_A) when already computed.
    """
    own = F.scaled_dot_product_attention(q_a, k_a, v_a) if own is None else own
    aligned = F.scaled_dot_product_attention(q_a, k_b, v_b)
    return F.cosine_similarity(own.flatten(1).float(), aligned.flatten(1).float(), dim=1)


def _halves(x, pairs: int):
    """Batch laid out as groups of [A_1..A_n, B_1..B_n] -> A-items and B-items, each (n, groups, ...)."""
    if x.shape[0] % (2 * pairs):
        raise ValueError(f"batch {x.shape[0]} is not a multiple of 2 x {pairs} pairs")
    x = x.reshape(-1, 2, pairs, *x.shape[1:]).transpose(0, 2)
    return x[:, 0], x[:, 1]


def symmetric_aas(q, k, v, pairs: int, own=None) -> torch.Tensor:
    """DiffSim of the batch laid out as groups of [A_1..A_n, B_1..B_n] (one group per CFG half): (n,) scores.

    The groups are flattened into one vector per image, as the official code flattens the CFG batch.
    """
    own = F.scaled_dot_product_attention(q, k, v) if own is None else own
    (qa, qb), (ka, kb), (va, vb), (oa, ob) = (_halves(x, pairs) for x in (q, k, v, own))
    return (aligned_attention_score(qa, ka, va, kb, vb, oa) + aligned_attention_score(qb, kb, vb, ka, va, ob)) / 2


class AlignedAttentionScore(AttentionProcessor):
    """Leaves the forward pass unchanged and records, per layer, DiffSim between the batch's A and B halves and
    the plain cosine of their attention outputs (the unaligned feature baseline the paper argues against)."""

    def __init__(self, pairs: int, aas: dict, feature_cosine: dict):
        super().__init__()
        self.pairs, self.aas, self.feature_cosine = pairs, aas, feature_cosine

    def attend(self, call, q, k, v, mask):
        out = super().attend(call, q, k, v, mask)
        self.aas[call.name] = symmetric_aas(q, k, v, self.pairs, own=out).cpu()
        oa, ob = _halves(out, self.pairs)
        self.feature_cosine[call.name] = F.cosine_similarity(oa.flatten(1).float(), ob.flatten(1).float(), dim=1).cpu()
        return out


def _check_images(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = to_tensor_image(a), to_tensor_image(b)
    if a.shape != b.shape:
        raise ValueError(f"images_a and images_b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return a, b


def _check_timestep(pipe, t) -> int:
    n_train = pipe.scheduler.config.num_train_timesteps
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < n_train:
        raise ValueError(f"timesteps must be ints in [0, {n_train}), got {t!r}")
    return int(t)


NOISE = ("independent", "shared")


def pair_noise(shape, seed: int, noise: str = "independent") -> tuple[torch.Tensor, torch.Tensor]:
    """A's and B's noise for one latent shape, on the CPU: (noise_a, noise_b).

    "independent" (the official behaviour): one generator seeded with `seed` draws A's noise, then B's, so the two
    differ. The official code re-seeds that generator for every scored pair, so every pair, and both pairs of a
    triplet, see the same two draws: the score does not depend on which other pairs share the batch, on the batch
    size or on the order. "shared" (ours, an ablation): B gets A's noise, so DiffSim(A, A) = 1 and the score is
    symmetric; the old default here.
    """
    if noise not in NOISE:
        raise ValueError(f"noise must be one of {NOISE}, got {noise!r}")
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    a = torch.randn(tuple(shape), generator=g, device="cpu")
    return a, (a if noise == "shared" else torch.randn(tuple(shape), generator=g, device="cpu"))


def _noised_pairs(pipe, x0: torch.Tensor, t: int, seed: int, guidance_scale: float,
                  noise: str = "independent") -> torch.Tensor:
    """x0 = [A_1..A_n, B_1..B_n] latents noised to t (A's draw for every A, B's for every B, see `pair_noise`),
    repeated for the unconditional half under CFG. Every tensor is built on x0's device."""
    n = x0.shape[0] // 2
    na, nb = pair_noise(x0.shape[1:], seed, noise)
    eps = torch.cat([na.expand(n, *na.shape), nb.expand(n, *nb.shape)]).to(x0.device, x0.dtype)
    xt = pipe.scheduler.add_noise(x0, eps, torch.full((2 * n,), t, dtype=torch.long, device=x0.device))
    return torch.cat([xt, xt]) if guidance_scale > 1 else xt


def _chunks(n: int, batch_size: int) -> list[tuple[int, int]]:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1 (pairs per UNet call), got {batch_size!r}")
    return [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


@dataclass
class Sweep:
    """Scores per (layer name, timestep): `aas` = DiffSim-S, `feature_cosine` = unaligned baseline; (n,) each."""
    aas: dict
    feature_cosine: dict

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys(layer for layer, _ in self.aas))

    @property
    def timesteps(self) -> list[int]:
        return sorted({t for _, t in self.aas})


@torch.no_grad()
def diffsim_sweep(pipe, images_a, images_b, layers: str = "self", timesteps=(500,), prompt: str = "",
                  guidance_scale: float = 1.0, seed: int = 0, batch_size: int = 8, noise: str = "independent",
                  progress: bool = True) -> Sweep:
    """DiffSim-S of each pair (images_a[i], images_b[i]) at every selected self-attention layer and timestep.

    One UNet call per timestep and batch of `batch_size` pairs scores all layers at once (2 x batch_size latents,
    twice that under CFG: 4 pairs = 16 SD1.5 latents at 512² fit a 15 GB T4; the score of a pair does not depend
    on the batching). With `guidance_scale` > 1 the batch also runs the unconditional half (the official code
    uses the prompt "High quality image" at CFG 7.5; nothing is sampled, the prompt only conditions the UNet).
    """
    a, b = _check_images(images_a, images_b)
    ts = [_check_timestep(pipe, t) for t in ([timesteps] if isinstance(timesteps, (int, np.integer)) else timesteps)]
    if not ts:
        raise ValueError("timesteps is empty")
    chunks = _chunks(len(a), batch_size)
    pair_noise((1,), seed, noise)  # bad `noise` fails before any model call
    names = select(attention_names(pipe.unet), layers, pipe.unet)
    cross = [n for n in names if pipe.unet.get_submodule(n).is_cross_attention]
    if cross:
        raise ValueError(f"DiffSim-S scores self-attention layers; {cross[:3]} are cross-attention (use 'self' or attn1)")
    aas, cos = {}, {}
    bar = tqdm(total=len(ts) * len(chunks), desc="DiffSim", disable=not progress, leave=False)
    for lo, hi in chunks:
        x0 = torch.cat([encode_image(pipe, a[lo:hi]), encode_image(pipe, b[lo:hi])])
        size = x0.shape[-1] * pipe.vae_scale_factor
        cond = unet_conditioning(pipe, prompt, 2 * (hi - lo), guidance_scale, size, size)
        for t in ts:
            step_aas, step_cos = {}, {}
            with patch_attention(pipe.unet, {layers: AlignedAttentionScore(hi - lo, step_aas, step_cos)}):
                pipe.unet(_noised_pairs(pipe, x0, t, seed, guidance_scale, noise), t, **cond)
            for name in names:
                aas.setdefault((name, t), []).append(step_aas[name])
                cos.setdefault((name, t), []).append(step_cos[name])
            bar.update()
    bar.close()
    return Sweep({k: torch.cat(v) for k, v in aas.items()}, {k: torch.cat(v) for k, v in cos.items()})


def official_timestep(target_step: int, name: str = "sd15") -> int:
    """The UNet timestep the official code runs for `--target_step` (an index into a 1000-step schedule).

    SD1.5's PNDM grid for 1000 steps is [1000, 999, 999, 998, ..., 1] (PLMS repeats one step), so t = 1001 − step;
    SDXL's Euler grid ("leading", offset 1) is [1000, 999, ..., 1], so t = 1000 − step. The drivers use 500
    (NIGHTS), 600 (CUTE), 750 (IPref, DreamBench++) and 900 (Sref, InstantStyle, TID2013).
    """
    if name not in ("sd15", "sdxl"):
        raise ValueError(f"official timesteps are defined for 'sd15' and 'sdxl', not {name!r}")
    if isinstance(target_step, bool) or not isinstance(target_step, (int, np.integer)) or not 2 <= target_step <= 999:
        raise ValueError(f"target_step must be an int in [2, 999], got {target_step!r}")
    return (1001 if name == "sd15" else 1000) - int(target_step)


@dataclass(frozen=True)
class DiffSimArgs:
    """One DiffSim setting. Defaults: the official SD1.5 code as it runs (showlab/DiffSim, `night_main.sh`)."""
    # Any single --target_layer collapses to index 0 (`if len(target_layer) == 1: target_layer = 0`), so the official
    # SD1.5 hook sits on up_blocks[1:][0].attentions[-1].transformer_blocks[-1].attn1: 16x16 tokens at 512².
    layer: str = "up_blocks.1.attentions.2.transformer_blocks.0.attn1"
    timestep: int = 501  # --target_step 500 (NIGHTS): official_timestep(500, "sd15")
    prompt: str = "High quality image"  # argprocess.py --prompt (NIGHTS uses f"An image of a {category}")
    guidance_scale: float = 7.5  # DiffSimPipeline.step: CFG 7.5, one UNet call
    seed: int = 2334  # *_main.sh --seed: A's and B's noise (see `pair_noise`)
    ip_layer: str = "up_blocks.1.attentions.2.transformer_blocks.0.attn2"  # DiffSim-C hooks attn2 of that block
    ip_scale: float = 0.5  # pipe.set_ip_adapter_scale(0.5)
    image_size: int = 512  # --image_size 512 (the SDXL variant resizes to the same size)
    batch_size: int = 4  # ours: pairs per UNet call, 16 latents under CFG, sized for a 15 GB T4 at 512² in fp16

    def __post_init__(self):
        if self.guidance_scale < 1:
            raise ValueError(f"guidance_scale must be >= 1, got {self.guidance_scale}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")

    def score_kwargs(self) -> dict:
        """Keyword arguments for `diffsim` / `diffsim_sweep`-style calls (layer and timestep included)."""
        return dict(layer=self.layer, timestep=self.timestep, prompt=self.prompt, guidance_scale=self.guidance_scale,
                    seed=self.seed, batch_size=self.batch_size)

    @classmethod
    def for_model(cls, name: str, **overrides) -> "DiffSimArgs":
        """sd15: the official code (the dataclass defaults). sdxl: the official SDXL variant takes a (block,
        attention, transformer block) triple into up_blocks[:-1] and publishes no default; we take the position
        the SD1.5 layer has: the first up block with attention, its last attention, its last transformer block
        (up_blocks.0.attentions.2.transformer_blocks.9, 16x16 at 512²), at target_step 500 of SDXL's grid (t = 500),
        2 pairs per call (SDXL's UNet is 3x SD1.5's). toy: ours, the same position in the toy UNet (8x8), no prompt
        and no CFG (the toy's unconditional branch), 32 pairs per call on the CPU."""
        base = {"sd15": {},
                "sdxl": dict(layer="up_blocks.0.attentions.2.transformer_blocks.9.attn1",
                             ip_layer="up_blocks.0.attentions.2.transformer_blocks.9.attn2",
                             timestep=official_timestep(500, "sdxl"), batch_size=2),
                "toy": dict(layer="up_blocks.1.attentions.1.transformer_blocks.0.attn1",
                            ip_layer="up_blocks.1.attentions.1.transformer_blocks.0.attn2", prompt="",
                            guidance_scale=1.0, seed=0, image_size=64, batch_size=32)}.get(name)
        if base is None:
            raise ValueError(f"no DiffSim settings for model {name!r}; known: sd15, sdxl, toy")
        return replace(cls(**base), **overrides)


def diffsim(pipe, images_a, images_b, layer: str, timestep: int, **kwargs) -> torch.Tensor:
    """DiffSim-S at one setting (a layer pattern, averaged over the layers it matches): (n_pairs,) scores."""
    scores = diffsim_sweep(pipe, images_a, images_b, layers=layer, timesteps=(timestep,), **kwargs).aas
    return torch.stack(list(scores.values())).mean(0)


@torch.no_grad()
def pair_qkv(pipe, image_a, image_b, layer: str, timestep: int, seed: int = 0, noise: str = "independent"):
    """The q, k, v one self-attention layer computes for the pair [A, B] (as DiffSim-S sees them, without CFG):
    three (2, heads, tokens, d) tensors, for looking inside the score (notebook 05)."""
    a, b = _check_images(image_a, image_b)
    names = select(attention_names(pipe.unet), layer, pipe.unet)
    if len(names) != 1:
        raise ValueError(f"pair_qkv needs exactly one layer; {layer!r} matches {len(names)}: {names[:3]}")
    name = names[0]
    t = _check_timestep(pipe, timestep)
    x0 = torch.cat([encode_image(pipe, a[:1]), encode_image(pipe, b[:1])])
    size = x0.shape[-1] * pipe.vae_scale_factor
    cond = unet_conditioning(pipe, "", 2, 1.0, size, size)
    with capture(pipe.unet, [f"{name}.to_{c}" for c in "qkv"], offload=None) as cache:
        pipe.unet(_noised_pairs(pipe, x0, t, seed, 1.0, noise), t, **cond)
    heads = pipe.unet.get_submodule(name).heads
    return tuple(cache.get(f"{name}.to_{c}").unflatten(-1, (heads, -1)).transpose(1, 2).float() for c in "qkv")


def aas_map(q, k, v) -> np.ndarray:
    """Per-token AAS(A, B) on A's token grid: where A's reading of B agrees with its reading of itself.
    q, k, v: (2, heads, tokens, d) for [A, B] (from `pair_qkv`); returns a (side, side) float array."""
    own = F.scaled_dot_product_attention(q[:1], k[:1], v[:1])
    aligned = F.scaled_dot_product_attention(q[:1], k[1:], v[1:])
    per_token = F.cosine_similarity(own[0].transpose(0, 1).flatten(1), aligned[0].transpose(0, 1).flatten(1), dim=1)
    side = math.isqrt(per_token.numel())
    return per_token.reshape(side, side).cpu().numpy()


def two_afc(sim_positive, sim_negative) -> float:
    """Fraction of triplets where the metric finds the positive more similar to the reference (ties count 0.5)."""
    p, n = torch.as_tensor(sim_positive, dtype=torch.float64), torch.as_tensor(sim_negative, dtype=torch.float64)
    return float(((p > n).double() + 0.5 * (p == n).double()).mean())


def pixel_l2_similarity(images_a, images_b) -> torch.Tensor:
    """The pixel baseline: negative mean squared difference (higher = more similar)."""
    a, b = _check_images(images_a, images_b)
    return -((a - b) ** 2).flatten(1).mean(1)


# --- DiffSim-C: the IP-Adapter image cross-attention ----------------------------------------------------------
# The paper: IP-Adapter Plus SD1.5 at scale 0.5, attn2 of up_blocks[1]'s last transformer block, "High quality
# image" at CFG 7.5:
#   pipe.load_ip_adapter("h94/IP-Adapter", subfolder="models", weight_name="ip-adapter-plus_sd15.safetensors")
#   diffsim_c(pipe, a, b, "up_blocks.1.attentions.2.transformer_blocks.0.attn2", 500, "High quality image", 7.5)
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
        x = hidden_states  # the query path of the wrapped processor, step by step
        if attn.spatial_norm is not None:
            x = attn.spatial_norm(x, temb)
        if x.ndim == 4:
            x = x.flatten(2).transpose(1, 2)
        if attn.group_norm is not None:
            x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        b, heads = x.shape[0], attn.heads
        split = lambda t: t.reshape(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)
        q = split(attn.to_q(x))
        k, v = split(self.inner.to_k_ip[self.adapter](ip)), split(self.inner.to_v_ip[self.adapter](ip))
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


# The official DiffSim-C adapters: h94/IP-Adapter, IP-Adapter Plus (ViT-H image encoder), scale 0.5.
IP_ADAPTERS = {
    "sd15": dict(subfolder="models", weight_name="ip-adapter-plus_sd15.safetensors",
                 image_encoder_folder="image_encoder"),
    "sdxl": dict(subfolder="sdxl_models", weight_name="ip-adapter-plus_sdxl_vit-h.safetensors",
                 image_encoder_folder="models/image_encoder"),
}
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


# --- stand-ins: random weights, real classes and layouts, built offline (DIFFNB_STANDIN) -----------------------
def _standin() -> str:
    """'' normally; '1' (small stand-ins) or 'full' (real sizes) under DIFFNB_STANDIN (`diffnb.standin.mode`)."""
    from ..standin import mode

    return {None: "", "small": "1", "full": "full"}[mode()]


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

    from ..models import family

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


# Real configs of the two encoders notebook 05 scores with (openai/clip-vit-base-patch32, facebook/dinov2-small).
ENCODER_CONFIGS = {
    "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=32,
                 image_size=224, projection_dim=512, hidden_act="quick_gelu"),
    "dinov2-small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
                         image_size=518, layerscale_value=1.0),
}
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)


def load_encoder(name: str, device=None, dtype=None):
    """The vision encoder `vit_aas` scores with, in eval mode: "clip" (CLIPVisionModel of
    openai/clip-vit-base-patch32) or "dinov2-small" (Dinov2Model of facebook/dinov2-small), from the hub, or
    under DIFFNB_STANDIN random weights of the same class (real patch and image size; small widths unless
    DIFFNB_STANDIN=full), built offline."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model

    from ..models import REGISTRY

    classes = {"clip": (CLIPVisionModel, CLIPVisionConfig), "dinov2-small": (Dinov2Model, Dinov2Config)}
    if name not in classes:
        raise ValueError(f"unknown encoder {name!r}; allowed: {sorted(classes)}")
    cls, config = classes[name]
    mode = _standin()
    if mode:
        torch.manual_seed(0)
        cfg = dict(ENCODER_CONFIGS[name])
        if mode != "full":
            cfg.update(SMALL, **({"intermediate_size": 37} if name == "clip" else {"mlp_ratio": 2}))
        model = cls(config(**cfg))
    else:
        model = cls.from_pretrained(REGISTRY[name].source)
    return model.to(device=device, dtype=dtype).eval()


# --- CLIP-AAS and DINOv2-AAS: the same score on a vision transformer --------------------------------------
# model_type -> (mean, std) the encoder was trained with
NORMS = {
    "clip_vision_model": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
QKV = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))  # transformers 5.x / older DINOv2 names
ALLOWED = "CLIPVisionModel, CLIPVisionModelWithProjection or a DINOv2 model (Dinov2Model)"


def _model_type(model) -> str:
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if not isinstance(model, torch.nn.Module) or kind not in NORMS:
        hint = " (for a full CLIPModel pass model.vision_model)" if kind == "clip" else ""
        raise TypeError(f"vit_aas needs {ALLOWED}; got {type(model).__name__} (model_type {kind!r}){hint}")
    return kind


def _qkv(module):
    """The q/k/v child names of an attention module, or None when it is not one."""
    for names in QKV:
        if all(isinstance(getattr(module, n, None), torch.nn.Linear) for n in names):
            return names
    return None


def vit_attention_layers(model) -> list[str]:
    """Dotted names of the self-attention modules (those owning q/k/v projections), in forward order."""
    _model_type(model)
    return [name for name, m in model.named_modules() if name and _qkv(m)]


def _pixels(images, size: int, mean, std) -> torch.Tensor:
    """Any image `diffnb.images.to_tensor_image` reads (PIL, uint8 arrays, float tensors in [-1, 1], ...), or a
    list of them -> the batch normalized with the encoder's mean and std.

    A plain squash-resize to the model's size (no centre crop), so no image-processor dependency is needed;
    pass `image_processor=` for the exact Hugging Face preprocessing.
    """
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("got an empty list of images")
        return torch.cat([_pixels(im, size, mean, std) for im in images])
    x = (to_tensor_image(images).float() + 1) / 2
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@contextmanager
def _eval(model):
    """Eval mode for the call only: dropout would make the score random."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def vit_aas(model, images_a, images_b, layer: str, image_processor=None, size: int | None = None) -> torch.Tensor:
    """Symmetric AAS (A reading B's keys/values and back, averaged) per pair (images_a[i], images_b[i]): (n,).

    `layer` is a dotted name or glob from `vit_attention_layers` (several matches are averaged), never a
    position, so a sweep stays readable. A and B go through the model in one batch; q/k/v are the outputs of
    the layer's projection Linears, captured by hooks (removed even if the forward raises). These are the
    q/k/v the model really attends with; the official DiffSim CLIP code instead projects the layer input
    taken before layer_norm1, which we deliberately do not copy.
    """
    kind = _model_type(model)
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a dotted name or glob pattern (str), not {type(layer).__name__}; "
                        f"see vit_attention_layers(model)")
    names = vit_attention_layers(model)
    try:
        chosen = select(names, layer)
    except ValueError:
        raise ValueError(f"layer {layer!r} matches no self-attention layer; layers: {names[:2]} ... "
                         f"{names[-1:]} ({len(names)} in all)") from None
    cfg = model.config
    size = size or (cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0])
    if image_processor is not None:
        prep = lambda ims: image_processor(images=ims, return_tensors="pt").pixel_values  # noqa: E731
    else:
        prep = lambda ims: _pixels(ims, size, *NORMS[kind])  # noqa: E731
    a, b = prep(images_a), prep(images_b)
    if a.shape != b.shape:
        raise ValueError(f"images_a and images_b must hold the same number of images (pairs), "
                         f"got batches of shape {tuple(a.shape)} and {tuple(b.shape)}")
    p = next(model.parameters())
    pixels = torch.cat([a, b]).to(p.device, p.dtype)
    kwargs = {"interpolate_pos_encoding": size != cfg.image_size} if kind == "clip_vision_model" else {}
    projs = [f"{n}.{c}" for n in chosen for c in _qkv(model.get_submodule(n))]
    with _eval(model), capture(model, projs, offload=None) as cache:
        model(pixel_values=pixels, **kwargs)
    scores = []
    for n in chosen:
        attn = model.get_submodule(n)
        heads = getattr(attn, "num_heads", None) or attn.num_attention_heads
        q, k, v = (cache.get(f"{n}.{c}") for c in _qkv(attn))  # (2n, tokens, heads * d)
        q, k, v = (x.unflatten(-1, (heads, -1)).transpose(1, 2) for x in (q, k, v))
        scores.append(symmetric_aas(q, k, v, pairs=len(a)))
    return torch.stack(scores).mean(0).cpu()


# --- the toy world's ground truth: style = background pattern, content = shape class -------------------------
def toy_triplets(kind: str, n: int, split: str = "heldout", seed: int = 0):
    """(reference, positive, negative) uint8 image stacks of shape (n, 64, 64, 3) with known answers.

    The negative is always an edit of the reference scene (same layout, one attribute changed), so it is the
    closer image pixel by pixel; the positive shares the attribute under test but is laid out anew.
    style:   positive = the reference's background pattern behind another object; negative = the reference
             itself with another background pattern (its content points the wrong way).
    content: positive = the reference's object (shape, colour, detail) in a new pose on a new background of the
             same pattern; negative = the reference with another object (shape and colour) in the same pose.
    shape:   as content, but the positive's colour is drawn anew and the negative keeps the reference's colour:
             only the shape class tells them apart.
    """
    from dataclasses import replace

    from ..toyworld.data import scene_rng
    from ..toyworld.world import BACKGROUNDS, COLORS, DETAILS, SHAPES, random_scene, render

    kinds = ("style", "content", "shape")
    if kind not in kinds:
        raise ValueError(f"kind must be one of {kinds}, got {kind!r}")
    out = []
    for i in range(n):
        rng = scene_rng(split, 10_000 * (1 + seed) + i)
        pick = lambda values, k: [str(v) for v in rng.choice(values, k, replace=False)]
        (s0, s1), (c0, c1), (b0, b1), d0 = pick(SHAPES, 2), pick(list(COLORS), 2), pick(BACKGROUNDS, 2), pick(DETAILS, 1)[0]
        ref = random_scene(rng, n_objects=1, shape=s0, color=c0, detail=d0, background=b0)
        obj = ref.objects[0]
        if kind == "style":
            pos = random_scene(rng, n_objects=1, shape=s1, color=c1, background=b0)
            neg = replace(ref, background=b1)
        else:
            pos = random_scene(rng, n_objects=1, shape=s0, background=b0,
                               **(dict(color=c0, detail=d0) if kind == "content" else {}))
            neg = replace(ref, objects=[replace(obj, shape=s1, color=c1 if kind == "content" else c0)])
        out.append([render(s).image for s in (ref, pos, neg)])
    return tuple(np.stack(x) for x in zip(*out))

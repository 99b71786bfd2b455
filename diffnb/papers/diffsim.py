"""DiffSim (Song, Liu, Shou, ICCV 2025): perceptual similarity from a diffusion model's attention.

The Aligned Attention Score lets image A's queries read image B's keys and values and compares the result with A
reading its own (the attention re-aligns B's features to A's layout, so pixel misalignment does not matter):

    AAS(A, B) = cos( attn(Q_A, K_A, V_A), attn(Q_A, K_B, V_B) )        DiffSim = (AAS(A, B) + AAS(B, A)) / 2

DiffSim-S (`diffsim_sweep`, `diffsim`): both images noised to timestep t (same noise), one UNet call, AAS at
self-attention layers. DiffSim-C (`diffsim_c`): the same at the IP-Adapter image cross-attention (A's latent queries
vs the IP tokens of A and of B). CLIP-AAS / DINOv2-AAS (`vit_aas`): the same on a vision transformer.
The paper: shallow layers / high t score style, deep layers / low t score content (notebook 05 measures it).

    scores = diffsim_sweep(pipe, images_a, images_b, layers="self", timesteps=(100, 500, 900))
    scores.aas[("up_blocks.1.attentions.0.transformer_blocks.0.attn1", 500)]   # (n_pairs,) similarities
"""
from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass

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


def _noised_pair(pipe, x0: torch.Tensor, t: int, seed: int, guidance_scale: float) -> torch.Tensor:
    """x0 = [A..., B...] latents noised to t with the SAME noise for A_i and B_i (differences come from the
    images), repeated for the unconditional half under CFG."""
    n = x0.shape[0] // 2
    noise = torch.randn((n,) + x0.shape[1:], generator=torch.Generator().manual_seed(seed * 1000 + t))
    xt = pipe.scheduler.add_noise(x0, noise.to(x0).repeat(2, 1, 1, 1), torch.full((2 * n,), t, dtype=torch.long))
    return torch.cat([xt, xt]) if guidance_scale > 1 else xt


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
                  guidance_scale: float = 1.0, seed: int = 0, batch_size: int = 32, progress: bool = True) -> Sweep:
    """DiffSim-S of each pair (images_a[i], images_b[i]) at every selected self-attention layer and timestep.

    One UNet call per timestep and batch scores all layers at once. With `guidance_scale` > 1 the batch also runs
    the unconditional half (the official code uses the prompt "High quality image" at CFG 7.5; nothing is sampled,
    the prompt only changes what the UNet is conditioned on).
    """
    a, b = _check_images(images_a, images_b)
    ts = [_check_timestep(pipe, t) for t in ([timesteps] if isinstance(timesteps, (int, np.integer)) else timesteps)]
    if not ts:
        raise ValueError("timesteps is empty")
    names = select(attention_names(pipe.unet), layers, pipe.unet)
    cross = [n for n in names if pipe.unet.get_submodule(n).is_cross_attention]
    if cross:
        raise ValueError(f"DiffSim-S scores self-attention layers; {cross[:3]} are cross-attention (use 'self' or attn1)")
    aas, cos = {}, {}
    chunks = [(i, min(i + batch_size, len(a))) for i in range(0, len(a), batch_size)]
    bar = tqdm(total=len(ts) * len(chunks), desc="DiffSim", disable=not progress, leave=False)
    for lo, hi in chunks:
        x0 = torch.cat([encode_image(pipe, a[lo:hi]), encode_image(pipe, b[lo:hi])])
        size = x0.shape[-1] * pipe.vae_scale_factor
        cond = unet_conditioning(pipe, prompt, 2 * (hi - lo), guidance_scale, size, size)
        for t in ts:
            step_aas, step_cos = {}, {}
            with patch_attention(pipe.unet, {layers: AlignedAttentionScore(hi - lo, step_aas, step_cos)}):
                pipe.unet(_noised_pair(pipe, x0, t, seed, guidance_scale), t, **cond)
            for name in names:
                aas.setdefault((name, t), []).append(step_aas[name])
                cos.setdefault((name, t), []).append(step_cos[name])
            bar.update()
    bar.close()
    return Sweep({k: torch.cat(v) for k, v in aas.items()}, {k: torch.cat(v) for k, v in cos.items()})


def diffsim(pipe, images_a, images_b, layer: str, timestep: int, **kwargs) -> torch.Tensor:
    """DiffSim-S at one setting (a layer pattern, averaged over the layers it matches): (n_pairs,) scores."""
    scores = diffsim_sweep(pipe, images_a, images_b, layers=layer, timesteps=(timestep,), **kwargs).aas
    return torch.stack(list(scores.values())).mean(0)


@torch.no_grad()
def pair_qkv(pipe, image_a, image_b, layer: str, timestep: int, seed: int = 0):
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
        pipe.unet(_noised_pair(pipe, x0, t, seed, 1.0), t, **cond)
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
        raise ValueError("the pipeline has no IP-Adapter loaded; call pipe.load_ip_adapter(...) first "
                         "(DiffSim-C uses h94/IP-Adapter, models/ip-adapter-plus_sd15.safetensors)")
    if getattr(pipe, "image_encoder", None) is None or getattr(pipe, "feature_extractor", None) is None:
        raise ValueError("DiffSim-C needs pipe.image_encoder and pipe.feature_extractor (the IP-Adapter's CLIP)")


@torch.no_grad()
def diffsim_c(pipe, images_a, images_b, layer: str, timestep: int, prompt: str = "", guidance_scale: float = 1.0,
              seed: int = 0) -> torch.Tensor:
    """DiffSim-C of each pair (images_a[i], images_b[i]): (n,) scores, averaged over the layers `layer` matches.

    Both images get the same noise (seeded by `seed` and `timestep`), one UNet call scores A->B and B->A. With
    CFG both halves are flattened into one vector per image, as the official code does; in the unconditional half
    A and B share the zero-image IP tokens, so that half pulls the score towards 1. The adapter scale
    (`set_ip_adapter_scale`) is not applied to the score; it only reaches it through the queries (earlier layers).
    """
    _check_ip_pipeline(pipe)
    a, b = _check_images(images_a, images_b)
    timestep = _check_timestep(pipe, timestep)
    n = a.shape[0]
    x0 = torch.cat([encode_image(pipe, a), encode_image(pipe, b)])
    size = x0.shape[-1] * pipe.vae_scale_factor
    cond = unet_conditioning(pipe, prompt, 2 * n, guidance_scale, size, size)
    ip = ip_image_embeds(pipe, torch.cat([a, b]), guidance_scale)
    cond.setdefault("added_cond_kwargs", {})["image_embeds"] = [ip]  # SDXL already has text_embeds/time_ids there
    scores: dict = {}
    with ip_score_processors(pipe.unet, layer, n, scores) as names:
        pipe.unet(_noised_pair(pipe, x0, timestep, seed, guidance_scale), timestep, **cond)
    return torch.stack([scores[name] for name in names]).mean(0)


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
    """PIL / uint8 HWC(NHWC) array / float (B,3,H,W) tensor in [0,1], or a list of these -> normalized batch.

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

"""DiffSim (Song, Liu, Shou, ICCV 2025): perceptual similarity from a diffusion model's attention.

The Aligned Attention Score lets image A's queries read image B's keys and values and compares the result with A
reading its own (the attention re-aligns B's features to A's layout, so pixel misalignment does not matter):

    AAS(A, B) = cos( attn(Q_A, K_A, V_A), attn(Q_A, K_B, V_B) )        DiffSim = (AAS(A, B) + AAS(B, A)) / 2

DiffSim-S (`diffsim_sweep`, `diffsim`), this module: both images noised to timestep t, A and B with two independent
noise draws (as the official code, whose one generator per call draws A's noise, then B's), one UNet call, AAS at
self-attention layers. DiffSim-C (`diffsim_c.diffsim_c`): the same at the IP-Adapter image cross-attention, built on
this module's score and noising. CLIP-AAS / DINOv2-AAS (`diffsim_encoders.vit_aas`): the same on a vision
transformer (the baselines).
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
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..hooks import capture
from ..images import to_tensor_image
from ..pipeline import encode_image, unet_conditioning
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
    """Batch laid out as groups of [A_1..A_n, B_1..B_n] -> A-items and B-items, each (n, groups, ...).

    Not `processors.cfg_halves(x, 2)`: under CFG the A/B split runs inside each guidance half ([A, B] uncond,
    [A, B] cond), so that would part uncond from cond; the two agree only without CFG (one group)."""
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


def best_setting(scores: dict, n: int):
    """The (layer, timestep) whose scores best separate positives from negatives on a selection set.

    `scores[key]` holds n positive-pair scores, then n negative-pair scores (a sweep of [ref, ref] vs [pos, neg]).
    Ranked by 2AFC accuracy; ties, common on a few dozen triplets where many settings score 1.0, are broken by the
    standardised margin mean(pos - neg) / std(pos - neg), a less noisy reading of the same separation (taking the
    first in sweep order instead picks an arbitrary layer)."""
    from ..metrics import two_afc
    if not scores:
        raise ValueError("scores is empty: sweep at least one (layer, timestep)")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an int >= 1 (triplets), got {n!r}")

    def rank(key):
        s = torch.as_tensor(scores[key], dtype=torch.float64)
        if s.shape != (2 * n,):
            raise ValueError(f"scores[{key!r}] has shape {tuple(s.shape)}; expected ({2 * n},): n positives, n negatives")
        d = s[:n] - s[n:]
        mean, sd = float(d.mean()), float(d.std()) if n > 1 else 0.0
        return two_afc(s[:n], s[n:]), mean / sd if sd > 0 else math.copysign(math.inf, mean) if mean else 0.0
    return max(scores, key=rank)


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


def pixel_l2_similarity(images_a, images_b) -> torch.Tensor:
    """The pixel baseline: negative mean squared difference (higher = more similar)."""
    a, b = _check_images(images_a, images_b)
    return -((a - b) ** 2).flatten(1).mean(1)

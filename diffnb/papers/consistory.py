"""ConsiStory (Tewel et al., SIGGRAPH 2024): one subject kept consistent across a batch of prompts, training-free.

Re-implemented from the paper (the official code's licence is non-commercial; nothing is copied from it):
  1. subject masks: the subject words' cross-attention, averaged over layers and the steps so far, Otsu-thresholded,
     recomputed at every step;
  2. subject-driven self-attention (SDSA): image i attends to its own tokens plus the subject tokens of the
     anchors, A_i = softmax(Q_i [K_i ; K_anchors]ᵀ/√d + log M_i⁺), with dropout on the shared tokens and the
     early-step queries mixed with those of a vanilla pass, Q* = v_t Q_vanilla + (1 - v_t) Q_SDSA;
  3. feature injection: a second pass blends anchors' self-attention outputs into each image's conditional half at
     positions matched by DIFT features (cosine nearest neighbours among the anchors' subject patches, kept where
     the distance is below an Otsu threshold and the target is in its subject mask): x̂ = (1 - α) x + α x_src;
  4. anchors: only the first `n_anchors` images are shared; their kept keys/values (and outputs) can be cached
     and reused to generate new prompts against the same subject without regenerating the anchors.

    out = generate(pipe, prompts, ["dog"], ConsiStoryArgs(), seeds=[0, 1, 2, 3])
    out.images, out.masks[16]          # (n, H, W, 3) floats; (n, 16, 16) bool subject masks

A pass's state (the schedule, the subject masks over the steps, the anchor bank) is in `consistory_run.py`.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
import torch.nn.functional as F

from ..hooks import capture, token_index
from ..pipeline import decode_latents, seeded_latents
from ..layers import resolution, select_many
from ..processors import (AttentionProcessor, attention_names, cfg_halves, extended_attention, patch_attention,
                          track_steps)
from .consistory_run import AnchorCache, ConsiStoryRun, correspondences, gaussian_smooth


@dataclass(frozen=True)
class ConsiStoryArgs:
    sdsa: bool = True
    share_layers: str | tuple[str, ...] = "up.*.attn1"  # official: self-attention of the up blocks only
    n_anchors: int | None = 2  # images 0..n-1 of each CFG half are shared; None: every image shares
    sdsa_start: int = 1  # first step with SDSA (official t_range (1, n_steps)); step 0 has no masks yet
    subject_masks: str = "attention"  # "all": share every patch (no masks; the premise test and ablation)
    mask_resolutions: tuple[int, ...] | None = None  # cross-attention maps used (official 32 on SDXL); None: all
    mask_window: int = 20  # average the last this many steps' maps (official x[-20:])
    mask_dropout: float = 0.5  # share of subject tokens hidden from others per step (official 0.5)
    dropout_seed: int = 0
    query_mix_fraction: float = 0.1  # vanilla-query mixing on steps 0..n_steps*fraction (official n_steps//10)
    query_mix_strength: tuple[float, float] = (0.9, 0.81836735)  # v_t, linear over those steps (official)
    inject: bool = False  # feature injection (a second full pass)
    inject_layers: str | tuple[str, ...] | None = None  # None: self-attention at the highest resolution (official)
    inject_alpha: float = 0.8
    inject_fraction: tuple[float, float] = (0.1, 1 / 3)  # steps n//10 .. n//3 (official (n//10, n//3, 0.8))
    dift_layer: str = "up_blocks.1"  # DIFT feature: a block's output (DIFT on SD: index 1; official SDXL: up_blocks.0)
    dift_timestep: int = 261  # official: pass 1's features at t = 261, conditional half
    dift_sigma: float | None = None  # 3x3 Gaussian smoothing of the features (official SDXL: σ 1); None: none
    dift_threshold: float | None = None  # cosine-distance cut; None: per image Otsu over every pixel's NN distance

    def __post_init__(self):
        if not 0 <= self.mask_dropout < 1:
            raise ValueError(f"mask_dropout must be in [0, 1), got {self.mask_dropout}")
        if self.n_anchors is not None and (not isinstance(self.n_anchors, int) or self.n_anchors < 1):
            raise ValueError(f"n_anchors must be None or an int >= 1, got {self.n_anchors!r}")
        if not 0 <= self.inject_alpha <= 1:
            raise ValueError(f"inject_alpha must be in [0, 1], got {self.inject_alpha}")
        if self.subject_masks not in ("attention", "all"):
            raise ValueError(f"subject_masks must be 'attention' or 'all', got {self.subject_masks!r}")
        if self.mask_window < 1:
            raise ValueError(f"mask_window must be >= 1, got {self.mask_window}")

    @classmethod
    def for_model(cls, name: str, **overrides) -> "ConsiStoryArgs":
        """The full method's settings for a registry model: the official ones on sdxl, scaled on the toy.

        SDXL: 32x32 masks and DIFT from `up_blocks.0`'s output (64x64x1280) smoothed by a 3x3 Gaussian, as official.
        SD1.5 and the toy (no official code): masks from every cross-attention layer and DIFT from `up_blocks.1`'s
        output, unsmoothed, the DIFT paper's choice on SD (its index 1); `up_blocks.0` there is an attention-free
        block at 1/32 of the image, too coarse for patch correspondences.

        Only the structure is scaled; dropout, query mixing and injection keep the official values. The toy has 7
        self-attention layers in all (SDXL's decoder alone has 36), so SDSA shares in every one of them, and all 4
        images of a set share with each other (the paper's SDSA; anchors are its optimisation for large sets).
        With the official structure the toy shows no gain (`benchmarks/consistory_toy.py`, "official/...").
        """
        base = {"toy": dict(share_layers="self", n_anchors=None, mask_resolutions=(16,)),
                "sdxl": dict(mask_resolutions=(32,), dift_layer="up_blocks.0", dift_sigma=1.0), "sd15": {}}.get(name)
        if base is None:
            raise ValueError(f"no ConsiStory defaults for {name!r}; known: toy, sdxl, sd15 (pass ConsiStoryArgs(...))")
        return replace(cls(), inject=True, **{**base, **overrides})


def ladder(full: ConsiStoryArgs) -> dict[str, ConsiStoryArgs]:
    """The paper's ablation ladder down from the full method's settings: vanilla, SDSA alone, + dropout and
    query mixing, + feature injection (full). Vanilla still tracks the subject masks (no image changes)."""
    sdsa = replace(full, sdsa=True, inject=False, mask_dropout=0.0, query_mix_fraction=0.0)
    return {"vanilla": replace(sdsa, sdsa=False), "sdsa": sdsa, "sdsa+diversity": replace(full, sdsa=True, inject=False),
            "full": replace(full, sdsa=True, inject=True)}


ABLATIONS = ladder(ConsiStoryArgs(inject=True))  # the paper's ladder with the official settings


@dataclass
class ConsiStoryOutput:
    images: np.ndarray
    masks: dict  # resolution -> (n, r, r) bool, at the end of generation
    masks_per_step: list  # (n, R, R) bool at the top SDSA resolution, as used at each step (None before masks)
    anchors: AnchorCache | None = None


class _MaskStore(AttentionProcessor):
    """Feeds the run's cross-attention store (on the mask layers only), except during the vanilla query pass."""
    needs_probs = True

    def __init__(self, run: ConsiStoryRun):
        super().__init__(run.state)
        self.run = run

    def edit_probs(self, call, probs):
        return probs if self.run.vanilla else self.run.masks.store.edit_probs(call, probs)


class ConsiStoryAttention(AttentionProcessor):
    """Self-attention with SDSA (share layers) and feature injection (inject layers)."""

    def __init__(self, run: ConsiStoryRun, share: set, inject: set):
        super().__init__(run.state)
        self.run, self.share, self.inject = run, share, inject

    def attend(self, call, q, k, v, mask):
        run, name = self.run, self.layer_name
        run.sizes[name] = call.height
        if name in self.share and run.vanilla:
            run.queries[name] = q
        elif name in self.share and run.sdsa_on():
            if mask is not None:
                raise NotImplementedError("SDSA with an attention mask on self-attention is not supported")
            return self.sdsa(call, q, k, v)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def sdsa(self, call, q, k, v):
        """softmax(Q_i [K_i ; K_anchors]ᵀ/√d + log M_i⁺) [V_i ; V_anchors], queries mixed in the early steps."""
        run, bank, step, name = self.run, self.run.anchors, self.run.state.step, self.layer_name
        if name in run.queries:
            s = run.schedule.mix_strength(step)
            q = s * run.queries.pop(name) + (1 - s) * q
        h, n, (B, H, P, d) = run.halves, run.n, k.shape
        key = (run.passno, name, step)
        if bank.cached is not None:  # new prompts against cached anchors: all cached tokens are visible
            ek, ev = (t.to(k.device) for t in bank.cached.kv[key])
            mask = None
        else:
            src = bank.sources
            if len(src) > n:
                raise ValueError(f"n_anchors={len(src)} exceeds the {n} prompts")
            allowed = (run.masks(call.height)[src].to(k.device)
                       & run.schedule.keep(step, call.height, len(src), k.device)).flatten()
            owner = torch.arange(len(src), device=k.device).repeat_interleave(P)[allowed]
            ek, ev = (cfg_halves(t, h)[:, src].transpose(1, 2).reshape(h, H, -1, d)[:, :, allowed] for t in (k, v))
            bank.save_kv(key, ek, ev)
            sees = owner[None, :] != torch.arange(n, device=k.device)[:, None]  # no image sees itself twice
            mask = torch.cat([torch.ones(n, P, dtype=torch.bool, device=k.device), sees], 1).repeat(h, 1)[:, None, None]
        expand = lambda e: e[:, None].expand(h, n, H, e.shape[-2], d).reshape(B, H, -1, d)  # every image of a half
        return extended_attention(q, k, v, expand(ek), expand(ev), mask=mask)

    def edit_output(self, call, out):
        """Feature injection into the conditional half only (as official); the unconditional half is untouched."""
        run, bank = self.run, self.run.anchors
        if run.vanilla or self.layer_name not in self.inject or not run.schedule.inject_on(run.state.step, run.passno):
            return out
        x, C = cfg_halves(out, run.halves), out.shape[2]  # (h, n, P, C)
        key = (run.passno, self.layer_name, run.state.step)
        if bank.cached is not None:
            src_out = bank.cached.out[key].to(out.device)
        else:
            src_out = x[-1, bank.sources]  # (S, P, C), the anchors' conditional outputs
            bank.save_out(key, src_out)
        if call.height not in bank.nn:
            return out
        idx, use = (t.to(out.device) for t in bank.nn[call.height])
        a = run.args.inject_alpha
        cond = torch.where(use[..., None], a * src_out.reshape(-1, C)[idx] + (1 - a) * x[-1], x[-1])
        return torch.cat([x[:-1], cond[None]]).reshape(out.shape)


@contextmanager
def consistory(unet, run: ConsiStoryRun):
    """Install SDSA / injection processors, the mask store and the step hooks; restore the UNet on exit."""
    a = run.args
    names = attention_names(unet)
    share_pats = (a.share_layers,) if isinstance(a.share_layers, str) else tuple(a.share_layers)
    share = set(select_many(names, share_pats, unet))
    if a.inject_layers is None:
        selfs = [x for x in names if x.endswith("attn1")]
        top = max(resolution(unet, x) for x in selfs)
        inject = {x for x in selfs if resolution(unet, x) == top}
    else:
        inject = set(select_many(names, a.inject_layers, unet))
    if any(x.endswith("attn2") for x in share | inject):
        raise ValueError("ConsiStory shares and injects in self-attention (attn1) only; the patterns chose attn2")
    cross = [x for x in names if x.endswith("attn2")]
    have = sorted({resolution(unet, x) for x in cross})
    if a.mask_resolutions is not None and (missing := sorted(set(a.mask_resolutions) - set(have))):
        raise ValueError(f"mask_resolutions={a.mask_resolutions}: this UNet has no cross-attention at {missing} "
                         f"(its cross-attention resolutions: {have}); masks would never form and ConsiStory would "
                         f"silently be vanilla. Use ConsiStoryArgs.for_model(<this model>) or mask_resolutions={tuple(have)}")
    masked = [x for x in cross if a.mask_resolutions is None or resolution(unet, x) in a.mask_resolutions]
    run.share, run.injected = share, inject
    inject = inject if a.inject else set()
    proc, store = ConsiStoryAttention(run, share, inject), _MaskStore(run)
    with ExitStack() as stack:
        stack.enter_context(patch_attention(unet, {**{x: proc for x in share | inject}, **{x: store for x in masked}}))
        stack.enter_context(track_steps(unet, run.state))
        stack.enter_context(unet.register_forward_pre_hook(run.pre_hook, with_kwargs=True))
        yield run


@torch.no_grad()
def generate(pipe, prompts: list[str], subject_words: list[str] | str, args: ConsiStoryArgs | None = None,
             seeds: list[int] | None = None, anchors: AnchorCache | None = None, cache_anchors: bool | str = False,
             num_inference_steps: int = 20, guidance_scale: float = 5.0, size: int | None = None,
             **overrides) -> ConsiStoryOutput:
    """Generate `prompts` with one consistent subject; images 0..n_anchors-1 are the anchors.

    `anchors`: an `AnchorCache` from an earlier call with `cache_anchors=True`; then every prompt is a new image
    that sees only the cached anchors (the anchors are not recomputed); `cache_anchors="cpu"` keeps that cache in
    host memory (official `--cache_cpu_offloading`: on SDXL it holds GBs). `seeds`: one per image (default 0..n-1).
    `size`: square image side in pixels (default: the model's). Decoding goes through `decode_latents`, in
    batches that fit (SDXL's VAE runs in fp32).
    """
    halves = 2 if guidance_scale > 1 else 1
    args, words, seeds = _checked(prompts, subject_words, args, seeds, anchors, cache_anchors, num_inference_steps,
                                  halves, overrides)
    tok = [[token_index(pipe.tokenizer, p, w) for w in words] for p in prompts]
    size = size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    latents = seeded_latents(pipe, seeds, size, size).to(pipe.device, pipe.unet.dtype)
    pipe.scheduler.set_timesteps(num_inference_steps)
    dift_step = int(torch.argmin((pipe.scheduler.timesteps.float() - args.dift_timestep).abs()))
    run = ConsiStoryRun(args, tok, num_inference_steps, halves, anchors, cache_anchors if anchors is None else False)
    denoise = lambda run, dift=None: _denoise(pipe, run, prompts, latents, size, guidance_scale, dift)
    dift = first_masks = None
    if args.inject:  # pass 1: SDSA alone, and the DIFT features that say where pass 2 injects from
        _, dift = denoise(run, (args.dift_layer, dift_step))
        dift = dift[-len(prompts):]  # conditional half
        dift = dift if args.dift_sigma is None else gaussian_smooth(dift, args.dift_sigma)
        first_masks = {r: run.masks(r) for r in run.inject_res}
        correspondences(run, dift, run.inject_res)
        run = run.next_pass()
    images, _ = denoise(run)  # the output pass: SDSA, and feature injection after pass 1
    masks = {r: run.masks(r).view(run.n, r, r) for r in sorted({run.top_res, *run.inject_res})} \
        if run.masks.history else {}
    return ConsiStoryOutput(images, masks, run.masks_per_step, run.anchors.cache(run, images, dift, first_masks))


def _checked(prompts, subject_words, args, seeds, anchors, cache_anchors, n_steps, halves, overrides):
    """`generate`'s inputs, validated: (args with the overrides, subject words as a list, one seed per prompt)."""
    valid = {f.name for f in fields(ConsiStoryArgs)}
    if unknown := set(overrides) - valid:
        raise ValueError(f"unknown ConsiStory options {sorted(unknown)}; allowed: {sorted(valid)}")
    args = replace(args or ConsiStoryArgs(), **overrides)
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a non-empty list of str")
    words = [subject_words] if isinstance(subject_words, str) else subject_words
    if not isinstance(words, (list, tuple)) or not words or not all(isinstance(w, str) for w in words):
        raise TypeError("subject_words must be a str or a non-empty list of str (words present in every prompt)")
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
    if cache_anchors not in (False, True, "cpu"):
        raise ValueError(f"cache_anchors must be False, True or 'cpu', got {cache_anchors!r}")
    if anchors is not None:
        if not isinstance(anchors, AnchorCache):
            raise TypeError(f"anchors must be an AnchorCache, got {type(anchors).__name__}")
        if (anchors.n_steps, anchors.halves) != (n_steps, halves) or anchors.args != args:
            raise ValueError("the anchors were made with other steps / guidance / args; allowed: the same as theirs")
    elif args.sdsa and args.n_anchors is not None and args.n_anchors > len(prompts):
        raise ValueError(f"n_anchors={args.n_anchors} exceeds the {len(prompts)} prompts")
    return args, words, seeds


def _denoise(pipe, run: ConsiStoryRun, prompts, latents, size, guidance_scale, dift=None):
    """One pass of the pipeline under `run`: images in [0, 1], and with dift=(block, step) that block's output."""
    with consistory(pipe.unet, run), ExitStack() as stack:
        feats = stack.enter_context(capture(pipe.unet, [dift[0]], steps=[dift[1]], state=run.state, offload=None)) \
            if dift else None
        out = pipe(list(prompts), latents=latents, num_inference_steps=run.n_steps, height=size, width=size,
                   guidance_scale=guidance_scale, output_type="latent").images
        images = decode_latents(pipe, out, rounded=False) / 255
    run.end_step()
    return images, feats.get(*dift) if dift else None


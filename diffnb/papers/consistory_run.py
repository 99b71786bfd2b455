"""ConsiStory's state during one denoising pass, in named parts; `consistory.py` holds the method that uses them.

- `Schedule`: when SDSA, query mixing, token dropout and feature injection act (pure functions of args and step);
- `SubjectMasks`: the subject words' cross-attention folded over the steps into Otsu masks per resolution;
- `AnchorBank`: what the anchors give the other images: which images they are, their recorded keys/values and
  outputs (an `AnchorCache` replays them in a later call), and feature injection's nearest-neighbour tables
  (`correspondences`, from DIFT features);
- `ConsiStoryRun`: one pass tying these to the step counter, with the vanilla-query pass as a step of its own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ..hooks import CrossAttentionStore
from ..metrics import otsu_mask, otsu_threshold
from ..processors import RunState

if TYPE_CHECKING:
    from .consistory import ConsiStoryArgs


@dataclass
class AnchorCache:
    """What new prompts need from the anchors: kept subject keys/values per (pass, layer, step), their
    conditional-half outputs at the injection steps, their DIFT features and final masks. Tensors stay on the
    model's device."""
    n_anchors: int
    n_steps: int
    halves: int
    args: ConsiStoryArgs
    kv: dict = field(default_factory=dict)
    out: dict = field(default_factory=dict)
    dift: torch.Tensor | None = None  # (n_anchors, C, s, s)
    masks: dict = field(default_factory=dict)  # resolution -> (n_anchors, r*r) bool, end of pass 1
    images: np.ndarray | None = None


@dataclass(frozen=True)
class Schedule:
    """When each part of the method acts: pure functions of the args, the run's length, the step and the pass."""
    args: ConsiStoryArgs
    n_steps: int

    def sdsa_on(self, step: int, have_masks: bool) -> bool:
        """SDSA from `sdsa_start` on, once there are subject masks to share through."""
        return self.args.sdsa and step >= self.args.sdsa_start and have_masks

    def mix_strength(self, step: int) -> float | None:
        """v_t of the query mixing, linear over steps 0 .. n_steps·fraction; None: no mixing at this step."""
        last = int(self.n_steps * self.args.query_mix_fraction)
        if self.args.query_mix_fraction <= 0 or step > last:
            return None
        a, b = self.args.query_mix_strength
        return a + (b - a) * step / max(last, 1)

    def inject_on(self, step: int, passno: int) -> bool:
        """Feature injection acts in the second pass only, on steps n·lo .. n·hi."""
        lo, hi = self.args.inject_fraction
        return passno == 2 and int(self.n_steps * lo) <= step <= int(self.n_steps * hi)

    def keep(self, step: int, r: int, s: int, device) -> torch.Tensor:
        """(s, r*r) dropout draw for the shared tokens, a function of (seed, step, resolution) only."""
        if self.args.mask_dropout == 0:
            return torch.ones(s, r * r, dtype=torch.bool, device=device)
        g = torch.Generator().manual_seed(self.args.dropout_seed * 1_000_003 + step * 1009 + r)
        return (torch.rand(s, r * r, generator=g, device="cpu") >= self.args.mask_dropout).to(device)


class SubjectMasks:
    """Subject masks over the steps. `_MaskStore` feeds `store` with the mask layers' cross-attention; `end_step`
    folds the finished step's subject-word maps into `history`; `masks(r)` is then (lazily, per side r) the union
    over words of Otsu(mean of the last `mask_window` steps); `per_step` records the masks each step used."""

    def __init__(self, args: ConsiStoryArgs, token_ids: list[list[list[int]]]):
        self.args, self.token_ids, self.n = args, token_ids, len(token_ids)
        self.store = CrossAttentionStore()  # fed only by the mask layers (`consistory` picks them)
        self.history, self.per_step, self._by_side = [], [], {}

    @property
    def ready(self) -> bool:
        return self.args.subject_masks == "all" or bool(self.history)

    def end_step(self):
        """Fold the finished step's cross-attention into the history; masks are then rebuilt lazily."""
        if not self.store.sums:
            return
        maps = self.store.maps()[-self.n:]  # (n, R, R, tokens), conditional half
        heat = torch.stack([torch.stack([maps[i, ..., ids].mean(-1) for ids in words], -1)
                            for i, words in enumerate(self.token_ids)])
        self.history.append(heat)
        self.store.reset()
        self._by_side = {}

    def __call__(self, r: int) -> torch.Tensor:
        """(n, r*r) bool: union over subject words of Otsu(mean heat of the last `mask_window` steps)."""
        if self.args.subject_masks == "all":
            return torch.ones(self.n, r * r, dtype=torch.bool, device="cpu")
        if r not in self._by_side:
            heat = torch.stack(self.history[-self.args.mask_window:]).mean(0).permute(0, 3, 1, 2)
            heat = F.interpolate(heat, size=(r, r), mode="bilinear", align_corners=False)
            m = np.stack([np.any([otsu_mask(h) for h in img], 0) for img in heat.numpy()])
            self._by_side[r] = torch.from_numpy(m).reshape(self.n, r * r)
        return self._by_side[r]

    def record(self, r: int | None):
        """Keep the (n, r, r) masks this step uses (None before the first step's maps or any shared layer)."""
        self.per_step.append(self(r).view(self.n, r, r).clone() if self.history and r else None)


class AnchorBank:
    """The anchors' side of sharing. Live: the first `n_anchors` images are the sources, and when recording, their
    kept keys/values and conditional outputs are saved per (pass, layer, step) for an `AnchorCache`. Replayed: a
    cache from an earlier call stands in for them. `nn`: feature injection's tables, side -> (source patch, use)."""

    def __init__(self, args: ConsiStoryArgs, n: int, cached: AnchorCache | None = None, record: bool | str = False):
        self.cached, self.record = cached, bool(record)
        self.keep_on = "cpu" if record == "cpu" else None  # where the recordings live (None: the model's device)
        self.sources = list(range(n if args.n_anchors is None else args.n_anchors))
        self.kv, self.out, self.nn = {}, {}, {}

    def _put(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.keep_on) if self.keep_on else t

    def save_kv(self, key, k: torch.Tensor, v: torch.Tensor):
        if self.record:
            self.kv[key] = (self._put(k), self._put(v))

    def save_out(self, key, out: torch.Tensor):
        if self.record:
            self.out[key] = self._put(out)

    def cache(self, run: "ConsiStoryRun", images, dift, first_masks) -> AnchorCache | None:
        """What the anchors leave for later calls, when recording: the recordings, DIFT features and pass-1 masks."""
        if not self.record:
            return None
        k = len(self.sources)
        return AnchorCache(k, run.n_steps, run.halves, run.args, self.kv, self.out, None if dift is None else dift[:k],
                           {} if first_masks is None else {r: m[:k] for r, m in first_masks.items()}, images[:k])


class ConsiStoryRun:
    """One denoising pass as the processors and the UNet pre-hook share it: the step (`state`), the `schedule`, the
    subject `masks`, the `anchors` bank and the vanilla-query pass. The injection pass is a new run (`next_pass`)."""

    def __init__(self, args: ConsiStoryArgs, token_ids: list[list[list[int]]], n_steps: int, halves: int,
                 anchors: AnchorCache | None = None, record: bool | str = False, passno: int = 1):
        self.args, self.n_steps, self.halves, self.passno = args, n_steps, halves, passno
        self.n = len(token_ids)
        self.state, self.schedule = RunState(), Schedule(args, n_steps)
        self.masks = SubjectMasks(args, token_ids)
        self.anchors = AnchorBank(args, self.n, anchors, record)
        self.vanilla, self.queries = False, {}  # inside the vanilla-query pass; its queries per share layer
        self.share, self.injected, self.sizes, self._last = set(), set(), {}, None  # sizes: layer -> side as run

    def next_pass(self) -> "ConsiStoryRun":
        """The injection pass: a fresh step count and fresh masks; the anchor bank (its recordings and
        correspondences) carries over."""
        nxt = ConsiStoryRun(self.args, self.masks.token_ids, self.n_steps, self.halves, passno=self.passno + 1)
        nxt.anchors, nxt.share, nxt.injected, nxt.sizes = self.anchors, self.share, self.injected, self.sizes
        return nxt

    @property
    def top_res(self) -> int | None:
        """Side of the largest shared feature map as run (nominal sizes differ at other image sizes)."""
        return max((self.sizes[x] for x in self.share if x in self.sizes), default=None)

    @property
    def inject_res(self) -> list[int]:
        return sorted({self.sizes[x] for x in self.injected if x in self.sizes})

    @property
    def masks_per_step(self) -> list:
        return self.masks.per_step

    def sdsa_on(self) -> bool:
        return self.schedule.sdsa_on(self.state.step, self.masks.ready)

    def end_step(self):
        """Fold the last step's cross-attention into the masks (the pre-hook does it for every earlier step)."""
        self.masks.end_step()

    def pre_hook(self, unet, args, kwargs):
        """Runs after `track_steps`: at a new step, fold the finished step's masks, run the vanilla-query pass when
        this step mixes queries, and record the masks the step uses."""
        if self.state.step == self._last:
            return
        self._last = self.state.step
        self.masks.end_step()
        self.queries = {}
        if self.sdsa_on() and self.schedule.mix_strength(self.state.step) is not None:
            self.vanilla_queries(unet, args, kwargs)
        self.masks.record(self.top_res)

    def vanilla_queries(self, unet, args, kwargs):
        """The vanilla-query pass: the same UNet call once more without sharing, so that every share layer keeps its
        vanilla queries in `queries` for the mixing Q* = v_t Q_vanilla + (1 - v_t) Q_SDSA. `unet.forward` skips the
        UNet's hooks (no step is counted) and `_MaskStore` ignores it (no cross-attention is stored)."""
        self.vanilla = True
        try:
            unet.forward(*args, **kwargs)
        finally:
            self.vanilla = False


def nearest_subject_patches(target, source, source_mask, same=None):
    """Cosine nearest neighbour of every target patch among the sources' patches.

    target (n, C, P), source (S, C, P), source_mask (S, P) bool; a source patch outside its mask is at distance 2
    (the largest cosine distance, as official); `same[i] = j` when target i is source j (excluded: infinite
    distance, as an image is not its own source). Returns the index into S*P and the cosine distance, both (n, P).
    """
    dist = 1 - torch.einsum("ncp,scq->npsq", F.normalize(target.float(), dim=1), F.normalize(source.float(), dim=1))
    dist = dist.masked_fill(~source_mask[None, None].to(dist.device), 2.0)
    for i, j in (same or {}).items():
        dist[i, :, j] = math.inf
    best, idx = dist.flatten(2).min(-1)
    return idx, best


def gaussian_smooth(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """3x3 Gaussian per channel of (B, C, H, W), zero padding: the official smoothing of its DIFT features."""
    g = torch.exp(-torch.tensor([-1.0, 0.0, 1.0], device=x.device) ** 2 / (2 * sigma**2))
    k = (g[:, None] * g[None]) / (g.sum() ** 2)
    return F.conv2d(x.float(), k.expand(x.shape[1], 1, 3, 3), padding=1, groups=x.shape[1])


def correspondences(run: ConsiStoryRun, feats: torch.Tensor, resolutions):
    """DIFT maps per injection resolution: which source patch each image's patch takes, and where to inject.

    Sources: the run's anchors, or the cached anchors' features and pass-1 masks. Injection happens where the target
    patch is in its subject mask AND its nearest-neighbour distance is below the threshold; the 'dynamic' threshold
    (official) is Otsu over the distances of ALL the image's patches.
    """
    bank = run.anchors
    for r in resolutions:
        tgt = F.interpolate(feats.float(), size=(r, r), mode="bilinear", align_corners=False).flatten(2)
        if bank.cached is None:
            src_ids = bank.sources
            src, smask, same = tgt[src_ids], run.masks(r)[src_ids], {j: t for t, j in enumerate(src_ids)}
        else:
            src = F.interpolate(bank.cached.dift.float(), size=(r, r), mode="bilinear", align_corners=False).flatten(2)
            smask, same = bank.cached.masks[r], None
        idx, dist = nearest_subject_patches(tgt, src, smask, same)
        thr = [run.args.dift_threshold if run.args.dift_threshold is not None  # per image, as official
               else otsu_threshold(d) if torch.isfinite(d).all() else -math.inf for d in dist]
        below = dist < torch.tensor(thr, device=dist.device)[:, None]
        bank.nn[r] = (idx, run.masks(r).to(dist.device) & below)

"""Diffusion Hyperfeatures, measured: nearest-neighbour keypoint matching, PCK, and the paper's baselines.

Matching for PCK is at image resolution (each source keypoint against every target pixel centre); a match counts
within alpha x the larger side of the target image (PCK_img) or of its bounding box (PCK_bbox). Baselines: one raw
(layer, step), the concatenation of every (layer, step) (ours: each L2-normalised first), and pixel colour patches.

    hfe.evaluate(hf.describe(net, test.features), test.pairs)   # {"pck_img": ..., "pck_bbox": ..., "n": ...}
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..images import to_tensor_image
from ..metrics import pck
from .hyperfeatures import Hyperfeatures
from .hyperfeatures_train import PairFeatures, pair_features


def sample_descriptors(desc: torch.Tensor, kps, hw) -> torch.Tensor:
    """(D, h, w) descriptor map of an image of size hw=(H, W) -> (K, D), bilinear at keypoints (x, y)."""
    kps = torch.as_tensor(np.asarray(kps), dtype=desc.dtype, device=desc.device)
    grid = torch.stack([2 * kps[:, 0] / hw[1] - 1, 2 * kps[:, 1] / hw[0] - 1], -1).view(1, 1, -1, 2)
    return F.grid_sample(desc[None], grid, mode="bilinear", align_corners=False)[0, :, 0].T



def match_keypoints(src_desc, trg_desc, src_kps, src_hw, trg_hw) -> np.ndarray:
    """Nearest neighbours: each source keypoint -> the target pixel centre of highest cosine, after upsampling the
    target map to the image size. Returns (K, 2) x, y."""
    q = F.normalize(sample_descriptors(src_desc.float(), src_kps, src_hw), dim=-1)
    t = F.normalize(F.interpolate(trg_desc[None].float(), size=tuple(trg_hw), mode="bilinear", align_corners=False)[0],
                    dim=0)
    return _argmax_xy(torch.einsum("kd,dhw->khw", q, t))


def _argmax_xy(sim: torch.Tensor) -> np.ndarray:
    """(K, H, W) scores -> (K, 2) x, y of each row's best pixel centre."""
    best = sim.flatten(1).argmax(1).cpu()
    w = sim.shape[-1]
    return np.stack([(best % w).numpy() + 0.5, (best // w).numpy() + 0.5], axis=1)


def predict(descriptors, pairs) -> list[np.ndarray]:
    """`match_keypoints` of every pair; `descriptors[2i]`, `[2i+1]`: (D, h, w) maps of pair i's source and target."""
    if len(descriptors) != 2 * len(pairs):
        raise ValueError(f"{len(pairs)} pairs need {2 * len(pairs)} descriptor maps, got {len(descriptors)}")
    return [match_keypoints(descriptors[2 * i], descriptors[2 * i + 1], p.src_kps, p.src_image.shape[:2],
                            p.trg_image.shape[:2]) for i, p in enumerate(pairs)]


def score(predictions, pairs, alpha: float = 0.1) -> dict:
    """PCK@alpha pooled over keypoints, thresholds alpha*max(image H, W) and alpha*max(bbox h, w) of the target."""
    box = pair_hits(predictions, pairs, alpha)  # checks alpha and the lengths
    img = [pck(q, p.trg_kps, alpha * max(p.trg_image.shape[:2])) for q, p in zip(predictions, pairs)]
    return {"pck_img": float(np.concatenate(img).mean()), "pck_bbox": float(np.concatenate(box).mean()),
            "n": int(sum(len(b) for b in box))}


def pair_hits(predictions, pairs, alpha: float = 0.1) -> list[np.ndarray]:
    """Per pair, per keypoint: within alpha*max(bbox h, w) of the target? (PCK@alpha bbox, unpooled: the unit a
    paired bootstrap over pairs resamples.)"""
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    if len(predictions) != len(pairs):
        raise ValueError(f"{len(pairs)} pairs need {len(pairs)} predictions, got {len(predictions)}")
    return [pck(q, p.trg_kps, alpha * max(p.trg_bbox[2:] - p.trg_bbox[:2])) for q, p in zip(predictions, pairs)]


def pck_gain(hits, base_hits) -> dict:
    """PCK (bbox, at the alpha the hits used) points of one matcher minus another's on the same pairs (`pair_hits`
    of each), pooled over keypoints, with a 95 % interval that resamples whole pairs (a pair's keypoints are not
    independent)."""
    from ..premises import bootstrap_ci

    if len(hits) != len(base_hits) or any(len(a) != len(b) for a, b in zip(hits, base_hits)):
        raise ValueError("pck_gain needs the pair_hits of two matchers on the same pairs")
    groups = list(zip(hits, base_hits))
    gain = lambda g: 100 * (sum(a.sum() for a, _ in g) - sum(b.sum() for _, b in g)) / max(1, sum(len(a) for a, _ in g))
    lo, hi = bootstrap_ci(groups, gain)
    return {"gain": float(gain(groups)), "low": lo, "high": hi, "pairs": len(groups)}


def evaluate(descriptors, pairs, alpha: float = 0.1) -> dict:
    """PCK@alpha (`score`) of nearest-neighbour matches (`predict`) on descriptor maps [src_0, trg_0, src_1, ...]."""
    return score(predict(descriptors, pairs), pairs, alpha)


def evaluate_streamed(pipe, pairs, methods: dict, batch_pairs: int = 4, alpha: float = 0.1, progress: bool = True,
                      keep_hits: bool = False, **kwargs) -> dict[str, dict]:
    """PCK of several matchers on pairs whose features (`pair_features(pipe, ..., **kwargs)`) are extracted
    `batch_pairs` at a time and dropped, so a held-out set need not fit in memory.
    `methods`: {name: fn(Hyperfeatures, pairs) -> list of (K, 2) predictions}, e.g. `concat_predict`.
    `keep_hits` adds each matcher's `pair_hits` ("hits"), for `pck_gain` between two of them."""
    pairs, preds = list(pairs), {k: [] for k in methods}
    for i in tqdm(range(0, len(pairs), batch_pairs), desc="held-out pairs", disable=not progress):
        chunk = pairs[i:i + batch_pairs]
        feats = pair_features(pipe, chunk, progress=False, **kwargs).features
        for k, fn in methods.items():
            preds[k] += fn(feats, chunk)
    return {k: {**score(v, pairs, alpha), **({"hits": pair_hits(v, pairs, alpha)} if keep_hits else {})}
            for k, v in preds.items()}


# --- baselines ------------------------------------------------------------------------------------------------
def layer_descriptors(feats: Hyperfeatures, layer: str, step: int) -> torch.Tensor:
    """One raw layer at one step: (N, C, h, w)."""
    return feats.select(steps=[step], layers=[layer]).maps[layer][:, 0]


def concat_predict(feats: Hyperfeatures, pairs) -> list[np.ndarray]:
    """The concatenation baseline's matches: every (layer, step) map L2-normalised per position (so no layer
    dominates by scale) and concatenated, whose cosine is the mean of the blocks' cosines. So it is accumulated one
    block at a time, each block's (K, h, w) cosine map upsampled to the target image: never all layers at one size
    (SD1.5 at the paper's settings: 85 GiB for 48 images)."""
    if len(feats) != 2 * len(pairs):
        raise ValueError(f"{len(pairs)} pairs need features of {2 * len(pairs)} images, got {len(feats)}")
    out = []
    for i, p in enumerate(pairs):
        sim = 0
        for v in feats.maps.values():
            for s in range(v.shape[1]):
                q = F.normalize(sample_descriptors(v[2 * i, s].float(), p.src_kps, p.src_image.shape[:2]), dim=-1)
                cos = torch.einsum("kc,chw->khw", q, F.normalize(v[2 * i + 1, s].float(), dim=0))
                sim = sim + F.interpolate(cos[None], size=p.trg_image.shape[:2], mode="bilinear", align_corners=False)[0]
        out.append(_argmax_xy(sim))
    return out


def pixel_descriptors(images, radius: int = 1) -> list[torch.Tensor]:
    """Colour baseline: the RGB of the (2r+1)^2 neighbourhood in [-1, 1] (signed, so cosine compares colours)."""
    if not isinstance(radius, int) or radius < 0:
        raise ValueError(f"radius must be an int >= 0, got {radius!r}")
    out = []
    for im in images:
        x = to_tensor_image(im).float()
        h, w = x.shape[-2:]
        out.append(F.unfold(F.pad(x, (radius,) * 4, mode="replicate"), 2 * radius + 1).view(-1, h, w))
    return out


def sweep_layers(data: PairFeatures, alpha: float = 0.1) -> dict[tuple[str, int], float]:
    """PCK@alpha (bbox) of every single raw (layer, step): pick the best on a training split."""
    return {(layer, s): evaluate(layer_descriptors(data.features, layer, s), data.pairs, alpha)["pck_bbox"]
            for layer in data.features.layers for s in data.features.steps}

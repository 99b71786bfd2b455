"""Diffusion Hyperfeatures on keypoint pairs: the pair record and the official training of the aggregation network.

Training (official): each source keypoint's descriptor against every position of the target's descriptor grid,
CLIP-style cross-entropy both ways, logit scale log(1/0.07) fixed; one pair a step, 5,000 steps. Ours, not official:
features are cached once (`pair_features`) and pairs re-drawn; keypoints fall in the grid cell that contains them
(official rounds an integer pixel index times the scale, up to a cell off).
Keypoints are continuous pixel coordinates (x, y): pixel (row r, col c) spans [c, c+1) x [r, r+1).

    data = pair_features(pipe, pairs, steps=[0, 4, 9, ..., 49], size=64)   # pairs: spair_pairs(...) or toy pairs
    train_aggregator(net, data, steps=5000)                                # net: hyperfeatures.AggregationNetwork
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .hyperfeatures import AggregationNetwork, Hyperfeatures, inversion_features

LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature; fixed (not learned) in the official training


@dataclass
class Pair:
    """Two images with matched keypoints (K, 2) as x, y and target/source boxes (x0, y0, x1, y1)."""
    src_image: np.ndarray
    trg_image: np.ndarray
    src_kps: np.ndarray
    trg_kps: np.ndarray
    src_bbox: np.ndarray
    trg_bbox: np.ndarray
    category: str = ""
    names: tuple = ()

    def __post_init__(self):
        for k in ("src_image", "trg_image"):
            if not isinstance(getattr(self, k), np.ndarray) or getattr(self, k).ndim != 3:
                raise TypeError(f"{k} must be an (H, W, 3) numpy array, got {type(getattr(self, k)).__name__}")
        for k in ("src_kps", "trg_kps", "src_bbox", "trg_bbox"):
            setattr(self, k, np.asarray(getattr(self, k), dtype=np.float64))
        if self.src_kps.ndim != 2 or self.src_kps.shape[1] != 2 or self.src_kps.shape != self.trg_kps.shape \
                or len(self.src_kps) < 1:
            raise ValueError(f"keypoints must be two (K, 2) arrays, K >= 1; got {self.src_kps.shape}, {self.trg_kps.shape}")
        for kps, im, side in ((self.src_kps, self.src_image, "src"), (self.trg_kps, self.trg_image, "trg")):
            if not np.isfinite(kps).all() or (kps < 0).any() or (kps > im.shape[1::-1]).any():
                raise ValueError(f"{side}_kps must be finite (x, y) inside the {im.shape[1]}x{im.shape[0]} image")
        if self.src_bbox.shape != (4,) or self.trg_bbox.shape != (4,) or (self.src_bbox[2:] <= self.src_bbox[:2]).any() \
                or (self.trg_bbox[2:] <= self.trg_bbox[:2]).any():
            raise ValueError(f"boxes must be (x0, y0, x1, y1) with x1 > x0, y1 > y0; got {self.src_bbox}, {self.trg_bbox}")
        self.names = tuple(self.names)
        if self.names and (len(self.names) != len(self.src_kps) or len(set(self.names)) != len(self.names)):
            raise ValueError(f"names must be empty or one distinct name per keypoint ({len(self.src_kps)}), "
                             f"got {self.names}")


@dataclass
class PairFeatures:
    """Pairs and the features of their images, laid out [src_0, trg_0, src_1, trg_1, ...]; or, with `rows`, pair i's
    source and target are feature rows rows[i] (`cross_pairs`: many pairs over the same cached images)."""
    pairs: list[Pair]
    features: Hyperfeatures
    rows: list[tuple[int, int]] | None = None

    def __post_init__(self):
        if self.rows is None:
            if len(self.features) != 2 * len(self.pairs):
                raise ValueError(f"{len(self.pairs)} pairs need features of {2 * len(self.pairs)} images, "
                                 f"got {len(self.features)}")
            self.rows = [(2 * i, 2 * i + 1) for i in range(len(self.pairs))]
        ok = lambda r: isinstance(r, (int, np.integer)) and not isinstance(r, bool) and 0 <= r < len(self.features)
        if len(self.rows) != len(self.pairs) or any(
                not isinstance(rc, (tuple, list)) or len(rc) != 2 or not all(map(ok, rc)) for rc in self.rows):
            raise ValueError(f"rows must give each of the {len(self.pairs)} pairs two int feature rows in "
                             f"[0, {len(self.features)}), got {self.rows[:4]}...")
        self.rows = [(int(a), int(b)) for a, b in self.rows]


def cross_pairs(data: PairFeatures, min_keypoints: int = 2) -> PairFeatures:
    """Every ordered pair of two different cached images of one category, keypoints matched by name (SPair's
    `kps_ids`, the toy's keypoint and object-point names): n pairs of one category become up to 2n(2n - 1) over the
    same features, no extraction more. Ours, not official (the official draws SPair's listed pairs): with a few dozen
    listed pairs re-drawn for 1,000 steps the aggregator learns them by heart (toy, 64 listed pairs: train PCK 98 vs
    held-out 81, benchmarks/results/hyperfeatures_toy_listed.json)."""
    if not isinstance(data, PairFeatures):
        raise TypeError(f"data must be PairFeatures, got {type(data).__name__}")
    if isinstance(min_keypoints, bool) or not isinstance(min_keypoints, int) or min_keypoints < 1:
        raise ValueError(f"min_keypoints must be an int >= 1, got {min_keypoints!r}")
    if any(not p.names or not p.category for p in data.pairs):
        raise ValueError("cross_pairs matches keypoints by name within a category: every pair needs `names` and "
                         "`category`")
    images = {}  # feature row -> (image, {name: (x, y)}, bbox, category); a row in several pairs pools its names
    for p, (a, b) in zip(data.pairs, data.rows):
        for row, im, kps, box in ((a, p.src_image, p.src_kps, p.src_bbox), (b, p.trg_image, p.trg_kps, p.trg_bbox)):
            images.setdefault(row, (im, {}, box, p.category))[1].update(zip(p.names, kps))
    pairs, rows = [], []
    for a, (im_a, kp_a, box_a, cat_a) in images.items():
        for b, (im_b, kp_b, box_b, cat_b) in images.items():
            names = tuple(k for k in kp_a if k in kp_b)
            # the same image on two rows (SPair lists an image in many pairs) would be a trivial identity match
            if a != b and cat_a == cat_b and len(names) >= min_keypoints and not np.array_equal(im_a, im_b):
                pairs.append(Pair(im_a, im_b, [kp_a[k] for k in names], [kp_b[k] for k in names], box_a, box_b,
                                  cat_a, names))
                rows.append((a, b))
    if not pairs:
        raise ValueError(f"no two images of one category share {min_keypoints} keypoint names")
    return PairFeatures(pairs, data.features, rows)


def pair_images(pairs) -> list[np.ndarray]:
    return [im for p in pairs for im in (p.src_image, p.trg_image)]


def pair_features(pipe, pairs, **kwargs) -> PairFeatures:
    """`inversion_features` of every pair's two images (kwargs go there)."""
    return PairFeatures(list(pairs), inversion_features(pipe, pair_images(pairs), **kwargs))


def keypoint_cells(kps, hw, grid, device=None) -> torch.Tensor:
    """Flat index (row * w + col) of the cell of an (h, w) grid laid over an image of size hw that contains each
    keypoint (x, y); the image's far edge goes to the last cell."""
    kps = np.asarray(kps, dtype=np.float64)
    col = np.clip(np.floor(kps[:, 0] * grid[1] / hw[1]), 0, grid[1] - 1)
    row = np.clip(np.floor(kps[:, 1] * grid[0] / hw[0]), 0, grid[0] - 1)
    return torch.as_tensor(row * grid[1] + col, dtype=torch.long, device=device or "cpu")


def correspondence_loss(src_desc, trg_desc, pair: Pair, logit_scale: float = LOGIT_SCALE) -> torch.Tensor:
    """The official objective: each source keypoint's grid cell against every cell of the target's (D, h, w) map
    (cosine x exp(logit_scale)), cross-entropy towards its match's cell; the same from target to source; the mean."""
    if not isinstance(pair, Pair):
        raise TypeError(f"pair must be a Pair, got {type(pair).__name__}")
    if src_desc.ndim != 3 or src_desc.shape != trg_desc.shape:
        raise ValueError(f"descriptor maps must be two (D, h, w) of one shape, got {tuple(src_desc.shape)}, "
                         f"{tuple(trg_desc.shape)}")
    grid = tuple(src_desc.shape[1:])
    s, t = F.normalize(src_desc.flatten(1), dim=0), F.normalize(trg_desc.flatten(1), dim=0)  # (D, h*w)
    i = keypoint_cells(pair.src_kps, pair.src_image.shape[:2], grid, s.device)
    j = keypoint_cells(pair.trg_kps, pair.trg_image.shape[:2], grid, s.device)
    scale = math.exp(logit_scale)
    return (F.cross_entropy(scale * s[:, i].T @ t, j) + F.cross_entropy(scale * t[:, j].T @ s, i)) / 2


def train_aggregator(net: AggregationNetwork, data: PairFeatures, steps: int, lr: float = 1e-3, batch_pairs: int = 1,
                     weight_decay: float = 0.0, seed: int = 0, progress: bool = True) -> list[float]:
    """AdamW for exactly `steps` steps on random pairs (official: 5,000 steps of one pair, lr 1e-3, no weight decay;
    it draws each pair once, we re-draw from the cached ones), on the network's device; the loss per step."""
    if not isinstance(net, AggregationNetwork):
        raise TypeError(f"net must be an AggregationNetwork, got {type(net).__name__}")
    if not isinstance(data, PairFeatures):
        raise TypeError(f"data must be PairFeatures (see pair_features), got {type(data).__name__}")
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in (steps, batch_pairs)):
        raise ValueError(f"steps and batch_pairs must be ints >= 1, got {steps!r}, {batch_pairs!r}")
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    gen, losses = torch.Generator("cpu").manual_seed(seed), []
    net.train()
    with torch.enable_grad():
        for _ in tqdm(range(steps), desc="train aggregator", disable=not progress):
            idx = torch.randint(len(data.pairs), (batch_pairs,), generator=gen, device="cpu").tolist()
            desc = net(data.features.batch([k for i in idx for k in data.rows[i]]))
            loss = sum(correspondence_loss(desc[2 * j], desc[2 * j + 1], data.pairs[i])
                       for j, i in enumerate(idx)) / len(idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
    net.eval()
    return torch.stack(losses).tolist()

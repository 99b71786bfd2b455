"""Diffusion Hyperfeatures (Luo et al., NeurIPS 2023): one per-pixel descriptor from every decoder layer x timestep.

Each decoder resnet's features (paper: the 12 `up_blocks.*.resnets.*`) at a subset of DDIM-inversion steps (paper: 11
of 50) go through a per-layer bottleneck shared across timesteps, to one size and dimension; learned softmax weights
over (timestep, layer) sum them. Training: a symmetric CLIP-style loss on matched keypoints of image pairs.

    data = pair_features(pipe, toy_pairs(40, "train"), steps=spaced_steps(50, 11))
    net = AggregationNetwork.for_features(data.features, projection_dim=384, output_size=64)
    train_aggregator(net, data, steps=5000)
    evaluate(describe(net, test.features), test.pairs)   # {"pck_img": ..., "pck_bbox": ..., "n": ...}
    net.mixing_weights()                                  # (timesteps, layers): which features it relies on

Keypoints are continuous pixel coordinates (x, y): pixel (row r, col c) spans [c, c+1) x [r, r+1).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..hooks import capture
from ..inversion import ddim_invert, to_tensor_image
from ..layers import select_many
from ..viz import to_uint8

LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature; fixed (not learned) in the official training
SITES = ("conv2", "block")
DECODER_RESNETS = "up_blocks.*.resnets.*"


def spaced_steps(num_inference_steps: int, count: int) -> list[int]:
    """`count` evenly spaced step indices, both ends included (paper: 11 of 50)."""
    if not 1 <= count <= num_inference_steps:
        raise ValueError(f"count must be in [1, {num_inference_steps}], got {count}")
    return sorted({int(round(s)) for s in np.linspace(0, num_inference_steps - 1, count)})


@dataclass
class Hyperfeatures:
    """Captured maps per resnet: (N images, S steps, C, h, w); steps ascend in noise (0 = least noisy)."""
    maps: dict[str, torch.Tensor]
    steps: list[int]  # inversion step index of each entry along S
    timesteps: list[int]  # scheduler timestep of each entry

    @property
    def layers(self) -> list[str]:
        return list(self.maps)

    @property
    def channels(self) -> dict[str, int]:
        return {k: v.shape[2] for k, v in self.maps.items()}

    def __len__(self):
        return next(iter(self.maps.values())).shape[0]

    def batch(self, index) -> dict[str, torch.Tensor]:
        return {k: v[index] for k, v in self.maps.items()}

    def select(self, steps=None, layers=None) -> "Hyperfeatures":
        """A subset (e.g. one step, for the paper's one-step ablation); unknown names or steps are a ValueError."""
        steps = self.steps if steps is None else [steps] if isinstance(steps, int) else list(steps)
        layers = self.layers if layers is None else [layers] if isinstance(layers, str) else list(layers)
        if bad := [s for s in steps if s not in self.steps] + [l for l in layers if l not in self.maps]:
            raise ValueError(f"not captured: {bad}; steps: {self.steps}, layers: {self.layers}")
        idx = [self.steps.index(s) for s in steps]
        return Hyperfeatures({l: self.maps[l][:, idx] for l in layers}, steps, [self.timesteps[i] for i in idx])


def _check_steps(steps, n: int) -> list[int]:
    steps = range(n) if steps is None else [steps] if isinstance(steps, int) else steps
    steps = sorted(set(steps))
    if not steps or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s < n for s in steps):
        raise ValueError(f"steps must be step indices in [0, {n}) (0 = least noisy), got {steps}")
    return [int(s) for s in steps]


def _resnets(unet, layers, site: str) -> tuple[list[str], list[str]]:
    """Resnet blocks selected by patterns, and the module to hook on each."""
    from diffusers.models.resnet import ResnetBlock2D

    if site not in SITES:
        raise ValueError(f"site must be one of {SITES}, got {site!r}")
    names = [n for n, _ in unet.named_modules() if n]
    chosen = [n for n in select_many(names, layers, unet) if isinstance(unet.get_submodule(n), ResnetBlock2D)]
    if not chosen:
        raise ValueError(f"layers {layers!r} select no resnet block; e.g. {DECODER_RESNETS!r}")
    return chosen, [f"{n}.conv2" if site == "conv2" else n for n in chosen]


def _collect(cache, names, hooks, cap_steps, size, dtype, last: int | None = None) -> dict[str, torch.Tensor]:
    out = {}
    for name, hook in zip(names, hooks):
        x = torch.stack([cache.get(hook, s) for s in cap_steps], dim=1)  # (B, S, C, h, w)
        x = x[-last:] if last else x
        if size:
            x = F.interpolate(x.flatten(0, 1).float(), size=(size, size), mode="bilinear", align_corners=False,
                              antialias=True).unflatten(0, x.shape[:2])
        out[name] = x.to(dtype) if dtype else x
    return out


def _images(images, size: int) -> torch.Tensor:
    """Images (list of PIL / uint8 HWC / [0,1] tensors, or a batch) -> (N, 3, size, size) floats in [0, 1]."""
    items = list(images) if isinstance(images, (list, tuple)) or (isinstance(images, np.ndarray) and images.ndim == 4) \
        else [images]
    if not items:
        raise ValueError("no images given")
    out = [F.interpolate(to_tensor_image(im).float(), size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False) for im in items]
    return ((torch.cat(out) + 1) / 2).clamp(0, 1)  # [0, 1]: unambiguous for ddim_invert's to_tensor_image


@torch.no_grad()
def inversion_features(pipe, images, layers=DECODER_RESNETS, steps=None, num_inference_steps: int = 50,
                       site: str = "conv2", size: int | None = None, image_size: int | None = None, prompt: str = "",
                       batch_size: int = 8, dtype: torch.dtype | None = None, progress: bool = True) -> Hyperfeatures:
    """Features of real images along their DDIM inversion (prompt "", no guidance, as the paper): one inversion per
    batch with `capture` hooks on the selected resnets at the selected steps.

    site="conv2" (default) takes the residual branch before the skip add, as the official code; "block" the block
    output, which also carries the skip (the previous layer and the encoder's features). `size` resizes every map
    per batch to size x size (memory: SD's 64x64 maps at 11 steps are large); `dtype` e.g. float16 halves it.
    """
    steps = _check_steps(steps, num_inference_steps)
    names, hooks = _resnets(pipe.unet, layers, site)
    x = _images(images, image_size or pipe.unet.config.sample_size * pipe.vae_scale_factor)
    parts = []
    for i in tqdm(range(0, len(x), batch_size), desc="inversion features", disable=not progress, leave=False):
        with capture(pipe.unet, hooks, steps=steps) as cache:
            inv = ddim_invert(pipe, image=x[i:i + batch_size], prompt=prompt, num_inference_steps=num_inference_steps,
                              progress=False)
        parts.append(_collect(cache, names, hooks, steps, size, dtype))
    maps = {n: torch.cat([p[n] for p in parts]) for n in names}
    return Hyperfeatures(maps, steps, [inv.timesteps[s] for s in steps])


@torch.no_grad()
def generation_features(pipe, prompt, layers=DECODER_RESNETS, steps=None, num_inference_steps: int = 50,
                        site: str = "conv2", size: int | None = None, dtype: torch.dtype | None = None,
                        **pipe_kwargs) -> tuple[np.ndarray, Hyperfeatures]:
    """Generate with `pipe` and keep the features of its own trajectory: (uint8 images, features).

    Generation walks the inversion's timesteps in reverse, so `steps` index like inversion steps (generation step
    i = inversion step n-1-i) and an aggregator trained on inversion features applies as is. Under classifier-free
    guidance the UNet batch is [uncond, cond]: the conditional half is kept.
    """
    steps = _check_steps(steps, num_inference_steps)
    names, hooks = _resnets(pipe.unet, layers, site)
    gen = [num_inference_steps - 1 - s for s in steps]
    with capture(pipe.unet, hooks, steps=gen) as cache:
        images = pipe(prompt, num_inference_steps=num_inference_steps, output_type="np", **pipe_kwargs).images
    images = to_uint8(np.asarray(images))
    maps = _collect(cache, names, hooks, gen, size, dtype, last=len(images))
    return images, Hyperfeatures(maps, steps, [int(cache.timesteps[g]) for g in gen])


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, c), c)


class Bottleneck(nn.Module):
    """ResNet bottleneck (1x1 -> 3x3 -> 1x1, GroupNorm, ReLU) with a 1x1 projected shortcut: C_in -> C_out."""

    def __init__(self, cin: int, cout: int, mid: int):
        super().__init__()
        conv = lambda a, b, k: nn.Sequential(nn.Conv2d(a, b, k, padding=k // 2, bias=False), _norm(b))
        self.conv1, self.conv2, self.conv3 = conv(cin, mid, 1), conv(mid, mid, 3), conv(mid, cout, 1)
        self.shortcut = conv(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        y = self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))
        return F.relu(y + self.shortcut(x))


class AggregationNetwork(nn.Module):
    """Per-layer bottlenecks (shared across timesteps) at output_size, mixed by softmax weights over (timestep, layer)
    initialised equal: the weights are the interpretable part (`mixing_weights`)."""

    def __init__(self, channels: dict[str, int], num_timesteps: int, projection_dim: int = 384, output_size: int = 64):
        super().__init__()
        if not isinstance(channels, dict) or not channels:
            raise TypeError("channels must be a non-empty dict {layer name: channels} (Hyperfeatures.channels)")
        if num_timesteps < 1 or projection_dim < 4 or output_size < 1:
            raise ValueError(f"need num_timesteps >= 1, projection_dim >= 4, output_size >= 1; got "
                             f"{num_timesteps}, {projection_dim}, {output_size}")
        self.layers, self.num_timesteps, self.output_size = list(channels), num_timesteps, output_size
        self.bottlenecks = nn.ModuleList(Bottleneck(c, projection_dim, projection_dim // 4) for c in channels.values())
        self.mixing = nn.Parameter(torch.ones(num_timesteps * len(channels)))

    @classmethod
    def for_features(cls, feats: Hyperfeatures, **kwargs) -> "AggregationNetwork":
        return cls(feats.channels, len(feats.steps), **kwargs)

    def mixing_weights(self) -> torch.Tensor:
        """(timesteps, layers) weights summing to 1, for a heat map."""
        return self.mixing.softmax(0).view(self.num_timesteps, len(self.layers))

    def forward(self, feats) -> torch.Tensor:
        """{layer: (B, S, C, h, w)} (or Hyperfeatures) -> (B, projection_dim, output_size, output_size)."""
        feats = feats.maps if isinstance(feats, Hyperfeatures) else feats
        if missing := [l for l in self.layers if l not in feats]:
            raise ValueError(f"features lack layers {missing}; the network was built for {self.layers}")
        w, size, out = self.mixing_weights(), (self.output_size,) * 2, 0
        for j, (name, block) in enumerate(zip(self.layers, self.bottlenecks)):
            x = feats[name]
            if x.ndim != 5 or x.shape[1] != self.num_timesteps:
                raise ValueError(f"{name}: expected (B, {self.num_timesteps}, C, h, w), got {tuple(x.shape)}")
            b, s = x.shape[:2]
            x = F.interpolate(x.flatten(0, 1).to(self.mixing.dtype), size=size, mode="bilinear", align_corners=False)
            out = out + (block(x).unflatten(0, (b, s)) * w[:, j].view(1, s, 1, 1, 1)).sum(1)
        return out


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
        for k in ("src_kps", "trg_kps", "src_bbox", "trg_bbox"):
            setattr(self, k, np.asarray(getattr(self, k), dtype=np.float64))
        if self.src_kps.ndim != 2 or self.src_kps.shape[1] != 2 or self.src_kps.shape != self.trg_kps.shape \
                or len(self.src_kps) < 1:
            raise ValueError(f"keypoints must be two (K, 2) arrays, K >= 1; got {self.src_kps.shape}, {self.trg_kps.shape}")
        if self.src_bbox.shape != (4,) or self.trg_bbox.shape != (4,):
            raise ValueError("boxes must be (x0, y0, x1, y1)")


@dataclass
class PairFeatures:
    """Pairs and the features of their images, laid out [src_0, trg_0, src_1, trg_1, ...]."""
    pairs: list[Pair]
    features: Hyperfeatures

    def __post_init__(self):
        if len(self.features) != 2 * len(self.pairs):
            raise ValueError(f"{len(self.pairs)} pairs need features of {2 * len(self.pairs)} images, got {len(self.features)}")


def pair_images(pairs) -> list[np.ndarray]:
    return [im for p in pairs for im in (p.src_image, p.trg_image)]


def pair_features(pipe, pairs, **kwargs) -> PairFeatures:
    """`inversion_features` of every pair's two images (kwargs go there)."""
    return PairFeatures(list(pairs), inversion_features(pipe, pair_images(pairs), **kwargs))


def sample_descriptors(desc: torch.Tensor, kps, hw) -> torch.Tensor:
    """(D, h, w) descriptor map of an image of size hw=(H, W) -> (K, D), bilinear at keypoints (x, y)."""
    kps = torch.as_tensor(np.asarray(kps), dtype=desc.dtype, device=desc.device)
    grid = torch.stack([2 * kps[:, 0] / hw[1] - 1, 2 * kps[:, 1] / hw[0] - 1], -1).view(1, 1, -1, 2)
    return F.grid_sample(desc[None], grid, mode="bilinear", align_corners=False)[0, :, 0].T


def correspondence_loss(src_desc, trg_desc, pair: Pair, logit_scale: float = LOGIT_SCALE) -> torch.Tensor:
    """Symmetric cross-entropy: source keypoint i must pick target keypoint i among the pair's, and back."""
    a = F.normalize(sample_descriptors(src_desc, pair.src_kps, pair.src_image.shape[:2]), dim=-1)
    b = F.normalize(sample_descriptors(trg_desc, pair.trg_kps, pair.trg_image.shape[:2]), dim=-1)
    logits, labels = a @ b.T * math.exp(logit_scale), torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def train_aggregator(net: AggregationNetwork, data: PairFeatures, steps: int, lr: float = 1e-3, batch_pairs: int = 1,
                     weight_decay: float = 0.0, seed: int = 0, max_seconds: float | None = None,
                     progress: bool = True) -> list[float]:
    """AdamW on random pairs (official: one pair a step, lr 1e-3, no weight decay); returns the loss per step."""
    if not isinstance(data, PairFeatures):
        raise TypeError(f"data must be PairFeatures (see pair_features), got {type(data).__name__}")
    if steps < 1 or batch_pairs < 1:
        raise ValueError(f"steps and batch_pairs must be >= 1, got {steps}, {batch_pairs}")
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    gen, start, losses = torch.Generator().manual_seed(seed), time.perf_counter(), []
    net.train()
    for _ in tqdm(range(steps), desc="train aggregator", disable=not progress, leave=False):
        idx = torch.randint(len(data.pairs), (batch_pairs,), generator=gen).tolist()
        desc = net(data.features.batch([k for i in idx for k in (2 * i, 2 * i + 1)]))
        loss = sum(correspondence_loss(desc[2 * j], desc[2 * j + 1], data.pairs[i]) for j, i in enumerate(idx)) / len(idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            break
    net.eval()
    return losses


@torch.no_grad()
def describe(net: AggregationNetwork, feats: Hyperfeatures, batch_size: int = 16) -> torch.Tensor:
    """Hyperfeature maps of every image: (N, projection_dim, output_size, output_size)."""
    return torch.cat([net(feats.batch(slice(i, i + batch_size))) for i in range(0, len(feats), batch_size)])


def match_keypoints(src_desc, trg_desc, src_kps, src_hw, trg_hw) -> np.ndarray:
    """Nearest neighbours: each source keypoint -> the target pixel centre of highest cosine, after upsampling the
    target map to the image size. Returns (K, 2) x, y."""
    q = F.normalize(sample_descriptors(src_desc.float(), src_kps, src_hw), dim=-1)
    t = F.normalize(F.interpolate(trg_desc[None].float(), size=tuple(trg_hw), mode="bilinear", align_corners=False)[0],
                    dim=0)
    best = torch.einsum("kd,dhw->khw", q, t).flatten(1).argmax(1)
    w = trg_hw[1]
    return np.stack([(best % w).numpy() + 0.5, (best // w).numpy() + 0.5], axis=1)


def pck(pred, gt, threshold) -> np.ndarray:
    """Per keypoint: is the prediction within `threshold` pixels (scalar or per keypoint) of the truth?"""
    return np.linalg.norm(np.asarray(pred, float) - np.asarray(gt, float), axis=-1) <= threshold


def evaluate(descriptors, pairs, alpha: float = 0.1) -> dict:
    """PCK@alpha pooled over keypoints, thresholds alpha*max(image H, W) and alpha*max(bbox h, w) of the target.
    `descriptors[2i]`, `[2i+1]`: (D, h, w) maps of pair i's source and target."""
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    if len(descriptors) != 2 * len(pairs):
        raise ValueError(f"{len(pairs)} pairs need {2 * len(pairs)} descriptor maps, got {len(descriptors)}")
    img, box = [], []
    for i, p in enumerate(pairs):
        pred = match_keypoints(descriptors[2 * i], descriptors[2 * i + 1], p.src_kps, p.src_image.shape[:2],
                               p.trg_image.shape[:2])
        img.append(pck(pred, p.trg_kps, alpha * max(p.trg_image.shape[:2])))
        box.append(pck(pred, p.trg_kps, alpha * max(p.trg_bbox[2:] - p.trg_bbox[:2])))
    return {"pck_img": float(np.concatenate(img).mean()), "pck_bbox": float(np.concatenate(box).mean()),
            "n": int(sum(len(b) for b in box))}


# --- baselines ------------------------------------------------------------------------------------------------
def layer_descriptors(feats: Hyperfeatures, layer: str, step: int) -> torch.Tensor:
    """One raw layer at one step: (N, C, h, w)."""
    return feats.select(steps=[step], layers=[layer]).maps[layer][:, 0]


def concat_descriptors(feats: Hyperfeatures, size: int | None = None) -> torch.Tensor:
    """Every (layer, step) map L2-normalised per pixel (so no layer dominates by scale), resized, concatenated."""
    size = size or max(v.shape[-1] for v in feats.maps.values())
    maps = [F.interpolate(F.normalize(v.float().flatten(0, 1), dim=1), size=(size, size), mode="bilinear",
                          align_corners=False).unflatten(0, v.shape[:2]).flatten(1, 2) for v in feats.maps.values()]
    return torch.cat(maps, dim=1)


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


# --- data -----------------------------------------------------------------------------------------------------
def toy_pairs(n: int, split: str = "train", seed: int = 0, classes=("heart", "triangle"),
              max_angle: float = math.pi / 4, min_keypoints: int = 2, extra_points: int = 0) -> list[Pair]:
    """Pairs of toy renders of one keypoint class with different pose (rotation within +-max_angle each),
    scale, position, colour and background; the keypoints visible in both, matched by name; boxes from masks.
    `classes` may be any of the renderer's keypoint classes (heart, moon, triangle).
    `extra_points` adds that many random matched object points ("p0", ...; same images): with 3-4 keypoints a
    pair's cross-entropy saturates long before the descriptors localise, so training pairs may want more."""
    from ..toyworld.data import SPLITS, scene_rng
    from ..toyworld.world import BACKGROUNDS, COLORS, KEYPOINTS, inside_shape, random_scene, render, to_pixels

    scene_rng(split, 0)  # validates the split name
    if bad := [c for c in classes if c not in KEYPOINTS]:
        raise ValueError(f"classes {bad} have no keypoints; allowed: {sorted(KEYPOINTS)}")
    pairs = []
    for i in range(n):
        rng = np.random.default_rng([SPLITS[split], 7919, seed, i])  # apart from the model's training scenes [0, i]
        shape = classes[i % len(classes)]
        for _ in range(100):
            colors, bgs = rng.permutation(list(COLORS))[:2], rng.permutation(list(BACKGROUNDS))[:2]
            r = [render(random_scene(rng, 1, shape=shape, color=str(c), background=str(b),
                                     angle=rng.uniform(-max_angle, max_angle))) for c, b in zip(colors, bgs)]
            names = tuple(k for k, (_, _, v) in r[0].keypoints[0].items() if v and r[1].keypoints[0][k][2])
            if len(names) >= min_keypoints:
                break
        else:
            raise RuntimeError(f"no pair with {min_keypoints} visible keypoints for {shape}")
        kps = [np.array([r[j].keypoints[0][k][:2] for k in names]) for j in (0, 1)]
        if extra_points:  # object-frame points mapped through both poses, kept where both renders show the object
            uv = np.random.default_rng([SPLITS[split], 7919, seed, i, 1]).uniform(-1, 1, (40 * extra_points, 2))
            uv = uv[inside_shape(shape, uv[:, 0], uv[:, 1])]
            xy = [np.stack(to_pixels(r[j].scene.objects[0], uv[:, 0], uv[:, 1]), 1) for j in (0, 1)]
            ok = np.ones(len(uv), bool)
            for j in (0, 1):
                c, side = np.floor(xy[j]).astype(int), r[j].image.shape[0]
                ok &= ((c >= 0) & (c < side)).all(1) & r[j].masks[0][c[:, 1].clip(0, side - 1), c[:, 0].clip(0, side - 1)]
            xy = [x[ok][:extra_points] for x in xy]
            kps = [np.concatenate([k, x]) for k, x in zip(kps, xy)]
            names = names + tuple(f"p{j}" for j in range(len(xy[0])))
        boxes = []
        for j in (0, 1):
            ys, xs = np.nonzero(r[j].masks[0])
            boxes.append(np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float))
        pairs.append(Pair(r[0].image, r[1].image, kps[0], kps[1], boxes[0], boxes[1], shape, names))
    return pairs


SPAIR_SPLITS = ("trn", "val", "test")
SPAIR_FIELDS = ("src_imname", "trg_imname", "src_kps", "trg_kps", "src_bndbox", "trg_bndbox", "category")


def spair_pairs(root, split: str = "test", category: str | None = None, limit: int | None = None) -> list[Pair]:
    """SPair-71k: root/PairAnnotation/<split>/*.json and root/JPEGImages/<category>/<imname>. Boxes are
    (xmin, ymin, xmax, ymax); keypoints are integer pixel indices, read as is (half a pixel off our convention)."""
    from PIL import Image

    if split not in SPAIR_SPLITS:
        raise ValueError(f"split must be one of {SPAIR_SPLITS}, got {split!r}")
    folder = Path(root) / "PairAnnotation" / split
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} not found: expected SPair-71k's PairAnnotation/<split>/*.json layout")
    load = lambda cat, name: np.array(Image.open(Path(root) / "JPEGImages" / cat / name).convert("RGB"))
    pairs = []
    for f in sorted(folder.glob("*.json")):
        d = json.loads(f.read_text())
        if missing := [k for k in SPAIR_FIELDS if k not in d]:
            raise ValueError(f"{f.name} lacks {missing}; SPair pair annotations have {SPAIR_FIELDS}")
        if category is not None and d["category"] != category:
            continue
        names = tuple(str(k) for k in d.get("kps_ids", range(len(d["src_kps"]))))
        pairs.append(Pair(load(d["category"], d["src_imname"]), load(d["category"], d["trg_imname"]), d["src_kps"],
                          d["trg_kps"], d["src_bndbox"], d["trg_bndbox"], d["category"], names))
        if limit is not None and len(pairs) >= limit:
            break
    return pairs

"""Diffusion Hyperfeatures (Luo et al., NeurIPS 2023): one per-pixel descriptor from every decoder layer x timestep.

Each decoder resnet's features (paper: the 12 `up_blocks.*.resnets.*`) at a subset of DDIM-inversion steps (paper: 11
of 50) go through a per-layer bottleneck shared across timesteps, to one size and dimension; learned softmax weights
over (timestep, layer) sum them. Training (official): each source keypoint's descriptor against every position of the
target's descriptor grid, CLIP-style cross-entropy both ways, logit scale log(1/0.07) fixed; one pair a step, 5,000.

    data = pair_features(pipe, spair_pairs(root, "trn", limit=24), steps=[0, 4, 9, ..., 49], size=64)  # .spair
    net = AggregationNetwork.for_features(data.features, projection_dim=384, output_size=64).to(pipe.device)
    train_aggregator(net, data, steps=5000)
    evaluate(describe(net, test.features), test.pairs)   # {"pck_img": ..., "pck_bbox": ..., "n": ...}
    net.mixing_weights()                                  # (timesteps, layers): which features it relies on

Steps index the UNet calls of our DDIM inversion: step 0 is the call on the clean latent (t = 1), the official
loop's label 49 (t = -1); the paper's one-step model is that call alone. Official saved labels 49, 45, ..., 0 of 50
are our steps 0, 4, 9, ..., 49 (`official_steps`). Ours, not official: features are cached once and pairs re-drawn
(official extracts every step's pair anew: hours of inversions a run on a T4); keypoints fall in the grid cell that
contains them (official rounds an integer pixel index times the scale, up to a cell off); matching for PCK is at
image resolution; the concatenation baseline L2-normalises each (layer, step).
Keypoints are continuous pixel coordinates (x, y): pixel (row r, col c) spans [c, c+1) x [r, r+1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from ..hooks import capture
from ..inversion import ddim_invert, to_tensor_image
from ..layers import select_many
from ..metrics import pck
from ..viz import to_uint8

LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature; fixed (not learned) in the official training
SITES = ("conv2", "block")
DECODER_RESNETS = "up_blocks.*.resnets.*"


def spaced_steps(num_inference_steps: int, count: int) -> list[int]:
    """`count` evenly spaced step indices, both ends included (paper: 11 of 50)."""
    if not 1 <= count <= num_inference_steps:
        raise ValueError(f"count must be in [1, {num_inference_steps}], got {count}")
    return sorted({int(round(s)) for s in np.linspace(0, num_inference_steps - 1, count)})


def official_steps(num_inference_steps: int = 50, every: int = 5) -> list[int]:
    """The official saved steps as our step indices: labels 49, 45, 40, ..., 0 of a 50-step inversion (label L is
    call 49 - L) are steps 0, 4, 9, ..., 49: the clean call and every `every`-th from the noisiest end."""
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1 or not isinstance(every, int) or every < 1:
        raise ValueError(f"need positive ints, got num_inference_steps={num_inference_steps!r}, every={every!r}")
    return sorted({0, *range(num_inference_steps - 1, -1, -every)})


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
    """Per layer (B, S, C, h, w) where the UNet ran (no host copy), maps larger than size x size downsampled to it
    as the aggregator would (bilinear, no antialias: its own resize is then the identity)."""
    out = {}
    for name, hook in zip(names, hooks):
        x = torch.stack([cache.get(hook, s) for s in cap_steps], dim=1)  # (B, S, C, h, w)
        x = x[-last:] if last else x
        if size and max(x.shape[-2:]) > size:
            x = F.interpolate(x.flatten(0, 1).float(), size=(size, size), mode="bilinear",
                              align_corners=False).to(x.dtype).unflatten(0, x.shape[:2])
        out[name] = x.to(dtype) if dtype else x
    return out


def model_images(images, size: int) -> torch.Tensor:
    """Images (list of PIL / uint8 HWC arrays / tensors, or a batch) -> (N, 3, size, size) floats in [-1, 1], the
    VAE's range: what `inversion_features` inverts (time a bare inversion on this tensor to compare like with like)."""
    items = list(images) if isinstance(images, (list, tuple)) or (isinstance(images, np.ndarray) and images.ndim == 4) \
        else [images]
    if not items:
        raise ValueError("no images given")
    out = [F.interpolate(to_tensor_image(im).float(), size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False) for im in items]
    return torch.cat(out).clamp(-1, 1)


@torch.no_grad()
def inversion_features(pipe, images, layers=DECODER_RESNETS, steps=None, num_inference_steps: int = 50,
                       site: str = "conv2", size: int | None = None, image_size: int | None = None, prompt: str = "",
                       batch_size: int = 8, dtype: torch.dtype | None = None, progress: bool = True) -> Hyperfeatures:
    """Features of real images along their DDIM inversion (prompt "", no guidance, as the paper): one inversion per
    batch with `capture` hooks on the selected resnets at the selected steps (0 = the call on the clean latent).

    site="conv2" (default) takes the residual branch before the skip add, as the official code; "block" the block
    output, which also carries the skip (the previous layer and the encoder's features). Features stay on the
    pipeline's device in its dtype (fp16 on a GPU: SD1.5's 12 layers x 11 steps are 150 MiB an image, never copied
    to the host); `size` caps each map's side (give the aggregator's output size: larger maps are downsampled as it
    would, smaller ones kept); `dtype` overrides the UNet's.
    """
    steps = _check_steps(steps, num_inference_steps)
    for k, v in (("size", size), ("image_size", image_size), ("batch_size", batch_size)):
        if (v is not None or k == "batch_size") and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{k} must be a positive int{'' if k == 'batch_size' else ' or None'}, got {v!r}")
    names, hooks = _resnets(pipe.unet, layers, site)
    x = model_images(images, image_size or pipe.unet.config.sample_size * pipe.vae_scale_factor)
    parts = []
    for i in tqdm(range(0, len(x), batch_size), desc="inversion features", disable=not progress, leave=False):
        with capture(pipe.unet, hooks, steps=steps, offload=None) as cache:
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
    with capture(pipe.unet, hooks, steps=gen, offload=None) as cache:
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
    initialised equal: the weights are the interpretable part (`mixing_weights`).

    `low_memory` recomputes each layer's bottlenecks in the backward pass (`torch.utils.checkpoint`): same gradients,
    a third more compute, and training holds one layer's activations instead of all (SD1.5 at the paper's settings:
    about 1 GiB instead of 12 GiB, what lets it train on a 15 GB T4; ours, the official code trains without it)."""

    def __init__(self, channels: dict[str, int], num_timesteps: int, projection_dim: int = 384, output_size: int = 64,
                 low_memory: bool = False):
        super().__init__()
        if not isinstance(channels, dict) or not channels:
            raise TypeError("channels must be a non-empty dict {layer name: channels} (Hyperfeatures.channels)")
        if num_timesteps < 1 or projection_dim < 4 or output_size < 1:
            raise ValueError(f"need num_timesteps >= 1, projection_dim >= 4, output_size >= 1; got "
                             f"{num_timesteps}, {projection_dim}, {output_size}")
        self.layers, self.num_timesteps, self.output_size = list(channels), num_timesteps, output_size
        self.low_memory = low_memory
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
        w, out = self.mixing_weights(), 0
        for j, (name, block) in enumerate(zip(self.layers, self.bottlenecks)):
            x = feats[name]
            if x.ndim != 5 or x.shape[1] != self.num_timesteps or x.shape[2] != block.conv1[0].in_channels:
                raise ValueError(f"{name}: expected (B, {self.num_timesteps}, {block.conv1[0].in_channels}, h, w), "
                                 f"got {tuple(x.shape)}")
            x = x.to(self.mixing.device)
            if self.low_memory and torch.is_grad_enabled():
                out = out + checkpoint(self._layer, block, x, w[:, j], use_reentrant=False)
            else:
                out = out + self._layer(block, x, w[:, j])
        return out

    def _layer(self, block, x, w):
        """(B, S, C, h, w) -> weighted sum over S of the bottleneck at output_size: (B, projection_dim, size, size)."""
        b, s = x.shape[:2]
        x = F.interpolate(x.flatten(0, 1).to(self.mixing.dtype), size=(self.output_size,) * 2, mode="bilinear",
                          align_corners=False)
        return (block(x).unflatten(0, (b, s)) * w.view(1, s, 1, 1, 1)).sum(1)


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
            desc = net(data.features.batch([k for i in idx for k in (2 * i, 2 * i + 1)]))
            loss = sum(correspondence_loss(desc[2 * j], desc[2 * j + 1], data.pairs[i])
                       for j, i in enumerate(idx)) / len(idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
    net.eval()
    return torch.stack(losses).tolist()


@torch.no_grad()
def describe(net: AggregationNetwork, feats: Hyperfeatures, batch_size: int = 2) -> torch.Tensor:
    """Hyperfeature maps of every image, on the network's device: (N, projection_dim, output_size, output_size).
    A pair at a time by default: on SD1.5 one image's 132 maps at 64x64 in fp32 are ~0.2 GiB before the bottlenecks."""
    return torch.cat([net(feats.batch(slice(i, i + batch_size))) for i in range(0, len(feats), batch_size)])


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
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    if len(predictions) != len(pairs):
        raise ValueError(f"{len(pairs)} pairs need {len(pairs)} predictions, got {len(predictions)}")
    img = [pck(q, p.trg_kps, alpha * max(p.trg_image.shape[:2])) for q, p in zip(predictions, pairs)]
    box = [pck(q, p.trg_kps, alpha * max(p.trg_bbox[2:] - p.trg_bbox[:2])) for q, p in zip(predictions, pairs)]
    return {"pck_img": float(np.concatenate(img).mean()), "pck_bbox": float(np.concatenate(box).mean()),
            "n": int(sum(len(b) for b in box))}


def evaluate(descriptors, pairs, alpha: float = 0.1) -> dict:
    """PCK@alpha (`score`) of nearest-neighbour matches (`predict`) on descriptor maps [src_0, trg_0, src_1, ...]."""
    return score(predict(descriptors, pairs), pairs, alpha)


def evaluate_streamed(pipe, pairs, methods: dict, batch_pairs: int = 4, alpha: float = 0.1, progress: bool = True,
                      **kwargs) -> dict[str, dict]:
    """PCK of several matchers on pairs whose features (`pair_features(pipe, ..., **kwargs)`) are extracted
    `batch_pairs` at a time and dropped, so a held-out set need not fit in memory.
    `methods`: {name: fn(Hyperfeatures, pairs) -> list of (K, 2) predictions}, e.g. `concat_predict`."""
    pairs, preds = list(pairs), {k: [] for k in methods}
    for i in tqdm(range(0, len(pairs), batch_pairs), desc="held-out pairs", disable=not progress):
        chunk = pairs[i:i + batch_pairs]
        feats = pair_features(pipe, chunk, progress=False, **kwargs).features
        for k, fn in methods.items():
            preds[k] += fn(feats, chunk)
    return {k: score(v, pairs, alpha) for k, v in preds.items()}


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

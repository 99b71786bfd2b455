"""Diffusion Hyperfeatures (Luo et al., NeurIPS 2023): one per-pixel descriptor from every decoder layer x timestep.

Each decoder resnet's features (paper: the 12 `up_blocks.*.resnets.*`) at a subset of DDIM-inversion steps (paper: 11
of 50) go through a per-layer bottleneck shared across timesteps, to one size and dimension; learned softmax weights
over (timestep, layer) sum them. Training (official): each source keypoint's descriptor against every position of the
target's descriptor grid, CLIP-style cross-entropy both ways, logit scale log(1/0.07) fixed; one pair a step, 5,000.

This module turns images into descriptors (extraction, the aggregation network); `hyperfeatures_train` holds the
keypoint pairs and the official training, `hyperfeatures_eval` the matching, PCK and the paper's baselines.

    from diffnb.papers import hyperfeatures as hf, hyperfeatures_eval as hfe, hyperfeatures_train as hft
    data = hft.pair_features(pipe, spair_pairs(root, "trn", limit=24), steps=[0, 4, 9, ..., 49], size=64)  # .spair
    net = hf.AggregationNetwork.for_features(data.features, projection_dim=384, output_size=64).to(pipe.device)
    hft.train_aggregator(net, data, steps=5000)
    hfe.evaluate(hf.describe(net, test.features), test.pairs)  # {"pck_img": ..., "pck_bbox": ..., "n": ...}
    net.mixing_weights()                                         # (timesteps, layers): which features it relies on

Steps index the UNet calls of our DDIM inversion: step 0 is the call on the clean latent (t = 1), the official
loop's label 49 (t = -1); the paper's one-step model is that call alone. Official saved labels 49, 45, ..., 0 of 50
are our steps 0, 4, 9, ..., 49 (`official_steps`). Ours, not official: features are cached once and pairs re-drawn
(official extracts every step's pair anew: hours of inversions a run on a T4).
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
from ..images import to_tensor_image
from ..inversion import ddim_invert
from ..layers import select_many
from ..viz import to_uint8

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


@torch.no_grad()
def describe(net: AggregationNetwork, feats: Hyperfeatures, batch_size: int = 2) -> torch.Tensor:
    """Hyperfeature maps of every image, on the network's device: (N, projection_dim, output_size, output_size).
    A pair at a time by default: on SD1.5 one image's 132 maps at 64x64 in fp32 are ~0.2 GiB before the bottlenecks."""
    return torch.cat([net(feats.batch(slice(i, i + batch_size))) for i in range(0, len(feats), batch_size)])


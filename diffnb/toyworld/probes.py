"""Probes: a small CNN that reads a toy image's shape class, colour, background style and unnamed detail.

They stand in for CLIP/DINO when scoring toy generations, so they are trained on renders with blur and
noise (generations are softer than renders) and their own held-out accuracy is reported next to every use.
Train: `python -m diffnb.toyworld.probes` (a few minutes on a CPU); shipped as assets/toy/probes.safetensors (world
`TOY_WORLD`). For another world: `python -m diffnb.toyworld.probes --world v2 --out PATH`; the file's safetensors metadata
records the world it was trained on (no metadata: v1), so a scorer can refuse images of another world.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import ToyDataset
from .world import BACKGROUNDS, COLORS, DETAILS, SHAPES, TOY_WORLD, world_config

HEADS = {"shape": SHAPES, "color": tuple(COLORS), "background": BACKGROUNDS, "detail": DETAILS}  # world v1's
PROBE_FILE = Path(__file__).resolve().parents[1] / "assets" / "toy" / "probes.safetensors"


def heads(world: str = TOY_WORLD) -> dict[str, tuple[str, ...]]:
    """The class names each head reads in `world`: only the unnamed identity ("detail") differs between worlds."""
    return {**HEADS, "detail": world_config(world).details}


def probe_world(path: Path) -> str:
    """The world a probe file was trained on: its safetensors metadata "world", or v1 for files without one."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        world = (f.metadata() or {}).get("world", "v1")
    world_config(world)  # an unknown name is an error here, not a silent mislabel later
    return world


class Probe(nn.Module):
    def __init__(self, width: int = 32, world: str = TOY_WORLD):
        super().__init__()
        c = [width, width * 2, width * 4, width * 4]
        layers = [nn.Conv2d(3, width, 5, stride=2, padding=2), nn.BatchNorm2d(width), nn.ReLU()]  # 64 -> 32 px
        for i in range(3):
            layers += [nn.Conv2d(c[i], c[i + 1], 3, padding=1), nn.BatchNorm2d(c[i + 1]), nn.ReLU(),
                       nn.Conv2d(c[i + 1], c[i + 1], 3, padding=1), nn.BatchNorm2d(c[i + 1]), nn.ReLU(), nn.MaxPool2d(2)]
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleDict({k: nn.Linear(c[-1], len(v)) for k, v in heads(world).items()})

    def forward(self, x):  # x: (B, 3, 64, 64) in [0, 1]
        h = self.body(x)
        return {k: head(h) for k, head in self.heads.items()}


def _batch(images) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images))
    if x.dtype == torch.uint8:
        x = x.float() / 255
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    if x.shape[-1] != 64:
        x = F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
    return x.float()


class Probes:
    """Loaded probes: `probes.predict(images)` -> {"shape": ["heart", ...], ...}; images uint8 or [0,1] floats.

    `.world`: the world they were trained on (their labels and held-out accuracy hold for that world only)."""

    def __init__(self, path: Path = PROBE_FILE):
        from safetensors.torch import load_file

        if not Path(path).exists():
            raise FileNotFoundError(f"no probes at {path}: train them with `python -m diffnb.toyworld.probes`")
        self.path, self.world = Path(path), probe_world(path)
        self.heads = heads(self.world)
        self.net = Probe(world=self.world)
        self.net.load_state_dict(load_file(path))
        self.net.eval()
        meta = Path(path).with_suffix(".json")
        self.heldout_accuracy = json.loads(meta.read_text())["heldout_accuracy"] if meta.exists() else None

    @torch.no_grad()
    def features(self, images) -> torch.Tensor:
        """(B, 128) pooled features of the shared body: an embedding of what the heads read, for similarities."""
        x = _batch(images)
        return torch.cat([self.net.body(x[i:i + 256]) for i in range(0, len(x), 256)])

    @torch.no_grad()
    def probabilities(self, images) -> dict[str, np.ndarray]:
        h = self.features(images)
        return {k: head(h).softmax(-1).numpy() for k, head in self.net.heads.items()}

    def predict(self, images) -> dict[str, list[str]]:
        return {k: [self.heads[k][i] for i in p.argmax(-1)] for k, p in self.probabilities(images).items()}


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur (generations are soft), noise, small brightness changes."""
    b = x.shape[0]
    sigma = torch.rand(b, generator=gen) * 1.2
    k = torch.arange(-3, 4, dtype=torch.float32)
    kern = torch.exp(-(k[None] ** 2) / (2 * sigma[:, None].clamp(min=1e-3) ** 2))
    kern = kern / kern.sum(1, keepdim=True)
    out = []
    for i in range(b):  # separable blur per image
        w = kern[i].view(1, 1, 1, 7).repeat(3, 1, 1, 1)
        xi = F.conv2d(F.pad(x[i:i + 1], (3, 3, 0, 0), mode="reflect"), w, groups=3)
        xi = F.conv2d(F.pad(xi, (0, 0, 3, 3), mode="reflect"), w.transpose(-1, -2), groups=3)
        out.append(xi)
    x = torch.cat(out)
    x = x * (1 + 0.1 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5)) + 0.04 * torch.randn(x.shape, generator=gen)
    return x.clamp(0, 1)


def _labels(renders, world: str = TOY_WORLD) -> dict[str, torch.Tensor]:
    """Class indices of each render's first object and background, in `world`'s heads."""
    if other := sorted({r.scene.world for r in renders} - {world_config(world).name}):
        raise ValueError(f"labels for world {world!r} asked of renders of world(s) {other}")
    details = world_config(world).details
    return {"shape": torch.tensor([SHAPES.index(r.scene.objects[0].shape) for r in renders]),
            "color": torch.tensor([list(COLORS).index(r.scene.objects[0].color) for r in renders]),
            "background": torch.tensor([BACKGROUNDS.index(r.scene.background) for r in renders]),
            "detail": torch.tensor([details.index(r.scene.objects[0].detail) for r in renders])}


def check_world(probes, world: str | None) -> str:
    """`world`, or the probes' own when None; a ValueError when the probes were trained on another world (their
    detail head names other classes, and their accuracy was measured on other images)."""
    own = getattr(probes, "world", "v1")
    world = own if world is None else world_config(world).name
    if world != own:
        raise ValueError(f"these probes ({getattr(probes, 'path', 'in memory')}) were trained on world {own!r}, "
                         f"not {world!r}: train probes for it with `python -m diffnb.toyworld.probes --world {world} "
                         "--out PATH` and load them with Probes(PATH)")
    return world


def evaluate(probes: Probes, n: int = 1000, world: str | None = None) -> dict[str, float]:
    """Accuracy on held-out single-object renders of `world` (default: the probes'; blurred like generations)."""
    world = check_world(probes, world)
    renders = [ToyDataset("heldout", n, n_objects=1, world=world)[i] for i in range(n)]
    x = _augment(_batch([r.image for r in renders]), torch.Generator().manual_seed(123))
    pred = probes.probabilities(x)
    return {k: float((pred[k].argmax(-1) == v.numpy()).mean()) for k, v in _labels(renders, world).items()}


def fit_probe(images: torch.Tensor, labels: dict[str, torch.Tensor], steps: int, batch: int, seed: int,
              progress: bool = True, world: str = TOY_WORLD) -> Probe:
    """A new probe trained on (images, labels) with augmentation, AdamW and a one-cycle schedule; in eval mode."""
    net = Probe(world=world)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc="probes", disable=not progress):
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        logits = net(_augment(images[idx], gen))
        loss = sum(F.cross_entropy(logits[k], labels[k][idx]) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


def train(steps: int = 1500, batch: int = 64, n_images: int = 12_000, out: Path = PROBE_FILE, seed: int = 0,
          world: str = TOY_WORLD, n_heldout: int = 1000, progress: bool = True) -> dict[str, float]:
    """Train probes on one-object renders of `world`, save them to `out` (metadata {"world": world}) with their
    held-out accuracy on `n_heldout` blurred renders next to it (.json); returns that accuracy."""
    from safetensors.torch import save_file

    world = world_config(world).name
    out = Path(out)
    if world != TOY_WORLD and out.resolve() == PROBE_FILE.resolve():
        raise ValueError(f"{PROBE_FILE} holds the shipped probes of world {TOY_WORLD!r}; give probes of world "
                         f"{world!r} another `out`")
    torch.manual_seed(seed)
    ds = ToyDataset("train", n_images, n_objects=1, world=world)
    renders = [ds[i] for i in tqdm(range(n_images), desc="render", disable=not progress)]
    net = fit_probe(_batch([r.image for r in renders]), _labels(renders, world), steps, batch, seed, progress, world)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, out, metadata={"world": world})
    acc = evaluate(Probes(out), n_heldout)
    out.with_suffix(".json").write_text(json.dumps({"heldout_accuracy": acc, "steps": steps, "batch": batch,
                                                    "n_images": n_images, "world": world}, indent=1))
    return acc


if __name__ == "__main__":
    from .world import WORLDS

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--world", default=TOY_WORLD, choices=tuple(WORLDS), help="the world whose renders train the probes")
    p.add_argument("--out", type=Path, default=None,
                   help=f"where to save them (default for the shipped world, {TOY_WORLD}: {PROBE_FILE})")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    if a.out is None and a.world != TOY_WORLD:
        p.error(f"--out is required for --world {a.world} ({PROBE_FILE} holds the shipped {TOY_WORLD} probes)")
    torch.set_num_threads(a.threads)
    print("held-out accuracy:", train(steps=a.steps, out=a.out or PROBE_FILE, world=a.world))

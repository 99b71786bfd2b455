"""A procedural 2-D world whose ground truth we know.

Every image is rendered from a `Scene` (objects + background), so each pixel's owner, each object's class,
colour and unnamed appearance detail, and each semantic keypoint are known exactly. The vocabulary is
deliberately coarse (shapes that differ at 8 px, saturated colours, bold background patterns) so that a
~6 M-parameter diffusion model learns it on a CPU.

Keypoints only exist on classes whose pose is readable from the silhouette under rotation (heart, moon,
triangle); the renderer only rotates, never mirrors, so "left lobe" stays identifiable.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SHAPES = ("circle", "square", "triangle", "heart", "moon")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 210, 30),
    "purple": (150, 50, 190),
}
BACKGROUNDS = ("plain", "striped", "checkered", "dotted")
# Appearance details that prompts never name: what ConsiStory must keep consistent.
DETAILS = ("none", "dot", "band")

# Semantic keypoints in the shape's local frame (unit radius, y up), per class.
KEYPOINTS = {
    "heart": {"tip": (0.0, -0.95), "left_lobe": (-0.5, 0.62), "right_lobe": (0.5, 0.62), "notch": (0.0, 0.3)},
    "moon": {"upper_horn": (0.29, 0.92), "lower_horn": (0.29, -0.92), "back": (-0.95, 0.0)},  # inside the horns after the pull
    "triangle": {"apex": (0.0, 0.9), "base_left": (-0.72, -0.62), "base_right": (0.72, -0.62)},
}
IMAGE_SIZE = 64
_SUPERSAMPLE = 3


@dataclass
class Obj:
    shape: str
    color: str
    detail: str = "none"
    center: tuple[float, float] = (32.0, 32.0)  # pixels (x, y), y down
    radius: float = 18.0  # pixels
    angle: float = 0.0  # radians, counter-clockwise


@dataclass
class Scene:
    objects: list[Obj]
    background: str = "plain"
    bg_phase: float = 0.0  # shifts the background pattern so it is not one fixed texture
    bg_tone: int = 0  # 0..2: which pale palette the background uses
    size: int = IMAGE_SIZE

    def __post_init__(self):
        if not 1 <= len(self.objects) <= 2:
            raise ValueError(f"a scene holds 1 or 2 objects, got {len(self.objects)}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; known: {BACKGROUNDS}")
        for o in self.objects:
            if o.shape not in SHAPES:
                raise ValueError(f"unknown shape {o.shape!r}; known: {SHAPES}")
            if o.color not in COLORS:
                raise ValueError(f"unknown colour {o.color!r}; known: {tuple(COLORS)}")
            if o.detail not in DETAILS:
                raise ValueError(f"unknown detail {o.detail!r}; known: {DETAILS}")


@dataclass
class Render:
    image: np.ndarray  # (H, W, 3) uint8
    masks: np.ndarray  # (n_objects + 1, H, W) bool; last one is the background
    keypoints: list[dict[str, tuple[float, float, bool]]] = field(default_factory=list)  # per object: x, y, visible
    scene: Scene | None = None


def inside_shape(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Point-in-shape test in the local frame (unit radius, y up)."""
    if shape == "circle":
        return u**2 + v**2 <= 0.85**2
    if shape == "square":
        return (np.abs(u) <= 0.72) & (np.abs(v) <= 0.72)
    if shape == "triangle":  # isosceles, apex up: pose is readable
        return (v >= -0.62) & (v <= 0.9 - 1.53 * np.abs(u) / 0.72 * 0.98)
    if shape == "heart":
        x, y = u / 0.95 * 1.15, (v + 0.05) / 0.95 * 1.15
        return (x**2 + y**2 - 1) ** 3 - x**2 * y**3 <= 0
    if shape == "moon":
        return (u**2 + v**2 <= 0.95**2) & ((u - 0.55) ** 2 + v**2 >= 0.75**2)
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def _detail(detail: str, u: np.ndarray, v: np.ndarray, shape: str) -> np.ndarray:
    """Where the unnamed appearance detail darkens the object (local frame)."""
    cx = -0.45 if shape == "moon" else 0.0  # keep the mark on the moon's body
    cy = -0.15 if shape == "triangle" else (0.1 if shape == "heart" else 0.0)
    if detail == "dot":
        return (u - cx) ** 2 + (v - cy) ** 2 <= 0.27**2
    if detail == "band":
        return np.abs(v - cy) <= 0.14
    return np.zeros_like(u, dtype=bool)


_BG_PALETTES = [((235, 235, 225), (150, 150, 160)), ((225, 240, 250), (110, 140, 170)), ((250, 235, 215), (170, 130, 100))]


def _background(kind: str, x: np.ndarray, y: np.ndarray, phase: float, tone: int) -> np.ndarray:
    light, dark = (np.array(c, dtype=np.float32) for c in _BG_PALETTES[tone % len(_BG_PALETTES)])
    period = 12.0
    if kind == "plain":
        on = np.zeros_like(x, dtype=bool)
    elif kind == "striped":
        on = ((x + y + phase * period) % period) < period / 2
    elif kind == "checkered":
        on = (np.floor((x + phase * period) / 8) + np.floor((y + phase * period) / 8)) % 2 == 0
    elif kind == "dotted":
        gx, gy = (x + phase * period) % 10 - 5, (y + phase * period) % 10 - 5
        on = gx**2 + gy**2 <= 2.2**2
    else:
        raise ValueError(f"unknown background {kind!r}; known: {BACKGROUNDS}")
    return np.where(on[..., None], dark, light)


def _to_local(obj: Obj, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    dx, dy = (x - obj.center[0]) / obj.radius, -(y - obj.center[1]) / obj.radius
    c, s = np.cos(-obj.angle), np.sin(-obj.angle)
    return c * dx - s * dy, s * dx + c * dy


def to_pixels(obj: Obj, u: float, v: float) -> tuple[float, float]:
    c, s = np.cos(obj.angle), np.sin(obj.angle)
    du, dv = c * u - s * v, s * u + c * v
    return obj.center[0] + du * obj.radius, obj.center[1] - dv * obj.radius


def render(scene: Scene) -> Render:
    """Render a scene with anti-aliasing (supersampling); masks are exact at pixel resolution."""
    n, ss = scene.size, _SUPERSAMPLE
    coords = (np.arange(n * ss, dtype=np.float32) + 0.5) / ss
    x, y = np.meshgrid(coords, coords)
    img = _background(scene.background, x, y, scene.bg_phase, scene.bg_tone)
    owner = np.full(x.shape, len(scene.objects), dtype=np.int16)  # background index = n_objects
    for i, obj in enumerate(scene.objects):  # later objects are drawn on top
        u, v = _to_local(obj, x, y)
        inside = inside_shape(obj.shape, u, v)
        colour = np.array(COLORS[obj.color], dtype=np.float32)
        mark = inside & _detail(obj.detail, u, v, obj.shape)
        img[inside] = colour
        img[mark] = colour * 0.35
        owner[inside] = i
    image = img.reshape(n, ss, n, ss, 3).mean(axis=(1, 3)).round().clip(0, 255).astype(np.uint8)
    owner_px = owner[ss // 2 :: ss, ss // 2 :: ss]
    masks = np.stack([owner_px == i for i in range(len(scene.objects) + 1)])
    keypoints = []
    for i, obj in enumerate(scene.objects):
        kps = {}
        for name, (u, v) in KEYPOINTS.get(obj.shape, {}).items():
            px, py = to_pixels(obj, u * 0.85, v * 0.85)  # pull slightly inside the silhouette
            col, row = int(np.floor(px)), int(np.floor(py))
            visible = 0 <= col < n and 0 <= row < n and owner_px[row, col] == i
            kps[name] = (float(px), float(py), bool(visible))
        keypoints.append(kps)
    return Render(image=image, masks=masks, keypoints=keypoints, scene=scene)


def random_scene(rng: np.random.Generator, n_objects: int | None = None, size: int = IMAGE_SIZE, **fixed) -> Scene:
    """Sample a scene. `fixed` pins attributes: shape, color, detail, background (first object only)."""
    allowed = {"shape", "color", "detail", "background", "angle"}
    if unknown := set(fixed) - allowed:
        raise ValueError(f"cannot fix {sorted(unknown)}; allowed: {sorted(allowed)}")
    if n_objects is None:
        n_objects = 1 if rng.random() < 0.8 else 2
    objs = []
    for i in range(n_objects):
        if n_objects == 1:
            r = rng.uniform(0.24, 0.34) * size
            c = rng.uniform(r * 0.9, size - r * 0.9, size=2)
        else:  # two objects: left and right halves so both stay visible
            r = rng.uniform(0.16, 0.21) * size
            cx = rng.uniform(r, size / 2 - r * 0.3) + i * size / 2
            c = (cx, rng.uniform(r, size - r))
        pick = lambda key, choices: fixed[key] if (i == 0 and key in fixed) else choices[rng.integers(len(choices))]
        objs.append(Obj(
            shape=pick("shape", SHAPES), color=pick("color", tuple(COLORS)), detail=pick("detail", DETAILS),
            center=(float(c[0]), float(c[1])), radius=float(r),
            angle=float(fixed["angle"]) if (i == 0 and "angle" in fixed) else float(rng.uniform(-np.pi, np.pi)),
        ))
    bg = fixed.get("background", BACKGROUNDS[rng.integers(len(BACKGROUNDS))])
    return Scene(objs, background=bg, bg_phase=float(rng.random()), bg_tone=int(rng.integers(3)), size=size)

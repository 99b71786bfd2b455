"""A procedural 2-D world whose ground truth we know.

Every image is rendered from a `Scene` (objects + background), so each pixel's owner, each object's class,
colour and unnamed appearance detail, and each semantic keypoint are known exactly. The vocabulary is
deliberately coarse (shapes that differ at 8 px, saturated colours, bold background patterns) so that a
~6 M-parameter diffusion model learns it on a CPU.

Keypoints only exist on classes whose pose is readable from the silhouette under rotation (heart, moon,
triangle); the renderer only rotates, never mirrors, so "left lobe" stays identifiable.

World variants (issue 17, "toy world v2"): a `WorldConfig` named in `WORLDS` changes how backgrounds and the
unnamed identity are drawn and how many objects a scene holds. `TOY_WORLD` names the world the shipped toy model
was trained on; it is every function's default, so the notebooks render, prompt and score in the model's own world.
"v1" stays bit-identical (same renders from the same seeds). The others were candidates for the next toy model,
each testing one suspected cause of a failed paper premise:
- "texture": each background style is a local, non-periodic texture in its palette (wavy stripes, a patchwork of
  regions, scattered blobs, a softly shaded plain), so a local change of the background is plausible
  (EmerDiff's locality: in v1 one global phase makes every background patch depend on all others).
- "pattern": the unnamed identity covers the whole object (spots or stripes in a darker shade), so every patch
  of the subject carries it and a patch-to-patch attention can copy it (ConsiStory); v1's is a small mark.
- "multi": one to three objects per scene (smaller), more regions and more layout per image.
- "v2": all three together.
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
# The "pattern" identity: drawn over the whole object in a darker shade of its colour (same count as DETAILS,
# so a probe's detail head keeps its size).
PATTERNS = ("none", "spots", "stripes")

# Semantic keypoints in the shape's local frame (unit radius, y up), per class.
KEYPOINTS = {
    "heart": {"tip": (0.0, -0.95), "left_lobe": (-0.5, 0.62), "right_lobe": (0.5, 0.62), "notch": (0.0, 0.3)},
    "moon": {"upper_horn": (0.29, 0.92), "lower_horn": (0.29, -0.92), "back": (-0.95, 0.0)},  # inside the horns after the pull
    "triangle": {"apex": (0.0, 0.9), "base_left": (-0.72, -0.62), "base_right": (0.72, -0.62)},
}
IMAGE_SIZE = 64
_SUPERSAMPLE = 3


@dataclass(frozen=True)
class WorldConfig:
    """How a world variant draws scenes; `WORLDS[name]` holds the named ones (see the module docstring)."""
    name: str = "v1"
    background: str = "periodic"  # "periodic" (v1: one global pattern, one phase) | "texture" (local, non-periodic)
    identity: str = "mark"  # "mark" (v1: small dot / band, DETAILS) | "pattern" (covers the object, PATTERNS)
    object_probs: tuple[float, ...] = (0.8, 0.2)  # probability of 1, 2, ... objects per scene (v1: 80 % / 20 %)

    def __post_init__(self):
        if self.background not in ("periodic", "texture"):
            raise ValueError(f"WorldConfig.background must be 'periodic' or 'texture', got {self.background!r}")
        if self.identity not in ("mark", "pattern"):
            raise ValueError(f"WorldConfig.identity must be 'mark' or 'pattern', got {self.identity!r}")
        if not 1 <= len(self.object_probs) <= 3 or abs(sum(self.object_probs) - 1) > 1e-6:
            raise ValueError(f"WorldConfig.object_probs: 1 to 3 probabilities summing to 1, got {self.object_probs}")

    @property
    def details(self) -> tuple[str, ...]:
        return DETAILS if self.identity == "mark" else PATTERNS

    @property
    def max_objects(self) -> int:
        return len(self.object_probs)


WORLDS = {
    "v1": WorldConfig(),
    "texture": WorldConfig("texture", background="texture"),
    "pattern": WorldConfig("pattern", identity="pattern"),
    "multi": WorldConfig("multi", object_probs=(0.5, 0.3, 0.2)),
    "v2": WorldConfig("v2", background="texture", identity="pattern", object_probs=(0.5, 0.3, 0.2)),
}
# The world of the shipped toy model (assets/toy/training_config.json, checked by a test): every default below.
TOY_WORLD = "v2"


def world_config(world: str | WorldConfig) -> WorldConfig:
    if isinstance(world, WorldConfig):
        return world
    if world not in WORLDS:
        raise ValueError(f"unknown world {world!r}; known: {tuple(WORLDS)}")
    return WORLDS[world]


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
    world: str = TOY_WORLD  # a name in WORLDS: how the background and the identity are drawn
    bg_seed: int = 0  # the local texture's layout (worlds with background="texture")

    def __post_init__(self):
        cfg = world_config(self.world)
        if not 1 <= len(self.objects) <= max(2, cfg.max_objects):
            raise ValueError(f"a scene of world {self.world!r} holds 1 to {max(2, cfg.max_objects)} objects, "
                             f"got {len(self.objects)}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; known: {BACKGROUNDS}")
        for o in self.objects:
            if o.shape not in SHAPES:
                raise ValueError(f"unknown shape {o.shape!r}; known: {SHAPES}")
            if o.color not in COLORS:
                raise ValueError(f"unknown colour {o.color!r}; known: {tuple(COLORS)}")
            if o.detail not in cfg.details:
                raise ValueError(f"unknown detail {o.detail!r} in world {self.world!r}; known: {cfg.details}")


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


def _pattern(pattern: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where the "pattern" identity darkens the object: over its whole area, fixed to the object's frame."""
    if pattern == "spots":  # a grid of spots, 0.5 radii apart
        return ((u + 0.25) % 0.5 - 0.25) ** 2 + ((v + 0.25) % 0.5 - 0.25) ** 2 <= 0.13**2
    if pattern == "stripes":  # horizontal stripes in the object's frame, 0.5 radii apart
        return (v + 0.125) % 0.5 < 0.22
    return np.zeros_like(u, dtype=bool)


def _value_noise(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, cells: int, size: int) -> np.ndarray:
    """Smooth noise in [0, 1): random values on a (cells+1)^2 grid over the image, bilinearly interpolated."""
    grid = rng.random((cells + 1, cells + 1))
    gx, gy = x / size * cells, y / size * cells
    i, j = np.clip(np.floor(gx).astype(int), 0, cells - 1), np.clip(np.floor(gy).astype(int), 0, cells - 1)
    fx, fy = gx - i, gy - j
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)  # smoothstep: no creases at the grid lines
    top = grid[j, i] * (1 - fx) + grid[j, i + 1] * fx
    bottom = grid[j + 1, i] * (1 - fx) + grid[j + 1, i + 1] * fx
    return top * (1 - fy) + bottom * fy


def _texture_background(kind: str, x: np.ndarray, y: np.ndarray, seed: int, tone: int, size: int) -> np.ndarray:
    """A local, non-periodic background in the style's palette: no patch is a shifted copy of another, so a
    local change is plausible. Same style words as v1: striped = stripes whose phase and direction wander,
    checkered = a patchwork of light and dark regions, dotted = scattered blobs of varied size, plain = the light
    colour with a soft shading."""
    rng = np.random.default_rng(seed)
    light, dark = (np.array(c, dtype=np.float32) for c in _BG_PALETTES[tone % len(_BG_PALETTES)])
    if kind == "plain":
        shade = _value_noise(rng, x, y, 3, size)[..., None]
        return light + 0.15 * (dark - light) * shade
    if kind == "striped":
        angle = rng.uniform(0, np.pi) + 1.2 * (_value_noise(rng, x, y, 2, size) - 0.5)
        warp = 1.5 * _value_noise(rng, x, y, 3, size)
        on = ((x * np.cos(angle) + y * np.sin(angle)) / 10.0 + warp) % 1.0 < 0.5
    elif kind == "checkered":  # Voronoi regions, each light or dark
        n = int(rng.integers(18, 28))
        seeds, dark_cell = rng.uniform(0, size, (n, 2)), rng.random(n) < 0.5
        dark_cell[:2] = (True, False)  # both tones always present
        d = (x[..., None] - seeds[:, 0]) ** 2 + (y[..., None] - seeds[:, 1]) ** 2
        on = dark_cell[d.argmin(-1)]
    elif kind == "dotted":
        n = int(rng.integers(18, 30))
        centers, radii = rng.uniform(-2, size + 2, (n, 2)), rng.uniform(1.5, 3.8, n)
        on = np.zeros_like(x, dtype=bool)
        for (cx, cy), r in zip(centers, radii):
            on |= (x - cx) ** 2 + (y - cy) ** 2 <= r**2
    else:
        raise ValueError(f"unknown background {kind!r}; known: {BACKGROUNDS}")
    return np.where(on[..., None], dark, light)


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
    cfg = world_config(scene.world)
    if cfg.background == "texture":
        img = _texture_background(scene.background, x, y, scene.bg_seed, scene.bg_tone, n)
    else:
        img = _background(scene.background, x, y, scene.bg_phase, scene.bg_tone)
    owner = np.full(x.shape, len(scene.objects), dtype=np.int16)  # background index = n_objects
    for i, obj in enumerate(scene.objects):  # later objects are drawn on top
        u, v = _to_local(obj, x, y)
        inside = inside_shape(obj.shape, u, v)
        colour = np.array(COLORS[obj.color], dtype=np.float32)
        if cfg.identity == "pattern":
            mark, shade = inside & _pattern(obj.detail, u, v), 0.45
        else:
            mark, shade = inside & _detail(obj.detail, u, v, obj.shape), 0.35
        img[inside] = colour
        img[mark] = colour * shade
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


def random_scene(rng: np.random.Generator, n_objects: int | None = None, size: int = IMAGE_SIZE,
                 world: str | WorldConfig = TOY_WORLD, **fixed) -> Scene:
    """Sample a scene of `world`. `fixed` pins attributes: shape, color, detail, background, angle (first object)."""
    allowed = {"shape", "color", "detail", "background", "angle"}
    if unknown := set(fixed) - allowed:
        raise ValueError(f"cannot fix {sorted(unknown)}; allowed: {sorted(allowed)}")
    cfg = world_config(world)
    if cfg.name == "v1":  # the first toy model's world: keep its exact random stream
        return _random_scene_v1(rng, n_objects, size, fixed)
    if n_objects is None:
        n_objects = 1 + int(np.searchsorted(np.cumsum(cfg.object_probs), rng.random(), side="right"))
        n_objects = min(n_objects, cfg.max_objects)
    if not 1 <= n_objects <= max(2, cfg.max_objects):
        raise ValueError(f"world {cfg.name!r} draws 1 to {max(2, cfg.max_objects)} objects, got n_objects={n_objects}")
    if n_objects == 3:  # three of the four quadrants, a small object in each
        cells = rng.permutation(4)[:3]
    objs = []
    for i in range(n_objects):
        if n_objects == 1:
            r = rng.uniform(0.24, 0.34) * size
            c = rng.uniform(r * 0.9, size - r * 0.9, size=2)
        elif n_objects == 2:  # left and right halves so both stay visible
            r = rng.uniform(0.16, 0.21) * size
            c = (rng.uniform(r, size / 2 - r * 0.3) + i * size / 2, rng.uniform(r, size - r))
        else:
            r = rng.uniform(0.14, 0.18) * size
            col, row = cells[i] % 2, cells[i] // 2
            c = (rng.uniform(r, size / 2 - r * 0.6) + col * size / 2, rng.uniform(r, size / 2 - r * 0.6) + row * size / 2)
        pick = lambda key, choices: fixed[key] if (i == 0 and key in fixed) else choices[rng.integers(len(choices))]
        objs.append(Obj(
            shape=pick("shape", SHAPES), color=pick("color", tuple(COLORS)), detail=pick("detail", cfg.details),
            center=(float(c[0]), float(c[1])), radius=float(r),
            angle=float(fixed["angle"]) if (i == 0 and "angle" in fixed) else float(rng.uniform(-np.pi, np.pi)),
        ))
    bg = fixed.get("background", BACKGROUNDS[rng.integers(len(BACKGROUNDS))])
    return Scene(objs, background=bg, bg_phase=float(rng.random()), bg_tone=int(rng.integers(3)), size=size,
                 world=cfg.name, bg_seed=int(rng.integers(2**31)))


def _random_scene_v1(rng: np.random.Generator, n_objects: int | None, size: int, fixed: dict) -> Scene:
    """v1's sampler, unchanged: the first toy model and every v1 result rely on its exact stream."""
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
    return Scene(objs, background=bg, bg_phase=float(rng.random()), bg_tone=int(rng.integers(3)), size=size,
                 world="v1")

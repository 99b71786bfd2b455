"""Premise tests: does a model have what each paper's method stands on? One number each, on any pipeline.

A method can be implemented right and still fail on a model that lacks its premise. These functions measure the
premise directly, so a failed claim can be traced to the model (issue 17 sizes the next toy world by them):

- `emerdiff_locality`: a modulation of one low-res segment changes the pixels of that segment. Energy share of the
  difference map inside the segment's own (upsampled) mask ÷ the mask's area share, median over every segment of
  every image, with K = `segments_per_region` × the image's regions (≥ 2×: the paper over-segments). 1 = no locality.
- `consistory_transfer`: shared self-attention can carry a subject's identity. Every patch of image 0 of a set is
  shared into the others (`ConsiStoryArgs(subject_masks="all", n_anchors=1)`, no dropout, mixing or injection);
  the value is the identity agreement inside sets minus vanilla's (same seeds).
- `style_aligned_shape`: shared attention keeps each image's content. Shape accuracy with StyleAligned ÷ vanilla.
- `hyperfeatures_timestep_gain`: features from several timesteps beat one. Held-out PCK@0.1 (bbox) of an
  aggregator over every saved step minus the best one-step aggregator, each trained the same fixed number of steps.

Identity and shape need ground truth, so those functions take a `scorer`: images (N, H, W, 3) uint8 -> {attribute:
list of N labels} (on the toy: `Probes().predict`). Every input has a seed; every loop a fixed step count.
`python -m diffnb.premises --model toy` prints the four numbers (a few CPU minutes); `--model PATH` reads a
pipeline folder (a pilot's export), `--world`/`--probes` give its world and scorer.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

Scorer = Callable[[np.ndarray], dict]

# Issue 17's acceptance bars for the premises (the value must reach the bar).
BARS = {"emerdiff_locality": 3.0, "consistory_transfer": 0.4, "style_aligned_shape": 0.9,
        "hyperfeatures_timestep_gain": 3.0}


@dataclass
class Premise:
    name: str
    value: float
    bar: float | None
    details: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def holds(self) -> bool | None:
        return None if self.bar is None else bool(self.value >= self.bar)

    def to_dict(self) -> dict:
        return {**asdict(self), "holds": self.holds}

    @property
    def interval(self) -> tuple[float, float] | None:
        """The 95 % bootstrap interval the test reports (over images or sets), if any: a small sample's value alone
        can sit on the wrong side of its bar."""
        ci = next((v for k, v in self.details.items() if k.startswith("ci95") and v is not None), None)
        return None if ci is None else (float(ci[0]), float(ci[1]))

    @property
    def target(self) -> str:
        """The bar and the interval, as a notebook claim's target: ">= 3 (95 % interval 2.10 to 3.40)"."""
        ci = "" if self.interval is None else f" (95 % interval {self.interval[0]:.2f} to {self.interval[1]:.2f})"
        return ("reported" if self.bar is None else f">= {self.bar:g}") + ci

    def line(self) -> str:
        verdict = "" if self.bar is None else ("holds" if self.holds else "does NOT hold")
        ci = "" if self.interval is None else f"   95 % interval [{self.interval[0]:.2f}, {self.interval[1]:.2f}]"
        return f"{self.name:30s} {self.value:8.3f}   bar {self.bar if self.bar is not None else '-':>5}   {verdict}{ci}"


def _check_scorer(scorer, keys):
    if not callable(scorer):
        raise TypeError(f"scorer must be a callable images -> {{attribute: labels}}, got {type(scorer).__name__}")
    return keys


def _uint8(images) -> np.ndarray:
    x = np.asarray(images)
    return x if x.dtype == np.uint8 else (x * 255).round().clip(0, 255).astype(np.uint8)


def _score(scorer: Scorer, images: np.ndarray, keys) -> dict[str, np.ndarray]:
    out = scorer(images)
    if not isinstance(out, dict) or (missing := [k for k in keys if k not in out]):
        raise ValueError(f"the scorer must return a dict with {list(keys)}; got "
                         f"{list(out) if isinstance(out, dict) else type(out).__name__}")
    return {k: np.asarray(out[k]) for k in out}


def bootstrap_ci(groups, statistic, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of `statistic(resampled groups)`, resampling whole groups (sets / images) with
    replacement, paired: a group carries all its conditions together."""
    rng = np.random.default_rng(seed)
    groups = list(groups)
    stats = [statistic([groups[i] for i in rng.integers(len(groups), size=len(groups))]) for _ in range(n)]
    lo, hi = np.nanpercentile(stats, [2.5, 97.5])
    return float(lo), float(hi)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(int(seed))


# --- EmerDiff ---------------------------------------------------------------------------------------------------
def modulation_locality(lowres: np.ndarray, differences: np.ndarray) -> list[tuple[int, float, np.ndarray]]:
    """(segment, locality ratio, its full-size mask) for each segment of one EmerDiff output: the share of the
    difference map's energy inside the segment's own upsampled mask ÷ the mask's area share (1 = no locality).
    Segments covering nothing or everything, or whose modulation changed nothing, are skipped."""
    from .papers.emerdiff import upsample_labels

    out = []
    for s in range(differences.shape[0]):
        inside = upsample_labels((lowres == s).astype(int), differences.shape[1:], 2) == 1
        energy = differences[s]
        if 0 < inside.mean() < 1 and energy.sum() > 0:
            out.append((s, float((energy[inside].sum() / energy.sum()) / inside.mean()), inside))
    return out


def emerdiff_locality(pipe, images, n_regions, args=None, segments_per_region: int = 2, masks=None) -> Premise:
    """Median locality ratio of EmerDiff's modulations (module docstring). images: list of (H, W, 3) uint8;
    n_regions: regions per image (int or one per image); args: `EmerDiffArgs` (K is set per image).
    masks (optional, per image (R, H, W) bool with the background last): also splits the ratios by whether a
    segment lies mostly on the background or on an object."""
    from .papers.emerdiff import EmerDiffArgs, segment

    if args is None:
        raise ValueError("give args=EmerDiffArgs(...) (e.g. EmerDiffArgs.for_model('toy')): the layers are model-specific")
    if not isinstance(args, EmerDiffArgs):
        raise TypeError(f"args must be EmerDiffArgs, got {type(args).__name__}")
    if not isinstance(segments_per_region, int) or segments_per_region < 2:
        raise ValueError(f"segments_per_region must be an int >= 2 (K >= 2 x regions), got {segments_per_region!r}")
    images = list(images)
    regions = [n_regions] * len(images) if isinstance(n_regions, int) else list(n_regions)
    if not images or len(regions) != len(images) or any(not isinstance(r, int) or r < 1 for r in regions):
        raise ValueError("need >= 1 image and one region count >= 1 per image")
    t0 = time.perf_counter()
    ratios, on_bg, per_image, groups = [], [], [], []
    for i, (image, r) in enumerate(zip(images, regions)):
        out = segment(pipe, image, replace(args, n_segments=segments_per_region * r))
        mine = []
        for _, ratio, inside in modulation_locality(out.lowres, out.differences):
            mine.append(ratio)
            if masks is not None:
                on_bg.append(bool(np.asarray(masks[i])[-1][inside].mean() > 0.5))
        ratios += mine
        groups.append(mine)
        per_image.append(float(np.median(mine)) if mine else float("nan"))
    ratios_a = np.array(ratios)
    details = {"modulations": len(ratios), "images": len(images), "share_above_1.5": float(np.mean(ratios_a > 1.5)),
               "per_image_median": per_image, "segments_per_region": segments_per_region,
               "layer": args.modulate_layer, "t_m": args.t_m, "strength": args.strength,
               "ci95_over_images": bootstrap_ci(groups, lambda g: float(np.median(sum(g, []))) if sum(g, []) else np.nan)
               if ratios else None}
    if masks is not None and ratios:
        bg = np.array(on_bg)
        details["median_background_segments"] = float(np.median(ratios_a[bg])) if bg.any() else None
        details["median_object_segments"] = float(np.median(ratios_a[~bg])) if (~bg).any() else None
    return Premise("emerdiff_locality", float(np.median(ratios_a)) if ratios else float("nan"),
                   BARS["emerdiff_locality"], details, time.perf_counter() - t0)


# --- ConsiStory ---------------------------------------------------------------------------------------------------
def _agreement(labels: np.ndarray) -> float:
    """labels (sets, n, A): share of pairs i < j inside a set whose A attributes all agree."""
    n = labels.shape[1]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    return float(np.mean([(labels[s, i] == labels[s, j]).all() for s in range(labels.shape[0]) for i, j in pairs]))


def consistory_transfer(pipe, scorer: Scorer, sets, subject_words, seeds, identity=("color", "detail"),
                        args=None, num_inference_steps: int = 20, guidance_scale: float = 5.0) -> Premise:
    """Identity agreement gain when every patch of image 0 of each set is shared into the others (module docstring).

    sets: list of prompt lists (the identity left unnamed); subject_words: one per set; seeds: one list per set.
    identity: the scorer's attributes that make up identity (all must agree). args: the sharing `ConsiStoryArgs`
    (default: SDSA in every self-attention layer, every patch of image 0, no dropout / mixing / injection)."""
    from .papers.consistory import ConsiStoryArgs, generate

    _check_scorer(scorer, identity)
    if not sets or len(sets) != len(subject_words) or len(sets) != len(seeds):
        raise ValueError(f"need one subject word and one seed list per set: {len(sets)} sets, "
                         f"{len(subject_words)} words, {len(seeds)} seed lists")
    if len({len(s) for s in sets}) != 1 or len(sets[0]) < 2:
        raise ValueError("every set needs the same number (>= 2) of prompts")
    share = args or ConsiStoryArgs(share_layers="self", n_anchors=1, subject_masks="all", mask_dropout=0.0,
                                   query_mix_fraction=0.0, inject=False)
    if share.subject_masks != "all" or not share.sdsa:
        raise ValueError("consistory_transfer shares every patch: args need sdsa=True and subject_masks='all'")
    vanilla = replace(share, sdsa=False)
    t0 = time.perf_counter()
    kw = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
    runs = {name: np.stack([_uint8(generate(pipe, list(p), w, a, seeds=list(s), **kw).images)
                            for p, w, s in zip(sets, subject_words, seeds)])
            for name, a in (("vanilla", vanilla), ("shared", share))}
    details, value, per_set = {"sets": len(sets), "per_set": len(sets[0]), "identity": list(identity)}, {}, {}
    for name, imgs in runs.items():
        flat = imgs.reshape(-1, *imgs.shape[2:])
        pred = _score(scorer, flat, identity)
        lab = np.stack([pred[k].reshape(imgs.shape[:2]) for k in identity], -1)
        value[name] = _agreement(lab)
        per_set[name] = [_agreement(lab[i:i + 1]) for i in range(len(lab))]
        details[f"{name}_identity_agreement"] = value[name]
        for k, v in pred.items():
            details[f"{name}_{k}_agreement"] = _agreement(np.asarray(v).reshape(*imgs.shape[:2], 1))
    details["ci95_over_sets"] = bootstrap_ci(list(zip(per_set["shared"], per_set["vanilla"])),
                                             lambda g: float(np.mean([a - b for a, b in g])))
    return Premise("consistory_transfer", value["shared"] - value["vanilla"], BARS["consistory_transfer"], details,
                   time.perf_counter() - t0)


# --- StyleAligned -------------------------------------------------------------------------------------------------
def style_aligned_shape(pipe, scorer: Scorer, sets, shapes, seeds, args=None, num_inference_steps: int = 20,
                        guidance_scale: float = 5.0, style_key: str | None = "background") -> Premise:
    """Shape accuracy with StyleAligned's shared attention ÷ vanilla's, same seeds (module docstring).

    sets: prompt lists (prompt 0 is the reference); shapes: per set, the shape each prompt names (what the
    scorer's "shape" must read); seeds: one int per set. `style_key`: a scorer attribute whose agreement with the
    reference is reported too (None: skip)."""
    from .papers.style_aligned import StyleAlignedArgs, generate

    _check_scorer(scorer, ("shape",))
    if not sets or len(sets) != len(shapes) or len(sets) != len(seeds):
        raise ValueError(f"need one shape list and one seed per set: {len(sets)}, {len(shapes)}, {len(seeds)}")
    if any(len(p) != len(s) or len(p) < 2 for p, s in zip(sets, shapes)):
        raise ValueError("each set needs >= 2 prompts and one shape per prompt")
    args = args or StyleAlignedArgs()
    if not isinstance(args, StyleAlignedArgs):
        raise TypeError(f"args must be StyleAlignedArgs, got {type(args).__name__}")
    t0 = time.perf_counter()
    kw = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, output_type="np")
    runs = {"vanilla": [pipe(list(p), generator=_generator(s), **kw).images for p, s in zip(sets, seeds)],
            "shared": [generate(pipe, list(p), args=args, generator=_generator(s), **kw) for p, s in zip(sets, seeds)]}
    want = np.array([x for s in shapes for x in s])
    details, acc, correct = {"sets": len(sets), "images": len(want)}, {}, {}
    for name, imgs in runs.items():
        flat = _uint8(np.concatenate([np.asarray(i) for i in imgs]))
        pred = _score(scorer, flat, ("shape",) + ((style_key,) if style_key else ()))
        acc[name] = float((pred["shape"] == want).mean())
        bounds = np.cumsum([0] + [len(p) for p in sets])
        correct[name] = [int((pred["shape"] == want)[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:])]
        details[f"{name}_shape_accuracy"] = acc[name]
        if style_key:
            lab, start = pred[style_key], 0
            agree = []
            for p in sets:
                agree += list(lab[start + 1:start + len(p)] == lab[start])
                start += len(p)
            details[f"{name}_{style_key}_agreement"] = float(np.mean(agree))
    value = acc["shared"] / acc["vanilla"] if acc["vanilla"] > 0 else float("nan")
    ratio = lambda g: sum(a for a, _ in g) / sum(b for _, b in g) if sum(b for _, b in g) else np.nan
    details["ci95_over_sets"] = bootstrap_ci(list(zip(correct["shared"], correct["vanilla"])), ratio)
    return Premise("style_aligned_shape", value, BARS["style_aligned_shape"], details, time.perf_counter() - t0)


# --- Hyperfeatures ------------------------------------------------------------------------------------------------
def hyperfeatures_timestep_gain(pipe, train_pairs, test_pairs, steps=(0, 5, 10), num_inference_steps: int = 20,
                                train_steps: int = 300, projection_dim: int = 64, output_size: int = 16,
                                lr: float = 1e-3, seed: int = 0, cross: bool = False) -> Premise:
    """PCK@0.1 (bbox, points ×100) of an aggregator over all `steps` minus the best one-step aggregator's, on
    `test_pairs`; every aggregator trains exactly `train_steps` steps on `train_pairs` (module docstring), or with
    `cross` on every same-category pair of their images (`hyperfeatures_train.cross_pairs`; needs keypoint names).
    The best step is picked on the held-out pairs themselves: the most favourable choice for the one-step side, so
    a positive gain is not an artefact of picking. Train PCK is reported too (overfitting shows as a gap), and a 95 %
    interval of the gain over test pairs."""
    from .papers import hyperfeatures as hf, hyperfeatures_eval as hfe, hyperfeatures_train as hft

    steps = sorted(set(int(s) for s in steps))
    if len(steps) < 2:
        raise ValueError(f"a timestep gain needs >= 2 saved steps, got {steps}")
    if not isinstance(train_steps, int) or train_steps < 1:
        raise ValueError(f"train_steps must be an int >= 1, got {train_steps!r}")
    t0 = time.perf_counter()
    kw = dict(num_inference_steps=num_inference_steps, steps=steps, batch_size=16, progress=False)
    train, test = hft.pair_features(pipe, train_pairs, **kw), hft.pair_features(pipe, test_pairs, **kw)

    def fit(select):
        torch.manual_seed(seed)
        tr, te = train.features.select(steps=select), test.features.select(steps=select)
        net = hf.AggregationNetwork.for_features(tr, projection_dim=projection_dim, output_size=output_size)
        data = hft.PairFeatures(train.pairs, tr)
        losses = hft.train_aggregator(net, hft.cross_pairs(data) if cross else data, steps=train_steps, lr=lr,
                                     seed=seed, progress=False)
        hits = hfe.pair_hits(hfe.predict(hf.describe(net, te), test.pairs), test.pairs)
        return (100 * np.concatenate(hits).mean(), 100 * hfe.evaluate(hf.describe(net, tr), train.pairs)["pck_bbox"],
                float(np.mean(losses[-20:])), hits)

    multi, multi_train, multi_loss, multi_hits = fit(steps)
    single = {s: fit([s]) for s in steps}
    best = max(single, key=lambda s: single[s][0])
    gain = hfe.pck_gain(multi_hits, single[best][3])
    details = {"multi_pck": multi, "multi_train_pck": multi_train, "multi_final_loss": multi_loss,
               "one_step_pck": {str(s): v[0] for s, v in single.items()}, "best_step": best,
               "ci95_over_pairs": (gain["low"], gain["high"]),
               "steps": steps, "num_inference_steps": num_inference_steps, "train_steps": train_steps,
               "train_pairs": len(train.pairs), "test_pairs": len(test.pairs), "cross_pairs": cross}
    return Premise("hyperfeatures_timestep_gain", multi - single[best][0], BARS["hyperfeatures_timestep_gain"],
                   details, time.perf_counter() - t0)


# --- the toy world's inputs ---------------------------------------------------------------------------------------
def toy_keypoint_pairs(n: int, split: str, world: str | None = None, seed: int = 0, extra_points: int = 0,
                       classes=("heart", "triangle")):
    """Keypoint pairs of one world's renders (`toyworld.scoring.keypoint_pairs`, max angle 45°, one object per
    image); `world` defaults to the shipped toy's."""
    from .toyworld.scoring import keypoint_pairs
    from .toyworld.world import TOY_WORLD

    return keypoint_pairs(n, split, seed=seed, classes=classes, extra_points=extra_points, world=world or TOY_WORLD)


@dataclass(frozen=True)
class ToySizes:
    """How much each premise test measures on the toy. `small`: the CLI's default (a few CPU minutes); the
    held-out seeds and scenes are apart from every notebook's and benchmark's (scenes from index 5,000, seeds
    from 90,000)."""
    emerdiff_images: int = 12
    consistory_sets: int = 6
    style_sets: int = 6
    hf_train_pairs: int = 24
    hf_test_pairs: int = 24
    hf_train_steps: int = 300
    hf_extra_points: int = 32


SIZES = {"tiny": ToySizes(2, 1, 1, 3, 3, 5, 4), "small": ToySizes(), "full": ToySizes(24, 24, 24, 48, 48, 1000, 32)}


def toy_premises(pipe, scorer: Scorer, world: str | None = None, sizes: ToySizes | str = "small",
                 only=None, progress: bool = True) -> dict[str, Premise]:
    """All four premise tests on toy-world inputs of `world` (prompts from its grammar, renders from its held-out
    split; default the shipped toy's). `pipe` may be any pipeline whose tokenizer knows the grammar's words (the
    toy, a pilot)."""
    from .papers.emerdiff import EmerDiffArgs
    from .papers.style_aligned import StyleAlignedArgs
    from .toyworld.data import ToyDataset
    from .toyworld.prompts import prompt
    from .toyworld.world import BACKGROUNDS, COLORS, SHAPES, TOY_WORLD

    world = world or TOY_WORLD
    sizes = SIZES[sizes] if isinstance(sizes, str) else sizes
    only = set(only or BARS)
    if unknown := only - set(BARS):
        raise ValueError(f"unknown premises {sorted(unknown)}; known: {list(BARS)}")
    out = {}
    say = print if progress else (lambda *a, **k: None)
    if "emerdiff_locality" in only:
        ds = ToyDataset("heldout", 5000 + sizes.emerdiff_images, world=world)
        renders = [ds[5000 + i] for i in range(sizes.emerdiff_images)]
        out["emerdiff_locality"] = emerdiff_locality(pipe, [r.image for r in renders], [len(r.masks) for r in renders],
                                                     EmerDiffArgs.for_model("toy"), masks=[r.masks for r in renders])
        say(out["emerdiff_locality"].line(), flush=True)
    if "consistory_transfer" in only:
        sets = [[f"a {SHAPES[s % len(SHAPES)]} on a {bg} background" for bg in ("striped", "dotted", "checkered", "plain")]
                for s in range(sizes.consistory_sets)]
        words = [SHAPES[s % len(SHAPES)] for s in range(sizes.consistory_sets)]
        seeds = [[90_000 + 10 * s + j for j in range(4)] for s in range(sizes.consistory_sets)]
        out["consistory_transfer"] = consistory_transfer(pipe, scorer, sets, words, seeds)
        say(out["consistory_transfer"].line(), flush=True)
    if "style_aligned_shape" in only:
        rng = np.random.default_rng(91_000)
        shapes = [list(rng.permutation(SHAPES)[:4]) for _ in range(sizes.style_sets)]
        sets = [[prompt(str(s), str(c)) for s, c in zip(sh, rng.permutation(list(COLORS))[:4])] for sh in shapes]
        args = StyleAlignedArgs.for_model("toy")  # notebook 01's toy setting: norms shared, shift log 2
        out["style_aligned_shape"] = style_aligned_shape(pipe, scorer, sets, [[str(x) for x in s] for s in shapes],
                                                         [92_000 + i for i in range(sizes.style_sets)], args)
        say(out["style_aligned_shape"].line(), flush=True)
    if "hyperfeatures_timestep_gain" in only:
        train = toy_keypoint_pairs(sizes.hf_train_pairs, "train", world, seed=93, extra_points=sizes.hf_extra_points)
        test = toy_keypoint_pairs(sizes.hf_test_pairs, "heldout", world, seed=93)
        out["hyperfeatures_timestep_gain"] = hyperfeatures_timestep_gain(pipe, train, test, cross=True,
                                                                         train_steps=sizes.hf_train_steps)
        say(out["hyperfeatures_timestep_gain"].line(), flush=True)
    return out


def code_version() -> dict:
    """The commit and the package files that differ from it: premise numbers move with the methods' code."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True).stdout
    try:
        return {"commit": git("rev-parse", "HEAD").strip(),
                "modified": [l.split(maxsplit=1)[1] for l in git("status", "--porcelain", "--", "diffnb").splitlines()
                             if l.strip()]}
    except OSError:
        return {}


def load_folder(path, device: str = "cpu"):
    """A StableDiffusionPipeline saved with save_pretrained (e.g. a pilot's export), as `load_pipeline("toy")`
    loads the toy: fp32 on the CPU, DDIM, no progress bars."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    path = Path(path)
    if not (path / "model_index.json").exists():
        raise FileNotFoundError(f"{path} is not a saved pipeline (no model_index.json)")
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False,
                                                   torch_dtype=torch.float32)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy", help="'toy' (the shipped model) or a saved pipeline folder")
    p.add_argument("--world", default=None, help="the toy world whose prompts / renders to use (default: the model's)")
    p.add_argument("--probes", default=None, help="probe weights (default: the shipped toy probes)")
    p.add_argument("--sizes", default="small", choices=tuple(SIZES))
    p.add_argument("--only", default=None, help=f"comma-separated subset of {list(BARS)}")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from .models import TOY_DIR
    from .toyworld.evaluate import model_world
    from .toyworld.probes import PROBE_FILE, Probes

    a.world = a.world or model_world(TOY_DIR if a.model == "toy" else Path(a.model))
    if a.model == "toy":
        from .models import load_pipeline

        pipe = load_pipeline("toy", device="cpu")
    else:
        pipe = load_folder(a.model)
    probes = Probes(a.probes or PROBE_FILE)
    t0 = time.perf_counter()
    res = toy_premises(pipe, probes.predict, world=a.world, sizes=a.sizes,
                       only=a.only.split(",") if a.only else None)
    print(f"\npremises of {a.model} (world {a.world}, sizes {a.sizes}) in {time.perf_counter() - t0:.0f} s")
    for r in res.values():
        print(r.line())
    if a.json:
        Path(a.json).write_text(json.dumps({"model": a.model, "world": a.world, "sizes": a.sizes, "code": code_version(),
                                            "premises": {k: v.to_dict() for k, v in res.items()}}, indent=1, default=float))
    return res


if __name__ == "__main__":
    main()

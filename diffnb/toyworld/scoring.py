"""How the notebooks and benchmarks score a method on the toy world's ground truth.

Each function here knows something only the toy world knows (which shape and background a prompt names, which
keypoint is which on two renders, which edit of a scene changes its style or its content) and asks the probes or
the renderer about it. That is evaluation and data, not the method: the paper modules in `diffnb.papers` hold only
the method and never import the toy world, so these live here, beside the world they score on. General metrics
(mIoU, 2AFC, PCK, layout overlap) are in `diffnb.metrics`.

    style_scores, identity_scores, subject_similarity, subject_mask_iou     (StyleAligned, ConsiStory)
    same_style, same_identity                                                (pair by pair, to judge a judge)
    triplets                                                                 (DiffSim: 2AFC triplets)
    keypoint_pairs, write_spair_fixture                                      (Hyperfeatures: keypoint pairs)
"""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..metrics import layout_overlap, mean_over_pairs
from ..papers.hyperfeatures_train import Pair
from ..papers.spair import SPAIR_SPLITS
from .data import SPLITS, scene_rng
from .prompts import BG_WORD
from .world import (BACKGROUNDS, COLORS, IMAGE_SIZE, KEYPOINTS, SHAPES, TOY_WORLD, inside_shape, random_scene, render,
                    to_pixels, world_config)


# --- StyleAligned ---------------------------------------------------------------------------------------------
def style_scores(images, prompt_shapes, probes) -> dict[str, float]:
    """Probe-measured effect on toy sets. images: (sets, n, H, W, 3) uint8; prompt_shapes: (sets, n) names.

    style agreement: share of non-reference images whose background style equals the reference's;
    shape accuracy: share of images whose shape is the one their prompt names;
    content leak: share of non-reference images that took the reference's shape instead of their own.
    """
    pred = _set_predictions(images, probes)
    shape, want = pred["shape"], np.array(prompt_shapes)
    return {"style_agreement": float(_same_style(pred).mean()),
            "shape_accuracy": float((shape == want).mean()),
            "content_leak": float((shape[:, 1:] == want[:, :1]).mean())}


def _set_predictions(images, probes) -> dict[str, np.ndarray]:
    """The probes' prediction of every attribute for (sets, n, H, W, 3) images, each as a (sets, n) array."""
    images = np.asarray(images)
    if images.ndim != 5:
        raise ValueError(f"images must be (sets, n, H, W, 3), got shape {images.shape}")
    sets, n = images.shape[:2]
    pred = probes.predict(images.reshape(sets * n, *images.shape[2:]))
    return {k: np.array(v).reshape(sets, n) for k, v in pred.items()}


def _same_style(pred) -> np.ndarray:
    return (pred["background"][:, 1:] == pred["background"][:, :1]).ravel()


def _same_identity(pred) -> np.ndarray:
    i, j = np.triu_indices(pred["color"].shape[1], 1)
    return ((pred["color"][:, i] == pred["color"][:, j]) & (pred["detail"][:, i] == pred["detail"][:, j])).ravel()


def same_style(images, probes) -> np.ndarray:
    """Per (reference, other image) pair, set by set: does the probe read the same background style? (sets*(n-1),)
    bools, for judging a similarity score pair by pair; the mean is `style_scores`' style agreement."""
    return _same_style(_set_predictions(images, probes))


def same_identity(images, probes) -> np.ndarray:
    """Per pair (i < j, `np.triu_indices` order) inside each set: the same subject by the probes, i.e. the same
    colour and the same detail (never named by the prompt grammar). (sets*n*(n-1)/2,) bools; the mean is
    `identity_scores`' identity agreement."""
    return _same_identity(_set_predictions(images, probes))


# --- ConsiStory -----------------------------------------------------------------------------------------------
def subject_similarity(images, masks, probes, fill: float = 0.5) -> float:
    """Mean pairwise cosine similarity, inside each set, of the probe's features of the subject alone.

    The paper's DINO similarity after background removal, on the toy: every pixel outside the image's subject mask
    becomes grey before the probe embeds it. images (sets, n, H, W, 3) uint8; masks (sets, n, r, r) bool.
    """
    images, masks = np.asarray(images), torch.as_tensor(np.asarray(masks))
    sets, n, size = images.shape[0], images.shape[1], images.shape[2]
    if masks.shape[:2] != (sets, n):
        raise ValueError(f"masks must be (sets, n, r, r) matching images {images.shape[:2]}, got {tuple(masks.shape)}")
    keep = F.interpolate(masks.flatten(0, 1)[:, None].float(), size=(size, size), mode="nearest")[:, 0, ..., None]
    x = torch.from_numpy(images.reshape(-1, *images.shape[2:])).float() / 255
    f = F.normalize(probes.features(torch.where(keep > 0, x, torch.full_like(x, fill))), dim=-1).view(sets, n, -1)
    return mean_over_pairs(f @ f.transpose(1, 2))


def identity_scores(images, prompts, probes, masks=None) -> dict[str, float]:
    """Identity consistency and prompt fidelity of toy sets, by the probes.

    images: (sets, n, H, W, 3) uint8; prompts: (sets, n). Agreements are over all pairs inside a set of the
    probe's prediction for an attribute; `detail` is never named by the grammar, `color` only when the prompt
    names it (then its agreement is fidelity, not identity). background/shape accuracy: probe vs prompt.
    With the subject masks (sets, n, r, r), also `subject_similarity` and `layout_overlap` (see there).
    """
    images = np.asarray(images)
    if images.ndim != 5 or images.shape[:2] != np.shape(prompts):
        raise ValueError(f"images must be (sets, n, H, W, 3) matching prompts {np.shape(prompts)}, got {images.shape}")
    sets, n = images.shape[:2]
    pred = _set_predictions(images, probes)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    agree = lambda a: float(np.mean([a[s, i] == a[s, j] for s in range(sets) for i, j in pairs]))
    inv_bg = {v: k for k, v in BG_WORD.items()}
    words = [[p.split() for p in row] for row in prompts]
    bg = [[next((inv_bg[w] for w in ws if w in inv_bg), None) for ws in row] for row in words]
    shp = [[next((w for w in ws if w in SHAPES), None) for ws in row] for row in words]
    acc = lambda want, got: float(np.mean([g == w for rw, rg in zip(want, got) for w, g in zip(rw, rg) if w]))
    identity = float(_same_identity(pred).mean())
    return {"detail_agreement": agree(pred["detail"]), "color_agreement": agree(pred["color"]),
            "identity_agreement": identity, "shape_agreement": agree(pred["shape"]),
            "background_accuracy": acc(bg, pred["background"]), "shape_accuracy": acc(shp, pred["shape"]),
            **({} if masks is None else {"subject_similarity": subject_similarity(images, masks, probes),
                                         "layout_overlap": layout_overlap(masks)})}


@torch.no_grad()
def subject_mask_iou(pipe, n: int = 8, start: int = 0, args=None) -> dict:
    """ConsiStory's subject masks against ground truth: held-out renders are DDIM-inverted with their prompt
    (guidance 1) and regenerated under mask tracking; IoU of the 16x16 mask at every step and at the end
    (generations have no ground truth). `whole_image_iou` is what a mask covering everything would score.
    `args`: a `ConsiStoryArgs` (default: the vanilla rung of its ladder)."""
    from ..hooks import token_index
    from ..inversion import ddim_invert
    from ..metrics import iou
    from ..papers.consistory import ABLATIONS, ConsiStoryRun, consistory
    from . import ToyDataset, describe

    ds = ToyDataset("heldout", start + n, n_objects=1)
    per_step, final, area = [], [], []
    for i in range(start, start + n):
        r = ds[i]
        text, word = describe(r.scene), r.scene.objects[0].shape
        inv = ddim_invert(pipe, r.image, text, num_inference_steps=20, progress=False)
        ids = [[token_index(pipe.tokenizer, text, word)]]
        run = ConsiStoryRun(replace(args or ABLATIONS["vanilla"], sdsa=False, inject=False), ids, n_steps=20, halves=1)
        with consistory(pipe.unet, run):
            pipe(text, latents=inv.noise, num_inference_steps=20, guidance_scale=1.0, output_type="latent")
            run.end_step()
        gt = F.interpolate(torch.from_numpy(r.masks[0]).float()[None, None], size=(16, 16), mode="area")[0, 0] > 0.5
        per_step.append([iou(m[0], gt) for m in run.masks_per_step[1:]])
        final.append(iou(run.masks(16).view(16, 16), gt))
        area.append(float(gt.float().mean()))
    ps = np.mean(per_step, 0)
    return {"n": n, "final_iou": float(np.mean(final)), "iou_at_steps": {s: float(ps[s - 1]) for s in (1, 5, 10, 19)},
            "gt_area": float(np.mean(area)), "whole_image_iou": float(np.mean(area))}


# --- DiffSim: style = background pattern, content = shape class -----------------------------------------------
def triplets(kind: str, n: int, split: str = "heldout", seed: int = 0, world: str = TOY_WORLD):
    """(reference, positive, negative) uint8 image stacks of shape (n, 64, 64, 3) with known answers.

    The negative is always an edit of the reference scene (same layout, one attribute changed), so it is the
    closer image pixel by pixel; the positive shares the attribute under test but is laid out anew.
    style:   positive = the reference's background pattern behind another object; negative = the reference
             itself with another background pattern (its content points the wrong way).
    content: positive = the reference's object (shape, colour, detail) in a new pose on a new background of the
             same pattern; negative = the reference with another object (shape and colour) in the same pose.
    shape:   as content, but the positive's colour is drawn anew and the negative keeps the reference's colour:
             only the shape class tells them apart.
    `world`: the world whose scenes are rendered (its identity is a detail mark or a pattern).
    """
    kinds = ("style", "content", "shape")
    if kind not in kinds:
        raise ValueError(f"kind must be one of {kinds}, got {kind!r}")
    details, out = world_config(world).details, []
    for i in range(n):
        rng = scene_rng(split, 10_000 * (1 + seed) + i)
        pick = lambda values, k: [str(v) for v in rng.choice(values, k, replace=False)]
        (s0, s1), (c0, c1), (b0, b1), d0 = pick(SHAPES, 2), pick(list(COLORS), 2), pick(BACKGROUNDS, 2), pick(details, 1)[0]
        ref = random_scene(rng, n_objects=1, world=world, shape=s0, color=c0, detail=d0, background=b0)
        obj = ref.objects[0]
        if kind == "style":
            pos = random_scene(rng, n_objects=1, world=world, shape=s1, color=c1, background=b0)
            neg = replace(ref, background=b1)
        else:
            pos = random_scene(rng, n_objects=1, world=world, shape=s0, background=b0,
                               **(dict(color=c0, detail=d0) if kind == "content" else {}))
            neg = replace(ref, objects=[replace(obj, shape=s1, color=c1 if kind == "content" else c0)])
        out.append([render(s).image for s in (ref, pos, neg)])
    return tuple(np.stack(x) for x in zip(*out))


# --- Hyperfeatures: keypoint pairs ----------------------------------------------------------------------------
def object_points(shape: str, n: int) -> np.ndarray:
    """n fixed points (u, v) inside `shape`'s object frame, the same on every call: point "p{k}" of a keypoint pair
    is one place on the object in every image of the class, so pairs can be re-paired
    (`hyperfeatures_train.cross_pairs`)."""
    uv = np.random.default_rng([7919, SHAPES.index(shape)]).uniform(-1, 1, (40 * n + 40, 2))
    return uv[inside_shape(shape, uv[:, 0], uv[:, 1])][:n]


def keypoint_pairs(n: int, split: str = "train", seed: int = 0, classes=("heart", "triangle"),
                   max_angle: float = math.pi / 4, min_keypoints: int = 2, extra_points: int = 0,
                   size: int | None = None, world: str = TOY_WORLD) -> list[Pair]:
    """Pairs of toy renders of one keypoint class with different pose (rotation within +-max_angle each),
    scale, position, colour and background; the keypoints visible in both, matched by name; boxes from masks.
    `classes` may be any of the renderer's keypoint classes (heart, moon, triangle).
    `extra_points` adds up to that many matched object points ("p0", ...: `object_points`, those both renders show;
    same images): more supervision a pair (ours; the toy world knows both poses). `size` renders the same scenes
    larger; `world` picks a world variant."""
    scene_rng(split, 0)  # validates the split name
    if bad := [c for c in classes if c not in KEYPOINTS]:
        raise ValueError(f"classes {bad} have no keypoints; allowed: {sorted(KEYPOINTS)}")
    pairs = []
    for i in range(n):
        rng = np.random.default_rng([SPLITS[split], 7919, seed, i])  # apart from the model's training scenes [0, i]
        shape = classes[i % len(classes)]
        for _ in range(100):
            colors, bgs = rng.permutation(list(COLORS))[:2], rng.permutation(list(BACKGROUNDS))[:2]
            r = [render(random_scene(rng, 1, size=size or IMAGE_SIZE, world=world, shape=shape, color=str(c),
                                     background=str(b), angle=rng.uniform(-max_angle, max_angle))) for c, b in zip(colors, bgs)]
            names = tuple(k for k, (_, _, v) in r[0].keypoints[0].items() if v and r[1].keypoints[0][k][2])
            if len(names) >= min_keypoints:
                break
        else:
            raise RuntimeError(f"no pair with {min_keypoints} visible keypoints for {shape}")
        kps = [np.array([r[j].keypoints[0][k][:2] for k in names]) for j in (0, 1)]
        if extra_points:  # the class's object points mapped through both poses, kept where both renders show them
            uv = object_points(shape, extra_points)
            xy = [np.stack(to_pixels(r[j].scene.objects[0], uv[:, 0], uv[:, 1]), 1) for j in (0, 1)]
            ok = np.ones(len(uv), bool)
            for j in (0, 1):
                c, side = np.floor(xy[j]).astype(int), r[j].image.shape[0]
                ok &= ((c >= 0) & (c < side)).all(1) & r[j].masks[0][c[:, 1].clip(0, side - 1), c[:, 0].clip(0, side - 1)]
            kps = [np.concatenate([k, x[ok]]) for k, x in zip(kps, xy)]
            names = names + tuple(f"p{j}" for j in np.flatnonzero(ok))
        boxes = []
        for j in (0, 1):
            ys, xs = np.nonzero(r[j].masks[0])
            boxes.append(np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float))
        pairs.append(Pair(r[0].image, r[1].image, kps[0], kps[1], boxes[0], boxes[1], shape, names))
    return pairs


def write_spair_fixture(root, n: int, split: str = "test", size: int = 128, seed: int = 0) -> Path:
    """`n` toy pairs written in SPair-71k's layout (JPEGImages/<category>/*.jpg, PairAnnotation/<split>/*.json with
    integer pixel keypoints, as SPair's) for `diffnb.papers.spair.spair_pairs`: with no SPair folder, the real
    loader's path still runs. Here, not in `papers.spair`, because it renders toy pairs."""
    from PIL import Image

    if split not in SPAIR_SPLITS:
        raise ValueError(f"split must be one of {SPAIR_SPLITS}, got {split!r}")
    root = Path(root)
    (root / "PairAnnotation" / split).mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(keypoint_pairs(n, "train" if split == "trn" else "heldout", seed=seed, size=size)):
        (root / "JPEGImages" / p.category).mkdir(parents=True, exist_ok=True)
        names = [f"{split}_{seed}_{i:05d}_{side}.jpg" for side in "st"]
        for name, im in zip(names, (p.src_image, p.trg_image)):
            Image.fromarray(im).save(root / "JPEGImages" / p.category / name, quality=95)
        ann = {"pair_id": i, "category": p.category, "src_imname": names[0], "trg_imname": names[1],
               "src_imsize": [size, size, 3], "trg_imsize": [size, size, 3], "kps_ids": list(p.names),
               "src_kps": np.floor(p.src_kps).astype(int).tolist(), "trg_kps": np.floor(p.trg_kps).astype(int).tolist(),
               "src_bndbox": p.src_bbox.astype(int).tolist(), "trg_bndbox": p.trg_bbox.astype(int).tolist()}
        (root / "PairAnnotation" / split / f"{i:06d}-{names[0][:-4]}-{names[1][:-4]}:{p.category}.json").write_text(
            json.dumps(ann))
    return root

"""Scoring drivers and loaders for the benchmarks DiffSim (Song, Liu, Shou, ICCV 2025) reports.

Every DiffSim number is an agreement rate: given a reference and two candidates, does the metric find the
"right" one more similar? Only where the right answer comes from (human votes, folder membership, IP-Adapter
weight) differs, so every loader yields `Triplet`s (or style groups) and one driver scores them. Layouts below
are those read by the official drivers (showlab/DiffSim `night_main.py`, `style_main.py`, `ipref_main.py`)
and NIGHTS' own loader (ssundaram21/dreamsim `dataset/dataset.py`, `evaluation/score.py`):

NIGHTS      root/data.csv  id,left_vote,right_vote,votes,ref_path,left_path,right_path,prompt,split,is_imagenet
            (paths relative to root: ref/000/000.png, distort/000/000_0.png, ...). DiffSim scores split == "val".
            left_vote/right_vote are the majority vote (0/1); DreamSim also drops rows with votes < 6.
Sref        root/<style>/<image>.png: 508 Midjourney --sref styles x 4 images (InstantStyle: same shape). Any
            folder under root holding >= 2 .png/.jpg/.jpeg images is one group (style_main.py walks the tree).
IPref       root/<character>/{1.0,0.8,0.6,0.4,0.35,0.3,0.2}.png (generations at that IP-Adapter weight) and
            reference_root/<character>.JPG (the original). The higher-weight image must be the more similar.

    triplets = load_nights("nights")                                   # or load_ipref(...), style_triplets(...)
    triplets = load_nights(write_nights_fixture(tmp, ref, pos, neg))    # your own triplets in NIGHTS' layout
    two_afc_accuracy(triplets, lambda a, b: diffsim(pipe, a, b, layer, t), batch_size=8, size=512)  # .diffsim
"""
from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
NIGHTS_COLUMNS = ("ref_path", "left_path", "right_path", "left_vote", "right_vote", "split")
IPREF_PAIRS = (("1.0", "0.6"), ("0.8", "0.4"), ("0.6", "0.3"), ("0.4", "0.35"), ("0.3", "0.2"))  # ipref_main.py
Similarity = Callable[[list, list], Sequence[float]]


@dataclass(frozen=True)
class Triplet:
    """A reference and two candidates; `human_prefers_a` is the fraction of judges (or ground truth) choosing a."""

    ref: Path
    a: Path
    b: Path
    human_prefers_a: float = 1.0


@lru_cache(maxsize=64)  # retrieval compares one query against many: keep it (and small galleries) decoded
def _decode(path: Path, size: int | tuple[int, int] | None) -> np.ndarray:
    with Image.open(path) as im:
        im = im.convert("RGB")
        if size is not None:
            im = im.resize((size, size) if isinstance(size, int) else tuple(size), Image.BICUBIC)
        array = np.asarray(im, dtype=np.uint8)
    array.flags.writeable = False
    return array


def load_image(path: str | Path, size: int | tuple[int, int] | None = 512) -> np.ndarray:
    """(H, W, 3) uint8 RGB, resized to `size` (int = square, as DiffSim's `--image_size`).

    A writable copy of the cached decode, so callers may modify it (and torch.from_numpy does not warn).
    """
    return _decode(Path(path), size).copy()


def _require(path: Path, what: str, layout: str) -> Path:
    if not path.exists():
        raise ValueError(f"missing {what}: {path}\nexpected layout: {layout}")
    return path


def load_nights(root, split: str = "val", min_votes: int = 0) -> list[Triplet]:
    """NIGHTS triplets of one split. `min_votes=6` reproduces DreamSim's filter; DiffSim's driver applies none."""
    layout = "root/data.csv with columns " + ",".join(NIGHTS_COLUMNS) + " (paths relative to root)"
    root = Path(root)
    with open(_require(root / "data.csv", "NIGHTS annotation file", layout), newline="") as f:
        reader = csv.DictReader(f)
        header, rows = set(reader.fieldnames or ()), list(reader)
    missing = [c for c in NIGHTS_COLUMNS + (("votes",) if min_votes else ()) if c not in header]
    if missing:
        raise ValueError(f"{root / 'data.csv'} lacks column(s) {missing}\nexpected layout: {layout}")
    triplets = []
    for row in rows:
        if row["split"] != split or (min_votes and float(row["votes"]) < min_votes):
            continue
        left, right = float(row["left_vote"]), float(row["right_vote"])  # 0/1 majority; counts work too
        paths = [_require(root / row[c], f"image in row id={row.get('id')}", layout) for c in NIGHTS_COLUMNS[:3]]
        triplets.append(Triplet(*paths, human_prefers_a=left / (left + right) if left + right else 0.5))
    if not triplets:
        raise ValueError(f"{root / 'data.csv'} has no rows with split == {split!r}")
    return triplets


def write_nights_fixture(root, refs, positives, negatives, prompt: str = "toy", split: str = "val") -> Path:
    """Write triplets in NIGHTS' layout (data.csv + ref/NNN.png, distort/NNN_0.png, distort/NNN_1.png) and return
    `root`: the vote goes to the left image (the positive), one vote each. uint8 (H, W, 3) images, saved as PNG
    (lossless), so `load_nights` + `load_image` give back the very pixels (at `size=None` or their own size)."""
    refs, positives, negatives = (list(x) for x in (refs, positives, negatives))
    if not refs or not len(refs) == len(positives) == len(negatives):
        raise ValueError(f"need the same number (>= 1) of references, positives and negatives, got "
                         f"{len(refs)}, {len(positives)}, {len(negatives)}")
    root = Path(root)
    (root / "ref").mkdir(parents=True, exist_ok=True)
    (root / "distort").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, images in enumerate(zip(refs, positives, negatives)):
        paths = (f"ref/{i:03d}.png", f"distort/{i:03d}_0.png", f"distort/{i:03d}_1.png")
        for path, image in zip(paths, images):
            image = np.asarray(image)
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
                raise TypeError(f"images must be uint8 (H, W, 3) arrays, got {image.dtype} {image.shape}")
            Image.fromarray(image).save(root / path)
        rows.append(dict(id=i, left_vote=1, right_vote=0, votes=1, ref_path=paths[0], left_path=paths[1],
                         right_path=paths[2], prompt=prompt, split=split, is_imagenet=False))
    with open(root / "data.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def load_style_retrieval(root) -> dict[str, list[Path]]:
    """Groups for Sref / InstantStyle: {folder relative to root: its images}, for folders with >= 2 images."""
    layout = "root/<style>/<image>.png, >= 2 images in each of >= 2 style folders"
    root = _require(Path(root), "style benchmark folder", layout)
    groups = {}
    for folder in sorted(p for p in root.rglob("*") if p.is_dir()):
        images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if len(images) >= 2:
            groups[folder.relative_to(root).as_posix()] = images
    if len(groups) < 2:
        raise ValueError(f"{root} has {len(groups)} folder(s) with >= 2 images; expected layout: {layout}")
    return groups


def load_ipref(root, reference_root) -> list[Triplet]:
    """IPref: per character, the reference against the five weight pairs ipref_main.py compares."""
    layout = ("root/<character>/{" + ",".join(sorted({w for p in IPREF_PAIRS for w in p})) + "}.png and "
              "reference_root/<character>.JPG")
    root, reference_root = _require(Path(root), "IPref folder", layout), Path(reference_root)
    triplets = []
    for character in sorted(p for p in root.iterdir() if p.is_dir()):
        refs = [reference_root / f"{character.name}{s}" for s in (".JPG", ".jpg", ".png", ".jpeg")]
        ref = next((p for p in refs if p.exists()), None) or _require(refs[0], "IPref reference", layout)
        for hi, lo in IPREF_PAIRS:
            a, b = (_require(character / f"{w}.png", f"IP-weight {w} image", layout) for w in (hi, lo))
            triplets.append(Triplet(ref, a, b, human_prefers_a=1.0))
    if not triplets:
        raise ValueError(f"{root} has no character folders; expected layout: {layout}")
    return triplets


def style_triplets(groups: dict[str, list[Path]], n: int = 2000, seed: int = 2334) -> list[Triplet]:
    """The paper's Sref/InstantStyle score (style_main.py): n random (A, B same style; C another style) triplets.

    Its "accuracy" is the share with sim(A, B) > sim(A, C), i.e. `two_afc_accuracy` of these triplets.
    """
    rng, names = random.Random(seed), sorted(groups)
    triplets = []
    for _ in range(n):
        style_a, style_c = rng.sample(names, 2)
        a, b = rng.sample(groups[style_a], 2)
        triplets.append(Triplet(a, b, rng.choice(groups[style_c]), human_prefers_a=1.0))
    return triplets


def _scores(similarity: Similarity, images_a: list, images_b: list) -> np.ndarray:
    out = similarity(images_a, images_b)
    out = out.detach().float().cpu().numpy() if hasattr(out, "detach") else out  # torch tensors welcome
    out = np.asarray(out, dtype=np.float64).reshape(-1)
    if out.size != len(images_a):
        raise ValueError(f"similarity returned {out.size} scores for {len(images_a)} pairs")
    return out


def two_afc_accuracy(triplets: Sequence[Triplet], similarity: Similarity, batch_size: int = 8,
                     size: int | tuple[int, int] | None = 512) -> float:
    """NIGHTS' 2AFC score (DreamSim's `score_nights_dataset`), in [0, 1].

    Per triplet: the metric picks the candidate more similar to the reference, and earns the fraction of humans
    who picked the same one (`human_prefers_a` if it picks a, 1 - that if b, 0.5 for a tie); the mean over
    triplets. With 0/1 votes this is plain agreement, which is what DiffSim's drivers count (they break ties
    towards b). One `similarity` call per batch scores [ref..., ref...] against [a..., b...].
    """
    earned = []
    for start in tqdm(range(0, len(triplets), batch_size), desc="2AFC", unit="batch"):
        batch = triplets[start:start + batch_size]
        refs = [load_image(t.ref, size) for t in batch]
        candidates = [load_image(t.a, size) for t in batch] + [load_image(t.b, size) for t in batch]
        s = _scores(similarity, refs + refs, candidates)
        s_a, s_b, p = s[:len(batch)], s[len(batch):], np.array([t.human_prefers_a for t in batch])
        earned.append(np.where(s_a > s_b, p, np.where(s_b > s_a, 1 - p, 0.5)))
    return float(np.concatenate(earned).mean()) if earned else float("nan")


def retrieval_accuracy(groups: dict[str, list[Path]], similarity: Similarity, k: int = 1, batch_size: int = 8,
                       size: int | tuple[int, int] | None = 512) -> float:
    """Top-k hit rate: every image queries all others; a hit if any of its k most similar share its group.

    Costs N (N - 1) similarity calls, so it suits small galleries; the paper's Sref number is the cheaper
    `style_triplets` 2AFC score (its retrieval results were only visualised, retrieval_vis.py).
    """
    items = [(path, name) for name, paths in groups.items() for path in paths]
    if not 0 < k < len(items):
        raise ValueError(f"k={k} must be between 1 and {len(items) - 1} (the number of other images)")
    pairs = [(i, j) for i in range(len(items)) for j in range(len(items)) if i != j]
    sims = np.full((len(items), len(items)), -np.inf)
    for start in tqdm(range(0, len(pairs), batch_size), desc="retrieval", unit="batch"):
        batch = pairs[start:start + batch_size]
        s = _scores(similarity, [load_image(items[i][0], size) for i, _ in batch],
                    [load_image(items[j][0], size) for _, j in batch])
        sims[tuple(np.array(batch).T)] = s
    labels = np.array([name for _, name in items])
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # the query itself (-inf) ranks last
    return float((labels[top] == labels[:, None]).any(axis=1).mean())

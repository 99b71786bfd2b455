"""SPair-71k, the keypoint-correspondence benchmark of Diffusion Hyperfeatures: its loader (dataset code, not the
method; `hyperfeatures_eval` scores whatever `Pair`s it is given).

    pairs = spair_pairs(root, "trn", limit=24, seed=0)    # root/PairAnnotation/trn/*.json, root/JPEGImages/...

With no SPair folder, the toy world's `write_spair_fixture` (in its scoring module) writes toy pairs in the same
layout, so the loader's path still runs offline.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .hyperfeatures_train import Pair

SPAIR_SPLITS = ("trn", "val", "test")
SPAIR_FIELDS = ("src_imname", "trg_imname", "src_kps", "trg_kps", "src_bndbox", "trg_bndbox", "category")


def spair_pairs(root, split: str = "test", category: str | None = None, limit: int | None = None,
                seed: int | None = None) -> list[Pair]:
    """SPair-71k: root/PairAnnotation/<split>/*.json and root/JPEGImages/<category>/<imname>. Boxes are
    (xmin, ymin, xmax, ymax); keypoints are integer pixel indices, read as is (half a pixel off our convention).
    Files are read in name order (category by category); `seed` shuffles them first, as the official trainer
    permutes its pairs, so that `limit` draws from every category."""
    from PIL import Image

    if split not in SPAIR_SPLITS:
        raise ValueError(f"split must be one of {SPAIR_SPLITS}, got {split!r}")
    folder = Path(root) / "PairAnnotation" / split
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} not found: expected SPair-71k's PairAnnotation/<split>/*.json layout")
    load = lambda cat, name: np.array(Image.open(Path(root) / "JPEGImages" / cat / name).convert("RGB"))
    pairs = []
    files = sorted(folder.glob("*.json"))
    if seed is not None:
        files = [files[i] for i in np.random.default_rng(seed).permutation(len(files))]
    for f in files:
        d = json.loads(f.read_text())
        if missing := [k for k in SPAIR_FIELDS if k not in d]:
            raise ValueError(f"{f.name} lacks {missing}; SPair pair annotations have {SPAIR_FIELDS}")
        if category is not None and d["category"] != category:
            continue
        names = tuple(str(k) for k in d.get("kps_ids", ()))  # none: positions are no identity (cross_pairs refuses)
        pairs.append(Pair(load(d["category"], d["src_imname"]), load(d["category"], d["trg_imname"]), d["src_kps"],
                          d["trg_kps"], d["src_bndbox"], d["trg_bndbox"], d["category"], names))
        if limit is not None and len(pairs) >= limit:
            break
    return pairs

"""Small, exact metrics shared by notebooks, benchmarks and tests: general ones (a segmentation mIoU, 2AFC, PCK,
layout overlap), not any one paper's method, so a paper module imports them from here."""
from __future__ import annotations

import numpy as np
import torch


def _np(x) -> np.ndarray:
    """numpy of an array / tensor; uint8 and bool tensors keep their dtype (it says what the values mean)."""
    if not torch.is_tensor(x):
        return np.asarray(x)
    x = x.detach().cpu()
    return x.numpy() if x.dtype in (torch.uint8, torch.bool) else x.float().numpy()


def psnr(a, b, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB between two images (or batches), by scikit-image.

    uint8 images have their peak (255) from their type; float images need `data_range` (e.g. 1.0 for [0, 1], 255.0
    for unrounded 0..255 values): guessing it from the dtype, as scikit-image would, is how 0..255 floats end up
    scored against a peak of 1.
    """
    from skimage.metrics import peak_signal_noise_ratio

    a, b = _np(a), _np(b)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if data_range is None:
        if a.dtype != np.uint8 or b.dtype != np.uint8:
            raise ValueError(f"psnr of non-uint8 images ({a.dtype}, {b.dtype}) needs data_range= (1.0 for [0, 1], 255.0 "
                             f"for 0..255 floats)")
        data_range = 255.0
    a, b = a.astype(np.float64), b.astype(np.float64)
    if np.array_equal(a, b):
        return float("inf")  # scikit-image divides by zero here (and warns)
    return float(peak_signal_noise_ratio(a, b, data_range=data_range))


def otsu_threshold(values) -> float:
    """Otsu's threshold of a set of values (their maximum when all are equal, so nothing lies above it)."""
    from skimage.filters import threshold_otsu

    h = _np(values).astype(np.float64)
    return float(h.max()) if np.ptp(h) == 0 else float(threshold_otsu(h))


def otsu_mask(heat) -> np.ndarray:
    """Binary mask of a heat map thresholded with Otsu's method."""
    h = _np(heat)
    return h > otsu_threshold(h)


def _binary(x, what: str) -> np.ndarray:
    x = _np(x)
    if x.dtype != bool and not np.isin(x, (0, 1)).all():
        raise ValueError(f"{what} must be binary (bool or 0/1), got values in [{x.min():.3g}, {x.max():.3g}]: "
                         f"threshold a soft map first (e.g. otsu_mask)")
    return x.astype(bool)


def iou(a, b) -> float:
    """Intersection over union of two binary masks (1.0 when both are empty)."""
    a, b = _binary(a, "mask a"), _binary(b, "mask b")
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def color_fraction(images, rgb, tol: float = 80.0) -> float:
    """Fraction of pixels within `tol` (Euclidean, 0-255) of a colour: a crude, exact colour meter.

    `images` go through `diffnb.images.to_uint8` (so a [0, 1] float batch is measured on the 0..255 scale too)."""
    from .images import to_uint8

    if len(rgb) != 3:
        raise ValueError(f"rgb must be three 0..255 values, got {rgb!r}")
    x = to_uint8(images).astype(np.float64)
    return float((np.linalg.norm(x - np.asarray(rgb, dtype=np.float64), axis=-1) < tol).mean())


def paired_bootstrap(base, method, n: int = 10_000, level: float = 0.95, seed: int = 0) -> dict:
    """Mean gain of `method` over `base` on the same units (sets, images) with a percentile bootstrap interval
    (`scipy.stats.bootstrap` over the paired differences).

    A bar like "+0.3 over vanilla" measured on 24 sets is a noisy number; the interval says how noisy.
    """
    from scipy.stats import bootstrap

    a, b = _np(base).astype(np.float64).ravel(), _np(method).astype(np.float64).ravel()
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"need two equal-length lists of >= 2 paired values, got {a.size} and {b.size}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("paired_bootstrap got NaN or infinite values: drop or fix those units first")
    d = b - a
    if np.ptp(d) == 0:  # every resample has the same mean (scipy would warn about a degenerate distribution)
        lo = hi = float(d[0])
    else:
        res = bootstrap((d,), np.mean, n_resamples=n, confidence_level=level, method="percentile", vectorized=True,
                        rng=np.random.default_rng(seed))
        lo, hi = res.confidence_interval
    return {"gain": float(d.mean()), "low": float(lo), "high": float(hi), "level": level, "units": int(d.size)}


def mean_over_pairs(pairwise: torch.Tensor) -> float:
    """Mean over sets and over the pairs i < j of a (sets, n, n) matrix."""
    i, j = torch.triu_indices(pairwise.shape[1], pairwise.shape[1], 1)
    return float(pairwise[:, i, j].mean())


def layout_overlap(masks) -> float:
    """Mean pairwise IoU of the subject masks inside each set: 1 = every subject in the same place and size (the
    layout collapse that dropout and query mixing are there to prevent). masks (sets, n, r, r) bool."""
    m = torch.as_tensor(np.asarray(masks)).flatten(2).float()
    inter, area = m @ m.transpose(1, 2), m.sum(-1)
    return mean_over_pairs(inter / (area[:, :, None] + area[:, None, :] - inter).clamp(min=1))


def hungarian_miou(labels: np.ndarray, masks: np.ndarray) -> float:
    """mIoU over the ground-truth segments after one-to-one Hungarian matching of predicted segments to them
    (unmatched predicted segments count as wrong). labels: (H, W) ints; masks: (C, H, W) bool."""
    from scipy.optimize import linear_sum_assignment

    k = int(labels.max()) + 1
    pred = np.stack([labels == i for i in range(k)])
    inter = np.einsum("khw,chw->kc", pred.astype(np.int64), masks.astype(np.int64))
    union = pred.sum((1, 2))[:, None] + masks.sum((1, 2))[None] - inter
    iou = inter / np.maximum(union, 1)
    rows, cols = linear_sum_assignment(-iou)
    per_class = np.zeros(masks.shape[0])
    per_class[cols] = iou[rows, cols]
    return float(per_class.mean())


def overlap_miou(labels: np.ndarray, masks: np.ndarray) -> float:
    """mIoU over the ground-truth segments when more segments are predicted than there are regions (EmerDiff's
    over-segmented protocol): each predicted segment joins the ground-truth region it overlaps most, then the joined
    segments are scored against the regions. labels: (H, W) ints; masks: (C, H, W) bool, a partition."""
    labels, masks = np.asarray(labels), np.asarray(masks, bool)
    if labels.shape != masks.shape[1:]:
        raise ValueError(f"labels {labels.shape} and masks {masks.shape[1:]} differ in size")
    k = int(labels.max()) + 1
    inter = np.einsum("khw,chw->kc", np.stack([labels == i for i in range(k)]).astype(np.int64), masks.astype(np.int64))
    joined = inter.argmax(1)[labels]  # every pixel takes its segment's region
    return float(np.mean([(m & (joined == c)).sum() / max((m | (joined == c)).sum(), 1) for c, m in enumerate(masks)]))


def two_afc(sim_positive, sim_negative) -> float:
    """Fraction of triplets where the metric finds the positive more similar to the reference (ties count 0.5)."""
    p, n = torch.as_tensor(sim_positive, dtype=torch.float64), torch.as_tensor(sim_negative, dtype=torch.float64)
    return float(((p > n).double() + 0.5 * (p == n).double()).mean())


def pck(pred, gt, threshold) -> np.ndarray:
    """Per keypoint: is the prediction within `threshold` pixels (scalar or per keypoint) of the truth?"""
    return np.linalg.norm(np.asarray(pred, float) - np.asarray(gt, float), axis=-1) <= threshold

"""Small, exact metrics shared by notebooks and tests."""
from __future__ import annotations

import numpy as np
import torch


def _np(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio in dB between two uint8 images (or batches)."""
    a, b = _np(a).astype(np.float64), _np(b).astype(np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def otsu_threshold(values) -> float:
    """Otsu's threshold of a set of values (their maximum when all are equal, so nothing lies above it)."""
    from skimage.filters import threshold_otsu

    h = _np(values).astype(np.float64)
    return float(h.max()) if np.ptp(h) == 0 else float(threshold_otsu(h))


def otsu_mask(heat) -> np.ndarray:
    """Binary mask of a heat map thresholded with Otsu's method."""
    h = _np(heat)
    return h > otsu_threshold(h)


def iou(a, b) -> float:
    a, b = _np(a).astype(bool), _np(b).astype(bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def color_fraction(images, rgb, tol: float = 80.0) -> float:
    """Fraction of pixels within `tol` (Euclidean, 0-255) of a colour: a crude, exact colour meter."""
    x = _np(images).astype(np.float64)
    return float((np.linalg.norm(x - np.asarray(rgb, dtype=np.float64), axis=-1) < tol).mean())


def paired_bootstrap(base, method, n: int = 10_000, level: float = 0.95, seed: int = 0) -> dict:
    """Mean gain of `method` over `base` on the same units (sets, images) with a percentile bootstrap interval.

    A bar like "+0.3 over vanilla" measured on 24 sets is a noisy number; the interval says how noisy.
    """
    a, b = _np(base).astype(np.float64).ravel(), _np(method).astype(np.float64).ravel()
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"need two equal-length lists of >= 2 paired values, got {a.size} and {b.size}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    d = b - a
    means = d[np.random.default_rng(seed).integers(0, d.size, (n, d.size))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"gain": float(d.mean()), "low": float(lo), "high": float(hi), "level": level, "units": int(d.size)}

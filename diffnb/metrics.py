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

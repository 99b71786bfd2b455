import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")

from diffnb.metrics import color_fraction, iou, otsu_mask, paired_bootstrap, psnr
from diffnb.toyworld.evaluate import normalized_entropy
from diffnb.viz import anatomy_figure, browse, image_grid, overlay, pca_rgb, to_uint8, token_maps


def test_to_uint8_handles_ranges_and_layouts():
    """The range comes from the type and value_range, never from the values (see diffnb.images)."""
    assert to_uint8(-torch.ones(3, 4, 5)).shape == (4, 5, 3)  # tensors: channels-first, [-1, 1]
    assert to_uint8(-torch.ones(3, 4, 5)).max() == 0 and to_uint8(-torch.ones(2, 3, 4, 5)).shape == (2, 4, 5, 3)
    assert to_uint8(np.ones((4, 4, 3))).min() == 255 and to_uint8(np.zeros((4, 4, 3))).max() == 0  # numpy: [0, 1]
    assert to_uint8(-np.ones((4, 4, 3)), value_range=(-1, 1)).max() == 0
    with pytest.raises(ValueError, match="outside the range"):
        to_uint8(-np.ones((4, 4, 3)))  # was guessed to be [-1, 1]
    u = np.random.default_rng(0).integers(0, 256, (2, 6, 5, 3), dtype=np.uint8)
    assert (to_uint8(u) == u).all() and (to_uint8(list(u)) == u).all()
    assert (to_uint8(torch.from_numpy(u).permute(0, 3, 1, 2)) == u).all()  # uint8 tensors exactly
    assert (to_uint8(u / 255.0) == u).all() and (to_uint8(u.astype(np.float32), value_range=(0, 255)) == u).all()


def test_pca_rgb_shared_basis():
    a, b = torch.randn(8, 5, 5), torch.randn(8, 5, 5)
    out = pca_rgb([a, b])
    assert len(out) == 2 and out[0].shape == (5, 5, 3)
    assert min(o.min() for o in out) >= 0 and max(o.max() for o in out) <= 1 + 1e-6
    with pytest.raises(ValueError):
        pca_rgb(torch.randn(4, 4))


def test_figures_build():
    img = np.zeros((16, 16, 3), np.uint8)
    assert image_grid([img, img], ["a", "b"]) is not None
    assert image_grid([img, np.random.rand(4, 4), torch.rand(4, 4)]) is not None  # 2-D = heat maps
    with pytest.raises(ValueError):
        image_grid([img], ["a", "b"])
    assert overlay(img, np.random.rand(4, 4)).shape == (16, 16, 3)
    token_maps(img, torch.rand(4, 4, 2), ["x", "y"])
    with pytest.raises(ValueError):
        token_maps(img, torch.rand(4, 4, 3), ["x", "y"])
    rows = [dict(name="down_blocks.0.a.attn1", kind="self", resolution=16),
            dict(name="up_blocks.0.a.attn2", kind="cross", resolution=8)]
    anatomy_figure(rows)
    assert browse({("a", 1): img, ("a", 2): img}) is not None


def test_metrics():
    a = np.zeros((8, 8, 3), np.uint8)
    assert psnr(a, a) == float("inf") and abs(psnr(a, a + 1) - 48.13) < 0.01
    m = np.zeros((8, 8), bool)
    m[:4] = True
    assert iou(m, m) == 1.0 and iou(m, ~m) == 0.0
    u = np.random.default_rng(0).random((8, 8))
    heat = np.where(m, 0.6 + 0.4 * u, 0.4 * u)
    assert iou(otsu_mask(heat), m) == 1.0
    assert color_fraction(np.full((2, 2, 3), 200, np.uint8), (200, 200, 200)) == 1.0
    assert normalized_entropy(["a", "b"] * 5, ["a", "b"]) == pytest.approx(1.0)
    assert normalized_entropy(["a"] * 10, ["a", "b", "c"]) == 0.0


def test_paired_bootstrap():
    rng = np.random.default_rng(1)
    base = rng.random(40)
    r = paired_bootstrap(base, base + 0.3 + 0.05 * rng.standard_normal(40))
    assert r["low"] < r["gain"] < r["high"] and 0.27 < r["low"] and r["high"] < 0.33  # tight around +0.3
    noisy = paired_bootstrap(base, base + 0.3 + 0.5 * rng.standard_normal(40))
    assert noisy["high"] - noisy["low"] > 3 * (r["high"] - r["low"])  # more noise, wider interval
    assert paired_bootstrap([0, 0], [1, 1])["low"] == 1.0  # no spread, no width
    with pytest.raises(ValueError, match="equal-length"):
        paired_bootstrap([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="level"):
        paired_bootstrap([1, 2], [1, 2], level=1.5)

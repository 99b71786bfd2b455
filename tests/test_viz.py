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
            dict(name="up_blocks.0.attentions.1.attn1", kind="self", resolution=8),
            dict(name="up_blocks.0.attentions.0.attn2", kind="cross", resolution=8),
            dict(name="mid_block.attentions.0.attn1", kind="self", resolution=4)]  # attn_processors' order
    fig = anatomy_figure(rows)  # drawn in execution order: down, mid, then up's attention 0 before attention 1
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["down", "mid", "up", "up"]
    drawn = [c for c in fig.axes[0].collections if len(c.get_offsets())]
    orange = tuple(matplotlib.colors.to_rgba("tab:orange"))
    assert [tuple(c.get_facecolor()[0]) == orange for c in drawn] == [False, False, True, False]  # the cross layer 3rd
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


def test_paired_bootstrap_keeps_the_old_numbers():
    """scipy.stats.bootstrap (percentile) replaced a hand-written resampler: same gain and interval on a fixed example.
    The numbers are what the old code (integers(0, n, (10000, n)) draws from default_rng(0), np.quantile) gave."""
    rng = np.random.default_rng(1)
    base = rng.random(24)
    r = paired_bootstrap(base, base + 0.3 + 0.2 * rng.standard_normal(24))
    assert r["gain"] == pytest.approx(0.24940090475253887, abs=1e-12)
    assert r["low"] == pytest.approx(0.1654809855677095, abs=2e-3)
    assert r["high"] == pytest.approx(0.33413020774194147, abs=2e-3)


def test_psnr_is_scikit_image_with_the_peak_from_the_type():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-9, 10, a.shape), 0, 255).astype(np.uint8)
    mse = np.mean((a.astype(float) - b.astype(float)) ** 2)
    assert psnr(a, b) == pytest.approx(10 * np.log10(255**2 / mse), abs=1e-9)  # the old formula
    assert psnr(a / 255.0, b / 255.0, data_range=1.0) == pytest.approx(psnr(a, b), abs=1e-9)
    assert psnr(torch.from_numpy(a), torch.from_numpy(a)) == float("inf")


def test_claim_records_met_and_the_tour_prints_it(tmp_path, monkeypatch, capsys):
    from diffnb.nb import claim
    from diffnb.tour import table

    monkeypatch.setenv("DIFFNB_RESULTS", str(tmp_path))
    rows = [claim("01_x", "agreement", 0.9, 0.5, "> 0.8", met=True), claim("01_x", "speed", 1.5, target="<= 1.35x",
                                                                           met=False),
            claim("01_x", "reported only", 3.0)]  # the old positional call still works
    assert [r["met"] for r in rows] == [True, False, None]
    assert "✓" in capsys.readouterr().out
    import json
    saved = [json.loads(line) for line in (tmp_path / "01_x.jsonl").read_text().splitlines()]
    assert saved == rows
    out = table(saved).splitlines()
    assert "met" in out[0] and "✓" in out[1] and "✗" in out[2] and "✓" not in out[3] and "✗" not in out[3]
    assert "1 of 2 claims with a bar met" in out[-1]
    assert "met" in table([{k: v for k, v in rows[2].items() if k != "met"}])  # rows recorded before `met` existed


def test_the_tour_writes_results_markdown_with_its_stamp():
    from diffnb.tour import markdown

    rows = [dict(notebook="01_x", claim="agreement", value=0.9, baseline=0.5, target="> 0.8", met=True),
            dict(notebook="02_y", claim="gain", value=0.1, baseline=None, target=">= +0.3", met=False)]
    text = markdown(rows, "2026-12-06, commit abc1234, model toy, CPU (x86_64), torch 2.13.0")
    lines = text.splitlines()
    assert lines[0] == "# Measured claims" and "commit abc1234" in lines[2]
    assert "| 01_x | agreement | 0.9 | 0.5 | ✓ | > 0.8 |" in lines
    assert "| 02_y | gain | 0.1 |  | ✗ | >= +0.3 |" in lines
    assert lines[-1] == "1 of 2 claims with a bar met."


def test_draw_keypoint_pair_draws_both_sides_and_predictions():
    import matplotlib.pyplot as plt

    from diffnb.papers.hyperfeatures_train import Pair

    img = np.zeros((16, 12, 3), np.uint8)
    pair = Pair(img, np.zeros((20, 10, 3), np.uint8), [[1, 2], [3, 4], [5, 6]], [[2, 2], [4, 4], [6, 6]],
                [0, 0, 8, 8], [0, 0, 8, 8])
    fig, (a, b) = plt.subplots(1, 2)
    from diffnb.viz import draw_keypoint_pair
    draw_keypoint_pair(a, pair)
    draw_keypoint_pair(b, pair, pred=np.array([[1.0, 1.0]] * 3))
    assert a.images[0].get_array().shape == (16, 22, 3)  # side by side, cropped to the shorter height
    assert len(a.collections) == 6 and len(a.lines) == 0  # source and target point per keypoint
    assert len(b.collections) == 9 and len(b.lines) == 3  # + the prediction, joined to the truth
    with pytest.raises(ValueError, match=r"\(K, 2\)"):
        draw_keypoint_pair(b, pair, pred=np.zeros((2, 2)))
    plt.close(fig)


def test_mask_timeline_draws_a_panel_per_image_and_step():
    import matplotlib.pyplot as plt

    from diffnb.viz import mask_timeline

    masks = [None] + [torch.rand(3, 4, 4) > 0.5 for _ in range(5)] + [torch.rand(3, 16) > 0.5]
    images = np.zeros((3, 8, 8, 3), np.uint8)
    fig = mask_timeline(masks, images, steps=(0, 1, 3, 6, 40))  # 40: past the run, left out
    axes = np.array(fig.axes).reshape(2, 5)
    assert [ax.get_title() for ax in axes[0]] == ["image", "no mask yet, step 0", "mask, step 1", "mask, step 3",
                                                  "mask, step 6"]
    assert axes[1, 4].images[0].get_array().shape == (4, 4)
    plt.close(fig)
    with pytest.raises(ValueError, match="none of steps"):
        mask_timeline(masks, images, steps=(50,))


def test_print_table_aligns_columns(capsys):
    from diffnb.viz import print_table

    text = print_table({"vanilla": {"style": 0.5, "s / set": 1.25}, "StyleAligned (long)": {"style": 0.875}},
                       digits={"s / set": 1}, title="toy")
    assert capsys.readouterr().out == text + "\n"
    lines = text.splitlines()
    assert lines[0] == "toy" and len({len(l) for l in lines[1:]}) == 1  # every row as wide as the header
    assert lines[2].split() == ["vanilla", "0.50", "1.2"] and lines[3].endswith("0.88        -")
    with pytest.raises(TypeError, match="row name"):
        print_table([("a", 1)])


def test_the_tour_summarizes_recorded_claims_without_executing(tmp_path, capsys):
    from diffnb.nb import claim
    from diffnb.tour import main

    assert main(["--summarize", str(tmp_path)]) == 1  # nothing recorded: says so
    import os
    os.environ["DIFFNB_RESULTS"] = str(tmp_path)
    try:
        claim("04_x", "gain", 0.2, 0.1, ">= +0.1", met=True)
    finally:
        del os.environ["DIFFNB_RESULTS"]
    assert main(["--summarize", str(tmp_path)]) == 0
    assert "1 of 1 claims with a bar met" in capsys.readouterr().out

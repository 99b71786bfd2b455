"""The T4 time estimate's FLOP counts, checked against a count written out by hand from the architecture."""
import pytest

from diffnb import workload


def test_unet_flops_match_a_hand_count_of_its_attention_and_scale_with_the_latent_area():
    """SD1.5's UNet at 64 x 64 latents: a count by hand of only its self-attention score and value products
    (2 x tokens^2 x channels each, at 4096, 1024 and 256 tokens, 2 + 3 transformers per level as down / up, plus
    the 64-token mid block) must be a part of the total, and the total must grow faster than the latent area
    (attention is quadratic in it) but less than its square."""
    f64 = workload.flops_per_item("sd15", "unet", 64, 64)
    f32 = workload.flops_per_item("sd15", "unet", 32, 32)
    attention = sum(5 * 2 * (2 * n * n * c) for n, c in ((4096, 320), (1024, 640), (256, 1280))) + 2 * 2 * 64 * 64 * 1280
    assert 0.15 * f64 < attention < 0.6 * f64
    assert 4 < f64 / f32 < 16
    assert 0.7e12 < f64 < 0.9e12  # about 0.8 TFLOPs an item: published SD1.5 counts are of this order


def test_the_anchor_prices_itself_and_bad_names_are_named():
    a = workload.T4_ANCHOR
    tally = [["unet", 16, 16, a["unet_items"]], ["vae_decode", 16, 16, a["decodes"]]]
    assert workload.t4_seconds("sd15", tally) == pytest.approx(a["seconds"])
    with pytest.raises(ValueError, match="unknown architecture"):
        workload.flops_per_item("sd3", "unet", 8, 8)
    with pytest.raises(ValueError, match="unknown component"):
        workload.flops_per_item("sd15", "text", 8, 8)

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
    """One second of the anchor's work (1.79 iterations of 8 items at 64 x 64, tallied at the count mode's 16 x 16)
    costs one second; fp32 aggregator work is bounded by the fp32 peak."""
    a = workload.T4_ANCHOR
    items = a["iterations_per_second"] * a["unet_items_per_iteration"]
    assert workload.t4_seconds("sd15", [["unet", 16, 16, items]])["seconds"] == pytest.approx(1.0)
    layers = ["up_blocks.1.resnets.0", "up_blocks.3.resnets.2"]
    est = workload.t4_seconds("sd15", [["aggregator_train", 16, 16, 2, 11, 384, True, layers]])
    assert est["low"] < est["seconds"] < est["high"]
    with pytest.raises(ValueError, match="unknown architecture"):
        workload.flops_per_item("sd3", "unet", 8, 8)
    with pytest.raises(ValueError, match="unknown component"):
        workload.flops_per_item("sd15", "text", 8, 8)


def test_aggregator_flops_match_a_hand_count_of_its_convolutions():
    """One image through the aggregator's bottleneck for a 320-channel layer at 11 timesteps, 384-d, 64 x 64: the
    three convolutions and the projected shortcut (2 x in x out x k^2 per output pixel) make up nearly all of it;
    training with the checkpoint's second forward costs 3 to 4.5 forwards (the features need no gradient, so
    the first convolutions' backward is cheaper)."""
    mid, out, cin, px = 96, 384, 320, 64 * 64
    convs = 2 * px * (cin * mid + mid * mid * 9 + mid * out + cin * out) * 11
    fwd = workload.aggregator_flops("sd15", ("up_blocks.3.resnets.2",), 11, 384, 64, False, False)
    assert convs <= fwd < 1.1 * convs
    train = workload.aggregator_flops("sd15", ("up_blocks.3.resnets.2",), 11, 384, 64, True, True)
    assert 3 * fwd < train < 4.5 * fwd

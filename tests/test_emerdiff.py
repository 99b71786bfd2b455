"""EmerDiff: the modulation is where the mask says, batching changes nothing, the model is restored, evaluation."""
import numpy as np
import pytest
import torch

from diffnb.inversion import ddim_invert, encode_image
from diffnb.layers import resolution
from diffnb.papers.emerdiff import (EmerDiffArgs, difference_maps, hungarian_miou, lowres_segments,
                                    modulated_denoise, segment, upsample_labels)

TINY = dict(query_layer="up_blocks.1.attentions.0.transformer_blocks.0.attn2",
            modulate_layer="up_blocks.1.attentions.1.transformer_blocks.0.attn2",
            n_segments=3, num_inference_steps=5, t_m=401, strength=10.0)


def image(seed=0, size=64):
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def token_side(pipe):
    """Side of the up_blocks.1 feature map for a 64 px image."""
    return resolution(pipe.unet, TINY["query_layer"]) * (64 // pipe.vae_scale_factor) // pipe.unet.config.sample_size


def test_segment_shapes_and_restore(tiny):
    before = dict(tiny.unet.attn_processors)
    res = segment(tiny, image(), EmerDiffArgs(**TINY))
    side = token_side(tiny)
    assert res.lowres.shape == (side, side) and set(np.unique(res.lowres)) <= {0, 1, 2}
    assert res.differences.shape == (3, 64, 64) and res.labels.shape == (64, 64)
    assert res.images.shape == (7, 64, 64, 3) and res.images.dtype == np.uint8
    assert all(before[k] is v for k, v in tiny.unet.attn_processors.items())


def test_batched_equals_one_segment_at_a_time(tiny):
    args = EmerDiffArgs(**TINY)
    a, b = segment(tiny, image(1), args), segment(tiny, image(1), args, batched=False)
    np.testing.assert_allclose(a.differences, b.differences, atol=0.05)  # grey levels; float32 batch blocking only
    assert (a.labels == b.labels).mean() > 0.99


def test_modulation_only_where_the_mask_is(tiny):
    """A zero mask changes nothing; with injection off and one step, only the masked run differs from item 0."""
    args = EmerDiffArgs(**TINY)
    z0 = encode_image(tiny, image(2))
    x = ddim_invert(tiny, latents=z0, num_inference_steps=5, progress=False, stop_at=401).latents[-1]
    tokens = token_side(tiny) ** 2
    masks = torch.zeros(2, tokens)
    masks[1, : tokens // 2] = 1
    images = modulated_denoise(tiny, x, masks, args)
    assert images.dtype == np.float32  # not rounded: differences below one grey level must survive
    d = difference_maps(images)
    # a zero mask: item 0 and its twins differ only by float32 batch blocking (far below one grey level)
    assert d[0].max() < 0.01 and d[1].max() > 1.0


def test_t_m_off_the_grid_is_named(tiny):
    """The modulated step is the sampler's grid step nearest to t_m; off the grid the user is told which."""
    assert segment(tiny, image(), EmerDiffArgs(**TINY)).t_m == 401
    with pytest.warns(UserWarning, match="t_m=450 is not on the 5-step grid; modulating at 401"):
        assert segment(tiny, image(), EmerDiffArgs(**{**TINY, "t_m": 450})).t_m == 401


def test_restores_on_error_and_bad_input(tiny):
    before = dict(tiny.unet.attn_processors)
    handle = tiny.unet.conv_out.register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    try:
        with pytest.raises(RuntimeError, match="boom"):
            segment(tiny, image(), EmerDiffArgs(**TINY))
    finally:
        handle.remove()
    assert all(before[k] is v for k, v in tiny.unet.attn_processors.items())
    with pytest.raises(ValueError, match="one cross-attention layer"):
        segment(tiny, image(), EmerDiffArgs(**{**TINY, "query_layer": "up_blocks.1.attentions.0.transformer_blocks.0.attn1"}))
    with pytest.raises(ValueError, match="share a resolution"):
        segment(tiny, image(), EmerDiffArgs(**{**TINY, "query_layer": "up_blocks.0.attentions.0.transformer_blocks.0.attn2"}))
    with pytest.raises(TypeError, match="EmerDiffArgs"):
        segment(tiny, image(), dict(TINY))
    with pytest.raises(ValueError, match="no EmerDiff defaults"):
        EmerDiffArgs.for_model("sdxl-turbo")
    with pytest.raises(ValueError, match="one image"):
        segment(tiny, torch.cat([image(), image(1)]), EmerDiffArgs(**TINY))


def test_lowres_segments_cluster_queries(tiny):
    labels = lowres_segments(tiny, encode_image(tiny, torch.cat([image(3), image(4)])), EmerDiffArgs(**TINY))
    assert labels.shape[0] == 2 and all(len(np.unique(x)) == 3 for x in labels)


def test_hungarian_miou_and_upsampling():
    gt = np.zeros((2, 4, 4), bool)
    gt[0, :, :2], gt[1, :, 2:] = True, True  # left / right halves
    perfect = np.tile([1, 1, 0, 0], (4, 1))  # label ids swapped: matching must not care
    assert hungarian_miou(perfect, gt) == pytest.approx(1.0)
    shifted = np.tile([0, 0, 0, 1], (4, 1))  # left class gets 3 columns: IoU 2/3 and 1/2
    assert hungarian_miou(shifted, gt) == pytest.approx((2 / 3 + 1 / 2) / 2)
    extra = np.tile([0, 0, 1, 2], (4, 1))  # an unmatched third segment counts as wrong
    assert hungarian_miou(extra, gt) == pytest.approx((1 + 0.5) / 2)
    up = upsample_labels(np.array([[0, 1], [0, 1]]), 4, 2)
    assert (up == np.tile([0, 0, 1, 1], (4, 1))).all()


def test_ddpm_inversion_is_exact_and_segments(tiny):
    """Edit-friendly DDPM inversion: sampling from its start with its noises rebuilds x_0; EmerDiff runs on it."""
    from diffnb.inversion import ddpm_invert, unet_conditioning

    z0 = encode_image(tiny, image(5))
    inv = ddpm_invert(tiny, z0, 5, start_at=401)
    assert inv.timesteps == [401, 201, 1] and len(inv.noises) == 3
    x, cond = inv.start, unet_conditioning(tiny, "", 1, 1.0, 64, 64)
    for t, z in zip(inv.timesteps, inv.noises):
        x = tiny.scheduler.step(tiny.unet(x, t, **cond).sample, t, x, eta=1.0, variance_noise=z).prev_sample
    assert (x - z0).abs().max() < 1e-4 < (inv.start - z0).abs().max()
    res = segment(tiny, image(5), EmerDiffArgs(**TINY, inversion="ddpm"))
    assert res.differences.shape == (3, 64, 64) and res.t_m == 401
    with pytest.raises(ValueError, match="not a step"):
        ddpm_invert(tiny, z0, 5, start_at=450)
    with pytest.raises(ValueError, match="inversion must be"):
        EmerDiffArgs(inversion="ddim-ish")

"""EmerDiff: the modulation is where the mask says, batching changes nothing, the model is restored, evaluation;
the paper's Gaussian filter on real models (parity), tensors on the latents' device, batched decoding, SDXL
defaults, and image input."""
import functools
import types
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffnb.inversion import ddim_invert
from diffnb.pipeline import encode_image
from diffnb.layers import resolution
from diffnb.models import family, tiny_pipeline
from diffnb.papers import emerdiff
from diffnb.metrics import hungarian_miou
from diffnb.papers.emerdiff import (EmerDiffArgs, difference_maps, lowres_segments, modulated_denoise, segment,
                                    upsample_labels)

LAYERS = dict(query_layer="up_blocks.1.attentions.0.transformer_blocks.0.attn2",
              modulate_layer="up_blocks.1.attentions.1.transformer_blocks.0.attn2")
TINY = dict(**LAYERS, n_segments=3, num_inference_steps=5, t_m=401, strength=10.0)
pytestmark = pytest.mark.filterwarnings("ignore:query_layer .* works at")  # the tiny pipelines' up_blocks.1


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
    from diffnb.inversion import ddpm_invert
    from diffnb.pipeline import unet_conditioning

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


# --- fidelity: the paper's Gaussian filter on the difference maps, on by default on real models ----------------
def gaussian_blur(maps: np.ndarray, sigma: float) -> np.ndarray:
    """Written here from the definition, not from emerdiff: a normalised Gaussian kernel truncated at 3σ, applied
    separably along H and W, edges extended (replicate)."""
    r = int(3 * sigma)
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-x ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    t = F.pad(torch.as_tensor(maps, dtype=torch.float64)[:, None], (r, r, r, r), mode="replicate")
    t = F.conv2d(F.conv2d(t, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))
    return t[:, 0].numpy()


def test_real_model_defaults_filter_the_difference_maps(tiny, monkeypatch):
    """The paper Gaussian-filters d^i = ‖I⁻ − I⁺‖₂ "to suppress pixelated artifacts" before the argmax; our σ is
    half of SD's ×8 latent cell (4 px). Re-derived here from the decoded images the run itself produced."""
    decoded = []
    real_decode = emerdiff.decode_latents
    monkeypatch.setattr(emerdiff, "decode_latents", lambda *a, **k: decoded.append(real_decode(*a, **k)) or decoded[-1])
    args = EmerDiffArgs.for_model(family(tiny), **LAYERS, n_segments=3, num_inference_steps=5, t_m=401)
    res = segment(tiny, image(6), args)
    images = np.concatenate(decoded)  # float 0..255: [unmodulated, I+_1, I-_1, I+_2, I-_2, ...]
    assert images.dtype == np.float32 and len(images) == 7
    raw = np.sqrt(((images[2::2].astype(np.float64) - images[1::2]) ** 2).sum(-1))  # ‖I⁻ − I⁺‖₂ over RGB
    expected = gaussian_blur(raw, 4.0)
    assert np.abs(expected - raw).max() > 0.1  # the filter is visible on these maps
    np.testing.assert_allclose(res.differences, expected, rtol=1e-4, atol=1e-3)
    assert (res.labels == expected.argmax(0)).mean() > 0.999
    assert EmerDiffArgs().smooth_sigma == EmerDiffArgs.for_model("sdxl").smooth_sigma == 4.0


# --- crashes --------------------------------------------------------------------------------------------------
def on_cpu(fn):
    @functools.wraps(fn)
    def wrapped(*a, **k):
        with torch.device("cpu"):
            return fn(*a, **k)
    return wrapped


def test_every_tensor_on_the_latents_device(tiny, monkeypatch):
    """On CUDA every segment() died: the k-means timestep was built on the CPU. Under a meta default device a
    tensor built without device= lands on meta, as it would land on the CPU next to a CUDA model. The shared
    helpers (text encoding: the tokenizer's tensors; inversion; decoding) run with the CPU default: this checks
    EmerDiff's own code."""
    for name in ("unet_conditioning", "encode_image", "ddim_invert", "ddpm_invert", "decode_latents"):
        monkeypatch.setattr(emerdiff, name, on_cpu(getattr(emerdiff, name)))
    picture = image(7)
    for inversion in ("ddpm", "ddim"):
        with torch.device("meta"):
            res = segment(tiny, picture, EmerDiffArgs(**TINY, inversion=inversion))
        assert res.labels.shape == (64, 64) and np.isfinite(res.differences).all()


def test_decodes_in_batches(tiny, monkeypatch):
    """41 images at 512² decoded at once need ≈ 23 GiB: the 2K + 1 runs are decoded decode_batch_size at a time."""
    sizes = []
    real_decode = emerdiff.decode_latents
    monkeypatch.setattr(emerdiff, "decode_latents", lambda p, x, **k: sizes.append(len(x)) or real_decode(p, x, **k))
    args = EmerDiffArgs(**TINY, decode_batch_size=2)
    res = segment(tiny, image(1), args)
    assert sizes == [2, 2, 2, 1]
    whole = segment(tiny, image(1), replace(args, decode_batch_size=64))
    np.testing.assert_allclose(res.differences, whole.differences, atol=0.05)
    assert EmerDiffArgs.for_model("sd15").decode_batch_size <= 8 and EmerDiffArgs.for_model("sdxl").decode_batch_size == 1


@pytest.mark.parametrize("arch, side", [("sd15", 16), ("sdxl", 32)])
def test_model_defaults_name_the_lowest_cross_attention_up_block(arch, side):
    """The paper's layers are in the 16×16 up block of SD at 512²; on SDXL (1024²) the lowest cross-attention up
    block is up_blocks.0 at 32×32. The real architectures, built on the meta device (no weights)."""
    from diffusers import UNet2DConditionModel

    from diffnb.models import UNET_CONFIGS

    with torch.device("meta"):
        pipe = types.SimpleNamespace(unet=UNet2DConditionModel(**UNET_CONFIGS[arch]))
    args = EmerDiffArgs.for_model(arch)
    query, modulated = emerdiff._check_layers(pipe, args, warn=True)
    blocks = [n for n in pipe.unet.attn_processors if n.startswith(query.rsplit(".attentions.", 1)[0] + ".")]
    cross = [n[: -len(".processor")] for n in blocks if ".attn2." in n]
    assert resolution(pipe.unet, query) == resolution(pipe.unet, modulated) == side
    assert (query, modulated) == (cross[0], cross[-1])  # the block's first and last cross-attention
    if arch == "sdxl":  # the SD1.5 defaults on SDXL: a layer at 64², named in a warning
        with pytest.warns(UserWarning, match="lowest-resolution cross-attention up block"):
            emerdiff._check_layers(pipe, EmerDiffArgs(), warn=True)


# --- input handling -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd15():
    return tiny_pipeline("sd15")


def test_images_in_every_documented_form_agree(sd15):
    """uint8 numpy HWC, uint8 torch CHW and float torch in [-1, 1] are the same image (a uint8 tensor used to wrap
    around in image * 2 - 1); a grayscale image is its RGB stack."""
    args = EmerDiffArgs(**TINY)
    rgb = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    ref = segment(sd15, rgb, args)
    as_uint8 = segment(sd15, torch.from_numpy(rgb).permute(2, 0, 1), args)
    as_float = segment(sd15, torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1, args)
    for other in (as_uint8, as_float):
        assert (other.labels == ref.labels).all()
        np.testing.assert_allclose(other.differences, ref.differences, atol=1e-3)
    gray = rgb[..., 0]
    from_gray = segment(sd15, gray, args)
    assert (from_gray.labels == segment(sd15, np.repeat(gray[..., None], 3, -1), args).labels).all()


def test_non_square_images(sd15):
    res = segment(sd15, (np.random.default_rng(1).random((64, 128, 3)) * 255).astype(np.uint8), EmerDiffArgs(**TINY))
    assert res.labels.shape == (64, 128) and res.differences.shape == (3, 64, 128)
    assert res.lowres.shape[1] == 2 * res.lowres.shape[0]
    assert upsample_labels(res.lowres, (64, 128), 3).shape == (64, 128)


@pytest.mark.parametrize("bad, error, phrase", [
    (np.zeros((62, 64, 3), np.uint8), ValueError, "multiples of 4 px"),
    (np.zeros((64, 64, 4), np.uint8), ValueError, "alpha"),
    (np.full((64, 64, 3), 200, np.float32), ValueError, "pass a uint8 image"),  # float arrays are [0, 1]
    (torch.full((3, 64, 64), 200.0), ValueError, "pass a uint8 image"),
    (torch.zeros(2, 3, 64, 64, dtype=torch.uint8), ValueError, "one image"),
    (torch.zeros(3, 64, 64, dtype=torch.int64), TypeError, "must be uint8"),
    (np.zeros((64, 64, 2), np.uint8), ValueError, "3 \\(RGB\\) channels"),
    ("image.png", TypeError, "PIL image"),
])
def test_bad_images_are_named(sd15, bad, error, phrase):
    with pytest.raises(error, match=phrase):
        segment(sd15, bad, EmerDiffArgs(**TINY))


def test_bad_args_are_named(sd15):
    with pytest.raises(ValueError, match=r"only 1024 tokens \(32×32\)"):  # checked before the 2K + 1 runs
        segment(sd15, image(), EmerDiffArgs(**{**TINY, "n_segments": 5000}))
    for bad, phrase in ((dict(n_segments=1), "n_segments"), (dict(decode_batch_size=0), "decode_batch_size"),
                        (dict(smooth_sigma=-1.0), "smooth_sigma")):
        with pytest.raises(ValueError, match=phrase):
            EmerDiffArgs(**bad)

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffnb.hooks import capture
from diffnb.inversion import ddim_invert
from diffnb.pipeline import unet_conditioning
from diffnb.metrics import pck
from diffnb.papers import hyperfeatures as hf, hyperfeatures_eval as hfe, hyperfeatures_train as hft
from diffnb.papers.spair import spair_pairs
from diffnb.toyworld.scoring import keypoint_pairs, write_spair_fixture
from tests.conftest import gen

torch.set_num_threads(1)


def _images(n, size=32, seed=0):
    return list((np.random.default_rng(seed).random((n, size, size, 3)) * 255).astype(np.uint8))


def _hook_count(unet):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules())


def _up_resnets(unet):
    return [n for n, m in unet.named_modules() if type(m).__name__ == "ResnetBlock2D" and n.startswith("up_blocks")]


# --- extraction -------------------------------------------------------------------------------------------------
def test_inversion_features_shapes_layers_steps(tiny):
    before = _hook_count(tiny.unet)
    f = hf.inversion_features(tiny, _images(3), steps=[0, 2], num_inference_steps=3, batch_size=2, progress=False)
    assert f.layers == _up_resnets(tiny.unet) and len(f) == 3 and f.steps == [0, 2]
    assert f.timesteps == sorted(f.timesteps) and len(set(f.timesteps)) == 2
    for name, x in f.maps.items():
        conv2 = tiny.unet.get_submodule(name + ".conv2")
        assert x.shape[:3] == (3, 2, conv2.out_channels) and x.shape[-1] in (4, 8, 16)
    assert _hook_count(tiny.unet) == before
    small = hf.inversion_features(tiny, _images(2), layers="up_blocks.*", steps=1, num_inference_steps=3, size=8,
                                  dtype=torch.float16, progress=False)
    assert small.layers == f.layers
    for name, v in small.maps.items():  # size caps: larger maps downsampled, smaller ones kept
        assert v.shape[1:] == (1, v.shape[2], min(8, f.maps[name].shape[-1]), min(8, f.maps[name].shape[-1]))
        assert v.dtype == torch.float16


def test_features_stay_on_the_pipeline_device_in_its_dtype(tiny, monkeypatch):
    """Crash fix: features were offloaded to the host (14 GiB for SD1.5 at the paper's settings) and resized in
    fp32. Now no host copy is asked for, and a capped map is in the UNet's dtype (here bf16), where the UNet ran."""
    offloads = []

    def spy(*args, **kwargs):
        offloads.append(kwargs.get("offload", "cpu"))  # capture's default is "cpu"
        return capture(*args, **kwargs)

    monkeypatch.setattr(hf, "capture", spy)
    pipe = copy.deepcopy(tiny).to(dtype=torch.bfloat16)
    f = hf.inversion_features(pipe, _images(2), steps=[0, 1], num_inference_steps=2, size=4, progress=False)
    assert offloads == [None]
    assert all(v.dtype == torch.bfloat16 and v.device == pipe.device for v in f.maps.values())
    assert max(v.shape[-1] for v in f.maps.values()) == 4


def test_capped_features_give_the_aggregator_the_same_input(tiny):
    """Downsampling at extraction is what the aggregator would do itself: descriptors are unchanged."""
    kw = dict(steps=[0, 1], num_inference_steps=2, progress=False)
    full, capped = hf.inversion_features(tiny, _images(2), **kw), hf.inversion_features(tiny, _images(2), size=4, **kw)
    torch.manual_seed(0)
    net = hf.AggregationNetwork.for_features(full, projection_dim=8, output_size=4).eval()
    with torch.no_grad():
        torch.testing.assert_close(net(full), net(capped), atol=1e-5, rtol=1e-5)


def test_model_images_is_what_extraction_inverts(tiny):
    """Notebook 03's timing cell times a bare inversion of `model_images(...)` against extraction: both must invert
    the same tensor at the model's resolution (the old cell inverted 64 px images against 512 px extraction)."""
    imgs = _images(2, size=20)
    x = hf.model_images(imgs, 32)
    assert x.shape == (2, 3, 32, 32) and x.min() >= -1 and x.max() <= 1 and x.min() < 0
    kw = dict(steps=[0, 1], num_inference_steps=2, image_size=32, progress=False)
    a, b = hf.inversion_features(tiny, imgs, **kw), hf.inversion_features(tiny, x, **kw)
    for name in a.layers:
        torch.testing.assert_close(a.maps[name], b.maps[name])
    bare = ddim_invert(tiny, image=x, num_inference_steps=2, progress=False)
    assert bare.latents[0].shape[-1] == 32 // tiny.vae_scale_factor


def test_one_step_model_is_the_clean_call(tiny):
    """Fidelity: the official loop's first call (label 49, t = -1) is on the clean latent and the one-step model is
    that call alone (t ~ 0). Our step 0 is it: a 1-step inversion's only call, at t = 1, not t = 981."""
    img = _images(1)
    many = hf.inversion_features(tiny, img, steps=[0, 49], num_inference_steps=50, progress=False)
    one = hf.inversion_features(tiny, img, steps=[0], num_inference_steps=1, progress=False)
    assert many.timesteps == [1, 981] and one.timesteps == [1]
    for name in many.layers:
        torch.testing.assert_close(many.select(steps=0).maps[name], one.maps[name])
    # the official saved labels 49, 45, ..., 5, 0 of 50 (label L = call 49 - L), clean call first
    assert hf.official_steps(50) == sorted(49 - L for L in [49, 45, 40, 35, 30, 25, 20, 15, 10, 5, 0])
    assert hf.official_steps(50)[0] == 0 and hf.official_steps(10) == [0, 4, 9]


def test_features_are_conv2_of_the_unet_call_at_that_inversion_step(tiny):
    """Step s of the features = the residual-branch conv2 output of a UNet call on latent x_s at timestep t_s."""
    img = _images(1)
    f = hf.inversion_features(tiny, img, steps=[1, 3], num_inference_steps=4, progress=False)
    block = hf.inversion_features(tiny, img, steps=[1, 3], num_inference_steps=4, site="block", progress=False)
    inv = ddim_invert(tiny, image=hf.model_images(img, 32), num_inference_steps=4, progress=False)
    cond = unet_conditioning(tiny, "", 1, 1.0, 32, 32)
    name = f.layers[-1]
    for j, s in enumerate([1, 3]):
        assert f.timesteps[j] == inv.timesteps[s]
        with capture(tiny.unet, [name + ".conv2", name]) as cache:
            tiny.unet(inv.latents[s], inv.timesteps[s], **cond)
        torch.testing.assert_close(f.maps[name][:, j], cache.get(name + ".conv2"), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(block.maps[name][:, j], cache.get(name), atol=1e-4, rtol=1e-4)
    assert (f.maps[name] - block.maps[name]).abs().max() > 1e-3  # the skip add makes the block output differ


def test_hooks_removed_on_exception(tiny):
    before = _hook_count(tiny.unet)
    with pytest.raises(ValueError, match="prompts"):  # raised inside the capture block, by ddim_invert
        hf.inversion_features(tiny, _images(1), prompt=["a cat", "a dog"], num_inference_steps=2, progress=False)
    assert _hook_count(tiny.unet) == before


def test_generation_features_index_like_inversion_and_keep_cond_half(tiny):
    n, steps = 3, [0, 2]
    images, f = hf.generation_features(tiny, ["a cat", "a dog"], steps=steps, num_inference_steps=n,
                                       guidance_scale=2.0, generator=gen(0))
    inv = hf.inversion_features(tiny, _images(1), steps=steps, num_inference_steps=n, progress=False)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    assert f.timesteps == inv.timesteps and f.steps == steps and f.layers == inv.layers
    name = f.layers[0]
    with capture(tiny.unet, [name + ".conv2"]) as cache:
        tiny(["a cat", "a dog"], num_inference_steps=n, guidance_scale=2.0, generator=gen(0), output_type="np")
    for j, s in enumerate(steps):  # inversion index s = generation step n-1-s; CFG batch [uncond, cond]
        full = cache.get(name + ".conv2", n - 1 - s)
        assert full.shape[0] == 4
        torch.testing.assert_close(f.maps[name][:, j], full[2:])


# --- aggregation network and training -------------------------------------------------------------------------
def _synthetic(n_pairs=4, seed=0):
    """Random feature maps of two layers at two steps, and pairs whose keypoints sit on random pixels."""
    g = torch.Generator().manual_seed(seed)
    feats = hf.Hyperfeatures({"a": torch.randn(2 * n_pairs, 2, 8, 8, 8, generator=g),
                              "b": torch.randn(2 * n_pairs, 2, 16, 4, 4, generator=g)}, [0, 5], [1, 501])
    rng = np.random.default_rng(seed)
    img = np.zeros((16, 16, 3), np.uint8)
    pairs = [hft.Pair(img, img, rng.uniform(1, 15, (4, 2)), rng.uniform(1, 15, (4, 2)), [0, 0, 16, 16], [0, 0, 16, 16])
             for _ in range(n_pairs)]
    return hft.PairFeatures(pairs, feats)


def test_mixing_weights_sum_to_one_and_gradients_flow():
    data = _synthetic()
    net = hf.AggregationNetwork.for_features(data.features, projection_dim=16, output_size=8)
    w = net.mixing_weights()
    assert w.shape == (2, 2) and torch.allclose(w.sum(), torch.tensor(1.0)) and torch.allclose(w, torch.full((2, 2), 0.25))
    out = net(data.features.batch([0, 1]))
    assert out.shape == (2, 16, 8, 8)
    hft.correspondence_loss(out[0], out[1], data.pairs[0]).backward()
    assert net.mixing.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for b in net.bottlenecks for p in b.parameters())


def test_training_reduces_the_loss_and_moves_the_mixing_weights():
    data = _synthetic()
    torch.manual_seed(0)
    net = hf.AggregationNetwork.for_features(data.features, projection_dim=16, output_size=8)
    losses = hft.train_aggregator(net, data, steps=120, lr=3e-3, batch_pairs=2, progress=False)
    assert len(losses) == 120
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])
    assert not torch.allclose(net.mixing_weights(), torch.full((2, 2), 0.25))
    frozen = hf.AggregationNetwork.for_features(data.features, projection_dim=16, output_size=8)
    start = [p.clone() for p in frozen.parameters()]
    hft.train_aggregator(frozen, data, steps=5, lr=0.0, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(start, frozen.parameters()))


def _official_loss(src, trg, src_kps, trg_kps, src_hw, trg_hw):
    """Re-derived from the reference notes, plain loops: every source keypoint's descriptor (its grid cell) against
    ALL positions of the target's grid, logits cos / 0.07 (scale log(1/0.07) fixed), cross-entropy towards the
    target keypoint's cell; the same from target to source; the mean of both directions."""
    d, h, w = src.shape
    cell = lambda x, y, hw: min(int(math.floor(y * h / hw[0])), h - 1) * w + min(int(math.floor(x * w / hw[1])), w - 1)
    flat_s, flat_t = src.reshape(d, h * w), trg.reshape(d, h * w)

    def one_way(a, b, ka, kb, ha, hb):
        total = 0.0
        for (xa, ya), (xb, yb) in zip(ka, kb):
            va = a[:, cell(xa, ya, ha)]
            logits = torch.stack([torch.dot(va, b[:, p]) / (va.norm() * b[:, p].norm()) / 0.07 for p in range(h * w)])
            total = total + torch.logsumexp(logits, 0) - logits[cell(xb, yb, hb)]
        return total / len(ka)

    return (one_way(flat_s, flat_t, src_kps, trg_kps, src_hw, trg_hw)
            + one_way(flat_t, flat_s, trg_kps, src_kps, trg_hw, src_hw)) / 2


def test_loss_is_the_official_all_positions_objective():
    """Fidelity (issue 16): not a K x K contrast among the pair's keypoints. Non-square images of two sizes,
    an 8x8 grid, keypoints anywhere (edges included)."""
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    for k in (1, 3, 7):
        src, trg = torch.randn(6, 8, 8, generator=g, dtype=torch.float64), torch.randn(6, 8, 8, generator=g, dtype=torch.float64)
        s_hw, t_hw = (40, 56), (72, 48)
        sk = np.c_[rng.uniform(0, s_hw[1], k), rng.uniform(0, s_hw[0], k)]
        tk = np.c_[rng.uniform(0, t_hw[1], k), rng.uniform(0, t_hw[0], k)]
        sk[0], tk[0] = (s_hw[1], 0.0), (0.0, t_hw[0])  # on the far edges: the last cell
        pair = hft.Pair(np.zeros((*s_hw, 3), np.uint8), np.zeros((*t_hw, 3), np.uint8), sk, tk, [0, 0, 9, 9],
                        [0, 0, 9, 9])
        expected = _official_loss(src, trg, sk, tk, s_hw, t_hw).item()
        assert hft.correspondence_loss(src, trg, pair).item() == pytest.approx(expected, rel=1e-9)
    assert hft.LOGIT_SCALE == pytest.approx(math.log(1 / 0.07))


def test_loss_reads_a_keypoint_as_its_grid_cell_and_learns_positions():
    img = np.zeros((16, 16, 3), np.uint8)
    src, trg = torch.randn(4, 4, 4), torch.randn(4, 4, 4)
    at = lambda s, t: hft.correspondence_loss(src, trg, hft.Pair(img, img, s, t, [0, 0, 16, 16], [0, 0, 16, 16])).item()
    assert at([[4.1, 8.2]], [[1.0, 15.0]]) == pytest.approx(at([[7.9, 11.9]], [[3.9, 12.1]]))  # same cells
    assert at([[4.1, 8.2]], [[1.0, 15.0]]) != pytest.approx(at([[3.9, 8.2]], [[1.0, 15.0]]))  # next cell
    # one matched keypoint still has 15 wrong cells to beat (a K x K contrast has nothing to learn from K = 1)
    assert at([[4.1, 8.2]], [[1.0, 15.0]]) > 0.1
    a, b = torch.zeros(4, 4, 4), torch.zeros(4, 4, 4)
    a[0], b[0], a[1, 0, 0], b[1, 2, 1] = 1.0, 1.0, 50.0, 50.0  # the keypoints' cells stand out in channel 1
    pair = hft.Pair(img, img, [[2.0, 2.0]], [[5.0, 9.0]], [0, 0, 16, 16], [0, 0, 16, 16])
    assert hft.correspondence_loss(a, b, pair).item() < 0.01
    assert hft.correspondence_loss(a, b.roll(1, dims=2), pair).item() > 10  # the match one cell off: confidently wrong


def test_low_memory_training_has_the_same_gradients_and_saves_less():
    """Crash fix: SD1.5 at the paper's settings saves ~12 GiB of activations a step; checkpointing one layer at a
    time gives the same gradients and keeps a fraction (measured with saved-tensor hooks)."""
    data = _synthetic()
    grads, saved = {}, {}
    for low in (False, True):
        torch.manual_seed(0)
        net = hf.AggregationNetwork.for_features(data.features, projection_dim=16, output_size=8, low_memory=low)
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = net(data.features.batch([0, 1]))
            loss = hft.correspondence_loss(out[0], out[1], data.pairs[0])
        loss.backward()
        grads[low], saved[low] = [p.grad.clone() for p in net.parameters()], total[0]
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b)
    assert saved[True] < 0.25 * saved[False], saved  # here the inputs dominate; SD1.5's ratio is ~1/10


# --- evaluation --------------------------------------------------------------------------------------------------
def test_pck_counts_within_threshold():
    gt = np.array([[10.0, 10.0]] * 4)
    pred = gt + np.array([[0, 0], [3, 4], [5, 0.1], [0, 10]])
    assert pck(pred, gt, 5.0).tolist() == [True, True, False, False]
    assert pck(pred, gt, np.array([1, 1, 6, 10])).tolist() == [True, False, True, True]


def test_evaluate_on_hand_made_descriptors():
    """One-hot maps put every prediction where we choose: offsets 0, 2, 5 and 10 px from the truth;
    target box 30 px -> threshold 3 px (2 of 4 correct); image 64 px -> 6.4 px (3 of 4)."""
    h = w = 64
    gt = np.array([[20.5, 20.5], [40.5, 20.5], [20.5, 40.5], [40.5, 40.5]])
    offsets = np.array([[0, 0], [2, 0], [0, 5], [-6, 8]])  # |(-6, 8)| = 10
    src = np.array([[5.5, 5.5], [10.5, 5.5], [5.5, 10.5], [10.5, 10.5]])
    sd, td = torch.zeros(4, h, w), torch.zeros(4, h, w)
    for k in range(4):
        sd[k, int(src[k, 1]), int(src[k, 0])] = 1
        x, y = (gt[k] + offsets[k]).astype(int)
        td[k, y, x] = 1
    img = np.zeros((h, w, 3), np.uint8)
    pair = hft.Pair(img, img, src, gt, [0, 0, 10, 10], [10, 5, 40, 30])
    pred = hfe.match_keypoints(sd, td, src, (h, w), (h, w))
    np.testing.assert_allclose(pred, gt + offsets)
    res = hfe.evaluate([sd, td], [pair], alpha=0.1)
    assert res == {"pck_img": 0.75, "pck_bbox": 0.5, "n": 4}
    assert hfe.evaluate([sd, td], [pair], alpha=0.2)["pck_bbox"] == 0.75  # 6 px: offset 5 now counts


def test_match_keypoints_upsamples_a_coarse_target_map():
    coarse = torch.zeros(2, 4, 4)
    coarse[0, 1, 2] = 1  # cell (row 1, col 2) of 4x4 -> pixels 16..31 x 32..47 at 64 px
    coarse[1] = 1 - coarse[0]
    q = torch.zeros(2, 64, 64)
    q[0] = 1
    (x, y), = hfe.match_keypoints(q, coarse, [[3.5, 3.5]], (64, 64), (64, 64))
    assert 32 <= x < 48 and 16 <= y < 32


def test_sample_descriptors_pixel_centre_convention():
    xs = torch.arange(8.0).view(1, 1, 8).expand(1, 8, 8)
    got = hfe.sample_descriptors(xs, [[3.5, 0.5], [6.5, 7.5], [4.0, 2.5]], (8, 8))[:, 0]
    torch.testing.assert_close(got, torch.tensor([3.0, 6.0, 3.5]))


def _max_numel(fn):
    """Largest tensor any aten op creates while fn runs (an instrumented allocation check on the CPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from torch.utils._pytree import tree_flatten

    class Track(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
            for t in tree_flatten(out)[0]:  # new storage only: views and in-place results allocate nothing
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                    Track.biggest = max(Track.biggest, t.numel())
            return out

    with Track():
        result = fn()
    return result, Track.biggest


def test_concat_baseline_is_the_concatenation_and_never_materialises_it():
    """Crash fix: the concatenation of every layer at full size (85 GiB for SD1.5) is never built. Where each block
    sits on the image's own pixel grid the result equals matching on the explicit concatenation of unit blocks."""
    g = torch.Generator().manual_seed(1)
    feats = hf.Hyperfeatures({"a": torch.randn(4, 2, 8, 16, 16, generator=g),
                              "b": torch.randn(4, 2, 24, 16, 16, generator=g)}, [0, 5], [1, 501])
    rng = np.random.default_rng(1)
    img = np.zeros((16, 16, 3), np.uint8)
    pairs = [hft.Pair(img, img, rng.integers(0, 16, (6, 2)) + 0.5, rng.integers(0, 16, (6, 2)) + 0.5, [0, 0, 16, 16],
                     [0, 0, 16, 16]) for _ in range(2)]
    cat = torch.cat([F.normalize(v.flatten(0, 1), dim=1).unflatten(0, v.shape[:2]).flatten(1, 2)
                     for v in feats.maps.values()], dim=1)  # (N, 64, 16, 16): what the old code built
    for a, b in zip(hfe.concat_predict(feats, pairs), hfe.predict(cat, pairs)):
        np.testing.assert_array_equal(a, b)
    _, biggest = _max_numel(lambda: hfe.concat_predict(feats, pairs))
    assert biggest <= 24 * 16 * 16 < cat[0].numel(), biggest  # one block of one image at most
    small = _synthetic(2)  # blocks at 8x8 and 4x4 on 16 px images: each block's cosine upsampled
    assert all(p.shape == (4, 2) for p in hfe.concat_predict(small.features, small.pairs))


def test_streamed_evaluation_equals_evaluation_on_all_features(tiny):
    pairs = keypoint_pairs(3, "heldout", size=32)
    kw = dict(steps=[0, 1], num_inference_steps=2)
    whole = hft.pair_features(tiny, pairs, progress=False, **kw).features
    methods = {"layer": lambda f, p: hfe.predict(hfe.layer_descriptors(f, f.layers[-1], 1), p),
               "concat": hfe.concat_predict}
    got = hfe.evaluate_streamed(tiny, pairs, methods, batch_pairs=2, progress=False, **kw)
    assert got["layer"] == hfe.evaluate(hfe.layer_descriptors(whole, whole.layers[-1], 1), pairs)
    assert got["concat"] == hfe.score(hfe.concat_predict(whole, pairs), pairs)


def test_training_and_evaluation_create_nothing_on_the_default_device():
    """Device bugs that only CUDA shows: inside torch.device("meta") every tensor made without an explicit device
    lands on meta, as it would land on the CPU beside a CUDA model. Nothing may."""
    data = _synthetic()
    net = hf.AggregationNetwork.for_features(data.features, projection_dim=16, output_size=8)
    with torch.device("meta"):
        losses = hft.train_aggregator(net, data, steps=2, progress=False)
        desc = hf.describe(net, data.features)
        res = hfe.evaluate(desc, data.pairs)
        hfe.concat_predict(data.features, data.pairs)
    assert len(losses) == 2 and desc.device.type == "cpu" and res["n"] == 16


def test_baseline_descriptors():
    data = _synthetic(2)
    assert hfe.layer_descriptors(data.features, "b", 5).shape == (4, 16, 4, 4)
    pix = hfe.pixel_descriptors(_images(2, 16), radius=1)
    assert pix[0].shape == (27, 16, 16) and pix[0].min() >= -1 and pix[0].max() <= 1
    sweep = hfe.sweep_layers(data)
    assert set(sweep) == {("a", 0), ("a", 5), ("b", 0), ("b", 5)} and all(0 <= v <= 1 for v in sweep.values())


# --- data -----------------------------------------------------------------------------------------------------------
def test_toy_pairs():
    pairs = keypoint_pairs(6, "train", seed=1)
    again = keypoint_pairs(6, "train", seed=1)
    other = keypoint_pairs(6, "heldout", seed=1)
    assert all(np.array_equal(a.src_image, b.src_image) for a, b in zip(pairs, again))
    assert not any(np.array_equal(a.src_image, b.src_image) for a, b in zip(pairs, other))
    for p in pairs:
        assert p.category in ("heart", "triangle") and len(p.names) >= 2 and p.src_kps.shape == (len(p.names), 2)
        assert not np.array_equal(p.src_image, p.trg_image)
        for kps, box in ((p.src_kps, p.src_bbox), (p.trg_kps, p.trg_bbox)):
            assert (kps >= box[:2]).all() and (kps <= box[2:]).all() and 8 < (box[2:] - box[:2]).max() <= 64
    dense = keypoint_pairs(3, "train", seed=1, extra_points=10)
    for p, d in zip(pairs, dense):
        assert np.array_equal(p.src_image, d.src_image) and d.names[:len(p.names)] == p.names
        extra = d.names[len(p.names):]  # the object points both renders show (v2: other objects may hide some)
        assert extra and list(extra) == [f"p{j}" for j in sorted(int(n[1:]) for n in extra)] and len(extra) <= 10
        np.testing.assert_array_equal(d.trg_kps[:len(p.names)], p.trg_kps)
        for kps, img in ((d.src_kps, d.src_image), (d.trg_kps, d.trg_image)):  # on the object: its colour, not pale bg
            px = img[kps[:, 1].astype(int), kps[:, 0].astype(int)].astype(int)
            saturation = (px.max(1) - px.min(1)) / np.maximum(px.max(1), 1)  # shade-free: v2's pattern darkens
            assert (saturation > 0.5).mean() > 0.8, px
    # colours differ: the mean object colour of source and target is not the same
    p = pairs[0]
    assert not np.allclose(p.src_image[int(p.src_kps[0, 1]), int(p.src_kps[0, 0])],
                           p.trg_image[int(p.trg_kps[0, 1]), int(p.trg_kps[0, 0])], atol=10)



def test_object_points_name_one_place_on_the_object_in_every_image():
    """`p{k}` is object_points(shape)[k] in every render: a similarity fitted to the named keypoints of any image
    (pixel = A * uv + B in complex numbers, y down) maps uv_k onto that image's p{k}."""
    from diffnb.toyworld.scoring import object_points
    from diffnb.toyworld.world import KEYPOINTS
    for p in keypoint_pairs(4, "train", seed=2, extra_points=12, classes=("heart", "triangle")):
        uv = object_points(p.category, 12)
        named = [n for n in p.names if not n.startswith("p")]
        w_named = 0.85 * np.array([complex(*KEYPOINTS[p.category][n]) for n in named])  # render pulls them in
        for kps in (p.src_kps, p.trg_kps):
            z = kps[:, 0] - 1j * kps[:, 1]
            A, B = np.linalg.lstsq(np.stack([w_named, np.ones_like(w_named)], 1), z[:len(named)], rcond=None)[0]
            idx = [int(n[1:]) for n in p.names[len(named):]]
            assert len(idx) >= 6
            np.testing.assert_allclose(z[len(named):], A * (uv[idx, 0] + 1j * uv[idx, 1]) + B, atol=1e-6)


def test_cross_pairs_match_keypoints_by_name_and_index_features_by_row():
    dense = keypoint_pairs(4, "train", seed=1, extra_points=8, classes=("heart", "triangle"))
    feats = _synthetic(4).features
    cross = hft.cross_pairs(hft.PairFeatures(dense, feats))
    # pairs alternate classes: hearts on rows 0, 1, 4, 5, triangles on 2, 3, 6, 7
    cat = {r: q.category for i, q in enumerate(dense) for r in (2 * i, 2 * i + 1)}
    assert len(cross.pairs) == 2 * 4 * 3 and len(set(cross.rows)) == 24 and all(a != b for a, b in cross.rows)
    assert all(cat[a] == cat[b] == q.category for q, (a, b) in zip(cross.pairs, cross.rows))
    kps = {}  # feature row -> {name: xy}, from the listed pairs
    for i, q in enumerate(dense):
        kps[2 * i], kps[2 * i + 1] = dict(zip(q.names, q.src_kps)), dict(zip(q.names, q.trg_kps))
    for q, (a, b) in zip(cross.pairs, cross.rows):
        assert set(q.names) == set(kps[a]) & set(kps[b])
        for n, xs, xt in zip(q.names, q.src_kps, q.trg_kps):
            np.testing.assert_array_equal(xs, kps[a][n])
            np.testing.assert_array_equal(xt, kps[b][n])
    same = hft.PairFeatures([dense[0], dense[0]], _synthetic(2).features)  # one image on two rows: no self-pairs
    assert not {(0, 2), (2, 0), (1, 3), (3, 1)} & set(hft.cross_pairs(same).rows)  # rows 0, 2 (1, 3): one image
    assert len(hft.cross_pairs(same).rows) == 4 * 3 - 4
    with pytest.raises(ValueError, match="names"):
        hft.cross_pairs(_synthetic(2))  # synthetic pairs have no keypoint names
    for rows in ([(0, 1), (2, 3), (4, 8), (6, 7)], [(0, 1, 2), (2, 3), (4, 5), (6, 7)], [(0, 1.5), (2, 3), (4, 5), (6, 7)]):
        with pytest.raises(ValueError, match="rows"):
            hft.PairFeatures(dense, feats, rows=rows)
    with pytest.raises(ValueError, match="one distinct name per keypoint"):
        hft.Pair(dense[0].src_image, dense[0].trg_image, dense[0].src_kps, dense[0].trg_kps, dense[0].src_bbox,
                 dense[0].trg_bbox, "heart", dense[0].names[:-1])


def test_pck_gain_is_the_pooled_difference_with_an_interval_over_pairs():
    a = [np.array([True, True]), np.array([True, False]), np.array([True, True, True])]
    b = [np.array([False, True]), np.array([False, False]), np.array([True, True, False])]
    g = hfe.pck_gain(a, b)
    assert g["gain"] == pytest.approx(100 * (6 - 3) / 7) and g["pairs"] == 3 and g["low"] <= g["gain"] <= g["high"]
    assert hfe.pck_gain(b, a)["gain"] == pytest.approx(-g["gain"])
    with pytest.raises(ValueError, match="same pairs"):
        hfe.pck_gain(a, b[:2])
    with pytest.raises(ValueError, match="predictions"):
        hfe.pair_hits([np.zeros((2, 2))], [])


def test_train_aggregator_reads_each_pair_at_its_rows():
    """The same pairs with their images stored in reverse order and `rows` pointing there train identically; read
    as the default layout [src_0, trg_0, ...], they would not."""
    data = _synthetic(3)
    rev = hf.Hyperfeatures({k: v.flip(0) for k, v in data.features.maps.items()}, data.features.steps,
                           data.features.timesteps)
    moved = hft.PairFeatures(data.pairs, rev, rows=[(5 - 2 * i, 4 - 2 * i) for i in range(3)])
    runs = []
    for d in (data, moved, hft.PairFeatures(data.pairs, rev)):
        torch.manual_seed(0)
        net = hf.AggregationNetwork.for_features(d.features, projection_dim=8, output_size=8)
        runs.append(hft.train_aggregator(net, d, steps=5, seed=0, progress=False))
    np.testing.assert_allclose(runs[0], runs[1], rtol=1e-5)
    assert not np.allclose(runs[0], runs[2])

def _write_spair(root, pairs):
    from PIL import Image

    for i, (cat, size) in enumerate(pairs):
        (root / "JPEGImages" / cat).mkdir(parents=True, exist_ok=True)
        (root / "PairAnnotation" / "test").mkdir(parents=True, exist_ok=True)
        for name in (f"s{i}.jpg", f"t{i}.jpg"):
            Image.fromarray(np.full((size[1], size[0], 3), 100, np.uint8)).save(root / "JPEGImages" / cat / name)
        ann = {"pair_id": i, "category": cat, "src_imname": f"s{i}.jpg", "trg_imname": f"t{i}.jpg",
               "src_imsize": [size[0], size[1], 3], "trg_imsize": [size[0], size[1], 3],
               "src_kps": [[10, 20], [30, 40]], "trg_kps": [[12, 22], [33, 44]], "kps_ids": ["3", "7"],
               "src_bndbox": [5, 6, 50, 60], "trg_bndbox": [1, 2, 70, 80]}
        (root / "PairAnnotation" / "test" / f"{i:06d}-s{i}-t{i}:{cat}.json").write_text(json.dumps(ann))


def test_spair_loader_on_a_synthetic_folder(tmp_path):
    _write_spair(tmp_path, [("cat", (80, 60)), ("dog", (90, 70)), ("cat", (40, 50))])
    pairs = spair_pairs(tmp_path, "test")
    assert [p.category for p in pairs] == ["cat", "dog", "cat"]
    p = pairs[1]
    assert p.src_image.shape == (70, 90, 3) and p.names == ("3", "7")
    np.testing.assert_array_equal(p.trg_kps, [[12, 22], [33, 44]])
    np.testing.assert_array_equal(p.trg_bbox, [1, 2, 70, 80])
    assert len(spair_pairs(tmp_path, "test", category="cat")) == 2
    assert len(spair_pairs(tmp_path, "test", limit=1)) == 1
    with pytest.raises(ValueError, match="trn"):
        spair_pairs(tmp_path, "train")
    with pytest.raises(FileNotFoundError):
        spair_pairs(tmp_path, "val")
    bad = json.loads(next((tmp_path / "PairAnnotation" / "test").glob("*.json")).read_text())
    del bad["trg_bndbox"]
    (tmp_path / "PairAnnotation" / "test" / "zzz.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="trg_bndbox"):
        spair_pairs(tmp_path, "test")


def test_spair_fixture_is_read_by_the_real_loader(tmp_path):
    write_spair_fixture(tmp_path, 6, "trn", size=96)
    write_spair_fixture(tmp_path, 2, "test", size=96)
    pairs, toy = spair_pairs(tmp_path, "trn"), keypoint_pairs(6, "train", size=96)
    assert len(pairs) == 6 and len(spair_pairs(tmp_path, "test")) == 2
    for p, t in zip(pairs, toy):  # SPair's integer pixel keypoints, JPEG images of the same renders
        assert p.category == t.category and p.names == t.names and p.src_image.shape == (96, 96, 3)
        np.testing.assert_array_equal(p.src_kps, np.floor(t.src_kps))
        np.testing.assert_array_equal(p.trg_bbox, t.trg_bbox)
        assert np.abs(p.trg_image.astype(int) - t.trg_image).mean() < 8
    shuffled = spair_pairs(tmp_path, "trn", seed=0)
    assert sorted(p.names for p in shuffled) == sorted(p.names for p in pairs)
    assert [p.src_kps.tolist() for p in shuffled] != [p.src_kps.tolist() for p in pairs]
    assert [p.src_kps.tolist() for p in spair_pairs(tmp_path, "trn", seed=0, limit=3)] == \
        [p.src_kps.tolist() for p in shuffled[:3]]


# --- bad inputs ------------------------------------------------------------------------------------------------------
def test_bad_inputs_name_what_is_allowed(tiny):
    img = _images(1)
    with pytest.raises(ValueError, match="conv2"):
        hf.inversion_features(tiny, img, site="attn", num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        hf.inversion_features(tiny, img, steps=[0, 2], num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="resnet"):
        hf.inversion_features(tiny, img, layers="up_blocks.0.attentions.*", num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="matches nothing"):
        hf.inversion_features(tiny, img, layers="nonsense.*", num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="steps"):
        hf.generation_features(tiny, "a cat", steps=[5], num_inference_steps=2)
    for k, v in (("size", 0), ("image_size", 32.0), ("batch_size", None)):
        with pytest.raises(ValueError, match=f"{k} must be a positive int"):
            hf.inversion_features(tiny, img, num_inference_steps=2, progress=False, **{k: v})
    data = _synthetic(2)
    with pytest.raises(TypeError, match="dict"):
        hf.AggregationNetwork([8, 16], 2)
    net = hf.AggregationNetwork.for_features(data.features, projection_dim=8, output_size=4)
    with pytest.raises(ValueError, match="lack layers"):
        net({"a": data.features.maps["a"]})
    with pytest.raises(ValueError, match=r"\(B, 2, 8, h, w\)"):
        net(data.features.select(steps=[0]))
    with pytest.raises(ValueError, match=r"\(B, 2, 8, h, w\)"):  # channels of another layer
        net({"a": data.features.maps["b"], "b": data.features.maps["b"]})
    with pytest.raises(ValueError, match="not captured"):
        data.features.select(steps=[3])
    with pytest.raises(TypeError, match="PairFeatures"):
        hft.train_aggregator(net, data.pairs, steps=1)
    for steps in (0, 2.5, True):
        with pytest.raises(ValueError, match="steps"):
            hft.train_aggregator(net, data, steps=steps)
    with pytest.raises(TypeError, match="train_aggregator\(\) got an unexpected keyword argument 'max_seconds'"):
        hft.train_aggregator(net, data, steps=1, max_seconds=5)  # no wall-clock budgets: fixed step counts
    with pytest.raises(ValueError, match=r"\(D, h, w\)"):
        hft.correspondence_loss(torch.zeros(4, 4, 4), torch.zeros(4, 2, 2), data.pairs[0])
    with pytest.raises(TypeError, match="Pair"):
        hft.correspondence_loss(torch.zeros(4, 4, 4), torch.zeros(4, 4, 4), (data.pairs[0].src_kps,))
    with pytest.raises(ValueError, match="alpha"):
        hfe.evaluate([torch.zeros(1, 4, 4)] * 4, data.pairs, alpha=0)
    with pytest.raises(ValueError, match="descriptor maps"):
        hfe.evaluate([torch.zeros(1, 4, 4)] * 3, data.pairs)
    with pytest.raises(ValueError, match="images"):
        hft.PairFeatures(data.pairs[:1], data.features)
    with pytest.raises(ValueError, match="allowed"):
        keypoint_pairs(1, classes=("circle",))
    with pytest.raises(ValueError, match="split"):
        keypoint_pairs(1, split="test")
    with pytest.raises(ValueError, match=r"\(K, 2\)"):
        hft.Pair(img[0], img[0], [[1, 2]], [[1, 2], [3, 4]], [0, 0, 1, 1], [0, 0, 1, 1])
    with pytest.raises(ValueError, match="inside the 32x32 image"):
        hft.Pair(img[0], img[0], [[1, 2]], [[40, 4]], [0, 0, 1, 1], [0, 0, 1, 1])
    with pytest.raises(ValueError, match="finite"):
        hft.Pair(img[0], img[0], [[1, np.nan]], [[4, 4]], [0, 0, 1, 1], [0, 0, 1, 1])
    with pytest.raises(ValueError, match="x1 > x0"):
        hft.Pair(img[0], img[0], [[1, 2]], [[4, 4]], [0, 0, 1, 1], [5, 0, 1, 1])
    with pytest.raises(TypeError, match=r"\(H, W, 3\)"):
        hft.Pair(torch.zeros(32, 32, 3), img[0], [[1, 2]], [[4, 4]], [0, 0, 1, 1], [0, 0, 1, 1])
    with pytest.raises(ValueError, match="predictions"):
        hfe.score([np.zeros((4, 2))], data.pairs)
    with pytest.raises(ValueError, match="need features of 2 images, got 4"):
        hfe.concat_predict(data.features, data.pairs[:1])
    with pytest.raises(ValueError, match="positive ints"):
        hf.official_steps(50, every=0)
    with pytest.raises(ValueError, match="trn"):
        write_spair_fixture("/nonexistent", 1, split="train")
    with pytest.raises(ValueError, match="count"):
        hf.spaced_steps(10, 0)
    assert hf.spaced_steps(50, 11)[0] == 0 and hf.spaced_steps(50, 11)[-1] == 49 and len(hf.spaced_steps(50, 11)) == 11

import json

import numpy as np
import pytest
import torch

from diffnb.hooks import capture
from diffnb.inversion import ddim_invert, unet_conditioning
from diffnb.papers import hyperfeatures as hf
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
    small = hf.inversion_features(tiny, _images(2), layers="up_blocks.0.*", steps=1, num_inference_steps=3, size=8,
                                  dtype=torch.float16, progress=False)
    assert all(n.startswith("up_blocks.0.resnets.") for n in small.layers)
    assert all(v.shape[1:] == (1, v.shape[2], 8, 8) and v.dtype == torch.float16 for v in small.maps.values())


def test_features_are_conv2_of_the_unet_call_at_that_inversion_step(tiny):
    """Step s of the features = the residual-branch conv2 output of a UNet call on latent x_s at timestep t_s."""
    img = _images(1)
    f = hf.inversion_features(tiny, img, steps=[1, 3], num_inference_steps=4, progress=False)
    block = hf.inversion_features(tiny, img, steps=[1, 3], num_inference_steps=4, site="block", progress=False)
    inv = ddim_invert(tiny, image=hf._images(img, 32), num_inference_steps=4, progress=False)
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
    pairs = [hf.Pair(img, img, rng.uniform(1, 15, (4, 2)), rng.uniform(1, 15, (4, 2)), [0, 0, 16, 16], [0, 0, 16, 16])
             for _ in range(n_pairs)]
    return hf.PairFeatures(pairs, feats)


def test_mixing_weights_sum_to_one_and_gradients_flow():
    data = _synthetic()
    net = hf.AggregationNetwork.for_features(data.features, projection_dim=16, output_size=8)
    w = net.mixing_weights()
    assert w.shape == (2, 2) and torch.allclose(w.sum(), torch.tensor(1.0)) and torch.allclose(w, torch.full((2, 2), 0.25))
    out = net(data.features.batch([0, 1]))
    assert out.shape == (2, 16, 8, 8)
    hf.correspondence_loss(out[0], out[1], data.pairs[0]).backward()
    assert net.mixing.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for b in net.bottlenecks for p in b.parameters())


def test_training_reduces_the_loss_and_moves_the_mixing_weights():
    data = _synthetic()
    torch.manual_seed(0)
    net = hf.AggregationNetwork.for_features(data.features, projection_dim=16, output_size=8)
    losses = hf.train_aggregator(net, data, steps=120, lr=3e-3, batch_pairs=2, progress=False)
    assert len(losses) == 120
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])
    assert not torch.allclose(net.mixing_weights(), torch.full((2, 2), 0.25))
    frozen = hf.AggregationNetwork.for_features(data.features, projection_dim=16, output_size=8)
    start = [p.clone() for p in frozen.parameters()]
    hf.train_aggregator(frozen, data, steps=5, lr=0.0, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(start, frozen.parameters()))


def test_loss_is_symmetric_clip_cross_entropy():
    img = np.zeros((4, 4, 3), np.uint8)
    pair = hf.Pair(img, img, [[0.5, 0.5], [2.5, 0.5]], [[0.5, 0.5], [2.5, 0.5]], [0, 0, 4, 4], [0, 0, 4, 4])
    src, trg = torch.zeros(2, 4, 4), torch.zeros(2, 4, 4)
    src[0, :, :2], src[1, :, 2:] = 1, 1  # source keypoints (1, 0) and (0, 1)
    trg[0, :, :2], trg[0, :, 2:], trg[1, :, 2:] = 2, 0.9, 0.19 ** 0.5  # target (1, 0) and (0.9, 0.436), any norm
    a, b = np.array([[1, 0], [0, 1]]), np.array([[1, 0], [0.9, 0.19 ** 0.5]])
    logits = a @ b.T * np.exp(hf.LOGIT_SCALE)
    ce = lambda z: -np.mean(np.diag(z) - np.log(np.exp(z).sum(1)))
    expected = (ce(logits) + ce(logits.T)) / 2
    assert expected > 0.01
    assert hf.correspondence_loss(src, trg, pair).item() == pytest.approx(expected, rel=1e-4)
    assert hf.correspondence_loss(trg, src, pair).item() == pytest.approx(expected, rel=1e-4)  # symmetric
    assert hf.correspondence_loss(src, src.flip(0), pair).item() > 10  # swapped: confidently wrong


# --- evaluation --------------------------------------------------------------------------------------------------
def test_pck_counts_within_threshold():
    gt = np.array([[10.0, 10.0]] * 4)
    pred = gt + np.array([[0, 0], [3, 4], [5, 0.1], [0, 10]])
    assert hf.pck(pred, gt, 5.0).tolist() == [True, True, False, False]
    assert hf.pck(pred, gt, np.array([1, 1, 6, 10])).tolist() == [True, False, True, True]


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
    pair = hf.Pair(img, img, src, gt, [0, 0, 10, 10], [10, 5, 40, 30])
    pred = hf.match_keypoints(sd, td, src, (h, w), (h, w))
    np.testing.assert_allclose(pred, gt + offsets)
    res = hf.evaluate([sd, td], [pair], alpha=0.1)
    assert res == {"pck_img": 0.75, "pck_bbox": 0.5, "n": 4}
    assert hf.evaluate([sd, td], [pair], alpha=0.2)["pck_bbox"] == 0.75  # 6 px: offset 5 now counts


def test_match_keypoints_upsamples_a_coarse_target_map():
    coarse = torch.zeros(2, 4, 4)
    coarse[0, 1, 2] = 1  # cell (row 1, col 2) of 4x4 -> pixels 16..31 x 32..47 at 64 px
    coarse[1] = 1 - coarse[0]
    q = torch.zeros(2, 64, 64)
    q[0] = 1
    (x, y), = hf.match_keypoints(q, coarse, [[3.5, 3.5]], (64, 64), (64, 64))
    assert 32 <= x < 48 and 16 <= y < 32


def test_sample_descriptors_pixel_centre_convention():
    xs = torch.arange(8.0).view(1, 1, 8).expand(1, 8, 8)
    got = hf.sample_descriptors(xs, [[3.5, 0.5], [6.5, 7.5], [4.0, 2.5]], (8, 8))[:, 0]
    torch.testing.assert_close(got, torch.tensor([3.0, 6.0, 3.5]))


def test_baseline_descriptors():
    data = _synthetic(2)
    cat = hf.concat_descriptors(data.features)
    assert cat.shape == (4, 2 * 8 + 2 * 16, 8, 8)
    torch.testing.assert_close(cat[:, :8].norm(dim=1), torch.ones(4, 8, 8))  # each (layer, step) block unit norm
    assert hf.layer_descriptors(data.features, "b", 5).shape == (4, 16, 4, 4)
    pix = hf.pixel_descriptors(_images(2, 16), radius=1)
    assert pix[0].shape == (27, 16, 16) and pix[0].min() >= -1 and pix[0].max() <= 1
    sweep = hf.sweep_layers(data)
    assert set(sweep) == {("a", 0), ("a", 5), ("b", 0), ("b", 5)} and all(0 <= v <= 1 for v in sweep.values())


# --- data -----------------------------------------------------------------------------------------------------------
def test_toy_pairs():
    pairs = hf.toy_pairs(6, "train", seed=1)
    again = hf.toy_pairs(6, "train", seed=1)
    other = hf.toy_pairs(6, "heldout", seed=1)
    assert all(np.array_equal(a.src_image, b.src_image) for a, b in zip(pairs, again))
    assert not any(np.array_equal(a.src_image, b.src_image) for a, b in zip(pairs, other))
    for p in pairs:
        assert p.category in ("heart", "triangle") and len(p.names) >= 2 and p.src_kps.shape == (len(p.names), 2)
        assert not np.array_equal(p.src_image, p.trg_image)
        for kps, box in ((p.src_kps, p.src_bbox), (p.trg_kps, p.trg_bbox)):
            assert (kps >= box[:2]).all() and (kps <= box[2:]).all() and 8 < (box[2:] - box[:2]).max() <= 64
    dense = hf.toy_pairs(3, "train", seed=1, extra_points=10)
    for p, d in zip(pairs, dense):
        assert np.array_equal(p.src_image, d.src_image) and d.names[:len(p.names)] == p.names
        assert d.names[len(p.names):] == tuple(f"p{j}" for j in range(10))
        np.testing.assert_array_equal(d.trg_kps[:len(p.names)], p.trg_kps)
        for kps, img in ((d.src_kps, d.src_image), (d.trg_kps, d.trg_image)):  # on the object: its colour, not pale bg
            px = img[kps[:, 1].astype(int), kps[:, 0].astype(int)].astype(int)
            assert (px.max(1) - px.min(1) > 60).mean() > 0.8
    # colours differ: the mean object colour of source and target is not the same
    p = pairs[0]
    assert not np.allclose(p.src_image[int(p.src_kps[0, 1]), int(p.src_kps[0, 0])],
                           p.trg_image[int(p.trg_kps[0, 1]), int(p.trg_kps[0, 0])], atol=10)


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
    pairs = hf.spair_pairs(tmp_path, "test")
    assert [p.category for p in pairs] == ["cat", "dog", "cat"]
    p = pairs[1]
    assert p.src_image.shape == (70, 90, 3) and p.names == ("3", "7")
    np.testing.assert_array_equal(p.trg_kps, [[12, 22], [33, 44]])
    np.testing.assert_array_equal(p.trg_bbox, [1, 2, 70, 80])
    assert len(hf.spair_pairs(tmp_path, "test", category="cat")) == 2
    assert len(hf.spair_pairs(tmp_path, "test", limit=1)) == 1
    with pytest.raises(ValueError, match="trn"):
        hf.spair_pairs(tmp_path, "train")
    with pytest.raises(FileNotFoundError):
        hf.spair_pairs(tmp_path, "val")
    bad = json.loads(next((tmp_path / "PairAnnotation" / "test").glob("*.json")).read_text())
    del bad["trg_bndbox"]
    (tmp_path / "PairAnnotation" / "test" / "zzz.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="trg_bndbox"):
        hf.spair_pairs(tmp_path, "test")


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
    data = _synthetic(2)
    with pytest.raises(TypeError, match="dict"):
        hf.AggregationNetwork([8, 16], 2)
    net = hf.AggregationNetwork.for_features(data.features, projection_dim=8, output_size=4)
    with pytest.raises(ValueError, match="lack layers"):
        net({"a": data.features.maps["a"]})
    with pytest.raises(ValueError, match=r"\(B, 2, C, h, w\)"):
        net(data.features.select(steps=[0]))
    with pytest.raises(ValueError, match="not captured"):
        data.features.select(steps=[3])
    with pytest.raises(TypeError, match="PairFeatures"):
        hf.train_aggregator(net, data.pairs, steps=1)
    with pytest.raises(ValueError, match="alpha"):
        hf.evaluate([torch.zeros(1, 4, 4)] * 4, data.pairs, alpha=0)
    with pytest.raises(ValueError, match="descriptor maps"):
        hf.evaluate([torch.zeros(1, 4, 4)] * 3, data.pairs)
    with pytest.raises(ValueError, match="images"):
        hf.PairFeatures(data.pairs[:1], data.features)
    with pytest.raises(ValueError, match="allowed"):
        hf.toy_pairs(1, classes=("circle",))
    with pytest.raises(ValueError, match="split"):
        hf.toy_pairs(1, split="test")
    with pytest.raises(ValueError, match=r"\(K, 2\)"):
        hf.Pair(img[0], img[0], [[1, 2]], [[1, 2], [3, 4]], [0, 0, 1, 1], [0, 0, 1, 1])
    with pytest.raises(ValueError, match="count"):
        hf.spaced_steps(10, 0)
    assert hf.spaced_steps(50, 11)[0] == 0 and hf.spaced_steps(50, 11)[-1] == 49 and len(hf.spaced_steps(50, 11)) == 11

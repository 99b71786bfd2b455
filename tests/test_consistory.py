from dataclasses import replace

import numpy as np
import pytest
import torch

from diffnb.metrics import layout_overlap, otsu_mask
from diffnb.models import tiny_pipeline, toy_is_trained
from diffnb.papers.consistory import (ABLATIONS, AnchorCache, ConsiStoryArgs, ConsiStoryAttention, ConsiStoryRun,
                                      consistory, generate, ladder)
from diffnb.papers.consistory_run import correspondences, nearest_subject_patches
from diffnb.processors import AttentionProcessor
from diffnb.toyworld.scoring import identity_scores, subject_similarity

torch.set_num_threads(1)
PROMPTS = ["a red heart", "a blue heart", "a heart on a striped background", "a green heart on a dotted background"]
LAYER = "up_blocks.0.attentions.0.transformer_blocks.1.attn1"  # tiny SDXL, 4x4 tokens


def _run(n=3, halves=2, step=1, **kw):
    run = ConsiStoryRun(ConsiStoryArgs(**kw), [[[1]]] * n, n_steps=10, halves=halves)
    run.state.step = step
    run.masks.history = [torch.zeros(1)]  # "masks exist"; the masks themselves are set by the test
    return run


def _paper_sdsa(attn, x, masks, keep, sources, halves, q_mix=None, s=0.0):
    """The paper's SDSA equations written out: A_i = softmax(Q_i K⁺ᵀ/√d + log M_i⁺), h_i = A_i V⁺."""
    b, p, _ = x.shape
    h = attn.heads
    q, k, v = (f(x).view(b, p, h, -1).transpose(1, 2) for f in (attn.to_q, attn.to_k, attn.to_v))
    if q_mix is not None:
        q = s * q_mix + (1 - s) * q
    n = b // halves
    outs = []
    for i in range(b):
        g, ii = divmod(i, n)
        keys, vals, logm = [k[i]], [v[i]], [torch.zeros(p)]
        for t, j in enumerate(sources):
            keys.append(k[g * n + j]), vals.append(v[g * n + j])
            m = masks[j] & keep[t] & (j != ii)
            logm.append(torch.where(m, 0.0, -torch.inf))
        logits = torch.einsum("hpd,hqd->hpq", q[i], torch.cat(keys, 1)) / q.shape[-1] ** 0.5 + torch.cat(logm)
        outs.append(torch.einsum("hpq,hqd->hpd", logits.softmax(-1), torch.cat(vals, 1)))
    o = torch.stack(outs).transpose(1, 2).reshape(b, p, -1)
    return attn.to_out[0](o)


@pytest.fixture(scope="module")
def sdxl_attn():
    return tiny_pipeline("sdxl").unet.get_submodule(LAYER)


def test_all_false_mask_equals_vanilla_attention(sdxl_attn):
    run = _run()
    run.masks._by_side = {4: torch.zeros(3, 16, dtype=torch.bool)}
    proc = ConsiStoryAttention(run, {LAYER}, set()).for_layer(LAYER)
    x = torch.randn(6, 16, sdxl_attn.to_q.in_features, generator=torch.Generator().manual_seed(0))
    assert (proc(sdxl_attn, x) - AttentionProcessor()(sdxl_attn, x)).abs().max() <= 1e-5


@pytest.mark.parametrize("dropout, n_anchors, mix", [(0.0, 2, False), (0.5, 2, False), (0.5, None, True)])
def test_extended_attention_matches_paper_equations(sdxl_attn, dropout, n_anchors, mix):
    run = _run(mask_dropout=dropout, n_anchors=n_anchors)
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(3, 16, generator=g) > 0.4
    run.masks._by_side = {4: masks}
    x = torch.randn(6, 16, sdxl_attn.to_q.in_features, generator=g)
    sources = run.anchors.sources
    keep = run.schedule.keep(run.state.step, 4, len(sources), "cpu")
    assert dropout == 0 or not keep.all()
    q_mix, s = None, 0.0
    if mix:
        q_mix = sdxl_attn.to_q(torch.randn_like(x)).view(6, 16, sdxl_attn.heads, -1).transpose(1, 2)
        run.queries[LAYER], s = q_mix, run.schedule.mix_strength(run.state.step)
        assert s is not None and 0.8 < s < 0.9
    ours = ConsiStoryAttention(run, {LAYER}, set()).for_layer(LAYER)(sdxl_attn, x)
    ref = _paper_sdsa(sdxl_attn, x, masks, keep, sources, 2, q_mix, s)
    assert (ours - ref).abs().max() <= 1e-4
    assert (ours - AttentionProcessor()(sdxl_attn, x)).abs().max() > 1e-3  # sharing did something


def test_unmasked_sharing_is_extended_attention_from_step_zero(sdxl_attn):
    run = ConsiStoryRun(ConsiStoryArgs(subject_masks="all", sdsa_start=0, mask_dropout=0.0), [[[1]]] * 3,
                        n_steps=10, halves=2)
    run.state.step = 0
    assert run.sdsa_on() and not run.masks.history  # no cross-attention seen yet, still shared
    assert run.masks(4).all()
    x = torch.randn(6, 16, sdxl_attn.to_q.in_features, generator=torch.Generator().manual_seed(2))
    ours = ConsiStoryAttention(run, {LAYER}, set()).for_layer(LAYER)(sdxl_attn, x)
    ref = _paper_sdsa(sdxl_attn, x, torch.ones(3, 16, dtype=torch.bool), torch.ones(2, 16, dtype=torch.bool),
                      run.anchors.sources, 2)
    assert (ours - ref).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="subject_masks must be"):
        ConsiStoryArgs(subject_masks="gt")


def test_shapes_and_masks_update_per_step(tiny):
    out = generate(tiny, PROMPTS, "heart", mask_window=2, num_inference_steps=4, seeds=[0, 1, 2, 3])
    size = tiny.unet.config.sample_size * tiny.vae_scale_factor
    assert out.images.shape == (4, size, size, 3)
    (r, m), = out.masks.items()
    assert m.shape == (4, r, r) and m.dtype == torch.bool
    steps = out.masks_per_step
    assert len(steps) == 4 and steps[0] is None
    assert all(s.shape == (4, r, r) for s in steps[1:])


def test_masks_are_otsu_of_the_last_steps_maps(tiny):
    run = ConsiStoryRun(ConsiStoryArgs(mask_window=2), [[[2]], [[2]]], n_steps=4, halves=2)
    with consistory(tiny.unet, run):
        tiny(PROMPTS[:2], latents=torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)),
             num_inference_steps=4, guidance_scale=5.0, output_type="latent")
        run.end_step()
    assert len(run.masks.history) == 4 and len(run.masks_per_step) == 4
    r = run.top_res
    for s in range(1, 4):  # the mask used at step s comes from steps max(0, s-2)..s-1 only
        heat = torch.stack(run.masks.history[max(0, s - 2):s]).mean(0).permute(0, 3, 1, 2)
        heat = torch.nn.functional.interpolate(heat, size=(r, r), mode="bilinear", align_corners=False)
        want = np.stack([otsu_mask(h[0]) for h in heat.numpy()])
        assert np.array_equal(run.masks_per_step[s].numpy(), want)
    assert not all(torch.equal(run.masks_per_step[1], m) for m in run.masks_per_step[2:])  # they do move


@pytest.mark.parametrize("ablation", ["sdsa+diversity", "full"])
def test_cached_anchors_reproduce_the_batch(tiny, ablation):
    args = ABLATIONS[ablation]
    kw = dict(num_inference_steps=4, guidance_scale=5.0)
    batch = generate(tiny, PROMPTS, "heart", args, seeds=[10, 11, 12, 13], **kw)
    anchors = generate(tiny, PROMPTS[:2], "heart", args, seeds=[10, 11], cache_anchors=True, **kw).anchors
    assert isinstance(anchors, AnchorCache) and anchors.kv and (anchors.out if args.inject else True)
    new = generate(tiny, PROMPTS[2:], "heart", args, seeds=[12, 13], anchors=anchors, **kw)
    assert np.abs(anchors.images - batch.images[:2]).max() < 1e-4
    assert np.abs(new.images - batch.images[2:]).max() < 1e-4
    vanilla = generate(tiny, PROMPTS, "heart", ABLATIONS["vanilla"], seeds=[10, 11, 12, 13], **kw)
    assert np.abs(vanilla.images[2:] - batch.images[2:]).max() > 1e-3  # the anchors really acted
    alone = generate(tiny, PROMPTS[2:], "heart", args, seeds=[12, 13], n_anchors=2, **kw)
    assert np.abs(alone.images - new.images).max() > 1e-3  # not the same as sharing among themselves
    host = generate(tiny, PROMPTS[:2], "heart", args, seeds=[10, 11], cache_anchors="cpu", **kw).anchors
    assert all(t.device.type == "cpu" for kv in host.kv.values() for t in kv)
    again = generate(tiny, PROMPTS[2:], "heart", args, seeds=[12, 13], anchors=host, **kw)
    assert np.abs(again.images - new.images).max() < 1e-5


def test_multi_subject_masks_are_a_union(tiny):
    p = ["a red heart and a blue moon", "a green heart and a blue moon"]
    one = generate(tiny, p, "heart", num_inference_steps=3)
    both = generate(tiny, p, ["heart", "moon"], num_inference_steps=3)
    (r, m1), = one.masks.items()
    assert both.masks[r].sum() >= m1.sum() and both.masks[r].sum() > 0


def test_restores_processors_and_hooks_on_exception(tiny):
    unet = tiny.unet
    before = dict(unet.attn_processors)
    count = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules())
    hooks = count()
    run = ConsiStoryRun(ABLATIONS["full"], [[[2]]], n_steps=2, halves=2)
    with pytest.raises(RuntimeError, match="boom"):
        with consistory(unet, run):
            assert any(isinstance(p, ConsiStoryAttention) for p in unet.attn_processors.values())
            raise RuntimeError("boom")
    after = unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert count() == hooks


def test_bad_input(tiny):
    with pytest.raises(ValueError, match="unknown ConsiStory options.*allowed"):
        generate(tiny, PROMPTS, "heart", mask_drop=0.1)
    with pytest.raises(ValueError, match="not in the prompt"):
        generate(tiny, PROMPTS, "moon", num_inference_steps=2)
    with pytest.raises(TypeError, match="subject_words must be"):
        generate(tiny, PROMPTS, 3)
    with pytest.raises(TypeError, match="prompts must be"):
        generate(tiny, "a heart", "heart")
    with pytest.raises(ValueError, match="n_anchors=5 exceeds"):
        generate(tiny, PROMPTS, "heart", n_anchors=5)
    with pytest.raises(ValueError, match="seeds"):
        generate(tiny, PROMPTS, "heart", seeds=[1])
    with pytest.raises(ValueError, match=r"mask_dropout must be in \[0, 1\)"):
        ConsiStoryArgs(mask_dropout=1.0)
    with pytest.raises(ValueError, match="attn1"):
        generate(tiny, PROMPTS, "heart", share_layers="cross", num_inference_steps=2)
    with pytest.raises(ValueError, match="matches nothing"):
        generate(tiny, PROMPTS, "heart", share_layers="up.*.attn9", num_inference_steps=2)
    cache = generate(tiny, PROMPTS[:2], "heart", num_inference_steps=2, cache_anchors=True).anchors
    with pytest.raises(ValueError, match="same as theirs"):
        generate(tiny, PROMPTS[2:], "heart", num_inference_steps=3, anchors=cache)
    with pytest.raises(ValueError, match="cache_anchors must be"):
        generate(tiny, PROMPTS[:2], "heart", num_inference_steps=2, cache_anchors="gpu")
    with pytest.raises(TypeError, match="AnchorCache"):
        generate(tiny, PROMPTS[2:], "heart", num_inference_steps=2, anchors={"kv": {}})


def test_nearest_subject_patches_respects_masks_and_self():
    g = torch.Generator().manual_seed(0)
    src = torch.randn(2, 8, 5, generator=g)
    tgt = src.clone()  # target 0 is source 0: its own patches must not be chosen
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 0, 1]], dtype=torch.bool)
    idx, dist = nearest_subject_patches(tgt, src, mask, same={0: 0, 1: 1})
    assert ((idx[0] >= 5) & mask.flatten()[idx[0]]).all() and (idx[1] < 5).all()
    idx2, dist2 = nearest_subject_patches(tgt, src, mask)
    assert torch.equal(idx2[0], torch.arange(5)) and torch.allclose(dist2[0], torch.zeros(5), atol=1e-6)
    _, alone = nearest_subject_patches(tgt[:1], src[:1], mask[:1], same={0: 0})  # no other source: infinite
    assert torch.isinf(alone).all()


def test_ladder_and_model_settings():
    toy = ConsiStoryArgs.for_model("toy")
    steps = ladder(toy)
    assert list(steps) == ["vanilla", "sdsa", "sdsa+diversity", "full"] and steps["full"] == toy and toy.inject
    assert not steps["vanilla"].sdsa and steps["sdsa"].mask_dropout == 0 and steps["sdsa"].query_mix_fraction == 0
    assert steps["sdsa+diversity"].mask_dropout == toy.mask_dropout and not steps["sdsa+diversity"].inject
    assert all(v.share_layers == "self" and v.n_anchors is None for v in steps.values())
    assert ConsiStoryArgs.for_model("sdxl", mask_dropout=0.3).mask_dropout == 0.3
    assert ladder(ConsiStoryArgs.for_model("sdxl"))["full"].share_layers == ConsiStoryArgs().share_layers
    with pytest.raises(ValueError, match="known: toy, sdxl, sd15"):
        ConsiStoryArgs.for_model("flux")


class _MeanColour:
    """Stand-in probe: an image's feature is its mean colour."""
    def features(self, images):
        return torch.as_tensor(np.asarray(images)).float().mean((1, 2))


def test_subject_similarity_ignores_the_background_and_layout_overlap():
    images = np.zeros((1, 2, 8, 8, 3), np.uint8)
    images[0, :, :4, :4] = (200, 30, 30)           # the same red subject in both images
    images[0, 0, 4:, :] = (0, 0, 250)              # different backgrounds
    images[0, 1, 4:, :] = (0, 250, 0)
    subject = np.zeros((1, 2, 2, 2), bool)
    subject[..., 0, 0] = True                      # 2x2 masks, nearest-upsampled to 8x8: the top-left quarter
    assert subject_similarity(images, subject, _MeanColour()) == pytest.approx(1.0)
    everything = np.ones_like(subject)
    assert subject_similarity(images, everything, _MeanColour()) < 0.9
    assert layout_overlap(subject) == 1.0 and layout_overlap(everything) == 1.0
    moved = subject.copy()
    moved[0, 1] = [[False, True], [False, True]]   # the second subject elsewhere, twice the area
    assert layout_overlap(moved) == 0.0
    moved[0, 1, 0, 0] = True
    assert layout_overlap(moved) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="masks must be"):
        subject_similarity(images, subject[0], _MeanColour())


def test_toy_scores_counts_pairs():
    class Fake:
        def predict(self, images):
            return {"detail": ["dot", "dot", "band", "dot"], "color": ["red"] * 4,
                    "shape": ["heart"] * 3 + ["moon"], "background": ["striped", "dotted", "plain", "plain"]}
    prompts = [["a heart on a striped background", "a heart on a dotted background",
                "a heart on a checkered background", "a heart on a plain background"]]
    s = identity_scores(np.zeros((1, 4, 8, 8, 3), np.uint8), prompts, Fake())
    assert s["detail_agreement"] == pytest.approx(3 / 6) and s["color_agreement"] == 1.0
    assert s["identity_agreement"] == pytest.approx(3 / 6) and s["background_accuracy"] == 0.75
    assert s["shape_accuracy"] == 0.75
    with pytest.raises(ValueError, match="sets, n"):
        identity_scores(np.zeros((4, 8, 8, 3), np.uint8), prompts, Fake())


@pytest.mark.skipif(not toy_is_trained(), reason="toy model not trained")
def test_toy_anchor_reuse_and_masks():
    from diffnb.models import load_pipeline
    pipe = load_pipeline("toy", device="cpu")
    p = ["a heart on a striped background", "a heart on a dotted background", "a heart on a plain background"]
    batch = generate(pipe, p, "heart", seeds=[0, 1, 2])
    cache = generate(pipe, p[:2], "heart", seeds=[0, 1], cache_anchors=True).anchors
    new = generate(pipe, p[2:], "heart", seeds=[2], anchors=cache)
    # batch size changes float32 GEMM blocking: identical up to rounding noise, far below one 8-bit level (0.004)
    assert np.abs(new.images - batch.images[2:]).max() < 1e-3
    cover = batch.masks[16].float().mean().item()
    assert 0.02 < cover < 0.7, cover


@pytest.mark.skipif(not toy_is_trained(), reason="toy model not trained")
def test_toy_ladder_raises_identity_agreement():
    """The paper's claim on the toy, on seeds that neither the notebook nor the benchmark uses: SDSA makes the
    never-named identity (colour and pattern) agree, through colour; the full method does not lose colour agreement;
    backgrounds follow their prompts. Eight sets (48 pairs): on the v2 toy the first four alone gave an identity
    gain of exactly 0 (their vanilla colour agreement was 0.46, against 0.26 over the benchmark's 24 sets)."""
    from diffnb.models import load_pipeline
    from diffnb.toyworld import SHAPES
    from diffnb.toyworld.probes import Probes
    from diffnb.viz import to_uint8
    pipe, probes = load_pipeline("toy", device="cpu"), Probes()
    steps = ladder(ConsiStoryArgs.for_model("toy"))
    sets = [[f"a {SHAPES[s % len(SHAPES)]} on a {bg} background" for bg in ("striped", "dotted", "checkered", "plain")]
            for s in range(8)]
    scores = {}
    for name in ("vanilla", "sdsa", "full"):
        outs = [generate(pipe, p, SHAPES[s % len(SHAPES)], steps[name], seeds=[50_000 + 10 * s + j for j in range(4)])
                for s, p in enumerate(sets)]
        scores[name] = identity_scores(np.stack([to_uint8(o.images) for o in outs]), sets, probes)
    gain = lambda k, c: scores[k][c] - scores["vanilla"][c]
    # v2 toy, on 24 benchmark sets: SDSA identity +0.23, colour +0.44 (benchmarks/results/consistory_toy_200.json)
    assert gain("sdsa", "identity_agreement") > 0, scores
    assert gain("sdsa", "color_agreement") >= 0.2, scores
    assert gain("full", "color_agreement") >= 0, scores
    assert scores["full"]["background_accuracy"] >= 0.9 * scores["vanilla"]["background_accuracy"], scores


# --- fidelity with the official implementation (issue 16); each re-derivation is written here from the notes ---

def test_injection_blends_the_conditional_half_only(sdxl_attn):
    """Official: the injector edits `hidden_states[batch_size//2:]` only; the anchors' outputs it blends in are
    the conditional ones. Injection maps are random here; the re-derivation loops over pixels."""
    from diffusers.models.attention_processor import AttnProcessor2_0
    run = _run(n=3, halves=2, inject=True).next_pass()  # the injection pass; n_steps 10: injection on steps 1..3
    run.state.step = 3
    g = torch.Generator().manual_seed(3)
    P = 16
    idx = torch.randint(0, 2 * P, (3, P), generator=g)  # into the 2 anchors' patches
    use = torch.rand(3, P, generator=g) > 0.5
    run.anchors.nn = {4: (idx, use)}
    x = torch.randn(6, P, sdxl_attn.to_q.in_features, generator=g)
    ours = ConsiStoryAttention(run, set(), {LAYER}).for_layer(LAYER)(sdxl_attn, x)
    base = AttnProcessor2_0()(sdxl_attn, x)
    want = base.clone()
    a = run.args.inject_alpha
    for i in range(3):
        for p in range(P):
            if use[i, p]:
                j, q = divmod(int(idx[i, p]), P)  # anchor j's patch q, conditional half (rows 3..5)
                want[3 + i, p] = a * base[3 + j, q] + (1 - a) * base[3 + i, p]
    assert use.any() and (want - base).abs().max() > 1e-3
    assert torch.equal(ours[:3], base[:3]) or (ours[:3] - base[:3]).abs().max() <= 1e-6  # unconditional: untouched
    assert (ours - want).abs().max() <= 1e-5


def test_dynamic_threshold_is_otsu_over_all_pixels_then_the_subject_mask():
    """Official FeatureInjector: per target image, distances to the nearest anchor patch (outside an anchor's mask:
    distance 2; itself: excluded), threshold = Otsu over the distances of ALL its pixels, inject where
    distance < threshold AND the pixel is in the image's subject mask."""
    from skimage.filters import threshold_otsu
    g = torch.Generator().manual_seed(4)
    n, C, r = 3, 6, 8
    run = _run(n=n)
    masks = torch.rand(n, r * r, generator=g) > 0.6
    run.masks._by_side = {r: masks}
    feats = torch.randn(n, C, r, r, generator=g)
    feats[:, 0] += 3 * masks.view(n, r, r)  # subjects look alike, so distances inside and outside differ
    correspondences(run, feats, [r])
    idx, use = run.anchors.nn[r]
    f = torch.nn.functional.normalize(feats.flatten(2), dim=1)  # (n, C, P)
    for i in range(n):
        best = torch.full((r * r,), float("inf"))
        arg = torch.zeros(r * r, dtype=torch.long)
        for j in (0, 1):  # the two anchors
            if j == i:
                continue
            d = 1 - f[i].T @ f[j]  # (target P, source P)
            d[:, ~masks[j]] = 2.0
            m, a = d.min(1)
            better = m < best
            best, arg = torch.where(better, m, best), torch.where(better, a + j * r * r, arg)
        want = masks[i] & (best < threshold_otsu(best.numpy()))
        assert torch.equal(use[i], want), (i, use[i].sum(), want.sum())
        assert torch.equal(idx[i][want], arg[want])
    assert use.any()


@pytest.mark.parametrize("arch", ["sdxl"])
def test_sdxl_dift_is_up_blocks_0_output_at_t261_conditional_half_smoothed(arch):
    """Official (SDXL): the features of pass 1 at timestep 261, `up_blocks[0]`'s output, conditional half,
    3x3 Gaussian with sigma 1 (normalised kernel, zero padding). Recorded here with a plain hook on the block."""
    pipe = tiny_pipeline(arch)
    args = ConsiStoryArgs.for_model("sdxl", mask_resolutions=(8,))  # the tiny UNet has no 32x32 layer
    assert (args.dift_layer, args.dift_sigma, args.dift_timestep) == ("up_blocks.0", 1.0, 261)
    seen, t_now = [], {}
    pre = pipe.unet.register_forward_pre_hook(
        lambda m, a, kw: t_now.update(t=float(kw.get("timestep", a[1] if len(a) > 1 else None))), with_kwargs=True)
    post = pipe.unet.up_blocks[0].register_forward_hook(lambda m, a, out: seen.append((t_now.get("t"), out.detach())))
    try:
        out = generate(pipe, PROMPTS[:3], "heart", args, seeds=[0, 1, 2], num_inference_steps=50, cache_anchors=True)
    finally:
        pre.remove(), post.remove()
    # unet.forward called by the vanilla-query pass skips the UNet pre-hook: that pass only runs at steps 0..5
    at261 = [o for t, o in seen if t == 261.0]
    assert len(at261) >= 2  # pass 1 and pass 2
    feat = at261[0][-3:].float()  # pass 1, conditional half
    ax = np.arange(3) - 1
    k = np.exp(-(ax[:, None] ** 2 + ax[None] ** 2) / 2.0)
    k = torch.tensor(k / k.sum(), dtype=torch.float32)
    C = feat.shape[1]
    want = torch.nn.functional.conv2d(feat, k.expand(C, 1, 3, 3), padding=1, groups=C)
    got = out.anchors.dift
    assert got.shape == (2, *want.shape[1:]), got.shape
    assert (got - want[:2]).abs().max() <= 1e-5
    sd = ConsiStoryArgs.for_model("sd15")
    assert (sd.dift_layer, sd.dift_sigma) == ("up_blocks.1", None)  # SD1.5 / toy: DIFT's index 1, unsmoothed (ours)


# --- crashes and silent failures (issues 16, 18) ---

def test_mask_resolutions_missing_from_the_unet_is_an_error():
    """`for_model("sdxl")` (32x32 masks) on an SD1.5-shaped UNet (cross-attention at 16 and 8) used to record no
    cross-attention at all, so no mask ever formed and every image came out vanilla, silently."""
    pipe = tiny_pipeline("sd15")
    with pytest.raises(ValueError, match=r"no cross-attention at \[32\].*resolutions: \[8, 16\]"):
        generate(pipe, PROMPTS[:2], "heart", ConsiStoryArgs.for_model("sdxl"), num_inference_steps=2)


class _MetaInsideUNet:
    """Every UNet call runs under `torch.device("meta")`: a tensor our code builds there without device= lands on
    meta and breaks the call, as it would sit on the CPU while the model is on CUDA."""

    def __init__(self, unet):
        self.unet, self.ctx = unet, []

    def __enter__(self):
        def enter(*_, **__):
            self.ctx.append(torch.device("meta")), self.ctx[-1].__enter__()

        def leave(*_):
            self.ctx.pop().__exit__(None, None, None)
        self.handles = [self.unet.register_forward_pre_hook(enter, prepend=True),
                        self.unet.register_forward_hook(leave, always_call=True)]
        return self

    def __exit__(self, *exc):
        while self.ctx:
            self.ctx.pop().__exit__(None, None, None)
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("masks", ["attention", "all"])
def test_no_tensor_is_built_off_the_models_device(tiny, masks):
    from diffnb.pipeline import seeded_latents
    args = replace(ConsiStoryArgs.for_model("toy"), subject_masks=masks, mask_resolutions=None)
    with _MetaInsideUNet(tiny.unet):
        out = generate(tiny, PROMPTS[:3], "heart", args, num_inference_steps=4, seeds=[0, 1, 2])
    assert np.isfinite(out.images).all()
    with torch.device("meta"):  # the steps between the UNet calls
        assert seeded_latents(tiny, [0, 1], 32, 32).device.type == "cpu"
        run = _run(n=3)
        run.masks._by_side = {4: torch.rand(3, 16, device="cpu") > 0.5}
        correspondences(run, torch.randn(3, 5, 4, 4, device="cpu"), [4])
        assert all(t.device.type == "cpu" for t in run.anchors.nn[4])


def test_masks_and_sharing_follow_the_size_actually_run():
    """At another image size the layers run at other sizes than their nominal ones (`cross@32` on SDXL at 768 px
    runs at 24x24): masks, sharing and injection must still happen, keyed by the size as run."""
    pipe = tiny_pipeline("sdxl")
    args = ConsiStoryArgs.for_model("sdxl", mask_resolutions=(8,))
    kw = dict(num_inference_steps=4, seeds=[0, 1, 2], size=16)  # half the default 32 px
    out = generate(pipe, PROMPTS[:3], "heart", args, **kw)
    vanilla = generate(pipe, PROMPTS[:3], "heart", ladder(args)["vanilla"], **kw)
    assert out.images.shape == (3, 16, 16, 3) and sorted(out.masks) == [4]  # nominal 8 (up_blocks.1) runs at 4
    assert out.masks_per_step[-1] is not None and np.abs(out.images - vanilla.images).max() > 1e-3

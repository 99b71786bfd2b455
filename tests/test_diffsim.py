"""DiffSim-S: the score against the paper's equation and the official noise, batching, no side effects, bad input,
the official settings, and the effect on the toy model."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffnb.hooks import capture
from diffnb.pipeline import unet_conditioning
from diffnb.layers import resolution
from diffnb.models import toy_is_trained
from diffnb.papers import diffsim as diffsim_module
from diffnb.metrics import two_afc
from diffnb.papers.diffsim import (DiffSimArgs, best_setting, diffsim, diffsim_sweep, official_timestep, pair_noise, pixel_l2_similarity,
                                   symmetric_aas)
from diffnb.processors import attention_names
from diffnb.toyworld.scoring import triplets


def images(n, seed, size=64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_matches_the_papers_equation(tiny):
    """Recompute AAS from the layer's own q/k/v projections (captured by hooks), written out as in the paper."""
    unet = tiny.unet
    layer = [n for n in attention_names(unet) if n.startswith("up_blocks") and n.endswith("attn1")][0]
    a, b = images(2, 0), images(2, 1)
    with capture(unet, [f"{layer}.to_q", f"{layer}.to_k", f"{layer}.to_v"], offload=None) as cache:
        got = diffsim(tiny, a, b, layer=layer, timestep=300, progress=False)
    heads = unet.get_submodule(layer).heads
    q, k, v = (cache.get(f"{layer}.to_{c}").unflatten(-1, (heads, -1)).transpose(1, 2) for c in "qkv")

    def attn(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v

    want = []
    for i in range(2):
        A, B = i, i + 2  # batch layout [A_1, A_2, B_1, B_2]
        ab = F.cosine_similarity(attn(q[A], k[A], v[A]).flatten(), attn(q[A], k[B], v[B]).flatten(), dim=0)
        ba = F.cosine_similarity(attn(q[B], k[B], v[B]).flatten(), attn(q[B], k[A], v[A]).flatten(), dim=0)
        want.append((ab + ba) / 2)
    torch.testing.assert_close(got, torch.stack(want), atol=1e-5, rtol=0)


def test_identity_symmetry_and_cfg_layout():
    q, k, v = torch.randn(3, 4, 2, 16, 8).unbind(0)
    s = symmetric_aas(q, k, v, pairs=2)
    swapped = [torch.cat([x[2:], x[:2]]) for x in (q, k, v)]
    torch.testing.assert_close(s, symmetric_aas(*swapped, pairs=2))
    same = [torch.cat([x[:2], x[:2]]) for x in (q, k, v)]
    torch.testing.assert_close(symmetric_aas(*same, pairs=2), torch.ones(2))
    with pytest.raises(ValueError, match="multiple of 2 x 3"):
        symmetric_aas(q, k, v, pairs=3)


def test_sweep_is_side_effect_free_and_restores(tiny):
    unet = tiny.unet
    before = dict(unet.attn_processors)
    a, b = images(2, 2), images(2, 3)
    sweep = diffsim_sweep(tiny, a, b, layers="self", timesteps=(10, 900), progress=False, batch_size=1)
    assert sweep.timesteps == [10, 900] and set(sweep.layers) == {n for n in attention_names(unet) if n.endswith("attn1")}
    assert all(v.shape == (2,) for v in sweep.aas.values()) and sweep.feature_cosine.keys() == sweep.aas.keys()
    assert all(before[k] is v for k, v in unet.attn_processors.items())
    same = diffsim(tiny, a, a, "self", 500, progress=False, noise="shared")  # one noise for A and B: identity
    torch.testing.assert_close(same, torch.ones(2), atol=1e-5, rtol=0)
    assert (diffsim(tiny, a, a, "self", 500, progress=False) < 1 - 1e-4).all()  # official: A and B noised apart

    def boom(*args, **kwargs):
        raise RuntimeError("boom")
    handle = unet.conv_out.register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            diffsim(tiny, a, b, "self", 500, progress=False)
    finally:
        handle.remove()
    assert all(before[k] is v for k, v in unet.attn_processors.items())


def test_bad_input(tiny):
    a = images(2, 0)
    with pytest.raises(ValueError, match="cross-attention"):
        diffsim(tiny, a, a, "cross", 500, progress=False)
    with pytest.raises(ValueError, match=r"timesteps must be ints in \[0, 1000\)"):
        diffsim(tiny, a, a, "self", 1000, progress=False)
    with pytest.raises(ValueError, match="same shape"):
        diffsim(tiny, a, a[:1], "self", 500, progress=False)
    with pytest.raises(ValueError, match="matches no"):
        diffsim(tiny, a, a, "up.*.attn9", 500, progress=False)
    with pytest.raises(ValueError, match="kind must be one of"):
        triplets("colour", 2)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        diffsim(tiny, a, a, "self", 500, progress=False, batch_size=0)
    with pytest.raises(ValueError, match="noise must be one of"):
        diffsim(tiny, a, a, "self", 500, progress=False, noise="fresh")
    with pytest.raises(ValueError, match="target_step must be an int in"):
        official_timestep(1000)
    with pytest.raises(ValueError, match="no DiffSim settings"):
        DiffSimArgs.for_model("sd2")


# ---------------------------------------------------------------- fidelity: the official noise

def official_score(pipe, image_a, image_b, layer, t, seed, prompt="", guidance_scale=1.0):
    """The official DiffSim of ONE pair, re-derived from the reference notes without our helpers' noise or score:
    one generator seeded with `seed` per pair draws A's noise, then B's; x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps;
    A and B go through the UNet in two separate calls ([uncond, cond] each under CFG); AAS from the layer's q/k/v
    with an explicit softmax, everything (CFG halves, heads, tokens) flattened."""
    latents = [pipe.vae.encode(x[None]).latent_dist.mean * pipe.vae.config.scaling_factor for x in (image_a, image_b)]
    g = torch.Generator().manual_seed(seed)
    eps = [torch.randn(latents[0].shape, generator=g) for _ in range(2)]  # A's draw first, then B's
    abar = pipe.scheduler.alphas_cumprod[t]
    qkv = []
    for x0, e in zip(latents, eps):
        xt = abar.sqrt() * x0 + (1 - abar).sqrt() * e
        size = x0.shape[-1] * pipe.vae_scale_factor
        cond = unet_conditioning(pipe, prompt, 1, guidance_scale, size, size)
        with capture(pipe.unet, [f"{layer}.to_{c}" for c in "qkv"], offload=None) as cache, torch.no_grad():
            pipe.unet(torch.cat([xt, xt]) if guidance_scale > 1 else xt, t, **cond)
        heads = pipe.unet.get_submodule(layer).heads
        qkv.append([cache.get(f"{layer}.to_{c}").unflatten(-1, (heads, -1)).transpose(1, 2).double() for c in "qkv"])
    (qa, ka, va), (qb, kb, vb) = qkv

    def attn(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v

    ab = F.cosine_similarity(attn(qa, ka, va).flatten(), attn(qa, kb, vb).flatten(), dim=0)
    ba = F.cosine_similarity(attn(qb, kb, vb).flatten(), attn(qb, ka, va).flatten(), dim=0)
    return float((ab + ba) / 2)


@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_noise_is_independent_for_a_and_b_as_official(tiny, guidance):
    layer = [n for n in attention_names(tiny.unet) if n.startswith("up_blocks") and n.endswith("attn1")][-1]
    a, b = images(3, 20, 32), images(3, 21, 32)  # the tiny UNet's own size: fast
    kw = dict(prompt="photo of cat", guidance_scale=guidance) if guidance > 1 else {}
    got = diffsim(tiny, a, b, layer, 600, seed=2334, batch_size=2, progress=False, **kw)
    want = torch.tensor([official_score(tiny, a[i], b[i], layer, 600, 2334, **kw) for i in range(3)], dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=0)


def test_pair_noise_draws():
    na, nb = pair_noise((4, 8, 8), 7)
    g = torch.Generator().manual_seed(7)
    torch.testing.assert_close(na, torch.randn(4, 8, 8, generator=g))
    torch.testing.assert_close(nb, torch.randn(4, 8, 8, generator=g))
    sa, sb = pair_noise((4, 8, 8), 7, "shared")
    assert sa is sb and torch.equal(sa, na)


# ---------------------------------------------------------------- crash: the score of a pair depends on the batching

def test_batching_and_companions_do_not_change_a_pairs_score(tiny):
    """The notebook's driver-vs-table check (0.625 vs 0.646 on SD1.5): the noise was seeded per chunk, so the same
    pair got other noise in another batching. Now batch size, companions and position leave a score unchanged."""
    a, b = images(5, 30, 32), images(5, 31, 32)
    kw = dict(layers="self", timesteps=(300, 700), progress=False, guidance_scale=7.5, prompt="photo of cat")
    whole = diffsim_sweep(tiny, a, b, batch_size=5, **kw)
    for bs in (2, 3):
        part = diffsim_sweep(tiny, a, b, batch_size=bs, **kw)
        for key in whole.aas:
            torch.testing.assert_close(part.aas[key], whole.aas[key], atol=1e-5, rtol=0)
            torch.testing.assert_close(part.feature_cosine[key], whole.feature_cosine[key], atol=1e-5, rtol=0)
    alone = diffsim_sweep(tiny, a[3:4], b[3:4], batch_size=8, **kw)  # pair 3 scored on its own
    for key in whole.aas:
        torch.testing.assert_close(alone.aas[key], whole.aas[key][3:4], atol=1e-5, rtol=0)


def test_noising_builds_on_the_latents_device(tiny):
    """Tensors created without a device land on the default one (meta here, as they would land on the CPU while
    the model is on CUDA): the noised latents must still be on the latents' device."""
    x0 = torch.randn(4, 4, 8, 8)
    with torch.device("meta"):
        out = diffsim_module._noised_pairs(tiny, x0, 500, 0, 7.5)
    assert out.device == x0.device and out.shape == (8, 4, 8, 8)


# ---------------------------------------------------------------- fidelity: the official layer and timesteps

def test_official_timesteps_from_the_schedulers():
    """t = timesteps[target_step] of the official 1000-step schedules (SD1.5's PNDM, SDXL's Euler), rebuilt here."""
    from diffusers import EulerDiscreteScheduler, PNDMScheduler

    sd = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    pndm = PNDMScheduler(**sd, skip_prk_steps=True, set_alpha_to_one=False)
    euler = EulerDiscreteScheduler(**sd, timestep_spacing="leading")
    for sched, name in ((pndm, "sd15"), (euler, "sdxl")):
        sched.set_timesteps(1000)
        for step in (2, 500, 600, 750, 900, 999):
            assert official_timestep(step, name) == int(sched.timesteps[step]), (name, step)
    assert DiffSimArgs.for_model("sd15").timestep == int(pndm.timesteps[500]) == 501  # NIGHTS, target_step 500
    assert DiffSimArgs.for_model("sdxl").timestep == int(euler.timesteps[500]) == 500


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_official_layer_is_the_real_models_default(arch):
    """The official hook, by position on the real architecture: SD1.5 up_blocks[1:][0].attentions[-1]
    .transformer_blocks[-1].attn1 (any single --target_layer collapses to 0); SDXL the same position."""
    from diffusers import UNet2DConditionModel

    from diffnb.models import UNET_CONFIGS

    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET_CONFIGS[arch])
    target = (unet.up_blocks[1:] if arch == "sd15" else unet.up_blocks[:-1])[0].attentions[-1].transformer_blocks[-1]
    args = DiffSimArgs.for_model(arch)
    assert unet.get_submodule(args.layer) is target.attn1 and unet.get_submodule(args.ip_layer) is target.attn2
    assert resolution(unet, args.layer) * 512 // (8 * unet.config.sample_size) == 16  # 16x16 tokens at 512²
    assert (args.prompt, args.guidance_scale, args.image_size, args.ip_scale) == ("High quality image", 7.5, 512, 0.5)
    kw = args.score_kwargs()
    assert kw["layer"] == args.layer and kw["timestep"] == args.timestep and kw["batch_size"] == args.batch_size


def test_toy_triplets_have_the_answers_they_claim():
    from diffnb.toyworld.probes import Probes
    probes = Probes()
    for kind, same, differ in [("style", "background", "shape"), ("content", "shape", None), ("shape", "shape", None)]:
        ref, pos, neg = (probes.predict(x) for x in triplets(kind, 12, seed=3))
        assert ref[same] == pos[same] and all(r != n for r, n in zip(ref[same], neg[same])), kind
        if differ:  # the adversarial half: the negative shares the reference's content
            assert ref[differ] == neg[differ] and all(r != p for r, p in zip(ref[differ], pos[differ]))
        if kind == "content":
            assert ref["color"] == pos["color"] and ref["background"] == pos["background"] == neg["background"]
    assert two_afc([1, 2, 3], [0, 2, 4]) == pytest.approx(0.5)


def test_best_setting_ranks_by_2afc_then_margin():
    """Both "a" and "b" score 2AFC 1.0; "b" separates by more per unit spread, so it wins; "c" (0.5) never does."""
    scores = {"a": [1.0, 1.5, 1.2, 0.9, 1.0, 1.1], "b": [2.0, 2.4, 2.2, 1.0, 1.2, 1.3], "c": [5.0, 0.0, 5.0, 0.0, 9.0, 9.0]}
    assert best_setting(scores, 3) == "b"
    assert best_setting({k: scores[k] for k in "ac"}, 3) == "a"  # 2AFC first: c's huge mean margin does not count
    scores["a"] = [9.0, 9.0, 9.0, 0.0, 0.0, 0.0]  # constant margin: infinitely separated, std 0: ranks above any spread
    assert best_setting(scores, 3) == "a"
    with pytest.raises(ValueError, match="expected \\(6,\\)"):
        best_setting({"a": [1.0, 2.0]}, 3)
    with pytest.raises(ValueError, match="empty"):
        best_setting({}, 3)


@pytest.mark.skipif(not toy_is_trained(), reason="toy model not trained")
def test_toy_model_finds_style_and_content():
    """Pick the best layer x timestep on one set of triplets, then score fresh held-out triplets with it."""
    from diffnb.models import load_pipeline
    pipe = load_pipeline("toy", device="cpu")
    for kind in ("style", "content"):
        ref, pos, neg = triplets(kind, 32, seed=0)
        sweep = diffsim_sweep(pipe, np.concatenate([ref, ref]), np.concatenate([pos, neg]), timesteps=(50, 500),
                              progress=False)
        best = best_setting(sweep.aas, 32)
        ref, pos, neg = triplets(kind, 32, seed=1)
        s_pos, s_neg = (diffsim(pipe, ref, x, best[0], best[1], progress=False) for x in (pos, neg))
        acc, pixel = two_afc(s_pos, s_neg), two_afc(pixel_l2_similarity(ref, pos), pixel_l2_similarity(ref, neg))
        assert acc >= 0.85 and acc >= pixel + 0.2, (kind, best, acc, pixel)

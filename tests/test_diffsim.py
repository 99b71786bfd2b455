"""DiffSim-S: the score against the paper's equation, no side effects, bad input, and the effect on the toy model."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffnb.hooks import capture
from diffnb.models import toy_is_trained
from diffnb.papers.diffsim import (diffsim, diffsim_sweep, pixel_l2_similarity, symmetric_aas, toy_triplets,
                                   two_afc)
from diffnb.processors import attention_names


def images(n, seed):
    g = torch.Generator().manual_seed(seed)
    size = 64
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
    torch.testing.assert_close(diffsim(tiny, a, a, "self", 500, progress=False), torch.ones(2), atol=1e-5, rtol=0)

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
        toy_triplets("colour", 2)


def test_toy_triplets_have_the_answers_they_claim():
    from diffnb.toyworld.probes import Probes
    probes = Probes()
    for kind, same, differ in [("style", "background", "shape"), ("content", "shape", None), ("shape", "shape", None)]:
        ref, pos, neg = (probes.predict(x) for x in toy_triplets(kind, 12, seed=3))
        assert ref[same] == pos[same] and all(r != n for r, n in zip(ref[same], neg[same])), kind
        if differ:  # the adversarial half: the negative shares the reference's content
            assert ref[differ] == neg[differ] and all(r != p for r, p in zip(ref[differ], pos[differ]))
        if kind == "content":
            assert ref["color"] == pos["color"] and ref["background"] == pos["background"] == neg["background"]
    assert two_afc([1, 2, 3], [0, 2, 4]) == pytest.approx(0.5)


@pytest.mark.skipif(not toy_is_trained(), reason="toy model not trained")
def test_toy_model_finds_style_and_content():
    """Pick the best layer x timestep on one set of triplets, then score fresh held-out triplets with it."""
    from diffnb.models import load_pipeline
    pipe = load_pipeline("toy", device="cpu")
    for kind in ("style", "content"):
        ref, pos, neg = toy_triplets(kind, 32, seed=0)
        sweep = diffsim_sweep(pipe, np.concatenate([ref, ref]), np.concatenate([pos, neg]), timesteps=(50, 500),
                              progress=False)
        best = max(sweep.aas, key=lambda key: two_afc(sweep.aas[key][:32], sweep.aas[key][32:]))
        ref, pos, neg = toy_triplets(kind, 32, seed=1)
        s_pos, s_neg = (diffsim(pipe, ref, x, best[0], best[1], progress=False) for x in (pos, neg))
        acc, pixel = two_afc(s_pos, s_neg), two_afc(pixel_l2_similarity(ref, pos), pixel_l2_similarity(ref, neg))
        assert acc >= 0.85 and acc >= pixel + 0.2, (kind, best, acc, pixel)

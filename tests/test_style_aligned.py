import numpy as np
import pytest
import torch

from diffnb.papers.style_aligned import SharedAttention, StyleAlignedArgs, generate, style_aligned
from diffnb.inversion import ddim_invert
from tests.conftest import gen

PROMPTS = ["a red heart", "a blue moon", "a cat", "a green circle"]


def _paper_attention(attn, x, args, halves):
    """The paper's equations written out directly (einsum + softmax), independent of diffnb's processor."""
    b, n, _ = x.shape
    h = attn.heads
    q, k, v = (f(x).view(b, n, h, -1).transpose(1, 2) for f in (attn.to_q, attn.to_k, attn.to_v))
    per = b // halves
    out = []
    for i in range(b):
        r = (i // per) * per
        def ada(t):
            mu, sd = t[i].mean(-2, keepdim=True), (t[i].var(-2, keepdim=True) + 1e-5).sqrt()
            mur, sdr = t[r].mean(-2, keepdim=True), (t[r].var(-2, keepdim=True) + 1e-5).sqrt()
            return (t[i] - mu) / sd * sdr + mur
        qi, ki = ada(q), ada(k)
        s = 1.0 if i == r else args.shared_score_scale
        keys = torch.cat([ki, s * k[r]], dim=-2)
        vals = torch.cat([v[i], v[r]], dim=-2)
        logits = torch.einsum("hnd,hmd->hnm", qi, keys) / qi.shape[-1] ** 0.5
        logits[..., n:] += args.shared_score_shift
        out.append(torch.einsum("hnm,hmd->hnd", logits.softmax(-1), vals))
    o = torch.stack(out).transpose(1, 2).reshape(b, n, -1)
    return attn.to_out[0](o)


@pytest.mark.parametrize("scale, shift", [(1.0, 0.0), (0.5, float(np.log(2)))])
def test_parity_with_paper_equations_on_tiny_sdxl(scale, shift):
    from diffnb.models import tiny_pipeline
    unet = tiny_pipeline("sdxl").unet
    attn = unet.get_submodule("up_blocks.0.attentions.0.transformer_blocks.1.attn1")
    args = StyleAlignedArgs(shared_score_scale=scale, shared_score_shift=shift)
    x = torch.randn(4, 16, attn.to_q.in_features, generator=torch.Generator().manual_seed(0))
    proc = SharedAttention(args, halves=2)
    ours = proc(attn, x)
    ref = _paper_attention(attn, x, args, halves=2)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_reference_is_unchanged_and_others_change(tiny):
    kw = dict(num_inference_steps=3, output_type="np", guidance_scale=5.0)
    alone = tiny(PROMPTS[0], generator=gen(0), **kw).images[0]
    vanilla = tiny(PROMPTS, generator=gen(0), **kw).images
    aligned = generate(tiny, PROMPTS, generator=gen(0), num_inference_steps=3)
    assert np.abs(aligned[0] - vanilla[0]).max() < 1e-4 and np.abs(alone - vanilla[0]).max() < 1e-4
    assert np.abs(aligned[1:] - vanilla[1:]).max() > 1e-3


def test_restores_processors_and_norm_hooks(tiny):
    unet = tiny.unet
    before = dict(unet.attn_processors)
    hooks = sum(len(m._forward_hooks) for m in unet.modules())
    with pytest.raises(RuntimeError):
        with style_aligned(unet):
            assert sum(len(m._forward_hooks) for m in unet.modules()) > hooks
            raise RuntimeError("boom")
    assert all(unet.attn_processors[k] is v for k, v in before.items())
    assert sum(len(m._forward_hooks) for m in unet.modules()) == hooks


def test_bad_input(tiny):
    with pytest.raises(ValueError, match="unknown StyleAligned options"):
        with style_aligned(tiny.unet, adain_q=True):
            pass
    with pytest.raises(ValueError, match="matches nothing"):
        with style_aligned(tiny.unet, layers="up.*.attn7"):
            pass
    with pytest.raises(ValueError, match="self-attention only"):
        with style_aligned(tiny.unet, layers="cross"):
            pass
    with pytest.raises(ValueError, match=">= 2 prompts"):
        generate(tiny, ["one prompt"])
    with pytest.raises(ValueError, match="shared_score_scale"):
        StyleAlignedArgs(shared_score_scale=0)


def test_reference_from_inversion_pins_image_zero(tiny):
    img = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    inv = ddim_invert(tiny, img, "a red heart", num_inference_steps=3, progress=False)
    out = generate(tiny, PROMPTS[:2], reference=inv, generator=gen(1), guidance_scale=1.0, output_type="latent")
    # image 0 ends exactly on the inverted trajectory's x_0
    assert torch.allclose(out[0], inv.latents[0][0], atol=1e-5)


def test_whole_half_joins_each_cfg_half():
    from diffnb.papers.style_aligned import whole_half
    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 2, 3, 5)  # image i is filled with i
    y = whole_half(x, halves=2)
    assert y.shape == (4, 2, 6, 5)
    assert y[0, 0, :, 0].tolist() == [0, 0, 0, 1, 1, 1] and y[3, 0, :, 0].tolist() == [2, 2, 2, 3, 3, 3]


@pytest.mark.skipif(not __import__("diffnb.models", fromlist=["x"]).toy_is_trained(), reason="toy model not trained")
def test_style_from_inverted_render_on_toy():
    """A held-out render's background carries over to images whose prompts name no background."""
    from diffnb.models import load_pipeline
    from diffnb.toyworld import ToyDataset, describe, prompt
    from diffnb.toyworld.probes import Probes
    pipe = load_pipeline("toy", device="cpu")
    probes = Probes()
    agree, base = [], []
    for k, bg in enumerate(["striped", "dotted", "checkered", "plain"]):
        r = ToyDataset("heldout", 20, n_objects=1, background=bg)[k]
        ref_prompt = describe(r.scene).split(" on ")[0]
        inv = ddim_invert(pipe, r.image, ref_prompt, num_inference_steps=20, progress=False)
        others = [prompt(s, c) for s, c in [("heart", "blue"), ("moon", "green"), ("square", "yellow")]]
        out = generate(pipe, [ref_prompt] + others, reference=inv, generator=gen(80_000 + k),
                       args=StyleAlignedArgs(shared_score_shift=float(np.log(2))))
        van = pipe(others, generator=gen(80_000 + k), output_type="np").images
        agree += [b == bg for b in probes.predict((out[1:] * 255).round().astype(np.uint8))["background"]]
        base += [b == bg for b in probes.predict((van * 255).round().astype(np.uint8))["background"]]
    assert np.mean(agree) >= np.mean(base) + 0.25, (agree, base)

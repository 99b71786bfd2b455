"""DiffSim-C on a tiny random IP-Adapter Plus, written offline in h94/IP-Adapter's layout and loaded through
diffusers' own `load_ip_adapter` (`ip_adapter`), which must leave the pipeline exactly as it found it."""
import pytest
import torch
import torch.nn.functional as F

from diffnb.models import tiny_pipeline
from diffnb.papers.diffsim import diffsim
from diffnb.papers.diffsim_c import IPAlignedAttentionScore, diffsim_c, ip_adapter, ip_score_processors
from diffnb.standin_ip_adapter import IP_ADAPTERS, VIT_SMALL, write_standin_ip_adapter

LAYER = "up_blocks.1.attentions.1.transformer_blocks.0.attn2"  # up_blocks[1]'s last transformer block
CLIP_DIM, QUERIES = VIT_SMALL["hidden_size"], 16


@pytest.fixture(scope="module")
def ip_folder(tmp_path_factory):
    return write_standin_ip_adapter(tiny_pipeline("sd15"), tmp_path_factory.mktemp("ip_adapter"))


@pytest.fixture(scope="module")
def ip_pipe(ip_folder):
    pipe = tiny_pipeline("sd15")
    with ip_adapter(pipe, source=str(ip_folder)):
        yield pipe


def images(n, seed):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def reference_score(x, ip, attn, proc, pairs):
    """DiffSim-C from the weights, written out independently: explicit softmax, A<->B partner by index."""
    heads = attn.heads
    q = (x @ attn.to_q.weight.T).unflatten(-1, (heads, -1))  # (B, N, h, d)
    tokens = ip.flatten(1, -2)  # (B, images * tokens, dim)
    k = (tokens @ proc.to_k_ip[0].weight.T).unflatten(-1, (heads, -1))
    v = (tokens @ proc.to_v_ip[0].weight.T).unflatten(-1, (heads, -1))

    def attend(k, v):
        w = torch.einsum("bnhd,bmhd->bhnm", q.double(), k.double()) / q.shape[-1] ** 0.5
        return torch.einsum("bhnm,bmhd->bnhd", w.softmax(-1), v.double())

    groups = x.shape[0] // (2 * pairs)
    partner = torch.arange(x.shape[0]).view(groups, 2, pairs).flip(1).flatten()
    own, aligned = attend(k, v), attend(k[partner], v[partner])
    per_image = lambda o: o.reshape(groups, 2, pairs, -1).permute(1, 2, 0, 3).reshape(2, pairs, -1)
    return F.cosine_similarity(per_image(own), per_image(aligned), dim=-1).mean(0).float()


@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_matches_independent_computation(ip_pipe, guidance):
    attn = ip_pipe.unet.get_submodule(LAYER)
    proc = attn.processor
    seen = {}
    hook = attn.register_forward_hook(
        lambda m, args, kwargs, out: seen.update(x=args[0], ehs=kwargs["encoder_hidden_states"]), with_kwargs=True)
    try:
        got = diffsim_c(ip_pipe, images(2, 0), images(2, 1), LAYER, 500, prompt="photo of cat", guidance_scale=guidance)
    finally:
        hook.remove()
    text, ip = seen["ehs"]
    assert ip[0].shape == (4 * (2 if guidance > 1 else 1), 1, QUERIES, 32)  # Plus: (batch, images, tokens, dim)
    want = reference_score(seen["x"], ip[0], attn, proc, pairs=2)
    assert got.shape == (2,)
    assert (got - want).abs().max().item() <= 1e-5
    assert (got < 1 - 1e-3).all()  # different images really score below 1


def test_identity_symmetry_and_batching(ip_pipe):
    a, b = images(3, 2), images(3, 3)
    shared = dict(noise="shared", progress=False)  # one noise for A and B: an identity and a symmetric score
    assert torch.allclose(diffsim_c(ip_pipe, a, a, LAYER, 300, **shared), torch.ones(3), atol=1e-5)
    ab, ba = diffsim_c(ip_pipe, a, b, LAYER, 300, **shared), diffsim_c(ip_pipe, b, a, LAYER, 300, **shared)
    assert torch.allclose(ab, ba, atol=1e-6)
    both = diffsim_c(ip_pipe, a, b, "up_blocks.1.*.attn2", 300)  # a pattern: mean over the matched layers
    assert both.shape == (3,) and torch.isfinite(both).all()
    # official noise: A and B noised apart, and a pair's score does not depend on the batching
    whole = diffsim_c(ip_pipe, a, b, LAYER, 300, guidance_scale=7.5, prompt="photo of cat", batch_size=3)
    for bs in (1, 2):
        torch.testing.assert_close(diffsim_c(ip_pipe, a, b, LAYER, 300, guidance_scale=7.5, prompt="photo of cat",
                                             batch_size=bs), whole, atol=1e-5, rtol=0)
    # A's queries read the IP tokens of A and of B = A, which no noise touches: the identity holds either way
    assert torch.allclose(diffsim_c(ip_pipe, a, a, LAYER, 300), torch.ones(3), atol=1e-5)


def test_unet_output_unchanged_and_processors_restored(ip_pipe):
    unet = ip_pipe.unet
    before = dict(unet.attn_processors)
    seen = {}

    def hook(module, args, kwargs, out):
        seen.update(args=args, kwargs=kwargs, out=out.sample.clone())
    handle = unet.register_forward_hook(hook, with_kwargs=True)
    try:
        diffsim_c(ip_pipe, images(2, 4), images(2, 5), "cross", 700, guidance_scale=7.5)
    finally:
        handle.remove()
    after = unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    with torch.no_grad():
        plain = unet(*seen["args"], **seen["kwargs"]).sample
    assert torch.equal(plain, seen["out"])  # the scoring run gave the UNet's own output, bit for bit


def test_restores_after_exception(ip_pipe):
    unet = ip_pipe.unet
    before = dict(unet.attn_processors)
    with pytest.raises(RuntimeError, match="boom"):
        with ip_score_processors(unet, LAYER, 1, {}):
            assert isinstance(unet.attn_processors[LAYER + ".processor"], IPAlignedAttentionScore)
            raise RuntimeError("boom")
    assert all(unet.attn_processors[k] is v for k, v in before.items())

    def boom(*_):
        raise RuntimeError("boom inside the UNet")
    handle = unet.mid_block.register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom inside"):
            diffsim_c(ip_pipe, images(1, 0), images(1, 1), LAYER, 100)
    finally:
        handle.remove()
    assert all(unet.attn_processors[k] is v for k, v in before.items())


def test_bad_input(ip_pipe):
    a, b = images(2, 0), images(2, 1)
    with pytest.raises(ValueError, match="no IP-Adapter loaded.*with ip_adapter"):
        diffsim_c(tiny_pipeline("sd15"), a, b, LAYER, 500)
    with pytest.raises(ValueError, match="an IP-Adapter is loaded already"):
        with ip_adapter(ip_pipe):
            pass
    with pytest.raises(ValueError, match="have no IP-Adapter"):
        diffsim_c(ip_pipe, a, b, "up_blocks.1.*.attn1", 500)  # self-attention has no IP branch
    with pytest.raises(ValueError, match="matches nothing"):
        diffsim_c(ip_pipe, a, b, "up_blocks.7.*.attn2", 500)
    with pytest.raises(ValueError, match="same shape"):
        diffsim_c(ip_pipe, a, images(3, 1), LAYER, 500)
    with pytest.raises(TypeError, match="image must be"):
        diffsim_c(ip_pipe, ["not an image"], b, LAYER, 500)
    with pytest.raises(ValueError, match="timestep"):
        diffsim_c(ip_pipe, a, b, LAYER, 1000)
    attn = ip_pipe.unet.get_submodule(LAYER)
    with pytest.raises(ValueError, match="IP-Adapter image tokens"):  # a call without the (text, ip) tuple
        IPAlignedAttentionScore(attn.processor, LAYER, 1, {})(attn, torch.randn(2, 64, 16), torch.randn(2, 5, 32))


# ---------------------------------------------------------------- crash: the adapter stayed loaded after DiffSim-C

def pipeline_state(pipe):
    unet = pipe.unet
    return (dict(unet.attn_processors), unet.encoder_hid_proj, unet.config.encoder_hid_dim_type,
            pipe.image_encoder, pipe.feature_extractor, pipe.config.image_encoder, pipe.config.feature_extractor)


def assert_same_state(before, after):
    procs, *rest = before
    assert after[0].keys() == procs.keys() and all(after[0][k] is v for k, v in procs.items())
    assert all(x is y or x == y for x, y in zip(after[1:], rest)), (after[1:], rest)


def test_plain_calls_work_after_diffsim_c(ip_folder):
    """Notebook 05 on SD1.5: `load_ip_adapter`, DiffSim-C, then any plain UNet call died (`image_embeds` missing).
    With the adapter loaded for a block, the pipeline afterwards is the one from before, bit for bit."""
    pipe = tiny_pipeline("sd15")
    a, b = images(2, 6), images(2, 7)
    plain = diffsim(pipe, a, b, "self", 400, progress=False)
    before = pipeline_state(pipe)
    with ip_adapter(pipe, source=str(ip_folder)) as loaded:
        assert loaded is pipe and pipe.unet.config.encoder_hid_dim_type == "ip_image_proj"
        c = diffsim_c(pipe, a, b, LAYER, 400, guidance_scale=7.5, prompt="photo of cat")
        with pytest.raises((ValueError, TypeError)):  # SD1.5: "argument of type NoneType is not iterable"
            diffsim(pipe, a, b, "self", 400, progress=False)  # the failure the notebook met, while loaded
    assert c.shape == (2,) and torch.isfinite(c).all()
    assert_same_state(before, pipeline_state(pipe))
    torch.testing.assert_close(diffsim(pipe, a, b, "self", 400, progress=False), plain, atol=0, rtol=0)


def test_pipeline_restored_when_the_body_raises(ip_folder):
    pipe = tiny_pipeline("sd15")
    before = pipeline_state(pipe)
    with pytest.raises(RuntimeError, match="boom"):
        with ip_adapter(pipe, source=str(ip_folder)):
            raise RuntimeError("boom")
    assert_same_state(before, pipeline_state(pipe))
    with pytest.raises(OSError):  # a failed load restores too
        with ip_adapter(pipe, source=str(ip_folder / "nowhere")):
            pass
    assert_same_state(before, pipeline_state(pipe))


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_standin_adapter_loads_through_diffusers(arch, monkeypatch):
    """Under DIFFNB_STANDIN `ip_adapter(pipe)` writes a random IP-Adapter Plus and ViT image encoder in
    h94/IP-Adapter's layout (SDXL: sdxl_models/ + models/image_encoder) and loads them with `load_ip_adapter`."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
    from transformers import CLIPVisionModelWithProjection

    monkeypatch.setenv("DIFFNB_STANDIN", "1")
    pipe = tiny_pipeline(arch)
    before = pipeline_state(pipe)
    layer = [n for n in pipe.unet.attn_processors if n.endswith("attn2.processor")][-1][: -len(".processor")]
    with ip_adapter(pipe):
        assert isinstance(pipe.image_encoder, CLIPVisionModelWithProjection)
        assert pipe.image_encoder.config.patch_size == 14 and pipe.image_encoder.config.image_size == 224
        assert isinstance(pipe.unet.attn_processors[layer + ".processor"], IPAdapterAttnProcessor2_0)
        assert pipe.unet.attn_processors[layer + ".processor"].scale == [0.5]
        s = diffsim_c(pipe, images(2, 8), images(2, 9), layer, 500, guidance_scale=7.5, prompt="photo of cat")
    assert s.shape == (2,) and torch.isfinite(s).all()
    assert_same_state(before, pipeline_state(pipe))
    assert sorted(IP_ADAPTERS) == ["sd15", "sdxl"]

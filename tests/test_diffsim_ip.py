"""DiffSim-C on a tiny random IP-Adapter Plus, built offline in the checkpoint format of h94/IP-Adapter."""
import pytest
import torch
import torch.nn.functional as F

from diffnb.models import tiny_pipeline
from diffnb.papers.diffsim import IPAlignedAttentionScore, diffsim_c, ip_score_processors

LAYER = "up_blocks.1.attentions.1.transformer_blocks.0.attn2"  # up_blocks[1]'s last transformer block
CLIP_DIM, RESAMPLER_DIM, QUERIES = 32, 64, 4  # the Resampler's width is heads x 64 (diffusers infers heads from it)


def ip_adapter_plus_state_dict(unet, seed=0) -> dict:
    """Random weights under the original checkpoint's key names: a 4-layer Perceiver Resampler ("image_proj.*")
    and to_k_ip / to_v_ip for every cross-attention layer ("ip_adapter.{1,3,5,...}.*", attn1/attn2 interleaved)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, s=0.1: torch.randn(*shape, generator=g) * s
    d, cross = RESAMPLER_DIM, unet.config.cross_attention_dim
    sd = {"latents": rnd(1, QUERIES, d, s=d ** -0.5), "proj_in.weight": rnd(d, CLIP_DIM), "proj_in.bias": rnd(d),
          "proj_out.weight": rnd(cross, d), "proj_out.bias": rnd(cross),
          "norm_out.weight": 1 + rnd(cross), "norm_out.bias": rnd(cross)}
    for i in range(4):  # layers.i.0: PerceiverAttention, layers.i.1: FeedForward (LayerNorm, Linear, GELU, Linear)
        for norm in ("0.norm1", "0.norm2", "1.0"):
            sd[f"layers.{i}.{norm}.weight"], sd[f"layers.{i}.{norm}.bias"] = 1 + rnd(d), rnd(d)
        sd.update({f"layers.{i}.0.to_q.weight": rnd(d, d), f"layers.{i}.0.to_kv.weight": rnd(2 * d, d),
                   f"layers.{i}.0.to_out.weight": rnd(d, d), f"layers.{i}.1.1.weight": rnd(4 * d, d),
                   f"layers.{i}.1.3.weight": rnd(d, 4 * d)})
    out = {"image_proj." + k: v for k, v in sd.items()}
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            inner = unet.get_submodule(name[: -len(".processor")]).to_k.out_features
            out[f"ip_adapter.{key_id}.to_k_ip.weight"] = rnd(inner, cross, s=cross ** -0.5)
            out[f"ip_adapter.{key_id}.to_v_ip.weight"] = rnd(inner, cross, s=cross ** -0.5)
            key_id += 2
    return out


@pytest.fixture(scope="module")
def ip_pipe(tmp_path_factory):
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    pipe = tiny_pipeline("sd15")
    torch.manual_seed(1)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=CLIP_DIM, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8, projection_dim=32)).eval()
    extractor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pipe.register_modules(image_encoder=encoder, feature_extractor=extractor)  # so load_ip_adapter loads no encoder
    folder = tmp_path_factory.mktemp("ip_adapter")
    save_file(ip_adapter_plus_state_dict(pipe.unet), str(folder / "ip-adapter-plus_tiny.safetensors"))
    pipe.load_ip_adapter(str(folder), subfolder="", weight_name="ip-adapter-plus_tiny.safetensors")
    pipe.set_ip_adapter_scale(0.5)
    return pipe


def images(n, seed):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


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


def test_identity_and_symmetry(ip_pipe):
    a, b = images(3, 2), images(3, 3)
    assert torch.allclose(diffsim_c(ip_pipe, a, a, LAYER, 300), torch.ones(3), atol=1e-5)
    ab, ba = diffsim_c(ip_pipe, a, b, LAYER, 300), diffsim_c(ip_pipe, b, a, LAYER, 300)
    assert torch.allclose(ab, ba, atol=1e-6)
    both = diffsim_c(ip_pipe, a, b, "up_blocks.1.*.attn2", 300)  # a pattern: mean over the matched layers
    assert both.shape == (3,) and torch.isfinite(both).all()


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
    with pytest.raises(ValueError, match="no IP-Adapter loaded"):
        diffsim_c(tiny_pipeline("sd15"), a, b, LAYER, 500)
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

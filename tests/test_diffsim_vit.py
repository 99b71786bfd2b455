"""CLIP-AAS / DINOv2-AAS on tiny random ViTs: parity with a from-the-weights recomputation, identities, hooks."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel,
                          CLIPVisionModelWithProjection, Dinov2Config, Dinov2Model)

from diffnb.papers.diffsim_encoders import vit_aas, vit_attention_layers

CLIP_NORM = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _clip_cfg():
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=32, patch_size=8, projection_dim=16)


def make(kind):
    """(model, size, norm, blocks, layer-name prefix, block -> (layer_norm, attention))."""
    torch.manual_seed(0)
    if kind == "clip":
        m = CLIPVisionModel(_clip_cfg()).eval()
        return m, 32, CLIP_NORM, m.encoder.layers, "encoder.layers", lambda b: (b.layer_norm1, b.self_attn)
    if kind == "clip_proj":
        m = CLIPVisionModelWithProjection(_clip_cfg()).eval()
        return (m, 32, CLIP_NORM, m.vision_model.encoder.layers, "vision_model.encoder.layers",
                lambda b: (b.layer_norm1, b.self_attn))
    m = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=28,
                                 patch_size=7, mlp_ratio=2, layerscale_value=0.5)).eval()
    return m, 28, IMAGENET_NORM, m.encoder.layer, "encoder.layer", lambda b: (b.norm1, b.attention)


KINDS = ["clip", "clip_proj", "dinov2"]


def images(n, size, seed):
    """Float tensors in [-1, 1], the range diffnb reads float tensor images in (`diffnb.images`)."""
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def reference_aas(kind, a, b, i):
    """Symmetric AAS at block i, recomputed from the weights: hidden state -> layer norm -> q/k/v -> SDPA."""
    model, _, (mean, std), blocks, _, parts = make(kind)
    x = ((torch.cat([a, b]) + 1) / 2 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        hidden = model(pixel_values=x, output_hidden_states=True).hidden_states[i]  # input of block i
        norm, attn = parts(blocks[i])
        h = norm(hidden)
        heads = 4
        q, k, v = (F.linear(h, p.weight, p.bias).reshape(h.shape[0], h.shape[1], heads, -1).transpose(1, 2)
                   for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    n = len(a)

    def aas(s, o):  # image s reads image o's keys/values
        own = F.scaled_dot_product_attention(q[s], k[s], v[s])
        aligned = F.scaled_dot_product_attention(q[s], k[o], v[o])
        return F.cosine_similarity(own.flatten(1), aligned.flatten(1), dim=1)

    ia, ib = slice(0, n), slice(n, 2 * n)
    return (aas(ia, ib) + aas(ib, ia)) / 2


def no_hooks(model):
    return all(not (m._forward_hooks or m._forward_pre_hooks or m._forward_hooks_with_kwargs
                    or m._forward_pre_hooks_with_kwargs or m._backward_hooks) for m in model.modules())


@pytest.mark.parametrize("kind", KINDS)
def test_layers_listed_by_name(kind):
    model, _, _, blocks, prefix, _ = make(kind)
    attn = "self_attn" if kind.startswith("clip") else "attention"
    assert vit_attention_layers(model) == [f"{prefix}.{i}.{attn}" for i in range(len(blocks))]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("i", [0, 1])
def test_parity_with_reference(kind, i):
    model, size, *_ = make(kind)
    a, b = images(3, size, 1), images(3, size, 2)
    layer = vit_attention_layers(model)[i]
    got = vit_aas(model, a, b, layer)
    want = reference_aas(kind, a, b, i)
    assert got.shape == (3,)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got < 0.999).all()  # different random images are not scored as identical


@pytest.mark.parametrize("kind", KINDS)
def test_pattern_averages_matched_layers(kind):
    model, size, *_ = make(kind)
    a, b = images(2, size, 3), images(2, size, 4)
    per_layer = [vit_aas(model, a, b, name) for name in vit_attention_layers(model)]
    torch.testing.assert_close(vit_aas(model, a, b, "*"), torch.stack(per_layer).mean(0))


@pytest.mark.parametrize("kind", KINDS)
def test_identity_and_symmetry(kind):
    model, size, *_ = make(kind)
    a, b = images(3, size, 5), images(3, size, 6)
    layer = vit_attention_layers(model)[-1]
    torch.testing.assert_close(vit_aas(model, a, a, layer), torch.ones(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(vit_aas(model, a, b, layer), vit_aas(model, b, a, layer), atol=1e-6, rtol=0)


def test_image_formats_agree_and_resize():
    model, size, *_ = make("clip")
    rng = np.random.default_rng(0)
    arr_a, arr_b = (rng.integers(0, 256, (2, 48, 40, 3), dtype=np.uint8) for _ in range(2))
    layer = "encoder.layers.1.self_attn"
    from_numpy = vit_aas(model, arr_a, arr_b, layer)  # resized from 48x40 to 32x32
    from_pil = vit_aas(model, [Image.fromarray(x) for x in arr_a], [Image.fromarray(x) for x in arr_b], layer)
    torch.testing.assert_close(from_numpy, from_pil)
    assert from_numpy.shape == (2,)


def test_image_processor_is_used():
    model, size, (mean, std), *_ = make("clip")
    a, b = images(2, size, 7), images(2, size, 8)
    calls = []

    def processor(images, return_tensors):
        calls.append(return_tensors)
        x = ((images + 1) / 2 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        return SimpleNamespace(pixel_values=x)

    layer = "encoder.layers.0.self_attn"
    torch.testing.assert_close(vit_aas(model, a, b, layer, image_processor=processor), vit_aas(model, a, b, layer))
    assert calls == ["pt", "pt"]


@pytest.mark.parametrize("kind", KINDS)
def test_no_hooks_left_and_mode_restored(kind):
    model, size, _, blocks, *_ = make(kind)
    a, b = images(2, size, 9), images(2, size, 10)
    model.train()
    vit_aas(model, a, b, "*")
    assert no_hooks(model) and model.training

    def boom(module, args, output):
        raise RuntimeError("boom")

    handle = blocks[-1].register_forward_hook(boom)  # the forward raises after q/k/v hooks have fired
    with pytest.raises(RuntimeError, match="boom"):
        vit_aas(model, a, b, "*")
    handle.remove()
    assert no_hooks(model) and model.training


def test_bad_inputs():
    model, size, *_ = make("clip")
    a = images(2, size, 11)
    layer = "encoder.layers.0.self_attn"
    with pytest.raises(ValueError, match="same number of images"):
        vit_aas(model, a, images(3, size, 12), layer)
    with pytest.raises(ValueError, match=r"matches no self-attention layer.*encoder\.layers\.0\.self_attn"):
        vit_aas(model, a, a, "decoder.*")
    with pytest.raises(TypeError, match="dotted name or glob"):
        vit_aas(model, a, a, 0)
    with pytest.raises(ValueError, match="255"):  # float arrays are [0, 1]: 0..255 floats are refused
        vit_aas(model, np.full((2, size, size, 3), 200, np.float32), a, layer)
    with pytest.raises(ValueError, match="empty"):
        vit_aas(model, [], [], layer)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, vocab_size=99))
    for bad in (text, torch.nn.Linear(2, 2)):
        with pytest.raises(TypeError, match="CLIPVisionModel, CLIPVisionModelWithProjection or a DINOv2"):
            vit_aas(bad, a, a, layer)
        with pytest.raises(TypeError, match="CLIPVisionModel"):
            vit_attention_layers(bad)


@pytest.mark.parametrize("name, cls, patch, size", [("clip", CLIPVisionModel, 32, 224),
                                                     ("dinov2-small", Dinov2Model, 14, 518)])
def test_load_encoder_standin(name, cls, patch, size, monkeypatch):
    """Under DIFFNB_STANDIN the hub encoders of notebook 05 are random-weight models of the same class, with the
    real patch and image size, built offline; vit_aas scores with them."""
    from diffnb.papers.diffsim_encoders import load_encoder

    monkeypatch.setenv("DIFFNB_STANDIN", "1")
    model = load_encoder(name)
    assert type(model) is cls and not model.training
    assert (model.config.patch_size, model.config.image_size) == (patch, size)
    a, b = np.random.default_rng(0).integers(0, 256, (2, 2, 64, 64, 3), dtype=np.uint8)
    s = vit_aas(model, a, b, vit_attention_layers(model)[-1])
    assert s.shape == (2,) and torch.isfinite(s).all()
    with pytest.raises(ValueError, match="unknown encoder"):
        load_encoder("siglip")

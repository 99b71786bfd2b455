"""The stand-ins keep the real structure, the knob shrinks only sizes, and CUDA-only device bugs fail on the CPU."""
import numpy as np
import pytest
import torch

from diffnb import standin
from diffnb.pipeline import decode_latents, encode_image, vae_batch_size
from diffnb.layers import resolution
from diffnb.models import REGISTRY, load_pipeline, sized, spec


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def pipe(request):
    return standin.standin_pipeline(request.param)


def test_knob(monkeypatch):
    monkeypatch.setenv("DIFFNB_STANDIN", "1")
    assert (spec("sd15").resolution, spec("sd15").steps) == (128, 10)
    assert (spec("sdxl").resolution, spec("sdxl").steps) == (256, 10)
    assert spec("toy") == REGISTRY["toy"]  # the toy is never shrunk
    assert sized(5000, 20) == 20
    monkeypatch.setenv("DIFFNB_STANDIN", "full")
    assert spec("sdxl") == REGISTRY["sdxl"] and sized(5000, 20) == 5000
    monkeypatch.setenv("DIFFNB_STANDIN", "yes")
    with pytest.raises(ValueError, match="DIFFNB_STANDIN='yes' is not understood"):
        spec("sd15")


def test_real_structure(pipe):
    unet, arch = pipe.unet, ("sdxl" if hasattr(pipe, "text_encoder_2") else "sd15")
    assert pipe.vae_scale_factor == 8 and pipe.tokenizer.model_max_length == 77
    assert pipe.vae.config.force_upcast
    attn = {n for n in unet.attn_processors}
    if arch == "sd15":
        # the 16x16 up block has three cross-attentions, named as on the real model
        up16 = [n for n in attn if n.startswith("up_blocks.1.") and n.endswith("attn2.processor")]
        assert len(up16) == 3 and resolution(unet, "up_blocks.1.attentions.0") == 16
        assert unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    else:
        assert len(unet.down_blocks[2].attentions[0].transformer_blocks) == 10
        assert len(unet.down_blocks[1].attentions[0].transformer_blocks) == 2
        assert not any(n.startswith("down_blocks.0.") for n in attn)  # no attention at the top level
        assert unet.config.addition_embed_type == "text_time" and pipe.text_encoder_2 is not None
        assert resolution(unet, "up_blocks.0.attentions.0") == 32  # as SDXL at 1024²
    # a word the vocabulary lacks splits into several tokens, as rare words do in CLIP
    assert len(pipe.tokenizer("zyx", add_special_tokens=False).input_ids) == 3
    assert len(pipe.tokenizer("photo", add_special_tokens=False).input_ids) == 1


def test_load_pipeline_returns_standin(monkeypatch):
    monkeypatch.setenv("DIFFNB_STANDIN", "1")
    switched = []
    monkeypatch.setattr(standin, "flag_host_tensors_for_good", lambda: switched.append(True))  # not for the session
    pipe = load_pipeline("sdxl", "cpu")
    s = spec("sdxl")
    out = pipe("a photo of a dog", num_inference_steps=2, height=s.resolution, width=s.resolution, output_type="np")
    assert out.images.shape == (1, 256, 256, 3) and np.isfinite(out.images).all()
    assert switched == [True]  # a notebook on stand-ins is checked for device bugs from here on


def test_host_tensor_reaching_the_unet_fails_on_cpu(pipe):
    """On CUDA `torch.full((B,), t)` stays on the CPU and the UNet call fails; here it must fail too."""
    unet = pipe.unet
    dim = unet.config.cross_attention_dim
    extra = {}
    if unet.config.addition_embed_type == "text_time":
        extra["added_cond_kwargs"] = {"text_embeds": torch.zeros(1, 32, device="cpu"), "time_ids": torch.zeros(1, 6, device="cpu")}
    x, text = torch.zeros(1, 4, 8, 8, device="cpu"), torch.zeros(1, 77, dim, device="cpu")
    with standin.host_tensors_flagged():
        unet(x, torch.full((1,), 10, device=x.device), encoder_hidden_states=text, **extra)  # fine
        with pytest.raises(ValueError, match="'argument 1' .* built without device="):
            unet(x, torch.full((1,), 10), encoder_hidden_states=text, **extra)
        with pytest.raises(ValueError, match="'encoder_hidden_states' .* built without device="):
            unet(x, 10, encoder_hidden_states=torch.from_numpy(np.zeros((1, 77, dim), np.float32)), **extra)


def test_a_whole_pipeline_call_raises_no_false_alarm(pipe):
    with standin.host_tensors_flagged():
        out = pipe("a photo of a dog", num_inference_steps=2, height=64, width=64, output_type="np")
    assert np.isfinite(out.images).all()


def test_vae_runs_in_fp32_when_its_config_says_force_upcast(pipe):
    """SDXL's fp16 VAE gives NaN latents; diffusers' SDXL pipeline upcasts it, and so must encode/decode."""
    seen = []
    hook = pipe.vae.decoder.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    hook_e = pipe.vae.encoder.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    pipe.vae.to(torch.float16)
    try:
        image = np.zeros((64, 64, 3), np.uint8)
        try:
            decode_latents(pipe, encode_image(pipe, image).float())
        except RuntimeError:  # the old path: fp16 convolutions (not implemented on every CPU)
            pass
        assert seen and all(d == torch.float32 for d in seen), seen
        assert pipe.vae.dtype == torch.float16  # put back afterwards
    finally:
        hook.remove(), hook_e.remove()
        pipe.vae.to(torch.float32)


def test_decode_in_batches_gives_the_same_images(pipe):
    z = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    calls = []
    hook = pipe.vae.decoder.register_forward_pre_hook(lambda m, a: calls.append(len(a[0])))
    try:
        one = decode_latents(pipe, z, rounded=False, batch_size=2)
        assert calls == [2, 2, 1]
        np.testing.assert_allclose(one, decode_latents(pipe, z, rounded=False, batch_size=5), atol=1e-3)
    finally:
        hook.remove()
    assert vae_batch_size(1024, 1024) == 1 and vae_batch_size(512, 512) == 4


def test_memory_estimate_from_the_real_configs():
    from diffnb.models import estimate_memory, parameter_counts

    assert abs(parameter_counts("sd15")["unet"] / 859.52e6 - 1) < 1e-3  # SD1.5's UNet: 859.5 M parameters
    assert abs(parameter_counts("sdxl")["unet"] / 2567.46e6 - 1) < 1e-3  # SDXL's: 2.567 B
    small, big = estimate_memory("sdxl", unet_batch=2), estimate_memory("sdxl", unet_batch=16)
    assert small["weights_gib"] == 6.5 and small["gpu_gib"] < 15 < big["gpu_gib"]  # a T4 fits CFG on one image
    assert small["host_gib"] < 12
    with pytest.raises(ValueError, match="not a pipeline"):
        estimate_memory("clip")


def test_setup_says_which_model_runs_and_how_to_switch(monkeypatch):
    from diffnb.nb import model_hint

    monkeypatch.delenv("DIFFNB_MODEL", raising=False)
    gpu = model_hint(torch.device("cuda"))
    assert "'sd15' or 'sdxl'" in gpu and "form" in gpu
    assert "need a GPU" in model_hint(torch.device("cpu"))
    monkeypatch.setenv("DIFFNB_MODEL", "sdxl")
    assert "DIFFNB_MODEL=sdxl is set" in model_hint(torch.device("cuda"))

import numpy as np
import pytest
import torch

from diffnb.models import REGISTRY, load_pipeline, pick_device, pick_dtype, spec, tiny_pipeline
from tests.conftest import gen


def test_unknown_model_lists_known():
    with pytest.raises(ValueError, match="known:.*sd15"):
        load_pipeline("sd3")
    with pytest.raises(TypeError):
        spec(3)
    with pytest.raises(ValueError, match="encoder"):
        load_pipeline("clip")


def test_device_dtype_rules():
    cpu = torch.device("cpu")
    assert pick_dtype(cpu) == torch.float32
    assert pick_dtype(torch.device("cuda")) == torch.float16
    assert pick_dtype(cpu, "bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="float16 does not run on the CPU"):
        pick_dtype(cpu, torch.float16)
    with pytest.raises(ValueError, match="unknown dtype"):
        pick_dtype(cpu, "half-ish")
    with pytest.raises(TypeError):
        pick_dtype(cpu, torch.int8)
    with pytest.raises(TypeError):
        pick_device(3)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda")
        with pytest.raises(ValueError, match="float16"):
            load_pipeline("toy", device="cpu", dtype=torch.float16)


def test_registry_has_real_hub_ids():
    assert REGISTRY["sd15"].source == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert REGISTRY["sdxl"].source == "stabilityai/stable-diffusion-xl-base-1.0"
    assert REGISTRY["sdxl"].family == "sdxl"


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_tiny_pipeline_seeded_is_deterministic(arch):
    pipe = tiny_pipeline(arch)
    a = pipe("a cat", num_inference_steps=2, generator=gen(3), output_type="np").images
    b = pipe("a cat", num_inference_steps=2, generator=gen(3), output_type="np").images
    c = pipe("a cat", num_inference_steps=2, generator=gen(4), output_type="np").images
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    with pytest.raises(ValueError):
        tiny_pipeline("sd3")


def test_toy_loads_and_is_deterministic():
    pipe = load_pipeline("toy")
    a = pipe("a red heart", num_inference_steps=3, generator=gen(1), output_type="np").images
    b = pipe("a red heart", num_inference_steps=3, generator=gen(1), output_type="np").images
    assert np.array_equal(a, b)


def test_full_size_configs_match_the_real_architectures():
    from diffusers import UNet2DConditionModel
    from diffnb.models import UNET_CONFIGS, full_size_unet
    with torch.device("meta"):
        sdxl = UNet2DConditionModel(**UNET_CONFIGS["sdxl"])
        sd15 = UNet2DConditionModel(**UNET_CONFIGS["sd15"])
    # parameter counts of the published UNets: SDXL 2.567 B, SD1.5 0.860 B
    assert abs(sum(p.numel() for p in sdxl.parameters()) / 1e9 - 2.567) < 0.01
    assert abs(sum(p.numel() for p in sd15.parameters()) / 1e9 - 0.860) < 0.01
    assert sum(k.endswith("attn1.processor") for k in sdxl.attn_processors) == 70
    with pytest.raises(ValueError):
        full_size_unet("sd3")


@pytest.mark.parametrize("arch, counts", [
    ("sd15", {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}),
    ("sdxl", {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840}),
])
def test_full_size_pipeline_has_the_published_parameter_counts(arch, counts):
    from diffnb.models import full_size_pipeline
    pipe = full_size_pipeline(arch, device="meta")  # no memory: shapes only
    assert {k: sum(p.numel() for p in getattr(pipe, k).parameters()) for k in counts} == counts
    assert pipe.tokenizer("a photo of a dog", padding="max_length").input_ids.__len__() == 77
    with pytest.raises(ValueError, match="allowed"):
        full_size_pipeline("sd2")

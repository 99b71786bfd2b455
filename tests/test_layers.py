import pytest
import torch

from diffnb.pipeline import unet_conditioning
from diffnb.layers import execution_order, resolution, short_name
from diffnb.processors import attention_names

torch.set_num_threads(1)


def test_execution_order_is_the_order_a_forward_pass_runs():
    """Against forward pre-hooks on a real (tiny) UNet: every attention layer and resnet, in the order they run."""
    from diffnb.models import tiny_pipeline

    for kind in ("sd15", "sdxl"):
        pipe = tiny_pipeline(kind)
        unet = pipe.unet
        names = [n for n, m in unet.named_modules() if type(m).__name__ in ("Attention", "ResnetBlock2D",
                                                                            "Downsample2D", "Upsample2D")]
        ran, handles = [], []
        for n in names:
            handles.append(unet.get_submodule(n).register_forward_pre_hook(lambda *_, n=n: ran.append(n)))
        try:
            size = unet.config.sample_size
            x = torch.randn(1, unet.config.in_channels, size, size)
            with torch.no_grad():
                unet(x, 10, **unet_conditioning(pipe, "", 1, 1.0, size * pipe.vae_scale_factor,
                                                size * pipe.vae_scale_factor))
        finally:
            for h in handles:
                h.remove()
        assert len(ran) == len(set(ran)) == len(names)
        assert execution_order(names) == ran, kind
        assert attention_names(unet) != execution_order(attention_names(unet))  # mid is listed last there


def test_short_name_and_bad_input(tiny):
    names = attention_names(tiny.unet)
    assert short_name("up_blocks.1.attentions.0.transformer_blocks.0.attn1") == "up1.a0.tb0.attn1"
    assert short_name("mid_block.attentions.0.transformer_blocks.0.attn2") == "mid.a0.tb0.attn2"
    assert short_name("down_blocks.0.resnets.1") == "down0.r1"
    assert short_name(names[0], tiny.unet) == f"{short_name(names[0])} @{resolution(tiny.unet, names[0])}"
    assert len({short_name(n) for n in names}) == len(names)  # labels stay unique
    with pytest.raises(TypeError, match="non-empty str"):
        short_name(None)
    with pytest.raises(TypeError, match="non-empty str"):
        execution_order(["up_blocks.0", 3])

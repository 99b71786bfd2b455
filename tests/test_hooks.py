import pytest
import torch

from diffnb.hooks import CrossAttentionStore, capture, token_index
from diffnb.processors import RunState, patch_attention, track_steps
from tests.conftest import gen


def test_capture_layers_by_steps_and_removes_hooks(tiny):
    unet = tiny.unet
    hooks_before = sum(len(m._forward_hooks) for m in unet.modules())
    with capture(tiny, ["up_blocks.*.resnets.?"], steps=[0, 2]) as cache:
        tiny("a cat", num_inference_steps=3, generator=gen(), output_type="pt")
    assert cache.steps == [0, 2]
    layer = cache.layers[0]
    feat = cache.get(layer, step=2)
    assert feat.device.type == "cpu" and not feat.requires_grad and feat.shape[0] == 2  # CFG batch
    assert cache.stack(layer).shape[0] == 2
    with pytest.raises(KeyError):
        cache.get(layer, step=1)
    assert sum(len(m._forward_hooks) for m in unet.modules()) == hooks_before


def test_capture_removes_hooks_on_error(tiny):
    before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tiny.unet.modules())
    with pytest.raises(RuntimeError):
        with capture(tiny.unet, "up.*.resnets.0"):
            raise RuntimeError("x")
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tiny.unet.modules()) == before


def test_capture_mean_aggregate_equals_mean_of_steps(tiny):
    with capture(tiny, "up_blocks.0.resnets.0") as full:
        tiny("a cat", num_inference_steps=3, generator=gen(), output_type="pt")
    with capture(tiny, "up_blocks.0.resnets.0", aggregate="mean") as agg:
        tiny("a cat", num_inference_steps=3, generator=gen(), output_type="pt")
    torch.testing.assert_close(agg.get("up_blocks.0.resnets.0"), full.stack("up_blocks.0.resnets.0").mean(0))


def test_capture_bad_pattern(tiny):
    with pytest.raises(ValueError, match="matches nothing"):
        with capture(tiny, "up.*.nothing_here"):
            pass
    with pytest.raises(ValueError):
        with capture(tiny, "x", aggregate="max"):
            pass


def test_cross_attention_store_maps_are_distributions(tiny):
    store = CrossAttentionStore()
    with patch_attention(tiny.unet, {"cross": store}):
        tiny("a red heart", num_inference_steps=2, generator=gen(), output_type="pt")
    maps = store.maps()
    assert maps.shape[0] == 2 and maps.shape[1] == maps.shape[2]
    # each pixel's attention over the tokens sums to one (softmax), also after averaging
    torch.testing.assert_close(maps.sum(-1), torch.ones(maps.shape[:3]), atol=1e-4, rtol=0)
    with pytest.raises(ValueError):
        store.maps(resolution=3)


def test_cross_attention_store_step_filter(tiny):
    state = RunState()
    store = CrossAttentionStore(state, steps=[1])
    with track_steps(tiny.unet, state), patch_attention(tiny.unet, {"cross": store}):
        tiny("a red heart", num_inference_steps=3, generator=gen(), output_type="pt")
    n_cross = sum(1 for k in tiny.unet.attn_processors if k.endswith("attn2.processor"))
    assert sum(store.counts.values()) == n_cross  # one step's worth of layers
    with pytest.raises(ValueError):
        CrossAttentionStore(steps=[1])


def test_token_index(tiny):
    assert token_index(tiny.tokenizer, "a red heart", "heart") == [3]
    with pytest.raises(ValueError):
        token_index(tiny.tokenizer, "a red heart", "moon")

import pytest
import torch

from diffnb.layers import exact, select
from diffnb.processors import (AttentionProcessor, RunState, TokenReweight, attention_layers, attention_names,
                               patch_attention, track_steps)
from tests.conftest import gen


def run(pipe, prompt="a red heart", **kw):
    return pipe(prompt, num_inference_steps=2, generator=gen(0), output_type="pt", **kw).images


class Counting(AttentionProcessor):
    def __init__(self):
        super().__init__()
        self.calls = {}  # shared by every per-layer copy

    def edit_output(self, call, out):
        self.calls[call.name] = self.calls.get(call.name, 0) + 1
        return out


def test_passthrough_is_exact_and_restores_same_objects(tiny):
    before = dict(tiny.unet.attn_processors)
    ref = run(tiny)
    counter = Counting()
    with patch_attention(tiny.unet, {"attn": counter}):
        out = run(tiny)
        assert all(isinstance(p, Counting) for p in tiny.unet.attn_processors.values())
    assert (out - ref).abs().max().item() <= 1e-5
    assert set(counter.calls) == set(attention_names(tiny.unet))  # every layer really ran our code
    after = tiny.unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


def test_probs_path_matches_sdpa(tiny):
    class Probs(AttentionProcessor):
        needs_probs = True
    ref = run(tiny)
    with patch_attention(tiny.unet, {"attn": Probs()}):
        out = run(tiny)
    assert (out - ref).abs().max().item() <= 1e-5


def test_restores_when_body_raises(tiny):
    before = dict(tiny.unet.attn_processors)
    with pytest.raises(RuntimeError, match="boom"):
        with patch_attention(tiny.unet, {"self": AttentionProcessor()}):
            raise RuntimeError("boom")
    assert all(tiny.unet.attn_processors[k] is v for k, v in before.items())


def test_nested_patches_restore_outer(tiny):
    outer, inner = AttentionProcessor(), AttentionProcessor()
    with patch_attention(tiny.unet, {"self": outer}):
        mid = dict(tiny.unet.attn_processors)
        with patch_attention(tiny.unet, {"cross": inner}):
            pass
        assert all(tiny.unet.attn_processors[k] is v for k, v in mid.items())


def test_patterns_select_by_name_and_resolution(tiny):
    names = attention_names(tiny.unet)
    ups = select(names, "up.*.attn1")
    assert ups and all(n.startswith("up_blocks.") and n.endswith("attn1") for n in ups)
    assert all(n.endswith("attn2") for n in select(names, "cross"))
    res = {r["resolution"] for r in attention_layers(tiny.unet)}
    for r in res:
        chosen = select(names, f"cross@{r}", tiny.unet)
        assert all(row["resolution"] == r for row in attention_layers(tiny.unet) if row["name"] in chosen)
    assert select(names, r"re:up_blocks\.\d+\..*attn2") == [n for n in names if n.startswith("up_blocks") and n.endswith("attn2")]


def test_exact_name_is_a_pattern(tiny):
    """`=name` (or `exact(name)`) selects one layer, whatever the name looks like, with no escaping."""
    names = attention_names(tiny.unet)
    for name in names:
        assert select(names, exact(name)) == [name] == select(names, "=" + name)
    proc = AttentionProcessor()
    with patch_attention(tiny.unet, {exact(names[-1]): proc}):
        installed = [k for k, v in tiny.unet.attn_processors.items() if isinstance(v, AttentionProcessor)]
    assert installed == [names[-1] + ".processor"]
    with pytest.raises(ValueError, match="no layer is named") as info:
        select(names, "=" + names[0][:-1] + "9")
    assert names[0] in str(info.value).split("close: ")[1]  # a typo names the closest layers


@pytest.mark.parametrize("pattern, err", [("up.*.attn9", "matches nothing"), ("cross@7", "matches nothing"),
                                           ("cross@x", "bad resolution")])
def test_bad_patterns_raise_listing_names(tiny, pattern, err):
    with pytest.raises(ValueError, match=err):
        with patch_attention(tiny.unet, {pattern: AttentionProcessor()}):
            pass


def test_bad_arguments(tiny):
    with pytest.raises(TypeError):
        with patch_attention(tiny.unet, []):
            pass
    with pytest.raises(TypeError, match="not callable"):
        with patch_attention(tiny.unet, {"self": 3}):
            pass
    with pytest.raises(TypeError, match="attention processors"):
        with patch_attention(torch.nn.Linear(2, 2), {"self": AttentionProcessor()}):
            pass


def test_step_tracking(tiny):
    state = RunState()
    seen = []

    class Record(AttentionProcessor):
        def edit_output(self, call, out):
            seen.append((call.state.step, call.state.timestep))
            return out
    with track_steps(tiny.unet, state), patch_attention(tiny.unet, {"cross": Record(state)}):
        tiny("a cat", num_inference_steps=3, generator=gen(), output_type="pt")
    assert sorted({s for s, _ in seen}) == [0, 1, 2]
    assert len({t for _, t in seen}) == 3


def test_token_reweight_changes_output_and_validates(tiny):
    ref = run(tiny)
    with patch_attention(tiny.unet, {"cross": TokenReweight({2: 5.0})}):
        out = run(tiny)
    assert (out - ref).abs().max().item() > 1e-4
    with pytest.raises(ValueError):
        TokenReweight({})

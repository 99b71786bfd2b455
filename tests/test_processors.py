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


# --- the shared attention primitives, each against a re-derivation written out here ---

def _naive_attention(q, k, v, bias=None, allowed=None):
    """softmax over explicit scores, in float64: exp(s - max) / sum, masked entries set to -inf first."""
    q, k, v = q.double(), k.double(), v.double()
    s = torch.einsum("bhnd,bhmd->bhnm", q, k) / q.shape[-1] ** 0.5
    if bias is not None:
        s = s + bias.double()
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    w = torch.exp(s - s.max(-1, keepdim=True).values)
    return w / w.sum(-1, keepdim=True), torch.einsum("bhnm,bhmd->bhnd", w / w.sum(-1, keepdim=True), v)


def _qkv(b=4, h=2, n=6, m=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, n, d, generator=g), torch.randn(b, h, m, d, generator=g),
            torch.randn(b, h, m, d, generator=g))


def test_cfg_halves_lays_out_uncond_then_cond():
    from diffnb.processors import cfg_halves
    x = torch.arange(6 * 3).view(6, 3)
    halves = cfg_halves(x, 2)
    assert halves.shape == (2, 3, 3) and halves.data_ptr() == x.data_ptr()  # a view, no copy
    for half in range(2):
        for j in range(3):
            assert torch.equal(halves[half, j], x[half * 3 + j])  # [uncond_0..2, cond_0..2]
    assert cfg_halves(x, 1).shape == (1, 6, 3)
    with pytest.raises(ValueError, match="batch 6 does not split into 4 classifier-free-guidance halves"):
        cfg_halves(x, 4)
    with pytest.raises(ValueError, match="halves must be an int >= 1"):
        cfg_halves(x, 0)


def test_attention_probs_is_the_softmax_written_out():
    from diffnb.processors import attention_probs
    q, k, _ = _qkv(m=5)
    want, _ = _naive_attention(q, k, k)
    assert (attention_probs(q, k).double() - want).abs().max() < 1e-6
    allowed = torch.rand(4, 1, 6, 5, generator=torch.Generator().manual_seed(1)) > 0.3
    allowed[..., 0] = True  # every row keeps one key
    want, _ = _naive_attention(q, k, k, allowed=allowed)
    got = attention_probs(q, k, allowed)
    assert (got.double() - want).abs().max() < 1e-6 and (got[~allowed.expand_as(got)] == 0).all()
    additive = torch.randn(1, 2, 1, 5, generator=torch.Generator().manual_seed(2))
    want, _ = _naive_attention(q, k, k, bias=additive)
    assert (attention_probs(q, k, additive).double() - want).abs().max() < 1e-6


def test_processor_probs_path_uses_attention_probs(tiny):
    """`needs_probs` goes through attention_probs: identical to the SDPA path up to rounding."""
    class Probs(AttentionProcessor):
        needs_probs = True
    ref = run(tiny)
    with patch_attention(tiny.unet, {"attn": Probs()}):
        out = run(tiny)
    assert (out - ref).abs().max() < 1e-5


@pytest.mark.parametrize("bias, mask", [(None, None), (0.7, None), ("per_key", None), (None, "bool"),
                                        (0.7, "bool"), ("per_item", "float")])
def test_extended_attention_is_softmax_over_own_and_extra_keys(bias, mask):
    from diffnb.processors import extended_attention
    q, k, v = _qkv()
    _, ek, ev = _qkv(m=5, seed=3)
    g = torch.Generator().manual_seed(4)
    extra_bias = {None: None, 0.7: 0.7, "per_key": torch.randn(5, generator=g),
                  "per_item": torch.randn(4, 1, 1, 5, generator=g)}[bias]
    full_bias = torch.zeros(4, 2, 6, 11)
    if extra_bias is not None:
        full_bias[..., 6:] += torch.as_tensor(extra_bias)
    allowed, attn_mask = None, None
    if mask == "bool":
        allowed = torch.rand(4, 1, 1, 11, generator=g) > 0.4
        allowed[..., 0] = True
        attn_mask = allowed
    elif mask == "float":
        attn_mask = torch.randn(4, 1, 6, 11, generator=g)
        full_bias = full_bias + attn_mask
    _, want = _naive_attention(q, torch.cat([k, ek], 2), torch.cat([v, ev], 2), full_bias, allowed)
    got = extended_attention(q, k, v, ek, ev, extra_bias=extra_bias, mask=attn_mask)
    assert got.shape == q.shape and (got.double() - want).abs().max() < 1e-5
    if bias is not None or mask is not None:
        assert (got - extended_attention(q, k, v, ek, ev)).abs().max() > 1e-3  # the bias / mask did act


def test_extended_attention_rejects_misshapen_extras():
    from diffnb.processors import extended_attention
    q, k, v = _qkv()
    _, ek, ev = _qkv(m=5, seed=3)
    with pytest.raises(ValueError, match="extra keys / values must be"):
        extended_attention(q, k, v, ek[:2], ev[:2])  # not laid out per batch item
    with pytest.raises(ValueError, match="extra keys / values must be"):
        extended_attention(q, k, v, ek, ev[:, :, :4])
    with pytest.raises(ValueError, match="extra_bias's last axis"):
        extended_attention(q, k, v, ek, ev, extra_bias=torch.zeros(3))

"""Scoped attention patching and a base attention processor that exposes q, k, v and the output.

    with patch_attention(pipe.unet, {"up.*.attn1": MyProcessor(state)}):
        images = pipe(prompts).images
    # here unet.attn_processors holds the very same objects as before, also if the body raised

`AttentionProcessor` reproduces diffusers' `AttnProcessor2_0` (scaled-dot-product attention) and calls
overridable steps: `edit_qkv`, `edit_probs` (only computed when a subclass sets `needs_probs`), `edit_output`.
The attention math several methods share lives here too, written once: `cfg_halves` (the guidance batch layout),
`attention_probs` (the explicit softmax) and `extended_attention` (own plus borrowed keys/values).
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .layers import resolution, select


@dataclass
class RunState:
    """Shared per-run state (processors and hooks read it; `track_steps` writes it).

    Lives on the processors, not in `cross_attention_kwargs`, which diffusers filters by signature.
    """
    step: int = -1  # index of the current denoising step (0-based), -1 before the first UNet call
    timestep: float | None = None
    calls: int = 0  # UNet forward calls so far
    data: dict = field(default_factory=dict)  # free slot for methods (masks, reference features, ...)

    def reset(self):
        self.step, self.timestep, self.calls = -1, None, 0


@contextmanager
def track_steps(unet, state: RunState):
    """Keep `state.step` / `state.timestep` current: a forward pre-hook on the UNet reads the timestep."""
    if not isinstance(state, RunState):
        raise TypeError(f"track_steps needs a RunState, got {type(state).__name__}")
    if not isinstance(unet, torch.nn.Module):
        raise TypeError(f"track_steps needs the UNet (a torch module), got {type(unet).__name__}: pass pipe.unet")

    def pre_hook(module, args, kwargs):
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        t = float(t.flatten()[0]) if torch.is_tensor(t) else (float(t) if t is not None else None)
        if t != state.timestep or state.step < 0:
            state.step += 1
        state.timestep = t
        state.calls += 1

    handle = unet.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield state
    finally:
        handle.remove()


def attention_names(unet) -> list[str]:
    """Dotted module paths of every attention layer (the `attn_processors` keys without `.processor`)."""
    if not hasattr(unet, "attn_processors"):
        raise TypeError(f"{type(unet).__name__} has no attention processors; pass pipe.unet")
    return [k[: -len(".processor")] for k in unet.attn_processors]


def attention_layers(unet) -> list[dict]:
    """One row per attention layer: name, self/cross, nominal resolution, heads, channels."""
    rows = []
    for name in attention_names(unet):
        mod = unet.get_submodule(name)
        rows.append(dict(name=name, kind="cross" if mod.is_cross_attention else "self",
                         resolution=resolution(unet, name), heads=mod.heads, channels=mod.inner_dim,
                         processor=type(mod.processor).__name__))
    return rows


# --- attention math the paper modules share ------------------------------------------------------------------
def cfg_halves(x: torch.Tensor, halves: int) -> torch.Tensor:
    """(B, ...) -> a view (halves, B // halves, ...). A classifier-free-guidance batch is [uncond..., cond...], so
    item j of every half is the same image: methods that pair images inside a half index the second axis."""
    if isinstance(halves, bool) or not isinstance(halves, int) or halves < 1:
        raise ValueError(f"halves must be an int >= 1, got {halves!r}")
    if x.shape[0] % halves:
        raise ValueError(f"batch {x.shape[0]} does not split into {halves} classifier-free-guidance halves")
    return x.view(halves, x.shape[0] // halves, *x.shape[1:])


def attention_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q kᵀ/√d + mask) written out, (B, heads, N, M): for methods that read or edit the attention matrix,
    which SDPA never materialises. `mask`: boolean (True = may attend) or additive, as SDPA takes it."""
    scores = q @ k.transpose(-1, -2) * (1 / math.sqrt(q.shape[-1]))
    if mask is not None:
        scores = scores + mask if mask.dtype != torch.bool else scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1)


def extended_attention(q, k, v, extra_k, extra_v, extra_bias=None, mask=None) -> torch.Tensor:
    """softmax(q [k ; extra_k]ᵀ/√d + [0 ; extra_bias] + mask) [v ; extra_v], one SDPA call.

    The core of attention sharing (StyleAligned, ConsiStory): each query sees its own image's tokens and tokens
    borrowed from others. q, k, v: (B, heads, N, d); extra_k, extra_v: (B, heads, M, d), laid out per batch item by
    the caller (who borrows what is the method's choice). `extra_bias`: a number, or a tensor whose last axis is M
    (or 1), added to the borrowed tokens' logits (a log-weight on them); None or 0 adds nothing, so SDPA keeps its
    mask-free kernel. `mask`: over all N + M keys, boolean (True = may attend) or additive.
    """
    if extra_k.shape[:2] != k.shape[:2] or extra_k.shape[-1] != k.shape[-1] or extra_v.shape[:-1] != extra_k.shape[:-1]:
        raise ValueError(f"extra keys / values must be (B, heads, M, d) laid out like the own keys {tuple(k.shape)}, "
                         f"got {tuple(extra_k.shape)} and {tuple(extra_v.shape)}")
    n_own, n_extra = k.shape[-2], extra_k.shape[-2]
    if torch.is_tensor(extra_bias):
        bias = extra_bias.to(q.device, q.dtype)
        bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)  # SDPA wants (B | 1, heads | 1, N | 1, keys)
        if bias.shape[-1] not in (1, n_extra):
            raise ValueError(f"extra_bias's last axis must be 1 or the {n_extra} extra keys, got {tuple(bias.shape)}")
        bias = F.pad(bias.expand(*bias.shape[:-1], n_extra), (n_own, 0))
    elif extra_bias:
        bias = torch.zeros(n_own + n_extra, dtype=q.dtype, device=q.device)
        bias[n_own:] = extra_bias
        bias = bias.view(1, 1, 1, -1)
    else:
        bias = None
    if bias is not None:
        if mask is not None and mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        mask = bias if mask is None else mask + bias
    return F.scaled_dot_product_attention(q, torch.cat([k, extra_k], -2), torch.cat([v, extra_v], -2), attn_mask=mask)


def attention_input(attn, hidden_states: torch.Tensor, temb=None) -> torch.Tensor:
    """The (B, tokens, C) an attention layer projects to queries: spatial norm, a (B, C, H, W) map flattened to
    tokens, group norm, in diffusers' AttnProcessor2_0 order. Side processors (DiffSim-C) read queries through it."""
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    if hidden_states.ndim == 4:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states


def split_heads(attn, x: torch.Tensor) -> torch.Tensor:
    """(B, ..., heads * d) projections -> (B, heads, tokens, d)."""
    return x.reshape(x.shape[0], -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)


@dataclass
class AttnCall:
    """What a processor knows about the call it is in."""
    name: str  # dotted layer name
    attn: torch.nn.Module
    is_cross: bool
    batch: int
    height: int | None  # feature-map size, when known (4-D input or square token grid)
    width: int | None
    state: RunState | None


class AttentionProcessor:
    """diffusers' attention math with SDPA, split into steps a subclass can edit.

    One instance can be given to many layers: `patch_attention` installs a shallow copy per layer
    (`for_layer`) that knows its name and shares everything else (state, stores) with the original.
    """
    needs_probs = False  # set True to get `edit_probs` (materialises the attention matrix)

    def __init__(self, state: RunState | None = None):
        self.state = state
        self.layer_name = ""

    def for_layer(self, name: str) -> "AttentionProcessor":
        proc = copy.copy(self)
        proc.layer_name = name
        return proc

    # --- the steps a subclass overrides -------------------------------------------------------------
    def edit_qkv(self, call: AttnCall, q, k, v):
        """q: (B, heads, N, d); k, v: (B, heads, M, d). Return the three tensors to attend with."""
        return q, k, v

    def edit_probs(self, call: AttnCall, probs):
        """probs: (B, heads, N, M) softmax attention; only called when `needs_probs` is True."""
        return probs

    def attend(self, call: AttnCall, q, k, v, mask):
        """Attention of (B, heads, N, d) queries; override to change how scores are formed."""
        if not self.needs_probs:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
        return self.edit_probs(call, attention_probs(q, k, mask)) @ v

    def edit_output(self, call: AttnCall, out):
        """out: (B, N, C) after the output projection, before the residual. Return the tensor to use."""
        return out

    # --- diffusers' AttnProcessor2_0, step by step --------------------------------------------------
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        input_ndim = hidden_states.ndim
        height = width = None
        if input_ndim == 4:
            _, c, height, width = hidden_states.shape
        hidden_states = attention_input(attn, hidden_states, temb)
        if input_ndim != 4:
            side = math.isqrt(hidden_states.shape[1])
            if side * side == hidden_states.shape[1]:
                height = width = side
        is_cross = encoder_hidden_states is not None
        batch, seq_len, _ = (encoder_hidden_states if is_cross else hidden_states).shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        query = attn.to_q(hidden_states)
        if not is_cross:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (split_heads(attn, x) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        call = AttnCall(self.layer_name, attn, is_cross, batch, height, width, self.state)
        query, key, value = self.edit_qkv(call, query, key, value)
        hidden_states = self.attend(call, query, key, value, attention_mask)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        hidden_states = self.edit_output(call, hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, c, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def patch_attention(unet, processors: dict):
    """Install processors on the layers matching each pattern; restore the exact originals on exit.

    `processors` maps a layer pattern (see `diffnb.layers`) to a processor. Later patterns win where they
    overlap. Works for any model with diffusers' `attn_processors` / `set_attn_processor` (UNets, SDXL too).
    """
    if not isinstance(processors, dict) or not processors:
        raise TypeError("processors must be a non-empty dict {layer pattern: processor}")
    if not hasattr(unet, "attn_processors"):
        raise TypeError(f"{type(unet).__name__} has no attention processors; pass pipe.unet")
    original = dict(unet.attn_processors)
    names = [k[: -len(".processor")] for k in original]
    new = dict(original)
    for pattern, proc in processors.items():
        if isinstance(proc, type):
            raise TypeError(f"the processor for {pattern!r} is the class {proc.__name__}, not an instance: "
                            f"write {proc.__name__}(...)")
        if not callable(proc):
            raise TypeError(f"the processor for {pattern!r} is not callable: {proc!r}")
        for name in select(names, pattern, unet):
            new[name + ".processor"] = proc.for_layer(name) if isinstance(proc, AttentionProcessor) else proc
    unet.set_attn_processor(new)  # diffusers pops from the dict it is given: `original` stays intact
    try:
        yield unet
    finally:
        unet.set_attn_processor(dict(original))


class TokenReweight(AttentionProcessor):
    """Scale the cross-attention probabilities of some prompt tokens (prompt-to-prompt's reweighting).

    Weights > 1 strengthen a word's influence on the image, < 1 weaken it; rows are not renormalised, as in
    prompt-to-prompt, so the value mixture's magnitude moves with the weight.
    """
    needs_probs = True

    def __init__(self, token_weights: dict[int, float], state: RunState | None = None):
        super().__init__(state)
        if not isinstance(token_weights, dict) or not token_weights:
            raise ValueError("token_weights must be a non-empty dict {token index: weight}")
        for idx, weight in token_weights.items():
            if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
                raise TypeError(f"token_weights keys are token positions (ints >= 0, see hooks.token_index), got "
                                f"{idx!r}")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise TypeError(f"the weight of token {idx} must be a finite number, got {weight!r}")
        self.token_weights = token_weights

    def edit_probs(self, call, probs):
        if not call.is_cross:
            return probs
        w = torch.ones(probs.shape[-1], dtype=probs.dtype, device=probs.device)
        for idx, weight in self.token_weights.items():
            if not 0 <= idx < len(w):
                raise ValueError(f"token index {idx} out of range 0..{len(w) - 1}")
            w[idx] = weight
        return probs * w

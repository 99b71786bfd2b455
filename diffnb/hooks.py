"""Read a UNet's insides: module outputs per layer x denoising step, and aggregated cross-attention maps.

    with capture(pipe.unet, ["up_blocks.*.resnets.*[0-9]"], steps=[0, 10]) as cache:
        pipe(prompt)
    cache.get("up_blocks.1.resnets.0", step=10)   # detached, on the CPU by default

Hooks are `register_forward_hook` handles removed in `finally`, so an exception in the body leaves no hook.
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from contextlib import ExitStack, contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from .layers import select_many
from .processors import AttentionProcessor, RunState, track_steps


class FeatureCache:
    """Features by (layer, step), or a running mean per layer when `aggregate="mean"`."""

    def __init__(self, aggregate: str | None = None):
        if aggregate not in (None, "mean"):
            raise ValueError(f"aggregate must be None or 'mean', got {aggregate!r}")
        self.aggregate = aggregate
        self.features: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
        self.timesteps: dict[int, float | None] = {}  # step index -> scheduler timestep
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = defaultdict(int)
        # what `capture` asked for and saw, so that a miss can be explained (set by `capture`)
        self.hooked: list[str] = []
        self.requested_steps: set[int] | None = None
        self.ran_steps: set[int] = set()

    def add(self, layer: str, step: int, timestep, value: torch.Tensor):
        self.timesteps[step] = timestep
        if self.aggregate == "mean":
            self._sums[layer] = value.float() if layer not in self._sums else self._sums[layer] + value.float()
            self._counts[layer] += 1
        else:
            self.features[layer][step] = value

    @property
    def layers(self) -> list[str]:
        return list(self._sums) if self.aggregate else list(self.features)

    @property
    def steps(self) -> list[int]:
        return sorted(self.timesteps)

    def _why_missing(self) -> str:
        if not self.ran_steps:
            return "the model never ran inside `capture` (call the pipeline inside the with-block)"
        if self.requested_steps is not None:
            return (f"it was hooked, but none of the requested steps {sorted(self.requested_steps)} ran: the run had "
                    f"steps {min(self.ran_steps)}..{max(self.ran_steps)}")
        return "it was hooked but never called (is it on the path the run took?)"

    def _check_layer(self, layer: str):
        if not isinstance(layer, str):
            raise TypeError(f"a layer name must be a str, got {type(layer).__name__}")
        if layer in self.layers:
            return
        if layer in self.hooked:
            raise KeyError(f"layer {layer!r} recorded nothing: {self._why_missing()}")
        raise KeyError(f"layer {layer!r} was not captured; captured: {self.layers}"
                       f"{'; hooked: ' + str(self.hooked) if self.hooked and self.hooked != self.layers else ''}")

    def get(self, layer: str, step: int | None = None) -> torch.Tensor:
        self._check_layer(layer)
        if self.aggregate == "mean":
            return self._sums[layer] / self._counts[layer]
        per_step = self.features[layer]
        if step is None:
            if len(per_step) != 1:
                raise ValueError(f"{layer!r} was captured at steps {sorted(per_step)}: name one with step=")
            step = next(iter(per_step))
        if step not in per_step:
            ran = f"; the run had steps {min(self.ran_steps)}..{max(self.ran_steps)}" if self.ran_steps else ""
            raise KeyError(f"step {step} of {layer!r} was not captured; captured steps: {sorted(per_step)}{ran}")
        return per_step[step]

    def stack(self, layer: str) -> torch.Tensor:
        """(steps, ...) tensor of one layer over all captured steps, in step order."""
        self._check_layer(layer)
        if self.aggregate == "mean":
            raise ValueError("aggregate='mean' keeps one running mean per layer, not one map per step: use get(layer)")
        return torch.stack([self.features[layer][s] for s in sorted(self.features[layer])])

    def __repr__(self):
        return f"FeatureCache({len(self.layers)} layers, steps={self.steps}, aggregate={self.aggregate})"


def _first_tensor(output):
    if torch.is_tensor(output):
        return output
    if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        return output[0]
    sample = getattr(output, "sample", None)
    if torch.is_tensor(sample):
        return sample
    raise TypeError(f"cannot capture an output of type {type(output).__name__}")


def _check_steps(steps) -> set[int] | None:
    """None (every step), an int, or a non-empty collection of ints >= 0; anything else is a clear error."""
    if steps is None:
        return None
    items = [steps] if isinstance(steps, (int, np.integer)) else steps
    if isinstance(items, (str, bytes)) or not hasattr(items, "__iter__"):
        raise TypeError(f"steps must be None, an int or a list of ints (step indices), got {steps!r}")
    items = list(items)
    bad = [s for s in items if isinstance(s, bool) or not isinstance(s, (int, np.integer))]
    if bad:
        raise TypeError(f"steps are step indices 0, 1, ... (ints), got {bad[:3]!r}: scheduler timesteps such as 981 "
                        f"are not step indices; cache.timesteps maps one to the other")
    if not items:
        raise ValueError("steps is empty, so nothing would be captured: use None for every step")
    if min(items) < 0:
        raise ValueError(f"steps are step indices counted from 0, got {sorted(items)}")
    return {int(s) for s in items}


@contextmanager
def capture(model, patterns, steps=None, offload: str | None = "cpu", aggregate: str | None = None,
            state: RunState | None = None):
    """Capture the outputs of the modules matching `patterns` at the given denoising steps (None = all).

    `model` is a UNet or a pipeline (its `.unet` is used). Outputs are detached and moved to `offload`
    (None keeps them where they are). The step index comes from a pre-hook on the UNet (`track_steps`);
    pass your own `state` to share it with processors.
    """
    unet = getattr(model, "unet", model)
    if not isinstance(unet, torch.nn.Module):
        raise TypeError(f"capture needs a torch module or a pipeline with .unet, got {type(model).__name__}")
    steps = _check_steps(steps)
    if offload is not None:
        try:
            torch.device(offload)
        except (RuntimeError, TypeError):
            raise ValueError(f"offload must be a device such as 'cpu' or 'cuda', or None, got {offload!r}") from None
    names = [n for n, _ in unet.named_modules() if n]
    chosen = select_many(names, patterns, unet)
    cache = FeatureCache(aggregate)
    cache.hooked, cache.requested_steps = list(chosen), steps
    own_state = state is None
    state = state or RunState()

    def make_hook(name):
        def hook(module, args, output):
            cache.ran_steps.add(state.step)
            if steps is None or state.step in steps:
                value = _first_tensor(output).detach()
                cache.add(name, state.step, state.timestep, value.to(offload) if offload else value)
        return hook

    with ExitStack() as stack:
        if own_state:
            stack.enter_context(track_steps(unet, state))
        for name in chosen:
            stack.enter_context(unet.get_submodule(name).register_forward_hook(make_hook(name)))
        yield cache
    if steps is not None and cache.ran_steps and (missed := steps - cache.ran_steps):
        warnings.warn(f"capture: steps {sorted(missed)} never ran (the run had steps {min(cache.ran_steps)}.."
                      f"{max(cache.ran_steps)}), so nothing was recorded for them", UserWarning, stacklevel=3)


class CrossAttentionStore(AttentionProcessor):
    """Cross-attention maps per prompt token, summed per resolution (never every map of every step).

    Install on cross-attention layers: `with patch_attention(unet, {"cross": store}): pipe(...)`, then
    `store.maps()` gives (batch, size, size, tokens) averaged over layers, heads and the chosen steps.
    Under classifier-free guidance the batch is [uncond..., cond...]: take the second half for the prompts.
    """
    needs_probs = True

    def __init__(self, state: RunState | None = None, steps=None, resolutions=None):
        super().__init__(state)
        if state is not None and not isinstance(state, RunState):
            raise TypeError(f"state must be a RunState (or None), got {type(state).__name__}: steps= and "
                            f"resolutions= are keywords")
        self.steps = _check_steps(steps)
        if resolutions is not None:
            items = [resolutions] if isinstance(resolutions, (int, np.integer)) else resolutions
            if isinstance(items, str) or not hasattr(items, "__iter__") or not items or any(
                    isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1 for r in items):
                raise ValueError(f"resolutions must be feature-map sides such as 16 or [16, 32], got {resolutions!r}")
            resolutions = {int(r) for r in items}
        self.resolutions = resolutions
        if self.steps is not None and state is None:
            raise ValueError("filtering by steps needs a RunState kept current by track_steps")
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = defaultdict(int)
        self.seen: dict[str, set] = {"self": set(), "cross": set(), "steps": set()}  # what ran, to explain a miss

    def reset(self):
        self.sums.clear()
        self.counts.clear()
        for v in self.seen.values():
            v.clear()

    def edit_probs(self, call, probs):
        self.seen["cross" if call.is_cross else "self"].add(call.height)
        if self.state is not None:
            self.seen["steps"].add(self.state.step)
        if not call.is_cross or call.height is None:
            return probs
        if self.resolutions is not None and call.height not in self.resolutions:
            return probs
        if self.steps is not None and self.state.step not in self.steps:
            return probs
        m = probs.mean(dim=1).detach().float()  # (B, N, tokens), averaged over heads
        m = m.reshape(m.shape[0], call.height, call.width, m.shape[-1]).cpu()
        self.sums[call.height] = self.sums[call.height] + m if call.height in self.sums else m
        self.counts[call.height] += 1
        return probs

    def maps(self, resolution: int | None = None, size: int | None = None) -> torch.Tensor:
        """(B, size, size, tokens): one resolution's mean map, or all resolutions upsampled and averaged."""
        if not self.sums:
            cross, other = sorted(self.seen["cross"] - {None}), sorted(self.seen["self"] - {None})
            if not self.seen["cross"] and not self.seen["self"]:
                why = "it never ran: run the pipeline inside patch_attention(unet, {'cross': store}) first"
            elif not self.seen["cross"]:
                why = (f"it was installed on self-attention layers only (resolutions {other}): install it on "
                       f"cross-attention layers, e.g. {{'cross': store}}")
            elif self.resolutions is not None and not self.resolutions & self.seen["cross"]:
                why = f"resolutions={sorted(self.resolutions)} matches none of the cross-attention resolutions {cross}"
            else:
                ran = sorted(self.seen["steps"])
                why = (f"steps={sorted(self.steps or [])} matches none of the steps that ran "
                       f"({ran[0]}..{ran[-1]})" if ran and self.steps is not None else "nothing matched its filters")
            raise RuntimeError(f"no cross-attention was recorded: {why}")
        if resolution is not None and resolution not in self.sums:
            raise ValueError(f"no maps at resolution {resolution}; recorded: {sorted(self.sums)}")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"size must be a positive int (the side of the returned maps) or None, got {size!r}")
        chosen = [resolution] if resolution is not None else sorted(self.sums)
        size = size or max(chosen)
        out = 0
        for r in chosen:
            m = (self.sums[r] / self.counts[r]).permute(0, 3, 1, 2)
            out = out + F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False)
        return (out / len(chosen)).permute(0, 2, 3, 1)


def token_index(tokenizer, prompt: str, word: str) -> list[int]:
    """Positions of `word`'s tokens in the tokenized prompt (BOS at 0), for reading its attention map."""
    ids = tokenizer(prompt).input_ids
    word_ids = tokenizer(word, add_special_tokens=False).input_ids
    if not word_ids:
        raise ValueError(f"{word!r} tokenizes to nothing")
    found = [i for i in range(len(ids) - len(word_ids) + 1) if ids[i:i + len(word_ids)] == word_ids]
    if not found:
        raise ValueError(f"{word!r} is not in the prompt {prompt!r}")
    return list(range(found[0], found[0] + len(word_ids)))

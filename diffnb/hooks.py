"""Read a UNet's insides: module outputs per layer x denoising step, and aggregated cross-attention maps.

    with capture(pipe.unet, ["up_blocks.*.resnets.*[0-9]"], steps=[0, 10]) as cache:
        pipe(prompt)
    cache.get("up_blocks.1.resnets.0", step=10)   # detached, on the CPU by default

Hooks are `register_forward_hook` handles removed in `finally`, so an exception in the body leaves no hook.
"""
from __future__ import annotations

from collections import defaultdict
from contextlib import ExitStack, contextmanager

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

    def get(self, layer: str, step: int | None = None) -> torch.Tensor:
        if layer not in self.layers:
            raise KeyError(f"layer {layer!r} was not captured; captured: {self.layers}")
        if self.aggregate == "mean":
            return self._sums[layer] / self._counts[layer]
        per_step = self.features[layer]
        if step is None:
            if len(per_step) != 1:
                raise ValueError(f"{layer!r} was captured at steps {sorted(per_step)}: name one with step=")
            step = next(iter(per_step))
        if step not in per_step:
            raise KeyError(f"step {step} of {layer!r} was not captured; captured steps: {sorted(per_step)}")
        return per_step[step]

    def stack(self, layer: str) -> torch.Tensor:
        """(steps, ...) tensor of one layer over all captured steps, in step order."""
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
    if steps is not None:
        steps = set(int(s) for s in ([steps] if isinstance(steps, int) else steps))
    names = [n for n, _ in unet.named_modules() if n]
    chosen = select_many(names, patterns, unet)
    cache = FeatureCache(aggregate)
    own_state = state is None
    state = state or RunState()

    def make_hook(name):
        def hook(module, args, output):
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


class CrossAttentionStore(AttentionProcessor):
    """Cross-attention maps per prompt token, summed per resolution (never every map of every step).

    Install on cross-attention layers: `with patch_attention(unet, {"cross": store}): pipe(...)`, then
    `store.maps()` gives (batch, size, size, tokens) averaged over layers, heads and the chosen steps.
    Under classifier-free guidance the batch is [uncond..., cond...]: take the second half for the prompts.
    """
    needs_probs = True

    def __init__(self, state: RunState | None = None, steps=None, resolutions=None):
        super().__init__(state)
        self.steps = None if steps is None else set(steps)
        self.resolutions = None if resolutions is None else set(resolutions)
        if self.steps is not None and state is None:
            raise ValueError("filtering by steps needs a RunState kept current by track_steps")
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = defaultdict(int)

    def reset(self):
        self.sums.clear()
        self.counts.clear()

    def edit_probs(self, call, probs):
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
            raise RuntimeError("no cross-attention was recorded: run the pipeline inside patch_attention first")
        if resolution is not None and resolution not in self.sums:
            raise ValueError(f"no maps at resolution {resolution}; recorded: {sorted(self.sums)}")
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

"""Random-weight stand-ins for the hub models, so the real-model branch of every notebook runs offline and in CI.

`DIFFNB_STANDIN=1` (CI) makes `load_pipeline("sd15" | "sdxl")` return a stand-in and shrinks the registry's image
size (÷ 4) and step count (≤ 10); `DIFFNB_STANDIN=full` keeps the real size and steps (the GPU check);
`DIFFNB_STANDIN=count` keeps every real count and step and shrinks only the image side (÷ 4), while
`diffnb.workload` tallies the UNet and VAE work (the T4 time estimates). That is the one knob: the notebook's code
is the code a real user runs, only sizes and step counts change (`spec`, `sized` for counts, `side` for pixels).

A stand-in keeps what the code paths depend on and shrinks only widths: the real component classes, block types,
`layers_per_block=2` (three attentions per up block), SDXL's transformer depths 1/2/10, two text encoders and added
time ids, a ×8 VAE with the real scaling factor and `force_upcast`, a 77-token CLIP tokenizer that splits unknown
words into several tokens, and the real `sample_size`, so nominal layer resolutions (`cross@16`) name the same
layers as on the real model.

CUDA-only device bugs (a tensor built without `device=` reaches a model on the GPU) show on a CPU too:
`host_tensors_flagged()` marks every tensor built without an explicit device (the ones that would stay on the CPU
next to a CUDA model), and the stand-in UNet refuses a marked or off-device input with the argument's name.
"""
from __future__ import annotations

import os
import string
import tempfile
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

MODES = ("", "0", "1", "full", "count")
SMALL_DIVISOR, SMALL_MAX_STEPS = 4, 10


def mode() -> str | None:
    """None (real weights), "small" (`DIFFNB_STANDIN=1`, CI), "full" (`=full`) or "count" (`=count`)."""
    value = os.environ.get("DIFFNB_STANDIN", "").strip().lower()
    if value not in MODES:
        raise ValueError(f"DIFFNB_STANDIN={value!r} is not understood; allowed: unset, 0, 1 (small, CI), full or count")
    return {"": None, "0": None, "1": "small", "full": "full", "count": "count"}[value]


def sized(full, small):
    """`small` under `DIFFNB_STANDIN=1`, else `full`: the counts (pairs, images, training steps) CI shrinks."""
    return small if mode() == "small" else full


def count_divisor() -> int:
    """The count mode's image side divisor: 4, or `DIFFNB_COUNT_DIVISOR` (2 where ÷ 4 leaves a layer too few tokens,
    e.g. EmerDiff's 20 segments at SD1.5's 16×16 layer)."""
    value = os.environ.get("DIFFNB_COUNT_DIVISOR", str(SMALL_DIVISOR))
    if value not in ("1", "2", "4", "8"):
        raise ValueError(f"DIFFNB_COUNT_DIVISOR={value!r}; allowed: 1, 2, 4 or 8")
    return int(value)


def side(pixels: int) -> int:
    """An image side in pixels as a stand-in run uses it: ÷ 4 under `DIFFNB_STANDIN=1` and `=count`."""
    if mode() == "count":
        return pixels // count_divisor()
    return pixels // SMALL_DIVISOR if mode() == "small" else pixels


def shrink(spec):
    """The registry entry as a stand-in run uses it: ÷ 4 image size and ≤ 10 steps under `DIFFNB_STANDIN=1`;
    ÷ 4 image size and the real steps under `=count`."""
    if mode() not in ("small", "count"):
        return spec
    steps = min(spec.steps, SMALL_MAX_STEPS) if mode() == "small" else spec.steps
    return replace(spec, resolution=side(spec.resolution), steps=steps)


# Words that stay one token, as common words do in CLIP's vocabulary; every other word splits into characters.
COMMON_WORDS = ("a an the of in on at with and photo image picture painting style background man woman dog cat "
                "old young red blue green yellow black white high quality minimal flat design illustration "
                "heart moon star ring circle triangle square plus diamond striped dotted checkered plain park "
                "book beach cafe reading sitting standing wearing watercolor sketch oil").split()


def standin_tokenizer(max_length: int = 77):
    from transformers import CLIPTokenizer

    from .toyworld.prompts import write_word_tokenizer

    chars = [c for c in string.ascii_lowercase + string.digits + string.punctuation]
    folder = write_word_tokenizer(tempfile.mkdtemp(prefix="diffnb_standin_tok_"), chars + list(COMMON_WORDS), max_length)
    return CLIPTokenizer.from_pretrained(folder)


def _text_encoder(vocab: int, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def standin_pipeline(arch: str, seed: int = 0):
    """A random-weight pipeline with the real SD1.5 / SDXL structure at small widths (see the module docstring)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    from .models import SD_DDIM, UNET_CONFIGS, VAE_CONFIG

    if arch not in UNET_CONFIGS:
        raise ValueError(f"unknown architecture {arch!r}; allowed: {sorted(UNET_CONFIGS)}")
    torch.manual_seed(seed)
    tok = standin_tokenizer()
    real = UNET_CONFIGS[arch]
    vae = AutoencoderKL(**{**VAE_CONFIG, "block_out_channels": (8, 16, 16, 16), "norm_num_groups": 8},
                        sample_size=8 * real["sample_size"], scaling_factor=0.18215 if arch == "sd15" else 0.13025,
                        force_upcast=True)
    sched = DDIMScheduler(**SD_DDIM)
    if arch == "sd15":
        unet = UNet2DConditionModel(**{**real, "block_out_channels": (32, 64, 64, 64), "norm_num_groups": 8,
                                       "cross_attention_dim": 32})
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=_text_encoder(len(tok)), tokenizer=tok, unet=unet,
                                       scheduler=sched, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    else:  # SDXL: 32 + 32 text channels side by side; pooled 32 + 6 time ids x 8
        unet = UNet2DConditionModel(**{**real, "block_out_channels": (32, 64, 64), "norm_num_groups": 8,
                                       "attention_head_dim": (2, 4, 4), "cross_attention_dim": 64,
                                       "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 6 * 8 + 32})
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=_text_encoder(len(tok)), tokenizer=tok,
                                         text_encoder_2=_text_encoder(len(tok), True), tokenizer_2=tok,
                                         unet=unet, scheduler=sched, force_zeros_for_empty_prompt=True)
    install_device_check(pipe.unet)
    return pipe


# --- CUDA-only device bugs, caught on a CPU ------------------------------------------------------------------------

_FACTORIES = {torch.tensor, torch.as_tensor, torch.full, torch.zeros, torch.ones, torch.empty, torch.arange,
              torch.linspace, torch.randn, torch.rand, torch.randint, torch.eye}
_MOVES = {torch.Tensor.to, torch.Tensor.cuda}
_MARK = "_diffnb_on_host"


def _marked(t) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, _MARK, False)


def _set(out, value: bool):
    for t in tree_flatten(out)[0]:
        if isinstance(t, torch.Tensor):
            try:
                setattr(t, _MARK, value)
            except (AttributeError, RuntimeError):
                pass


class _HostTensors(TorchFunctionMode):
    """Marks tensors that would sit on the CPU next to a CUDA model: built without `device=`, from numpy, or
    computed only from such tensors; an explicit `.to(device)` clears the mark. (`torch.from_numpy` bypasses
    modes, so it is wrapped while the mode is on.)"""

    def __enter__(self):
        self._from_numpy = torch.from_numpy

        def from_numpy(array):
            out = self._from_numpy(array)
            _set(out, True)
            return out

        torch.from_numpy = from_numpy
        return super().__enter__()

    def __exit__(self, *exc):
        torch.from_numpy = self._from_numpy
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _FACTORIES:
            source = args[0] if args else None
            if kwargs.get("device") is None and not (func is torch.as_tensor and isinstance(source, torch.Tensor)):
                _set(out, True)
        elif func in _MOVES:
            rest = list(args[1:]) + list(kwargs.values())
            if any(isinstance(a, (str, torch.device, torch.Tensor)) for a in rest):
                _set(out, False)
        elif func is torch.Tensor.cpu:
            _set(out, True)
        else:
            tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            if any(map(_marked, tensors)) and not any(t.ndim > 0 and not _marked(t) for t in tensors):
                _set(out, True)
        return out


@contextmanager
def host_tensors_flagged():
    """Within the block, a tensor built without an explicit device (one that would stay on the CPU while the model
    is on CUDA) is refused by a stand-in UNet (`install_device_check`), with the argument named."""
    with _HostTensors():
        yield


_GLOBAL_MODE: list = []


def flag_host_tensors_for_good():
    """A stand-in run (a notebook under nbmake: `load_pipeline` under DIFFNB_STANDIN) flags host tensors for the rest
    of the process, so a device bug in a notebook's own code fails on the CPU as it would on CUDA."""
    if not _GLOBAL_MODE:
        _GLOBAL_MODE.append(_HostTensors())
        _GLOBAL_MODE[0].__enter__()


def _check_inputs(module, args, kwargs):
    device = next(module.parameters()).device
    named = [(f"argument {i}", a) for i, a in enumerate(args)] + list(kwargs.items())
    for name, value in named:
        for t in tree_flatten(value)[0]:
            if not isinstance(t, torch.Tensor) or t.ndim == 0:  # diffusers moves 0-dim timesteps itself
                continue
            if t.device != device or _marked(t):
                where = "was built without device=" if _marked(t) else f"is on {t.device}"
                raise ValueError(f"UNet input {name!r} (shape {tuple(t.shape)}) {where}, but the UNet is on {device}: "
                                 "build it on the latents' device (on CUDA this call would fail)")


def install_device_check(unet):
    """A forward pre-hook that refuses inputs on another device than the UNet (or flagged as host tensors)."""
    return unet.register_forward_pre_hook(_check_inputs, with_kwargs=True)

"""Model registry: one name per model family, the same loading code for the toy model and the hub models.

`load_pipeline("toy")` loads the toy model shipped in `diffnb/assets/toy` through `from_pretrained`, exactly as
`load_pipeline("sd15")` loads Stable Diffusion 1.5 from the hub, so every notebook runs unchanged on all three.
`tiny_pipeline("sd15" | "sdxl")` builds small random-weight pipelines of both architectures, offline, for tests.
Under `DIFFNB_STANDIN` the hub models resolve to random-weight stand-ins of the real structure (`diffnb.standin`).
"""
from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from . import standin
from .standin import side, sized  # noqa: F401  (the notebooks' knob for counts and image sides, next to `spec`)

ASSETS = Path(__file__).resolve().parent / "assets"
TOY_DIR = ASSETS / "toy"


@dataclass(frozen=True)
class ModelSpec:
    source: str  # hub id or local folder
    family: str  # "sd15" | "sdxl" (pipelines) or "encoder"
    resolution: int = 512  # default image size in pixels
    steps: int = 50
    guidance: float = 7.5
    note: str = ""


REGISTRY: dict[str, ModelSpec] = {
    "toy": ModelSpec(str(TOY_DIR), "sd15", resolution=64, steps=20, guidance=5.0,
                     note="our SD1.5-shaped model of the toy world, shipped in the package, CPU in seconds"),
    "sd15": ModelSpec("stable-diffusion-v1-5/stable-diffusion-v1-5", "sd15", 512, 50, 7.5),
    "sdxl": ModelSpec("stabilityai/stable-diffusion-xl-base-1.0", "sdxl", 1024, 50, 5.0),
    "ip-adapter-plus": ModelSpec("h94/IP-Adapter", "encoder", note="subfolder models, ip-adapter-plus_sd15.safetensors"),
    "clip": ModelSpec("openai/clip-vit-base-patch32", "encoder", 224),
    "dinov2-small": ModelSpec("facebook/dinov2-small", "encoder", 224),
    "dinov2-base": ModelSpec("facebook/dinov2-base", "encoder", 224),
}
PIPELINES = tuple(k for k, v in REGISTRY.items() if v.family in ("sd15", "sdxl"))
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def spec(name: str) -> ModelSpec:
    """The registry entry, with the stand-in knob applied to hub pipelines (`DIFFNB_STANDIN=1`: smaller, fewer steps)."""
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; known: {sorted(REGISTRY)}")
    s = REGISTRY[name]
    return standin.shrink(s) if name != "toy" and s.family in ("sd15", "sdxl") else s


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The requested device, or the best available one: cuda, then mps, then cpu."""
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but CUDA is not available here; use device=None or 'cpu'")
    return device


def pick_dtype(device: torch.device, dtype: torch.dtype | str | None = None) -> torch.dtype:
    """fp16 on accelerators, fp32 on CPU; fp16 on CPU is refused (diffusers cannot run it there)."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None) if dtype in ("float16", "bfloat16", "float32", "float64") else dtype
        if isinstance(dtype, str):
            raise ValueError(f"unknown dtype {dtype!r}; allowed: float16, bfloat16, float32, float64")
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.float16
    if not isinstance(dtype, torch.dtype) or dtype not in _FLOATS:
        raise TypeError(f"dtype must be one of {[str(d) for d in _FLOATS]}, got {dtype!r}")
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError("float16 does not run on the CPU; use torch.float32 (or bfloat16) on cpu, float16 on cuda")
    return dtype


def toy_is_trained() -> bool:
    return (TOY_DIR / "model_index.json").exists()


def load_pipeline(name: str = "toy", device: str | torch.device | None = None,
                  dtype: torch.dtype | str | None = None, **kwargs):
    """Load a registered text-to-image pipeline on the best device, in fp16 on accelerators and fp32 on CPU."""
    s = spec(name)
    if s.family not in ("sd15", "sdxl"):
        raise ValueError(f"{name!r} is an image encoder, not a pipeline; pipelines: {list(PIPELINES)}")
    device = pick_device(device)
    dtype = pick_dtype(device, dtype)
    if name == "toy" and not toy_is_trained():
        warnings.warn("the toy model is not trained yet: 'toy' resolves to a tiny RANDOM SD1.5-shaped pipeline",
                      stacklevel=2)
        return tiny_pipeline("sd15").to(device, dtype)
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    if name != "toy" and standin.mode():
        pipe = standin.standin_pipeline(s.family)
        standin.flag_host_tensors_for_good()
        if standin.mode() == "count":
            from .workload import install_tally

            install_tally(pipe)
    else:
        cls = StableDiffusionXLPipeline if s.family == "sdxl" else StableDiffusionPipeline
        extra = {"safety_checker": None, "requires_safety_checker": False} if s.family == "sd15" else {}
        if dtype == torch.float16 and name != "toy":
            extra["variant"] = "fp16"
        pipe = cls.from_pretrained(s.source, torch_dtype=dtype, **{**extra, **kwargs})
    # DDIM everywhere: deterministic sampling and exact inversion, as the papers' code uses.
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    # The toy samples in a second: no bars. A real model's sampling loop takes minutes: keep diffusers' bar.
    pipe.set_progress_bar_config(disable=name == "toy")
    return pipe.to(device, dtype)


def family(pipe) -> str:
    """'sdxl' or 'sd15' from the pipeline's components (SDXL has a second text encoder)."""
    return "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd15"


SD_DDIM = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
               set_alpha_to_one=False, steps_offset=1)  # Stable Diffusion's DDIM settings


def _tiny_tokenizer(max_length: int = 16):
    from transformers import CLIPTokenizer

    from .toyworld.prompts import WORDS, write_word_tokenizer

    words = sorted(set(WORDS) | {"photo", "of", "cat", "dog", "in", "style", "the", "watercolor", "painting"})
    return CLIPTokenizer.from_pretrained(write_word_tokenizer(tempfile.mkdtemp(prefix="diffnb_tok_"), words, max_length))


def tiny_pipeline(arch: str = "sd15", seed: int = 0):
    """A small random-weight pipeline of the SD1.5 or SDXL architecture, built from configs with no download.

    The attention layout mirrors the real model: SD1.5 has cross-attention at every level, SDXL none at the
    top level, two transformer blocks per attention at the lower one, and a second text encoder.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if arch not in ("sd15", "sdxl"):
        raise ValueError(f"unknown architecture {arch!r}; allowed: 'sd15', 'sdxl'")
    torch.manual_seed(seed)
    tok = _tiny_tokenizer()
    text_cfg = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                    projection_dim=32)
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=32)
    sched = DDIMScheduler(**SD_DDIM)
    common = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8)
    if arch == "sd15":
        unet = UNet2DConditionModel(
            block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
            attention_head_dim=8, **common)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**text_cfg)), tokenizer=tok,
                                       unet=unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    else:
        unet = UNet2DConditionModel(
            block_out_channels=(16, 32, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
            attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
            **common)
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**text_cfg)), tokenizer=tok,
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg)), tokenizer_2=tok,
            unet=unet, scheduler=sched, force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Full-size UNet architectures (the hub configs, written out so benchmarks build them with no download).
UNET_CONFIGS = {
    "sd15": dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32),
    "sdxl": dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, norm_num_groups=32),
}


def full_size_unet(arch: str, device="cuda", dtype=torch.float16):
    """A random-weight UNet with the real SD1.5 / SDXL architecture, for timing (speed ignores weights)."""
    from diffusers import UNet2DConditionModel

    if arch not in UNET_CONFIGS:
        raise ValueError(f"unknown architecture {arch!r}; allowed: {sorted(UNET_CONFIGS)}")
    return UNet2DConditionModel(**UNET_CONFIGS[arch]).to(device, dtype)


# The rest of a full-size pipeline (hub configs written out): SD's VAE (SDXL's has the same shape), CLIP ViT-L/14's
# text tower, and SDXL's second one (OpenCLIP bigG). Parameter counts are checked in tests/test_models.py.
VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                  layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32)
TEXT_CONFIGS = {
    "clip-l": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768),
    "bigG": dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280),
}


def full_size_pipeline(arch: str, device="cuda", dtype=torch.float16):
    """A random-weight SD1.5 / SDXL pipeline with the real architectures (UNet, VAE, text encoders), for timing
    whole methods (inversion, decoding, text encoding included). Built on `device` directly; the tokenizer is a
    small word-level one padding to 77 tokens like CLIP's, so prompts must use its words (e.g. "a photo of a dog")."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if arch not in UNET_CONFIGS:
        raise ValueError(f"unknown architecture {arch!r}; allowed: {sorted(UNET_CONFIGS)}")
    tok = _tiny_tokenizer(77)
    ids = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1)
    sched = DDIMScheduler(**SD_DDIM)
    with torch.device(device):
        unet = full_size_unet(arch, device, dtype)
        vae = AutoencoderKL(**VAE_CONFIG, sample_size=8 * UNET_CONFIGS[arch]["sample_size"])
        text = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIGS["clip-l"], **ids))
        if arch == "sd15":
            pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                           safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        else:
            text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_CONFIGS["bigG"], **ids))
            pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text, tokenizer=tok, text_encoder_2=text_2,
                                             tokenizer_2=tok, unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


GIB = 2**30


def parameter_counts(arch: str) -> dict[str, int]:
    """Parameters of the real SD1.5 / SDXL components, counted from their configs on the meta device (no weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if arch not in UNET_CONFIGS:
        raise ValueError(f"unknown architecture {arch!r}; allowed: {sorted(UNET_CONFIGS)}")
    count = lambda m: sum(p.numel() for p in m.parameters())
    with torch.device("meta"):
        out = {"unet": count(UNet2DConditionModel(**UNET_CONFIGS[arch])), "vae": count(AutoencoderKL(**VAE_CONFIG)),
               "text_encoder": count(CLIPTextModel(CLIPTextConfig(**TEXT_CONFIGS["clip-l"])))}
        if arch == "sdxl":
            out["text_encoder_2"] = count(CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_CONFIGS["bigG"])))
    return out


def estimate_memory(name: str, unet_batch: int = 2, vae_images: int | None = None, explicit_attention: bool = True,
                    extra_gpu_gib: float = 0.0, extra_host_gib: float = 0.0) -> dict[str, float]:
    """Expected peak GPU and host memory (GiB) of a notebook's real-model run in fp16, ESTIMATED from the real
    configs: the weights, plus the larger of one UNet call on `unet_batch` items (CFG doubles the images; with
    `explicit_attention` the processors that expose attention probabilities hold one layer's fp16 score matrix
    at the largest attention resolution) and one fp32 VAE decode of `vae_images` images (default: the batch
    `encode_image` / `decode_latents` use). Host: the fp16 weights, which `from_pretrained` reads through host
    memory, plus ~2.5 GiB of Python, torch and CUDA context. Rough by design: it sizes defaults, it does not
    replace `torch.cuda.max_memory_allocated` (the GPU check measures that)."""
    spec(name)  # validates the name
    s = REGISTRY[name]  # the real size, never the stand-in knob's
    if s.family not in UNET_CONFIGS:
        raise ValueError(f"{name!r} is not a pipeline; pipelines: {list(PIPELINES)}")
    arch, res = s.family, s.resolution
    if name == "toy":
        raise ValueError("estimate_memory sizes the real models; the toy runs on a CPU in well under 1 GiB")
    cfg = UNET_CONFIGS[arch]
    counts = parameter_counts(arch)
    weights = sum(counts.values()) * 2 / GIB
    side = res // 8
    # activations: about 12 live feature maps per level in fp16, the widest level dominating
    feats = sum(12 * c * (side // 2**i) ** 2 * 2 for i, c in enumerate(cfg["block_out_channels"]))
    heads = cfg["attention_head_dim"]
    top = 1 if arch == "sdxl" else 0  # SDXL has no attention at its top level
    n = (side // 2**top) ** 2
    h = heads[top] if isinstance(heads, (tuple, list)) else heads
    scores = h * n * n * 2 * (2 if explicit_attention else 0)  # probabilities and their softmax input
    unet = unet_batch * (feats + scores) / GIB
    from .pipeline import vae_batch_size

    vae_images = vae_images or vae_batch_size(res, res)
    vae = vae_images * 6 * 128 * res * res * 4 / GIB + 2 * counts["vae"] * 4 / GIB
    gpu = weights + max(unet, vae) + extra_gpu_gib
    host = weights + 2.5 + extra_host_gib
    return dict(gpu_gib=round(gpu, 1), host_gib=round(host, 1), weights_gib=round(weights, 1),
                unet_activations_gib=round(unet, 1), vae_decode_gib=round(vae, 1))

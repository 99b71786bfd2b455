"""The vision-transformer baselines of DiffSim (Song, Liu, Shou, ICCV 2025): CLIP-AAS and DINOv2-AAS, the Aligned
Attention Score (`diffsim.symmetric_aas`) read off a ViT's self-attention instead of a diffusion UNet's, and the
encoders they score with (`load_encoder`). Baselines the paper compares with, not its method: kept apart so that
`diffsim.py` holds the method only.

    model = load_encoder("dinov2-small")
    scores = vit_aas(model, images_a, images_b, vit_attention_layers(model)[-1])   # (n_pairs,) similarities
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..hooks import capture
from ..images import to_tensor_image
from ..layers import select
from ..standin_ip_adapter import _standin
from .diffsim import symmetric_aas


# Real configs of the two encoders notebook 05 scores with (openai/clip-vit-base-patch32, facebook/dinov2-small).
ENCODER_CONFIGS = {
    "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=32,
                 image_size=224, projection_dim=512, hidden_act="quick_gelu"),
    "dinov2-small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
                         image_size=518, layerscale_value=1.0),
}
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)


def load_encoder(name: str, device=None, dtype=None):
    """The vision encoder `vit_aas` scores with, in eval mode: "clip" (CLIPVisionModel of
    openai/clip-vit-base-patch32) or "dinov2-small" (Dinov2Model of facebook/dinov2-small), from the hub, or
    under DIFFNB_STANDIN random weights of the same class (real patch and image size; small widths unless
    DIFFNB_STANDIN=full), built offline."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model

    from ..models import REGISTRY

    classes = {"clip": (CLIPVisionModel, CLIPVisionConfig), "dinov2-small": (Dinov2Model, Dinov2Config)}
    if name not in classes:
        raise ValueError(f"unknown encoder {name!r}; allowed: {sorted(classes)}")
    cls, config = classes[name]
    mode = _standin()
    if mode:
        torch.manual_seed(0)
        cfg = dict(ENCODER_CONFIGS[name])
        if mode != "full":
            cfg.update(SMALL, **({"intermediate_size": 37} if name == "clip" else {"mlp_ratio": 2}))
        model = cls(config(**cfg))
    else:
        model = cls.from_pretrained(REGISTRY[name].source)
    return model.to(device=device, dtype=dtype).eval()


# --- CLIP-AAS and DINOv2-AAS: the same score on a vision transformer --------------------------------------
# model_type -> (mean, std) the encoder was trained with
NORMS = {
    "clip_vision_model": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
QKV = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))  # transformers 5.x / older DINOv2 names
ALLOWED = "CLIPVisionModel, CLIPVisionModelWithProjection or a DINOv2 model (Dinov2Model)"


def _model_type(model) -> str:
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if not isinstance(model, torch.nn.Module) or kind not in NORMS:
        hint = " (for a full CLIPModel pass model.vision_model)" if kind == "clip" else ""
        raise TypeError(f"vit_aas needs {ALLOWED}; got {type(model).__name__} (model_type {kind!r}){hint}")
    return kind


def _qkv(module):
    """The q/k/v child names of an attention module, or None when it is not one."""
    for names in QKV:
        if all(isinstance(getattr(module, n, None), torch.nn.Linear) for n in names):
            return names
    return None


def vit_attention_layers(model) -> list[str]:
    """Dotted names of the self-attention modules (those owning q/k/v projections), in forward order."""
    _model_type(model)
    return [name for name, m in model.named_modules() if name and _qkv(m)]


def _pixels(images, size: int, mean, std) -> torch.Tensor:
    """Any image `diffnb.images.to_tensor_image` reads (PIL, uint8 arrays, float tensors in [-1, 1], ...), or a
    list of them -> the batch normalized with the encoder's mean and std.

    A plain squash-resize to the model's size (no centre crop), so no image-processor dependency is needed;
    pass `image_processor=` for the exact Hugging Face preprocessing.
    """
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("got an empty list of images")
        return torch.cat([_pixels(im, size, mean, std) for im in images])
    x = (to_tensor_image(images).float() + 1) / 2
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@contextmanager
def _eval(model):
    """Eval mode for the call only: dropout would make the score random."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def vit_aas(model, images_a, images_b, layer: str, image_processor=None, size: int | None = None) -> torch.Tensor:
    """Symmetric AAS (A reading B's keys/values and back, averaged) per pair (images_a[i], images_b[i]): (n,).

    `layer` is a dotted name or glob from `vit_attention_layers` (several matches are averaged), never a
    position, so a sweep stays readable. A and B go through the model in one batch; q/k/v are the outputs of
    the layer's projection Linears, captured by hooks (removed even if the forward raises). These are the
    q/k/v the model really attends with; the official DiffSim CLIP code instead projects the layer input
    taken before layer_norm1, which we deliberately do not copy.
    """
    kind = _model_type(model)
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a dotted name or glob pattern (str), not {type(layer).__name__}; "
                        f"see vit_attention_layers(model)")
    names = vit_attention_layers(model)
    try:
        chosen = select(names, layer)
    except ValueError:
        raise ValueError(f"layer {layer!r} matches no self-attention layer; layers: {names[:2]} ... "
                         f"{names[-1:]} ({len(names)} in all)") from None
    cfg = model.config
    size = size or (cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0])
    if image_processor is not None:
        prep = lambda ims: image_processor(images=ims, return_tensors="pt").pixel_values  # noqa: E731
    else:
        prep = lambda ims: _pixels(ims, size, *NORMS[kind])  # noqa: E731
    a, b = prep(images_a), prep(images_b)
    if a.shape != b.shape:
        raise ValueError(f"images_a and images_b must hold the same number of images (pairs), "
                         f"got batches of shape {tuple(a.shape)} and {tuple(b.shape)}")
    p = next(model.parameters())
    pixels = torch.cat([a, b]).to(p.device, p.dtype)
    kwargs = {"interpolate_pos_encoding": size != cfg.image_size} if kind == "clip_vision_model" else {}
    projs = [f"{n}.{c}" for n in chosen for c in _qkv(model.get_submodule(n))]
    with _eval(model), capture(model, projs, offload=None) as cache:
        model(pixel_values=pixels, **kwargs)
    scores = []
    for n in chosen:
        attn = model.get_submodule(n)
        heads = getattr(attn, "num_heads", None) or attn.num_attention_heads
        q, k, v = (cache.get(f"{n}.{c}") for c in _qkv(attn))  # (2n, tokens, heads * d)
        q, k, v = (x.unflatten(-1, (heads, -1)).transpose(1, 2) for x in (q, k, v))
        scores.append(symmetric_aas(q, k, v, pairs=len(a)))
    return torch.stack(scores).mean(0).cpu()

"""One image converter: PIL / numpy / torch images in documented ranges -> the VAE's (B, 3, H, W) tensors in [-1, 1]
(`to_tensor_image`) or uint8 (H, W, 3) arrays (`to_uint8`), and decoded tensors back (`from_tensor_image`).

The range of an input is known from its type and `value_range`, never guessed from its values:

    input                                     layout                       range (default)
    PIL.Image  mode "RGB"                     (H, W) -> 3 channels         0..255
    PIL.Image  mode "L" (grayscale)           replicated to 3 channels     0..255
    numpy uint8                               (H, W, 3) or (B, H, W, 3)    0..255
    numpy float (what pipelines return with   (H, W, 3) or (B, H, W, 3)    [0, 1]
      output_type="np")
    torch uint8                               (3, H, W) or (B, 3, H, W)    0..255
    torch float (what the VAE eats and        (3, H, W) or (B, 3, H, W)    [-1, 1]
      returns)
    a list / tuple of same-sized images of the above                       as each item

`value_range=(lo, hi)` states another range for float inputs: `(0, 1)` for a torch tensor (diffusers'
`output_type="pt"` images are [0, 1]), `(-1, 1)` or `(0, 255)` for a numpy array. Values outside the range by more
than 1/1000 of its width are a ValueError naming the range found (so 0..255 floats read as [0, 1], or [-1, 1] numpy
floats read as [0, 1], cannot pass); smaller excursions are rounding and are clipped. One case is legal but almost
surely a mistake and warns: a torch float tensor read in the default [-1, 1] with no negative value at all (a [0, 1]
tensor read as [-1, 1] comes out dim and washed out); pass `value_range=(-1, 1)` to state it and silence the
warning, or `(0, 1)` if that is what it is.

Rejected with a clear error: other PIL modes (RGBA, LA, P, CMYK, I, F: convert them yourself, e.g.
`image.convert("RGB")`, which drops alpha), grayscale or 2 / 4 channel arrays and tensors (repeat a grayscale array
to 3 channels yourself, or pass `grayscale=True`), numpy arrays channels-first, tensors channels-last, other dtypes
(bool, int32, ...).
PIL's "L" is converted because its mode says what it is; a 2-D array may as well be a mask or a heat map.

Layout and normalisation go through diffusers' `VaeImageProcessor` (the same conversions its pipelines use).
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

TOLERANCE = 1e-3  # fraction of the range's width by which values may stray (rounding) before it is an error


def _vae_processor():
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor


def _check_range(value_range) -> tuple[float, float] | None:
    if value_range is None:
        return None
    if isinstance(value_range, (str, bytes)) or np.ndim(value_range) != 1 or len(value_range) != 2:
        raise TypeError(f"value_range must be a pair (low, high) such as (0, 1) or (-1, 1), got {value_range!r}")
    try:
        lo, hi = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise TypeError(f"value_range must be a pair (low, high) such as (0, 1) or (-1, 1), got {value_range!r}") from None
    if not hi > lo:
        raise ValueError(f"value_range must have low < high, got {value_range!r}")
    return lo, hi


def _range_found(x) -> tuple[float, float]:
    if torch.is_tensor(x):
        return float(x.min()), float(x.max())
    return float(np.min(x)), float(np.max(x))


def _check_values(x, lo: float, hi: float, what: str, explicit: bool):
    """Float values must lie in [lo, hi] up to rounding; outside by more is a ValueError naming the range found."""
    if (x.numel() if torch.is_tensor(x) else x.size) == 0:
        raise ValueError(f"{what} is empty (shape {tuple(x.shape)})")
    found_lo, found_hi = _range_found(x)
    if not (np.isfinite(found_lo) and np.isfinite(found_hi)):
        raise ValueError(f"{what} has NaN or infinite values")
    slack = TOLERANCE * (hi - lo)
    if found_lo < lo - slack or found_hi > hi + slack:
        hint = ""
        if found_hi > 2 and hi <= 1:
            hint = " Values up to 255 are 0..255 pixels: pass a uint8 image, or value_range=(0, 255)."
        elif found_lo < 0 <= lo:
            hint = " Negative values: if the image is in [-1, 1], pass value_range=(-1, 1)."
        raise ValueError(f"{what} has values in [{found_lo:.4g}, {found_hi:.4g}], outside the range "
                         f"[{lo:g}, {hi:g}] it is read in{'' if explicit else ' (the default for its type)'}.{hint}")
    if not explicit and lo < 0 and found_lo >= 0:
        warnings.warn(f"{what} is read in [-1, 1] (the default for float tensors) but has no negative value: if it is a "
                      f"[0, 1] image pass value_range=(0, 1); pass value_range=(-1, 1) to silence this warning",
                      UserWarning, stacklevel=4)


def _unit(x, lo: float, hi: float):
    """Checked values in [lo, hi] -> [0, 1] (numpy or torch), clipping rounding-size excursions."""
    if (lo, hi) == (-1.0, 1.0):
        x = (x + 1) / 2
    elif (lo, hi) != (0.0, 1.0):
        x = (x - lo) / (hi - lo)
    return x.clamp(0, 1) if torch.is_tensor(x) else np.clip(x, 0, 1)


def _pil_to_uint8(image) -> np.ndarray:
    if image.mode == "L":
        image = image.convert("RGB")
    elif image.mode != "RGB":
        raise ValueError(f"PIL images must be RGB (or grayscale 'L'), got mode {image.mode!r}: convert it yourself, "
                         f"e.g. image.convert('RGB') (which drops alpha) or paste it on a background first")
    return np.array(image)  # a writable copy, (H, W, 3) uint8


def _check_channels_last(shape, what: str):
    if len(shape) not in (3, 4):
        gray = " (grayscale? repeat it to 3 channels: np.repeat(x[..., None], 3, -1))" if len(shape) == 2 else ""
        raise ValueError(f"{what} must be (H, W, 3) or (B, H, W, 3), got shape {tuple(shape)}{gray}")
    if shape[-1] != 3:
        if shape[-3] == 3:
            raise ValueError(f"{what} must be channels-last (H, W, 3), got shape {tuple(shape)}: it looks channels-"
                             f"first; transpose it (x.transpose(1, 2, 0), or (0, 2, 3, 1) for a batch)")
        raise ValueError(f"{what} must have 3 (RGB) channels last, got shape {tuple(shape)}"
                         f"{' (grayscale? repeat it to 3 channels)' if shape[-1] == 1 else ''}"
                         f"{' (drop an alpha channel first: x[..., :3])' if shape[-1] == 4 else ''}")


def _check_channels_first(shape, what: str):
    if len(shape) not in (3, 4):
        raise ValueError(f"{what} must be (3, H, W) or (B, 3, H, W), got shape {tuple(shape)}"
                         f"{' (grayscale? repeat it to 3 channels)' if len(shape) == 2 else ''}")
    if shape[-3] != 3:
        if shape[-1] == 3:
            raise ValueError(f"{what} must be channels-first (3, H, W), got shape {tuple(shape)}: it looks channels-"
                             f"last; permute it (x.permute(2, 0, 1), or (0, 3, 1, 2) for a batch)")
        raise ValueError(f"{what} must have 3 (RGB) channels, (B, 3, H, W), got shape {tuple(shape)}"
                         f"{' (grayscale? repeat it to 3 channels)' if shape[-3] == 1 else ''}")


def _parse(image, value_range):
    """One image (not a list) -> (kind, batched x, its range (lo, hi), batched?) with values checked. kind: "uint8"
    (numpy BHWC), "uint8t" (tensor BCHW) or "float" (numpy BHWC or tensor BCHW, values in the range)."""
    from PIL import Image

    rng = _check_range(value_range)
    if isinstance(image, Image.Image):
        if rng is not None and rng != (0.0, 255.0):
            raise ValueError(f"a PIL image is 0..255 by its type; value_range={value_range!r} does not apply")
        return "uint8", _pil_to_uint8(image)[None], (0.0, 255.0), False
    if isinstance(image, np.ndarray):
        _check_channels_last(image.shape, "a numpy image")
        batched = image.ndim == 4
        x = image if batched else image[None]
        if x.dtype == np.uint8:
            if rng is not None and rng != (0.0, 255.0):
                raise ValueError(f"a uint8 image is 0..255 by its type; value_range={value_range!r} does not apply")
            return "uint8", x, (0.0, 255.0), batched
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"numpy images must be uint8 (0..255) or float ([0, 1] unless value_range= says "
                            f"otherwise), got dtype {image.dtype}")
        lo, hi = rng or (0.0, 1.0)
        _check_values(x, lo, hi, "a float numpy image", rng is not None)
        return "float", x, (lo, hi), batched
    if torch.is_tensor(image):
        _check_channels_first(image.shape, "a tensor image")
        batched = image.ndim == 4
        x = (image if batched else image[None]).detach()
        if x.dtype == torch.uint8:
            if rng is not None and rng != (0.0, 255.0):
                raise ValueError(f"a uint8 tensor is 0..255 by its type; value_range={value_range!r} does not apply")
            return "uint8t", x, (0.0, 255.0), batched
        if not x.is_floating_point():
            raise TypeError(f"tensor images must be uint8 (0..255) or float ([-1, 1] unless value_range= says "
                            f"otherwise), got dtype {image.dtype}")
        lo, hi = rng or (-1.0, 1.0)
        _check_values(x, lo, hi, "a float tensor image", rng is not None)
        return "float", x, (lo, hi), batched
    raise TypeError(f"an image must be a PIL image, a numpy array or a torch tensor (or a list of them), "
                    f"got {type(image).__name__}")


def _own(x: np.ndarray) -> np.ndarray:
    """A C-contiguous, writable array (a copy only when needed): torch.from_numpy refuses negative strides (a
    flipped view, x[:, ::-1]) and warns on read-only arrays (np.asarray of a PIL image)."""
    return np.require(x, requirements=["C", "W"])


def _gray_to_rgb(image):
    """A one-channel array ((H, W), (H, W, 1), (B, H, W, 1)) or tensor ((H, W), (1, H, W), (B, 1, H, W)) repeated to
    3 channels; anything else as it is."""
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            return np.repeat(image[..., None], 3, -1)
        if image.ndim in (3, 4) and image.shape[-1] == 1:
            return np.repeat(image, 3, -1)
    elif torch.is_tensor(image):
        if image.ndim == 2:
            return image[None].expand(3, -1, -1)
        if image.ndim in (3, 4) and image.shape[-3] == 1:
            return image.expand(*image.shape[:-3], 3, *image.shape[-2:])
    return image


def to_tensor_image(image, size: int | None = None, value_range=None, grayscale: bool = False) -> torch.Tensor:
    """Any accepted image (see the module docstring), or a list of same-sized ones -> (B, 3, H, W) float in [-1, 1].

    uint8 / PIL / numpy inputs give float32 on the CPU; float tensors keep their dtype and device. `size` resizes to
    size x size (PIL: bicubic in PIL; arrays and tensors: bicubic with antialiasing). `grayscale=True` also takes
    one-channel arrays ((H, W), (H, W, 1)) and tensors ((H, W), (1, H, W)) as grayscale images, repeated to RGB:
    for callers that know their input is an image (a 2-D array may as well be a mask, so the default refuses it).
    """
    V = _vae_processor()
    if isinstance(image, (list, tuple)):
        if not image:
            raise ValueError("got an empty list of images")
        items = [to_tensor_image(im, size, value_range, grayscale) for im in image]
        shapes = {tuple(t.shape[1:]) for t in items}
        if len(shapes) > 1:
            raise ValueError(f"images in a list must have the same size, got {sorted(shapes)}: pass size=")
        return torch.cat([t.to(items[0]) for t in items])
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"size must be a positive int or None, got {size!r}")
    from PIL import Image

    if size and isinstance(image, Image.Image):
        if image.mode not in ("RGB", "L"):
            _pil_to_uint8(image)  # raises the mode error
        image = image.resize((size, size), Image.BICUBIC)
        size = None
    kind, x, (lo, hi), _ = _parse(_gray_to_rgb(image) if grayscale else image, value_range)
    if kind == "uint8":
        x = V.normalize(V.numpy_to_pt(_own(x)).float().div(255))
    elif kind == "uint8t":
        x = V.normalize(x.float().div(255))
    else:
        if isinstance(x, np.ndarray):
            x = V.numpy_to_pt(_own(x)).float()
        # [-1, 1] passes through exactly (clamp is the identity inside the range)
        x = x.clamp(-1, 1) if (lo, hi) == (-1.0, 1.0) else V.normalize(_unit(x, lo, hi))
    if size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)
    return x


def to_uint8(image, value_range=None) -> np.ndarray:
    """Any accepted image (see the module docstring) -> uint8 numpy, channels-last: (H, W, 3) for one image,
    (B, H, W, 3) for a batch or a list. Float inputs are rounded to the nearest level."""
    V = _vae_processor()
    if isinstance(image, (list, tuple)):
        if not image:
            raise ValueError("got an empty list of images")
        items = [to_uint8(im, value_range) for im in image]
        items = [im[None] if im.ndim == 3 else im for im in items]
        shapes = {im.shape[1:] for im in items}
        if len(shapes) > 1:
            raise ValueError(f"images in a list must have the same size, got {sorted(shapes)}")
        return np.concatenate(items)

    kind, x, (lo, hi), batched = _parse(image, value_range)
    if kind == "uint8t":
        x = x.permute(0, 2, 3, 1).cpu().numpy()
    elif kind == "float":
        if torch.is_tensor(x):
            x = V.pt_to_numpy(x)  # float32, channels-last
        x = (_unit(x, lo, hi) * 255).round().astype(np.uint8)
    return x if batched else x[0]


def from_tensor_image(x: torch.Tensor, rounded: bool = True) -> np.ndarray:
    """(B, 3, H, W) float in [-1, 1] (a VAE decoder's output) -> uint8 (B, H, W, 3): the inverse of `to_tensor_image`.

    Decoders overshoot [-1, 1] (random-weight ones by far), so values outside are clipped, by design: this is the
    decoder's output path. To convert a tensor of your own with its range checked, use `to_uint8(x, value_range=...)`.
    `rounded=False` keeps float32 on the same 0..255 scale: for differences smaller than one grey level. uint8
    (B, 3, H, W) tensors are only permuted.
    """
    if not torch.is_tensor(x):
        raise TypeError(f"from_tensor_image takes a (B, 3, H, W) tensor, got {type(x).__name__}: use to_uint8 for "
                        f"PIL images and arrays")
    _check_channels_first(x.shape, "a tensor image")
    x = x if x.ndim == 4 else x[None]
    if x.dtype == torch.uint8:
        out = x.permute(0, 2, 3, 1).cpu().numpy()
        return out if rounded else out.astype(np.float32)
    if not x.is_floating_point():
        raise TypeError(f"from_tensor_image takes float tensors in [-1, 1] or uint8, got dtype {x.dtype}")
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1)
    return (x.round().byte() if rounded else x).cpu().numpy()

"""Pictures: image grids, heat-map overlays, PCA of features, per-token attention maps, a widget browser."""
from __future__ import annotations

import numpy as np
import torch

from .images import to_uint8  # the one image converter (re-exported: notebooks import it from here)


def _heat_or_image(img):
    """2-D arrays / tensors are heat maps (shown with a colour map); everything else is an image."""
    if torch.is_tensor(img) and img.ndim == 2:
        return img.detach().float().cpu().numpy()
    return img if (isinstance(img, np.ndarray) and img.ndim == 2) else to_uint8(img)


def image_grid(images, titles=None, ncols: int | None = None, size: float = 2.0, suptitle: str | None = None):
    """A matplotlib figure of images with optional titles; returns the figure (shown inline in notebooks)."""
    import matplotlib.pyplot as plt

    images = list(images)
    if not images:
        raise ValueError("image_grid needs at least one image")
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"{len(titles)} titles for {len(images)} images")
    ncols = ncols or min(len(images), 8)
    nrows = (len(images) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + (0.4 if suptitle else 0)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, img in enumerate(images):
        ax = axes.flat[i]
        arr = _heat_or_image(img)
        ax.imshow(arr, cmap="viridis" if arr.ndim == 2 else None, interpolation="nearest")
        if titles is not None:
            ax.set_title(str(titles[i]), fontsize=9)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def overlay(image, heat, alpha: float = 0.55, cmap: str = "jet") -> np.ndarray:
    """Blend a heat map (any size, any range) over an image; returns uint8 HWC."""
    import matplotlib

    from PIL import Image

    img = to_uint8(image)
    if img.ndim != 3:
        raise ValueError(f"overlay draws on one image, got a batch of shape {img.shape}")
    heat = heat.detach().float().cpu().numpy() if torch.is_tensor(heat) else np.asarray(heat, dtype=np.float32)
    if heat.ndim != 2:
        raise ValueError(f"heat must be a 2-D map (h, w), got shape {heat.shape}")
    heat = np.asarray(Image.fromarray(heat.astype(np.float32)).resize(img.shape[1::-1], Image.BILINEAR))
    heat = (heat - heat.min()) / (np.ptp(heat) + 1e-8)
    colored = matplotlib.colormaps[cmap](heat)[..., :3] * 255
    return (img * (1 - alpha) + colored * alpha).round().astype(np.uint8)


def pca_rgb(features, n_components: int = 3, fit_on=None) -> np.ndarray | list[np.ndarray]:
    """Project (C, H, W) feature maps onto their top principal components (scikit-learn's PCA, exact SVD), as RGB
    images in [0, 1].

    Give a list to project several maps with one shared basis (so colours mean the same thing in each); `fit_on`
    ((N, C) rows, or (C, H, W) maps) fits the basis on other features. Component signs follow scikit-learn's
    deterministic convention.
    """
    from sklearn.decomposition import PCA

    single = torch.is_tensor(features) or isinstance(features, np.ndarray)
    maps = [features] if single else list(features)
    if not maps:
        raise ValueError("pca_rgb needs at least one (C, H, W) map")
    maps = [m.detach().float().cpu().numpy() if torch.is_tensor(m) else np.asarray(m, dtype=np.float32) for m in maps]
    for m in maps:
        if m.ndim != 3:
            raise ValueError(f"pca_rgb expects (C, H, W) maps, got shape {m.shape}")
        if m.shape[0] != maps[0].shape[0]:
            raise ValueError(f"maps with one shared basis need the same channels, got {maps[0].shape[0]} and {m.shape[0]}")
    c = maps[0].shape[0]
    flat = [m.reshape(c, -1).T for m in maps]
    if fit_on is None:
        basis_data = np.concatenate(flat)
    else:
        fit = fit_on.detach().float().cpu().numpy() if torch.is_tensor(fit_on) else np.asarray(fit_on, dtype=np.float32)
        if fit.ndim == 3 and fit.shape[0] == c:
            fit = fit.reshape(c, -1).T
        if fit.ndim != 2 or fit.shape[1] != c:
            raise ValueError(f"fit_on must be (N, {c}) rows or a ({c}, H, W) map, got shape {fit.shape}")
        basis_data = fit
    if not isinstance(n_components, int) or not 1 <= n_components <= min(basis_data.shape):
        raise ValueError(f"n_components must be an int in 1..{min(basis_data.shape)} (channels / samples), "
                         f"got {n_components!r}")
    pca = PCA(n_components=n_components, svd_solver="full").fit(basis_data)
    proj = [pca.transform(f) for f in flat]
    lo = np.min([p.min(0) for p in proj], axis=0)
    hi = np.max([p.max(0) for p in proj], axis=0)
    out = [((p - lo) / (hi - lo + 1e-8)).reshape(m.shape[1], m.shape[2], n_components) for p, m in zip(proj, maps)]
    return out[0] if single else out


def token_maps(image, maps, tokens: list[str], size: float = 2.0):
    """One overlay per token: `maps` is (H, W, n_tokens) cross-attention of one image."""
    maps = maps.detach().cpu() if torch.is_tensor(maps) else torch.as_tensor(maps)
    if maps.ndim != 3 or maps.shape[-1] != len(tokens):
        raise ValueError(f"maps must be (H, W, {len(tokens)}) for {len(tokens)} tokens, got {tuple(maps.shape)}")
    return image_grid([to_uint8(image)] + [overlay(image, maps[..., i]) for i in range(len(tokens))],
                      titles=["image"] + list(tokens), size=size)


def browse(results: dict, labels: tuple[str, str] = ("layer", "step"), size: float = 3.0):
    """ipywidgets view over precomputed images keyed by (a, b): two sliders/dropdowns pick what is shown."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    if not isinstance(results, dict) or not results:
        raise ValueError("browse needs a non-empty {(a, b): image} dict")
    if bad := [k for k in results if not (isinstance(k, tuple) and len(k) == 2)]:
        raise ValueError(f"browse's keys must be (a, b) pairs such as (layer, step), got {bad[:3]!r}")
    a_vals = sorted({k[0] for k in results}, key=str)
    b_vals = sorted({k[1] for k in results}, key=str)
    out = widgets.Output()
    a_w = widgets.Dropdown(options=a_vals, description=labels[0])
    b_w = widgets.SelectionSlider(options=b_vals, description=labels[1])

    def show(*_):
        with out:
            out.clear_output(wait=True)
            key = (a_w.value, b_w.value)
            if key in results:
                fig, ax = plt.subplots(figsize=(size, size))
                ax.imshow(_heat_or_image(results[key]))
                ax.set_title(f"{labels[0]}={key[0]}  {labels[1]}={key[1]}", fontsize=9)
                ax.axis("off")
                plt.show()
            else:
                print(f"nothing cached for {key}")

    a_w.observe(show, "value")
    b_w.observe(show, "value")
    show()
    return widgets.VBox([widgets.HBox([a_w, b_w]), out])


def anatomy_figure(rows: list[dict], title: str = "attention layers in execution order"):
    """Every attention layer as a marker: x = execution order (down, mid, up), y = resolution, colour = kind."""
    import matplotlib.pyplot as plt

    order = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    rows = sorted(rows, key=lambda r: (order.get(r["name"].split(".")[0], 3),))  # stable: keeps block order
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(rows)), 3))
    for i, r in enumerate(rows):
        ax.scatter(i, r["resolution"], c="tab:blue" if r["kind"] == "self" else "tab:orange", s=40,
                   marker="o" if r["kind"] == "self" else "s")
    ax.set_yscale("log", base=2)
    res = sorted({r["resolution"] for r in rows})
    ax.set_yticks(res, [f"{v}x{v}" for v in res])
    ax.set_xticks(range(len(rows)), [r["name"].split(".")[0].replace("_blocks", "").replace("_block", "") for r in rows],
                  rotation=90, fontsize=7)
    ax.scatter([], [], c="tab:blue", marker="o", label="self-attention (attn1)")
    ax.scatter([], [], c="tab:orange", marker="s", label="cross-attention (attn2)")
    ax.legend(fontsize=8, loc="upper center")
    ax.set_ylabel("feature map")
    ax.set_title(title)
    fig.tight_layout()
    return fig

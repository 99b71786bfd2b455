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

    from .layers import execution_order

    order = {name: i for i, name in enumerate(execution_order([r["name"] for r in rows]))}
    rows = sorted(rows, key=lambda r: order[r["name"]])
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


def draw_keypoint_pair(ax, pair, pred=None):
    """One keypoint pair side by side (source | target, cropped to the shorter height), each keypoint in its own
    colour on both sides. With `pred` ((K, 2) x, y on the target): truth as x, prediction as o, joined by a line."""
    import matplotlib.pyplot as plt

    if pred is not None and np.shape(pred) != np.shape(pair.trg_kps):
        raise ValueError(f"pred must be (K, 2) like the target keypoints {np.shape(pair.trg_kps)}, got {np.shape(pred)}")
    h = min(pair.src_image.shape[0], pair.trg_image.shape[0])
    s, t = pair.src_image[:h], pair.trg_image[:h]
    w = s.shape[1]
    ax.imshow(np.concatenate([s, t], axis=1))
    for i, ((xs, ys), (xt, yt)) in enumerate(zip(pair.src_kps, pair.trg_kps)):
        c = plt.cm.tab10(i % 10)
        ax.scatter([xs], [ys], color=c, s=18)
        ax.scatter([xt + w], [yt], color=c, s=18, marker="o" if pred is None else "x")
        if pred is not None:
            ax.scatter([pred[i][0] + w], [pred[i][1]], color=c, s=18)
            ax.plot([xt + w, pred[i][0] + w], [yt, pred[i][1]], color=c, lw=0.8)
    ax.axis("off")
    return ax


def mask_timeline(masks_per_step, images, steps, rows: int = 2, size: float = 1.7):
    """How subject masks form over denoising: per image (a row), the image and its mask at each of `steps`.
    masks_per_step: per step, (n, R, R) or (n, R*R) masks, or None before the first (e.g.
    `ConsiStoryOutput.masks_per_step`); steps past the run are left out. Returns the figure."""
    import matplotlib.pyplot as plt

    if not isinstance(masks_per_step, (list, tuple)) or not masks_per_step:
        raise ValueError("masks_per_step must be a non-empty list (one entry per step)")
    show = [s for s in steps if 0 <= s < len(masks_per_step)]
    if not show:
        raise ValueError(f"none of steps {list(steps)} is in the run's {len(masks_per_step)} steps")
    rows = min(rows, len(images))
    fig, axes = plt.subplots(rows, len(show) + 1, figsize=(size * (len(show) + 1), 1.8 * rows), squeeze=False)
    for row in range(rows):
        axes[row, 0].imshow(to_uint8(images[row]))
        axes[row, 0].set_title("image", fontsize=8)
        for ax, s in zip(axes[row, 1:], show):
            if masks_per_step[s] is None:
                ax.set_title(f"no mask yet, step {s}", fontsize=8)
                continue
            m = masks_per_step[s][row]
            side = int(np.sqrt(m.numel()))
            ax.imshow(m.reshape(side, side).float(), cmap="gray")
            ax.set_title(f"mask, step {s}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    return fig


def print_table(rows: dict, columns=None, digits=2, title: str | None = None) -> str:
    """Print {row name: {column: value}} as aligned columns (numbers right-aligned, `digits` decimals, or
    {column: digits}); a missing value prints as `-`. Returns the printed text."""
    if not isinstance(rows, dict) or not rows or not all(isinstance(r, dict) for r in rows.values()):
        raise TypeError("rows must be a non-empty {row name: {column: value}} dict")
    columns = list(columns or next(iter(rows.values())))
    places = lambda c: digits.get(c, 2) if isinstance(digits, dict) else digits
    cell = lambda c, v: "-" if v is None else v if isinstance(v, str) else f"{v:.{places(c)}f}"
    cells = {k: [cell(c, r.get(c)) for c in columns] for k, r in rows.items()}
    widths = [max(len(str(c)), *(len(v[j]) for v in cells.values())) for j, c in enumerate(columns)]
    first = max(len(str(k)) for k in rows)
    lines = ([title] if title else []) + [" " * first + "".join(f"  {c:>{w}s}" for c, w in zip(columns, widths))]
    lines += [f"{str(k):{first}s}" + "".join(f"  {v:>{w}s}" for v, w in zip(vals, widths)) for k, vals in cells.items()]
    text = "\n".join(lines)
    print(text)
    return text

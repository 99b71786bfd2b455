"""What every notebook shares: the setup cell's work, measured claims, hero figures (for `make tour`)."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from .models import pick_device, pick_dtype


def setup(seed: int = 0, device=None, dtype=None):
    """No gradients, best device, fp16 on accelerators / fp32 on CPU, every RNG seeded; prints what it chose."""
    _check_seed(seed)
    torch.set_grad_enabled(False)
    device = pick_device(device)
    dtype = pick_dtype(device, dtype)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    print(f"torch {torch.__version__} | device {name} | dtype {str(dtype).replace('torch.', '')} | seed {seed}")
    print(model_hint(device))
    return device, dtype


def model_hint(device: torch.device) -> str:
    """Which model the notebook will run and how to switch: the first thing a Colab user needs to read."""
    chosen = os.environ.get("DIFFNB_MODEL")
    now = f"DIFFNB_MODEL={chosen} is set and wins over the form" if chosen else "the parameters cell's form decides"
    if device.type == "cuda":
        return (f"model: {now}. A GPU is here: pick MODEL = 'sd15' or 'sdxl' in the parameters cell's form to run "
                "Stable Diffusion from the hub (weights download on first use), or keep 'toy' (seconds, any device).")
    return (f"model: {now}. 'toy' (the default) runs here in about two minutes; 'sd15' / 'sdxl' need a GPU "
            "(on Colab: Runtime > Change runtime type > T4 GPU).")


def _check_seed(seed):
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise TypeError(f"a seed must be an int >= 0, got {seed!r}")


def generator(seed: int) -> torch.Generator:
    """A seeded generator on the CPU (same images on every device type for a given seed)."""
    _check_seed(seed)
    return torch.Generator("cpu").manual_seed(int(seed))


def claim(notebook: str, name: str, value: float, baseline: float | None = None, target: str = "",
          met: bool | None = None) -> dict:
    """Print one measured claim and, under `make tour`, record it for the summary table.

    `met` says whether the measured value meets the claim's bar (True / False; None = a reported number with no bar,
    e.g. on a real model where the toy bars do not apply). The tour prints it as a check / cross column.
    """
    if not isinstance(notebook, str) or not isinstance(name, str) or not name:
        raise TypeError(f"claim(notebook, name, ...) takes two strings first, got {notebook!r}, {name!r}")
    if met is not None and not isinstance(met, (bool, np.bool_)):
        raise TypeError(f"met must be True, False or None (no bar), got {met!r}")
    try:
        value = float(value)
        baseline = None if baseline is None else float(baseline)
    except (TypeError, ValueError):
        raise TypeError(f"claim {name!r}: value and baseline must be numbers, got {value!r} and {baseline!r}") from None
    row = dict(notebook=notebook, claim=name, value=value, baseline=baseline, target=str(target),
               met=None if met is None else bool(met))
    base = "" if baseline is None else f" (baseline {baseline:.3f})"
    mark = {None: "", True: " ✓", False: " ✗"}[row["met"]]
    print(f"[{notebook}] {name}: {value:.4g}{base} {target}{mark}")
    out = os.environ.get("DIFFNB_RESULTS")
    if out:
        path = Path(out) / f"{notebook}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")
    return row


def save_figure(fig, name: str) -> Path | None:
    """Write a hero figure to $DIFFNB_FIGURES/name.png when `make tour` asks for it."""
    out = os.environ.get("DIFFNB_FIGURES")
    if not out:
        return None
    path = Path(out) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path

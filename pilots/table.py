"""Print the pilot table (markdown) from pilots/results/*.json: `python pilots/table.py`.

One row per scored pilot (and the premise runs of the v1 toy model, shipped until issue 17, marked as such): the four premise values (bar in
the header), fidelity by the world's probes, the training record. Paste it into pilots/README.md.
"""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PREMISES = [("emerdiff_locality", "EmerDiff locality (≥ 3)"), ("consistory_transfer", "ConsiStory transfer (≥ +0.4)"),
            ("style_aligned_shape", "StyleAligned shape ratio (≥ 0.9)"),
            ("hyperfeatures_timestep_gain", "Hyperfeatures multi − one step, points (≥ +3)")]


def rows() -> list[str]:
    head = ["run", "world", "UNet steps", "train CPU-min", "final loss"] + [t for _, t in PREMISES] + \
           ["fidelity shape / colour / bg", "probe held-out (shape / colour / bg / detail)", "premise sizes"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f in sorted(RESULTS.glob("*.json")):
        r = json.loads(f.read_text())
        if "premises" not in r:  # e.g. vae_check.json
            continue
        prem = r["premises"]

        def cell(k):
            if k not in prem:
                return "-"
            ci = next((v for key, v in prem[k]["details"].items() if key.startswith("ci95")), None)
            return f"{prem[k]['value']:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
        fid = r.get("fidelity")
        probe = r.get("probe_heldout_accuracy")
        shipped = "model" in r  # a `python -m diffnb.premises --json` file of the v1 toy model
        out.append("| " + " | ".join([
            f.stem + (" (the v1 toy model)" if shipped else ""), r.get("world", "v1"),
            "11,500" if shipped else f"{r.get('total_unet_steps') or r.get('trained_unet_steps'):,}",
            "-" if shipped or not r.get("train_cpu_minutes") else str(r["train_cpu_minutes"]),
            "-" if shipped or r.get("final_loss_smoothed") is None else f"{r['final_loss_smoothed']:.3f}",
            *[cell(k) for k, _ in PREMISES],
            "-" if not fid else " / ".join(f"{fid[k]:.2f}" for k in ("shape", "color", "background")),
            "-" if not probe else " / ".join(f"{probe[k]:.2f}" for k in ("shape", "color", "background", "detail")),
            r.get("sizes", "-")]) + " |")
    return out


if __name__ == "__main__":
    print("\n".join(rows()))

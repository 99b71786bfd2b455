"""Ship a trained run as the new `toy` (issue 17, step 3): `python pilots/ship.py RUN`.

RUN is a folder in /work/pilot_runs whose `export/` is the chosen world's full training (for v2: the pilot's 3,000
steps, continued with `--init-from`; see pilots/README.md), or a committed warm start with its probes
(`python pilots/ship.py pilots/v2_warm`: its loss.csv already records every stage). This

1. replaces the pipeline in diffnb/assets/toy (model_index, scheduler, text encoder, tokenizer, UNet, VAE,
   training_config.json) with the export's, so `load_pipeline("toy")` and its `from_pretrained` path are unchanged;
2. writes assets/toy/loss.csv as one record of every stage, steps counted from the first: the warm start's
   `loss.csv` (the earlier stages, already in those steps; the pilot's own log did not survive its machine), then
   RUN/loss.csv shifted by the warm start's steps;
3. copies the run's probes (trained on its world by `score_pilot.py`) to assets/toy/probes.safetensors + .json;
4. sets `TOY_WORLD` in diffnb/toyworld/world.py to the run's world.

Then `python -m diffnb.toyworld.evaluate --notes pilots/card_notes.md` measures the model card.

`--warm` instead replaces pilots/v2_warm (the committed warm start of the next stage) with the export and the merged
loss record, and ships nothing: a stage that does not yet clear the model's bars survives a new machine that way.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pilots.run_pilot import RUNS  # noqa: E402

TOY = REPO / "diffnb" / "assets" / "toy"
PIPELINE = ("model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae", "training_config.json")


def merged_loss(logs: list[tuple[Path, int, int]]) -> str:
    """(csv, shift, end) -> one csv: each log's steps shifted by `shift`, rows at or past `end` (in shifted steps)
    dropped: a stopped run logs past the checkpoint its export was taken from, and the next stage restarted there."""
    out = []
    for path, shift, end in logs:
        for line in path.read_text().splitlines():
            stage, step, *rest = line.split(",")
            if int(step) + shift < end:
                out.append(",".join([stage, str(int(step) + shift), *rest]))
    return "\n".join(out) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--warm", action="store_true", help="replace pilots/v2_warm with the export; ship nothing")
    a = p.parse_args()
    from diffnb.toyworld.evaluate import model_world, total_unet_steps
    from diffnb.toyworld.probes import probe_world

    run = Path(a.run).resolve() if Path(a.run, "model_index.json").exists() else RUNS / a.run
    export, probes = (run / "export" if (run / "export").is_dir() else run), run / "probes.safetensors"
    if export == run and a.warm:
        raise SystemExit(f"{run} is a warm start already")
    cfg = json.loads((export / "training_config.json").read_text())["args"]
    world = model_world(export)
    if probe_world(probes) != world:
        raise SystemExit(f"{probes} were trained on world {probe_world(probes)!r}, the model on {world!r}")
    warm, total = REPO / cfg["init_from"], total_unet_steps(cfg)
    loss = (run / "loss.csv").read_text() if export == run else \
        merged_loss([(warm / "loss.csv", 0, cfg["init_steps"]), (run / "loss.csv", cfg["init_steps"], total)])
    dest = REPO / "pilots" / "v2_warm" if a.warm else TOY
    for name in PIPELINE:
        dst = dest / name
        shutil.rmtree(dst) if dst.is_dir() else dst.unlink(missing_ok=True)
        (shutil.copytree if (export / name).is_dir() else shutil.copy2)(export / name, dst)
    (dest / "loss.csv").write_text(loss)
    if a.warm:
        print(f"installed {export} ({total:,} UNet steps) as the warm start {dest}")
        return
    shutil.copy2(probes, TOY / "probes.safetensors")
    shutil.copy2(probes.with_suffix(".json"), TOY / "probes.json")
    world_py = REPO / "diffnb" / "toyworld" / "world.py"
    text, n = re.subn(r'^TOY_WORLD = "[^"]*"$', f'TOY_WORLD = "{world}"', world_py.read_text(), flags=re.M)
    if n != 1:
        raise SystemExit(f"no single TOY_WORLD line in {world_py}")
    world_py.write_text(text)
    print(f"shipped {export} (world {world}, {total:,} UNet steps) to {TOY}")


if __name__ == "__main__":
    main()

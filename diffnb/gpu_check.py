"""The GPU check: one command that a machine with a GPU runs in one go (under 10 minutes), writing one JSON.

    python -m diffnb.gpu_check                  # CUDA: every benchmarks/* GPU path on the full-size random-weight
                                                # architectures vs vanilla diffusers, then every notebook's
                                                # real-model branch on stand-ins at full size (DIFFNB_STANDIN=full)
    python -m diffnb.gpu_check --tiny           # the same code paths on the CPU, small (what the tests run)
    python -m diffnb.gpu_check --count          # no GPU: every notebook's real counts and steps on the CPU
                                                # (DIFFNB_STANDIN=count), its UNet / VAE work tallied and priced
                                                # as ESTIMATED T4 time (`diffnb.workload`)

Per notebook and model it records the wall time, whether every cell ran, and `torch.cuda.max_memory_allocated`
read inside the notebook's own kernel. Run it from a clone of the repository (it needs `benchmarks/` and
`notebooks/`).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = {"style_aligned": "--sdxl", "consistory": "--sdxl", "emerdiff": "--sd15", "diffsim": "--sd15"}
MODELS = ("sd15", "sdxl")
PEAK_CELL = ("import json, torch\n"
             "print('DIFFNB_PEAK', json.dumps(torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() "
             "else None))")
TALLY_CELL = "from diffnb.workload import tally_json\nprint('DIFFNB_TALLY', tally_json())"
# The count run's one shortcut: notebook 03 trains its aggregators 10 steps instead of 5,000 (on the CPU a step
# at the count size takes ~3 s, 8 hours for the two networks), and the training rows of its tally are scaled up.
COUNT_PARAMETERS = {"03": ("TRAIN_STEPS = 10", {"aggregator_train": 5000 / 10})}


def _folder(name: str) -> Path:
    path = ROOT / name
    if not path.is_dir():
        raise SystemExit(f"gpu_check needs {name}/ next to the package (a clone of the repository); not found at {path}")
    return path


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"benchmark_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_benchmark(name: str, tiny: bool, out: Path) -> dict:
    """One benchmarks/<name>.py GPU path (its --tiny twin on the CPU), timed against vanilla in its own process."""
    argv = ["--tiny" if tiny else BENCHMARKS[name], "--repeats", "1" if tiny else "3", "--out", str(out / f"{name}.json")]
    start = time.perf_counter()
    try:
        with torch.no_grad():
            result = _load(_folder("benchmarks") / f"{name}.py").main(argv)
        return {"ok": True, "seconds": time.perf_counter() - start, "result": result}
    except Exception:  # noqa: BLE001  (one broken path must not hide the others' numbers)
        return {"ok": False, "seconds": time.perf_counter() - start, "error": traceback.format_exc(limit=3)}


def _printed(cell, tag: str):
    for output in cell.get("outputs", []):
        for line in output.get("text", "").splitlines():
            if line.startswith(tag):
                return json.loads(line.split(maxsplit=1)[1])
    return None


def run_notebook(path: Path, model: str, tiny: bool, timeout: int = 900, count: bool = False) -> dict:
    """Execute a notebook's real-model branch on stand-ins in a fresh kernel; read its peak GPU memory there (and,
    with `count`, its work tally under DIFFNB_STANDIN=count)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(TALLY_CELL if count else PEAK_CELL))
    injected, scale = COUNT_PARAMETERS.get(path.name[:2], (None, {})) if count else (None, {})
    if injected:  # after the parameters cell, as papermill injects parameters
        first = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code" and "MODEL = " in c.source)
        nb.cells.insert(first + 1, nbformat.v4.new_code_cell(injected))
    env = {"DIFFNB_MODEL": model, "DIFFNB_STANDIN": "count" if count else "1" if tiny else "full"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    start = time.perf_counter()
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
        ok, error = True, None
    except Exception as e:  # noqa: BLE001
        ok, error = False, f"{type(e).__name__}: {str(e)[-2000:]}"
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    result = {"ok": ok, "seconds": time.perf_counter() - start, "error": error}
    if not count:
        return {**result, "peak_gpu_gib": _printed(nb.cells[-1], "DIFFNB_PEAK")}
    from .workload import real_flops, t4_seconds

    tally = _printed(nb.cells[-1], "DIFFNB_TALLY") if ok else None
    if tally is None:
        return {**result, "tally": None}
    if injected:
        tally = [[row[0], row[1], row[2], row[3] * scale.get(row[0], 1), *row[4:]] for row in tally]
        result["injected"] = {"cell": injected, "tally_scaled": scale}
    from .standin import count_divisor

    flops = real_flops(model, tally)
    return {**result, "tally": tally, "side_divisor": count_divisor(), "real_tflops": {k: v / 1e12 for k, v in flops.items()},
            "t4_minutes_estimated": {k: v / 60 for k, v in t4_seconds(model, tally).items()}}


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the same code paths on the CPU, small (for the tests)")
    p.add_argument("--count", action="store_true", help="no GPU: tally each notebook's real-default work on the "
                   "CPU and estimate its T4 time (no benchmarks)")
    p.add_argument("--benchmarks", default=",".join(BENCHMARKS), help="comma-separated; '' for none")
    p.add_argument("--notebooks", default="all", help="comma-separated prefixes (00,01,...), 'all' or '' for none")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--notebook-dir", type=Path, default=None, help="default: the repository's notebooks/")
    p.add_argument("--out", type=Path, default=ROOT / "build" / "gpu_check")
    p.add_argument("--cell-timeout", type=int, default=900, help="seconds a notebook cell may run")
    a = p.parse_args(argv)
    if a.count:
        a.benchmarks = ""
    elif not a.tiny and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --tiny for the CPU smoke run, or on a GPU machine")
    for name in filter(None, a.benchmarks.split(",")):
        if name not in BENCHMARKS:
            raise SystemExit(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}")
    models = [m for m in a.models.split(",") if m]
    if not set(models) <= set(MODELS):
        raise SystemExit(f"--models takes {MODELS}, got {models}")
    a.out.mkdir(parents=True, exist_ok=True)
    report = {"device": device_name(), "torch": torch.__version__, "tiny": a.tiny, "count": a.count,
              "benchmarks": {}, "notebooks": {}}
    try:
        import diffusers
        report["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    for name in filter(None, a.benchmarks.split(",")):
        report["benchmarks"][name] = run_benchmark(name, a.tiny, a.out)
        print(f"benchmark {name}: {'ok' if report['benchmarks'][name]['ok'] else 'FAILED'}", flush=True)
    report_path = a.out / ("workload.json" if a.count else "gpu_check.json")
    folder = a.notebook_dir or _folder("notebooks")
    notebooks = sorted(folder.glob("[0-9][0-9]_*.ipynb")) if a.notebooks else []
    if a.notebooks not in ("all", ""):
        wanted = a.notebooks.split(",")
        notebooks = [n for n in notebooks if n.name[:2] in wanted]
    for path in notebooks:
        for model in models:
            r = run_notebook(path, model, a.tiny, timeout=a.cell_timeout, count=a.count)
            report["notebooks"][f"{path.stem}:{model}"] = r
            if a.count:
                m = r.get("t4_minutes_estimated")
                t4 = "n/a" if m is None else f"{m['seconds']:.1f} min ({m['low']:.1f}-{m['high']:.1f})"
                what = f"T4 time ESTIMATED {t4}"
            else:
                what = "peak GPU " + ("n/a" if r["peak_gpu_gib"] is None else f"{r['peak_gpu_gib']:.1f} GiB")
            print(f"{path.stem} on {model}: {'ok' if r['ok'] else 'FAILED'}, {r['seconds']:.0f} s, {what}", flush=True)
            report_path.write_text(json.dumps(report, indent=1, default=str))  # after each notebook: a stop loses little
    report_path.write_text(json.dumps(report, indent=1, default=str))
    print("wrote", report_path)
    failed = [k for group in ("benchmarks", "notebooks") for k, v in report[group].items() if not v["ok"]]
    if failed:
        print("FAILED:", ", ".join(failed))
    report["failed"] = failed
    return report


if __name__ == "__main__":
    raise SystemExit(1 if main()["failed"] else 0)

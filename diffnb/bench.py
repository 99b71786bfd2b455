"""Time a method against the vanilla pipeline in the same process: warm-up, repeats, medians, a ratio."""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(fn, device="cpu", repeats: int = 3, warmup: int = 1) -> dict:
    for _ in range(warmup):
        fn()
    _sync(device)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "times_s": times,
            "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}


def compare(name: str, vanilla, method, device="cpu", repeats: int = 3, out: Path | None = None, **info) -> dict:
    """Time vanilla and the method in the same process on the same inputs, interleaved (v, m, v, m, ...) so that
    drift of a noisy machine hits both alike; report the ratio of medians (and peak memory on CUDA)."""
    base = {"times_s": [], "peak_mem_mb": None}
    meth = {"times_s": [], "peak_mem_mb": None}
    for fn in (vanilla, method):  # warm-up: first-call costs (allocations, kernels) are not the method's
        fn()
    for _ in range(repeats):
        for fn, rec in ((vanilla, base), (method, meth)):
            one = measure(fn, device, repeats=1, warmup=0)
            rec["times_s"] += one["times_s"]
            if one["peak_mem_mb"] is not None:
                rec["peak_mem_mb"] = max(rec["peak_mem_mb"] or 0.0, one["peak_mem_mb"])
    for rec in (base, meth):
        rec["median_s"] = statistics.median(rec["times_s"])
    dev = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    result = {"benchmark": name, "device": dev, "vanilla": base, "method": meth,
              "time_ratio": meth["median_s"] / base["median_s"],
              "mem_ratio": (meth["peak_mem_mb"] / base["peak_mem_mb"]) if base["peak_mem_mb"] else None, **info}
    print(f"{name}: vanilla {base['median_s']:.3f} s, method {meth['median_s']:.3f} s, ratio {result['time_ratio']:.2f}x on {dev}")
    if out:
        save_result(result, out)
    return result


def save_result(result: dict, path: Path | str) -> Path:
    """Write a benchmark's result as indented JSON (folders made as needed) and say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print("wrote", path)
    return path


def benchmark_parser(gpu_flag: str, gpu_help: str) -> argparse.ArgumentParser:
    """The shared CLI of benchmarks/*.py: a GPU flag, --tiny (that flag's code path on a tiny pipeline, on CPU,
    so the tests can run it), --repeats and --out."""
    p = argparse.ArgumentParser()
    g = p.add_mutually_exclusive_group()
    g.add_argument(f"--{gpu_flag}", action="store_true", help=gpu_help)
    g.add_argument("--tiny", action="store_true", help=f"the --{gpu_flag} code path on a tiny random pipeline, on CPU")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    return p

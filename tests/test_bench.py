import time

import pytest

from diffnb.bench import compare
from diffnb.models import toy_is_trained


def test_compare_interleaves_and_reports_the_ratio(tmp_path):
    calls = []
    vanilla = lambda: (calls.append("v"), time.sleep(0.01))
    method = lambda: (calls.append("m"), time.sleep(0.03))
    r = compare("sleep", vanilla, method, repeats=3, out=tmp_path / "r.json", setting="test")
    assert calls == ["v", "m"] * 4  # warm-up of both, then alternating
    assert 2.0 < r["time_ratio"] < 4.5 and r["setting"] == "test" and (tmp_path / "r.json").exists()
    assert len(r["vanilla"]["times_s"]) == 3 and r["mem_ratio"] is None


def load_benchmark(name: str):
    """A script from benchmarks/ as a module (the folder is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_emerdiff_benchmark_gpu_path_runs_on_a_tiny_pipeline(tmp_path):
    r = load_benchmark("emerdiff").main(["--tiny", "--repeats", "1", "--out", str(tmp_path / "e.json")])
    assert (tmp_path / "e.json").exists() and r["seconds_per_segmentation"] > 0
    assert r["time_ratio"] > 1  # 2K+1 runs from t_m plus an inversion cost more than one generation


def test_consistory_benchmark_gpu_path_runs_on_a_tiny_pipeline(tmp_path):
    r = load_benchmark("consistory").main(["--tiny", "--repeats", "1", "--out", str(tmp_path / "c.json")])
    assert (tmp_path / "c.json").exists() and r["images"] == 4
    assert r["time_ratio"] > 1  # the second pass alone costs a generation


@pytest.mark.skipif(not toy_is_trained(), reason="toy model not trained")
def test_toy_benchmarks_run_and_write(tmp_path):
    """The scripts behind the README's toy rows, on one set / render each, so that they cannot rot unnoticed."""
    c = load_benchmark("consistory_toy").main(["--sets", "1", "--ablations", "vanilla,sdsa", "--out", str(tmp_path / "c.json")])
    assert set(c["ablations"]) == {"vanilla", "sdsa"} and 0 <= c["ablations"]["sdsa"]["identity_agreement"] <= 1
    e = load_benchmark("emerdiff_toy").main(["--renders", "1", "--out", str(tmp_path / "e.json")])
    assert all(0 <= v["emerdiff_miou"] <= 1 and 0 <= v["baseline_miou"] <= 1 for v in e["variants"].values())
    s = load_benchmark("style_aligned_toy").main(["--sets", "1", "--out", str(tmp_path / "s.json")])
    assert all(0 <= v["style_agreement"] <= 1 for v in s["variants"].values())
    assert all((tmp_path / f).exists() for f in ("c.json", "e.json", "s.json"))


def test_style_aligned_speed_benchmark_reports_the_ratio_and_its_floor(tmp_path):
    """The toy path of benchmarks/style_aligned.py (the issue-18 speed bar): the method's ratio and the floor's."""
    r = load_benchmark("style_aligned").main(["--repeats", "1", "--out", str(tmp_path / "sa.json")])
    assert r["benchmark"] == "style_aligned_toy" and len(r["method"]["times_s"]) == 1
    assert 1.0 < r["doubled_keys_only_ratio"] < 4 and 1.0 < r["time_ratio"] < 5  # twice the keys cost something
    assert r["official_formulation_ratio"] > 1.0 and r["official_formulation_max_abs_diff"] < 1e-3  # same math
    assert (tmp_path / "sa.json").exists()

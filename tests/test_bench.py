import time

from diffnb.bench import compare


def test_compare_interleaves_and_reports_the_ratio(tmp_path):
    calls = []
    vanilla = lambda: (calls.append("v"), time.sleep(0.01))
    method = lambda: (calls.append("m"), time.sleep(0.03))
    r = compare("sleep", vanilla, method, repeats=3, out=tmp_path / "r.json", setting="test")
    assert calls == ["v", "m"] * 4  # warm-up of both, then alternating
    assert 2.0 < r["time_ratio"] < 4.5 and r["setting"] == "test" and (tmp_path / "r.json").exists()
    assert len(r["vanilla"]["times_s"]) == 3 and r["mem_ratio"] is None

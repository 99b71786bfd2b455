"""The GPU check runs its code paths on the CPU with --tiny, so it cannot rot before a GPU is lent."""
import json

from diffnb import gpu_check


def _notebook(folder, name, code):
    import nbformat

    folder.mkdir(exist_ok=True)
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)]), folder / name)


def test_gpu_check_tiny_writes_one_json(tmp_path):
    """Its machinery on a one-cell notebook (the real notebooks run on stand-ins under nbmake in `make test`)."""
    nbs = tmp_path / "nbs"
    _notebook(nbs, "00_ok.ipynb", "import os\nfrom diffnb.models import load_pipeline, spec\n"
              "pipe = load_pipeline(os.environ['DIFFNB_MODEL'])\ns = spec(os.environ['DIFFNB_MODEL'])\n"
              "pipe('a photo', num_inference_steps=2, height=s.resolution, width=s.resolution)")
    _notebook(nbs, "01_broken.ipynb", "raise RuntimeError('this cell fails')")
    r = gpu_check.main(["--tiny", "--benchmarks", "emerdiff", "--notebook-dir", str(nbs), "--models", "sdxl",
                        "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["device"].startswith("cpu") and saved["tiny"] is True
    assert saved["benchmarks"]["emerdiff"]["ok"], saved["benchmarks"]["emerdiff"].get("error")
    nb = saved["notebooks"]["00_ok:sdxl"]
    assert nb["ok"], nb["error"]
    assert nb["peak_gpu_gib"] is None  # read inside the notebook's kernel; None without CUDA
    assert "this cell fails" in saved["notebooks"]["01_broken:sdxl"]["error"]
    assert r["failed"] == ["01_broken:sdxl"]


def test_gpu_check_refuses_a_cpu_run_without_tiny(monkeypatch):
    import pytest

    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        gpu_check.main([])

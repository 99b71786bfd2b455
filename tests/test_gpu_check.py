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
    r = gpu_check.main(["--tiny", "--benchmarks", "emerdiff", "--notebook-dir", str(nbs), "--models", "sd15,sdxl",
                        "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["device"].startswith("cpu") and saved["tiny"] is True
    assert saved["benchmarks"]["emerdiff"]["ok"], saved["benchmarks"]["emerdiff"].get("error")
    nb = saved["notebooks"]["00_ok:sdxl"]
    assert nb["ok"], nb["error"]
    assert saved["notebooks"]["00_ok:sd15"]["ok"]  # the second model runs the notebook, not the report
    assert nb["peak_gpu_gib"] is None  # read inside the notebook's kernel; None without CUDA
    assert "this cell fails" in saved["notebooks"]["01_broken:sdxl"]["error"]
    assert r["failed"] == ["01_broken:sd15", "01_broken:sdxl"]


def test_gpu_check_refuses_a_cpu_run_without_tiny(monkeypatch):
    import pytest

    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        gpu_check.main([])


def test_gpu_check_count_tallies_the_real_work_and_prices_it(tmp_path):
    """--count runs the real counts and steps (image side ÷ 4) and tallies every UNet item and VAE image: one SD1.5
    call of 3 steps on 2 prompts under guidance is 3 x 2 x 2 = 12 UNet items at the stand-in's latent side (512 / 4
    / 8 = 16) and 2 decodes, priced at the real side (64)."""
    nbs = tmp_path / "nbs"
    _notebook(nbs, "00_count.ipynb", "import os\nfrom diffnb.models import load_pipeline, spec\n"
              "pipe = load_pipeline(os.environ['DIFFNB_MODEL'])\ns = spec(os.environ['DIFFNB_MODEL'])\n"
              "assert s.steps == 50 and s.resolution == 128, s\n"
              "pipe(['a photo', 'a dog'], num_inference_steps=3, height=s.resolution, width=s.resolution)")
    r = gpu_check.main(["--count", "--notebook-dir", str(nbs), "--models", "sd15", "--out", str(tmp_path)])
    nb = json.loads((tmp_path / "workload.json").read_text())["notebooks"]["00_count:sd15"]
    assert nb["ok"], nb["error"]
    assert sorted(map(tuple, nb["tally"])) == [("unet", 16, 16, 12), ("vae_decode", 16, 16, 2)]
    from diffnb.workload import T4_ANCHOR, flops_per_item

    unet = flops_per_item("sd15", "unet", 64, 64)
    assert abs(nb["real_tflops"]["unet"] - 12 * unet / 1e12) < 1e-6
    # 12 UNet items are 1.5 anchor iterations; the 2 decodes (about 3 UNet items each in FLOPs) add about half
    seconds = nb["t4_minutes_estimated"]["seconds"] * 60
    assert 1.5 / T4_ANCHOR["iterations_per_second"] < seconds < 3 / T4_ANCHOR["iterations_per_second"]
    assert r["failed"] == []

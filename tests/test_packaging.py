"""A Colab install must not replace Colab's torch or ipywidgets, and conda users get the same ranges."""
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _deps():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def test_no_upper_cap_on_torch_and_colab_ipywidgets_accepted():
    deps = {re.split(r"[<>=!~ ]", d)[0]: d for d in _deps()}
    assert "<" not in deps["torch"], deps["torch"]  # a newer Colab torch must satisfy it as it is
    floor = re.search(r">=\s*([\d.]+)", deps["ipywidgets"]).group(1)
    assert tuple(map(int, floor.split("."))) <= (7, 7), deps["ipywidgets"]  # Colab ships ipywidgets 7.7


def test_environment_yml_has_the_same_ranges():
    env = (ROOT / "environment.yml").read_text()
    for dep in _deps():
        assert f'"{dep}"' in env, dep

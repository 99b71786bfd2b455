"""Notebooks are committed without outputs (nbstripout): small diffs, no stale widget state."""
import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_no_outputs(path):
    nb = json.loads(path.read_text())
    dirty = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count"))]
    assert not dirty, f"{path.name}: cells {dirty} have outputs; run `nbstripout {path}`"
    assert "widgets" not in nb.get("metadata", {}), f"{path.name} carries widget state; run nbstripout"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_follows_skeleton(path):
    """Colab form field in a parameters cell that holds only parameters (so `papermill -p MODEL sd15` is consistent),
    with the estimated real-model memory; the next cell derives every setting from the model name."""
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    params = [i for i, c in enumerate(code) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"
    cell, derived = ("".join(code[i]["source"]) for i in (params[0], params[0] + 1))
    assert 'MODEL = "toy"  #@param ["toy", "sd15", "sdxl"]' in cell, f"{path.name}: the Colab form field"
    for derivation in ("if MODEL", "os.environ", "spec(", "REGISTRY"):
        assert derivation not in cell, f"{path.name}: {derivation!r} belongs in the cell after the parameters"
    assert "estimated" in cell.lower() and "GB" in cell, f"{path.name}: state the estimated peak GPU / host memory"
    assert 'MODEL = os.environ.get("DIFFNB_MODEL", MODEL)' in derived and "spec(MODEL)" in derived, path.name
    assert "REGISTRY[MODEL]" not in "\n".join("".join(c["source"]) for c in code), f"{path.name}: use spec(MODEL)"

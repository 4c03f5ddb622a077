"""The colab demo (experiments/colab/mmsafe_demo.ipynb) runs top to bottom on its
own smoke budget (its `SMOKE` parameter) and draws its figures."""

import os
import re

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "experiments", "colab",
                        "mmsafe_demo.ipynb")


def test_notebook_is_saved_without_outputs():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  for cell in notebook.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None


@pytest.mark.slow
def test_demo_runs_on_its_smoke_budget_and_produces_its_figures(tmp_path):
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  [index] = [i for i, c in enumerate(notebook.cells)
             if "parameters" in c.metadata.get("tags", [])]
  assert re.search(r"^SMOKE = False", notebook.cells[index].source, flags=re.M)
  # As papermill does: a cell after the parameters that sets some of them.
  notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(
      f"SMOKE = True\nWORKDIR = {str(tmp_path)!r}"))
  client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError on any failing cell
  outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
  assert "dataset: mfeat" in text  # the smoke budget took over "auto"
  assert len(images) >= 4, (f"expected the attack curves, certified curves and 2 heat maps; "
                            f"got {len(images)}")
  assert "jt: test accuracy" in text and "crmt: test accuracy" in text
  assert re.search(r"crmt\s+sound: mean radius [\d.]+, attack broke 0/", text), text[-2000:]
  assert re.search(r"jt\s+sound: mean radius [\d.]+, attack broke 0/", text), text[-2000:]
  # The Lipschitz-encoder section: both models certified, no sound radius broken.
  for name in ("jt", "crmt_cert"):
    assert f"{name} (lipschitz): test accuracy" in text
    assert re.search(rf"{name} \(lipschitz\): clean [\d.]+ .*\(attack broke 0/\d+ radii\)",
                     text), text[-2000:]
  assert len(images) >= 5

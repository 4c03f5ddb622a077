"""The colab demo (experiments/colab/mmsafe_demo.ipynb) runs top to bottom on a
reduced budget (its parameters cell replaced) and draws its figures."""

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
def test_demo_runs_on_a_reduced_budget_and_produces_its_figures(tmp_path):
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  [parameters] = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
  names = set(re.findall(r"^([A-Z_]+) =", parameters.source, flags=re.M))
  reduced = {"DATASET": '"mfeat"', "NUM_EPOCHS": "1", "PROTOCOL": '"fast"',
             "UNI_EPS": "(1.0,)", "EVAL_EXAMPLES": "64", "ATTACK_STEPS": "5",
             "WORKDIR": repr(str(tmp_path))}
  assert set(reduced) == names, "update the test's reduced budget with the notebook's parameters"
  parameters.source = "\n".join(f"{k} = {v}" for k, v in reduced.items())
  client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError on any failing cell
  outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
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

"""What `experiments.reproduce` evaluates and trains besides the base config:
the robustness suite and certification presets of `evals.py`, and the
transformer part's configs of `mmt.py` (Table 3)."""

from experiments.configs import evals, mmt
from mmsafe.paper import reproduction, runs


def get_presets(dataset: str) -> runs.Presets:
  """The presets of a reproduction on `dataset`."""
  return runs.Presets(
      robustness=evals.get_config("robustness").to_dict()["robustness"],
      certify=evals.get_config("certify").to_dict()["certify"],
      transformer={method: mmt.get_config(f"{method},{dataset}")
                   for method in reproduction.TRANSFORMER_METHODS})

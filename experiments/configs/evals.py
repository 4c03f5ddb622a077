r"""Evaluator configs (`mmsafe.eval.registry`): name -> dict(type=..., ...).

Used by `experiments.evaluate` / `experiments.certify` on a trained run, and
as `config.evals` of a training config (evaluators with `every_steps` > 0 then
run inside training). The arg is a comma-separated list of:

  robustness  (default) the robustness suite on the test split: clean,
              FGM / l2-PGD multi-modal (eps 0.125..1) and uni-modal (eps
              0.25..2) under the "default" protocol, missing modality (zeros
              fill), decoupling attack (l0 fractions 0.25%..5%).
  paper       the suite at the paper's budgets only (multi-modal 0.5,
              uni-modal 1.0; CRMT Tables 1-2), without the decoupling attack.
  certify     certified radii of every Lipschitz kind on the test split, in
              input units (raw features, pixel/255), each radius attacked
              (l2-PGD in input units, 100 steps x 5 restarts).
  sweep       PGD steps x restarts sweep at 1x and 4x the paper's budgets.

Every suite and sweep config takes `defence` ("none"; "msefm": an MSEFM model
evaluated behind its test-time feature-memory reconstruction, attacks
included; `mmsafe.eval.base`). Certificates take only "none".

Override any value on the command line, e.g.
  --evals=experiments/configs/evals.py:robustness,certify \
  --evals.robustness.protocol=fast --evals.robustness.multi_eps="(0.5, 1.0)" \
  --evals.robustness.box=True --evals.certify.kinds="('sound',)" \
  --evals.robustness.defence=msefm
"""

import ml_collections
from ml_collections import config_dict

# Defaults shared by the suite configs (the former experiments.evaluate flags).
_SUITE = dict(
    type="robustness", split="test", protocol="default",
    multi_eps=(0.125, 0.25, 0.5, 1.0), uni_eps=(0.25, 0.5, 1.0, 2.0), attacks=("fgm", "pgd"),
    missing_fills=("zeros",),
    decoupling_fractions=(0.0025, 0.005, 0.0116, 0.025, 0.05), decoupling_scopes=("multi",),
    decoupling={"max_change": 2.0, "rounds": 8, "steps_per_round": 10},
    box=False, batch_size=256, max_examples=0, fill_examples=0, seed=0, defence="none",
    # PGD does not attack an example at an eps below its sound certified radius
    # (it cannot be broken there: same numbers, less work).
    skip_certified=True,
    # Which examples each measurement finds correct / robust, for statistics over
    # test examples (experiments.reproduce).
    per_example=False)


def _suite(**changes) -> dict:
  # uni_modalities None (each modality) stays overridable as a tuple, e.g. "()": none.
  return dict(_SUITE, uni_modalities=config_dict.placeholder(tuple), **changes)


def _robustness() -> dict:
  return {"robustness": _suite()}


def _paper() -> dict:
  return {"robustness": _suite(multi_eps=(), uni_eps=(), decoupling_fractions=())}


def _certify() -> dict:
  return {"certify": dict(
      type="certify", split="test", kinds=("local", "empirical", "sound"),
      empirical_split="train", batch_size=100, max_examples=0, mode="auto", chunk_size=0,
      power_iterations=300, failure_probability=1e-6, attack_steps=100, attack_restarts=5,
      num_thresholds=101, seed=0,
      # Radii in the input units a user perturbs (raw features, pixel/255);
      # "normalised": in the model's standardised input space.
      units="input")}


def _sweep() -> dict:
  return {"sweep": dict(
      type="sweep", split="test", protocol="default", scales=(1.0, 4.0),
      steps=(4, 10, 20, 50, 100), restarts=(1, 3, 5), loss="ce", random_start=False,
      batch_size=256, max_examples=0, seed=0, defence="none")}


CONFIGS = {"robustness": _robustness, "paper": _paper, "certify": _certify, "sweep": _sweep}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The evaluators of the comma-separated names in `arg` (default: robustness)."""
  evals = {}
  for name in (arg or "robustness").split(","):
    if name not in CONFIGS:
      raise ValueError(f"evals config: expected names among {sorted(CONFIGS)}, got {name!r}")
    evals.update(CONFIGS[name]())
  return ml_collections.ConfigDict(evals)

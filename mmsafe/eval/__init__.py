"""Evaluation of trained models, inside training and offline.

* `evaluators`: `build_evaluators(config.evals, ...)` makes one evaluator per
  `config.evals.<name> = dict(type=..., ...)` ("clean", "fgm", "pgd",
  "missing", "decoupling", "robustness", "certify", "sweep"), each with
  `run(variables) -> metrics` (compiled once); `scalar_metrics` flattens the
  metrics the training loop logs.
* `robustness`: the robustness suite (clean, FGM / l2-PGD multi- and
  uni-modal, missing modality, decoupling), one class per kind;
  `evaluate_robustness` composes them; `StrengthSweep` / `pgd_strength_sweep`.
* `certification`: whole-split certification checked by attacks
  (`Certification`, `run_certification`).
* `report`, `plots`: their reports and plots (JSON, markdown, PNG).
"""

from mmsafe.eval.certification import (Certification, certify_dataset, make_radius_attack,
                                       run_certification)
from mmsafe.eval.evaluators import EVALUATOR_TYPES, Evaluator, build_evaluators, scalar_metrics
from mmsafe.eval.robustness import (SuiteConfig, StrengthSweep, evaluate_robustness,
                                    logits_apply, pgd_strength_sweep)

__all__ = ["EVALUATOR_TYPES", "Certification", "Evaluator", "StrengthSweep", "SuiteConfig",
           "build_evaluators", "certify_dataset", "evaluate_robustness", "logits_apply",
           "make_radius_attack", "pgd_strength_sweep", "run_certification", "scalar_metrics"]

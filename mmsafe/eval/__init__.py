"""Evaluation of trained models, inside training and offline.

* `registry`: `build_evaluators(config.evals, ...)` makes one evaluator per
  `config.evals.<name> = dict(type=..., ...)`, each with
  `run(variables) -> metrics` (compiled once); `scalar_metrics` flattens the
  metrics the training loop logs.
* One module per evaluator type, each built from fixed keyword arguments:
  `clean`, `fgm` and `pgd` (their shared part: `attack`), `missing`,
  `decoupling`, `certify`, `sweep`; `suite` (type "robustness") merges clean,
  FGM / PGD, missing and decoupling into the robustness report's input.
  `base`: the common keys, defence and checks; `batching`: running a compiled
  program over a split, per-example flags.
* `certification`: whole-split certification checked by attacks
  (`Certification`, `run_certification`); `radius_attack`: that attack.
* `report`, `plots`: their reports and plots (JSON, markdown, PNG).
"""

from mmsafe.eval.base import Evaluator, logits_apply
from mmsafe.eval.certification import Certification, certify_dataset, run_certification
from mmsafe.eval.radius_attack import make_radius_attack
from mmsafe.eval.registry import EVALUATOR_TYPES, build_evaluators, scalar_metrics

__all__ = ["EVALUATOR_TYPES", "Certification", "Evaluator", "build_evaluators",
           "certify_dataset", "logits_apply", "make_radius_attack", "run_certification",
           "scalar_metrics"]

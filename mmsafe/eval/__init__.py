"""Evaluation of trained models: the robustness suite (clean, FGM / l2-PGD
multi- and uni-modal, missing modality, decoupling), whole-split certification
checked by attacks, and their reports and plots (JSON, markdown, PNG)."""

from mmsafe.eval.certification import certify_dataset, make_radius_attack, run_certification
from mmsafe.eval.robustness import (SuiteConfig, evaluate_robustness, logits_apply,
                                    pgd_strength_sweep)

__all__ = ["SuiteConfig", "certify_dataset", "evaluate_robustness",
           "logits_apply", "make_radius_attack", "pgd_strength_sweep", "run_certification"]

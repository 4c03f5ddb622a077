"""Certified robustness of multi-modal models (CRMT, ICLR 2024, Sec. 3).

* `lipschitz`: Lipschitz constants of the uni-modal scores / margins of three
  kinds -- "local" (`local_lipschitz`, `local_constants`), "empirical"
  (`empirical_constants`) and "sound" (`sound_constants`, `encoder_lipschitz`:
  composed from the bounds each encoder layer states, `mmsafe.models.layers`;
  `operator_norm` and friends live in `mmsafe.models.operator_norms`).
* `bounds`: `certified_radius` (Thm 3.3, Thm 3.5, Prop 3.4, vulnerability
  indicators) and `certify` (model + kind -> `Certificate`).
* `curves`: certified accuracy versus radius, mean radius, eta ratios.
"""

from mmsafe.certify.bounds import (Certificate, certified_radius, certify, concatenate,
                                   lipschitz_constants, pair_lipschitz, radius_from_scores)
from mmsafe.certify.curves import (certified_accuracy, eta_ratio, mean_radius, radius_grid,
                                   summarize, unimodal_certified_accuracy)
from mmsafe.certify.lipschitz import (KINDS, LipschitzConstants, empirical_constants,
                                      encoder_lipschitz, integration_factors, jacobian_norms,
                                      local_constants, local_lipschitz, model_score_fn,
                                      sound_constants)
from mmsafe.models.operator_norms import (ROUNDING_MARGIN, BoundOptions, avg_pool_operator_norm,
                                          conv_operator_norm, max_pool_lipschitz, operator_norm,
                                          power_iteration_factor)

__all__ = [
    "KINDS", "ROUNDING_MARGIN", "BoundOptions", "Certificate", "LipschitzConstants",
    "avg_pool_operator_norm", "certified_accuracy", "certified_radius", "certify", "concatenate",
    "conv_operator_norm", "empirical_constants", "encoder_lipschitz", "eta_ratio",
    "integration_factors", "jacobian_norms", "lipschitz_constants", "local_constants",
    "local_lipschitz", "max_pool_lipschitz", "mean_radius", "model_score_fn", "operator_norm",
    "pair_lipschitz", "power_iteration_factor", "radius_from_scores", "radius_grid",
    "sound_constants", "summarize", "unimodal_certified_accuracy",
]

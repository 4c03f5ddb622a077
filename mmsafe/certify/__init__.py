"""Certified robustness of multi-modal models (CRMT, ICLR 2024, Sec. 3).

* `constants`: `LipschitzConstants` (the Lipschitz constants of the uni-modal
  scores / margins and their representation), `KINDS`, `integration_factors`
  (CRMT eq. 3) and `head_params`.
* `local`: kinds "local" (`jacobian_norms`, `local_lipschitz`,
  `local_constants`, `model_score_fn`) and "empirical"
  (`empirical_constants`): estimates from per-example Jacobians.
* `sound`: kind "sound" (`sound_constants`, `encoder_lipschitz`): composed
  from the bounds each encoder layer states, `mmsafe.models.layers`;
  `operator_norm` and friends live in `mmsafe.models.operator_norms`.
* `bounds`: `Certificate`, `certified_radius` (Thm 3.3, Thm 3.5, Prop 3.4,
  vulnerability indicators), `pair_lipschitz`, `concatenate`.
* `certifier`: `lipschitz_constants` (a kind's constants for a model) and
  `certify` (model + kind -> `Certificate`).
* `curves`: certified accuracy versus radius, mean radius, eta ratios.
* `threats`: the radius per threat model from one certificate (joint,
  one modality, the worst modality) and the certified missing-modality
  outcome (`threat_radii`, `missing_certified`).
* `units`: the units of radii, normalised (standardised) input space or the
  input units a user perturbs (raw features, pixel/255): `input_scales`
  (`certify(..., input_scale=input_scales(dataset.stats))`), the one rule for every
  certificate.

Probabilistic certificates (beyond the paper), on any `logits_fn`:

* `smoothing`: randomized smoothing (Cohen et al., ICML 2019) with a noise
  level per modality: `smoothing.certify` (CERTIFY; joint-l2, per-modality
  and ellipsoid radii), `smoothing.predict` (PREDICT).
* `ablation`: the modality-ablation certificate (MMCert, Wang et al., CVPR
  2024): `ablation.certify` bounds the changed entries per modality and in
  total that cannot change the vote.
* `votes`: their Monte-Carlo votes (chunked, jitted, reproducible from a key)
  and binomial bounds.
"""

from mmsafe.certify import ablation, smoothing, threats, units, votes
from mmsafe.certify.ablation import AblationCertificate
from mmsafe.certify.bounds import (Certificate, certified_radius, concatenate, pair_lipschitz,
                                   radius_from_scores)
from mmsafe.certify.certifier import certify, lipschitz_constants
from mmsafe.certify.constants import KINDS, LipschitzConstants, head_params, integration_factors
from mmsafe.certify.curves import (certified_accuracy, certified_at, eta_ratio, mean_radius,
                                   radius_grid, summarize, unimodal_certified_accuracy)
from mmsafe.certify.local import (empirical_constants, jacobian_norms, local_constants,
                                  local_lipschitz, model_score_fn)
from mmsafe.certify.smoothing import SmoothedCertificate
from mmsafe.certify.sound import encoder_lipschitz, sound_constants
from mmsafe.certify.units import input_scales
from mmsafe.models.operator_norms import (ROUNDING_MARGIN, BoundOptions, avg_pool_operator_norm,
                                          conv_operator_norm, max_pool_lipschitz, operator_norm,
                                          power_iteration_factor)

__all__ = [
    "AblationCertificate", "SmoothedCertificate", "ablation", "smoothing", "threats", "units",
    "votes",
    "KINDS", "ROUNDING_MARGIN", "BoundOptions", "Certificate", "LipschitzConstants",
    "avg_pool_operator_norm", "certified_accuracy", "certified_at", "certified_radius", "certify",
    "concatenate",
    "conv_operator_norm", "empirical_constants", "encoder_lipschitz", "eta_ratio", "head_params",
    "input_scales",
    "integration_factors", "jacobian_norms", "lipschitz_constants", "local_constants",
    "local_lipschitz", "max_pool_lipschitz", "mean_radius", "model_score_fn", "operator_norm",
    "pair_lipschitz", "power_iteration_factor", "radius_from_scores", "radius_grid",
    "sound_constants", "summarize", "unimodal_certified_accuracy",
]

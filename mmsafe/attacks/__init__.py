"""Attacks on multi-modal models: l2 FGM and PGD (joint budget over any subset of
modalities), missing modality, and the MUROAN decoupling (l0) attack.

Every attack takes `logits_fn` (dict modality -> [B, ...] to fused logits
[B, K], closing over the model variables), so it works on any JAX model; all
are pure and jit-able. The iterative ones (PGD, decoupling) take a loop
strategy (`mmsafe.attacks.engine`): a host loop over steps compiled once (the
fast one on XLA:CPU, the default there for concrete inputs) or `lax` loops
(traceable, e.g. inside a jitted train step).
"""

from mmsafe.attacks.common import (LOSSES, joint_norm, normalize_l2, normalized_bounds,
                                   project_l2, random_l2_ball, resolve_modalities)
from mmsafe.attacks.decoupling import budget as decoupling_budget
from mmsafe.attacks.decoupling import decoupling
from mmsafe.attacks.fgm import fgm
from mmsafe.attacks.missing import FILLS, drop_modality
from mmsafe.attacks.pgd import PROTOCOLS, PGDProtocol, get_protocol, pgd

__all__ = [
    "FILLS", "LOSSES", "PGDProtocol", "PROTOCOLS", "decoupling", "decoupling_budget",
    "drop_modality", "fgm", "get_protocol", "joint_norm", "normalize_l2", "normalized_bounds",
    "pgd", "project_l2", "random_l2_ball", "resolve_modalities",
]

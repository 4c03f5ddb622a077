"""The attack that checks certified radii: l2-PGD strictly inside each radius.

A success inside a sound radius would be a bug in the certificate; for local
and empirical radii (estimates) it measures how often they are wrong.
`mmsafe.eval.certification.Certification.attack_check` runs it over a split.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mmsafe import attacks
from mmsafe.attacks.common import joint_norm, misclassified

# Attacks search the open ball of radius (1 - INSIDE) r(x).
INSIDE = 1e-4


def make_radius_attack(logits_apply, *, steps: int, restarts: int, modality: str | None = None):
  """A jitted `attack(variables, inputs, labels, radius, key, unit_stats=None) ->
  (attacked [B], broken [B])` for `logits_apply(variables, inputs) -> [B, K]`.

  Searches for a misclassified point strictly inside each sample's radius
  (joint, or of `modality` alone: a uni-modal radius) with
  `mmsafe.attacks.pgd`: per-example budgets `eps = (1 - 1e-4) r(x)`, margin
  loss, `steps` steps of `2.5 eps / steps`, `restarts` random restarts, the
  worst iterate kept. Samples that are misclassified, or whose radius is 0 or
  infinite, are not attacked. `broken` marks attacked samples for which a
  misclassified point was found strictly inside the ball (its norm is checked,
  allowing for float32 rounding of the attacked point).
  `unit_stats` (modality -> `(mean, std)` in input units,
  `units.unit_standardization`): the ball is in input units, the attack moves
  `u = x std + mean` and the model reads `(u - mean) / std`; None: the ball is
  in the model's normalised input space. The variables are an argument, not
  constants of the compiled program (XLA would otherwise fold e.g. the AOL
  rescaling of every layer at compile time).
  """

  def attack(variables, inputs, labels, radius, key, unit_stats):
    logits_fn = lambda x: logits_apply(variables, x)
    if unit_stats is not None:  # attack u, the inputs in input units
      inputs = {m: x * unit_stats[m][1] + unit_stats[m][0] for m, x in inputs.items()}
      logits_fn = lambda u: logits_apply(variables, {m: (v - unit_stats[m][0]) / unit_stats[m][1]
                                                     for m, v in u.items()})
    correct = ~misclassified(logits_fn(inputs), labels)
    attacked = correct & (radius > 0) & jnp.isfinite(radius)
    eps = jnp.where(attacked, radius * (1.0 - INSIDE), 0.0)
    adversarial = attacks.pgd(logits_fn, inputs, labels, key, eps=eps, steps=steps,
                              restarts=restarts, random_start=True, loss="margin",
                              modalities=modality)
    delta = joint_norm({m: adversarial[m] - inputs[m] for m in inputs})
    # Storing `inputs + delta` in float32 moves the point by up to float32's
    # epsilon times its norm: in input units (pixels near 0.5) that can exceed the
    # 1e-4 r margin of a small radius. A flip counts only strictly inside r.
    rounding = jnp.finfo(jnp.float32).eps * joint_norm(adversarial)
    flipped = misclassified(logits_fn(adversarial), labels) & (delta < radius)
    return attacked, attacked & flipped, delta - eps - rounding

  jitted = jax.jit(attack)

  def attack_batch(variables, inputs, labels, radius, key, unit_stats=None):
    attacked, broken, excess = jitted(variables, inputs, jnp.asarray(labels),
                                      jnp.asarray(radius, jnp.float32), key, unit_stats)
    if float(jnp.max(excess)) > 1e-5 * float(jnp.max(jnp.asarray(radius))) + 1e-6:
      raise AssertionError(f"attack left the ball: max excess {float(jnp.max(excess))}")
    return np.asarray(attacked), np.asarray(broken)

  return attack_batch

"""Robust accuracy against l2-PGD (type "pgd"; the chosen `PGDProtocol`'s
strength): per example, the worst case over the grid up to each eps and over
the protocol's losses and restarts. Definitions: `mmsafe.eval.attack`.

Only undecided examples are attacked: one misclassified clean, broken at a
smaller eps, or broken by an earlier loss or restart at this eps is not robust
at this eps whatever a further attack finds, so it is skipped; and given sound
certified radii (`skip_certified`), one whose radius exceeds eps (by
`CERTIFIED_SLACK`) is robust at eps whatever any attack tries, so it is skipped
too. Each restart runs on its own (`pgd(restarts=1, restart_offset=r)`) on the
remaining examples, batched by `over_rows`. The `accuracy` curve is the one
attacking every example at every eps with every loss and restart would give
(up to the random starts, which depend on the batch). `mean_norm` is the mean,
over the clean-correct examples, of the l2 norm of the perturbation found
within each eps (for an example broken earlier, the one that broke it);
`num_certified` counts the clean-correct examples certified at each eps (None
without certified radii).
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmsafe import attacks
from mmsafe import certify as certify_lib
from mmsafe import models
from mmsafe.attacks import engine
from mmsafe.eval import base
from mmsafe.eval import certification
from mmsafe.eval.attack import AttackEvaluator
from mmsafe.eval.batching import MULTI, balanced_batch_size, over_rows, task_key

# A certified radius decides an example robust at eps only when it exceeds eps by
# more than this relative margin (float32 rounding of the margins and constants).
CERTIFIED_SLACK = 1e-4


class PGD(AttackEvaluator):
  """Robust accuracy against l2-PGD over the eps grids (keys: `AttackEvaluator`).

  Args:
    skip_certified: compute the model's sound certified radii first and do not
      attack an example at an eps its radius exceeds (same numbers, up to the
      sound bounds' own failure probability; off behind a defence and for a
      model that states no Lipschitz bound).
    loop: loop strategy of PGD (`mmsafe.attacks.engine.LOOPS`).
  """

  type = "pgd"

  def __init__(self, *, skip_certified: bool = True, loop: str = "auto", **attack):
    self.skip_certified = base.flag(skip_certified, "skip_certified")
    super().__init__(**attack)
    self.loop = engine.resolve(loop)

  def _attack(self, variables, inputs, labels, key, value, scope, loop):
    """Restart `r` of the protocol's attack with its `l`-th loss at radius
    `eps`, for `value = (eps, r, l)`: one program for every loss."""
    eps, restart, loss_index = value
    kwargs = dict(self.protocol.pgd_kwargs(eps), loss_index=loss_index, restarts=1,
                  restart_offset=restart)
    _, info = attacks.pgd(jax.tree_util.Partial(self.apply_fn, variables), inputs, labels, key,
                          modalities=None if scope == MULTI else scope, bounds=self.bounds,
                          return_info=True, loop=loop, **kwargs)
    return info["misclassified"], info["norm"]

  def _curve(self, variables, correct, scope, grid, first_index, progress, certified_radius):
    inputs, labels = self.data.inputs, self.data.labels
    batches = math.ceil(len(labels) / balanced_batch_size(len(labels), self.batch_size))
    broken, norm = ~correct, np.zeros(len(labels))
    robust, norms, num_certified = [], [], []
    for i, eps in enumerate(grid):
      certified = np.zeros(len(labels), bool)
      if certified_radius is not None:
        certified = certified_radius > eps * (1 + CERTIFIED_SLACK)
        num_certified.append(int((correct & certified).sum()))
      for loss_index in range(len(self.protocol.losses)):
        for restart in range(self.protocol.restarts):
          rows = np.flatnonzero(~broken & ~certified)
          broken[rows], norm[rows] = over_rows(
              functools.partial(self._program, scope=scope), variables, inputs, labels, rows,
              batch_size=self.batch_size, key=task_key(self.seed, self.type, first_index + i),
              value=(jnp.float32(eps), jnp.int32(restart), jnp.int32(loss_index)))
      if progress is not None:
        progress(batches)
      robust.append(correct & ~broken)
      norms.append(float(norm[correct].mean()) if correct.any() else 0.0)
    return robust, {"mean_norm": norms,
                    "num_certified": None if certified_radius is None else num_certified}

  def sound_radii(self, variables: Any) -> dict[str, np.ndarray] | None:
    """Scope -> [N] sound certified radii of the evaluated split ("multi": Thm
    3.3 / 3.5; each modality alone: Prop. 3.4), for PGD to skip what it cannot
    break; None without `skip_certified`, behind a defence (the certificates
    are of the undefended model), for a model that does not compute in float32
    (they are of its float32 evaluation, not of the function attacked) or for
    a model that states no Lipschitz bound."""
    if not self.skip_certified or self.defence or models.as_float32(self.model) is not self.model:
      return None
    try:
      constants = certify_lib.sound_constants(self.model, variables)
    except NotImplementedError:
      return None
    certifier = certification.make_certifier(self.model, mode="auto", chunk_size=None)
    cert, _ = certification.certify_dataset(
        certifier, variables, self.data.inputs, self.data.labels, "sound", constants=constants,
        batch_size=self.batch_size, description="sound radii")
    return {MULTI: np.asarray(cert.radius),
            **{m: np.asarray(r) for m, r in cert.per_modality.items()}}

"""Fast Gradient Method (l2): one step of size eps along the loss gradient,
normalised jointly over the attacked modalities.

Goodfellow et al., "Explaining and harnessing adversarial examples" (ICLR
2015), in its l2 form (Miyato et al., ICLR 2017); used with eps = 0.5 (multi-modal)
and eps = 1.0 (uni-modal) in CRMT (Yang et al., ICLR 2024, Sec. 4.1).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from mmsafe.attacks import common

Array = jax.Array


def fgm(logits_fn: common.LogitsFn, inputs: common.Inputs, labels: Array, *,
        eps: float | Array, modalities: str | Sequence[str] | None = None,
        bounds: common.Bounds | None = None, loss: str = "ce") -> dict[str, Array]:
  """l2 FGM: `x' = x + eps * g / ||g||_2`, `g = grad_x loss(logits_fn(x), y)`.

  Goodfellow et al. 2015, in the l2 form of Miyato et al. 2017; CRMT Sec. 4.1
  uses eps = 0.5 (multi-modal) and 1.0 (uni-modal).

  Pure and jit-able: the arrays (`inputs`, `labels`, `eps`, `bounds`) may be
  traced; `logits_fn`, `modalities` and `loss` are static (close over them).
  Checks that need values (eps >= 0, low <= high, finite inputs, labels in
  `[0, K)`) run only on concrete inputs.

  Args:
    logits_fn: dict modality -> [B, ...] to fused logits [B, K] (closes over
      the model variables).
    inputs: modality -> float [B, ...] in normalised space.
    labels: int [B] true labels.
    eps: attack size, a scalar or one per example [B]; >= 0.
    modalities: the attacked modalities (None: all, i.e. the multi-modal
      attack; a name: a uni-modal attack). The norm of `g` is taken jointly
      over them; the other modalities are returned bit-identical.
    bounds: optional box constraints, modality -> (low, high) in normalised
      space (see `common.check_bounds`); the result is clipped into the box.
    loss: "ce" (cross-entropy, the paper's) or "margin".

  Returns:
    The adversarial inputs, a dict with the same modalities, shapes and dtypes.

  Raises:
    ValueError for eps < 0, an unknown modality name, malformed inputs/labels,
    an empty batch, or (when concrete) NaN/Inf inputs or labels outside `[0, K)`.
  """
  attacked = common.resolve_modalities(inputs, modalities)
  b = common.checked_batch(logits_fn, inputs, labels)
  eps = common.check_radius(eps, b, "eps")
  loss = common.check_loss(loss)
  if loss == "targeted":
    raise ValueError("loss: expected 'ce' or 'margin' (targeted restarts are pgd's), "
                     "got 'targeted'")
  box = common.check_bounds(bounds, inputs, attacked)
  x = {m: inputs[m].astype(jnp.float32) for m in attacked}

  def objective(x_attacked):
    logits = logits_fn(common.merge(inputs, x_attacked))
    return jnp.sum(common.per_example_loss(logits, labels, loss))

  grad = jax.grad(objective)(x)
  delta = common.scale(common.normalize_l2(grad), eps)
  delta = common.clip_to_box(x, delta, box)
  return common.merge(inputs, common.add_in_box(x, delta, box))

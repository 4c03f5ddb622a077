"""Lipschitz constants of the uni-modal scores and margins (CRMT, ICLR 2024, Sec. 3).

The certified radii of `mmsafe.certify.bounds` need, per modality `m`, a
Lipschitz constant of

* the uni-modal score `u^(m)_k(x^(m)) = W~^(m)_k phi^(m)(x^(m))` of each class
  `k` (orthogonal head, CRMT eq. 9: `tau~^(m)_k`), or
* the uni-modal margin `zeta^(m)_k = (W^(m)_y - W^(m)_k) phi^(m) / c^(m)_k` of
  each class pair `(y, k)` (concat/JT head, CRMT eq. 4: `tau^(m)_k`), with the
  integration factor `c^(m)_k = ||W^(m)_y - W^(m)_k||` (CRMT eq. 3).

Three kinds, always recorded in the result (`LipschitzConstants.kind`):

* `local`: the gradient norm at the sample (`mmsafe.certify.local`): an
  estimate, not a certificate.
* `empirical`: the per-class (per-pair) maximum of `local` over a dataset
  (`mmsafe.certify.local.empirical_constants`), as in the CRMT reference
  code. Still an estimate.
* `sound`: an upper bound valid for every input (`mmsafe.certify.sound`), from
  products of layer operator norms; radii computed with it are certificates.

Representation (`LipschitzConstants.values[m]`):

* orthogonal head (`target == "scores"`): `[N, K]`, entry `k` bounds the
  gradient norm of `u^(m)_k` (independent of the label);
* concat head (`target == "margins"`): `[N, K, K]`, entry `(y, k)` bounds the
  gradient norm of `zeta^(m)_k` for true label `y` (the diagonal is 0);

with `N = B` for `local` (one row per sample) and `N = 1` for `empirical` and
`sound` (one table for every input). `LipschitzConstants.tau(labels)` resolves
the label and returns the `[B|1, K]` arrays `certified_radius` takes.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from mmsafe import programs

Array = jax.Array

KINDS = ("local", "empirical", "sound")
# Head kind -> what the constants bound: the uni-modal scores or the margins.
TARGETS = {"concat": "margins", "orthogonal": "scores"}


@flax.struct.dataclass
class LipschitzConstants:
  """Lipschitz constants of every modality's uni-modal scores or margins.

  Attributes:
    values: modality -> `[N, K]` (target "scores": constant of `u^(m)_k`) or
      `[N, K, K]` (target "margins": constant of `zeta^(m)_k` for the pair
      (row `y`, column `k`), 0 on the diagonal). `N` is the batch size for
      kind "local" and 1 for "empirical" and "sound".
    encoder: modality -> scalar upper bound on `Lip(phi^(m))` (kind "sound"
      only; empty otherwise).
    kind: "local" | "empirical" | "sound".
    target: "scores" (orthogonal head) | "margins" (concat head).
  """

  values: dict[str, Array]
  encoder: dict[str, Array] = flax.struct.field(default_factory=dict)
  kind: str = flax.struct.field(pytree_node=False, default="local")
  target: str = flax.struct.field(pytree_node=False, default="scores")

  @property
  def modalities(self) -> tuple[str, ...]:
    return tuple(sorted(self.values))

  def tau(self, labels: Array) -> dict[str, Array]:
    """The constants `certified_radius` takes: modality -> `[B|1, K]`.

    Scores: the values as they are. Margins: row `labels[b]` of the pair table
    (of sample `b` for "local", of the shared table otherwise), so entry
    `[b, k]` is the constant of `zeta^(m)_k` for the pair `(labels[b], k)`.
    """
    labels = jnp.asarray(labels)
    if self.target == "scores":
      return dict(self.values)
    out = {}
    for m, table in self.values.items():
      if table.shape[0] == 1:
        out[m] = table[0][labels]
      else:
        if table.shape[0] != labels.shape[0]:
          raise ValueError(f"tau: constants of modality {m!r} have {table.shape[0]} rows "
                           f"(kind {self.kind!r}), expected {labels.shape[0]} (the labels)")
        out[m] = jnp.take_along_axis(table, labels[:, None, None], axis=1)[:, 0]
    return out


def integration_factors(kernel: Array) -> Array:
  """`c[y, k] = ||W_y - W_k||_2` (CRMT eq. 3) for a head kernel `[d, K]` (`W^T`).

  Exact row differences (no Gram-matrix cancellation), one row `y` at a time;
  differentiable everywhere (the gradient of a zero distance, e.g. `c[y, y]`,
  is 0 rather than NaN), so training objectives can use it.
  """
  kernel = jnp.asarray(kernel, jnp.float32)
  if kernel.ndim != 2:
    raise ValueError(f"kernel: expected [d, K], got shape {tuple(kernel.shape)}")

  def distances(column):
    squared = jnp.sum(jnp.square(kernel - column[:, None]), axis=0)
    return jnp.where(squared > 0, jnp.sqrt(jnp.maximum(squared, 1e-30)), 0.0)

  return jax.lax.map(distances, kernel.T)


def head_params(model, variables):
  """The `HeadParams` of `model`: one forward pass on a zero example, compiled
  once per model (`mmsafe.certify.programs`)."""
  shapes = getattr(model, "input_shapes", None)
  if not shapes:
    raise ValueError("model: expected a model with `input_shapes` (see mmsafe.models.build)")
  return programs.compiled(_head_params, model)(variables)


def _head_params(model, variables):
  """The computation of `head_params` (traced)."""
  example = {m: jnp.zeros((1, *s), jnp.float32) for m, s in model.input_shapes.items()}
  return model.apply(variables, example).head


def head_target(head_kind: str) -> str:
  """What the constants of a `head_kind` head bound: "margins" or "scores"."""
  if head_kind not in TARGETS:
    raise ValueError(f"head.kind: expected one of {sorted(TARGETS)}, got {head_kind!r}")
  return TARGETS[head_kind]

"""Lipschitz constants of the uni-modal scores and margins (CRMT, ICLR 2024, Sec. 3).

The certified radii of `mmsafe.certify.bounds` need, per modality `m`, a
Lipschitz constant of

* the uni-modal score `u^(m)_k(x^(m)) = W~^(m)_k phi^(m)(x^(m))` of each class
  `k` (orthogonal head, CRMT eq. 9: `tau~^(m)_k`), or
* the uni-modal margin `zeta^(m)_k = (W^(m)_y - W^(m)_k) phi^(m) / c^(m)_k` of
  each class pair `(y, k)` (concat/JT head, CRMT eq. 4: `tau^(m)_k`), with the
  integration factor `c^(m)_k = ||W^(m)_y - W^(m)_k||` (CRMT eq. 3).

Three kinds, always recorded in the result (`LipschitzConstants.kind`):

* `local`: the gradient norm at the sample (`local_lipschitz`): an estimate,
  not a certificate. All K classes and all pairs at once from the per-example
  Jacobian `J = d s^(m) / d x^(m)` ([K, D]), computed with `jax.jacfwd` or
  `jax.jacrev` and `vmap`-ed over the batch.
* `empirical`: the per-class (per-pair) maximum of `local` over a dataset
  (`empirical_constants`), as in the CRMT reference code. Still an estimate.
* `sound`: an upper bound valid for every input (`sound_constants`), from
  products of layer operator norms (`encoder_lipschitz`); radii computed with
  it are certificates.

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

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mmsafe.models.layers import LIPSCHITZ_COLLECTION
from mmsafe.models.operator_norms import (BoundOptions)
from mmsafe.models.outputs import ModelOutput

Array = jax.Array
_HIGHEST = jax.lax.Precision.HIGHEST

KINDS = ("local", "empirical", "sound")
MODES = ("auto", "jacfwd", "jacrev")
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


def _safe_divide(numerator: Array, denominator: Array) -> Array:
  """`numerator / denominator`, 0 where the denominator is 0."""
  ok = denominator > 0
  return jnp.where(ok, numerator / jnp.where(ok, denominator, 1.0), 0.0)


# ----------------------------------------------------------------------------
# local: per-example Jacobians


def _select_scores(out: Any, modality: str) -> Array:
  if isinstance(out, ModelOutput):
    return out.scores[modality]
  if isinstance(out, Mapping):
    return out[modality]
  return out


def _resolve_mode(mode: str, input_dim: int, num_outputs: int) -> str:
  if mode not in MODES:
    raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
  if mode == "auto":
    # Forward mode pushes one tangent per input entry, reverse mode pulls one
    # cotangent per output: pick the smaller count.
    return "jacfwd" if input_dim < num_outputs else "jacrev"
  return mode


def jacobian_norms(score_fn: Callable[[dict[str, Array]], Any], inputs: Mapping[str, Array],
                   modality: str, mode: str = "auto", *, chunk_size: int | None = None,
                   precision: str | None = "highest") -> tuple[Array, Array]:
  """Row norms and pairwise row distances of the per-example Jacobian of the scores.

  For each example `b` with Jacobian `J_b = d s^(m)(x_b) / d x_b^(m)` ([K, D],
  flattened input), returns

    norms[b, k]    = ||J_b[k]||                (gradient norm of score k)
    pairs[b, y, k] = ||J_b[y] - J_b[k]||       (gradient norm of s_y - s_k)

  The pair distances come from the Gram matrix of the Jacobian rows (one
  `[K, D] x [D, K]` product per example) after subtracting the mean row, which
  leaves the distances unchanged and removes the component all rows share, so
  the cancellation in `G_yy + G_kk - 2 G_yk` is small.

  Args:
    score_fn: `inputs -> scores`, where scores is `[B, K]`, a dict
      modality -> `[B, K]` or a `ModelOutput` (its `.scores[modality]`). It
      must treat examples independently (batch-norm in eval mode). Arrays it
      closes over become constants of the compiled program: for large models
      call this under `jax.jit` with the variables as arguments (as
      `local_constants` does).
    inputs: modality -> `[B, ...]`; only `inputs[modality]` is differentiated.
    modality: the modality whose input the Jacobian is taken against.
    mode: "jacfwd", "jacrev", or "auto" (jacfwd when the per-example input
      dimension is smaller than K, else jacrev).
    chunk_size: examples per vectorised chunk (`jax.lax.map(..., batch_size)`),
      to bound memory; None: the whole batch at once (`jax.vmap`).
    precision: `jax.default_matmul_precision` for the model's matmuls and
      convolutions inside the Jacobian ("highest": full float32, as
      everything the bounds use; None: the ambient setting, e.g.
      TF32 on GPUs).

  Returns:
    (norms [B, K], pairs [B, K, K]) in float32.
  """
  if modality not in inputs:
    raise ValueError(f"modality: expected one of {sorted(inputs)}, got {modality!r}")
  x = inputs[modality]
  if x.ndim < 2 or x.shape[0] == 0:
    raise ValueError(f"inputs[{modality!r}]: expected shape [B, ...] with B >= 1, "
                     f"got {tuple(x.shape)}")
  others = {m: v for m, v in inputs.items() if m != modality}
  first = {m: v[:1] for m, v in inputs.items()}
  probe = jax.eval_shape(lambda inp: _select_scores(score_fn(inp), modality), first)
  if len(probe.shape) != 2 or probe.shape[0] != 1:
    raise ValueError(f"score_fn: expected scores of shape [B, K] for modality {modality!r}, "
                     f"got {tuple(probe.shape)} for a batch of 1")
  num_classes = probe.shape[1]
  mode = _resolve_mode(mode, int(np.prod(x.shape[1:])), num_classes)
  jacobian = jax.jacfwd if mode == "jacfwd" else jax.jacrev

  def one(args):
    if precision is None:
      return one_example(args)
    with jax.default_matmul_precision(precision):
      return one_example(args)

  def one_example(args):
    x_b, others_b = args

    def scores(x_single):
      batch = {m: v[None] for m, v in others_b.items()}
      batch[modality] = x_single[None]
      return _select_scores(score_fn(batch), modality)[0].astype(jnp.float32)

    jac = jacobian(scores)(x_b).reshape(num_classes, -1).astype(jnp.float32)
    norms = jnp.sqrt(jnp.sum(jac * jac, axis=-1))
    centred = jac - jnp.mean(jac, axis=0, keepdims=True)
    gram = jnp.matmul(centred, centred.T, precision=_HIGHEST)
    diag = jnp.diagonal(gram)
    squared = diag[:, None] + diag[None, :] - 2.0 * gram
    pairs = jnp.sqrt(jnp.maximum(squared, 0.0)) * (1.0 - jnp.eye(num_classes))
    return norms, pairs

  def run(x, others):
    if chunk_size is None:
      return jax.vmap(one)((x, others))
    return jax.lax.map(one, (x, others), batch_size=int(chunk_size))

  # Compiled once per call (inlined when the caller is already under jit).
  return jax.jit(run)(x, others)


def local_lipschitz(score_fn: Callable[[dict[str, Array]], Any], inputs: Mapping[str, Array],
                    modality: str, mode: str = "auto", *, labels: Array | None = None,
                    kernel: Array | None = None, chunk_size: int | None = None,
                    precision: str | None = "highest") -> Array:
  """Local Lipschitz estimates `[B, K]`: gradient norms at each sample.

  * `labels=None`: `||grad_x u^(m)_k(x_b)||` for every class k, i.e. the local
    `tau~^(m)_k` of CRMT eq. 9 when `score_fn` returns the orthogonal head's
    uni-modal scores.
  * `labels` given: `||grad_x (s^(m)_y - s^(m)_k)(x_b)|| / c^(m)_k` with
    `y = labels[b]`, the local `tau^(m)_k` of the margin `zeta^(m)_k`
    (CRMT eqs. 2 and 4) for the JT head's contributions `s^(m) = W^(m) phi^(m)`,
    where `c^(m)_k = ||W_y - W_k||` is read off `kernel` ([d_m, K], `W^T`);
    without `kernel`, `c = 1` (the constant of `s_y - s_k` itself, which is
    the vulnerability indicator `eta^(m)_k = c^(m)_k tau^(m)_k`). Entry `k = y`
    is 0.

  See `jacobian_norms` for `score_fn`, `mode`, `chunk_size` and `precision`.

  Returns:
    float32 [B, K] estimates (not certificates).

  Pure and jit-able with `score_fn`, `modality`, `mode`, `chunk_size` and
  `precision` static (close over them); `inputs`, `labels` and `kernel` may
  be traced.
  """
  norms, pairs = jacobian_norms(score_fn, inputs, modality, mode, chunk_size=chunk_size,
                                precision=precision)
  if labels is None:
    return norms
  labels = jnp.asarray(labels)
  if labels.shape != (norms.shape[0],):
    raise ValueError(f"labels: expected shape [{norms.shape[0]}], got {tuple(labels.shape)}")
  rows = jnp.take_along_axis(pairs, labels[:, None, None], axis=1)[:, 0]
  if kernel is None:
    return rows
  if kernel.shape[-1] != norms.shape[-1]:
    raise ValueError(f"kernel: expected [d, K={norms.shape[-1]}], got {tuple(kernel.shape)}")
  return _safe_divide(rows, integration_factors(kernel)[labels])


def model_score_fn(model, variables: Mapping[str, Any], modality: str, kernel: Array
                   ) -> Callable[[dict[str, Array]], Array]:
  """`inputs -> phi^(m)(inputs[m]) @ kernel` in eval mode, running only the
  encoder of `modality` (via `model.encode` when the model has one)."""
  if hasattr(model, "encode"):
    def score_fn(inputs):
      features = model.apply(variables, modality, inputs[modality], method="encode")
      return jnp.matmul(features.astype(jnp.float32), kernel, precision=_HIGHEST)
    return score_fn
  return lambda inputs: model.apply(variables, inputs).scores[modality]


def head_params(model, variables):
  """The `HeadParams` of `model` (one forward pass on a zero example)."""
  shapes = getattr(model, "input_shapes", None)
  if not shapes:
    raise ValueError("model: expected a model with `input_shapes` (see mmsafe.models.build)")
  example = {m: jnp.zeros((1, *s), jnp.float32) for m, s in shapes.items()}
  return model.apply(variables, example).head


def local_constants(model, variables: Mapping[str, Any], inputs: Mapping[str, Array], *,
                    head=None, mode: str = "auto", chunk_size: int | None = None,
                    precision: str | None = "highest") -> LipschitzConstants:
  """Kind "local": per-sample gradient norms for every modality (see module doc).

  Orthogonal head: `[B, K]` norms of the uni-modal score gradients, the local
  `tau~^(m)_k` of CRMT eq. 9. Concat head: `[B, K, K]` constants of the
  margins `zeta^(m)_k` for every pair, the local `tau^(m)_k` of CRMT eq. 4
  (margins of eq. 2). Estimates, not certificates.
  `mode`, `chunk_size`, `precision`: see `jacobian_norms`.

  Args:
    model, variables: a model from `mmsafe.models.build` and its variables
      (evaluated in eval mode).
    inputs: modality -> [B, ...].
    head: the model's `HeadParams` (computed by one forward pass when None).

  Returns:
    `LipschitzConstants` of kind "local". Pure and jit-able with `model` and
    the options static (close over them); `variables`, `inputs` and `head`
    may be traced.
  """
  head = head_params(model, variables) if head is None else head
  target = _target(head.kind)

  def compute(variables, inputs, head):
    values = {}
    for m in sorted(head.kernels):
      norms, pairs = jacobian_norms(model_score_fn(model, variables, m, head.kernels[m]), inputs,
                                    m, mode, chunk_size=chunk_size, precision=precision)
      values[m] = norms if target == "scores" else _safe_divide(
          pairs, integration_factors(head.kernels[m])[None])
    return values

  # Compiled once per call (inlined when the caller is already under jit).
  values = jax.jit(compute)(variables, inputs, head)
  return LipschitzConstants(values=values, kind="local", target=target)


def _target(head_kind: str) -> str:
  if head_kind not in TARGETS:
    raise ValueError(f"head.kind: expected one of {sorted(TARGETS)}, got {head_kind!r}")
  return TARGETS[head_kind]


def empirical_constants(model, variables: Mapping[str, Any], batches: Iterable[Any], *,
                        head=None, mode: str = "auto", chunk_size: int | None = None,
                        precision: str | None = "highest") -> LipschitzConstants:
  """Kind "empirical": the maximum of `local` over a dataset, per class (pair).

  Streams `batches` (batch dicts `{"inputs": ..., "valid": bool[B]?}` as from
  `mmsafe.data.eval_batches`, or plain inputs dicts); examples with
  `valid == False` (padding) are ignored. The maximum runs over every example
  regardless of its label: the constant of `u^(m)_k` (or of `zeta^(m)_k` for
  the pair (y, k)) is a property of the function, not of class-y inputs.

  As in the CRMT reference code, this estimates `tau~^(m)_k` (CRMT eq. 9) or
  `tau^(m)_k` (CRMT eq. 4) by the largest local gradient norm seen.
  `mode`, `chunk_size`, `precision`: see `jacobian_norms`.

  Pure, but not jit-able itself: it iterates over `batches` in Python (a
  stream of any length) and reads each `valid` mask as concrete numpy; each
  batch's maximum is one jitted computation.

  Returns:
    `LipschitzConstants` with values `[1, K]` (scores) or `[1, K, K]` (margins).

  Raises:
    ValueError if `batches` holds no (valid) example.
  """
  head = head_params(model, variables) if head is None else head
  target = _target(head.kind)
  modalities = sorted(head.kernels)
  factors = {m: integration_factors(head.kernels[m]) for m in modalities}

  # Variables and kernels are arguments (not closed-over constants) so large
  # models are not baked into the compiled program.
  @jax.jit
  def batch_max(variables, kernels, factors, inputs, valid):
    out = {}
    for m in modalities:
      norms, pairs = jacobian_norms(model_score_fn(model, variables, m, kernels[m]),
                                    inputs, m, mode, chunk_size=chunk_size, precision=precision)
      value = norms if target == "scores" else _safe_divide(pairs, factors[m][None])
      mask = valid.reshape((-1,) + (1,) * (value.ndim - 1))
      out[m] = jnp.max(jnp.where(mask, value, -jnp.inf), axis=0)
    return out

  running = None
  for batch in batches:
    inputs = batch["inputs"] if isinstance(batch, Mapping) and "inputs" in batch else batch
    size = next(iter(inputs.values())).shape[0]
    valid = np.ones(size, bool) if not (isinstance(batch, Mapping) and "valid" in batch) else (
        np.asarray(batch["valid"], bool))
    if size == 0 or not valid.any():
      continue
    maxima = batch_max(variables, dict(head.kernels), factors, inputs, jnp.asarray(valid))
    running = maxima if running is None else jax.tree_util.tree_map(jnp.maximum, running, maxima)
  if running is None:
    raise ValueError("empirical_constants: the dataset is empty (no valid example in `batches`); "
                     "expected at least one example")
  return LipschitzConstants(values={m: v[None] for m, v in running.items()}, kind="empirical",
                            target=target)


# ----------------------------------------------------------------------------
# sound: the encoders' own stated bounds


def _options(key: Array | None, method: str, iterations: int, failure_probability: float,
             exact_max_entries: int) -> BoundOptions:
  return BoundOptions(key=jax.random.PRNGKey(0) if key is None else key, method=method,
                      iterations=iterations, failure_probability=failure_probability,
                      exact_max_entries=exact_max_entries)


def encoder_lipschitz(encoder: nn.Module, params: Mapping[str, Any],
                      batch_stats: Mapping[str, Any] | None, input_shape: tuple[int, ...], *,
                      key: Array | None = None, method: str = "auto", iterations: int = 300,
                      failure_probability: float = 1e-6, exact_max_entries: int = 1 << 21
                      ) -> tuple[Array, dict[str, Array]]:
  """A sound upper bound on the l2 Lipschitz constant of an encoder `phi`.

  The encoder states it itself (`lipschitz_bound`, beside its `__call__`; see
  `mmsafe.models.layers`): the product of its layers' bounds, e.g. exact
  spectral norms of Dense kernels, convolutions with eval-mode batch norm
  folded in on their actual input shapes, `1 + ||F||` for residual blocks,
  `1/sqrt(HW)` for a global mean, `1/sqrt(T)` for a mean over frames, and 1
  for the 1-Lipschitz layers of `mmsafe.models.lipschitz_layers`.

  Convolutions whose matrix has more than `exact_max_entries` entries use
  power iteration: the bound then holds with probability >= 1 -
  failure_probability per such layer (see `power_iteration_factor`). The
  bound is for float32 arithmetic; a bfloat16 encoder computes a slightly
  different function.

  Args:
    encoder: an encoder module of `mmsafe.models.encoders` (or any module
      with `lipschitz_bound(x, options)`).
    params / batch_stats: its variables (the "params" / "batch_stats"
      collections of this encoder).
    input_shape: the per-example input shape.

  Returns:
    (bound, layers): the bound and an ordered dict: the encoder's layer name
    -> that layer's bound (their product is the bound).

  Raises:
    NotImplementedError naming the encoder or its layer that states no bound.
  """
  if not hasattr(encoder, "lipschitz_bound"):
    raise NotImplementedError(f"sound Lipschitz bound: {type(encoder).__name__} states no "
                              f"Lipschitz bound")
  options = _options(key, method, iterations, failure_probability, exact_max_entries)
  variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
  example = jnp.zeros((1, *input_shape), jnp.float32)
  with jax.default_matmul_precision("highest"):
    bound, recorded = encoder.apply(variables, example, options, method="lipschitz_bound",
                                    mutable=[LIPSCHITZ_COLLECTION])
  layers = {name: entry["bound"][0] for name, entry in
            recorded[LIPSCHITZ_COLLECTION].items() if name != "bound"}
  return bound, layers


def sound_constants(model, variables: Mapping[str, Any], *, head=None, key: Array | None = None,
                    method: str = "auto", iterations: int = 300,
                    failure_probability: float = 1e-6, exact_max_entries: int = 1 << 21
                    ) -> LipschitzConstants:
  """Kind "sound": upper bounds valid for every input.

  `L^(m) >= Lip(phi^(m))` is each encoder's own stated bound
  (`model.feature_lipschitz`, see `encoder_lipschitz`). Orthogonal head:
  `tau~^(m)_k = ||W~^(m)_k|| L^(m)` with the actual row norms of `W~` (never
  an assumed 1). Concat head: the margin `zeta^(m)_k` is `phi^(m)` along a
  unit direction, so its constant is `L^(m)` for every pair (0 on the
  diagonal). These bound `tau~^(m)_k` (CRMT eq. 9) and `tau^(m)_k` (CRMT
  eq. 4) for every input, so the radii of Thm 3.3 / Thm 3.5 computed with
  them are certificates (up to the power-iteration failure probability for
  large conv layers). `encoder` holds `L^(m)` itself, which the tight form of
  Thm 3.5 uses (`mmsafe.certify.certified_radius`).

  Args:
    model, variables: a model from `mmsafe.models.build` and its variables.
    head: the model's `HeadParams` (computed by one forward pass when None).
    key: PRNG key of the power iterations (default `PRNGKey(0)`).
    method, iterations, failure_probability, exact_max_entries: see
      `operator_norm`.

  Returns:
    `LipschitzConstants` of kind "sound" with values `[1, K]` (scores) or
    `[1, K, K]` (margins), and `encoder` modality -> scalar `L^(m)`.

  Raises:
    NotImplementedError naming the model part that states no bound (e.g. the
    cross-modal transformer).

  Pure and jit-able with `model` and the options static (close over them);
  `variables`, `head` and `key` may be traced.
  """
  if not hasattr(model, "feature_lipschitz"):
    raise NotImplementedError(f"sound Lipschitz bound: {type(model).__name__} states no "
                              f"Lipschitz bound for its features (expected a model from "
                              f"mmsafe.models.build)")
  head = head_params(model, variables) if head is None else head
  target = _target(head.kind)
  options = _options(key, method, iterations, failure_probability, exact_max_entries)
  encoder = model.apply(variables, options, method="feature_lipschitz")
  values = {}
  for m in sorted(head.kernels):
    kernel = head.kernels[m].astype(jnp.float32)
    num_classes = kernel.shape[-1]
    if target == "scores":
      values[m] = (jnp.linalg.norm(kernel, axis=0) * encoder[m])[None]
    else:
      values[m] = (encoder[m] * (1.0 - jnp.eye(num_classes)))[None]
  return LipschitzConstants(values=values, encoder=encoder, kind="sound", target=target)

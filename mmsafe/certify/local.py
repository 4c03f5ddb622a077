"""Local and empirical Lipschitz estimates from per-example Jacobians (CRMT, ICLR 2024, Sec. 3).

* `local`: the gradient norm at the sample (`local_lipschitz`,
  `local_constants`): an estimate, not a certificate. All K classes and all
  pairs at once from the per-example Jacobian `J = d s^(m) / d x^(m)`
  ([K, D]), computed with `jax.jacfwd` or `jax.jacrev` and `vmap`-ed over the
  batch (`jacobian_norms`).
* `empirical`: the per-class (per-pair) maximum of `local` over a dataset
  (`empirical_constants`), as in the CRMT reference code. Still an estimate.

The representation of the results is `mmsafe.certify.constants`'.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mmsafe import numerics
from mmsafe import programs
from mmsafe.certify.constants import (LipschitzConstants, head_params, head_target,
                                      integration_factors)
from mmsafe.models.outputs import ModelOutput

Array = jax.Array
ScoreFn = Callable[[dict[str, Array]], Any]

MODES = ("auto", "jacfwd", "jacrev")
# Examples x classes per vectorised Jacobian of a direct call on XLA:CPU.
# Vectorising more examples slows its convolution backward pass: per example,
# 17 / 12 / 25 / 33 / 72 ms at 1 / 2 / 4 / 8 / 64 examples of a two-ResNet18
# model with K = 31 (`experiments/bench_certify.py`), so a direct call on a CPU
# loops over compiled chunks of about this many rows.
CPU_JACOBIAN_ROWS = 64


class JacobianOptions(NamedTuple):
  """How the per-example Jacobians are computed (static: part of a program's key;
  see `jacobian_norms`)."""

  mode: str = "auto"
  chunk_size: int | None = None
  precision: str | None = "highest"


def _safe_divide(numerator: Array, denominator: Array) -> Array:
  """`numerator / denominator`, 0 where the denominator is 0."""
  ok = denominator > 0
  return jnp.where(ok, numerator / jnp.where(ok, denominator, 1.0), 0.0)


def _modality_scores(out: Any, modality: str) -> Array:
  """The `[B, K]` scores of `modality` in a `score_fn` output (see `jacobian_norms`)."""
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


def _checked_input(inputs: Mapping[str, Array], modality: str) -> Array:
  """`inputs[modality]`, checked to be a non-empty batch `[B, ...]`."""
  if modality not in inputs:
    raise ValueError(f"modality: expected one of {sorted(inputs)}, got {modality!r}")
  x = inputs[modality]
  if x.ndim < 2 or x.shape[0] == 0:
    raise ValueError(f"inputs[{modality!r}]: expected shape [B, ...] with B >= 1, "
                     f"got {tuple(x.shape)}")
  return x


def _num_classes(score_fn: ScoreFn, inputs: Mapping[str, Array], modality: str) -> int:
  """K of the `[B, K]` scores of `modality` (traced on the first example only)."""
  first = {m: v[:1] for m, v in inputs.items()}
  probe = jax.eval_shape(lambda inp: _modality_scores(score_fn(inp), modality), first)
  if len(probe.shape) != 2 or probe.shape[0] != 1:
    raise ValueError(f"score_fn: expected scores of shape [B, K] for modality {modality!r}, "
                     f"got {tuple(probe.shape)} for a batch of 1")
  return probe.shape[1]


def _example_jacobian(score_fn: ScoreFn, modality: str, mode: str, num_classes: int
                      ) -> Callable[[Array, dict[str, Array]], Array]:
  """`(x_b, others_b) -> J_b` float32 `[K, D]`: the Jacobian of one example's scores."""
  jacobian = jax.jacfwd if mode == "jacfwd" else jax.jacrev

  def example_jacobian(x_b, others_b):
    def scores(x_single):
      batch = {m: v[None] for m, v in others_b.items()}
      batch[modality] = x_single[None]
      return _modality_scores(score_fn(batch), modality)[0].astype(jnp.float32)

    return jacobian(scores)(x_b).reshape(num_classes, -1).astype(jnp.float32)

  return example_jacobian


def _row_norms_and_distances(jac: Array) -> tuple[Array, Array]:
  """`(||J[k]||, ||J[y] - J[k]||)` of one Jacobian `[K, D]`: `[K]`, `[K, K]`.

  The distances come from the Gram matrix of the rows after subtracting the
  mean row (distances unchanged, shared component removed), so the
  cancellation in `G_yy + G_kk - 2 G_yk` is small.
  """
  num_classes = jac.shape[0]
  norms = jnp.sqrt(jnp.sum(jac * jac, axis=-1))
  centred = jac - jnp.mean(jac, axis=0, keepdims=True)
  gram = jnp.matmul(centred, centred.T, precision=numerics.HIGHEST)
  diag = jnp.diagonal(gram)
  squared = diag[:, None] + diag[None, :] - 2.0 * gram
  pairs = jnp.sqrt(jnp.maximum(squared, 0.0)) * (1.0 - jnp.eye(num_classes))
  return norms, pairs


def _map_examples(fn: Callable[[Any], Any], args: Any, chunk_size: int | None) -> Any:
  """`fn` over the leading axis of `args`: `vmap`, or `lax.map` in chunks of `chunk_size`."""
  if chunk_size is None:
    return jax.vmap(fn)(args)
  return jax.lax.map(fn, args, batch_size=int(chunk_size))


def jacobian_norms(score_fn: ScoreFn, inputs: Mapping[str, Array], modality: str,
                   mode: str = "auto", *, chunk_size: int | None = None,
                   precision: str | None = "highest") -> tuple[Array, Array]:
  """Row norms and pairwise row distances of the per-example Jacobian of the scores.

  For each example `b` with Jacobian `J_b = d s^(m)(x_b) / d x_b^(m)` ([K, D],
  flattened input), returns

    norms[b, k]    = ||J_b[k]||                (gradient norm of score k)
    pairs[b, y, k] = ||J_b[y] - J_b[k]||       (gradient norm of s_y - s_k)

  The pair distances come from the Gram matrix of the Jacobian rows (one
  `[K, D] x [D, K]` product per example) after subtracting the mean row.

  Args:
    score_fn: `inputs -> scores`, where scores is `[B, K]`, a dict
      modality -> `[B, K]` or a `ModelOutput` (its `.scores[modality]`). It
      must treat examples independently (batch-norm in eval mode). Arrays it
      closes over become constants of the compiled program: for large models
      call this under `jax.jit` with the variables as arguments (as
      `local_constants` does). A direct call compiles once per `(score_fn,
      modality, mode, chunk_size, precision)` and input shapes
      (`mmsafe.certify.programs`): pass the same `score_fn` to reuse it.
    inputs: modality -> `[B, ...]`; only `inputs[modality]` is differentiated.
    modality: the modality whose input the Jacobian is taken against.
    mode: "jacfwd", "jacrev", or "auto" (jacfwd when the per-example input
      dimension is smaller than K, else jacrev).
    chunk_size: examples per vectorised chunk (`jax.lax.map(..., batch_size)`),
      to bound memory; None: the whole batch at once (`jax.vmap`). (A direct
      call of `local_constants`, `empirical_constants` or `certify` with None
      on a CPU loops over host chunks instead: `host_chunk_size`.)
    precision: `jax.default_matmul_precision` for the model's matmuls and
      convolutions inside the Jacobian ("highest": full float32, as
      everything the bounds use; None: the ambient setting, e.g.
      TF32 on GPUs).

  Returns:
    (norms [B, K], pairs [B, K, K]) in float32.
  """
  options = JacobianOptions(mode, chunk_size, precision)
  return _score_fn_program(_jacobian_norms, score_fn, inputs, modality, options)(inputs)


def _jacobian_norms(score_fn: ScoreFn, modality: str, options: JacobianOptions,
                    inputs: Mapping[str, Array]) -> tuple[Array, Array]:
  """The computation of `jacobian_norms` (traced)."""
  x = _checked_input(inputs, modality)
  others = {m: v for m, v in inputs.items() if m != modality}
  num_classes = _num_classes(score_fn, inputs, modality)
  mode = _resolve_mode(options.mode, int(np.prod(x.shape[1:])), num_classes)
  example_jacobian = _example_jacobian(score_fn, modality, mode, num_classes)

  def one_example(args):
    with numerics.matmul_precision(options.precision):
      return _row_norms_and_distances(example_jacobian(*args))

  return _map_examples(one_example, (x, others), options.chunk_size)


def host_chunk_size(batch: int, num_classes: int, chunk_size: int | None) -> int | None:
  """Examples per compiled call of a direct (untraced) call without an explicit
  `chunk_size`: on XLA:CPU about `CPU_JACOBIAN_ROWS / K`; None (the whole batch
  in one call) elsewhere, with an explicit `chunk_size`, or for a small batch."""
  if chunk_size is not None or jax.default_backend() != "cpu":
    return None
  size = max(1, CPU_JACOBIAN_ROWS // max(int(num_classes), 1))
  return size if size < batch else None


def host_chunks(tree: Any, size: int) -> Iterable[Any]:
  """The leading-axis slices of `tree`'s arrays, `size` examples each (the last
  one shorter: it is never padded). Each array is split by one operation (not
  one slice per chunk), and jax arrays stay jax arrays: a compiled call takes
  its fast path only for them."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  cuts = list(range(size, leaves[0].shape[0], size))
  pieces = [(np if isinstance(leaf, np.ndarray) else jnp).split(leaf, cuts) for leaf in leaves]
  for chunk in zip(*pieces):
    yield jax.tree_util.tree_unflatten(treedef, list(chunk))


def _score_fn_program(fn: Callable[..., Any], score_fn: ScoreFn, inputs: Mapping[str, Array],
                      modality: str, options: JacobianOptions) -> Callable[..., Any]:
  """`fn` with `score_fn`, `modality` and `options` bound: compiled once per
  `(score_fn, modality, options)` (`mmsafe.certify.programs`), or inlined when
  `inputs` are traced (the caller is compiled; its `score_fn` may close over
  its tracers and must not be kept)."""
  if programs.is_traced(inputs):
    return lambda *args: fn(score_fn, modality, options, *args)
  return programs.compiled(fn, score_fn, modality, options)


def local_lipschitz(score_fn: ScoreFn, inputs: Mapping[str, Array], modality: str,
                    mode: str = "auto", *, labels: Array | None = None,
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
  be traced. A direct call is one program, compiled once per static
  arguments and shapes (see `jacobian_norms`).
  """
  options = JacobianOptions(mode, chunk_size, precision)
  labels = None if labels is None else jnp.asarray(labels)
  return _score_fn_program(_local_lipschitz, score_fn, inputs, modality, options)(
      inputs, labels, kernel)


def _local_lipschitz(score_fn: ScoreFn, modality: str, options: JacobianOptions,
                     inputs: Mapping[str, Array], labels: Array | None, kernel: Array | None
                     ) -> Array:
  """The computation of `local_lipschitz` (traced)."""
  norms, pairs = _jacobian_norms(score_fn, modality, options, inputs)
  if labels is None:
    return norms
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
      return jnp.matmul(features.astype(jnp.float32), kernel, precision=numerics.HIGHEST)
    return score_fn
  return lambda inputs: model.apply(variables, inputs).scores[modality]


def _local_tables(model, options: JacobianOptions, variables: Mapping[str, Any],
                  inputs: Mapping[str, Array], head) -> dict[str, Array]:
  """modality -> local constants (traced): the score gradient norms `[B, K]`
  (target "scores", CRMT eq. 9) or the margin constants `[B, K, K]`, pair
  distances divided by the integration factors `[K, K]` (target "margins",
  CRMT eq. 4)."""
  target = head_target(head.kind)
  tables = {}
  for m in sorted(head.kernels):
    kernel = head.kernels[m]
    norms, pairs = _jacobian_norms(model_score_fn(model, variables, m, kernel), m, options,
                                   inputs)
    tables[m] = norms if target == "scores" else _safe_divide(
        pairs, integration_factors(kernel)[None])
  return tables


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
    may be traced. A direct call is one program, compiled once per (model,
    options) and shapes (`mmsafe.certify.programs`).
  """
  head = head_params(model, variables) if head is None else head
  options = JacobianOptions(mode, chunk_size, precision)
  tables = programs.compiled(_local_tables, model, options)
  size = None if programs.is_traced(variables, inputs, head) else host_chunk_size(
      next(iter(inputs.values())).shape[0], head.num_classes, chunk_size)
  if size is None:
    values = tables(variables, inputs, head)
  else:
    values = jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs, axis=0), *[
        tables(variables, chunk, head) for chunk in host_chunks(inputs, size)])
  return LipschitzConstants(values=values, kind="local", target=head_target(head.kind))


def _valid_examples(batch: Any) -> tuple[Mapping[str, Array], np.ndarray] | None:
  """`(inputs, valid)` of a batch dict `{"inputs", "valid"?}` or a plain inputs dict;
  None when the batch holds no valid example."""
  inputs = batch["inputs"] if isinstance(batch, Mapping) and "inputs" in batch else batch
  size = next(iter(inputs.values())).shape[0]
  valid = np.ones(size, bool) if not (isinstance(batch, Mapping) and "valid" in batch) else (
      np.asarray(batch["valid"], bool))
  if size == 0 or not valid.any():
    return None
  return inputs, valid


def _batch_maximum(model, options: JacobianOptions, variables: Mapping[str, Any], head,
                   inputs: Mapping[str, Array], valid: Array) -> dict[str, Array]:
  """modality -> the maximum of the local constants over the valid examples
  (traced; the variables are arguments, not constants of the program)."""
  out = {}
  for m, value in _local_tables(model, options, variables, inputs, head).items():
    mask = valid.reshape((-1,) + (1,) * (value.ndim - 1))
    out[m] = jnp.max(jnp.where(mask, value, -jnp.inf), axis=0)
  return out


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
  batch's maximum is one program, compiled once per (model, options) and
  batch shapes (`mmsafe.certify.programs`).

  Returns:
    `LipschitzConstants` with values `[1, K]` (scores) or `[1, K, K]` (margins).

  Raises:
    ValueError if `batches` holds no (valid) example.
  """
  head = head_params(model, variables) if head is None else head
  batch_maximum = programs.compiled(_batch_maximum, model,
                                    JacobianOptions(mode, chunk_size, precision))
  running = None
  for batch in batches:
    examples = _valid_examples(batch)
    if examples is None:
      continue
    inputs, valid = examples
    size = host_chunk_size(len(valid), head.num_classes, chunk_size) or len(valid)
    for chunk, chunk_valid in host_chunks((inputs, valid), size):
      if not chunk_valid.any():
        continue
      maxima = batch_maximum(variables, head, chunk, jnp.asarray(chunk_valid))
      running = maxima if running is None else jax.tree_util.tree_map(jnp.maximum, running,
                                                                       maxima)
  if running is None:
    raise ValueError("empirical_constants: the dataset is empty (no valid example in `batches`); "
                     "expected at least one example")
  return LipschitzConstants(values={m: v[None] for m, v in running.items()}, kind="empirical",
                            target=head_target(head.kind))

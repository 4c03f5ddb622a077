"""Certifying a model (CRMT, ICLR 2024, Thm 3.3, Prop 3.4, Thm 3.5): the Lipschitz
constants of a kind for a model (`lipschitz_constants`: "local" / "empirical"
from `mmsafe.certify.local`, "sound" from `mmsafe.certify.sound`) composed with
its head into certified radii (`certify`: model + kind -> `Certificate`, the
radius formulas of `mmsafe.certify.bounds`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from mmsafe import checks, numerics
from mmsafe import programs
from mmsafe.certify.bounds import Certificate, certified_radius, concatenate
from mmsafe.certify.constants import KINDS, TARGETS, LipschitzConstants, head_params
from mmsafe.certify.local import (JacobianOptions, empirical_constants, host_chunk_size,
                                  host_chunks, local_constants)
from mmsafe.certify.sound import sound_constants
from mmsafe.models import as_float32, float32_variables

Array = jax.Array


def lipschitz_constants(model, variables: Mapping[str, Any], inputs: Mapping[str, Array],
                        kind: str, *, head=None, batches: Iterable[Any] | None = None,
                        mode: str = "auto", chunk_size: int | None = None,
                        precision: str | None = "highest", **sound_options
                        ) -> LipschitzConstants:
  """Lipschitz constants of kind `kind` for `model` (dispatch to `mmsafe.certify.local` /
  `mmsafe.certify.sound`).

  "local" uses `inputs`; "empirical" needs `batches` (the dataset to take the
  maximum over); "sound" takes `sound_options` (`iterations`,
  `failure_probability`, `method`, `key`, `exact_max_entries`).
  """
  if kind == "local":
    return local_constants(model, variables, inputs, head=head, mode=mode,
                           chunk_size=chunk_size, precision=precision)
  if kind == "empirical":
    if batches is None:
      raise ValueError("kind 'empirical': expected `batches` (a dataset to take the maximum "
                       "of the local constants over) or precomputed `constants`")
    return empirical_constants(model, variables, batches, head=head, mode=mode,
                               chunk_size=chunk_size, precision=precision)
  if kind == "sound":
    return sound_constants(model, variables, head=head, **sound_options)
  raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")


def certify(model, variables: Mapping[str, Any], inputs: Mapping[str, Array], labels: Array,
            kind: str = "local", *, constants: LipschitzConstants | None = None,
            batches: Iterable[Any] | None = None, mode: str = "auto",
            chunk_size: int | None = None, precision: str | None = "highest",
            input_scale: Mapping[str, float] | None = None, **sound_options) -> Certificate:
  """Certified radii of `model` on a batch, with Lipschitz constants of `kind`.

  The radii of Thm 3.3 (eq. 5, concat head) or Thm 3.5 (eq. 10, orthogonal
  head) and the uni-modal radii of Prop. 3.4 (eq. 7), via `certified_radius`.

  What is certified: the model evaluated in float32 (`models.as_float32`: a
  bfloat16 model's parameters evaluated in float32, its margins taken from
  float32 logits), the function every Lipschitz bound here is computed for;
  a bfloat16 evaluation of the same parameters is another function, which
  no radius covers. Radii are l2 norms in normalised (standardised) input
  space unless `input_scale` is given (`Certificate.units`).

  Args:
    model, variables: a model from `mmsafe.models.build` and its variables
      (evaluated in eval mode: batch-norm statistics are fixed; in float32).
    inputs: modality -> [B, ...] (normalised, as the model reads them);
      labels: int [B].
    kind: "local" (per-sample gradient norms: an estimate), "empirical"
      (maximum of local over `batches`: an estimate) or "sound" (global upper
      bound: a certificate).
    constants: precomputed `LipschitzConstants` of this `kind` (e.g. one
      empirical/sound table reused across batches); computed when None.
    batches: for kind "empirical" without `constants`: the dataset.
    mode, chunk_size: Jacobian mode and chunking (see `local_lipschitz`).
    precision: matmul/conv precision of the model inside the Jacobians and
      the forward pass ("highest" by default; None: the ambient setting).
    input_scale: modality -> `s^(m)`, `units.input_scales(dataset.stats)` for
      any mmsafe dataset: radii in the input units a user perturbs
      (`mmsafe.certify.units`: each modality's `eta` divided by its smallest
      std in those units). None: radii in normalised input space.
    **sound_options: for kind "sound" without `constants`.

  Returns:
    `Certificate` with `kind` recorded (radius [B], per_class [B, K]).

  Pure; jit-able (with `model`, `kind` and the options static, e.g. closed
  over) for kinds "local" and "sound", and for "empirical" when `constants`
  is given; computing empirical constants streams `batches` in Python (see
  `empirical_constants`). Checks that need values run only on concrete inputs.
  A direct call runs one program (after the constants of `kind`), compiled
  once per (model, kind, mode, chunk_size, precision) and shapes
  (`mmsafe.certify.programs`), so it costs what an explicitly jitted call does;
  on a CPU without `chunk_size`, kind "local" runs that program on host chunks
  of about `CPU_JACOBIAN_ROWS / K` examples (`local.host_chunk_size`), faster
  there than one vectorised call or a per-example loop.

  Raises:
    ValueError for NaN/Inf inputs (when concrete), an empty batch, a kind
    mismatch with `constants`, `input_scale` without finite positive scales for
    exactly the model's modalities, or any error of `certified_radius`. Under
    jit (values unchecked) an example with NaN/Inf logits or NaN indicators
    gets `correct=False`, radius 0 and `finite=False`.
  """
  if kind not in KINDS:
    raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
  checks.check_finite_inputs(inputs)
  model, variables = as_float32(model), float32_variables(variables)
  head = head_params(model, variables)
  if input_scale is not None and sorted(input_scale) != sorted(head.kernels):
    raise ValueError(f"input_scale: expected modalities {sorted(head.kernels)}, got "
                     f"{sorted(input_scale)}")
  batch = next(iter(inputs.values())).shape[0] if inputs else 0
  if inputs:
    checks.check_nonempty(batch, "inputs")
  labels = jnp.asarray(labels)
  checks.check_labels(labels, head.num_classes, batch_size=batch)
  if constants is None and kind != "local":
    constants = lipschitz_constants(model, variables, inputs, kind, head=head, batches=batches,
                                    mode=mode, chunk_size=chunk_size, precision=precision,
                                    **sound_options)
  if constants is not None:
    _check_precomputed(constants, kind, head.kind)
  # Checks on concrete values ran above; the computation itself is one program,
  # compiled once per (model, kind, options) and shapes (`mmsafe.certify.programs`).
  options = JacobianOptions(mode, chunk_size, precision)
  program = programs.compiled(_certify, model, kind, options)
  size = None if constants is not None or programs.is_traced(variables, inputs) else (
      host_chunk_size(batch, head.num_classes, chunk_size))
  if size is None:
    return program(variables, inputs, labels, constants, input_scale)
  return concatenate(program(variables, chunk, chunk_labels, None, input_scale)
                     for chunk, chunk_labels in host_chunks((inputs, labels), size))


def _check_precomputed(constants: LipschitzConstants, kind: str, head_kind: str) -> None:
  """ValueError unless `constants` are finite, of `kind` and of the target of the head."""
  if constants.kind != kind:
    raise ValueError(f"constants: expected Lipschitz constants of kind {kind!r}, got "
                     f"{constants.kind!r}")
  expected_target = TARGETS.get(head_kind)
  if constants.target != expected_target:
    raise ValueError(f"constants: expected target {expected_target!r} for a "
                     f"{head_kind!r} head, got {constants.target!r}")
  for m, value in constants.values.items():
    checks.check_finite(value, f"constants.values[{m!r}]", batched=False)


def _certify(model, kind: str, options: JacobianOptions, variables: Mapping[str, Any],
             inputs: Mapping[str, Array], labels: Array, constants: LipschitzConstants | None,
             input_scale: dict[str, float] | None) -> Certificate:
  """The computation of `certify` (traced; arguments already checked), with
  local constants computed at `inputs` when `constants` is None."""
  with numerics.matmul_precision(options.precision):
    output = model.apply(variables, inputs)
  if constants is None:
    constants = local_constants(model, variables, inputs, head=output.head, **options._asdict())
  return certified_radius(output, labels, constants.tau(labels),
                          feature_lipschitz=constants.encoder or None, kind=kind,
                          input_scale=input_scale)

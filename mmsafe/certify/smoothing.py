r"""Multi-modal randomized smoothing with a noise level per modality.

Cohen, Rosenfeld & Kolter, "Certified Adversarial Robustness via Randomized
Smoothing" (ICML 2019). The smoothed classifier of a base classifier `f` is

    g(x) = argmax_c P[f(x + e) = c],   e^(m) ~ N(0, sigma_m^2 I) independently per modality.

Anisotropic radius (the derivation). Let `S = diag(sigma)` act blockwise
(`sigma_m` on the entries of modality m) and `z = S^{-1} x`. Then
`g(x) = g~(z)` with `g~(z) = argmax_c P[f(S (z + u)) = c]`, `u ~ N(0, I)`: the
isotropic smoothing of `f o S` at noise 1. Cohen et al.'s Thm 1 (with
`p_B <= 1 - p_A`) says `g~` is constant on `||z' - z|| < R`,

    R = Phi^{-1}(p_A_lower)                                      (Cohen et al. eq. (3), sigma = 1)

and `z' - z = S^{-1} d`, so `g` is constant on the ellipsoid

    sum_m ||d^(m)||^2 / sigma_m^2 < R^2.

Hence the certified radii reported here:

* joint l2 (`radius`): the largest ball inside the ellipsoid,
  `min_m sigma_m R` (equal to Cohen's `sigma R` when all sigmas agree);
* per modality (`per_modality[m]`, the other modalities untouched):
  `sigma_m R`;
* any per-modality budget `(r_m)`: certified iff `sum_m r_m^2 / sigma_m^2 < R^2`
  (`certifies`).

For a linear binary classifier `f(x) = sign(w.x + b)` the ellipsoid is
exact: `w.(x + e) + b ~ N(w.x + b, sum_m sigma_m^2 ||w_m||^2)`, so
`Phi^{-1}(p_A) = |w.x + b| / sqrt(sum_m sigma_m^2 ||w_m||^2)`, which is the
smallest `sqrt(sum_m ||d_m||^2 / sigma_m^2)` with `w.d = -(w.x + b)`
(tests/test_smoothing.py checks both).

Units: `sigma` and the radii are in normalised input space, unless
`certify(..., input_scale=units.input_scales(dataset.stats))` asks for the input units a user
perturbs: normalised noise `sigma_m` then acts as `s^(m) sigma_m` on
input-unit perturbations (`mmsafe.certify.units`, the one rule; `s^(m)` the
smallest std of modality m in input units), so every radius above, and
`certifies`, use `s^(m) sigma_m` in place of `sigma_m`.

`certify` is CERTIFY (Sec. 3.2): `num_selection` noisy votes pick the class
`c_A`, `num_samples` fresh votes bound `p_A` below with Clopper-Pearson at
`1 - alpha`; below 1/2 the certificate abstains. With probability at least
`1 - alpha` over the sampling, a non-abstained prediction equals `g(x)` and
`g` is constant on the certified set. `predict` is PREDICT (abstains unless
a binomial test separates the top two classes at level `alpha`).
"""

from __future__ import annotations

from collections.abc import Mapping
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from mmsafe import checks
from mmsafe import programs
from mmsafe.certify import units as units_lib
from mmsafe.certify import votes
from mmsafe.certify.votes import ABSTAIN

Array = jax.Array
Inputs = Mapping[str, Array]


@flax.struct.dataclass
class SmoothedCertificate:
  """CERTIFY's result for a batch (arrays [B], numpy).

  Attributes:
    prediction: the smoothed class `c_A`, or `ABSTAIN` (-1).
    radius: certified joint l2 radius `min_m sigma_m R` of the prediction (0
      when abstaining); it holds whatever the label.
    per_modality: modality -> `sigma_m R` (perturbing that modality alone).
    normalized_radius: `R = Phi^{-1}(p_A_lower)`, the radius of the ellipsoid
      `sum_m ||d^(m)||^2 / sigma_m^2 < R^2` (0 when abstaining).
    p_lower: the Clopper-Pearson lower bound of `p_A`.
    correct: `prediction == label` (never for an abstention).
    sigma: modality -> noise level `sigma_m` (normalised input space).
    num_samples, alpha: the estimation's sample count and failure probability.
    units: "normalised" or "input" (`mmsafe.certify.units`): the units of the
      radii and of the norms `certifies` takes.
    input_scale: modality -> `s^(m)` for input units (None: normalised).
  """

  prediction: np.ndarray
  radius: np.ndarray
  per_modality: dict[str, np.ndarray]
  normalized_radius: np.ndarray
  p_lower: np.ndarray
  correct: np.ndarray
  sigma: dict[str, float] = flax.struct.field(pytree_node=False)
  num_samples: int = flax.struct.field(pytree_node=False)
  alpha: float = flax.struct.field(pytree_node=False)
  units: str = flax.struct.field(pytree_node=False, default=units_lib.NORMALISED)
  input_scale: dict[str, float] | None = flax.struct.field(pytree_node=False, default=None)

  @property
  def unit_sigma(self) -> dict[str, float]:
    """modality -> the noise level in the certificate's units (`unit_sigma`)."""
    return unit_sigma(self.sigma, self.input_scale)


def unit_sigma(sigma: Mapping[str, float], input_scale: Mapping[str, float] | None
               ) -> dict[str, float]:
  """modality -> `s^(m) sigma_m`: normalised noise `sigma_m` as it acts on
  input-unit perturbations (`mmsafe.certify.units`); `sigma` itself for
  `input_scale` None (normalised units)."""
  return {m: (1.0 if input_scale is None else input_scale[m]) * s for m, s in sigma.items()}


def check_sigma(sigma: Mapping[str, float] | float, modalities) -> dict[str, float]:
  """modality -> float `sigma_m > 0` (a number applies to every modality);
  ValueError naming `sigma` otherwise."""
  modalities = sorted(modalities)
  if not isinstance(sigma, Mapping):
    sigma = {m: sigma for m in modalities}
  if sorted(sigma) != modalities:
    raise ValueError(f"sigma: expected one noise level per modality {modalities}, got "
                     f"{sorted(sigma)}")
  return {m: checks.check_number(sigma[m], f"sigma[{m!r}]", 0.0, inclusive=False)
          for m in modalities}


@functools.lru_cache(maxsize=programs.MAX_PROGRAMS)
def gaussian_noise(sigma: tuple[tuple[str, float], ...]) -> votes.Transform:
  """The transform `x -> x + e`, `e^(m) ~ N(0, sigma_m^2 I)`, for sorted
  `(modality, sigma_m)` pairs (cached, so programs built on it compile once).
  The draws use the key's own generator: unlike the "rbg" generator of
  `mmsafe.attacks.common.normal`, it gives the same numbers under `vmap`, so
  votes do not depend on the chunk size."""
  levels = dict(sigma)

  def transform(key: Array, inputs: dict[str, Array]) -> dict[str, Array]:
    keys = jax.random.split(key, len(levels))
    return {m: inputs[m] + levels[m] * jax.random.normal(k, inputs[m].shape, inputs[m].dtype)
            for k, m in zip(keys, sorted(levels))}

  return transform


def radii(p_lower: np.ndarray, sigma: Mapping[str, float]
          ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
  """`(R, joint radius, per-modality radii)` for lower bounds `p_lower` [B] (the
  module docstring's anisotropic derivation); 0 where `p_lower <= 1/2`. With
  `sigma` the noise in the radii's units (`SmoothedCertificate.unit_sigma`)."""
  p_lower = np.asarray(p_lower, np.float64)
  certified = p_lower > 0.5
  normalized = np.where(certified, stats.norm.ppf(np.where(certified, p_lower, 0.75)), 0.0)
  per_modality = {m: s * normalized for m, s in sorted(sigma.items())}
  return normalized, min(sigma.values()) * normalized, per_modality


def certifies(certificate: SmoothedCertificate, norms: Mapping[str, np.ndarray]) -> np.ndarray:
  """bool [B]: the perturbation with per-modality l2 norms `norms` (modality ->
  [B], in the certificate's units; absent modalities unperturbed) lies inside
  the certified ellipsoid `sum_m norms_m^2 / sigma_m^2 < R^2` (`unit_sigma`;
  never for an abstention)."""
  unknown = sorted(set(norms) - set(certificate.sigma))
  if unknown:
    raise ValueError(f"norms: unknown modalities {unknown}; expected a subset of "
                     f"{sorted(certificate.sigma)}")
  sigma = certificate.unit_sigma
  distance = sum(np.square(np.asarray(norms[m]) / sigma[m]) for m in norms)
  return (certificate.prediction != ABSTAIN) & (distance < certificate.normalized_radius ** 2)


def _checked(logits_fn, inputs: Inputs, sigma, num_samples: int, alpha: float, name: str):
  """`(sigma dict, batch, number of classes)` after the argument checks."""
  if not isinstance(inputs, Mapping) or not inputs:
    raise ValueError(f"inputs: expected a non-empty dict modality -> [B, ...], got {inputs!r}")
  sigma = check_sigma(sigma, inputs)
  votes.check_confidence(num_samples, alpha, name)
  checks.check_finite_inputs(inputs)
  batch = {m: v.shape[0] for m, v in inputs.items()}
  if len(set(batch.values())) != 1:
    raise ValueError(f"inputs: modalities disagree on the batch size: {batch}")
  batch = next(iter(batch.values()))
  checks.check_nonempty(batch)
  one = {m: jnp.asarray(v[:1]) for m, v in inputs.items()}
  return sigma, batch, jax.eval_shape(logits_fn, one).shape[-1]


def certify(logits_fn, inputs: Inputs, labels, sigma: Mapping[str, float] | float, key: Array, *,
            num_selection: int = 100, num_samples: int = 1000, alpha: float = 0.001,
            chunk_size: int = 100, progress: str | None = None,
            input_scale: Mapping[str, float] | None = None) -> SmoothedCertificate:
  """CERTIFY (Cohen et al. 2019, Sec. 3.2) with per-modality Gaussian noise.

  Args:
    logits_fn: the base classifier, dict modality -> [B, ...] to logits [B, K]
      (reuse one function object across calls: programs are cached on it).
    inputs: modality -> float [B, ...] (normalised space); labels: int [B].
    sigma: noise level per modality (a dict) or one for all, > 0.
    key: PRNG key; the result is a function of it (`votes.vote_counts`).
    num_selection: votes that choose the class (`n_0`).
    num_samples: votes that bound its probability (`n`).
    alpha: failure probability of the certificate.
    chunk_size: noisy copies of the batch classified per program call.
    progress: tqdm description for the chunk loops (None: no bar).
    input_scale: modality -> `s^(m)` (`units.input_scales(dataset.stats)`):
      radii in the input units a user perturbs (module docstring). None:
      normalised.

  Returns:
    A `SmoothedCertificate`.

  A host driver (not jit-able) over one jitted program per chunk of votes; pure
  given `key`.

  Raises:
    ValueError for sigma <= 0 or missing/extra modalities, `num_samples` too
    small to ever certify at `alpha`, alpha outside (0, 1/2], non-finite
    inputs, or labels out of range.
  """
  sigma, batch, num_classes = _checked(logits_fn, inputs, sigma, num_samples, alpha,
                                       "num_samples")
  checks.check_integer(num_selection, "num_selection", 1)
  labels = np.asarray(labels)
  checks.check_labels(labels, num_classes, batch_size=batch)
  input_scale = _checked_scale(input_scale, sigma)
  transform = gaussian_noise(tuple(sorted(sigma.items())))
  select_key, estimate_key = jax.random.split(key)
  count = functools.partial(votes.vote_counts, logits_fn, transform, inputs,
                            chunk_size=chunk_size, num_classes=num_classes)
  chosen = np.argmax(count(select_key, num_samples=num_selection,
                           progress=progress and f"{progress} (select)"), axis=1)
  counts = count(estimate_key, num_samples=num_samples, progress=progress)
  p_lower = votes.clopper_pearson_lower(counts[np.arange(batch), chosen], num_samples, alpha)
  normalized, radius, per_modality = radii(p_lower, unit_sigma(sigma, input_scale))
  prediction = np.where(p_lower > 0.5, chosen, ABSTAIN)
  return SmoothedCertificate(prediction=prediction, radius=radius, per_modality=per_modality,
                             normalized_radius=normalized, p_lower=p_lower,
                             correct=prediction == labels, sigma=sigma,
                             num_samples=num_samples, alpha=alpha,
                             units=units_lib.UNITS[input_scale is not None],
                             input_scale=input_scale)


def _checked_scale(input_scale: Mapping[str, float] | None, sigma: Mapping[str, float]
                   ) -> dict[str, float] | None:
  """modality -> float `s^(m) > 0` for exactly the modalities of `sigma` (or None)."""
  if input_scale is None:
    return None
  if sorted(input_scale) != sorted(sigma):
    raise ValueError(f"input_scale: expected modalities {sorted(sigma)}, got "
                     f"{sorted(input_scale)}")
  return {m: checks.check_number(input_scale[m], f"input_scale[{m!r}]", 0.0, inclusive=False)
          for m in sorted(sigma)}


def predict(logits_fn, inputs: Inputs, sigma: Mapping[str, float] | float, key: Array, *,
            num_samples: int = 1000, alpha: float = 0.001, chunk_size: int = 100,
            progress: str | None = None) -> np.ndarray:
  """PREDICT (Cohen et al. 2019, Sec. 3.2): int [B] smoothed class, or `ABSTAIN`
  unless the two-sided binomial test of the top two counts rejects 1/2 at
  `alpha` (then the class is `g(x)` with probability >= 1 - alpha).

  Raises:
    ValueError as `certify`, `num_samples` checked against the test: with
    `2^(1 - n) > alpha` nothing could be predicted.
  """
  sigma, _, num_classes = _checked(logits_fn, inputs, sigma, num_samples, alpha, "num_samples")
  if 2.0 ** (1 - num_samples) > alpha:
    raise ValueError(f"num_samples: expected at least {int(np.ceil(1 - np.log2(alpha)))} "
                     f"samples for a binomial test at alpha = {alpha:g}, got {num_samples}")
  counts = votes.vote_counts(logits_fn, gaussian_noise(tuple(sorted(sigma.items()))), inputs,
                             key, num_samples=num_samples, chunk_size=chunk_size,
                             num_classes=num_classes, progress=progress)
  return votes.decide(counts, alpha)


def expected_logits(logits_fn, transform: votes.Transform, key: Array, num_samples: int):
  """`x -> log mean_s softmax(logits_fn(transform(fold_in(key, s), x)))`, `s <
  num_samples`: a differentiable surrogate of the smoothed classifier with
  fixed samples (expectation over transformation, Athalye et al. 2018), for
  attacking it with `mmsafe.attacks`."""
  checks.check_integer(num_samples, "num_samples", 1)

  def fn(inputs: dict[str, Array]) -> Array:
    samples = jax.vmap(lambda s: transform(jax.random.fold_in(key, s), inputs))(
        jnp.arange(num_samples))
    batch = next(iter(inputs.values())).shape[0]
    flat = {m: v.reshape((-1,) + v.shape[2:]) for m, v in samples.items()}
    logits = logits_fn(flat).reshape(num_samples, batch, -1)
    return jnp.log(jnp.mean(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), axis=0))

  return fn

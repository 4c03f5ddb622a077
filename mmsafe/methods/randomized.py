"""Training for the probabilistic certificates: the base classifier is trained on
the random inputs it will be smoothed over.

* `gaussian_aug`: Gaussian data augmentation (Cohen, Rosenfeld & Kolter, ICML
  2019, Sec. 4: "we trained the base classifier with Gaussian data
  augmentation at the noise level sigma"): CE on `x + e`, `e^(m) ~ N(0,
  sigma^2 I)`, one fresh draw per example and step, the same noise as
  `mmsafe.certify.smoothing`. Settings: `GaussianSettings`.
* `ablated`: CE on randomly ablated inputs (MMCert, Wang et al., CVPR 2024:
  the base classifier is trained on ablated inputs), keeping `k_m` random
  entries of every modality, the transform of `mmsafe.certify.ablation`, so
  the voter is trained on exactly the distribution it votes on. Settings:
  `AblationSettings`. Give the encoders `kept_indicator=True` so the voter
  sees which entries were kept.

Both use the concat (JT) head; batch-norm statistics update on the random inputs.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import math

import jax

from mmsafe.certify import ablation, smoothing
from mmsafe.methods.common import accuracy, apply_model, cross_entropy
from mmsafe.methods.registry import Objective, register
from mmsafe.methods.settings import Settings, setting

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class GaussianSettings(Settings):
  """Gaussian data augmentation (Cohen et al., ICML 2019, Sec. 4).

  Attributes:
    noise_sigma: the noise level, > 0, one for every modality; 0.5 (mmsafe's
      default: train at the sigma certified with).
  """

  noise_sigma: float = setting(0.5, minimum=0.0, exclusive_minimum=True)


@dataclasses.dataclass(frozen=True)
class AblationSettings(Settings):
  """Training on random ablations (MMCert, Wang et al., CVPR 2024).

  Attributes:
    ablation_keep_fraction: `k_m = max(1, floor(fraction n_m))` entries kept
      per modality, in (0, 1]; 0.2 (mmsafe's: the ablated mfeat voter is 96%
      accurate, 0.05 kept too little).
    ablation_keep_counts: the entries kept per modality, "audio:40,visual:2"
      (each `k_m` in `[1, n_m]`, checked against the model's inputs); None:
      the fraction above.
  """

  ablation_keep_fraction: float = setting(0.2, minimum=0.0, exclusive_minimum=True,
                                          maximum=1.0)
  ablation_keep_counts: str | None = setting(None)


def random_input_objective(model, sample: Callable[[Array, dict[str, Array]], dict[str, Array]]
                           ) -> Objective:
  """CE of `model` on `sample(rng, inputs)`, with the batch accuracy."""

  def loss_fn(params, state, batch: Mapping, rng: Array):
    out, new_state = apply_model(model, params, state, sample(rng, dict(batch["inputs"])),
                                 train=True)
    ce = cross_entropy(out.logits, batch["label"])
    return ce, (new_state, {"ce": ce, "accuracy": accuracy(out.logits, batch["label"])})

  return loss_fn


@register("gaussian_aug", head="concat", settings=GaussianSettings,
          description="Gaussian data augmentation at noise_sigma (randomized smoothing's "
                      "base classifier)")
def gaussian_aug(model, settings: GaussianSettings) -> Objective:
  """CE on `x + N(0, noise_sigma^2 I)` (Cohen et al. 2019, Sec. 4)."""
  sigma = settings.noise_sigma

  def sample(rng, inputs):
    return smoothing.gaussian_noise(tuple((m, sigma) for m in sorted(inputs)))(rng, inputs)

  return random_input_objective(model, sample)


@register("ablated", head="concat", settings=AblationSettings,
          description="CE on inputs keeping ablation_keep_fraction random entries per "
                      "modality (the ablation certificate's base classifier)")
def ablated(model, settings: AblationSettings) -> Objective:
  """CE on random ablations keeping `k_m` entries of every modality (MMCert)."""
  transform = ablation.ablation(tuple(sorted(ablation_keep(model, settings).items())))
  return random_input_objective(model, transform)


def ablation_keep(model, settings: AblationSettings) -> dict[str, int]:
  """modality -> `k_m` for `model`'s input shapes: `ablation_keep_counts` when
  set, else from `ablation_keep_fraction`."""
  sizes = {m: math.prod(shape) for m, shape in sorted(model.input_shapes.items())}
  spec = settings.ablation_keep_counts
  if spec is not None:
    try:
      return ablation.check_keep(ablation.parse_keep(spec), sizes)
    except ValueError as error:
      raise ValueError(f"method_kwargs.ablation_keep_counts: {error}") from None
  return ablation.keep_counts(sizes, settings.ablation_keep_fraction)

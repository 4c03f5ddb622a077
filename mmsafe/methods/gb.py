"""Gradient Blending (Wang, Tran & Feiszli, "What Makes Training Multi-modal
Classification Networks Hard?", CVPR 2020), online variant.

Heads and loss. With `M` modalities there are `M + 1` heads `k`: the fused
head (the concat head's logits `h = sum_m s^(m) + b`) and one uni-modal head
per modality, `s^(m) + b` (the concat head's block `W^(m) phi^(m)` plus the
shared bias). The training loss blends their cross-entropies,

    L = sum_k w_k CE(z_k, y),     sum_k w_k = 1,  w_k >= 0,

so the uni-modal losses regularise each encoder. Choice: the uni-modal heads
share `W^(m)` with the fused head instead of being separate linear layers (a
method cannot add parameters to the model); `s^(m)` is exactly the uni-modal
logit the concat head adds up.

Weights from the overfitting-to-generalisation ratio (OGR). For a checkpoint
pair (N, N + n) and head k, with training loss `L^T` and held-out loss `L^V`:
`O = L^V - L^T` (overfitting), `Delta O_k = O_{N+n} - O_N`,
`Delta G_k = L^V_N - L^V_{N+n}` (generalisation gained), OGR `= |Delta O / Delta G|`.
The paper's optimal blend (Prop. 2) is `w*_k = (1/Z) Delta G_k / Delta O_k^2`.
Choices the paper leaves open:
* Normalisation: `Z = sum_k Delta G_k / Delta O_k^2`, i.e. `sum_k w_k = 1` (the
  constraint of Prop. 2; the printed `Z` with `2 sigma^2` gives weights summing
  to 2, only a constant factor on the loss).
* A head whose held-out loss did not improve (`Delta G_k <= 0`) gets weight 0;
  if no head improved, the previous weights are kept. `Delta O_k^2` is floored
  at 1e-12 (a head that generalised without overfitting then takes all weight,
  as the formula says).
* Online G-Blend (the paper's Algorithm 2) re-estimates the weights every
  super-epoch of `gb_super_epoch` epochs from the current model; mmsafe does
  not train separate per-head copies for the estimate: it measures every
  head's mean CE on the training split and on the held-out split with the
  model at the end of consecutive super-epochs (evaluation mode), and blends
  with the weights from the last two measurements. Until two measurements
  exist the weights are uniform, `1 / (M + 1)`.
* Held-out data: as in the paper, a slice of the training set that GB does not
  train on: the fraction `gb_heldout_fraction` of the training split (a random
  slice seeded by `config.seed`; 0.1 is mmsafe's choice), split "heldout" of the
  run (`mmsafe.train.experiment.hold_out`). The validation split stays for
  model selection only.

Callback: re-estimation needs whole-split evaluations, which a pure train
step cannot do. `measure_and_blend(model, settings, variables, state,
split_names, reduce_over_split, *, epoch) -> dict` returns the method-state
entries to replace after epoch `epoch` (number of completed epochs; `epoch=0`
before the first step takes the first measurement at initialisation); the
training loop streams the splits for it (`CallbackContext.reduce_over_split`).
The callback `BlendingWeights` calls it when training starts and after every
epoch.

Hyper-parameters: `GBSettings`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmsafe import programs
from mmsafe.methods.common import accuracy, apply_model
from mmsafe.methods.registry import Callback, CallbackContext, register
from mmsafe.methods.settings import Settings, setting
from mmsafe.models.outputs import ModelOutput

Array = jax.Array

STATE_KEY = "gb"
FUSED = "fused"
_FLOOR = 1e-12


@dataclasses.dataclass(frozen=True)
class GBSettings(Settings):
  """Gradient Blending (Wang, Tran & Feiszli, CVPR 2020), online G-Blend.

  Attributes:
    gb_super_epoch: the blending weights are re-estimated every this many
      epochs, >= 1; 5 (the paper leaves the length open; mmsafe's choice).
    gb_heldout_fraction: the fraction of the training split held out to
      measure overfitting (split "heldout", not trained on), in (0, 1]; 0.1
      (the paper holds out part of the training set; mmsafe's choice).
  """

  gb_super_epoch: int = setting(5, minimum=1)
  gb_heldout_fraction: float = setting(0.1, minimum=0.0, exclusive_minimum=True, maximum=1.0)


def head_names(modalities) -> tuple[str, ...]:
  """Head order of the weight vectors: the fused head, then modalities sorted."""
  return (FUSED, *sorted(modalities))


def head_logits(output: ModelOutput) -> dict[str, Array]:
  """`{"fused": h, m: s^(m) + b}` (concat head)."""
  if output.head.kind != "concat":
    raise ValueError(f"gb: expected a concat head, got {output.head.kind!r}")
  logits = {FUSED: output.logits.astype(jnp.float32)}
  for m, s in output.scores.items():
    logits[m] = s.astype(jnp.float32) + output.head.bias
  return logits


def head_losses(output: ModelOutput, labels: Array) -> Array:
  """Per-example CE of every head, [M + 1, B] in `head_names` order."""
  logits = head_logits(output)
  return jnp.stack([optax.softmax_cross_entropy_with_integer_labels(logits[k], labels)
                    for k in head_names(output.scores)])


def update_blending_weights(weights: Array, reference: Mapping[str, Array],
                            current: Mapping[str, Array]) -> Array:
  """Gradient-Blending weights from two measurements of every head's mean loss.

  Args:
    weights: [K] the weights in use (kept when no head generalised).
    reference, current: `{"train": [K], "heldout": [K]}` mean losses at the
      start and at the end of the super-epoch.

  Returns:
    [K] `w_k = relu(Delta G_k) / Delta O_k^2`, normalised to sum 1.
  """
  delta_g = reference["heldout"] - current["heldout"]
  delta_o = ((current["heldout"] - current["train"])
             - (reference["heldout"] - reference["train"]))
  raw = jnp.maximum(delta_g, 0.0) / jnp.maximum(jnp.square(delta_o), _FLOOR)
  total = jnp.sum(raw)
  return jnp.where(total > 0, raw / jnp.where(total > 0, total, 1.0), weights)


def init_state(model, variables, settings: GBSettings | None = None) -> dict:
  """Uniform weights; no reference measurement yet."""
  del variables, settings
  k = len(model.input_shapes) + 1
  # Distinct buffers: the train step donates the state.
  return {STATE_KEY: {"weights": jnp.full((k,), 1.0 / k, jnp.float32),
                      "reference": {"train": jnp.zeros((k,), jnp.float32),
                                    "heldout": jnp.zeros((k,), jnp.float32)},
                      "has_reference": jnp.zeros((), jnp.int32)}}


def _head_loss_sums(model, variables, batch):
  """`(per-head CE sums over the batch's valid examples, count)`."""
  out = model.apply(variables, batch["inputs"], train=False)
  valid = batch["valid"].astype(jnp.float32)
  return jnp.sum(head_losses(out, batch["label"]) * valid, axis=1), jnp.sum(valid)


def mean_head_losses(model, variables, split: str, reduce_over_split: Callable
                     ) -> np.ndarray:
  """Every head's mean CE over the whole split `split` (evaluation mode), [M + 1]:
  the `L^T` / `L^V` of the paper's OGR at one checkpoint. Each process sums
  over its own rows; the sums and counts are added over processes
  (`reduce_over_split` of `CallbackContext`)."""
  sums = programs.compiled(_head_loss_sums, model)  # One compilation per model.

  def local_sums(batches):
    total, count = np.zeros(len(model.input_shapes) + 1, np.float64), 0.0
    for batch in batches:
      s, c = sums(variables, batch)
      total, count = total + np.asarray(s, np.float64), count + float(c)
    return total, np.float64(count)

  total, count = reduce_over_split(split, local_sums, "sum")
  if count == 0:
    raise ValueError(f"gb: the {split!r} split holds no example")
  return (total / count).astype(np.float32)


def measure_and_blend(model, settings: GBSettings, variables, state, split_names, reduce_over_split, *,
                      epoch: int) -> dict:
  """Method-state entries after epoch `epoch`: every `gb_super_epoch` epochs,
  measure the heads' losses on the training and held-out splits and, given a
  previous measurement, re-estimate the blending weights. `{}` otherwise."""
  every = settings.gb_super_epoch
  if "heldout" not in split_names:
    raise ValueError(f"splits: gb expected a 'heldout' split (method_kwargs."
                     f"gb_heldout_fraction of the training split), got {sorted(split_names)}")
  if epoch % every:
    return {}
  current = {split: jnp.asarray(mean_head_losses(model, variables, split, reduce_over_split))
             for split in ("train", "heldout")}
  gb = state[STATE_KEY]
  weights = jnp.where(gb["has_reference"] > 0,
                      update_blending_weights(gb["weights"], gb["reference"], current),
                      gb["weights"])
  return {STATE_KEY: {"weights": weights.astype(jnp.float32), "reference": current,
                      "has_reference": jnp.ones((), jnp.int32)}}


class BlendingWeights(Callback):
  """Measures the heads' losses when training starts and re-estimates the
  blending weights after every epoch (`measure_and_blend`)."""

  def on_stage_start(self, stage: str, context: CallbackContext) -> dict:
    del stage
    return self.on_epoch_end("", 0, context)

  def on_epoch_end(self, stage: str, epoch: int, context: CallbackContext) -> dict:
    del stage
    return measure_and_blend(context.model, context.config, context.variables, context.state,
                             context.split_names, context.reduce_over_split, epoch=epoch)


@register("gb", head="concat", settings=GBSettings, init_state=init_state, callbacks=(BlendingWeights(),),
          heldout_fraction_kwarg="gb_heldout_fraction",
          description="Gradient Blending: OGR-weighted uni-modal + fused CE")
def make_objective(model, settings: GBSettings):
  del settings

  def loss_fn(params, state, batch, rng):
    del rng
    labels = batch["label"]
    out, new_state = apply_model(model, params, state, batch["inputs"], train=True)
    weights = jax.lax.stop_gradient(state[STATE_KEY]["weights"])
    losses = jnp.mean(head_losses(out, labels), axis=1)
    loss = jnp.dot(weights, losses)
    names = head_names(out.scores)
    metrics = {"ce": losses[0], "accuracy": accuracy(out.logits, labels),
               **{f"ce_{k}": losses[i] for i, k in enumerate(names) if k != FUSED},
               **{f"weight_{k}": weights[i] for i, k in enumerate(names)}}
    return loss, (new_state, metrics)

  return loss_fn

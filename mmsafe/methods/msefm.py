"""MSEFM: MinSim + ExFMem (Tian & Xu, "Can audio-visual integration strengthen
robustness under multimodal attacks?", CVPR 2021; reference code
YapengTian/AV-Robustness-CVPR21, `main_defense.py`).

The paper's defence has two parts, both implemented here on the encoder
features `phi^(m)` of a concat (JT) head:

* ExFMem, an external feature memory per modality: a bank `D^(m)` of `N`
  clean training features. Each feature is sparse-coded over the bank with
  ISTA (lasso `min_h 1/2 ||h D - phi||^2 + lambda ||h||_1`), reconstructed
  from it, and blended with itself,
      phi~^(m) = a * (h D^(m)) + (1 - a) * phi^(m),
  so a perturbed feature is pulled back toward the span of clean features.
  The fused logits are computed from the blended features with the concat
  head's own parameters, `h(x) = sum_m phi~^(m) W^(m) + b`, and gradients flow
  through the ISTA iterations into the encoders (as in the reference code).
* MinSim, an audio-visual dissimilarity constraint: the loss adds the mean
  cosine similarity between the blended features of different modalities of
  the same example,
      L = CE(h(x), y) + gamma * mean_{m < n} mean_i cos(phi~^(m)_i, phi~^(n)_i).

Choices and simplifications (documented on purpose):
* The memory. The reference loads a fixed bank of 1024 features computed
  beforehand with a separately trained model. mmsafe keeps it inside the pure
  train step: a ring buffer of the last `msefm_memory_size` clean training
  features (no gradient; written after each step's loss, so a batch is never
  reconstructed from itself). Until the buffer is full the features are used
  unblended.
* ISTA. The reference iterates to a tolerance (at most 2000 iterations) with
  hand-tuned step sizes per dataset; mmsafe runs `msefm_ista_steps`
  iterations from zero codes with the step `1 / L`, `L` the largest eigenvalue
  of `D^T D` (the gradient's Lipschitz constant, so the iteration is monotone).
* M > 2 modalities: MinSim averages over all modality pairs; it needs equal
  feature dimensions across modalities (as the reference's 512/512).
* Inference. The reference applies ExFMem at test time too. mmsafe's
  training-loop validation and its certificates run `model.apply` (the concat
  model trained with MinSim on memory-blended features, no defence); the
  test-time defence is an evaluation option (`defence="msefm"` of
  `mmsafe.eval.base`): `defended_logits` on a memory of
  `msefm_memory_size` clean training features of the evaluated model
  (`evaluation_memory`, inference mode; like the reference's bank computed
  with a trained model), and the attacks see the whole defended classifier:
  the fixed ISTA iterations are differentiable almost everywhere (soft
  thresholding is piecewise linear), so gradients flow through the
  reconstruction exactly (white box, no BPDA).

Equations (Tian & Xu 2021, their defence section): MinSim is the
classification loss plus the weighted cosine similarity of the audio and
visual embeddings of an example (`L` above); ExFMem is the lasso
reconstruction of an embedding from the memory of clean embeddings followed by
the convex blend with the embedding itself (`phi~` above); `ista` solves the
lasso, `memory_blend` blends, `cross_modal_similarity` is the MinSim term.

Hyper-parameters: `MSEFMSettings` (also the test-time defence's settings).
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmsafe import programs
from mmsafe.methods.common import accuracy, apply_model, cross_entropy
from mmsafe.methods.registry import Defence, register, settings_of
from mmsafe.methods.settings import Settings, setting
from mmsafe.models.outputs import HeadParams, ModelOutput
from mmsafe.numerics import HIGHEST

Array = jax.Array

STATE_KEY = "msefm"
_COSINE_EPS = 1e-8  # torch.nn.functional.cosine_similarity's default eps


@dataclasses.dataclass(frozen=True)
class MSEFMSettings(Settings):
  """MinSim + ExFMem (Tian & Xu, CVPR 2021), from the reference main_defense.py.

  Attributes:
    msefm_sim_weight: `gamma`, the weight of the cross-modal similarity in
      `CE + gamma * MinSim`, >= 0; 1.0.
    msefm_memory_size: `N`, the features kept in the memory, >= 1; 1024.
    msefm_lasso: `lambda`, the lasso weight of the reconstruction, >= 0; 0.1.
    msefm_blend: `a` of the blend `a * reconstruction + (1 - a) * feature`, in
      [0, 1]; 0.6 (the reference's Kinetics-Sounds value; 0.5 for MUSIC/AVE).
    msefm_ista_steps: ISTA iterations with step 1/L, >= 1; 20 (mmsafe's: the
      reference iterates to a tolerance, <= 2000 steps).
  """

  msefm_sim_weight: float = setting(1.0, minimum=0.0)
  msefm_memory_size: int = setting(1024, minimum=1)
  msefm_lasso: float = setting(0.1, minimum=0.0)
  msefm_blend: float = setting(0.6, minimum=0.0, maximum=1.0)
  msefm_ista_steps: int = setting(20, minimum=1)


def soft_threshold(x: Array, threshold: Array) -> Array:
  return jnp.sign(x) * jnp.maximum(jnp.abs(x) - threshold, 0.0)


def ista(dictionary: Array, x: Array, *, lasso: float, steps: int) -> Array:
  """Sparse codes `h` [B, N] of `x` [B, d] over the atoms (rows) of
  `dictionary` [N, d]: `steps` ISTA iterations on
  `1/2 ||h D - x||^2 + lasso ||h||_1` from `h = 0` with step `1 / L`,
  `L = lambda_max(D^T D)`. Differentiable in `x`; `dictionary` is a constant."""
  d = jax.lax.stop_gradient(dictionary).astype(jnp.float32)
  x = x.astype(jnp.float32)
  lipschitz = jnp.max(jnp.linalg.eigvalsh(jnp.matmul(d.T, d, precision=HIGHEST)))
  step = 1.0 / jnp.maximum(lipschitz, 1e-12)

  def body(_, h):
    residual = jnp.matmul(h, d, precision=HIGHEST) - x
    h = h - step * jnp.matmul(residual, d.T, precision=HIGHEST)
    return soft_threshold(h, step * lasso)

  return jax.lax.fori_loop(0, steps, body, jnp.zeros((x.shape[0], d.shape[0]), jnp.float32))


def memory_blend(features: Mapping[str, Array], memory: Mapping[str, Array], *, lasso: float,
                 steps: int, blend: float) -> dict[str, Array]:
  """ExFMem: `a * reconstruction + (1 - a) * phi` per modality."""
  out = {}
  for m, f in features.items():
    codes = ista(memory[m], f, lasso=lasso, steps=steps)
    reconstruction = jnp.matmul(codes, jax.lax.stop_gradient(memory[m]), precision=HIGHEST)
    out[m] = blend * reconstruction + (1.0 - blend) * f.astype(jnp.float32)
  return out


def fused_logits(head: HeadParams, features: Mapping[str, Array]) -> Array:
  """The concat head on (blended) features: `sum_m phi~^(m) W^(m) + b`."""
  if head.kind != "concat":
    raise ValueError(f"msefm: expected a concat head, got {head.kind!r}")
  return sum(jnp.matmul(features[m], head.kernels[m], precision=HIGHEST)
             for m in sorted(features)) + head.bias


def cosine_similarity(a: Array, b: Array) -> Array:
  """Row-wise cosine similarity, [B] (torch's eps on each norm)."""
  na = jnp.maximum(jnp.linalg.norm(a, axis=-1), _COSINE_EPS)
  nb = jnp.maximum(jnp.linalg.norm(b, axis=-1), _COSINE_EPS)
  return jnp.sum(a * b, axis=-1) / (na * nb)


def cross_modal_similarity(features: Mapping[str, Array]) -> Array:
  """MinSim term: mean over modality pairs and examples of the cosine similarity."""
  names = sorted(features)
  dims = {m: features[m].shape[-1] for m in names}
  if len(set(dims.values())) != 1:
    raise ValueError(f"msefm: the cross-modal similarity needs equal feature dimensions, got "
                     f"{dims}")
  pairs = [(m, n) for i, m in enumerate(names) for n in names[i + 1:]]
  return sum(jnp.mean(cosine_similarity(features[m], features[n])) for m, n in pairs) / len(pairs)


def write_memory(memory: Mapping[str, Array], pointer: Array, count: Array,
                 features: Mapping[str, Array]) -> tuple[dict[str, Array], Array, Array]:
  """Ring buffer: the batch's features (no gradient) overwrite the oldest rows."""
  size = next(iter(memory.values())).shape[0]
  batch = next(iter(features.values())).shape[0]
  if batch > size:
    raise ValueError(f"method_kwargs.msefm_memory_size: expected >= the batch size {batch}, "
                     f"got {size}")
  rows = (pointer + jnp.arange(batch)) % size
  new = {m: bank.at[rows].set(jax.lax.stop_gradient(features[m]).astype(bank.dtype))
         for m, bank in memory.items()}
  return new, (pointer + batch) % size, jnp.minimum(count + batch, size)


def init_state(model, variables, settings: MSEFMSettings = MSEFMSettings()) -> dict:
  """An empty memory `[N, d_m]` per modality (dimensions from the head kernels),
  `N = msefm_memory_size` (the reference keeps 1024 training features)."""
  size = settings.msefm_memory_size
  head = variables["params"]["head"]
  memory = {m: jnp.zeros((size, head[f"kernel_{m}"].shape[0]), jnp.float32)
            for m in sorted(model.input_shapes)}
  return {STATE_KEY: {"memory": memory, "pointer": jnp.zeros((), jnp.int32),
                      "count": jnp.zeros((), jnp.int32)}}


def defended_features(features: Mapping[str, Array], method_state: Mapping,
                      settings: MSEFMSettings) -> dict[str, Array]:
  """ExFMem-blended features once the memory is full, the features otherwise."""
  blended = memory_blend(features, method_state["memory"], lasso=settings.msefm_lasso,
                         steps=settings.msefm_ista_steps, blend=settings.msefm_blend)
  full = method_state["count"] >= settings.msefm_memory_size
  return {m: jnp.where(full, blended[m], features[m].astype(jnp.float32)) for m in features}


def defended_logits(output: ModelOutput, memory: Mapping[str, Array], settings: MSEFMSettings
                    ) -> Array:
  """ExFMem at test time: the concat head on the memory-blended features,
  `sum_m (a h^(m) D^(m) + (1 - a) phi^(m)) W^(m) + b` (differentiable in the inputs)."""
  blended = memory_blend(output.features, memory, lasso=settings.msefm_lasso,
                         steps=settings.msefm_ista_steps, blend=settings.msefm_blend)
  return fused_logits(output.head, blended)


def evaluation_memory(features_fn, variables, inputs: Mapping[str, np.ndarray],
                     settings: MSEFMSettings, *, seed: int = 0, batch_size: int = 256
                     ) -> dict[str, Array]:
  """The test-time memory `D^(m)` [N, d_m]: the features `features_fn(variables,
  batch)` (inference mode) of `N = msefm_memory_size` training examples drawn
  without replacement (`seed`)."""
  available = len(next(iter(inputs.values())))
  size = settings.msefm_memory_size
  if size > available:
    raise ValueError(f"method_kwargs.msefm_memory_size: the test-time memory needs that many "
                     f"training examples, expected <= {available}, got {size}")
  rows = np.sort(np.random.default_rng(seed).choice(available, size, replace=False))
  chunks = [features_fn(variables, {m: x[rows[i:i + batch_size]] for m, x in inputs.items()})
            for i in range(0, size, batch_size)]
  return {m: jnp.concatenate([c[m] for c in chunks]).astype(jnp.float32) for m in chunks[0]}


def _inference_features(model, variables, inputs: Mapping[str, Array]) -> dict[str, Array]:
  return model.apply(variables, inputs, train=False).features


def prepare_defence(model, variables, train_inputs: Mapping[str, np.ndarray],
                    settings: MSEFMSettings, *, seed: int = 0, batch_size: int = 256) -> dict[str, Any]:
  """`{"variables", "memory"}` of the test-time defence: the evaluated model's
  variables and its memory of clean training features (`evaluation_memory`)."""
  features_fn = programs.compiled(_inference_features, model)  # One program per model.
  memory = evaluation_memory(features_fn, variables, train_inputs, settings, seed=seed,
                             batch_size=batch_size)
  return {"variables": variables, "memory": memory}


def defence_logits(model, settings: MSEFMSettings, defended: Mapping[str, Any],
                   inputs: Mapping[str, Array]) -> Array:
  """Fused logits [B, K] of the defended classifier (`defended_logits` of the
  evaluated model's output on `inputs`)."""
  output = model.apply(defended["variables"], inputs, train=False)
  return defended_logits(output, defended["memory"], settings)


# ExFMem at test time (`defence="msefm"` of the evaluators).
DEFENCE = Defence(settings=functools.partial(settings_of, "msefm"), prepare=prepare_defence,
                  logits=defence_logits)


@register("msefm", head="concat", settings=MSEFMSettings, init_state=init_state, defence=DEFENCE,
          description="MinSim + ExFMem: cross-modal dissimilarity + feature-memory reconstruction")
def make_objective(model, settings: MSEFMSettings):

  def loss_fn(params, state, batch, rng):
    del rng
    labels = batch["label"]
    msefm = state[STATE_KEY]
    size = next(iter(msefm["memory"].values())).shape[0]
    if size != settings.msefm_memory_size:
      raise ValueError(f"msefm: the state's memory has {size} rows, method_kwargs."
                       f"msefm_memory_size is {settings.msefm_memory_size} (create the state "
                       f"with msefm.init_state(model, variables, settings))")
    out, new_state = apply_model(model, params, state, batch["inputs"], train=True)
    features = defended_features(out.features, msefm, settings)
    logits = fused_logits(out.head, features)
    ce = cross_entropy(logits, labels)
    similarity = cross_modal_similarity(features)
    loss = ce + settings.msefm_sim_weight * similarity
    memory, pointer, count = write_memory(msefm["memory"], msefm["pointer"], msefm["count"],
                                          out.features)
    new_state = {**new_state, STATE_KEY: {"memory": memory, "pointer": pointer, "count": count}}
    return loss, (new_state, {"ce": ce, "similarity": similarity,
                              "accuracy": accuracy(logits, labels),
                              "memory_full": (count >= settings.msefm_memory_size).astype(jnp.float32)})

  return loss_fn

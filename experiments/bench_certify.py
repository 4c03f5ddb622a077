r"""Benchmark: local certified radii, vectorised (`mmsafe.certify.certify`) versus a
naive per-sample, per-class Python loop of single gradients.

  python -m experiments.bench_certify                       # Kinetics-Sounds shapes
  python -m experiments.bench_certify --batch=4 --image_size=64 --audio_frames=256 \
      --audio_bins=64 --naive_samples=1                     # a CPU-sized run

Defaults are Kinetics-Sounds shapes: visual [B, 3, 224, 224, 3], audio
[B, 1024, 128, 1], 31 classes, ResNet18 encoders, batch 64. The vectorised
path computes all K uni-modal score gradients of every sample and modality
with `vmap`-ed `jacrev` (or `jacfwd`) in one compiled call; the naive path
calls a compiled single-example, single-class gradient `B x M x K` times from
Python and assembles the radii with numpy (it is timed on `--naive_samples`
examples and extrapolated). Both give the same radii (checked). Prints a table;
not a test.
"""

from __future__ import annotations

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments import ks_shapes
from mmsafe import certify
from mmsafe import models

_BATCH = flags.DEFINE_integer("batch", 64, "Examples per certified batch.")
_HEAD = flags.DEFINE_enum("head", "orthogonal", ["concat", "orthogonal"], "Fusion head.")
_MODE = flags.DEFINE_enum("mode", "auto", ["auto", "jacfwd", "jacrev"], "Jacobian mode.")
_CHUNK = flags.DEFINE_integer("chunk_size", 0, "Examples per Jacobian chunk (0: whole batch).")
_NAIVE = flags.DEFINE_integer("naive_samples", 2, "Examples timed in the naive loop (0: skip).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions of the vectorised call.")
_PRECISION = flags.DEFINE_enum("precision", "highest", ["default", "high", "highest"],
                               "Matmul/conv precision (jax.default_matmul_precision).")


def random_variables(model, inputs, seed: int = 0):
  """Variables with the model's structure, filled with numpy (no init compile):
  He-scaled kernels, zero biases, identity batch-norm statistics, orthonormal W~."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), inputs)

  def fill(path, leaf):
    names = [str(getattr(p, "key", "")) for p in path]
    shape = leaf.shape
    if "w_tilde" in names:
      q, _ = np.linalg.qr(rng.normal(size=(shape[1], shape[0])))
      return jnp.asarray(q.T, jnp.float32)
    if "a" in names:
      return jnp.full(shape, 0.1, jnp.float32)
    if names[-1] in ("var", "scale"):
      return jnp.ones(shape, jnp.float32)
    if names[-1] in ("mean", "bias"):
      return jnp.zeros(shape, jnp.float32)
    fan_in = max(1, int(np.prod(shape[:-1])))
    return jnp.asarray(rng.normal(size=shape) * np.sqrt(2.0 / fan_in), jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def naive_radii(model, variables, inputs, labels, n: int):
  """Local radii of the first `n` examples, one gradient per (sample, modality, class)."""
  head = certify.head_params(model, variables)
  modalities = sorted(inputs)
  grads = {}
  for m in modalities:
    kernel = head.kernels[m]
    grads[m] = jax.jit(jax.grad(lambda x, k, m=m, kernel=kernel: (model.apply(
        variables, m, x[None], method="encode") @ kernel)[0, k]))
  logits = np.asarray(jax.jit(model.apply)(variables, inputs).logits)
  # Compile outside the timing.
  for m in modalities:
    grads[m](inputs[m][0], 0).block_until_ready()
  start = time.perf_counter()
  radii = []
  for b in range(n):
    g = {m: np.stack([np.asarray(grads[m](inputs[m][b], k)).ravel()
                      for k in range(logits.shape[1])]) for m in modalities}
    y = int(labels[b])
    if np.argmax(logits[b]) != y:
      radii.append(0.0)
      continue
    per_class = []
    for k in range(logits.shape[1]):
      if k == y:
        continue
      eta = []
      for m in modalities:
        if head.kind == "concat":
          eta.append(np.linalg.norm(g[m][y] - g[m][k]))
        else:
          a = np.abs(np.asarray(head.weights[m]))
          eta.append(a[y] * np.linalg.norm(g[m][y]) + a[k] * np.linalg.norm(g[m][k]))
      per_class.append((logits[b, y] - logits[b, k]) / np.sqrt(np.sum(np.square(eta))))
    radii.append(max(min(per_class), 0.0))
  return np.array(radii), time.perf_counter() - start


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  widths = ks_shapes.resnet_widths()
  shapes = ks_shapes.input_shapes()
  model = models.build({"head": _HEAD.value,
                        "encoders": {m: {"name": "resnet18", "widths": widths} for m in shapes}},
                       num_classes=ks_shapes.CLASSES.value, input_shapes=shapes)
  rng = np.random.default_rng(0)
  batch = _BATCH.value
  inputs = {m: jnp.asarray(rng.normal(size=(batch, *s)), jnp.float32) for m, s in shapes.items()}
  variables = random_variables(model, {m: x[:1] for m, x in inputs.items()})
  logits = jax.jit(model.apply)(variables, inputs).logits
  labels = jnp.argmax(logits, -1)  # every example correct: radii are positive
  chunk = _CHUNK.value or None
  precision = None if _PRECISION.value == "default" else _PRECISION.value
  run = jax.jit(lambda v, x, y: certify.certify(model, v, x, y, "local", mode=_MODE.value,
                                                chunk_size=chunk, precision=precision))
  print(f"devices: {jax.devices()}  backend: {jax.default_backend()}")
  print(f"shapes: { {m: (batch, *s) for m, s in shapes.items()} }, K={ks_shapes.CLASSES.value}, "
        f"ResNet18 widths {widths}, {_HEAD.value} head, precision {_PRECISION.value}")
  with jax.default_matmul_precision(_PRECISION.value):
    start = time.perf_counter()
    cert = run(variables, inputs, labels)
    cert.radius.block_until_ready()
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(_REPEATS.value):
      start = time.perf_counter()
      cert = run(variables, inputs, labels)
      cert.radius.block_until_ready()
      times.append(time.perf_counter() - start)
    vector_s = float(np.median(times))
    rows = [("vectorised (vmap + jacobian)", batch, vector_s, batch / vector_s)]
    if _NAIVE.value > 0:
      n = min(_NAIVE.value, batch)
      radii, naive_s = naive_radii(model, variables, inputs, labels, n)
      np.testing.assert_allclose(radii, np.asarray(cert.radius)[:n], rtol=2e-3)
      rows.append((f"naive loop ({n} samples x {len(shapes)} modalities x "
                   f"{ks_shapes.CLASSES.value} "
                   f"classes)", n, naive_s, n / naive_s))
  print(f"\nfirst call (compile + run): {compile_s:.2f} s; median of {_REPEATS.value} runs below")
  print(f"{'path':<58} {'samples':>7} {'seconds':>10} {'samples/s':>10}")
  for name, n, seconds, rate in rows:
    print(f"{name:<58} {n:>7} {seconds:>10.3f} {rate:>10.3f}")
  if len(rows) == 2:
    print(f"\nspeed-up of the vectorised path: {rows[0][3] / rows[1][3]:.1f}x "
          f"(radii agree to 2e-3 relative on the naive samples)")


if __name__ == "__main__":
  app.run(main)

r"""Benchmark: local certified radii, vectorised (`mmsafe.certify.certify`) versus a
naive per-sample, per-class Python loop of single gradients.

  python -m experiments.bench_certify                       # Kinetics-Sounds shapes
  python -m experiments.bench_certify --batch=4 --image_size=64 --audio_frames=256 \
      --audio_bins=64 --naive_samples=1                     # a CPU-sized run
  python -m experiments.bench_certify --batch_sizes=16,64,256 --frames=1 \
      --image_size=32 --audio_frames=64 --audio_bins=32 --widths=8,16,32,64 \
      --naive_samples=0                                     # vectorised vs per-example

Defaults are Kinetics-Sounds shapes: visual [B, 3, 224, 224, 3], audio
[B, 1024, 128, 1], 31 classes, ResNet18 encoders, batch 64. The vectorised
path computes all K uni-modal score gradients of every sample and modality
with `vmap`-ed `jacrev` (or `jacfwd`) in one compiled call; the naive path
calls a compiled single-example, single-class gradient `B x M x K` times from
Python and assembles the radii with numpy (it is timed on `--naive_samples`
examples and extrapolated). Both give the same radii (checked). With
`--batch_sizes`, times a direct `certify` call at each batch size (on a CPU
without `--chunk_size`: host chunks of about 64 / K examples, its default)
against a loop over its examples of the same call at B = 1 (radii checked
equal).
Prints tables, then the vectorised call's figures as one JSON line; not a test.
"""

from __future__ import annotations

import json
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
_COMPARE = flags.DEFINE_list("batch_sizes", [],
                              "Batch sizes at which to time the vectorised call against a "
                              "per-example loop of the compiled B = 1 call (e.g. 16,64,256).")
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


def _seconds(fn) -> float:
  """Wall time of one `fn()`, its result blocked on."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def _median_seconds(fn, repeats: int) -> float:
  """Median of `repeats` timed runs of `fn()` after one untimed (compiling) run."""
  jax.block_until_ready(fn())
  return float(np.median([_seconds(fn) for _ in range(repeats)]))


def compare_per_example(run, variables, inputs, labels, batches: list[int], repeats: int):
  """Rows `(B, vectorised s, per-example loop s)`: `run` on the first B examples at
  once versus `run` on one example at a time (the same radii, checked)."""
  rows = []
  for batch in batches:
    x = {m: v[:batch] for m, v in inputs.items()}
    singles = [({m: v[b:b + 1] for m, v in x.items()}, labels[b:b + 1]) for b in range(batch)]
    vectorised = lambda: run(variables, x, labels[:batch]).radius
    loop = lambda: [run(variables, xb, yb).radius for xb, yb in singles]
    np.testing.assert_allclose(np.concatenate(loop()), vectorised(), rtol=1e-4)
    # Interleaved, so that a change in the machine's load hits both alike.
    times = np.asarray([(_seconds(vectorised), _seconds(loop)) for _ in range(repeats)])
    rows.append((batch, *np.median(times, axis=0)))
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  shapes = ks_shapes.input_shapes()
  model = models.build({"head": _HEAD.value, "encoders": {m: ks_shapes.resnet() for m in shapes}},
                       num_classes=ks_shapes.CLASSES.value, input_shapes=shapes)
  rng = np.random.default_rng(0)
  batch = max([_BATCH.value] + [int(b) for b in _COMPARE.value])
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
        f"ResNet18 {ks_shapes.resnet()}, {_HEAD.value} head, precision {_PRECISION.value}")
  with jax.default_matmul_precision(_PRECISION.value):
    if _COMPARE.value:
      # The direct call (its default chunking: host chunks on a CPU) at each B, against
      # the same call one example at a time.
      direct = lambda v, x, y: certify.certify(model, v, x, y, "local", mode=_MODE.value,
                                               chunk_size=chunk, precision=precision)
      rows = compare_per_example(direct, variables, inputs, labels,
                                 [int(b) for b in _COMPARE.value], _REPEATS.value)
      print(f"\nmode {_MODE.value}, chunk_size {chunk}: median of {_REPEATS.value} runs")
      print(f"{'B':>5} {'vectorised s':>13} {'per-example s':>14} {'speed-up':>9}")
      for b, vector_s, loop_s in rows:
        print(f"{b:>5} {vector_s:>13.3f} {loop_s:>14.3f} {loop_s / vector_s:>8.2f}x")
    inputs = {m: x[:_BATCH.value] for m, x in inputs.items()}
    labels = labels[:_BATCH.value]
    batch = _BATCH.value
    compile_s = _seconds(lambda: run(variables, inputs, labels).radius)
    vector_s = float(np.median([_seconds(lambda: run(variables, inputs, labels).radius)
                                for _ in range(_REPEATS.value)]))
    cert = run(variables, inputs, labels)
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
  print(json.dumps({"what": "certify", "device": f"{jax.devices()[0].platform}:"
                    f"{jax.devices()[0].device_kind}", "batch": batch,
                    "compile_s": round(compile_s, 2), "seconds": round(vector_s, 4),
                    "samples_per_s": round(batch / vector_s, 2)}), flush=True)
  if len(rows) == 2:
    print(f"\nspeed-up of the vectorised path: {rows[0][3] / rows[1][3]:.1f}x "
          f"(radii agree to 2e-3 relative on the naive samples)")


if __name__ == "__main__":
  app.run(main)

r"""Benchmark: 1-Lipschitz convolution constructions (and free encoders) side by side.

  python -m experiments.bench_lipschitz                  # av_digits and mfeat shapes
  python -m experiments.bench_lipschitz --shapes=ks --batch=8 --image_size=64 \
      --audio_frames=256 --audio_bins=64                 # a CPU-sized Kinetics-Sounds run

For each encoder variant (free SmallCNN; LipschitzCNN with AOL, Cayley or AOL +
SLL residual convolutions; at `--shapes=ks` ResNet18 against LipschitzResNet
with AOL or Cayley stems) on two modalities, prints: the step time of a jitted
SGD training step (CE through the encoders and a concat head, batch
`--batch`, median of `--repeats`), the compiled step's memory (XLA's
temporary buffers plus arguments and outputs), the parameter count, the
time to compute the encoders' stated Lipschitz bounds, and the bounds
themselves. Accuracy and sound radii of the same variants come from training
runs (`experiments.compare_certified` with `--config.model.lipschitz_encoders.*`
overrides; see BUILD_NOTES.md). Not a test.
"""

from __future__ import annotations

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import ks_shapes
from mmsafe import models

_SHAPES = flags.DEFINE_enum("shapes", "embedded", ["embedded", "ks"],
                            "embedded: av_digits audio 100x40 and visual 16x15 images; ks: "
                            "Kinetics-Sounds clips and spectrograms (see the ks_shapes flags).")
_BATCH = flags.DEFINE_integer("batch", 64, "Training batch.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed training steps (median).")

EMBEDDED = {
    "free cnn": {"name": "cnn", "channels": (32, 64), "features": 128},
    "lip_cnn aol": {"name": "lip_cnn", "channels": (16, 32), "features": 128, "conv": "aol"},
    "lip_cnn cayley": {"name": "lip_cnn", "channels": (16, 32), "features": 128,
                       "conv": "cayley"},
    "lip_cnn aol+sll": {"name": "lip_cnn", "channels": (16, 32), "features": 128, "conv": "aol",
                        "residual_blocks": 1},
}


def ks_variants() -> dict[str, dict]:
  widths = ks_shapes.resnet_widths()
  return {
      "free resnet18": {"name": "resnet18", "widths": widths},
      "lip_resnet aol": {"name": "lip_resnet", "widths": widths, "features": widths[-1]},
      "lip_resnet cayley": {"name": "lip_resnet", "widths": widths, "features": widths[-1],
                            "conv": "cayley"},
  }


def measure(encoder: dict, shapes: dict, num_classes: int, batch: int, repeats: int) -> dict:
  """Step time, memory, parameters and the bound computation of one encoder
  variant used for every modality."""
  model = models.build({"head": "concat", "encoders": {m: encoder for m in shapes}},
                       num_classes=num_classes, input_shapes=shapes)
  keys = jax.random.split(jax.random.PRNGKey(0), len(shapes) + 1)
  inputs = {m: jax.random.normal(k, (batch, *s)) for (m, s), k in zip(sorted(shapes.items()),
                                                                    keys)}
  labels = jnp.arange(batch) % num_classes
  variables = jax.jit(model.init)(keys[-1], inputs)
  tx = optax.sgd(1e-3, momentum=0.9)
  state = (variables, tx.init(variables["params"]))

  def step(state, inputs, labels):
    variables, opt_state = state
    others = {k: v for k, v in variables.items() if k != "params"}

    def loss_fn(params):
      out, updated = model.apply({"params": params, **others}, inputs, train=True,
                                 mutable=list(others))
      loss = optax.softmax_cross_entropy_with_integer_labels(out.logits, labels).mean()
      return loss, updated

    (_, updated), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    updates, opt_state = tx.update(grads, opt_state, variables["params"])
    return ({"params": optax.apply_updates(variables["params"], updates), **updated},
            opt_state)

  compiled = jax.jit(step).lower(state, inputs, labels).compile()
  memory = compiled.memory_analysis()
  state = compiled(state, inputs, labels)
  jax.block_until_ready(state)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state = compiled(state, inputs, labels)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - start)
  bound_fn = jax.jit(lambda v: model.apply(v, method="feature_lipschitz"))
  start = time.perf_counter()
  bounds = jax.block_until_ready(bound_fn(state[0]))
  bound_seconds = time.perf_counter() - start
  mib = 0.0
  if memory is not None:
    mib = (memory.temp_size_in_bytes + memory.argument_size_in_bytes
           + memory.output_size_in_bytes) / 2**20
  params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state[0]["params"]))
  return {"step_ms": 1e3 * float(np.median(times)), "memory_mib": mib, "params": params,
          "bound_s": bound_seconds, "bounds": {m: float(b) for m, b in bounds.items()}}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _SHAPES.value == "embedded":
    shapes, num_classes, variants = {"audio": (100, 40, 1), "visual": (16, 15, 1)}, 10, EMBEDDED
  else:
    shapes, num_classes, variants = ks_shapes.input_shapes(), ks_shapes.CLASSES.value, ks_variants()
  print(f"{jax.devices()[0].platform}, jax {jax.__version__}, batch {_BATCH.value}, shapes "
        f"{shapes}")
  print("| encoders | train step (ms) | step memory (MiB) | parameters | bound time (s) | "
        "stated bounds |")
  print("|---|---|---|---|---|---|")
  for name, encoder in variants.items():
    row = measure(encoder, shapes, num_classes, _BATCH.value, _REPEATS.value)
    bounds = ", ".join(f"{m} {b:.4g}" for m, b in sorted(row["bounds"].items()))
    print(f"| {name} | {row['step_ms']:.1f} | {row['memory_mib']:.0f} | {row['params']:,} | "
          f"{row['bound_s']:.2f} | {bounds} |", flush=True)


if __name__ == "__main__":
  app.run(main)

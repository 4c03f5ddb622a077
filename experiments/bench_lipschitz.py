r"""Benchmark: 1-Lipschitz convolution constructions (and free encoders) side by side.

  python -m experiments.bench_lipschitz                  # av_digits and mfeat shapes
  python -m experiments.bench_lipschitz --shapes=ks --batch=32 --image_size=64 \
      --audio_frames=256 --audio_bins=64 --nobounds      # a CPU-sized Kinetics-Sounds run

For each encoder variant (free SmallCNN; LipschitzCNN with AOL, Cayley or AOL +
SLL residual convolutions; at `--shapes=ks` ResNet18 against LipschitzResNet
variants: stems, widths, AOL or Cayley stem convolutions) on two modalities,
prints: the step time of a jitted SGD training step (CE through the encoders
and a concat head, batch `--batch`), the compiled step's memory (XLA's
temporary buffers plus arguments and outputs), the parameter count, the time
to compute the encoders' stated Lipschitz bounds (`--bounds`), and the bounds
themselves. Every variant is compiled first; then the steps are timed
interleaved (one step of each variant per round, `--repeats` rounds, median),
so the ratios to the first variant (the free encoder) compare the same
machine load. `--variants` picks variants by name (comma-separated). Accuracy
and sound radii of the same variants come from training runs
(`experiments.compare_certified` with `--config.model.lipschitz_encoders.*`
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
_REPEATS = flags.DEFINE_integer("repeats", 5, "Interleaved rounds of timed steps (median).")
_VARIANTS = flags.DEFINE_list("variants", None, "Variant names to run (default: all of the "
                              "shapes' variants; the first is the reference of the ratios).")
_BOUNDS = flags.DEFINE_bool("bounds", True, "Time the stated bounds (the free ResNet18's takes "
                            "minutes at Kinetics-Sounds shapes).")

EMBEDDED = {
    "free cnn": {"name": "cnn", "channels": (32, 64), "features": 128},
    "lip_cnn aol": {"name": "lip_cnn", "channels": (16, 32), "features": 128, "conv": "aol"},
    "lip_cnn cayley": {"name": "lip_cnn", "channels": (16, 32), "features": 128,
                       "conv": "cayley"},
    "lip_cnn aol+sll": {"name": "lip_cnn", "channels": (16, 32), "features": 128, "conv": "aol",
                        "residual_blocks": 1},
}


def ks_variants() -> dict[str, dict]:
  """ResNet18 and LipschitzResNet variants at the `--widths`: `lip_resnet` as
  `experiments/configs/clips.py`'s `lipschitz` encoders (stem block 2);
  `narrow`: the last stage as wide as the one before it; `stem4`: ResNet18's
  resolutions; `cayley`: a Cayley stem convolution."""
  widths = ks_shapes.resnet_widths()
  lip = ks_shapes.resnet("lip_resnet", features=widths[-1], stem_block=2)
  return {
      "free resnet18": ks_shapes.resnet(),
      "lip_resnet": lip,
      "lip_resnet narrow": {**lip, "widths": (*widths[:-1], widths[-2]), "features": widths[-2]},
      "lip_resnet stem4": {**lip, "stem_block": 4},
      "lip_resnet cayley": {**lip, "conv": "cayley"},
  }


def compile_step(encoder: dict, shapes: dict, num_classes: int, batch: int) -> dict:
  """One encoder variant used for every modality: its compiled SGD train step,
  its state after one (compiling) step, its batch and model."""
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
  state = jax.block_until_ready(compiled(state, inputs, labels))
  return {"model": model, "compiled": compiled, "state": state, "inputs": inputs,
          "labels": labels, "times": []}


def time_step(run: dict) -> None:
  """Times one more train step of a compiled variant (appended to its times)."""
  start = time.perf_counter()
  run["state"] = jax.block_until_ready(run["compiled"](run["state"], run["inputs"],
                                                       run["labels"]))
  run["times"].append(time.perf_counter() - start)


def summary(run: dict, bounds: bool) -> dict:
  """Median step time, memory, parameters and (with `bounds`) the stated bounds."""
  memory = run["compiled"].memory_analysis()
  mib = 0.0
  if memory is not None:
    mib = (memory.temp_size_in_bytes + memory.argument_size_in_bytes
           + memory.output_size_in_bytes) / 2**20
  params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(run["state"][0]["params"]))
  row = {"step_ms": 1e3 * float(np.median(run["times"])), "memory_mib": mib, "params": params,
         "bound_s": float("nan"), "bounds": {}}
  if bounds:
    bound_fn = jax.jit(lambda v: run["model"].apply(v, method="feature_lipschitz"))
    start = time.perf_counter()
    values = jax.block_until_ready(bound_fn(run["state"][0]))
    row.update(bound_s=time.perf_counter() - start,
               bounds={m: float(b) for m, b in values.items()})
  return row


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _SHAPES.value == "embedded":
    shapes, num_classes, variants = {"audio": (100, 40, 1), "visual": (16, 15, 1)}, 10, EMBEDDED
  else:
    shapes, num_classes, variants = ks_shapes.input_shapes(), ks_shapes.CLASSES.value, ks_variants()
  print(f"{jax.devices()[0].platform}, jax {jax.__version__}, batch {_BATCH.value}, shapes "
        f"{shapes}")
  if _VARIANTS.value:
    unknown = sorted(set(_VARIANTS.value) - set(variants))
    if unknown:
      raise app.UsageError(f"--variants: expected names from {list(variants)}, got {unknown}")
    variants = {name: variants[name] for name in _VARIANTS.value}
  runs = {name: compile_step(encoder, shapes, num_classes, _BATCH.value)
          for name, encoder in variants.items()}
  for _ in range(_REPEATS.value):
    for run in runs.values():
      time_step(run)
  print("| encoders | train step (ms) | ratio | step memory (MiB) | parameters | bound time (s) | "
        "stated bounds |")
  print("|---|---|---|---|---|---|---|")
  reference = None
  for name, run in runs.items():
    row = summary(run, _BOUNDS.value)
    reference = reference or row["step_ms"]
    bounds = ", ".join(f"{m} {b:.4g}" for m, b in sorted(row["bounds"].items())) or "-"
    print(f"| {name} | {row['step_ms']:.1f} | {row['step_ms'] / reference:.2f} | "
          f"{row['memory_mib']:.0f} | {row['params']:,} | {row['bound_s']:.2f} | {bounds} |",
          flush=True)


if __name__ == "__main__":
  app.run(main)

r"""Benchmark (not a test): l2-PGD throughput on Kinetics-Sounds-shaped inputs.

Default shapes are CRMT's KS setting: visual [B, 3, 224, 224, 3] (3 frames),
audio [B, 1024, 128, 1] (spectrogram), a ResNet18 per modality, 31 classes,
batch 64, the `paper_reference` protocol (4 steps of eps/3). On a GPU:

  python -m experiments.bench_attacks

Shrunk for a CPU:

  python -m experiments.bench_attacks --batch_size=4 --image_size=64 \
      --audio_frames=256 --audio_bins=64 --frames=1 --widths=16,32,64,128

Prints one JSON line per measurement (samples/s = batch / seconds per attack
call, after compilation; the median over --repeats calls).
"""

import json
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments import ks_shapes
from mmsafe import attacks
from mmsafe import models

_BATCH = flags.DEFINE_integer("batch_size", 64, "Examples per attack call.")
_HEAD = flags.DEFINE_enum("head", "concat", ["concat", "orthogonal"], "Fusion head.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Encoder dtype.")
_PROTOCOLS = flags.DEFINE_list("protocols", ["paper_reference"],
                               "PGD protocol presets to time (mmsafe.attacks.PROTOCOLS).")
_SCOPES = flags.DEFINE_list("scopes", ["multi"], "'multi' and/or modality names (audio, visual).")
_EPS = flags.DEFINE_float("eps", 0.5, "Attack radius.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per measurement.")


def _time(fn, *args, repeats):
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return compile_s, float(np.median(times))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  b = _BATCH.value
  widths = ks_shapes.resnet_widths()
  shapes = ks_shapes.input_shapes(fold_single_frame=True)
  model = models.build({"head": _HEAD.value, "dtype": _DTYPE.value,
                        "encoders": {m: {"name": "resnet18", "widths": widths} for m in shapes}},
                       num_classes=ks_shapes.CLASSES.value, input_shapes=shapes)
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  inputs = {m: jax.random.normal(k, (b,) + s, jnp.float32)
            for k, (m, s) in zip(keys[:2], sorted(shapes.items()))}
  labels = jax.random.randint(keys[2], (b,), 0, ks_shapes.CLASSES.value)
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), {m: x[:1] for m, x in inputs.items()})
  apply_fn = lambda v, x: model.apply(v, x, train=False).logits
  common = {"device": str(jax.devices()[0]), "backend": jax.default_backend(), "batch": b,
            "shapes": {m: list(s) for m, s in shapes.items()}, "widths": list(widths),
            "dtype": _DTYPE.value, "num_classes": ks_shapes.CLASSES.value}

  forward = jax.jit(apply_fn)
  compile_s, seconds = _time(forward, variables, inputs, repeats=_REPEATS.value)
  print(json.dumps({**common, "what": "forward", "compile_s": round(compile_s, 2),
                    "seconds": round(seconds, 4), "samples_per_s": round(b / seconds, 1)}),
        flush=True)
  for name in _PROTOCOLS.value:
    protocol = attacks.get_protocol(name)
    for scope in _SCOPES.value:
      modalities = None if scope == "multi" else scope

      def attack(v, x, y, key, protocol=protocol, modalities=modalities):
        return attacks.pgd(lambda i: apply_fn(v, i), x, y, key, modalities=modalities,
                           **protocol.pgd_kwargs(_EPS.value))

      compile_s, seconds = _time(jax.jit(attack), variables, inputs, labels,
                                 jax.random.PRNGKey(2), repeats=_REPEATS.value)
      gradients = protocol.restarts * protocol.steps
      print(json.dumps({**common, "what": f"pgd/{name}", "scope": scope,
                        "steps": protocol.steps, "restarts": protocol.restarts,
                        "compile_s": round(compile_s, 2), "seconds": round(seconds, 4),
                        "samples_per_s": round(b / seconds, 1),
                        "input_gradients_per_s": round(b * gradients / seconds, 1)}),
            flush=True)


if __name__ == "__main__":
  app.run(main)

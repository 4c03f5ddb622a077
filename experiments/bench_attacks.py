r"""Benchmark (not a test): attack throughput per loop strategy.

Two models: "ks" (default), CRMT's Kinetics-Sounds setting: visual
[B, 3, 224, 224, 3] (3 frames), audio [B, 1024, 128, 1], a ResNet18 per
modality, 31 classes, batch 64; and "mfeat", the mfeat JT model of
`experiments/configs/embedded.py` (pix [16, 15, 1] through the small CNN,
fou [76] through the MLP, 10 classes). On a GPU:

  python -m experiments.bench_attacks

On a CPU, the mfeat JT model at B = 128, the 10-step and default protocols,
the old form (the whole attack jitted, `lax.fori_loop` nest) against the new
default (`loop="auto"`: a host loop over steps compiled once on XLA:CPU):

  python -m experiments.bench_attacks --model=mfeat --batch_size=128 \
      --protocols=fast,default --loops=fori,auto,scan --decoupling

Loops: "fori" / "scan" jit the whole attack (traced loops: rolled / small
loops unrolled); "python" / "auto" call the attack as the evaluators do
(`Partial(apply_fn, variables)`, eps an array: nothing recompiles per call).
Prints one JSON line per measurement (seconds per attack call after
compilation, the median over --repeats calls; measurements of one process
share its machine load, so compare ratios within one run).
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

_MODEL = flags.DEFINE_enum("model", "ks", ["ks", "mfeat"], "Benchmark model (see above).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Examples per attack call.")
_HEAD = flags.DEFINE_enum("head", "concat", ["concat", "orthogonal"], "Fusion head.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Encoder dtype.")
_PROTOCOLS = flags.DEFINE_list("protocols", ["paper_reference"],
                               "PGD protocol presets to time (mmsafe.attacks.PROTOCOLS).")
_LOOPS = flags.DEFINE_list("loops", ["fori", "auto"],
                           "Loop strategies to time (mmsafe.attacks.engine.LOOPS).")
_SCOPES = flags.DEFINE_list("scopes", ["multi"], "'multi' and/or modality names.")
_EPS = flags.DEFINE_float("eps", 0.5, "Attack radius.")
_DECOUPLING = flags.DEFINE_bool("decoupling", False,
                                "Also time the decoupling attack (defaults, 1% of entries).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per measurement.")

_MFEAT_SHAPES = {"pix": (16, 15, 1), "fou": (76,)}
_MFEAT_ENCODERS = {"pix": {"name": "cnn", "channels": (32, 64), "features": 128},
                   "fou": {"name": "mlp", "widths": (256, 128)}}


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


def _model():
  """`(model, input shapes, classes, description)` of --model."""
  if _MODEL.value == "mfeat":
    encoders, shapes, classes = _MFEAT_ENCODERS, _MFEAT_SHAPES, 10
  else:
    shapes, classes = ks_shapes.input_shapes(fold_single_frame=True), ks_shapes.CLASSES.value
    encoders = {m: ks_shapes.resnet() for m in shapes}
  model = models.build({"head": _HEAD.value, "dtype": _DTYPE.value, "encoders": encoders},
                       num_classes=classes, input_shapes=shapes)
  return model, shapes, classes


def _compiled(attack, loop):
  """`attack(variables, inputs, labels, key, eps, loop=...)` as the caller runs it:
  jitted whole for a traced loop, called as is for "python" / "auto"."""
  if loop in ("python", "auto"):
    return lambda *args: attack(*args, loop=loop)
  return jax.jit(lambda *args: attack(*args, loop=loop))


def _measure(what, attack, loop, args, record, gradients):
  compile_s, seconds = _time(_compiled(attack, loop), *args, repeats=_REPEATS.value)
  b = record["batch"]
  print(json.dumps({**record, "what": what, "loop": loop, "compile_s": round(compile_s, 2),
                    "ms_per_batch": round(1000 * seconds, 1),
                    "samples_per_s": round(b / seconds, 1),
                    "input_gradients_per_s": round(b * gradients / seconds, 1)}), flush=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  b = _BATCH.value
  model, shapes, classes = _model()
  keys = jax.random.split(jax.random.PRNGKey(0), len(shapes) + 1)
  inputs = {m: jax.random.normal(k, (b,) + s, jnp.float32)
            for k, (m, s) in zip(keys[:-1], sorted(shapes.items()))}
  labels = jax.random.randint(keys[-1], (b,), 0, classes)
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), {m: x[:1] for m, x in inputs.items()})
  apply_fn = lambda v, x: model.apply(v, x, train=False).logits
  record = {"device": str(jax.devices()[0]), "backend": jax.default_backend(),
            "model": _MODEL.value, "batch": b, "shapes": {m: list(s) for m, s in shapes.items()},
            "dtype": _DTYPE.value, "num_classes": classes}

  compile_s, seconds = _time(jax.jit(apply_fn), variables, inputs, repeats=_REPEATS.value)
  print(json.dumps({**record, "what": "forward", "compile_s": round(compile_s, 2),
                    "ms_per_batch": round(1000 * seconds, 1)}), flush=True)
  args = (variables, inputs, labels, jax.random.PRNGKey(2), jnp.float32(_EPS.value))
  for name in _PROTOCOLS.value:
    protocol = attacks.get_protocol(name)
    for scope in _SCOPES.value:

      def pgd(v, x, y, key, eps, loop, protocol=protocol, scope=scope):
        return attacks.pgd(jax.tree_util.Partial(apply_fn, v), x, y, key, loop=loop,
                           modalities=None if scope == "multi" else scope,
                           **protocol.pgd_kwargs(eps))

      for loop in _LOOPS.value:
        _measure(f"pgd/{name}/{scope}", pgd, loop, args, record,
                 protocol.restarts * protocol.steps)
  if _DECOUPLING.value:
    count = int(0.01 * sum(int(np.prod(s)) for s in shapes.values()))

    def decoupling(v, x, y, key, eps, loop):
      del eps
      return attacks.decoupling(jax.tree_util.Partial(apply_fn, v), x, y, key, count=count,
                                loop=loop)

    for loop in _LOOPS.value:
      _measure("decoupling/multi", decoupling, loop, args, record, 8 * 11)


if __name__ == "__main__":
  app.run(main)

r"""Benchmark (not a test): CRMT step-1 train-step throughput and model FLOPs utilisation.

Default shapes are CRMT's Kinetics-Sounds setting: visual [B, 3, 224, 224, 3]
(3 frames), audio [B, 1024, 128, 1] (log-mel spectrogram), a ResNet18 per
modality, the orthogonal head, 31 classes, global batch 64, SGD with momentum
and weight decay (the paper's optimizer), CE + rho * L1. On a GPU:

  python -m experiments.bench_train --dtype=bfloat16

Shrunk for a CPU:

  python -m experiments.bench_train --batch_size=8 --image_size=64 --frames=1 \
      --audio_frames=256 --audio_bins=64 --steps=3 --warmup=1

What it measures: the whole jitted `make_train_step` (forward, backward, Stiefel
retraction, optimizer update) with the train state donated and the batch
already on the device(s) (random data; the input pipeline is benchmarked by
`experiments/bench_pipeline.py`), `--steps` steps after `--warmup`, one
`block_until_ready` at the end. Encoders run in `--dtype` (bfloat16: bf16
convolutions with float32 parameters; the head, the L1 margin and the bounds stay
float32). Layout: Flax convolutions are NHWC (channels last), the layout cuDNN's
tensor-core kernels use; XLA chooses the final layouts.

FLOPs: "analytic" counts every convolution and dense layer of the model from its
shapes (2 x MACs) and a training step as 3 x the forward pass (forward,
gradient w.r.t. activations, gradient w.r.t. weights); about 60 GFLOP per sample
at the KS shapes. "xla" is XLA's cost analysis of the compiled step (on GPU it
undercounts convolutions run as cuDNN custom calls). MFU = analytic FLOP/s /
peak FLOP/s (`--peak_tflops`, or a table of dense peaks by device kind and
dtype; none on CPU). With `--encoder=lip_resnet` (1-Lipschitz layers that call
`lax` convolutions directly) only XLA's count is given, and no MFU.

`--profile_dir` writes a `jax.profiler` trace of `--profile_steps` steps
(open in TensorBoard / Perfetto) to see what bounds the step.

Prints one JSON line.
"""

import json
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments import ks_shapes
from mmsafe import methods
from mmsafe import models
from mmsafe.train import TrainState, make_optimizer
from mmsafe.train.parallel import DataParallel

_BATCH = flags.DEFINE_integer("batch_size", 64, "Global batch (examples per step).")
_ENCODER = flags.DEFINE_enum("encoder", "resnet18", ["resnet18", "lip_resnet"],
                             "Encoder per modality: the paper's ResNet18, or mmsafe's 1-Lipschitz "
                             "lip_resnet at the same widths.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Encoder dtype.")
_INPUT_DTYPE = flags.DEFINE_enum("input_dtype", None, ["float32", "bfloat16"],
                                 "Dtype of the batch on the device (default: --dtype).")
_PARALLEL = flags.DEFINE_enum("parallel", "none", ["none", "jit", "pmap"],
                              "Data parallelism over the local devices (mmsafe.train.parallel).")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
_PEAK = flags.DEFINE_float("peak_tflops", None, "Peak dense TFLOP/s per device for MFU "
                           "(default: from the device kind; none on CPU).")
_PROFILE_DIR = flags.DEFINE_string("profile_dir", None, "Write a profiler trace here.")
_PROFILE_STEPS = flags.DEFINE_integer("profile_steps", 5, "Steps in the profiler trace.")

# Dense (no sparsity) peak TFLOP/s per device: bfloat16 tensor cores; float32 runs
# as TF32 on tensor cores under XLA's default precision on these GPUs.
PEAK_TFLOPS = {
    "H100": {"bfloat16": 989.0, "float32": 494.0},  # SXM
    "H200": {"bfloat16": 989.0, "float32": 494.0},
    "A100": {"bfloat16": 312.0, "float32": 156.0},
}


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  """The table's dense peak for a device kind (e.g. "NVIDIA H100 80GB HBM3")."""
  for name, peaks in PEAK_TFLOPS.items():
    if name in device_kind:
      return peaks[dtype]
  return None


def forward_flops(model, variables, inputs) -> dict[str, float]:
  """Forward FLOPs (2 x multiply-adds) of every `nn.Conv` and `nn.Dense` call, per
  modality ("head" for the rest), from the shapes seen in one abstract forward pass."""
  totals: dict[str, float] = {}

  def count(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name == "__call__" and isinstance(module, (nn.Conv, nn.Dense)):
      x = args[0]
      in_features = x.shape[-1]
      if isinstance(module, nn.Conv):
        window = int(np.prod(module.kernel_size))
        macs = np.prod(out.shape[:-1]) * out.shape[-1] * window * in_features
        macs /= module.feature_group_count
      else:
        macs = np.prod(x.shape[:-1]) * in_features * out.shape[-1]
      path = module.scope.path if module.scope is not None else ()
      owner = next((p.removeprefix("encoders_") for p in path if p.startswith("encoders_")),
                   "head")
      totals[owner] = totals.get(owner, 0.0) + 2.0 * float(macs)
    return out

  with nn.intercept_methods(count):
    jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, inputs)
  return totals


def _sig(x: float, digits: int = 4) -> float:
  return float(f"{x:.{digits}g}")


def _cost(compiled) -> dict:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return dict(analysis or {})


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  batch_size = _BATCH.value
  shapes = ks_shapes.input_shapes()
  resnet = (ks_shapes.resnet() if _ENCODER.value == "resnet18" else
            ks_shapes.resnet("lip_resnet", features=ks_shapes.resnet_widths()[-1]))
  model = models.build({"head": "orthogonal", "dtype": _DTYPE.value,
                        "encoders": {"visual": resnet, "audio": resnet}},
                       num_classes=ks_shapes.CLASSES.value, input_shapes=shapes)
  method = methods.get("crmt")
  # Kinetics-Sounds in the paper: SGD, lr 1e-3, momentum 0.9, weight decay 1e-4.
  optimizer = make_optimizer({"name": "sgd", "learning_rate": 1e-3, "momentum": 0.9,
                              "weight_decay": 1e-4}, steps_per_epoch=300)

  par = DataParallel.create(_PARALLEL.value)
  if par.mesh is not None and par.mesh.size != jax.local_device_count():
    raise app.UsageError("bench_train runs on one process")
  par.check_batch_size("batch_size", batch_size)
  init_rng, data_rng, train_rng = jax.random.split(jax.random.PRNGKey(0), 3)
  input_dtype = np.dtype(jnp.dtype(_INPUT_DTYPE.value or _DTYPE.value))
  keys = jax.random.split(data_rng, len(shapes))
  host_batch = {
      "inputs": {m: np.asarray(jax.random.normal(k, (batch_size, *s), jnp.float32)
                               ).astype(input_dtype) for k, (m, s) in zip(keys, shapes.items())},
      "label": np.asarray(jax.random.randint(data_rng, (batch_size,), 0, ks_shapes.CLASSES.value),
                          np.int32)}
  example = {m: x[:2] for m, x in host_batch["inputs"].items()}
  variables = jax.jit(model.init)(init_rng, example)
  method_kwargs = {"rho": 2.0, "l1_floor": 1e-5}
  state = TrainState.create(variables, optimizer, train_rng,
                            method.init_state(model, variables, method_kwargs))
  flops = forward_flops(model, variables, {m: jnp.asarray(x[:1]) for m, x in example.items()})
  # The 1-Lipschitz layers call lax convolutions directly: not counted, so no analytic MFU.
  train_flops_per_sample = 3.0 * sum(flops.values()) if _ENCODER.value == "resnet18" else None

  train_model = (model if par.batch_norm_axis_name is None else models.build(
      {"head": "orthogonal", "dtype": _DTYPE.value,
       "batch_norm_axis_name": par.batch_norm_axis_name,
       "encoders": {"visual": resnet, "audio": resnet}},
      num_classes=ks_shapes.CLASSES.value, input_shapes=shapes))
  step = par.compile_train_step(method(train_model, method_kwargs), optimizer)
  batch = par.put_batch(host_batch, batch_size)
  state = par.put(state)

  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  xla = _cost(compiled)
  step = compiled
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  for _ in range(_WARMUP.value):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(_STEPS.value):
    state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))
  seconds = (time.perf_counter() - start) / _STEPS.value
  if _PROFILE_DIR.value:
    with jax.profiler.trace(_PROFILE_DIR.value):
      for _ in range(_PROFILE_STEPS.value):
        state, metrics = step(state, batch)
      jax.block_until_ready((state, metrics))

  device = jax.devices()[0]
  peak = _PEAK.value or peak_tflops(device.device_kind, _DTYPE.value)
  # A jit-sharded program's cost analysis is per device.
  xla_flops = xla.get("flops") and xla["flops"] * (par.num_devices if par.mode == "jit" else 1)
  report = {
      "device": f"{device.platform}:{device.device_kind}", "devices": par.num_devices,
      "parallel": par.mode, "jax": jax.__version__, "encoder": _ENCODER.value,
      "dtype": _DTYPE.value, "input_dtype": str(input_dtype), "batch_size": batch_size,
      "shapes": {m: list(s) for m, s in shapes.items()}, "encoder_config": resnet,
      "compile_s": round(compile_s, 2), "step_ms": round(1e3 * seconds, 3),
      "samples_per_s": round(batch_size / seconds, 2),
      "xla_cost_analysis": {
          "gflop_per_sample": _sig(xla_flops / batch_size / 1e9) if xla_flops else None,
          "gbytes_accessed_per_step": (round(xla["bytes accessed"] / 1e9, 3)
                                       if "bytes accessed" in xla else None)},
      "loss": float(np.asarray(par.get(metrics)["loss"])),
      "mfu": None,
  }
  if train_flops_per_sample:
    achieved = train_flops_per_sample * batch_size / seconds
    report.update({
        "analytic_gflop_per_sample": {
            "train": _sig(train_flops_per_sample / 1e9),
            "forward": {k: _sig(v / 1e9) for k, v in sorted(flops.items())}},
        "achieved_tflops": _sig(achieved / 1e12), "peak_tflops_per_device": peak,
        "mfu": round(achieved / (peak * 1e12 * par.num_devices), 4) if peak else None})
    if xla_flops:
      report["xla_cost_analysis"]["fraction_of_analytic"] = round(
          xla_flops / (train_flops_per_sample * batch_size), 3)
  print(json.dumps(report), flush=True)


if __name__ == "__main__":
  app.run(main)

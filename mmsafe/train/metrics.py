"""Training metrics: the `metrics.jsonl` writer and the per-step metrics kept
between log events (saved in checkpoints, so a resumed run logs the same lines)."""

from __future__ import annotations

from collections.abc import Mapping
import json
import math
import os

import jax
import numpy as np

from mmsafe.files import to_builtin


# Metrics the loop writes once training is over ("test/accuracy", ...): a resumed
# run writes them again, so resuming drops them whatever their step.
FINAL_PREFIX = "test/"


def _line_step(line: str) -> int | None:
  """The step of a metrics line; None for a line torn by a killed process or a
  line of final metrics (`FINAL_PREFIX`)."""
  try:
    record = json.loads(line) if line.endswith("\n") else None
  except ValueError:
    return None
  if record is None or any(key.startswith(FINAL_PREFIX) for key in record):
    return None
  return int(record.get("step", 0))


class MetricsWriter:
  """Appends JSON lines `{"step": ..., **metrics}` to `path`; on resume drops the
  lines past `resume_step`, the final metrics and a last line torn by a killed
  process; a fresh run (`resume_step` None) starts a new file."""

  def __init__(self, path: str, resume_step: int | None):
    self._path = path
    if resume_step is not None and os.path.exists(path):
      with open(path) as f:
        kept = [line for line in f
                if (step := _line_step(line)) is not None and step <= resume_step]
      with open(path + ".tmp", "w") as f:
        f.writelines(kept)
      os.replace(path + ".tmp", path)
    elif resume_step is None and os.path.exists(path):
      os.remove(path)

  def write(self, step: int, **metrics) -> None:
    with open(self._path, "a") as f:
      f.write(json.dumps({"step": int(step), **metrics}, default=to_builtin) + "\n")


class NullWriter:
  """The metrics writer of processes other than process 0."""

  def write(self, step: int, **metrics) -> None:
    del step, metrics


def mean_metrics(pending: list[dict], step: int) -> dict[str, float]:
  """Means of per-step metrics (host values); raises on a non-finite loss."""
  stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *pending)
  summary = {k: float(np.mean(v)) for k, v in stacked.items()}
  if not math.isfinite(summary["loss"]):
    raise FloatingPointError(f"non-finite training loss {summary['loss']} at step {step}")
  return summary


def pending_to_json(pending: list[dict]) -> dict:
  """Not-yet-logged per-step metrics (host values) -> JSON (exact: dtype + values)."""
  if not pending:
    return {}
  return {k: {"dtype": str(np.asarray(pending[0][k]).dtype),
              "values": [np.asarray(m[k]).item() for m in pending]} for k in pending[0]}


def pending_from_json(payload: Mapping) -> list[dict]:
  """The inverse of `pending_to_json`."""
  if not payload:
    return []
  length = len(next(iter(payload.values()))["values"])
  return [{k: np.asarray(v["values"][i], dtype=v["dtype"]) for k, v in payload.items()}
          for i in range(length)]

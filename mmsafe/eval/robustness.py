"""Robustness evaluation suite over a dataset split (pure: returns plain dicts).

What it measures (CRMT, Yang et al., ICLR 2024, Sec. 4 / Tables 1-2 / Fig. 1
and 4; MUROAN, Vishwamitra et al. 2021):

* clean accuracy;
* robust accuracy against l2 FGM (cross-entropy, as in the paper) and l2-PGD
  (the chosen protocol) over an eps grid, for the multi-modal attack (all
  modalities, joint budget; scope "multi") and for each uni-modal attack
  (scope = the modality name);
* accuracy with each modality missing (replaced by a fill);
* the decoupling (l0) attack's success rate against the fraction of input
  entries it may change (jointly over modalities, or within one).

Definitions. An example is *robust* at eps when it is classified correctly
both clean and under the attack, so robust accuracy <= clean accuracy. Every
attack at a smaller eps (or l0 budget) is also a valid attack at a larger one,
so for PGD and the decoupling attack the reported curve is the per-example
worst case over the grid points up to eps (`accuracy`, monotone in eps by
construction); the independent per-eps numbers are kept as `accuracy_raw`
(`asr_raw`). FGM is reported per eps as is (its known non-monotonicity is
part of what it measures). The attack success rate (ASR) is the fraction of
clean-correct examples that the attack makes misclassified.

Each attack compiles once per (kind, scope); eps / budgets are traced
arguments. Python loops here run over grid points and batches only; every
attack's own iterations are inside `lax` loops.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmsafe import attacks
from mmsafe.attacks import common
from mmsafe.attacks.decoupling import budget as decoupling_budget
from mmsafe.attacks.pgd import PGDProtocol, get_protocol
from mmsafe.data.pipeline import eval_batches

Array = jax.Array
ApplyFn = Callable[[Any, Mapping[str, Array]], Array]
MULTI = "multi"  # scope name of the multi-modal (all modalities, joint budget) attacks
ATTACK_KINDS = ("fgm", "pgd")


@dataclasses.dataclass(frozen=True)
class SuiteConfig:
  """What `evaluate_robustness` runs.

  Attributes:
    protocol: a `PGDProtocol` or preset name (`mmsafe.attacks.PROTOCOLS`);
      its `multi_eps` / `uni_eps` (the paper's 0.5 / 1.0) are added to the
      grids and reported as the headline numbers.
    multi_eps: eps grid of the multi-modal attacks (joint l2, normalised space).
    uni_eps: eps grid of the uni-modal attacks.
    attacks: subset of ("fgm", "pgd").
    uni_modalities: modalities attacked alone (None: each of them; () none).
    missing_fills: fills for the missing-modality evaluation ("zeros",
      "mean", "noise"; see `attacks.drop_modality`), () to skip.
    decoupling_fractions: fractions of input entries the decoupling attack
      may change, () to skip.
    decoupling_scopes: "multi" (all modalities jointly) and/or modality names.
    decoupling: keyword arguments of `attacks.decoupling` (rounds,
      steps_per_round, max_change, step_size, loss, random_start).
    batch_size: examples per compiled call.
    seed: base seed of the attacks' randomness.
  """

  protocol: str | PGDProtocol = "default"
  multi_eps: Sequence[float] = (0.125, 0.25, 0.5, 1.0)
  uni_eps: Sequence[float] = (0.25, 0.5, 1.0, 2.0)
  attacks: Sequence[str] = ATTACK_KINDS
  uni_modalities: Sequence[str] | None = None
  missing_fills: Sequence[str] = ("zeros",)
  decoupling_fractions: Sequence[float] = (0.0025, 0.005, 0.0116, 0.025, 0.05)
  decoupling_scopes: Sequence[str] = (MULTI,)
  decoupling: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  batch_size: int = 256
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class _Task:
  kind: str  # "clean" | "fgm" | "pgd" | "missing" | "decoupling"
  scope: str  # MULTI or a modality name ("" for clean)
  value: Any = None  # eps, fill or budget count


def _grid(values: Sequence[float], must_have: float, name: str) -> tuple[float, ...]:
  grid = sorted({float(v) for v in values} | {float(must_have)})
  for v in grid:
    if not np.isfinite(v) or v < 0:
      raise ValueError(f"{name}: expected finite values >= 0, got {v}")
  return tuple(v for v in grid if v > 0)


def plan(config: SuiteConfig, input_shapes: Mapping[str, tuple[int, ...]]) -> list[_Task]:
  """The list of evaluation tasks (each runs once over every batch)."""
  protocol = get_protocol(config.protocol)
  modalities = sorted(input_shapes)
  unknown_kinds = sorted(set(config.attacks) - set(ATTACK_KINDS))
  if unknown_kinds:
    raise ValueError(f"attacks: expected a subset of {list(ATTACK_KINDS)}, got {unknown_kinds}")
  uni = modalities if config.uni_modalities is None else list(config.uni_modalities)
  for m in uni:
    if m not in input_shapes:
      raise ValueError(f"uni_modalities: unknown modality {m!r}; expected one of {modalities}")
  for fill in config.missing_fills:
    if fill not in attacks.FILLS:
      raise ValueError(f"missing_fills: expected values in {list(attacks.FILLS)}, got {fill!r}")
  for scope in config.decoupling_scopes:
    if scope != MULTI and scope not in input_shapes:
      raise ValueError(f"decoupling_scopes: expected {MULTI!r} or one of {modalities}, "
                       f"got {scope!r}")
  tasks = [_Task("clean", "")]
  multi_grid = _grid(config.multi_eps, protocol.multi_eps, "multi_eps")
  uni_grid = _grid(config.uni_eps, protocol.uni_eps, "uni_eps")
  for kind in (k for k in ATTACK_KINDS if k in config.attacks):
    tasks += [_Task(kind, MULTI, eps) for eps in multi_grid]
    for m in uni:
      tasks += [_Task(kind, m, eps) for eps in uni_grid]
  for m in modalities:
    tasks += [_Task("missing", m, fill) for fill in config.missing_fills]
  shapes = {m: jnp.zeros((1,) + tuple(s)) for m, s in input_shapes.items()}
  for scope in config.decoupling_scopes:
    scope_modalities = None if scope == MULTI else scope
    for fraction in sorted(set(float(f) for f in config.decoupling_fractions)):
      count, _ = decoupling_budget(shapes, fraction, scope_modalities)
      tasks.append(_Task("decoupling", scope, (fraction, count)))
  return tasks


def num_work_units(config: SuiteConfig, input_shapes: Mapping[str, tuple[int, ...]],
                   num_examples: int) -> int:
  """Number of `progress` calls `evaluate_robustness` makes (tasks x batches)."""
  batches = -(-num_examples // config.batch_size)
  return len(plan(config, input_shapes)) * batches


def _compile(task: _Task, apply_fn: ApplyFn, protocol: PGDProtocol, config: SuiteConfig,
             bounds, max_counts: Mapping[str, int], fill_means):
  """A jitted `(variables, inputs, labels, key, value) -> (bad [B], extra [B])`
  where `bad` marks examples misclassified under the task's perturbation."""
  scope = None if task.scope == MULTI else task.scope

  def predicted_wrong(variables, inputs, labels):
    return jnp.argmax(apply_fn(variables, inputs), axis=-1) != labels

  if task.kind == "clean":
    def run(variables, inputs, labels, key, value):
      del key, value
      return predicted_wrong(variables, inputs, labels), jnp.zeros(labels.shape)
  elif task.kind == "fgm":
    def run(variables, inputs, labels, key, value):
      del key
      adv = attacks.fgm(lambda x: apply_fn(variables, x), inputs, labels, eps=value,
                        modalities=scope, bounds=bounds, loss="ce")
      return predicted_wrong(variables, adv, labels), jnp.zeros(labels.shape)
  elif task.kind == "pgd":
    def run(variables, inputs, labels, key, value):
      _, info = attacks.pgd(lambda x: apply_fn(variables, x), inputs, labels, key,
                            modalities=scope, bounds=bounds, return_info=True,
                            **protocol.pgd_kwargs(value))
      return info["misclassified"], info["norm"]
  elif task.kind == "missing":
    fill = task.value

    def run(variables, inputs, labels, key, value):
      del value
      dropped = attacks.drop_modality(inputs, task.scope, fill, key=key,
                                      mean=(fill_means or {}).get(task.scope))
      return predicted_wrong(variables, dropped, labels), jnp.zeros(labels.shape)
  elif task.kind == "decoupling":
    kwargs = dict(config.decoupling)
    kwargs.setdefault("bounds", bounds)

    def run(variables, inputs, labels, key, value):
      _, info = attacks.decoupling(lambda x: apply_fn(variables, x), inputs, labels, key,
                                   modalities=scope, count=value,
                                   max_count=max_counts[task.scope], return_info=True,
                                   **kwargs)
      return info["misclassified"], info["fraction_changed"]
  else:  # pragma: no cover - plan() only makes the kinds above
    raise ValueError(f"task kind: unknown {task.kind!r}")
  return jax.jit(run)


def evaluate_robustness(apply_fn: ApplyFn, variables: Any, inputs: Mapping[str, np.ndarray],
                        labels: np.ndarray, config: SuiteConfig = SuiteConfig(), *,
                        bounds: common.Bounds | None = None,
                        fill_means: Mapping[str, Any] | None = None,
                        progress: Callable[[int], None] | None = None) -> dict[str, Any]:
  """Runs the suite on a whole split; see the module docstring for definitions.

  Args:
    apply_fn: `(variables, inputs) -> fused logits [B, K]` in inference mode,
      e.g. `logits_apply(model)`.
    variables: the model variables.
    inputs: modality -> float32 [N, ...] (normalised, e.g. `Dataset.inputs`).
    labels: int [N].
    config: what to run.
    bounds: optional box constraints for the attacks, modality -> (low, high)
      in normalised space (e.g. `Dataset.normalized_range(m)`).
    fill_means: modality -> per-entry mean (one example's shape, normalised
      space; e.g. the training split's mean), needed by the "mean" fill and
      used as the centre of the "noise" fill.
    progress: called with 1 after each (task, batch) (e.g. `tqdm.update`);
      `num_work_units` gives the total.

  Returns:
    A dict of plain Python numbers and lists:
      "num_examples", "clean_accuracy", "protocol" (the PGD protocol),
      "config" (grids), "headline" (the paper's table entries: clean,
      "fgm/multi@0.5", "pgd/multi@0.5", "fgm/<m>@1.0", "pgd/<m>@1.0",
      "missing/<m>"), "curves" ({kind: {scope: {"modalities", "eps",
      "accuracy", "accuracy_raw", "mean_norm"}}}), "missing" ({m: {fill:
      accuracy}}) and "decoupling" ({scope: {"fraction", "count",
      "num_entries", "asr", "asr_raw", "accuracy", "mean_fraction_changed"}}).
  """
  labels = np.asarray(labels)
  n = int(labels.shape[0])
  if n == 0:
    raise ValueError("labels: expected at least one example, got 0")
  input_shapes = {m: tuple(np.shape(x)[1:]) for m, x in inputs.items()}
  for m, x in inputs.items():
    if np.shape(x)[0] != n:
      raise ValueError(f"inputs[{m!r}]: expected {n} examples (as labels), got {np.shape(x)[0]}")
  if config.batch_size < 1:
    raise ValueError(f"batch_size: expected >= 1, got {config.batch_size}")
  protocol = get_protocol(config.protocol)
  tasks = plan(config, input_shapes)
  if "mean" in config.missing_fills:
    lacking = sorted(set(input_shapes) - set(fill_means or {}))
    if lacking:
      raise ValueError(f"fill_means: expected a mean for every modality with fill 'mean', "
                       f"missing {lacking}")
  max_counts = {}
  for task in tasks:
    if task.kind == "decoupling":
      max_counts[task.scope] = max(max_counts.get(task.scope, 0), task.value[1])
  batch_size = min(config.batch_size, n)
  base_key = jax.random.PRNGKey(config.seed)

  # wrong[task] = bool [N]: misclassified under the task; extra[task] = float [N].
  wrong: dict[_Task, np.ndarray] = {}
  extra: dict[_Task, np.ndarray] = {}
  compiled: dict[tuple[str, str, Any], Callable] = {}
  for t_index, task in enumerate(tasks):
    compile_key = (task.kind, task.scope, task.value if task.kind == "missing" else None)
    if compile_key not in compiled:
      compiled[compile_key] = _compile(task, apply_fn, protocol, config, bounds, max_counts,
                                       fill_means)
    run = compiled[compile_key]
    value = task.value[1] if task.kind == "decoupling" else task.value
    value = jnp.float32(0.0) if value is None or task.kind == "missing" else value
    if task.kind == "decoupling":
      value = jnp.int32(value)
    elif task.kind in ATTACK_KINDS:
      value = jnp.float32(value)
    parts_wrong, parts_extra = [], []
    for b_index, batch in enumerate(eval_batches(inputs, labels, batch_size=batch_size)):
      key = jax.random.fold_in(jax.random.fold_in(base_key, t_index), b_index)
      bad, more = run(variables, batch["inputs"], jnp.asarray(batch["label"], jnp.int32),
                      key, value)
      valid = batch["valid"]
      parts_wrong.append(np.asarray(bad)[valid])
      parts_extra.append(np.asarray(more, np.float64)[valid])
      if progress is not None:
        progress(1)
    wrong[task] = np.concatenate(parts_wrong)
    extra[task] = np.concatenate(parts_extra)

  clean_task = tasks[0]
  correct = ~wrong[clean_task]
  results: dict[str, Any] = {
      "num_examples": n,
      "clean_accuracy": float(correct.mean()),
      "protocol": protocol.to_dict(),
      "config": {"multi_eps": list(_grid(config.multi_eps, protocol.multi_eps, "multi_eps")),
                 "uni_eps": list(_grid(config.uni_eps, protocol.uni_eps, "uni_eps")),
                 "attacks": list(config.attacks), "missing_fills": list(config.missing_fills),
                 "decoupling_fractions": sorted(float(f) for f in config.decoupling_fractions),
                 "decoupling_scopes": list(config.decoupling_scopes),
                 "decoupling": {k: v for k, v in dict(config.decoupling).items()
                                if isinstance(v, (int, float, str, bool))},
                 "batch_size": batch_size, "seed": config.seed,
                 "box_constraints": sorted(bounds) if bounds else []},
      "curves": {}, "missing": {}, "decoupling": {},
  }
  headline = {"clean": results["clean_accuracy"]}

  for kind in ATTACK_KINDS:
    scopes: dict[str, list[_Task]] = {}
    for task in tasks:
      if task.kind == kind:
        scopes.setdefault(task.scope, []).append(task)
    for scope, scope_tasks in scopes.items():
      scope_tasks.sort(key=lambda t: t.value)
      robust_raw = [correct & ~wrong[t] for t in scope_tasks]
      robust = (np.logical_and.accumulate(np.stack(robust_raw), axis=0) if kind == "pgd"
                else np.stack(robust_raw))
      eps_list = [float(t.value) for t in scope_tasks]
      results["curves"].setdefault(kind, {})[scope] = {
          "modalities": sorted(input_shapes) if scope == MULTI else [scope],
          "eps": eps_list,
          "accuracy": [float(r.mean()) for r in robust],
          "accuracy_raw": [float(r.mean()) for r in robust_raw],
          "mean_norm": [float(extra[t].mean()) for t in scope_tasks] if kind == "pgd" else None,
      }
      target = protocol.multi_eps if scope == MULTI else protocol.uni_eps
      if target in eps_list:
        headline[f"{kind}/{scope}@{target}"] = float(robust[eps_list.index(target)].mean())

  for task in tasks:
    if task.kind == "missing":
      accuracy = float((~wrong[task]).mean())
      results["missing"].setdefault(task.scope, {})[task.value] = accuracy
      if task.value == (config.missing_fills[0] if config.missing_fills else None):
        headline[f"missing/{task.scope}"] = accuracy

  num_correct = max(int(correct.sum()), 1)
  for scope in config.decoupling_scopes:
    scope_tasks = sorted((t for t in tasks if t.kind == "decoupling" and t.scope == scope),
                         key=lambda t: t.value)
    if not scope_tasks:
      continue
    success_raw = np.stack([correct & wrong[t] for t in scope_tasks])
    success = np.logical_or.accumulate(success_raw, axis=0)
    _, num_entries = decoupling_budget(
        {m: jnp.zeros((1,) + s) for m, s in input_shapes.items()}, 0.0,
        None if scope == MULTI else scope)
    results["decoupling"][scope] = {
        "modalities": sorted(input_shapes) if scope == MULTI else [scope],
        "fraction": [t.value[0] for t in scope_tasks],
        "count": [int(t.value[1]) for t in scope_tasks],
        "num_entries": int(num_entries),
        "asr": [float(s.sum() / num_correct) for s in success],
        "asr_raw": [float(s.sum() / num_correct) for s in success_raw],
        "accuracy": [float((correct & ~s).mean()) for s in success],
        "mean_fraction_changed": [float(extra[t].mean()) for t in scope_tasks],
    }
  results["headline"] = headline
  return results


def logits_apply(model) -> ApplyFn:
  """`(variables, inputs) -> logits` of a `mmsafe.models` model in inference mode."""
  return lambda variables, inputs: model.apply(variables, inputs, train=False).logits


def pgd_strength_sweep(apply_fn: ApplyFn, variables: Any, inputs: Mapping[str, np.ndarray],
                       labels: np.ndarray, *, budgets: Sequence[tuple[str, float]],
                       steps: Sequence[int] = (4, 10, 20, 50, 100),
                       restarts: Sequence[int] = (1, 3, 5), loss: str = "ce",
                       random_start: bool = False, batch_size: int = 256, seed: int = 0,
                       progress: Callable[[int], None] | None = None) -> dict[str, Any]:
  """Robust accuracy of l2-PGD over a steps x restarts grid: evidence that an
  attack protocol has converged (more steps/restarts no longer lower it).

  For each step count, `max(restarts)` independent runs are made (step size
  2.5 eps / steps, worst iterate kept; run 0 starts at the clean input unless
  `random_start`, the others at random points of the ball); the result for R
  restarts is the per-example worst case over the first R runs (an example
  counts as broken when any of them misclassifies it), which is what
  `pgd(..., restarts=R, random_start=random_start)` computes (with its own keys).

  Args:
    budgets: (scope, eps) pairs; scope "multi" or a modality name.
    steps, restarts: the grids.

  Returns:
    {"clean_accuracy", "num_examples", "steps", "restarts", "loss",
     "accuracy": {"<scope>@<eps>": [[acc for R in restarts] for S in steps]}}.
  """
  labels = np.asarray(labels)
  modalities = sorted(inputs)
  for scope, eps in budgets:
    if scope != MULTI and scope not in inputs:
      raise ValueError(f"budgets: expected scope {MULTI!r} or one of {modalities}, got {scope!r}")
    if not eps >= 0:
      raise ValueError(f"budgets: expected eps >= 0, got {eps!r} for {scope!r}")
  restarts = sorted(set(int(r) for r in restarts))
  steps = sorted(set(int(s) for s in steps))
  if not restarts or restarts[0] < 1 or not steps or steps[0] < 1:
    raise ValueError(f"steps/restarts: expected non-empty grids of integers >= 1, got "
                     f"{steps}/{restarts}")
  batch_size = min(batch_size, len(labels))
  predict = jax.jit(lambda v, x: jnp.argmax(apply_fn(v, x), -1))
  correct = np.concatenate([
      (np.asarray(predict(variables, b["inputs"])) == b["label"])[b["valid"]]
      for b in eval_batches(inputs, labels, batch_size=batch_size)])
  base_key = jax.random.PRNGKey(seed)
  table: dict[str, list[list[float]]] = {}
  for scope, eps in budgets:
    rows = []
    for num_steps in steps:
      run = jax.jit(lambda v, x, y, k, e, s=num_steps, m=(None if scope == MULTI else scope),
                    rs=True: attacks.pgd(lambda i: apply_fn(v, i), x, y, k, eps=e, steps=s,
                                         modalities=m, loss=loss, random_start=rs,
                                         return_info=True)[1]["misclassified"],
                    static_argnames="rs")
      broken = []
      for r in range(restarts[-1]):
        parts = []
        for b_index, batch in enumerate(eval_batches(inputs, labels, batch_size=batch_size)):
          key = jax.random.fold_in(jax.random.fold_in(base_key, r), b_index)
          parts.append(np.asarray(run(variables, batch["inputs"],
                                      jnp.asarray(batch["label"], jnp.int32), key,
                                      jnp.float32(eps), rs=random_start or r > 0)
                                  )[batch["valid"]])
          if progress is not None:
            progress(1)
        broken.append(np.concatenate(parts))
      rows.append([float((correct & ~np.any(broken[:count], axis=0)).mean())
                   for count in restarts])
    table[f"{scope}@{float(eps)}"] = rows
  return {"clean_accuracy": float(correct.mean()), "num_examples": int(len(labels)),
          "steps": steps, "restarts": restarts, "loss": loss, "random_start": random_start,
          "accuracy": table}

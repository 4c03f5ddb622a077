"""What the attack evaluators share: the compiled, optionally box-clipped attack
(`BoxedAttack`: `fgm`, `pgd`, `decoupling`) and, for the l2 attacks (`fgm`,
`pgd`), eps grids per scope and the curves, headline entries and per-example
flags assembled from them.

Definitions (CRMT, Yang et al., ICLR 2024, Sec. 4 / Tables 1-2 / Fig. 1 and 4):
an example is *robust* at eps when it is classified correctly both clean and
under the attack, so robust accuracy <= clean accuracy; NaN/Inf logits (clean
or attacked) count as a misclassification. Scope "multi" attacks all
modalities with a joint budget; a modality name attacks that modality alone.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
import functools
from typing import Any, ClassVar

import numpy as np

from mmsafe.attacks.pgd import PGDProtocol, get_protocol
from mmsafe.eval import base
from mmsafe.eval.batching import MULTI, Progress, encode_flags
from mmsafe.eval.clean import Clean


class BoxedAttack(Clean):
  """An evaluator whose `_attack(variables, inputs, labels, key, value, scope, loop)`
  is compiled once by its `loop` strategy, clipped to `bounds` when `box`."""

  static_argnames: ClassVar[tuple[str, ...]] = ("scope",)  # of `_attack`, besides `loop`
  loop = "scan"  # the loop strategy of `_attack` (`mmsafe.attacks.engine`)
  box = False

  @functools.cached_property
  def bounds(self) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """The attack's box constraints (None without `box`), computed once."""
    return self.box_bounds(self.box)

  @functools.cached_property
  def _program(self):
    """The compiled attack (`_attack`), built on first use (after `bounds`)."""
    self.bounds  # pylint: disable=pointless-statement  # fixed before tracing
    return base.compile_program(self._attack, self.loop, self.static_argnames)

  def _attack(self, variables, inputs, labels, key, value, scope, loop):
    raise NotImplementedError


class AttackEvaluator(BoxedAttack):
  """Robust accuracy against an l2 attack over eps grids, one grid per scope.

  Args:
    scope: "multi", "uni" (each modality alone), a modality name, or a list.
    eps: eps grid of the multi-modal attack (joint l2, normalised space).
    uni_eps: eps grid of the uni-modal attacks.
    uni_extra_eps: optional modality -> radii added to that modality's grid only.
    protocol: a `PGDProtocol` or preset name; its `multi_eps` / `uni_eps`
      (CRMT's 0.5 / 1.0) are added to the grids and name the headline entries.
    box: clip the attacks to the raw value range (`Dataset.normalized_range`).
  """

  def __init__(self, *, scope: str | Sequence[str] = MULTI,
               eps: float | Sequence[float] = (0.125, 0.25, 0.5, 1.0),
               uni_eps: float | Sequence[float] = (0.25, 0.5, 1.0, 2.0),
               uni_extra_eps: Mapping[str, Sequence[float]] | None = None,
               protocol: str | PGDProtocol = "default", box: bool = False, **common):
    super().__init__(**common)
    self.protocol = get_protocol(protocol)
    self.box = bool(box)
    self.grids = self._grids(base.strings(scope, "scope"), eps, uni_eps, dict(uni_extra_eps or {}))

  def _grids(self, scopes: Sequence[str], eps: Any, uni_eps: Any,
             extra: Mapping[str, Sequence[float]]) -> dict[str, tuple[float, ...]]:
    """Scope -> the sorted eps grid with the protocol's budget."""
    modalities = sorted(self.input_shapes)
    expanded: list[str] = []
    for scope in scopes:
      expanded += [s for s in (modalities if scope == "uni" else [scope]) if s not in expanded]
    unknown = sorted(set(extra) - set(modalities))
    if unknown:
      raise ValueError(f"uni_extra_eps: expected modalities among {modalities}, got {unknown}")
    grids = {}
    for scope in expanded:
      if scope != MULTI and scope not in modalities:
        raise ValueError(f"scope: expected {MULTI!r}, 'uni' or one of {modalities}, "
                         f"got {scope!r}")
      if scope == MULTI:
        grids[scope] = base.eps_grid(base.floats(eps, "eps"), self.protocol.multi_eps, "eps")
      else:
        values = base.floats(uni_eps, "uni_eps") + tuple(extra.get(scope, ()))
        grids[scope] = base.eps_grid(values, self.protocol.uni_eps, "uni_eps")
    return grids

  def _curve(self, variables, correct: np.ndarray, scope: str, grid: Sequence[float],
             first_index: int, progress: Progress, certified_radius: np.ndarray | None
             ) -> tuple[list[np.ndarray], dict[str, Any]]:
    """(robust bool [N] per eps, extra curve entries) of one scope; task numbers
    start at `first_index`; `certified_radius` [N]: the scope's sound certified
    radii, or None."""
    raise NotImplementedError

  def curves(self, variables: Any, correct: np.ndarray, progress: Progress = None, *,
             certified: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """{"curves": {type: {scope: {"modalities", "eps", "accuracy", ...}}},
    "headline": {"<type>/<scope>@<eps>": accuracy at the protocol's budget},
    "per_example": {type: {scope: [robust flags per eps]}}} for the clean-correct
    mask `correct` [N]; `certified`: scope -> [N] sound certified radii (`pgd`)."""
    curves, headline, flags, index = {}, {}, {}, 0
    for scope, grid in self.grids.items():
      radius = None if certified is None else checked_radius(certified, scope, len(correct))
      robust, extra = self._curve(variables, correct, scope, grid, index, progress, radius)
      index += len(grid)
      curves[scope] = {"modalities": sorted(self.data.inputs) if scope == MULTI else [scope],
                       "eps": list(grid), "accuracy": [float(r.mean()) for r in robust],
                       **extra}
      flags[scope] = [encode_flags(r) for r in robust]
      target = self.protocol.multi_eps if scope == MULTI else self.protocol.uni_eps
      if target in grid:
        headline[f"{self.type}/{scope}@{target}"] = curves[scope]["accuracy"][grid.index(target)]
    return {"curves": {self.type: curves}, "headline": headline,
            "per_example": {self.type: flags}}

  def sound_radii(self, variables: Any) -> dict[str, np.ndarray] | None:
    """Scope -> [N] sound certified radii for the attack to skip what it cannot
    break (None: attack everything)."""
    del variables
    return None

  def measure(self, variables: Any, progress: Progress = None) -> dict[str, Any]:
    correct, _ = self.correct(variables, progress)
    curves = self.curves(variables, correct, progress,
                         certified=self.sound_radii(variables))["curves"][self.type]
    return {"num_examples": int(correct.size), "clean_accuracy": float(correct.mean()),
            "accuracy": {f"{scope}@{eps:g}": acc for scope, curve in curves.items()
                         for eps, acc in zip(curve["eps"], curve["accuracy"])},
            "curves": curves}


def checked_radius(certified: Mapping[str, np.ndarray], scope: str, n: int) -> np.ndarray:
  """`certified[scope]` as float64 [n] (ValueError naming the scope otherwise)."""
  if scope not in certified:
    raise ValueError(f"certified: expected radii for scope {scope!r}, got scopes "
                     f"{sorted(certified)}")
  radius = np.asarray(certified[scope], np.float64)
  if radius.shape != (n,):
    raise ValueError(f"certified[{scope!r}]: expected shape ({n},) (one radius per example), "
                     f"got {radius.shape}")
  if np.isnan(radius).any():
    raise ValueError(f"certified[{scope!r}]: expected radii, got {int(np.isnan(radius).sum())} "
                     f"NaN")
  return radius

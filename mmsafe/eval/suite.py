"""The robustness suite (type "robustness"; CRMT Sec. 4, Tables 1-2, Fig. 1 and
4): clean accuracy, FGM and l2-PGD curves multi- and uni-modal, accuracy with
each modality missing and the decoupling attack, in one results dict (the
robustness report's input, `mmsafe.eval.report`).

The suite measures nothing itself: it builds one evaluator of each type
(`clean`, `fgm`, `pgd`, `missing`, `decoupling`) from its keys and merges
their sections, so each number is the one that type's evaluator gives alone
with the same keys and seed. Its presets (the default grids, the paper's
budgets only) are in experiments/configs/evals.py.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
import functools
from typing import Any

import numpy as np

from mmsafe import checks
from mmsafe.attacks.pgd import PGDProtocol, get_protocol
from mmsafe.eval import base
from mmsafe.eval.batching import MULTI, Progress, encode_flags
from mmsafe.eval.clean import Clean
from mmsafe.eval.decoupling import Decoupling
from mmsafe.eval.fgm import FGM
from mmsafe.eval.missing import Missing
from mmsafe.eval.pgd import PGD

ATTACKS = {"fgm": FGM, "pgd": PGD}
DECOUPLING_KEYS = ("rounds", "steps_per_round", "max_change", "step_size", "loss",
                   "random_start")
# A member's field -> the suite's, in the members' error messages.
_FIELDS = {"eps": "multi_eps", "fills": "missing_fills", "fractions": "decoupling_fractions",
           "scopes": "decoupling_scopes", **{k: f"decoupling.{k}" for k in DECOUPLING_KEYS}}


def _member(cls: type, common: Mapping[str, Any], **keys) -> base.Evaluator:
  """`cls(**common, **keys)`, its errors naming the suite's field."""
  try:
    return cls(**common, **keys)
  except ValueError as e:
    field, _, rest = str(e).partition(":")
    raise ValueError(f"{_FIELDS.get(field, field)}:{rest}") from e


class Robustness(base.Evaluator):
  """The robustness suite; see `measure` for its results.

  Args:
    protocol: the PGD protocol (its budgets are added to the grids).
    multi_eps, uni_eps, uni_extra_eps: the eps grids (`AttackEvaluator`).
    attacks: subset of ("fgm", "pgd").
    uni_modalities: modalities attacked alone (None: each; (): none).
    missing_fills: fills of the missing-modality evaluation, () to skip.
    decoupling_fractions, decoupling_scopes: the decoupling attack's budgets
      and scopes (fractions () to skip); `decoupling`: its options (rounds,
      steps_per_round, max_change, step_size, loss, random_start).
    per_example: also return which examples each measurement finds correct or
      robust (`batching.encode_flags`), for statistics over test examples.
    box, fill_examples, skip_certified: as for `pgd` / `missing`.
  """

  type = "robustness"

  def __init__(self, *, protocol: str | PGDProtocol = "default",
               multi_eps: Sequence[float] = (0.125, 0.25, 0.5, 1.0),
               uni_eps: Sequence[float] = (0.25, 0.5, 1.0, 2.0),
               uni_extra_eps: Mapping[str, Sequence[float]] | None = None,
               attacks: Sequence[str] = tuple(ATTACKS), uni_modalities: Sequence[str] | None = None,
               missing_fills: Sequence[str] = ("zeros",),
               decoupling_fractions: Sequence[float] = (0.0025, 0.005, 0.0116, 0.025, 0.05),
               decoupling_scopes: Sequence[str] = (MULTI,),
               decoupling: Mapping[str, Any] | None = None, per_example: bool = False,
               box: bool = False, fill_examples: int = 0, skip_certified: bool = True,
               **common):
    super().__init__(**common)
    self.protocol = get_protocol(protocol)
    self.per_example, self.box = bool(per_example), bool(box)
    skip_certified = base.flag(skip_certified, "skip_certified")
    self.attacks = base.strings(attacks, "attacks")
    unknown = sorted(set(self.attacks) - set(ATTACKS))
    if unknown:
      raise ValueError(f"attacks: expected a subset of {list(ATTACKS)}, got {unknown}")
    uni = ()
    if uni_modalities is None or tuple(uni_modalities):
      uni = checks.select_modalities(None if uni_modalities is None else base.strings(
          uni_modalities, "uni_modalities"), sorted(self.input_shapes), field="uni_modalities")
    decoupling = dict(decoupling or {})
    unknown = sorted(set(decoupling) - set(DECOUPLING_KEYS))
    if unknown:
      raise ValueError(f"decoupling: expected keys among {list(DECOUPLING_KEYS)}, got {unknown}")
    self.multi_eps = base.bounded_floats(multi_eps, "multi_eps", 0.0)
    self.uni_eps = base.bounded_floats(uni_eps, "uni_eps", 0.0)
    self.uni_extra_eps = {m: sorted(float(e) for e in v)
                          for m, v in dict(uni_extra_eps or {}).items()}
    self.decoupling_fractions = base.bounded_floats(decoupling_fractions,
                                                    "decoupling_fractions", 0.0, 1.0)
    self.decoupling_scopes = base.strings(decoupling_scopes, "decoupling_scopes")
    self.decoupling_options = {k: v for k, v in decoupling.items()
                               if isinstance(v, (int, float, str, bool))}
    common = dict(common, name=self.name, model=self.model, splits=self.splits,
                  batch_size=self.batch_size, seed=self.seed)
    self.clean = Clean(**common)
    self.attack_evaluators = {kind: _member(
        ATTACKS[kind], common, scope=(MULTI, *uni), eps=self.multi_eps, uni_eps=self.uni_eps,
        uni_extra_eps=uni_extra_eps, protocol=self.protocol, box=self.box,
        **({"skip_certified": skip_certified} if kind == "pgd" else {}))
        for kind in ATTACKS if kind in self.attacks}
    self.missing = _member(Missing, common, fills=missing_fills,
                           fill_examples=base.count(fill_examples, "fill_examples"))
    self.decoupling = _member(Decoupling, common, fractions=self.decoupling_fractions,
                              scopes=self.decoupling_scopes, box=self.box, **decoupling)

  @functools.cached_property
  def bounds(self) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """The attacks' box constraints (None without `box`)."""
    return self.box_bounds(self.box)

  def settings(self, num_examples: int) -> dict[str, Any]:
    """The "config" entry of the results (grids and settings)."""
    return {"multi_eps": list(base.eps_grid(self.multi_eps, self.protocol.multi_eps,
                                            "multi_eps")),
            "uni_eps": list(base.eps_grid(self.uni_eps, self.protocol.uni_eps, "uni_eps")),
            "uni_extra_eps": self.uni_extra_eps, "attacks": list(self.attacks),
            "missing_fills": list(self.missing.fills),
            "decoupling_fractions": sorted(float(f) for f in self.decoupling_fractions),
            "decoupling_scopes": list(self.decoupling_scopes),
            "decoupling": self.decoupling_options,
            "batch_size": min(self.batch_size, num_examples), "seed": self.seed,
            "box_constraints": sorted(self.bounds) if self.bounds else []}

  def measure(self, variables: Any, progress: Progress = None) -> dict[str, Any]:
    """{"num_examples", "clean_accuracy", "num_non_finite" (examples whose clean
    logits hold a NaN/Inf: misclassified, and so never robust), "protocol",
    "config" (grids), "headline" (the paper's table entries: clean,
    "fgm/multi@0.5", "pgd/multi@0.5", "fgm/<m>@1.0", "pgd/<m>@1.0",
    "missing/<m>"), "curves" ({kind: {scope: curve}}, `fgm` / `pgd`), "missing"
    ({m: {fill: accuracy}}), "decoupling" ({scope: curve}) and, with
    `per_example`, "per_example" (flags of "clean", {kind: {scope: [per eps]}}
    and {"missing": {m: {fill}}})}."""
    correct, non_finite = self.clean.correct(variables, progress)
    n = int(correct.size)
    results: dict[str, Any] = {
        "num_examples": n, "clean_accuracy": float(correct.mean()),
        "num_non_finite": int(non_finite.sum()), "protocol": self.protocol.to_dict(),
        "config": self.settings(n), "curves": {}, "missing": {}, "decoupling": {},
        "headline": {"clean": float(correct.mean())},
        "per_example": {"clean": encode_flags(correct)}}
    sections = [member.curves(variables, correct, progress,
                              certified=member.sound_radii(variables))
                for member in self.attack_evaluators.values()]
    sections.append(self.missing.accuracies(variables, progress))
    sections.append(self.decoupling.curves(variables, correct, progress))
    for section in sections:
      for key, value in section.items():
        results[key].update(value)
    if not self.per_example:
      del results["per_example"]
    return results

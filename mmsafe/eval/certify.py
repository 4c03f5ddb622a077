"""Certified radii per Lipschitz kind, checked by attacks (type "certify";
`mmsafe.eval.certification.Certification`: CRMT Thm 3.3 / 3.5, Prop. 3.4)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mmsafe import certify as certify_lib
from mmsafe.eval import base
from mmsafe.eval import certification
from mmsafe.eval.batching import Progress


def _reporting(progress: Progress) -> certification.Track:
  """A `Certification` track that reports each batch of its loops to `progress`."""
  def track(iterable, total, description):
    del total, description
    for item in iterable:
      yield item
      if progress is not None:
        progress(1)
  return track


class Certify(base.Evaluator):
  """Certified radii per Lipschitz kind, checked by attacks. The last run's
  certificates are kept as `certificates` ({kind: Certificate}). Certificates
  are of the undefended model: `defence` must be "none".

  Args: those of `certification.Certification` (`kinds`, `mode`, `chunk_size`
    (0: none), `power_iterations`, `failure_probability`, `attack_steps`,
    `attack_restarts`, `num_thresholds`, `units`: "input", radii in the units a
    user perturbs, or "normalised"), and `empirical_split` (the split the
    empirical constants are estimated on).
  """

  type = "certify"
  default_batch_size = 100

  def __init__(self, *, kinds: str | Sequence[str] = tuple(certify_lib.KINDS),
               empirical_split: str = "train", mode: str = "auto", chunk_size: int = 0,
               power_iterations: int = 300, failure_probability: float = 1e-6,
               attack_steps: int = 100, attack_restarts: int = 5, num_thresholds: int = 101,
               units: str = "input", **common):
    super().__init__(**common)
    if self.defence:
      raise ValueError(f"defence: the certificates are of the undefended model; expected "
                       f"'none', got {self.defence_name!r}")
    kinds = base.strings(kinds, "kinds")
    self.empirical_split = (self.split_named(empirical_split, "empirical_split")
                            if "empirical" in kinds else None)
    self._certification = certification.Certification(
        self.model, kinds=kinds, batch_size=self.batch_size, mode=mode,
        chunk_size=base.count(chunk_size, "chunk_size") or None,
        power_iterations=base.count(power_iterations, "power_iterations", 1),
        failure_probability=base.bounded_floats(failure_probability, "failure_probability",
                                                0.0, 1.0, low_inclusive=False)[0],
        attack_steps=base.count(attack_steps, "attack_steps"),
        attack_restarts=base.count(attack_restarts, "attack_restarts", 1),
        num_thresholds=base.count(num_thresholds, "num_thresholds", 2), seed=self.seed,
        units=units)
    self.certificates: dict[str, certify_lib.Certificate] = {}

  def measure(self, variables: Any, progress: Progress = None) -> dict[str, Any]:
    # The track only reports progress (host side); nothing compiled reads it.
    self._certification.track = _reporting(progress)
    empirical = self.splits[self.empirical_split] if self.empirical_split else None
    results, self.certificates, _ = self._certification(
        variables, self.data, empirical, split=self.split,
        empirical_split=self.empirical_split or "")
    return results

"""The CRMT paper's claims, judged on seeded runs with intervals.

`evidence` holds what a claim reads (per-example outcomes of a run's
evaluation, the attack budgets, `Evidence`) and how one comparison is judged
(`compare`: paired over seeds and test examples, a verdict from the 95%
interval against a minimal effect); `claims` lists every claim of the paper's
experiments section (`CLAIMS`) and judges them all (`evaluate_claims`,
`markdown`). `experiments.reproduce` trains and evaluates the runs they read.
"""

from mmsafe.paper import claims, evidence
from mmsafe.paper.claims import CLAIMS, Claim, evaluate_claims, markdown
from mmsafe.paper.evidence import Budgets, Evidence, compare, paper_budgets

__all__ = ["Budgets", "CLAIMS", "Claim", "Evidence", "claims", "compare", "evaluate_claims",
           "evidence", "markdown", "paper_budgets"]

r"""The CRMT paper's experiments on one dataset, each method trained with several
seeds, in one command:

  python -m experiments.reproduce --config=experiments/configs/embedded.py:av_digits \
      --workdir=/tmp/mmsafe/reproduce/av_digits

Every method of the paper's Table 1 and of its ablation (Fig. 5) trains in
`<workdir>/runs/<method>/seed<k>` (resumable: a rerun skips finished runs and
evaluations). Each model selected on validation is then evaluated on the test
split: clean, FGM and l2-PGD accuracy over a grid of multi-modal and uni-modal
radii (the grids reach budgets at which the attacks bite), missing-modality
accuracy, and, for the methods of Fig. 3, the vulnerability-indicator ratio
eta^(m1) / eta^(m2) from certification with empirical Lipschitz constants.

`<workdir>/report/` receives report.md and report.json (mean +- sample
standard deviation over the seeds) and the figures: Table 1 (clean,
multi-modal FGM / PGD at eps 0.5, missing modality), Table 2 (uni-modal FGM /
PGD at eps 1.0, missing), Fig. 1 (uni-modal PGD accuracy against the radius,
one figure per attacked modality, every method), Fig. 3 (eta-ratio heat maps),
Fig. 4 (JT and CRMT under attacks on each modality), Fig. 5 (the ablation
under multi-modal PGD), and the table of the paper's claims
(`experiments/claims.py`), each marked reproduced / not reproduced / mixed.

The curves use `--protocol` (default: the `default` preset). With a cheaper
preset, the seed-0 JT and CRMT runs are also attacked with `default` at the
headline budgets and the report states the largest difference, so that the
cheaper numbers carry their own evidence.
"""

import os
import time
from typing import Any

from absl import flags
from ml_collections import config_flags
from tqdm.auto import tqdm

from experiments import claims as claims_lib
from experiments import cli
from experiments.reproduction import (ABLATION_METHODS, MULTI, TABLE1_METHODS, parse_radii,
                                      device_description, evaluation_settings, pgd_points,
                                      protocol_check, train_and_evaluate_run, write_report)
from mmsafe import methods as methods_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Base training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the runs and the report.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds.")
_METHODS = flags.DEFINE_list(
    "methods", list(dict.fromkeys(TABLE1_METHODS + ABLATION_METHODS)),
    "Methods to train (default: Table 1 and the ablation).")
_PROTOCOL = flags.DEFINE_string("protocol", "default", "PGD protocol preset of the curves.")
_MULTI_EPS = flags.DEFINE_list("multi_eps", ["0.25", "0.5", "1", "2", "4", "8"],
                               "Radii of the multi-modal attacks (must include 0.5).")
_UNI_EPS = flags.DEFINE_list("uni_eps", ["0.5", "1", "2", "4", "8", "16"],
                             "Radii of the uni-modal attacks (must include 1.0).")
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", 0,
                                     "Test examples evaluated (0: the whole split).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  for name in _METHODS.value:
    methods_lib.get(name)  # Unknown names fail before any training starts.
  seeds = [int(s) for s in _SEEDS.value]
  settings = evaluation_settings(_PROTOCOL.value, parse_radii(_MULTI_EPS.value, "multi_eps", 0.5),
                                 parse_radii(_UNI_EPS.value, "uni_eps", 1.0), _MAX_EXAMPLES.value)
  start = time.time()
  results: dict[str, list[dict[str, Any]]] = {}
  jobs = [(method, seed) for method in _METHODS.value for seed in seeds]
  for method, seed in tqdm(jobs, desc="reproduce (train + evaluate)", dynamic_ncols=True):
    run_dir = os.path.join(_WORKDIR.value, "runs", method, f"seed{seed}")
    results.setdefault(method, []).append(
        train_and_evaluate_run(_CONFIG.value, method, seed, run_dir, settings))
  first = next(iter(results.values()))[0]
  modalities = [scope for scope in first["curves"]["pgd"] if scope != MULTI]
  meta = {"dataset": _CONFIG.value.dataset, "seeds": seeds, **settings,
          "num_examples": first["num_examples"], "chance": 1.0 / first["num_classes"],
          "wall_seconds": time.time() - start, "device": device_description(),
          **{f"{part}_seconds": sum(run[f"{part}_seconds"] for runs in results.values()
                                    for run in runs) for part in ("training", "evaluation")}}
  if settings["protocol"] != "default":
    pairs = {method: (pgd_points(results[method][0]["curves"]),
                      protocol_check(os.path.join(_WORKDIR.value, "runs", method,
                                                  f"seed{seeds[0]}"), settings))
             for method in ("jt", "crmt") if method in results}
    meta["protocol_check"] = claims_lib.protocol_agreement(pairs, settings["protocol"])
    meta["protocol_check_points"] = {
        method: {point: [cheap[point], default[point]] for point in default if point in cheap}
        for method, (cheap, default) in pairs.items()}
  report = write_report(results, modalities, os.path.join(_WORKDIR.value, "report"), meta)
  print(claims_lib.markdown(report["claims"]))
  print(f"report: {os.path.join(_WORKDIR.value, 'report', 'report.md')}")


if __name__ == "__main__":
  cli.run(main)

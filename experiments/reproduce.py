r"""The CRMT paper's claims checked on one dataset, in one command:

  python -m experiments.reproduce --config=experiments/configs/embedded.py:mfeat \
      --workdir=/tmp/mmsafe/reproduce/mfeat

Trains (resumably; a rerun skips finished runs and cached evaluations) and
evaluates on the test split, with seeds 0-4 by default, the parts of
`mmsafe.paper.reproduction.PARTS`: every Table 1 and ablation method on the
dataset's default modality pair, the transformer (Table 3), CRMT with two
iterations (App. 8.3), JT / CRMT / GB / MMAT on every other modality pair
(mfeat: 14 more pairs), and the imbalance dial. Attack budgets are the paper's
and budgets calibrated so that JT keeps about 0.75 / 0.5 / 0.25 robust
accuracy (validation split, JT seed 0), fixed before the other runs.

The report (`--report_dir`, default `experiments/results/<dataset>` in the
repository): report.md with the
claims table first (each claim with its verdict from a 95% interval, at the
paper's and the calibrated budgets, or why it is not checked), report.json,
and the figures. With a protocol other than `default`, the seed-0 JT and CRMT
models are also attacked with `default` at both budgets and the report states
the largest difference.
"""

import os
import time

from absl import flags
from ml_collections import config_flags
from tqdm.auto import tqdm

from experiments import cli
from experiments.configs import reproduce as reproduce_config
from mmsafe import methods as methods_lib
from mmsafe.paper import budgets as budgets_lib
from mmsafe.paper import claims as claims_lib
from mmsafe.paper import report as report_lib
from mmsafe.paper import reproduction

_CONFIG = config_flags.DEFINE_config_file("config", None, "Base training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the runs.")
_REPORT_DIR = flags.DEFINE_string(
    "report_dir", None, "Where the report goes (default: experiments/results/<dataset>).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Training seeds (>= 2).")
_PARTS = flags.DEFINE_list("parts", list(reproduction.PARTS),
                           "Parts to run ('main' first; 'pairs' needs >= 3 modalities).")
_METHODS = flags.DEFINE_list("methods", list(reproduction.MAIN_METHODS),
                             "Methods of the main part (default: Table 1 and the ablation).")
_PAIRS = flags.DEFINE_list(
    "pairs", None, "Modality pairs of the pairs part, e.g. 'fac+kar,fou+zer' (default: every "
    "pair but the default one).")
_PAIR_METHODS = flags.DEFINE_list("pair_methods", list(reproduction.PAIR_METHODS),
                                  "Methods of the pairs part.")
_PROTOCOL = flags.DEFINE_string("protocol", "quick", "PGD protocol preset of the curves.")
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", 0,
                                     "Test examples evaluated (0: the whole split).")
_CACHED_ONLY = flags.DEFINE_bool(
    "cached_only", False, "Write the report from the runs that have finished, training "
    "nothing (the protocol check still runs); the report lists the runs still missing.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  for name in (*_METHODS.value, *_PAIR_METHODS.value):
    methods_lib.get(name)  # Unknown names fail before any training starts.
  pairs = None if _PAIRS.value is None else tuple(
      reproduction.parse_pair(pair, _CONFIG.value.dataset) for pair in _PAIRS.value)
  plan = reproduction.Plan(seeds=tuple(int(s) for s in _SEEDS.value),
                           parts=tuple(_PARTS.value), methods=tuple(_METHODS.value),
                           pairs=pairs, pair_methods=tuple(_PAIR_METHODS.value),
                           cached_only=_CACHED_ONLY.value,
                           protocol=_PROTOCOL.value, max_examples=_MAX_EXAMPLES.value)
  start = time.time()
  bar = tqdm(desc="reproduce", unit="run", dynamic_ncols=True)

  def on_part(part: str, count: int):
    bar.set_description(f"reproduce: {part}")
    bar.reset(total=count)

  presets = reproduce_config.get_presets(_CONFIG.value.dataset)
  results, meta = reproduction.reproduce(_CONFIG.value, _WORKDIR.value, plan, presets,
                                         progress=lambda job: bar.update(1), on_part=on_part)
  bar.close()
  meta.update(wall_seconds=time.time() - start, device=reproduction.device_description())
  outdir = _REPORT_DIR.value or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                             "results", _CONFIG.value.dataset)
  report = report_lib.write_report(results, reproduction.default_pair(_CONFIG.value), outdir,
                                   meta)
  print(claims_lib.markdown(report["claims"]))
  print(f"report: {os.path.join(outdir, 'report.md')}")
  index = cli.record_in_index(
      _WORKDIR.value, f"reproduce on {_CONFIG.value.dataset}",
      [outdir, os.path.join(_WORKDIR.value, budgets_lib.BUDGETS_FILE)], config=_CONFIG.value,
      key="reproduce")
  print(f"index of the reports and figures: {index}")


if __name__ == "__main__":
  cli.run(main)

"""The README's main job in its smallest form (one method, `runlocal`), run as a
user runs it: stderr holds mmsafe's progress bars and nothing else, index.md
links every report, figure and data file, and TensorBoard shows the training
curves and the evaluators' numbers and figures."""

import os
import re
import subprocess
import sys

import pytest

from mmsafe.eval import report
from tests.test_tensorboard import read_events

ROOT = os.path.join(os.path.dirname(__file__), "..")
# A tqdm progress bar: "<description>: <percent>|<bar>| <n>/<total> [<timing>...]",
# or without a total "<description>: <n><unit> [<timing>]".
PROGRESS = re.compile(r"^.+?: +(\d+%\|.*\| *\d+/\d+|\d+\w+) \[.*\]$")


def unexpected_lines(stderr: str) -> list[str]:
  """The lines of `stderr` (progress bars redraw with carriage returns) that are
  no progress bar."""
  lines = (line.strip() for line in re.split(r"[\r\n]", stderr))
  return [line for line in lines if line and not PROGRESS.match(line)]


def test_progress_bar_lines_are_recognised_and_nothing_else():
  bars = ("jt on mfeat:  48%|████▊     | 20/42 [00:04<00:04,  5.32step/s, loss=1.1887]\r"
          "jt on mfeat: 100%|██████████| 42/42 [00:20<00:00,  2.02step/s, val_acc=0.965]\n"
          "certify: jt on mfeat (test): 4batch [00:26,  1.20s/batch]\n")
  assert unexpected_lines(bars) == []
  warning = ("W1206 20:04:14.578381 139886893935488 checkpoint_manager.py:849] Given directory "
             "is read only=/tmp/mmsafe/compare/jt/checkpoints")
  assert unexpected_lines(bars + warning + "\n") == [warning]


@pytest.mark.slow
def test_main_job_prints_no_warning_and_indexes_every_artefact(tmp_path):
  workdir = tmp_path / "compare"
  done = subprocess.run(
      [sys.executable, "-m", "experiments.compare",
       "--config=experiments/configs/embedded.py:runlocal", "--methods=jt",
       f"--workdir={workdir}", "--protocol=quick"],
      cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert unexpected_lines(done.stderr) == [], "unexpected lines on stderr"
  assert "| jt |" in done.stdout
  assert done.stdout.rstrip().endswith(f"index of the reports and figures: {workdir}/index.md")

  index = (workdir / "index.md").read_text()
  artefacts = [os.path.relpath(path, workdir) for path in report.artefact_files(str(workdir))]
  assert {"comparison.md", "jt/metrics.jsonl", "jt/compare_robustness/robustness.md",
          "jt/compare_certify/certified_accuracy.png",
          "jt/compare_certify/eta_ratio_sound.png"} <= set(artefacts)
  assert [a for a in artefacts if f"]({a})" not in index] == [], "artefacts index.md misses"
  assert "python -m experiments.compare --config=experiments/configs/embedded.py:runlocal" in index

  scalars, images = read_events(workdir / "jt")
  assert {"train/loss", "validation/accuracy", "test/accuracy",
          "compare_robustness/headline/pgd/multi@0.5",
          "compare_certify/kinds/sound/summary/mean_radius"} <= set(scalars)
  assert {"compare_robustness/pgd_accuracy", "compare_certify/certified_accuracy",
          "compare_certify/eta_ratio_sound"} <= set(images)

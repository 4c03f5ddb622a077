"""`<workdir>/index.md`: one page per run directory that every command adds its
entry to (what ran, config, when, how long, links to what it wrote)."""

import json
import os
import re

import pytest

from experiments import cli
from mmsafe.eval import report


def _touch(path, text="x"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  return str(path)


def _entry(key, started, artefacts, **changes):
  return {"key": key, "title": f"title of {key}", "command": f"python -m experiments.{key}",
          "config": None, "started": started, "seconds": 75.4, "artefacts": artefacts,
          **changes}


def _links(text):
  return re.findall(r"\]\(<?([^)>]+)>?\)", text)


def test_directories_expand_to_reports_figures_and_data_but_not_checkpoints(tmp_path):
  run = tmp_path / "jt"
  wanted = [_touch(run / name) for name in ("config.json", "metrics.jsonl", "certify/a.png",
                                            "robustness/robustness.md")]
  for name in ("checkpoints/42/progress.json", "checkpoints_damaged/7/x.json", ".lock",
               "events.out.tfevents.1.host.2.mmsafe-training", "robustness/.r.md.tmp"):
    _touch(run / name)
  _touch(tmp_path / "index.md")
  assert sorted(report.artefact_files(str(run))) == sorted(wanted)
  assert str(tmp_path / "index.md") not in report.artefact_files(str(tmp_path))
  assert report.artefact_files(str(run / "config.json")) == [str(run / "config.json")]


def test_index_links_every_artefact_and_a_rerun_replaces_its_entry(tmp_path):
  table = _touch(tmp_path / "comparison.md")
  run = tmp_path / "my run"
  files = [_touch(run / n) for n in ("results.json", "certify/curve.png", "robustness/r.md")]
  config = {"method": "jt", "evals": {"eps": (0.5, 1.0)}}
  report.update_index(str(tmp_path), _entry("compare", 200.0, [table, str(run)], config=config))
  path = report.update_index(str(tmp_path), _entry("train", 100.0, [files[0]]))
  assert path == str(tmp_path / "index.md")
  text = open(path).read()
  # Oldest first; every artefact linked relative to the directory; figures shown.
  assert text.index("## title of train") < text.index("## title of compare")
  assert sorted(set(_links(text))) == sorted(
      ["comparison.md", "my run/results.json", "my run/certify/curve.png",
       "my run/robustness/r.md"])
  assert "![my run/certify/curve.png](<my run/certify/curve.png>)" in text
  assert "- command: `python -m experiments.compare`" in text and "ran 1 min 15 s" in text
  assert '"eps": [\n      0.5,' in text  # the config, as JSON
  # Run again, the entry replaces the earlier one (links and all).
  report.update_index(str(tmp_path), _entry("compare", 300.0, [table], seconds=3725.0))
  text = open(path).read()
  assert text.count("## title of compare") == 1 and "ran 1 h 2 min" in text
  assert "my run/robustness/r.md" not in text
  with open(tmp_path / "index.json") as f:
    assert [e["key"] for e in json.load(f)] == ["train", "compare"]


def test_an_entry_missing_a_field_is_refused(tmp_path):
  entry = _entry("train", 1.0, [])
  del entry["seconds"]
  with pytest.raises(ValueError, match=r"missing \['seconds'\]"):
    report.update_index(str(tmp_path), entry)
  assert not os.listdir(tmp_path)


def test_a_command_records_its_command_line_config_and_duration(tmp_path):
  class Config(dict):
    def to_dict(self):
      return dict(self)

  path = cli.record_in_index(str(tmp_path), "a command", [_touch(tmp_path / "out.json")],
                             config=Config(seed=3))
  [entry] = json.load(open(tmp_path / "index.json"))
  assert entry["key"] == "a command" and entry["config"] == {"seed": 3}
  assert entry["command"].startswith("python ") and entry["seconds"] >= 0
  assert entry["artefacts"] == ["out.json"] and os.path.exists(path)

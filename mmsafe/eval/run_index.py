"""The index of a run directory: `update_index(directory, entry)` keeps
`<directory>/index.md`, its one page: every command that ran there (what, with
which config, when, for how long), each linking its reports and figures (the
entries are kept in `index.json`; a command run again replaces its entry).
Files are written atomically (`mmsafe.files`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import datetime
import json
import os
from typing import Any

from mmsafe import files

INDEX_MD, INDEX_JSON = "index.md", "index.json"
_ENTRY_FIELDS = ("key", "title", "command", "config", "started", "seconds", "artefacts")
# What an index links (reports, figures, data) and what it skips inside a directory.
ARTEFACT_SUFFIXES = (".md", ".json", ".jsonl", ".png")
_SKIPPED_DIRS = ("checkpoints", "checkpoints_damaged")


def artefact_files(path: str) -> list[str]:
  """`path` itself, or for a directory the report, figure and data files under
  it (`ARTEFACT_SUFFIXES`; not checkpoints, hidden files or its own index)."""
  if not os.path.isdir(path):
    return [path]
  found = []
  for root, dirs, names in os.walk(path):
    dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS and not d.startswith("."))
    found += [os.path.join(root, name) for name in sorted(names)
              if name.endswith(ARTEFACT_SUFFIXES) and not name.startswith(".")
              and not (root == path and name in (INDEX_MD, INDEX_JSON))]
  return found


def update_index(directory: str, entry: Mapping[str, Any]) -> str:
  """Adds `entry` to `<directory>/index.md` (and `index.json`), replacing the
  entry with the same key; returns the path of index.md.

  `entry`: `key` (what identifies a command's entry, e.g. its name and
  evaluators), `title`, `command` (the command line), `config` (a JSON-able
  mapping or None), `started` (seconds since the epoch), `seconds` (how long it
  ran) and `artefacts` (the files it wrote, or directories: `artefact_files`),
  stored relative to `directory`.
  """
  missing = [f for f in _ENTRY_FIELDS if f not in entry]
  if missing:
    raise ValueError(f"index entry: expected the fields {list(_ENTRY_FIELDS)}, missing {missing}")
  directory = os.path.abspath(directory)
  artefacts = [os.path.relpath(os.path.abspath(f), directory)
               for path in entry["artefacts"] for f in artefact_files(path)]
  entry = {**{f: entry[f] for f in _ENTRY_FIELDS}, "artefacts": list(dict.fromkeys(artefacts))}
  entries = [e for e in _read_index(directory) if e["key"] != entry["key"]] + [entry]
  entries.sort(key=lambda e: e["started"])
  files.write_json_atomic(os.path.join(directory, INDEX_JSON), entries)
  return files.write_text_atomic(os.path.join(directory, INDEX_MD),
                                 index_markdown(entries, directory))


def _read_index(directory: str) -> list[dict[str, Any]]:
  """The entries of `<directory>/index.json` (none when it is absent)."""
  path = os.path.join(directory, INDEX_JSON)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return json.load(f)


def _link(text: str, path: str, image: bool = False) -> str:
  target = f"<{path}>" if " " in path else path
  return f"{'!' if image else ''}[{text}]({target})"


def _duration(seconds: float) -> str:
  minutes, seconds = divmod(round(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return (f"{hours} h {minutes} min" if hours else f"{minutes} min {seconds} s" if minutes
          else f"{seconds} s")


def index_markdown(entries: Sequence[Mapping[str, Any]], directory: str) -> str:
  """The index page of `entries` (see `update_index`), oldest first: per entry
  its reports, its figures (shown), and its other files by directory."""
  lines = [f"# Runs in {directory}", "",
           "Every command that ran here, oldest first: what ran, with which config, when and "
           "for how long, and what it wrote. Training curves and the evaluators' numbers and "
           f"figures: `tensorboard --logdir {directory}`.", ""]
  for entry in entries:
    started = datetime.datetime.fromtimestamp(entry["started"]).astimezone()
    lines += [f"## {entry['title']}", "", f"- command: `{entry['command']}`",
              f"- started {started.isoformat(sep=' ', timespec='seconds')}, "
              f"ran {_duration(entry['seconds'])}"]
    artefacts = entry["artefacts"]
    reports = [_link(p, p) for p in artefacts if p.endswith(".md")]
    if reports:
      lines.append("- reports: " + ", ".join(reports))
    by_directory: dict[str, list[str]] = {}
    for p in artefacts:
      if not p.endswith((".md", ".png")):
        by_directory.setdefault(os.path.dirname(p), []).append(_link(os.path.basename(p), p))
    if by_directory:
      lines.append("- files: " + "; ".join(f"`{d or '.'}/` " + ", ".join(links)
                                            for d, links in by_directory.items()))
    pngs = [p for p in artefacts if p.endswith(".png")]
    if pngs:
      lines += ["- figures:", ""] + [f"  {_link(p, p, image=True)}" for p in pngs]
    if entry["config"] is not None:
      lines += ["", "<details><summary>config</summary>", "", "```json",
                files.to_json(entry["config"]).rstrip("\n"), "```", "", "</details>"]
    lines.append("")
  return "\n".join(lines)

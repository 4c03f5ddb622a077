r"""Builds one of the papers' clip datasets as TFDS array_record files (no TensorFlow).

  python -m experiments.prepare --dataset=kinetics_sounds \
      --manual_dir=/data/ks_manual --data_dir=/data/tfds

  python -m experiments.prepare --dataset=ucf101_rgb_flow --config=split2 \
      --manual_dir=/data/ucf101 --data_dir=/data/tfds --num_workers=32

The manual directory layouts are documented in `mmsafe.data.tfds.audio_visual`
(kinetics_sounds, vggsound) and `mmsafe.data.tfds.ucf101_rgb_flow`. Clips that
cannot be used are skipped; the summary printed at the end (also stored in the
dataset's metadata.json) lists them. Rerunning on a prepared dataset only prints
the summary.
"""

import collections
import dataclasses
import os

from absl import app
from absl import flags
from absl import logging
import tensorflow_datasets as tfds
import tqdm

from mmsafe.data.tfds import BUILDERS, skip_summary
from mmsafe.data.tfds.clips import check_manual_dir

_DATASET = flags.DEFINE_enum("dataset", None, sorted(BUILDERS), "Dataset to build.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "The user's copy of the media and lists.")
_DATA_DIR = flags.DEFINE_string("data_dir", None,
                                "TFDS data directory to write to (default: TFDS's).")
_CONFIG = flags.DEFINE_string("config", None,
                              "Builder config name (ucf101_rgb_flow: split1, split2, split3).")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", None,
                                    "Clips processed in parallel (default: all CPUs).")
_OVERRIDE = flags.DEFINE_multi_string(
    "override", [], "key=value changes to the builder config (e.g. num_classes=3, "
    "frame_size=256); the config is then renamed <config>_<key><value>... so it gets its own "
    "directory.")
_LIST_SKIPPED = flags.DEFINE_integer("list_skipped", 20,
                                     "How many skipped clips to list per split (-1: all).")
flags.mark_flags_as_required(["dataset", "manual_dir"])


def format_summary(summary) -> str:
  """Human-readable text of `skip_summary(...)`."""
  lines = []
  for split, s in sorted(summary.items()):
    kinds = ", ".join(f"{k}: {v}" for k, v in sorted(s["skipped"].items())) or "none"
    lines.append(f"{split}: {s['written']} of {s['listed']} listed clips written; "
                 f"skipped {s['listed'] - s['written']} ({kinds})")
    shown = s["clips"] if _LIST_SKIPPED.value < 0 else s["clips"][:_LIST_SKIPPED.value]
    for skip in shown:
      lines.append(f"  {skip.clip}  [{skip.kind}] {skip.detail}")
    if len(shown) < len(s["clips"]):
      lines.append(f"  ... and {len(s['clips']) - len(shown)} more")
  return "\n".join(lines)


def make_config(builder_cls, name: str | None, overrides: list[str]):
  """The builder config `name` (default: the first) with `overrides` applied, or just
  the name when there are none."""
  if not overrides:
    return name
  configs = {c.name: c for c in builder_cls.BUILDER_CONFIGS}
  base = configs[name] if name else builder_cls.BUILDER_CONFIGS[0]
  fields = {f.name: f for f in dataclasses.fields(base)}
  changes = {}
  for item in overrides:
    key, sep, value = item.partition("=")
    if not sep or key not in fields or key in ("name", "version", "description"):
      raise app.UsageError(f"--override: expected key=value with key in "
                           f"{sorted(k for k in fields if k not in ('name', 'version'))}, "
                           f"got {item!r}")
    current = getattr(base, key)
    changes[key] = type(current)(value) if current is not None else value
  suffix = "_".join(f"{k}{v}" for k, v in sorted(changes.items()))
  return dataclasses.replace(base, name=f"{base.name}_{suffix}".replace(".", "p"), **changes)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  builder_cls = BUILDERS[_DATASET.value]
  try:
    manual_dir = check_manual_dir(os.path.expanduser(_MANUAL_DIR.value), builder_cls.name,
                                  builder_cls.LAYOUT)
  except FileNotFoundError as e:
    raise SystemExit(f"prepare: {e}") from e
  state = {"bar": None, "skipped": collections.Counter()}

  def progress(split, clip, reason):
    del clip
    if reason is not None:
      state["skipped"][reason] += 1
    bar = state["bar"]
    bar.update(1)
    bar.set_postfix(split=split, skipped=sum(state["skipped"].values()), refresh=False)

  config = make_config(builder_cls, _CONFIG.value, _OVERRIDE.value)
  builder = builder_cls(data_dir=_DATA_DIR.value, config=config,
                        num_workers=_NUM_WORKERS.value, progress=progress)
  if builder.is_prepared():
    print(f"{builder.name}: already prepared at {builder.data_dir}")
  else:
    try:
      _, lists = builder.read_lists(manual_dir)  # fails fast on bad lists
    except (FileNotFoundError, ValueError) as e:
      raise SystemExit(f"prepare: {e}") from e
    total = sum(len(clips) for clips in lists.values())
    tfds.disable_progress_bar()
    with tqdm.tqdm(total=total, unit="clip", desc=f"{builder.name}/{builder.builder_config.name}",
                   dynamic_ncols=True) as bar:
      state["bar"] = bar
      builder.download_and_prepare(
          file_format="array_record",
          download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    print(f"{builder.name}: written to {builder.data_dir}")
  print(format_summary(skip_summary(builder.info)))
  print(f"(full list of skipped clips: {os.path.join(builder.data_dir, 'metadata.json')})")


if __name__ == "__main__":
  app.run(main)

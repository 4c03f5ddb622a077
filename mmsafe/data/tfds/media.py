"""Media decoding and the papers' per-clip preprocessing, used by the TFDS builders.

Every function is pure apart from reading the media file it is given (ffmpeg
and ffprobe run as subprocesses; nothing is written to disk):

* `probe`: duration, frame rate, display aspect ratio and streams (ffprobe).
* `extract_frames`: RGB frames at 1 fps (ffmpeg's `fps` filter, as the
  reference code extracted them), squashed to `size x size` with bilinear
  (area-aware when shrinking) scaling; `extract_frame_numbers`: chosen native
  frames at their native size (for optical flow).
* `extract_audio`: mono float waveform at 16 kHz; `log_mel_fbank`: the
  Kaldi-compatible fbank of AST/CRMT (128 mel bins, 25 ms Hann windows, 10 ms
  shift, no dither, log power, computed on the waveform in [-1, 1] with its mean
  removed, exactly as `torchaudio.compliance.kaldi.fbank(..., htk_compat=True,
  window_type="hanning", use_energy=False, dither=0.0)`), through the
  `kaldi-native-fbank` package; `fit_frames` pads (with zeros) or cuts to a fixed
  number of frames, as the reference does.
* `tvl1_flow`: TV-L1 optical flow (OpenCV, `opencv-contrib-python-headless`),
  `quantize_flow`: the usual 8-bit storage of flow (`bound` px/frame maps to 255,
  zero motion to 128).
* `encode_jpeg` / `decode_jpeg` / `resize`: Pillow.

Failures that mean "this clip cannot be used" raise `MediaError` with a short
`kind` ("missing", "corrupt", "no_video", "no_audio", "too_short", "flow") so
builders can skip and count them; anything else is a bug and propagates.
"""

from __future__ import annotations

import dataclasses
import fractions
import io
import json
import math
import os
import shutil
import subprocess
import threading
from collections.abc import Sequence

import numpy as np

SAMPLE_RATE = 16_000
FFMPEG_TIMEOUT_S = 600.0


class MediaError(Exception):
  """A clip's media cannot be used; `kind` classifies why (for skip summaries)."""

  def __init__(self, kind: str, detail: str):
    super().__init__(f"{kind}: {detail}")
    self.kind = kind
    self.detail = detail


@dataclasses.dataclass(frozen=True)
class MediaInfo:
  """What `probe` learns about a media file.

  Attributes:
    duration: seconds (stream duration when known, else the container's; 0 if unknown).
    width, height: decoded frame size in pixels after rotation (0 without video).
    aspect: display aspect ratio width / height (sample aspect ratio and rotation
      applied; 1.0 without video).
    fps: average native frame rate (0 without video).
    num_frames: native frame count from the container, or estimated from
      duration x fps when the container does not say (0 without video).
    has_video, has_audio: whether the file has such a stream.
  """

  duration: float
  width: int
  height: int
  aspect: float
  fps: float
  num_frames: int
  has_video: bool
  has_audio: bool


def require_tool(name: str) -> str:
  """The path of executable `name` (ffmpeg, ffprobe), or a clear error saying how to get it."""
  path = shutil.which(name)
  if path is None:
    raise FileNotFoundError(f"{name}: not found on PATH; install the Debian package 'ffmpeg' "
                            f"(apt-get install ffmpeg) or any ffmpeg >= 4.4 build")
  return path


def _run(args: Sequence[str], what: str) -> bytes:
  """Runs a command, returning stdout; a failure raises MediaError("corrupt", last stderr line)."""
  try:
    proc = subprocess.run(list(args), stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=FFMPEG_TIMEOUT_S, check=False)
  except subprocess.TimeoutExpired as e:
    raise MediaError("corrupt", f"{what}: timed out after {FFMPEG_TIMEOUT_S:.0f} s") from e
  if proc.returncode != 0:
    lines = [ln for ln in proc.stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
    raise MediaError("corrupt", f"{what}: {lines[-1].strip() if lines else 'exit status'} "
                     f"(exit {proc.returncode})")
  return proc.stdout


def _rate(text: str | None) -> float:
  """ffprobe's "num/den" rate as a float (0 when absent or degenerate)."""
  try:
    value = fractions.Fraction(text or "0")
  except (ValueError, ZeroDivisionError):
    return 0.0
  return float(value)


def _float(text) -> float:
  try:
    value = float(text)
  except (TypeError, ValueError):
    return 0.0
  return value if math.isfinite(value) else 0.0


def _rotation(stream: dict) -> int:
  """Rotation in degrees (display matrix side data or the legacy "rotate" tag)."""
  for side in stream.get("side_data_list", []) or []:
    if "rotation" in side:
      return int(round(_float(side["rotation"])))
  return int(round(_float((stream.get("tags") or {}).get("rotate", 0))))


def probe(path: str | os.PathLike) -> MediaInfo:
  """Describes `path` with ffprobe.

  Raises:
    MediaError("missing") for a missing file, MediaError("corrupt") for one
    ffprobe cannot read.
  """
  if not os.path.isfile(path):
    raise MediaError("missing", f"no such file {os.fspath(path)}")
  out = _run([require_tool("ffprobe"), "-v", "error", "-show_streams", "-show_format",
              "-of", "json", os.fspath(path)], "ffprobe")
  try:
    meta = json.loads(out.decode("utf-8", "replace") or "{}")
  except json.JSONDecodeError as e:
    raise MediaError("corrupt", f"ffprobe: unparsable output ({e})") from e
  streams = meta.get("streams", []) or []
  video = next((s for s in streams if s.get("codec_type") == "video"
                and not (s.get("disposition") or {}).get("attached_pic")), None)
  has_audio = any(s.get("codec_type") == "audio" for s in streams)
  container_duration = _float((meta.get("format") or {}).get("duration"))
  if video is None:
    return MediaInfo(duration=container_duration, width=0, height=0, aspect=1.0, fps=0.0,
                     num_frames=0, has_video=False, has_audio=has_audio)
  width, height = int(video.get("width") or 0), int(video.get("height") or 0)
  sar = _rate((video.get("sample_aspect_ratio") or "1:1").replace(":", "/")) or 1.0
  aspect = width * sar / height if width and height else 1.0
  if _rotation(video) % 180 == 90:
    width, height, aspect = height, width, 1.0 / aspect
  fps = _rate(video.get("avg_frame_rate")) or _rate(video.get("r_frame_rate"))
  duration = _float(video.get("duration")) or container_duration
  num_frames = int(_float(video.get("nb_frames"))) or int(math.floor(duration * fps))
  return MediaInfo(duration=duration, width=width, height=height, aspect=float(aspect),
                   fps=fps, num_frames=num_frames, has_video=True, has_audio=has_audio)


def _raw_frames(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
  """Complete raw frames of `shape` in `data` as a uint8 array [N, *shape]."""
  size = int(np.prod(shape))
  n = len(data) // size
  return np.frombuffer(data[:n * size], np.uint8).reshape((n, *shape))


def extract_frames(path: str | os.PathLike, *, size: int, fps: float = 1.0,
                   max_frames: int | None = None) -> np.ndarray:
  """RGB frames sampled at `fps` (ffmpeg `fps` filter), squashed to `size x size`.

  Returns uint8 `[T, size, size, 3]` (T may be 0 for an empty stream).
  """
  rate = fractions.Fraction(fps).limit_denominator(1_000_000)
  args = [require_tool("ffmpeg"), "-v", "error", "-nostdin", "-i", os.fspath(path),
          "-map", "0:v:0", "-an", "-vf",
          f"fps={rate.numerator}/{rate.denominator},scale={size}:{size}:flags=bilinear",
          "-pix_fmt", "rgb24"]
  if max_frames is not None:
    args += ["-frames:v", str(int(max_frames))]
  args += ["-f", "rawvideo", "pipe:1"]
  return _raw_frames(_run(args, "ffmpeg frames"), (size, size, 3))


def extract_frame_numbers(path: str | os.PathLike, frame_numbers: Sequence[int], *,
                          width: int, height: int) -> np.ndarray:
  """The native frames numbered `frame_numbers` (0-based, decode order), RGB at
  `width x height` (pass the probed size to keep them native).

  Returns uint8 `[N, height, width, 3]`, the frames in increasing frame number
  (duplicates removed). N is smaller than requested when the stream ends first.
  """
  wanted = sorted(set(int(n) for n in frame_numbers))
  expr = "+".join(f"eq(n\\,{n})" for n in wanted)
  args = [require_tool("ffmpeg"), "-v", "error", "-nostdin", "-i", os.fspath(path),
          "-map", "0:v:0", "-an", "-vf", f"select='{expr}',scale={width}:{height}:flags=bilinear",
          "-vsync", "0", "-pix_fmt", "rgb24", "-f", "rawvideo", "pipe:1"]
  return _raw_frames(_run(args, "ffmpeg frames"), (height, width, 3))


def extract_audio(path: str | os.PathLike, *, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
  """The first audio stream as mono float32 samples in [-1, 1] at `sample_rate` Hz."""
  data = _run([require_tool("ffmpeg"), "-v", "error", "-nostdin", "-i", os.fspath(path),
               "-map", "0:a:0", "-vn", "-ac", "1", "-ar", str(int(sample_rate)),
               "-f", "f32le", "pipe:1"], "ffmpeg audio")
  return np.frombuffer(data[:len(data) // 4 * 4], "<f4").astype(np.float32)


def extract_frames_and_audio(path: str | os.PathLike, *, size: int, fps: float = 1.0,
                             max_frames: int | None = None, audio_path: str | None = None,
                             sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, np.ndarray]:
  """`extract_frames` and `extract_audio` (of `audio_path`, default `path`) in one ffmpeg
  run (the file is demuxed once; ffmpeg's start-up is paid once): (uint8 `[T, size,
  size, 3]`, float32 `[N]`). The audio leaves through an extra pipe."""
  rate = fractions.Fraction(fps).limit_denominator(1_000_000)
  ffmpeg = require_tool("ffmpeg")
  read_fd, write_fd = os.pipe()
  args = [ffmpeg, "-v", "error", "-nostdin", "-i", os.fspath(path)]
  if audio_path is not None:
    args += ["-i", os.fspath(audio_path)]
  args += ["-map", "0:v:0", "-an", "-vf",
           f"fps={rate.numerator}/{rate.denominator},scale={size}:{size}:flags=bilinear",
           "-pix_fmt", "rgb24"]
  if max_frames is not None:
    args += ["-frames:v", str(int(max_frames))]
  args += ["-f", "rawvideo", "pipe:1",
           "-map", f"{1 if audio_path is not None else 0}:a:0", "-vn", "-ac", "1",
           "-ar", str(int(sample_rate)), "-f", "f32le", f"pipe:{write_fd}"]
  audio: list[bytes] = []
  try:
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, pass_fds=(write_fd,))
  except BaseException:
    os.close(read_fd)
    raise
  finally:
    os.close(write_fd)
  with open(read_fd, "rb") as reader:
    drain = threading.Thread(target=lambda: audio.append(reader.read()), daemon=True)
    drain.start()
    try:
      out, err = proc.communicate(timeout=FFMPEG_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
      proc.kill()
      proc.communicate()
      raise MediaError("corrupt", f"ffmpeg: timed out after {FFMPEG_TIMEOUT_S:.0f} s") from e
    finally:
      drain.join()
  if proc.returncode != 0:
    lines = [ln for ln in err.decode("utf-8", "replace").splitlines() if ln.strip()]
    raise MediaError("corrupt", f"ffmpeg: {lines[-1].strip() if lines else 'exit status'} "
                     f"(exit {proc.returncode})")
  data = audio[0] if audio else b""
  return (_raw_frames(out, (size, size, 3)),
          np.frombuffer(data[:len(data) // 4 * 4], "<f4").astype(np.float32))


def _mel(freq):
  return 1127.0 * np.log1p(np.asarray(freq, np.float64) / 700.0)


def _inverse_mel(mel):
  return 700.0 * np.expm1(np.asarray(mel, np.float64) / 1127.0)


def padded_window_size(sample_rate: int, frame_length_ms: float) -> int:
  """Kaldi's FFT size: the window length in samples rounded up to a power of two."""
  length = int(sample_rate * frame_length_ms * 0.001)
  return 1 << max(length - 1, 0).bit_length()


def mel_bin_runs(sample_rate: int, frame_length_ms: float, num_bins: int,
                 low_freq: float = 20.0) -> list[tuple[int, int]]:
  """Maximal runs `[start, stop)` of mel bins that contain at least one FFT bin.

  Kaldi (and kaldi-native-fbank) refuse filterbanks with an empty triangle;
  torchaudio's `kaldi.fbank` keeps it (its log energy is log(FLT_EPSILON)). With
  16 kHz, 25 ms windows (512-point FFT) and 128 bins, bin 3 is empty.
  """
  nfft = padded_window_size(sample_rate, frame_length_ms)
  lo, hi = _mel(low_freq), _mel(sample_rate / 2.0)
  delta = (hi - lo) / (num_bins + 1)
  fft_mel = _mel(np.arange(nfft // 2) * (sample_rate / nfft))
  left = lo + np.arange(num_bins) * delta
  nonempty = [bool(np.any((fft_mel > a) & (fft_mel < a + 2 * delta))) for a in left]
  runs, start = [], None
  for b, ok in enumerate(nonempty + [False]):
    if ok and start is None:
      start = b
    elif not ok and start is not None:
      runs.append((start, b))
      start = None
  return runs


def check_fbank_options(sample_rate: int, num_bins: int, frame_length_ms: float = 25.0) -> None:
  """Raises ValueError if `log_mel_fbank` cannot compute these options with
  kaldi-native-fbank (a run of fewer than 3 non-empty mel bins, or none)."""
  runs = mel_bin_runs(sample_rate, frame_length_ms, num_bins)
  short = [r for r in runs if r[1] - r[0] < 3]
  if not runs or short:
    raise ValueError(f"log_mel_fbank: {num_bins} mel bins at {sample_rate} Hz with "
                     f"{frame_length_ms:g} ms windows leave runs of non-empty bins {short or runs} "
                     f"shorter than the 3 bins kaldi-native-fbank needs; use fewer bins")


def log_mel_fbank(waveform: np.ndarray, *, sample_rate: int = SAMPLE_RATE, num_bins: int = 128,
                  frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0) -> np.ndarray:
  """Kaldi-compatible log-mel filterbank of a waveform in [-1, 1]: float32 `[frames, num_bins]`.

  Matches the AST/CRMT reference: the waveform's mean is removed, then
  `torchaudio.compliance.kaldi.fbank(w, htk_compat=True, sample_frequency=sr,
  use_energy=False, window_type="hanning", num_mel_bins=num_bins, dither=0.0,
  frame_shift=10)` (pre-emphasis 0.97, DC removal per frame, 20 Hz to Nyquist,
  snip_edges, log of mel power floored at float32 epsilon). The waveform is *not*
  rescaled to the 16-bit range: the reference normalisation constants
  (mean -4.503877, std 5.141276) assume values in [-1, 1].

  kaldi-native-fbank computes every bin; as it rejects filterbanks with empty
  triangles (bin 3 at the defaults, see `mel_bin_runs`), each run of non-empty
  bins is computed with the same mel grid (a low/high frequency and bin count
  chosen so the triangles coincide) and empty bins get log(FLT_EPSILON), as in
  torchaudio. Returns `[0, num_bins]` for a clip shorter than one window.
  """
  import kaldi_native_fbank as knf
  check_fbank_options(sample_rate, num_bins, frame_length_ms)
  x = np.asarray(waveform, np.float32)
  x = x - x.mean() if x.size else x
  low_freq = 20.0
  lo, hi = _mel(low_freq), _mel(sample_rate / 2.0)
  delta = (hi - lo) / (num_bins + 1)
  parts = []
  for start, stop in mel_bin_runs(sample_rate, frame_length_ms, num_bins, low_freq):
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = float(sample_rate)
    opts.frame_opts.frame_length_ms = float(frame_length_ms)
    opts.frame_opts.frame_shift_ms = float(frame_shift_ms)
    opts.frame_opts.dither = 0.0
    opts.frame_opts.window_type = "hanning"
    opts.frame_opts.preemph_coeff = 0.97
    opts.frame_opts.remove_dc_offset = True
    opts.frame_opts.round_to_power_of_two = True
    opts.frame_opts.snip_edges = True
    opts.mel_opts.num_bins = stop - start
    opts.mel_opts.low_freq = low_freq if start == 0 else float(_inverse_mel(lo + start * delta))
    opts.mel_opts.high_freq = (0.0 if stop == num_bins
                               else float(_inverse_mel(lo + (stop + 1) * delta)))
    opts.use_energy = False
    opts.htk_compat = True
    opts.use_log_fbank = True
    opts.use_power = True
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(float(sample_rate), x)
    fbank.input_finished()
    frames = [np.asarray(fbank.get_frame(i), np.float32) for i in range(fbank.num_frames_ready)]
    parts.append((start, stop, frames))
  n = len(parts[0][2])
  out = np.full((n, int(num_bins)), np.log(np.finfo(np.float32).eps), np.float32)
  for start, stop, frames in parts:
    if n:
      out[:, start:stop] = np.stack(frames)
  return out


def fit_frames(features: np.ndarray, num_frames: int) -> np.ndarray:
  """Pads `[T, F]` features with zeros at the end, or cuts them, to `[num_frames, F]`
  (the reference's `ZeroPad2d` / slice)."""
  t = features.shape[0]
  if t >= num_frames:
    return features[:num_frames]
  pad = np.zeros((num_frames - t, features.shape[1]), features.dtype)
  return np.concatenate([features, pad], axis=0)


def tvl1_flow(prev_gray: np.ndarray, next_gray: np.ndarray) -> np.ndarray:
  """Dual TV-L1 optical flow (OpenCV defaults, as denseflow/TSN) from one uint8 gray
  frame to the next: float32 `[H, W, 2]` (u, v) in pixels/frame.

  Needs `cv2.optflow` from `opencv-contrib-python-headless` (the `flow` extra).
  """
  try:
    import cv2
    create = cv2.optflow.DualTVL1OpticalFlow_create
  except (ImportError, AttributeError) as e:
    raise ImportError("tvl1_flow: needs OpenCV's contrib modules: pip install "
                      "opencv-contrib-python-headless (the mmsafe[flow] extra), or put "
                      "precomputed flow in the manual directory") from e
  flow = create().calc(np.ascontiguousarray(prev_gray), np.ascontiguousarray(next_gray), None)
  return np.asarray(flow, np.float32)


def quantize_flow(flow: np.ndarray, bound: float = 20.0) -> np.ndarray:
  """Flow in px/frame to uint8: `[-bound, bound]` maps linearly onto [0, 255] (clipped),
  so `q / 127.5 - 1 == flow / bound` up to rounding."""
  q = np.rint((np.clip(flow, -bound, bound) + bound) * (255.0 / (2.0 * bound)))
  return q.astype(np.uint8)


def to_gray(rgb: np.ndarray) -> np.ndarray:
  """ITU-R 601 luma of uint8 RGB `[..., 3]` (as OpenCV/Pillow), uint8."""
  y = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
  return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
  """Pillow bilinear resize (antialiased when shrinking) of uint8 `[H, W]` or `[H, W, 3]`."""
  from PIL import Image
  if image.shape[:2] == (height, width):
    return image
  return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
  """JPEG bytes (Pillow/libjpeg, 4:2:0 chroma) of uint8 `[H, W]` (gray) or `[H, W, 3]` (RGB)."""
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(image)).save(buf, format="JPEG", quality=int(quality))
  return buf.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
  """uint8 array of a JPEG (`[H, W]` gray or `[H, W, 3]` RGB)."""
  from PIL import Image
  with Image.open(io.BytesIO(data)) as img:
    return np.asarray(img)

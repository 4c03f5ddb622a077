"""Spoken-digit audio helpers: WAV decoding, resampling and fixed-size log-mel
spectrograms (Kaldi-compatible filterbanks from the `kaldi-native-fbank` wheel).

Every clip, synthetic or recorded, goes through the same chain
(`spectrogram`):

1. decode 8/16/32-bit PCM or float WAV, mix to mono, scale to [-1, 1);
2. resample to 16 kHz (`scipy.signal.resample_poly`, exact rational ratio);
3. 40-bin log-mel fbank, 25 ms windows, 10 ms shift, no dither. The mel
   filters span 100-3800 Hz (the telephone band), so 8 kHz telephone
   recordings and 22.05 kHz synthesised speech see the same frequency range;
4. gain normalisation: subtract the clip's maximum log-energy (so every value
   is <= 0) and floor at `-top_db` (in natural-log power units);
5. trim leading/trailing frames whose energy is more than `trim_db` below the
   loudest frame, then centre the word in `num_frames` frames, padding with the
   floor value; a word longer than `num_frames` is linearly time-compressed.

All functions are pure and deterministic.
"""

from __future__ import annotations

import dataclasses
import io
import math
import struct
import wave

import numpy as np

SAMPLE_RATE = 16_000


@dataclasses.dataclass(frozen=True)
class LogMelConfig:
  """Parameters of `spectrogram`. The defaults give `[100, 40]` arrays (1.0 s)."""

  num_frames: int = 100
  num_bins: int = 40
  frame_shift_ms: float = 10.0
  frame_length_ms: float = 25.0
  low_freq: float = 100.0
  high_freq: float = 3800.0
  top_db: float = 60.0  # dynamic range kept below the clip's loudest bin
  trim_db: float = 40.0  # frames this far below the loudest frame count as silence
  margin_frames: int = 3  # silence kept on each side of the trimmed word

  @property
  def floor(self) -> float:
    """The value of silence in the output (natural-log power relative to the peak)."""
    return -self.top_db / 10.0 * math.log(10.0)


def read_wav(data: bytes) -> tuple[np.ndarray, int]:
  """Decodes a RIFF/WAVE byte string into (float32 mono samples in [-1, 1), rate).

  Tolerates streamed headers whose RIFF/data sizes are placeholders (as
  written by `espeak-ng --stdout`): the data chunk is clipped to the bytes
  present. Supports integer PCM (8, 16, 24, 32 bit) and 32/64-bit float.
  """
  if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
    raise ValueError("read_wav: expected a RIFF/WAVE byte string")
  pos, fmt, samples = 12, None, None
  while pos + 8 <= len(data):
    chunk_id, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
    body = data[pos + 8:pos + 8 + size]
    if chunk_id == b"fmt ":
      fmt = struct.unpack("<HHIIHH", body[:16])
    elif chunk_id == b"data":
      samples = body
      break
    pos += 8 + size + (size & 1)
  if fmt is None or samples is None:
    raise ValueError("read_wav: missing 'fmt ' or 'data' chunk")
  tag, channels, rate, _, _, bits = fmt
  width = bits // 8
  samples = samples[:len(samples) // (width * channels) * width * channels]
  if tag == 3:  # IEEE float
    x = np.frombuffer(samples, dtype=f"<f{width}").astype(np.float32)
  elif tag in (1, 0xFFFE):  # PCM (or extensible PCM)
    if width == 1:
      x = (np.frombuffer(samples, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 3:
      b = np.frombuffer(samples, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
      v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
      x = (np.where(v >= 1 << 23, v - (1 << 24), v) / float(1 << 23)).astype(np.float32)
    else:
      x = np.frombuffer(samples, dtype=f"<i{width}").astype(np.float32) / float(1 << (bits - 1))
  else:
    raise ValueError(f"read_wav: unsupported WAVE format tag {tag}")
  if channels > 1:
    x = x.reshape(-1, channels).mean(axis=1)
  return x, int(rate)


def read_wav_file(path) -> tuple[np.ndarray, int]:
  """`read_wav` of a file's contents."""
  with open(path, "rb") as f:
    return read_wav(f.read())


def write_wav(samples: np.ndarray, rate: int) -> bytes:
  """Encodes float samples in [-1, 1] as 16-bit mono PCM WAV bytes (for tests and debugging)."""
  pcm = np.clip(np.round(np.asarray(samples) * 32767.0), -32768, 32767).astype("<i2")
  buf = io.BytesIO()
  with wave.open(buf, "wb") as w:
    w.setnchannels(1)
    w.setsampwidth(2)
    w.setframerate(rate)
    w.writeframes(pcm.tobytes())
  return buf.getvalue()


def resample(x: np.ndarray, rate_in: int, rate_out: int = SAMPLE_RATE) -> np.ndarray:
  """Polyphase resampling by the exact ratio `rate_out / rate_in` (float32 out)."""
  if rate_in == rate_out:
    return np.asarray(x, np.float32)
  from scipy.signal import resample_poly  # scipy ships with scikit-learn
  g = math.gcd(int(rate_in), int(rate_out))
  return resample_poly(np.asarray(x, np.float64), rate_out // g, rate_in // g).astype(np.float32)


def log_mel(x: np.ndarray, rate: int = SAMPLE_RATE, config: LogMelConfig = LogMelConfig()
            ) -> np.ndarray:
  """Kaldi fbank (natural-log mel energies) of 16 kHz samples in [-1, 1): `[frames, bins]`.

  Samples are scaled to the 16-bit integer range, as Kaldi expects. Returns
  an empty `[0, bins]` array for clips shorter than one window.
  """
  import kaldi_native_fbank as knf
  if rate != SAMPLE_RATE:
    raise ValueError(f"log_mel: expected {SAMPLE_RATE} Hz samples, got {rate} Hz (resample first)")
  opts = knf.FbankOptions()
  opts.frame_opts.samp_freq = float(SAMPLE_RATE)
  opts.frame_opts.dither = 0.0
  opts.frame_opts.frame_shift_ms = config.frame_shift_ms
  opts.frame_opts.frame_length_ms = config.frame_length_ms
  opts.mel_opts.num_bins = config.num_bins
  opts.mel_opts.low_freq = config.low_freq
  opts.mel_opts.high_freq = config.high_freq
  fbank = knf.OnlineFbank(opts)
  fbank.accept_waveform(float(SAMPLE_RATE), np.asarray(x, np.float32) * 32768.0)
  fbank.input_finished()
  n = fbank.num_frames_ready
  if n == 0:
    return np.zeros((0, config.num_bins), np.float32)
  return np.stack([np.asarray(fbank.get_frame(i), np.float32) for i in range(n)])


def fit_frames(mel: np.ndarray, config: LogMelConfig = LogMelConfig()) -> np.ndarray:
  """Steps 4-5 of the module docstring: gain-normalise, trim, centre, pad: `[T, F]`."""
  t, f = config.num_frames, config.num_bins
  out = np.full((t, f), config.floor, np.float32)
  if mel.shape[0] == 0:
    return out
  mel = np.maximum(mel - mel.max(), config.floor)
  energy = np.log(np.exp(mel.astype(np.float64)).sum(axis=1))
  active = np.flatnonzero(energy >= energy.max() - config.trim_db / 10.0 * math.log(10.0))
  start = max(int(active[0]) - config.margin_frames, 0)
  stop = min(int(active[-1]) + 1 + config.margin_frames, mel.shape[0])
  word = mel[start:stop]
  if word.shape[0] > t:  # time-compress by linear interpolation
    pos = np.linspace(0.0, word.shape[0] - 1.0, t)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, word.shape[0] - 1)
    w = (pos - lo)[:, None]
    word = (1.0 - w) * word[lo] + w * word[hi]
  offset = (t - word.shape[0]) // 2
  out[offset:offset + word.shape[0]] = word
  return out


def spectrogram(x: np.ndarray, rate: int, config: LogMelConfig = LogMelConfig()) -> np.ndarray:
  """The full chain of the module docstring for one clip: float32 `[T, F]`, values in
  `[config.floor, 0]`."""
  return fit_frames(log_mel(resample(x, rate, SAMPLE_RATE), SAMPLE_RATE, config), config)

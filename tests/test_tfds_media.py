"""Media preprocessing of the clip builders: fbank vs a torchaudio transcription, flow
quantisation, frame sampling, ffmpeg decoding and TV-L1 on tiny inputs."""

import shutil
import subprocess

import numpy as np
import pytest

from mmsafe.data.tfds import clips, media

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None,
                                  reason="needs ffmpeg (apt-get install ffmpeg)")


def torchaudio_fbank(wave, sample_rate=16000, num_bins=128):
  """numpy transcription of torchaudio.compliance.kaldi.fbank with the AST settings
  (htk_compat, hanning window, no dither, no energy, 25/10 ms, preemphasis 0.97,
  DC removal, power spectrum, log floored at FLT_EPSILON; empty mel bins allowed)."""
  w = np.asarray(wave, np.float64)
  win, shift, nfft = int(sample_rate * 0.025), int(sample_rate * 0.010), 512
  n = 1 + (len(w) - win) // shift
  frames = np.stack([w[i * shift:i * shift + win] for i in range(n)])
  frames = frames - frames.mean(axis=1, keepdims=True)
  frames = frames - 0.97 * np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
  frames = frames * (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / (win - 1)))
  power = np.abs(np.fft.rfft(frames, nfft)) ** 2
  mel = lambda f: 1127.0 * np.log1p(f / 700.0)
  lo, hi = mel(20.0), mel(sample_rate / 2)
  delta = (hi - lo) / (num_bins + 1)
  fft_mel = mel(np.arange(nfft // 2) * sample_rate / nfft)
  banks = np.zeros((num_bins, nfft // 2 + 1))
  for b in range(num_bins):
    left, center, right = lo + b * delta, lo + (b + 1) * delta, lo + (b + 2) * delta
    banks[b, :nfft // 2] = np.maximum(0.0, np.minimum((fft_mel - left) / (center - left),
                                                      (right - fft_mel) / (right - center)))
  return np.log(np.maximum(power @ banks.T, np.finfo(np.float32).eps))


@pytest.mark.parametrize("num_bins", [64, 128])
def test_fbank_matches_torchaudio_kaldi_fbank(num_bins):
  rng = np.random.default_rng(0)
  t = np.arange(16000) / 16000
  wave = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size) + 0.1)
  ours = media.log_mel_fbank(wave.astype(np.float32), num_bins=num_bins)
  reference = torchaudio_fbank(wave - wave.mean(), num_bins=num_bins)  # AST removes the mean
  assert ours.shape == reference.shape == (98, num_bins)
  np.testing.assert_allclose(ours, reference, atol=2e-3)
  if num_bins == 128:  # bin 3 has no FFT bin at 16 kHz / 512 points: log(FLT_EPSILON)
    assert media.mel_bin_runs(16000, 25.0, 128) == [(0, 3), (4, 128)]
    np.testing.assert_allclose(ours[:, 3], np.log(np.finfo(np.float32).eps))


def test_fbank_rejects_bins_kaldi_native_fbank_cannot_compute_and_short_input():
  with pytest.raises(ValueError, match="256 mel bins"):
    media.check_fbank_options(16000, 256)
  assert media.log_mel_fbank(np.zeros(100, np.float32)).shape == (0, 128)


def test_fit_frames_pads_with_zeros_or_cuts():
  x = np.ones((5, 4), np.float32)
  np.testing.assert_array_equal(media.fit_frames(x, 7)[5:], 0)
  assert media.fit_frames(x, 7).shape == (7, 4)
  assert media.fit_frames(x, 3).shape == (3, 4)


def test_quantize_flow_maps_bound_to_byte_range():
  flow = np.array([-30.0, -20.0, 0.0, 10.0, 20.0, 30.0], np.float32)
  q = media.quantize_flow(flow, bound=20.0)
  assert q.dtype == np.uint8
  np.testing.assert_array_equal(q, [0, 0, 128, 191, 255, 255])
  np.testing.assert_allclose(q / 127.5 - 1, np.clip(flow, -20, 20) / 20, atol=1 / 127.5)


def test_frame_numbers_one_per_second_with_successor_and_thinning():
  np.testing.assert_array_equal(clips.frame_numbers(75, 25.0, 10), [0, 25, 50])
  np.testing.assert_array_equal(clips.frame_numbers(51, 25.0, 10), [0, 25])  # 50 has no successor
  thinned = clips.frame_numbers(25 * 60, 25.0, 10)
  assert len(thinned) == 10 and thinned[0] == 0 and thinned[-1] == 25 * 59
  assert len(clips.frame_numbers(1, 25.0, 10)) == 0


@needs_ffmpeg
def test_probe_and_extract_on_a_generated_clip(tmp_path):
  path = tmp_path / "clip.mp4"
  subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i",
                  "testsrc=size=64x48:rate=10:duration=3", "-f", "lavfi", "-i",
                  "sine=frequency=500:sample_rate=22050:duration=3", "-c:v", "mpeg4",
                  "-c:a", "aac", "-shortest", str(path)], check=True)
  info = media.probe(path)
  assert info.has_video and info.has_audio
  assert (info.width, info.height) == (64, 48) and info.aspect == pytest.approx(4 / 3)
  assert info.fps == pytest.approx(10) and 2.9 < info.duration < 3.2
  frames = media.extract_frames(path, size=16)
  assert frames.shape == (3, 16, 16, 3) and frames.dtype == np.uint8
  native = media.extract_frame_numbers(path, [0, 1, 10, 1000], width=64, height=48)
  assert native.shape == (3, 48, 64, 3)  # frame 1000 does not exist
  wave = media.extract_audio(path)
  assert wave.dtype == np.float32 and 2.9 * 16000 < wave.size < 3.2 * 16000
  spectrum = np.abs(np.fft.rfft(wave[4000:20000]))
  assert abs(np.argmax(spectrum) * 16000 / 16000 - 500) < 5  # 1 Hz bins
  with pytest.raises(media.MediaError) as e:
    media.probe(tmp_path / "missing.mp4")
  assert e.value.kind == "missing"
  (tmp_path / "bad.mp4").write_bytes(b"not a video")
  with pytest.raises(media.MediaError) as e:
    media.probe(tmp_path / "bad.mp4")
  assert e.value.kind == "corrupt" and "bad.mp4" in str(e.value)


def test_tvl1_flow_recovers_a_shift():
  cv2 = pytest.importorskip("cv2")
  if not hasattr(cv2, "optflow"):
    pytest.skip("TV-L1 needs opencv-contrib-python-headless (cv2.optflow)")
  rng = np.random.default_rng(0)
  base = rng.random((40, 40))
  from scipy.ndimage import gaussian_filter
  image = (255 * (gaussian_filter(base, 2.0) - 0.3).clip(0, 0.4) / 0.4).astype(np.uint8)
  moved = np.roll(image, 2, axis=1)  # content moves 2 px to the right: u = +2
  flow = media.tvl1_flow(image, moved)
  assert flow.shape == (40, 40, 2) and flow.dtype == np.float32
  center = flow[10:30, 10:30]
  assert abs(np.median(center[..., 0]) - 2.0) < 0.3
  assert abs(np.median(center[..., 1])) < 0.3


def test_jpeg_round_trip_and_resize():
  image = np.tile(np.arange(32, dtype=np.uint8)[None, :, None] * 8, (24, 1, 3))
  decoded = media.decode_jpeg(media.encode_jpeg(image, 95))
  assert decoded.shape == image.shape and np.abs(decoded.astype(int) - image).max() < 12
  assert media.resize(image, 16, 8).shape == (8, 16, 3)
  assert media.resize(image[..., 0], 16, 8).shape == (8, 16)

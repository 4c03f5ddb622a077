"""`av_clips`: the clips of `mmsafe.data.av_clips` (10 digit classes), audio + 1-fps frames.

The Kinetics-Sounds builder (`mmsafe.data.tfds.audio_visual`: the same manual
directory layout, per-clip processing, skipping and metadata) with a config
sized for the data: 64x64 frames (3 per 3-s clip), a 64-bin log-mel fbank of
300 frames (3 s). `mmsafe.data.av_clips_cache` writes the manual directory and
builds it on first use; `experiments.prepare --dataset=av_clips
--manual_dir=DIR` builds it from a manual directory written by
`mmsafe.data.av_clips.write_manual_dir`.
"""

from __future__ import annotations

from mmsafe.data.tfds.audio_visual import AudioVisualBuilder, AudioVisualConfig

NUM_CLASSES = 10
CONFIG = AudioVisualConfig(name="default", num_classes=NUM_CLASSES, frame_size=64, max_frames=3,
                           num_mel_bins=64, num_audio_frames=300, min_audio_seconds=1.0,
                           description="64x64 frames, 64-bin fbank of 3 s.")


class AvClips(AudioVisualBuilder):
  """av_clips from a manual directory (see the module docstring)."""

  name = "av_clips"
  BUILDER_CONFIGS = [CONFIG]
  DESCRIPTION = __doc__

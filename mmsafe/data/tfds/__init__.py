"""TFDS builders for the papers' clip datasets, written and read without TensorFlow.

Importing this package registers the builders with TFDS:

    kinetics_sounds    Kinetics-Sounds, 31 classes: "visual" (1-fps JPEG frames) + "audio"
    vggsound           VGGSound, 309 classes: "visual" + "audio"
    ucf101_rgb_flow    UCF101, 101 classes, configs split1/2/3: "visual" + "flow" (TV-L1)
    av_clips           spoken + moving digits made on this machine, 10 classes (the
                       Kinetics-Sounds layout; `mmsafe.data.av_clips`)

Each reads a manual directory (layouts in `audio_visual` and `ucf101_rgb_flow`),
writes `array_record` files of plain `tfds.features.Tensor` features and is
read with `tfds.data_source` / `builder.as_data_source()`; frames are selected,
cropped and normalised at read time by `mmsafe.data.clips`.

    builder = KineticsSounds(data_dir=out)
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=manual))
    skip_summary(builder.info)  # skipped clips per split and why
"""

from mmsafe.data.tfds.audio_visual import AudioVisualBuilder, AudioVisualConfig
from mmsafe.data.tfds.av_clips import AvClips
from mmsafe.data.tfds.clips import Clip, ClipBuilder, ClipConfig, Skip, skip_summary
from mmsafe.data.tfds.kinetics_sounds import KineticsSounds
from mmsafe.data.tfds.media import MediaError
from mmsafe.data.tfds.ucf101_rgb_flow import Ucf101Config, Ucf101RgbFlow
from mmsafe.data.tfds.vggsound import Vggsound

BUILDERS = {b.name: b for b in (AvClips, KineticsSounds, Ucf101RgbFlow, Vggsound)}

__all__ = ["AudioVisualBuilder", "AudioVisualConfig", "AvClips", "BUILDERS", "Clip", "ClipBuilder",
           "ClipConfig", "KineticsSounds", "MediaError", "Skip", "Ucf101Config",
           "Ucf101RgbFlow", "Vggsound", "skip_summary"]

"""Flags shared by the benchmarks: Kinetics-Sounds-shaped random inputs.

Defaults are the CRMT paper's Kinetics-Sounds shapes (3 frames of 224x224 RGB,
a 1024x128 log-mel spectrogram, 31 classes, ResNet18 encoders); shrink them
with the flags for a CPU run.
"""

from absl import flags

FRAMES = flags.DEFINE_integer("frames", 3, "Visual frames per example (1: a single image).")
IMAGE = flags.DEFINE_integer("image_size", 224, "Visual frame height and width.")
AUDIO_FRAMES = flags.DEFINE_integer("audio_frames", 1024, "Spectrogram frames.")
AUDIO_BINS = flags.DEFINE_integer("audio_bins", 128, "Spectrogram (mel) bins.")
CLASSES = flags.DEFINE_integer("num_classes", 31, "Classes K (KS: 31).")
WIDTHS = flags.DEFINE_list("widths", ["64", "128", "256", "512"], "ResNet18 stage widths.")
STAGES = flags.DEFINE_list("stage_sizes", ["2", "2", "2", "2"],
                           "Residual blocks per stage (ResNet18: 2 each).")


def input_shapes(fold_single_frame: bool = False) -> dict[str, tuple[int, ...]]:
  """Per-example shapes of "visual" and "audio"; with `fold_single_frame`, one
  frame is an image `[H, W, 3]` rather than a clip `[1, H, W, 3]`."""
  frames = () if fold_single_frame and FRAMES.value == 1 else (FRAMES.value,)
  return {"visual": frames + (IMAGE.value, IMAGE.value, 3),
          "audio": (AUDIO_FRAMES.value, AUDIO_BINS.value, 1)}


def resnet_widths() -> tuple[int, ...]:
  return tuple(int(w) for w in WIDTHS.value)


def resnet(name: str = "resnet18", **options) -> dict:
  """The encoder config of `name` ("resnet18" or "lip_resnet") at `--widths` and
  `--stage_sizes`, with `options` added."""
  return {"name": name, "widths": resnet_widths(),
          "stage_sizes": tuple(int(s) for s in STAGES.value), **options}

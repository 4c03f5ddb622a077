"""`vggsound`: VGGSound (309 classes), audio + 1-fps RGB frames.

VGGSound (Chen et al., ICASSP 2020): 10-s YouTube clips of 309 sound classes,
processed exactly as Kinetics-Sounds. The clips must be obtained by the user.
The official `vggsound.csv` (`youtube_id,start_seconds,label,split`) converts to
the list format with one line per clip, e.g. for clips saved as
`video/<youtube_id>_<start:06d>.mp4`:
`video/---g-f_I2yQ_000001.mp4 people marching` in `train.txt` or `test.txt`,
and `classes.txt` holding the 309 distinct labels, one per line (their order
defines the label ids; sorting them alphabetically is a reproducible choice).

Manual directory layout and per-clip processing: `mmsafe.data.tfds.audio_visual`.

Build: `python -m experiments.prepare --dataset=vggsound --manual_dir=DIR --data_dir=OUT`;
read: `mmsafe.data.load("vggsound", "train", data_dir=OUT)`.
"""

from __future__ import annotations

from mmsafe.data.tfds.audio_visual import AudioVisualBuilder, AudioVisualConfig

NUM_CLASSES = 309


class Vggsound(AudioVisualBuilder):
  """VGGSound from a manual directory (see the module docstring)."""

  name = "vggsound"
  BUILDER_CONFIGS = [AudioVisualConfig(name="default", num_classes=NUM_CLASSES,
                                       description="The papers' preprocessing.")]
  DESCRIPTION = __doc__
  HOMEPAGE = "https://www.robots.ox.ac.uk/~vgg/data/vggsound/"
  CITATION = """@inproceedings{chen2020vggsound,
  title={VGGSound: A Large-scale Audio-Visual Dataset},
  author={Chen, Honglie and Xie, Weidi and Vedaldi, Andrea and Zisserman, Andrew},
  booktitle={ICASSP}, year={2020}}"""

"""`kinetics_sounds`: Kinetics-Sounds (31 classes), audio + 1-fps RGB frames.

The Kinetics subset of classes with audible actions (Arandjelovic & Zisserman,
"Look, Listen and Learn", ICCV 2017), in the 31-class version of the OGM-GE /
CRMT reference lists (about 20.7k train / 1.4k test 10-s clips). The videos are
YouTube-derived and must be obtained by the user; the class list and split
lists are the user's too (the reference lists rewritten in the format below).

Manual directory layout and per-clip processing: `mmsafe.data.tfds.audio_visual`
(`classes.txt` with 31 names, `train.txt`/`test.txt` with lines
`<relative media path> <class name>`, the media files).

Build: `python -m experiments.prepare --dataset=kinetics_sounds --manual_dir=DIR --data_dir=OUT`;
read: `mmsafe.data.load("kinetics_sounds", "train", data_dir=OUT)`.
"""

from __future__ import annotations

from mmsafe.data.tfds.audio_visual import AudioVisualBuilder, AudioVisualConfig

NUM_CLASSES = 31


class KineticsSounds(AudioVisualBuilder):
  """Kinetics-Sounds from a manual directory (see the module docstring)."""

  name = "kinetics_sounds"
  BUILDER_CONFIGS = [AudioVisualConfig(name="default", num_classes=NUM_CLASSES,
                                       description="The papers' preprocessing.")]
  DESCRIPTION = __doc__
  HOMEPAGE = "https://arxiv.org/abs/1705.08168"
  CITATION = """@inproceedings{arandjelovic2017look,
  title={Look, Listen and Learn}, author={Arandjelovic, Relja and Zisserman, Andrew},
  booktitle={ICCV}, year={2017}}"""

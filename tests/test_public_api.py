"""The public API: every exported name resolves and is documented; the core
functions' docstrings state shapes, purity / jit-ability and their source."""

import ast
import importlib
import inspect
import pathlib
import re
import subprocess
import sys

import pytest

import mmsafe

PACKAGES = ["mmsafe", "mmsafe.attacks", "mmsafe.certify", "mmsafe.data", "mmsafe.eval",
            "mmsafe.manifold", "mmsafe.methods", "mmsafe.models", "mmsafe.paper", "mmsafe.train"]

# The functions a user composes with their own JAX code (issue: public API).
CORE = [
    "mmsafe.models.build", "mmsafe.manifold.random_stiefel", "mmsafe.manifold.project_tangent",
    "mmsafe.manifold.retract_qr", "mmsafe.manifold.retract_polar",
    "mmsafe.manifold.retract_cayley", "mmsafe.manifold.stiefel_transform",
    "mmsafe.certify.certified_radius", "mmsafe.certify.radius_from_scores",
    "mmsafe.certify.certify", "mmsafe.certify.local_lipschitz", "mmsafe.certify.local_constants",
    "mmsafe.certify.empirical_constants", "mmsafe.certify.sound_constants",
    "mmsafe.attacks.fgm", "mmsafe.attacks.pgd", "mmsafe.attacks.drop_modality",
    "mmsafe.attacks.decoupling", "mmsafe.methods.crmt.margin_regularizer",
    "mmsafe.methods.crmt.closest_class_bound", "mmsafe.methods.cross_entropy",
    "mmsafe.train.make_train_step", "mmsafe.train.make_eval_step",
]
SHAPE = re.compile(r"\[[^\]]*\b(B|K|N|d|D)\b[^\]]*\]")  # e.g. [B, K], [d_m, K]
SOURCE = re.compile(r"(eq\. ?\d|Eq\. ?\d|Thm\.? ?\d|Prop\.? ?\d|Sec\. ?\d|et al\.)")


def _resolve(path):
  module, _, name = path.rpartition(".")
  return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("package", PACKAGES)
def test_every_exported_name_resolves_and_has_a_docstring(package):
  module = importlib.import_module(package)
  assert module.__doc__ and module.__all__
  for name in module.__all__:
    value = getattr(module, name)  # AttributeError: a stale __all__
    if inspect.isfunction(value) or inspect.isclass(value) or inspect.ismodule(value):
      assert inspect.getdoc(value), f"{package}.{name} has no docstring"


@pytest.mark.parametrize("path", CORE)
def test_core_docstrings_state_shapes_purity_and_source(path):
  doc = inspect.getdoc(_resolve(path))
  assert SHAPE.search(doc), f"{path}: no shape such as [B, K] in its docstring"
  assert re.search(r"\bjit", doc) and re.search(r"\bpure\b|\bPure\b", doc), (
      f"{path}: its docstring must say whether it is pure and jit-able")
  assert SOURCE.search(doc), f"{path}: no paper equation / reference in its docstring"


def test_top_level_shortcuts_are_the_subpackage_functions():
  assert mmsafe.build is mmsafe.models.build
  assert mmsafe.pgd is mmsafe.attacks.pgd
  assert mmsafe.radius_from_scores is mmsafe.certify.radius_from_scores
  assert inspect.ismodule(mmsafe.certify)  # the subpackage, not the function of that name


def _mmsafe_imports(path: pathlib.Path) -> set[str]:
  """The `mmsafe` modules a file imports (`import a.b`, `from a import b`)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
  return {n for n in names if n.split(".")[0] == "mmsafe"}


def test_methods_import_neither_the_data_pipeline_nor_the_training_loop():
  # Callbacks read splits through `CallbackContext.reduce_over_split`.
  package = pathlib.Path(mmsafe.__file__).parent / "methods"
  for path in sorted(package.glob("*.py")):
    forbidden = {n for n in _mmsafe_imports(path)
                 if n.split(".")[:2] in (["mmsafe", "data"], ["mmsafe", "train"])}
    assert not forbidden, f"{path.name} imports {sorted(forbidden)}"


def _import_cycle(graph: dict[str, set[str]]) -> list[str]:
  """One import cycle of `graph` (module -> imported modules) as a path, or []."""
  state, path = {}, []

  def visit(node):
    state[node] = "open"
    path.append(node)
    for child in sorted(graph.get(node, ())):
      if state.get(child) == "open":
        return path[path.index(child):] + [child]
      if child not in state:
        cycle = visit(child)
        if cycle:
          return cycle
    state[node] = "done"
    path.pop()
    return []

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return []


def test_import_cycle_finder_finds_a_cycle():
  assert _import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _import_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


@pytest.mark.parametrize("subpackage", ["data"])
def test_modules_of_a_subpackage_import_each_other_without_a_cycle(subpackage):
  # Every import counts, module-level and function-local; the package
  # `__init__` (which re-exports its modules) is not a node.
  package = pathlib.Path(mmsafe.__file__).parent / subpackage
  prefix = f"mmsafe.{subpackage}."
  modules = {prefix + p.relative_to(package).with_suffix("").as_posix().replace("/", "."): p
             for p in package.rglob("*.py") if p.name != "__init__.py"}
  graph = {name: _mmsafe_imports(path) & set(modules) for name, path in modules.items()}
  cycle = _import_cycle(graph)
  assert not cycle, f"import cycle: {' -> '.join(cycle)}"


def test_no_module_is_longer_than_450_lines():
  # The house rule: split a longer file along a real seam (one file per concept).
  package = pathlib.Path(mmsafe.__file__).parent
  long = {str(p.relative_to(package)): n for p in sorted(package.rglob("*.py"))
          if (n := len(p.read_text().splitlines())) > 450}
  assert not long, f"files over 450 lines: {long}"


def test_evaluation_reaches_methods_only_through_their_registry():
  # A method's test-time defence is found by name (`methods.get(name).defence`).
  package = pathlib.Path(mmsafe.__file__).parent / "eval"
  for path in sorted(package.glob("*.py")):
    method_files = {n for n in _mmsafe_imports(path) if n.startswith("mmsafe.methods.")}
    assert not method_files, f"{path.name} imports {sorted(method_files)}"


@pytest.mark.slow
def test_importing_mmsafe_loads_neither_orbax_nor_the_training_loop():
  code = ("import sys, mmsafe; print(sorted(m for m in ('orbax.checkpoint', "
          "'mmsafe.train.loop', 'mmsafe.train.checkpoint') if m in sys.modules))")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
  assert result.stdout.strip() == "[]", result.stdout

"""The robustness evaluators (clean, FGM / PGD, missing, decoupling, their
suite, the sweep) and the report, on a small synthetic model and end to end
(`python -m experiments.evaluate`) on a model trained on mfeat."""

import dataclasses
import json
import os
import sys
import types

from absl import flags
import jax.numpy as jnp
import numpy as np
import pytest

from mmsafe import attacks
from mmsafe import data as data_lib
from mmsafe.attacks import PGDProtocol
from mmsafe.attacks.pgd import get_protocol
from mmsafe.eval import batching
from mmsafe.eval import pgd as pgd_lib
from mmsafe.eval import registry
from mmsafe.eval import report
from tests.test_tensorboard import read_events

SHAPES = {"a": (4, 3), "b": (6,)}
N = 100  # two batches of 50 (balanced: one size, one compilation)


def _model():
  rng = np.random.default_rng(0)
  hidden = {m: rng.normal(size=(int(np.prod(s)), 8)).astype(np.float32) for m, s in SHAPES.items()}
  out = {m: rng.normal(size=(8, 5)).astype(np.float32) for m in SHAPES}

  def apply_fn(variables, inputs):
    return sum(jnp.tanh(inputs[m].reshape(inputs[m].shape[0], -1) @ hidden[m]) @ out[m]
               * variables[m] for m in SHAPES)

  return apply_fn, {"a": jnp.float32(1.0), "b": jnp.float32(0.7)}


def _data(apply_fn, variables):
  rng = np.random.default_rng(1)
  inputs = {m: rng.normal(size=(N, *s)).astype(np.float32) for m, s in SHAPES.items()}
  labels = np.asarray(jnp.argmax(apply_fn(variables, inputs), -1)).astype(np.int32)
  labels[:10] = (labels[:10] + 1) % 5  # 90% clean accuracy
  return inputs, labels


class FnModel:
  """A model whose logits are `apply_fn(variables, inputs)` (what evaluators call)."""

  def __init__(self, apply_fn):
    self.apply_fn = apply_fn

  def apply(self, variables, inputs, train=False):
    del train
    return types.SimpleNamespace(logits=self.apply_fn(variables, inputs))


def build(apply_fn, inputs, labels, **config):
  """The evaluator of `config` (a `type` and its keys) on the split `inputs`,
  `labels` (also the training split: its means are the "mean" fill's)."""
  test = data_lib.Dataset(name="synthetic", split="test", inputs=inputs,
                          labels=np.asarray(labels, np.int32), num_classes=5, stats={})
  splits = {"test": test, "train": dataclasses.replace(test, split="train")}
  return registry.build("e", {"split": "test", **config}, model=FnModel(apply_fn),
                        splits=splits)


@pytest.mark.slow
def test_suite_end_to_end_gives_sane_numbers_and_a_report(tmp_path):
  apply_fn, variables = _model()
  inputs, labels = _data(apply_fn, variables)
  protocol = PGDProtocol(name="test", steps=5, restarts=1, relative_step_size=None,
                         random_start=False)
  suite = build(apply_fn, inputs, labels, type="robustness",
                protocol=protocol, multi_eps=(0.25, 1.0, 2.0), uni_eps=(0.5, 2.0),
                uni_modalities=("a",), uni_extra_eps={"a": (1.5,)},
                missing_fills=("zeros", "mean"), decoupling_fractions=(0.05, 0.2),
                decoupling={"rounds": 2, "steps_per_round": 3, "max_change": 2.0},
                batch_size=64, per_example=True, skip_certified=False)
  calls = []
  results = suite.run(variables, progress=calls.append)
  # (tasks: 1 clean + 2 x (4 multi + 4 "a") attack eps + 2 x 2 missing + 2
  # decoupling = 23) x 2 batches
  assert sum(calls) == 2 * 23
  clean = results["clean_accuracy"]
  assert results["num_examples"] == N and clean == pytest.approx(0.9)
  # The paper budgets are added to the grids; the headline reads them.
  curves = results["curves"]
  assert curves["pgd"]["multi"]["eps"] == [0.25, 0.5, 1.0, 2.0]
  # uni_extra_eps adds 1.5 to the grid of "a" alone.
  assert curves["pgd"]["a"]["eps"] == [0.5, 1.0, 1.5, 2.0] and "b" not in curves["pgd"]
  headline = results["headline"]
  assert set(headline) == {"clean", "fgm/multi@0.5", "pgd/multi@0.5", "fgm/a@1.0", "pgd/a@1.0",
                           "missing/a", "missing/b"}
  assert headline["pgd/multi@0.5"] == curves["pgd"]["multi"]["accuracy"][1]
  for kind in ("fgm", "pgd"):
    for scope, curve in curves[kind].items():
      accuracy = np.array(curve["accuracy"])
      assert np.all(accuracy <= clean), (kind, scope)
      if kind == "pgd":
        assert np.all(np.diff(accuracy) <= 0)
        norm, eps = np.array(curve["mean_norm"]), np.array(curve["eps"])
        # Within each budget; the examples broken at a smaller eps keep that
        # perturbation, so only the first eps attacks every example.
        assert np.all(norm <= eps * (1 + 1e-5)) and np.all(np.diff(norm) >= 0)
        assert norm[0] >= 0.8 * eps[0]
  assert curves["pgd"]["multi"]["accuracy"][-1] < clean - 0.2  # eps = 2 does bite
  # Missing modality: zeros fill equals a direct computation.
  dropped = dict(inputs, a=np.zeros_like(inputs["a"]))
  direct = np.mean(np.asarray(jnp.argmax(apply_fn(variables, dropped), -1)) == labels)
  assert results["missing"]["a"]["zeros"] == pytest.approx(direct)
  assert set(results["missing"]["b"]) == {"zeros", "mean"}
  # The "mean" fill: the training split's mean example, fixed once built.
  means = {m: np.broadcast_to(x.mean(0), x.shape) for m, x in inputs.items()}
  mean_filled = np.asarray(jnp.argmax(apply_fn(variables, dict(inputs, b=means["b"])), -1))
  assert results["missing"]["b"]["mean"] == pytest.approx(np.mean(mean_filled == labels))
  # Per-example flags: the same numbers, example by example.
  flags = results["per_example"]
  decode = lambda text: batching.decode_flags(text, N)
  correct = decode(flags["clean"])
  np.testing.assert_array_equal(correct, np.asarray(jnp.argmax(apply_fn(variables, inputs), -1))
                                == labels)
  np.testing.assert_array_equal(decode(flags["missing"]["a"]["zeros"]), np.asarray(
      jnp.argmax(apply_fn(variables, dropped), -1)) == labels)
  for kind in ("fgm", "pgd"):
    for scope, curve in curves[kind].items():
      robust = np.stack([decode(text) for text in flags[kind][scope]])
      assert robust.mean(1).tolist() == pytest.approx(curve["accuracy"])
      assert not (robust & ~correct).any()  # robust implies clean-correct
  with pytest.raises(ValueError, match="flags: expected 13 bytes for 100 examples, got 2"):
    batching.decode_flags("ffff", N)
  # Decoupling: ASR in [0, 1], non-decreasing in the budget, budgets respected.
  dec = results["decoupling"]["multi"]
  assert dec["num_entries"] == 18 and dec["count"] == [0, 3]
  assert dec["asr"][0] == 0.0 and 0.0 < dec["asr"][1] <= 1.0
  assert np.all(np.array(dec["mean_fraction_changed"]) <= np.array(dec["fraction"]) + 1e-9)
  # The report.
  results["meta"] = {"model": "synthetic"}
  paths = report.write_report(results, str(tmp_path / "report"))
  for name in ("json", "markdown", "pgd_plot", "fgm_plot", "missing_plot", "decoupling_plot"):
    assert os.path.getsize(paths[name]) > 0, name
  with open(paths["json"]) as f:
    assert json.load(f)["headline"] == headline
  with open(paths["markdown"]) as f:
    text = f.read()
  assert "## Headline" in text and "pgd/multi@0.5" in text and "Decoupling" in text


@pytest.mark.slow
def test_batches_are_balanced_and_loops_agree():
  apply_fn, variables = _model()
  inputs, labels = _data(apply_fn, variables)
  sizes = []

  def fn(variables, inputs, labels, key, value):
    sizes.append(len(labels))
    return jnp.zeros(labels.shape, bool), jnp.ones(labels.shape)

  bad, extra = batching.over_batches(fn, variables, inputs, labels, batch_size=64,
                                     key=jnp.zeros(2, jnp.uint32))
  # The fewest batches of at most 64, of one size (one compilation), the last
  # padded by at most one row per batch; only the real rows come back.
  balanced = batching.balanced_batch_size(N, 64)
  assert sizes == [balanced] * -(-N // 64) and 0 <= balanced * len(sizes) - N < len(sizes)
  assert bad.shape == extra.shape == (N,)
  assert [batching.balanced_batch_size(n, 256) for n in (400, 401, 10, 513)] == [
      200, 201, 10, 171]
  correct = np.ones(N, bool)
  protocol = PGDProtocol(name="test", steps=4, restarts=2, relative_step_size=None,
                         random_start=False)
  curves = {}
  for loop in ("python", "scan"):
    pgd = build(apply_fn, inputs, labels, type="pgd", eps=(0.5, 1.5), protocol=protocol,
                batch_size=64, loop=loop, skip_certified=False)
    decoupling = build(apply_fn, inputs, labels, type="decoupling", fractions=(0.2,),
                       batch_size=64, rounds=2, steps_per_round=3, loop=loop)
    curves[loop] = (pgd.curves(variables, correct)["curves"]["pgd"]["multi"],
                    decoupling.curves(variables, correct)["decoupling"]["multi"])
  (pgd, decoupling), (pgd_traced, decoupling_traced) = curves["python"], curves["scan"]
  assert pgd["accuracy"][1] < 0.8 and decoupling["asr"][0] > 0  # the attacks bite
  assert pgd["accuracy"] == pgd_traced["accuracy"]
  np.testing.assert_allclose(pgd["mean_norm"], pgd_traced["mean_norm"], rtol=1e-5)
  assert decoupling["asr"] == decoupling_traced["asr"]
  np.testing.assert_allclose(decoupling["mean_fraction_changed"],
                             decoupling_traced["mean_fraction_changed"])


@pytest.mark.slow
def test_pgd_curves_attack_only_undecided_examples_and_match_attacking_all(monkeypatch):
  apply_fn, variables = _model()
  inputs, labels = _data(apply_fn, variables)
  correct = np.asarray(jnp.argmax(apply_fn(variables, inputs), -1)) == labels
  protocol = PGDProtocol(name="test", steps=5, restarts=1, relative_step_size=None,
                         random_start=False, loss="ce+margin", multi_eps=0.3)  # deterministic
  grid = (0.3, 0.8, 1.5)
  attacked = []
  over_rows = pgd_lib.over_rows
  monkeypatch.setattr(pgd_lib, "over_rows",
                      lambda *a, **k: attacked.append(a[4].copy()) or over_rows(*a, **k))
  curves = build(apply_fn, inputs, labels, type="pgd", eps=grid, protocol=protocol,
                 batch_size=64, skip_certified=False)
  attack, batch_sizes = curves._program, set()
  curves._program = lambda v, x, y, *a, **k: batch_sizes.add(len(y)) or attack(v, x, y, *a, **k)
  curve = curves.curves(variables, correct)["curves"]["pgd"]["multi"]
  # Brute force: every example attacked at every eps with every loss.
  broken, expected = ~correct, []
  for eps in grid:
    for loss in protocol.losses:
      _, info = attacks.pgd(lambda x: apply_fn(variables, x), inputs, jnp.asarray(labels),
                            jnp.zeros(2, jnp.uint32), return_info=True,
                            **{**protocol.pgd_kwargs(eps), "loss": loss})  # alone
      broken = broken | np.asarray(info["misclassified"])
    expected.append(float((correct & ~broken).mean()))
  assert curve["accuracy"] == expected and expected[-1] < expected[0] < correct.mean()
  # Each attack saw exactly the examples still robust: the clean-correct ones
  # first, then fewer and fewer.
  assert len(attacked) == 2 * len(grid)
  np.testing.assert_array_equal(attacked[0], np.flatnonzero(correct))
  assert all(len(b) <= len(a) for a, b in zip(attacked, attacked[1:]))
  assert len(attacked[-1]) == round(expected[-1] * N) < len(attacked[0])
  # Batches of the whole split's size (two of 50) or its halves: few compilations.
  assert len(batch_sizes) > 1 and batch_sizes <= {50, 25, 13}
  assert [batching.subset_batch_size(n, 200) for n in (400, 200, 199, 101, 100, 30, 3)] == [
      200, 200, 200, 200, 100, 50, 13]


@pytest.mark.slow
def test_pgd_curves_skip_certified_examples_without_changing_the_curve(monkeypatch):
  """On a linear model the smallest l2 perturbation that flips an example is
  `min_k margin_k / ||w_y - w_k||` (over the attacked modalities' weights): a
  radius no attack can beat. Given those radii, PGD attacks only the examples
  whose radius is below eps, and the curve is the one attacking everything gives."""
  rng = np.random.default_rng(3)
  weights = {m: rng.normal(size=(int(np.prod(s)), 5)).astype(np.float32)
             for m, s in SHAPES.items()}

  def apply_fn(variables, inputs):
    del variables
    return sum(inputs[m].reshape(inputs[m].shape[0], -1) @ weights[m] for m in SHAPES)

  inputs, labels = _data(apply_fn, None)
  logits = np.asarray(apply_fn(None, inputs), np.float64)
  correct = logits.argmax(-1) == labels
  rows = np.arange(N)

  def exact_radius(modalities):
    w = np.concatenate([weights[m] for m in modalities]).astype(np.float64)
    margin = logits[rows, labels][:, None] - logits
    norm = np.linalg.norm(w[:, labels][:, :, None] - w[:, None, :], axis=0)  # [N, K]
    ratio = np.where(np.arange(5) == labels[:, None], np.inf, margin / np.maximum(norm, 1e-12))
    return np.where(correct, ratio.min(-1), 0.0)

  certified = {"multi": exact_radius(sorted(SHAPES)), "a": exact_radius(["a"])}
  protocol = PGDProtocol(name="test", steps=10, restarts=1, relative_step_size=None,
                         random_start=False, loss="ce+margin", multi_eps=0.3)  # deterministic
  grids = {"multi": (0.1, 0.3, 0.9), "a": (0.2, 1.0)}
  attacked = []
  over_rows = pgd_lib.over_rows
  monkeypatch.setattr(pgd_lib, "over_rows",
                      lambda *a, **k: attacked.append(a[4].copy()) or over_rows(*a, **k))
  curves = build(apply_fn, inputs, labels, type="pgd", scope=("multi", "a"), eps=grids["multi"],
                 uni_eps=grids["a"], protocol=protocol, batch_size=64, skip_certified=False)
  skipping = curves.curves(None, correct, certified=certified)["curves"]["pgd"]
  seen, attacked[:] = list(attacked), []
  everything = curves.curves(None, correct)["curves"]["pgd"]
  for scope, grid in grids.items():
    assert skipping[scope]["accuracy"] == everything[scope]["accuracy"]
    expected = [int((correct & (certified[scope] > eps * (1 + pgd_lib.CERTIFIED_SLACK))).sum())
                for eps in grid]
    assert skipping[scope]["num_certified"] == expected
    assert everything[scope]["num_certified"] is None
    assert 0 < expected[-1] < expected[0] < correct.sum()  # some, not all, are skipped
  assert skipping["multi"]["accuracy"][-1] < skipping["multi"]["accuracy"][0]  # PGD bites
  # No attack saw an example certified at its eps; each attack saw fewer rows.
  attack_eps = [eps for scope, grid in grids.items() for eps in grid for _ in protocol.losses]
  attack_scope = [scope for scope, grid in grids.items() for _ in grid for _ in protocol.losses]
  assert len(seen) == len(attacked) == len(attack_eps)
  for rows_seen, rows_all, eps, scope in zip(seen, attacked, attack_eps, attack_scope):
    assert not np.any(certified[scope][rows_seen] > eps * (1 + pgd_lib.CERTIFIED_SLACK))
    assert set(rows_seen) <= set(rows_all)
  assert sum(map(len, seen)) < sum(map(len, attacked))
  # Through the suite, and stated in its report.
  config = dict(type="robustness", protocol=dataclasses.replace(protocol, multi_eps=0.5),
                multi_eps=grids["multi"], uni_eps=grids["a"], attacks=("pgd",),
                uni_modalities=("a",), missing_fills=(), decoupling_fractions=(), batch_size=64)
  suite = build(apply_fn, inputs, labels, **config)
  # The radii the suite's PGD member computes for a model with a Lipschitz bound.
  monkeypatch.setattr(suite.attack_evaluators["pgd"], "sound_radii", lambda variables: certified)
  suite = suite.run(None)
  multi = suite["curves"]["pgd"]["multi"]  # the grid gains the paper's 0.5
  assert multi["num_certified"] == [
      int((correct & (certified["multi"] > eps * (1 + pgd_lib.CERTIFIED_SLACK))).sum())
      for eps in multi["eps"]] and 0.5 in multi["eps"]
  text = report.markdown(suite)
  assert "Robust by their sound certified radius, so not attacked" in text
  assert f"multi: 0.1: {skipping['multi']['num_certified'][0]}, " in text
  assert "Robust by their sound" not in report.markdown(build(
      apply_fn, inputs, labels, **config, skip_certified=False).run(None))
  with pytest.raises(ValueError, match=r"certified: expected radii for scope 'a'"):
    curves.curves(None, correct, certified={"multi": certified["multi"]})
  with pytest.raises(ValueError, match=r"certified\['a'\]: expected shape \(100,\)"):
    curves.curves(None, correct, certified={**certified, "a": certified["a"][:5]})


def test_suite_rejects_bad_configs_naming_the_field():
  apply_fn, variables = _model()
  inputs, labels = _data(apply_fn, variables)
  cases = [
      ({"attacks": ("cw",)}, r"attacks: expected a subset"),
      ({"uni_modalities": ("z",)}, r"uni_modalities: unknown modality 'z'"),
      ({"missing_fills": ("median",)}, r"missing_fills: expected values"),
      ({"decoupling_scopes": ("all",)}, r"decoupling_scopes: expected"),
      ({"decoupling": {"max_change": 0.0}}, r"decoupling.max_change: expected finite values > 0"),
      ({"decoupling": {"round": 2}}, r"decoupling: expected keys among \['rounds'"),
      ({"multi_eps": (-1.0,)}, r"multi_eps: expected finite values >= 0"),
      ({"protocol": "strongest"}, r"protocol: expected one of"),
      ({"uni_extra_eps": {"c": (1.0,)}},
       r"uni_extra_eps: expected modalities among \['a', 'b'\], got \['c'\]"),
  ]
  for config, message in cases:
    with pytest.raises(ValueError, match=message):
      build(apply_fn, inputs, labels, type="robustness", **config)
  test = data_lib.Dataset(name="synthetic", split="test", inputs=inputs, labels=labels,
                          num_classes=5, stats={})
  with pytest.raises(ValueError, match=r"missing_fills: the 'mean' and 'noise' fills need a "
                                       r"'train' split, got splits \['test'\]"):
    registry.build("e", {"type": "robustness", "split": "test", "missing_fills": ("mean",)},
                   model=FnModel(apply_fn), splits={"test": test})


def test_evaluate_command_on_a_trained_mfeat_model(trained_mfeat, tmp_path, monkeypatch):
  from experiments import evaluate  # pylint: disable=import-outside-toplevel

  _, _, _, workdir = trained_mfeat["jt"]
  out = str(tmp_path / "reports")
  suite = "--evals.robustness"
  argv = ["evaluate", "--evals=experiments/configs/evals.py:robustness", f"--workdir={workdir}",
          f"--out={out}", f"{suite}.protocol=fast", f"{suite}.multi_eps=(1.0, 2.0)",
          f"{suite}.uni_modalities=()", f"{suite}.attacks=('pgd',)",
          f"{suite}.decoupling_fractions=()", f"{suite}.max_examples=96",
          f"{suite}.batch_size=96", f"{suite}.box=True"]
  monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides from sys.argv
  flags.FLAGS(argv)
  try:
    evaluate.main(argv[:1])
  finally:
    flags.FLAGS.unparse_flags()
  # The numbers and figures in TensorBoard at the evaluated model's step, the
  # command's entry in <out>/index.md linking the report and its figures.
  with open(os.path.join(workdir, "results.json")) as f:
    best_step = json.load(f)["best_step"]
  scalars, images = read_events(out)
  assert scalars["robustness/headline/pgd/multi@0.5"][0][0] == best_step
  assert set(images) == {"robustness/pgd_accuracy", "robustness/missing_modality"}
  with open(os.path.join(out, "index.md")) as f:
    index = f.read()
  assert "## evaluation (robustness) of the best checkpoint" in index
  for name in ("robustness.md", "robustness.json", "pgd_accuracy.png", "missing_modality.png"):
    assert f"](robustness/{name})" in index, name
  out = os.path.join(out, "robustness")  # evaluator <name> writes into <out>/<name>
  with open(os.path.join(out, "robustness.json")) as f:
    results = json.load(f)
  assert results["meta"]["step"] == best_step
  assert results["meta"]["dataset"] == "mfeat" and results["num_examples"] == 96
  assert results["meta"]["split"] == "test"
  assert results["config"]["box_constraints"] == ["pix"]
  clean = results["clean_accuracy"]
  assert clean > 0.8
  pgd = results["curves"]["pgd"]
  assert list(pgd) == ["multi"] and pgd["multi"]["eps"] == [0.5, 1.0, 2.0]
  accuracy = np.array(pgd["multi"]["accuracy"])
  assert np.all(accuracy <= clean) and np.all(np.diff(accuracy) <= 0)
  assert results["headline"]["pgd/multi@0.5"] == accuracy[0]
  assert results["missing"]["pix"]["zeros"] < clean and not results["decoupling"]
  for name in ("robustness.md", "pgd_accuracy.png", "missing_modality.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0, name


def test_strength_sweep_is_monotone_in_restarts(tmp_path):
  apply_fn, variables = _model()
  inputs, labels = _data(apply_fn, variables)
  protocol = dataclasses.replace(get_protocol("default"), multi_eps=1.0)
  sweep = build(apply_fn, inputs, labels, type="sweep", protocol=protocol, scales=(1.0,),
                steps=(3,), restarts=(1, 3), batch_size=64).run(variables)
  assert set(sweep["accuracy"]) == {"multi@1.0", "a@1.0", "b@1.0"}
  (row,) = sweep["accuracy"]["multi@1.0"]
  assert sweep["clean_accuracy"] == pytest.approx(0.9)
  assert row[1] <= row[0] < sweep["clean_accuracy"]
  paths = report.write_sweep(sweep, str(tmp_path))
  with open(paths["markdown"]) as f:
    assert "| 3 |" in f.read()


@pytest.mark.slow
def test_the_margin_loss_breaks_what_a_saturated_ce_loss_cannot():
  """A linear model with huge logit margins: the CE loss's gradient underflows to 0
  in float32, so CE-only PGD cannot move; the `default` protocol also attacks with
  the margin loss and keeps the worst case, which finds the closed-form answer
  (every example falls once eps exceeds its distance to the boundary)."""
  rng = np.random.default_rng(0)
  weights = {"a": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
             "b": jnp.asarray(rng.normal(size=(2, 2)), jnp.float32)}
  apply_fn = lambda v, x: 1e4 * (x["a"] @ v["a"] + x["b"] @ v["b"])
  inputs = {"a": rng.normal(size=(16, 3)).astype(np.float32),
            "b": rng.normal(size=(16, 2)).astype(np.float32)}
  labels = np.asarray(jnp.argmax(apply_fn(weights, inputs), -1), np.int32)
  # Distance to the boundary: |margin| / ||w_y - w_k|| over the joint input.
  w = np.concatenate([np.asarray(weights["a"]), np.asarray(weights["b"])])
  x = np.concatenate([inputs["a"], inputs["b"]], axis=1)
  distance = np.abs(x @ (w[:, 0] - w[:, 1])) / np.linalg.norm(w[:, 0] - w[:, 1])
  eps = float(np.max(distance)) * 1.5
  correct = np.ones(16, bool)
  ce_only = dataclasses.replace(get_protocol("default"), loss="ce", restarts=1)
  both = dataclasses.replace(ce_only, loss="ce+margin")
  assert get_protocol("default").losses == ("ce", "margin")
  accuracy = {}
  for protocol in (ce_only, both):
    curves = build(apply_fn, inputs, labels, type="pgd", eps=(0.5, eps), protocol=protocol,
                   skip_certified=False)
    result = curves.curves(weights, correct)["curves"]["pgd"]["multi"]
    accuracy[protocol.loss] = result["accuracy"][-1]
  assert accuracy == {"ce": 1.0, "ce+margin": 0.0}

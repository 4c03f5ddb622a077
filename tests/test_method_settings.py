"""Typed method settings (`mmsafe.methods.settings`, `Method.make_settings`)."""

import dataclasses
import typing

import numpy as np
import pytest

from experiments.configs import embedded
from mmsafe import methods
from mmsafe.methods import compose, crmt, crmt_cert, msefm, pmr
from mmsafe.train import experiment
from tests.conftest import assert_fails_before_touching_the_workdir, mfeat_config

# Set by the training loop, not a config entry.
RUNTIME = {"steps_per_epoch"}


def _bag(arg: str = "") -> dict:
  return embedded.get_config(arg).method_kwargs.to_dict()


@pytest.mark.parametrize("name", methods.names())
def test_every_field_has_a_default_and_the_settings_are_hashable(name):
  cls = methods.get(name).settings
  assert issubclass(cls, methods.Settings) and cls.__dataclass_params__.frozen
  for field in dataclasses.fields(cls):
    assert field.default is not dataclasses.MISSING, (name, field.name)
  settings = methods.get(name).make_settings({})
  assert settings == cls() and hash(settings) == hash(cls())
  with pytest.raises(dataclasses.FrozenInstanceError):
    setattr(settings, "x", 1)


def test_the_config_bag_holds_every_setting_and_nothing_else():
  assert set(_bag()) == set(methods.setting_owners()) - RUNTIME


@pytest.mark.parametrize("arg", ["", "av_digits"])
@pytest.mark.parametrize("name", methods.names())
def test_settings_from_the_config_hold_the_configs_values(name, arg):
  # What the objectives read from the bag before is what they read now, with
  # the same Python type (float stays float, int int, None None).
  bag = _bag(arg)
  settings = methods.get(name).make_settings(bag)
  for field in dataclasses.fields(settings):
    if field.name in RUNTIME:
      continue
    value = getattr(settings, field.name)
    assert value == bag[field.name] and type(value) is type(bag[field.name]), field.name
  # ... and the dataclass's defaults are the mfeat config's values.
  assert (arg or settings == type(settings)()), name


def test_av_digits_overrides_cert_eps():
  assert methods.get("crmt_cert").make_settings(_bag("av_digits")).cert_eps == 4.0


def test_a_field_shared_by_several_classes_is_declared_alike():
  declared = {}
  for name in methods.names():
    cls = methods.get(name).settings
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
      spec = (hints[field.name], field.default, dict(field.metadata))
      assert declared.setdefault(field.name, spec) == spec, (name, field.name)


@pytest.mark.parametrize("name, key, closest", [
    ("crmt", "rhoo", "rho"), ("jt", "rhoo", "rho"), ("ogm", "ogm_alpah", "ogm_alpha"),
    ("crmt_cert", "cert_epsilon", "cert_eps")])
def test_an_unknown_key_names_the_method_and_the_closest_field(name, key, closest):
  with pytest.raises(ValueError, match=rf"method_kwargs\.{key}: not a setting of method "
                                       rf"'{name}' .* did you mean '{closest}'\?"):
    methods.get(name).make_settings({**_bag(), key: 1.0})


@pytest.mark.parametrize("name, key, value, message", [
    ("crmt", "rho", -1.0, r"rho: expected a finite number >= 0, got -1.0"),
    ("pmr", "pmr_momentum", 1.0,
     r"pmr_momentum: expected a finite number >= 0 and < 1, got 1.0"),
    ("msefm", "msefm_blend", 1.5,
     r"msefm_blend: expected a finite number >= 0 and <= 1, got 1.5"),
    ("gb", "gb_heldout_fraction", 0.0,
     r"gb_heldout_fraction: expected a finite number > 0 and <= 1, got 0.0"),
    ("mmat", "attack_steps", 0, r"attack_steps: expected an integer >= 1, got 0"),
    ("crmt_cert", "cert_eps", float("nan"), r"cert_eps: expected a finite number > 0, got nan"),
    # A key of another method is checked too (the bag serves every method).
    ("jt", "rho", -1.0, r"rho: expected a finite number >= 0, got -1.0"),
])
def test_an_out_of_range_value_names_the_field_the_range_and_the_value(name, key, value,
                                                                        message):
  with pytest.raises(ValueError, match=rf"method_kwargs\.{message} \(method '{name}'"):
    methods.get(name).make_settings({**_bag(), key: value})


@pytest.mark.parametrize("key, value, expected", [
    ("rho", "2.0", "a finite number >= 0"), ("rho", True, "a finite number >= 0"),
    ("attack_steps", 5.0, "an integer >= 1"), ("attack_steps", True, "an integer >= 1"),
    ("attack_random_start", 1, "True or False"), ("ogm_ge", "yes", "True or False"),
    ("step2_lipschitz", "tight", r"one of \['empirical', 'sound'\] or None"),
    ("ablation_keep_counts", 3, "a string or None"), ("msefm_memory_size", None,
                                                      "an integer >= 1"),
])
def test_a_mistyped_value_is_refused(key, value, expected):
  with pytest.raises(ValueError, match=rf"method_kwargs\.{key}: expected {expected}, "
                                       rf"got {value!r}"):
    methods.get("crmt_at").make_settings({**_bag(), key: value})


def test_numbers_are_normalised_to_python_types():
  settings = methods.get("crmt_at").make_settings({"rho": 2, "attack_steps": np.int64(3),
                                                   "attack_random_start": np.bool_(True)})
  assert type(settings.rho) is float and settings.rho == 2.0
  assert type(settings.attack_steps) is int and type(settings.attack_random_start) is bool


def test_settings_of_another_class_are_refused():
  assert methods.get("crmt").make_settings(compose.CRMTATSettings()) == compose.CRMTATSettings()
  with pytest.raises(ValueError, match=r"settings: method 'crmt_cert' expected CRMTCertSettings "
                                       r"or method_kwargs, got Step2Settings"):
    methods.get("crmt_cert").make_settings(crmt.Step2Settings())


def test_rules_across_fields():
  with pytest.raises(ValueError, match=r"cert_uni_eps: expected a finite number > 0 with "
                                       r"cert_uni_weight 1.0, got None"):
    crmt_cert.CertSettings(cert_uni_weight=1.0)
  assert crmt_cert.CertSettings(cert_uni_weight=1.0, cert_uni_eps=0.5).cert_uni_eps == 0.5


def test_each_method_reads_its_own_class():
  assert methods.get("crmt").settings is crmt.CRMTSettings
  assert methods.get("crmt_at").settings is compose.CRMTATSettings
  assert methods.get("crmt_step1").settings is crmt.L1Settings
  assert methods.get("pmr").settings is pmr.PMRSettings
  # The test-time defence builds the same settings from the bag.
  assert methods.get("msefm").defence.settings(_bag()) == msefm.MSEFMSettings()


@pytest.mark.parametrize("key, value, message", [
    ("rhoo", 1.0, r"method_kwargs\.rhoo: not a setting of method 'crmt'.*did you mean 'rho'"),
    ("rho", "2", r"method_kwargs\.rho: expected a finite number >= 0, got '2'"),
    ("pmr_momentum", 1.0, r"method_kwargs\.pmr_momentum: expected a finite number >= 0 and < 1"),
])
def test_bad_settings_fail_before_the_workdir_is_written(tmp_path, key, value, message):
  config = mfeat_config("crmt", num_epochs=1).to_dict()
  assert_fails_before_touching_the_workdir(config, f"method_kwargs.{key}", value, message,
                                           tmp_path / "run")


def test_the_experiment_builds_settings_with_steps_per_epoch_and_per_stage_method():
  config = mfeat_config("ogm", num_epochs=1).to_dict()
  built = experiment.build_experiment(config)
  assert built.method_settings.steps_per_epoch == built.steps_per_epoch >= 1
  # A listed stage of another method runs on that method's settings.
  config = mfeat_config("jt", num_epochs=1).to_dict()
  config["stages"] = ({"name": "warmup", "objective": "jt", "num_epochs": 1},
                      {"name": "l1", "objective": "crmt_step1", "num_epochs": 1})
  config["method_kwargs"]["rho"] = 0.5
  built = experiment.build_experiment(config)
  assert [type(built.stage_settings(s)) for s in built.stages] == [methods.Settings,
                                                                   crmt.L1Settings]
  assert built.stage_settings(built.stages[1]).rho == 0.5

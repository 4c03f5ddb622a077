"""Training on the embedded datasets (`mfeat`, `av_digits`) on a CPU.

Usage:
  python -m experiments.train --config=experiments/configs/embedded.py \
      --config.method=ojt --config.dataset=mfeat --workdir=/tmp/run

The config arg is a comma-separated list: a dataset name (`mfeat`, the
default, `av_digits` or `av_digits_8x8`), which also sets that dataset's
budget; `lipschitz`, which swaps every encoder for a 1-Lipschitz one (sound
certificates); and/or `runlocal`, which shrinks the run to a smoke test (a few
steps): `--config=experiments/configs/embedded.py:av_digits,lipschitz,runlocal`.
Encoders are configured for every view of both datasets; a run builds the
ones for the modalities it loads (`config.data.modalities`, default: the
dataset's default pair).

Any field can be overridden on the command line, also those that default to
None (`--config.step2.num_epochs=2`, `--config.method_kwargs.ogm_end_epoch=50`).
A tuple is given as comma-separated names (`--config.data.modalities=pix,fou`),
a quoted Python literal (`--config.data.modalities="('pix', 'fou')"`) or by
repeating the flag (`--config.data.modalities=pix --config.data.modalities=fou`);
experiments/cli.py refuses unknown fields, naming the closest valid ones.
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.dataset = "mfeat"
  # None: the dataset's default pair; a tuple of names overrides it.
  config.data = ml_collections.ConfigDict({"modalities": config_dict.placeholder(tuple)})
  config.method = "jt"
  # Method hyper-parameters: the override surface of every method's settings
  # class (`Method.settings`, a frozen dataclass whose docstring cites the paper
  # and states the range; one bag for all methods, each reads its own fields).
  # The values are the classes' defaults (tests/test_method_settings.py checks
  # they agree); a key no method declares, a value of the wrong type or out of
  # its range is refused before anything is written, naming the closest field.
  config.method_kwargs = ml_collections.ConfigDict({
      # crmt.L1Settings: CRMT step 1 (eq. 12).
      "rho": 2.0, "l1_floor": 1e-5,
      # compose.MixupSettings (mixup, crmt_mix).
      "mixup_alpha": 1.0,
      # compose.AttackSettings (mmat, crmt_at): the CRMT reference's PGD.
      "attack_eps": 0.1, "attack_steps": 5, "attack_step_size": 0.02,
      "attack_random_start": False,
      # gb.GBSettings (Gradient Blending).
      "gb_super_epoch": 5, "gb_heldout_fraction": 0.1,
      # ogm.OGMSettings (OGM-GE); an end epoch None: every epoch.
      "ogm_alpha": 0.1, "ogm_ge": True, "ogm_start_epoch": 0,
      "ogm_end_epoch": config_dict.placeholder(int),
      # pmr.PMRSettings (PMR).
      "pmr_alpha": 1.0, "pmr_momentum": 0.9, "pmr_start_epoch": 0,
      "pmr_end_epoch": config_dict.placeholder(int),
      "pmr_entropy_weight": 0.1, "pmr_entropy_end_epoch": 4,
      # msefm.MSEFMSettings (MinSim + ExFMem, also its test-time defence).
      "msefm_sim_weight": 1.0, "msefm_memory_size": 1024, "msefm_lasso": 0.1,
      "msefm_blend": 0.6, "msefm_ista_steps": 20,
      # crmt.Step2Settings (every two-step CRMT variant); None: the method's own
      # default (empirical / mean_radius for the paper's variants, sound /
      # radius_hinge for crmt_cert).
      "step2_lipschitz": config_dict.placeholder(str),
      "step2_objective": config_dict.placeholder(str),
      # crmt_cert.CertSettings (jt_cert, ojt_cert, crmt_cert; cert_eps and
      # cert_temperature also drive step 2's radius hinge).
      "cert_eps": 3.0, "cert_temperature": 4.0, "cert_rho": 0.0,
      "cert_uni_weight": 0.0, "cert_uni_eps": config_dict.placeholder(float),
      "cert_missing_weight": config_dict.placeholder(float),
      # randomized.GaussianSettings and AblationSettings (probabilistic
      # certificates); keep counts "audio:20,visual:1", None: the fraction.
      "noise_sigma": 0.5, "ablation_keep_fraction": 0.2,
      "ablation_keep_counts": config_dict.placeholder(str),
      # compose.DecouplingSettings (decoupling_at).
      "decoupling_fraction": 0.01, "decoupling_max_change": 2.0, "decoupling_rounds": 2,
      "decoupling_steps": 3,
  })

  config.model = ml_collections.ConfigDict()
  config.model.dtype = "float32"
  small_cnn = {"name": "cnn", "channels": (32, 64), "features": 128}
  mlp = {"name": "mlp", "widths": (256, 128)}
  config.model.encoders = {
      "pix": small_cnn, "fou": mlp, "fac": mlp, "kar": mlp, "zer": mlp, "mor": mlp,
      "visual": small_cnn, "audio": {"name": "cnn", "channels": (16, 32), "features": 128},
  }
  # 1-Lipschitz encoders that state their bound exactly
  # (mmsafe/models/lipschitz_layers.py), for sound certificates: used for
  # model.encoders with the `lipschitz` config arg, and by
  # experiments.compare_certified for its "lipschitz" rows.
  lip_cnn = {"name": "lip_cnn", "channels": (16, 32), "features": 128, "conv": "aol",
             "dense": "aol"}
  lip_mlp = {"name": "lip_mlp", "widths": (256, 128), "dense": "aol"}
  config.model.lipschitz_encoders = {
      "pix": lip_cnn, "fou": lip_mlp, "fac": lip_mlp, "kar": lip_mlp, "zer": lip_mlp,
      "mor": lip_mlp, "visual": lip_cnn, "audio": lip_cnn,
  }
  # Optimizer fields that replace `optimizer`'s whenever the 1-Lipschitz
  # encoders are used (`use_lipschitz_encoders`); None: `optimizer`'s.
  config.lipschitz_optimizer = ml_collections.ConfigDict({
      "name": config_dict.placeholder(str), "learning_rate": config_dict.placeholder(float)})

  config.batch_size = 64
  config.eval_batch_size = 500
  config.num_epochs = 30
  config.optimizer = ml_collections.ConfigDict({
      "name": "sgd", "learning_rate": 0.05, "momentum": 0.9, "weight_decay": 1e-4,
      "decay_epochs": (20,), "decay_factor": 0.1, "retraction": "qr"})
  # CRMT step 2 (the second training stage of two-step methods; only the
  # modality weights a move). The paper's code: SGD, 0.03 x the base learning
  # rate, momentum 0.9, weight decay 1e-2, num_epochs // 3 epochs (None).
  config.step2 = ml_collections.ConfigDict({
      "num_epochs": config_dict.placeholder(int), "learning_rate": 0.0015, "momentum": 0.9,
      "weight_decay": 1e-2})
  # The training stages: () runs the method's own (mmsafe/train/stages.py), or
  # a list of {"name", "objective": "<method>/<stage>", "optimizer", "num_epochs",
  # "restart_selection"} dicts.
  config.stages = ()
  # Evaluators run inside training every `every_steps` steps and logged to
  # metrics.jsonl (mmsafe/eval/registry.py), e.g.
  # {"pgd_val": {"type": "pgd", "split": "validation", "every_steps": 100}}.
  config.evals = ml_collections.ConfigDict()
  config.log_every_steps = 0  # 0: once per epoch.
  # Checkpoints: at the end of each stage, on SIGTERM, and every this many steps
  # (0: once `checkpoint_every_seconds` have passed since the last save).
  config.checkpoint_every_steps = 0
  config.checkpoint_every_seconds = 60.0
  config.checkpoint_max_to_keep = 2
  config.check_batches = True
  # Data parallelism (mmsafe/train/parallel.py): "none" (one device), "jit" (a
  # mesh over all devices of all processes, batch sharded) or "pmap". batch_size
  # is the global batch: a multiple of the number of devices.
  config.parallel = "none"
  # With several processes, they agree on stopping after SIGTERM every this many
  # steps (a tiny all-reduce); one process checks every step.
  config.preemption_sync_steps = 10

  options = [option for option in (arg or "").split(",") if option]
  options.sort(key=lambda option: option == "runlocal")  # Shrink last.
  for option in options:
    if option in ("av_digits", "av_digits_8x8"):
      # 3,600 training pairs with 100x40 spectrograms: fewer, costlier epochs.
      config.dataset = option
      config.num_epochs = 12
      config.optimizer.decay_epochs = (9,)
      config.method_kwargs.cert_eps = 4.0
    elif option == "mfeat":
      config.dataset = option
    elif option == "lipschitz":
      use_lipschitz_encoders(config)
    elif option == "runlocal":
      config.num_epochs = 2
      config.optimizer.decay_epochs = (1,)
      config.step2.num_epochs = 1
    else:
      raise ValueError(f"config arg: expected a comma-separated subset of ['mfeat', "
                       f"'av_digits', 'av_digits_8x8', 'lipschitz', 'runlocal'], got {option!r}")
  return config


def use_lipschitz_encoders(config: ml_collections.ConfigDict) -> None:
  """Swaps in `model.lipschitz_encoders` and their optimizer fields (the set
  fields of `lipschitz_optimizer`, over `optimizer`'s), in place."""
  config.model.encoders = config.model.lipschitz_encoders
  config.optimizer.update({field: value for field, value in config.lipschitz_optimizer.items()
                           if value is not None})

"""mmsafe: certifiably robust multi-modal learning in JAX/Flax.

Implements CRMT (Yang et al., "Quantifying and Enhancing Multi-modal Robustness
with Modality Preference", ICLR 2024): certified l2 radii of multi-modal
classifiers from uni-modal margins, Lipschitz constants and integration
weights, and the two-step training that enlarges them; with the baselines the
paper compares against, attacks and datasets.

The stable public API (pure functions of arrays / pytrees; jit-able unless a
docstring says otherwise):

  models     `build(config, num_classes=, input_shapes=)` -> a Flax module whose
             `apply(variables, {modality: [B, ...]})` returns a `ModelOutput`
             (features, per-modality `scores`, fused `logits` [B, K], `head`).
             Every encoder states its own Lipschitz bound
             (`lipschitz_bound`; `feature_lipschitz` for the model); the
             1-Lipschitz encoders `lip_mlp`, `lip_cnn`, `lip_resnet` (AOL,
             Cayley and SLL layers in `models.lipschitz_layers`) own a bound of 1.
  manifold   Stiefel manifold: `random_stiefel`, `project_tangent`,
             `retract_qr` / `retract_polar` / `retract_cayley` and
             `stiefel_transform` (an optax wrapper keeping W~ W~^T = I, eq. 8).
  certify    `certified_radius` (Thm 3.3 / 3.5 and its tight form with one
             constant per modality, Prop. 3.4), `radius_from_scores` (Thm 3.3
             for any model whose logits sum per-modality scores), `certify`,
             and Lipschitz constants: `local_lipschitz` / `local_constants`
             (jacfwd/jacrev, vmapped), `empirical_constants`,
             `sound_constants` (composed from the encoders' stated bounds).
  attacks    `fgm`, `pgd` (joint l2 budget over any modalities), `drop_modality`,
             `decoupling` (MUROAN l0); each takes `logits_fn(inputs) -> [B, K]`.
  methods    methods by name (`methods.get(name)`): a head, training stages
             (`Stage`: objective, optimizer section, trainable parameters) and
             callbacks; `methods.get(name)(model, config)` is the first stage's
             `loss_fn(params, state, batch, rng)`; `methods.compose` declares the
             input transform x loss compositions; CRMT's `margin_regularizer`
             (L1, eq. 12) and `closest_class_bound` (step 2, eq. 10) in
             `mmsafe.methods.crmt`; `crmt_cert` (CRMT trained on its sound
             certificate) and its controls `jt_cert` / `ojt_cert` in
             `mmsafe.methods.crmt_cert`.
  train      `make_train_step(objective, optimizer)`, `make_eval_step(model)`,
             `TrainState`, optimizers; `train.loop.train_and_evaluate` runs a
             config through its stages (the only Python loop over steps);
             `train.restore.restore_run(workdir)` reads a run back.
  data       `load(name, split)` (embedded `mfeat` / `av_digits` in memory; TFDS
             clip datasets), `train_iterator`, `eval_pass`, `validate_batch`.
  eval       evaluators from `config.evals` (`eval.build_evaluators`, one module
             per type: clean, FGM/PGD, missing, decoupling, the robustness
             suite, certify, sweep; each with `run(variables) -> metrics`),
             `run_certification`, reports and plots.
  paper      the paper's claims judged on seeded runs: `paper.CLAIMS`,
             `paper.evaluate_claims(evidence)` (a verdict per claim from 95%
             intervals over seeds and test examples).

The most used names are also importable from here: `mmsafe.build`,
`mmsafe.ModelOutput`, `mmsafe.certified_radius`, `mmsafe.radius_from_scores`,
`mmsafe.pgd`, `mmsafe.fgm`, `mmsafe.stiefel_transform`, `mmsafe.make_train_step`.
"""

from mmsafe import attacks, certify, data, manifold, methods, models, paper, train
from mmsafe import eval  # pylint: disable=redefined-builtin
from mmsafe.attacks import fgm, pgd
from mmsafe.certify import certified_radius, radius_from_scores
from mmsafe.manifold import stiefel_transform
from mmsafe.models import HeadParams, ModelOutput, build
from mmsafe.train import make_eval_step, make_train_step

__version__ = "0.1.0"

__all__ = [
    "HeadParams", "ModelOutput", "attacks", "build", "certified_radius", "certify", "data", "eval",
    "fgm", "make_eval_step", "make_train_step", "manifold", "methods", "models", "paper", "pgd",
    "radius_from_scores", "stiefel_transform", "train",
]

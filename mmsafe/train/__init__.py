"""Training: state, pure train/eval steps, optimizers, stages, checkpoints, the loop."""

from mmsafe.train.checkpoint import Checkpointer
from mmsafe.train.optimizer import make_optimizer, per_stage
from mmsafe.train.parallel import DataParallel
from mmsafe.train.state import TrainState
from mmsafe.train.step import make_eval_step, make_train_step

__all__ = ["Checkpointer", "DataParallel", "TrainState", "make_eval_step", "make_optimizer",
           "make_train_step", "per_stage"]

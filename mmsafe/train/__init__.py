"""Training: state, pure train/eval steps, optimizers, stages, the loop.

Checkpoints (`mmsafe.train.checkpoint`, orbax) and the loop (`mmsafe.train.loop`)
are imported where they are used, so `import mmsafe` does not load orbax.
"""

from mmsafe.train.optimizer import make_optimizer, per_stage
from mmsafe.train.parallel import DataParallel
from mmsafe.train.state import TrainState
from mmsafe.train.step import make_eval_step, make_train_step

__all__ = ["DataParallel", "TrainState", "make_eval_step", "make_optimizer",
           "make_train_step", "per_stage"]

"""Plain cross-entropy training of the fused logits.

* `jt`: joint training with the concatenation head (CRMT eq. 3), the paper's
  baseline "JT".
* `ojt`: the same loss on the orthogonal head (CRMT eq. 8), the ablation "OJT"
  of the paper's Fig. 5; `W~` stays on the Stiefel manifold through the optimizer.
"""

from __future__ import annotations

from mmsafe.methods.common import accuracy, apply_model, cross_entropy
from mmsafe.methods.registry import register


def _cross_entropy_objective(model, config):
  del config

  def loss_fn(params, state, batch, rng):
    del rng
    out, new_state = apply_model(model, params, state, batch["inputs"], train=True)
    loss = cross_entropy(out.logits, batch["label"])
    return loss, (new_state, {"ce": loss, "accuracy": accuracy(out.logits, batch["label"])})

  return loss_fn


register("jt", head="concat", description="joint training, concat head, CE")(
    _cross_entropy_objective)
register("ojt", head="orthogonal", description="orthogonal head, CE (ablation OJT)")(
    _cross_entropy_objective)

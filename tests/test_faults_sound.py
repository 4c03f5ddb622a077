"""Sound means sound (issue 34, items 4 and 6): every option of a convolution is
in its stated bound; `certify` certifies bfloat16 models in float32; radii in
raw input units hold against attacks in raw input space."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmsafe.models.layers import LIPSCHITZ_COLLECTION, Conv
from mmsafe.models.operator_norms import ROUNDING_MARGIN, BoundOptions

# ---------------------------------------------------------------------------
# Convolutions: dilations and feature groups are part of the linear map bounded.


def _power_iteration_norm(layer: Conv, kernel, shape, steps: int = 1000) -> float:
  """An independent estimate of the norm of the layer's own linear map (its
  `apply` without the bias), from below: power iteration with `jax.vjp`."""
  conv = layer.clone(use_bias=False)
  linear = lambda x: conv.apply({"params": {"kernel": kernel}}, x[None])[0]
  _, adjoint = jax.vjp(linear, jnp.zeros(shape))
  step = jax.jit(lambda v: (lambda w: w / jnp.linalg.norm(w))(adjoint(linear(v))[0]))
  v = jax.random.normal(jax.random.PRNGKey(3), shape)
  for _ in range(steps):
    v = step(v)
  return float(jnp.linalg.norm(linear(v)))


@pytest.mark.parametrize("options", [
    dict(kernel_dilation=2),
    dict(kernel_dilation=(3, 1), padding="VALID"),
    dict(kernel_dilation=2, strides=2),
    dict(input_dilation=2, padding=((1, 1), (1, 1))),
    dict(feature_group_count=2),
], ids=["dilated", "dilated-valid", "dilated-strided", "input-dilated", "grouped"])
@pytest.mark.parametrize("method", ["exact", "power"])
def test_conv_bound_covers_dilations_and_groups(options, method):
  shape = (7, 6, 4)
  layer = Conv(features=4, kernel_size=(3, 3), **options)
  example = jnp.zeros((1, *shape))
  with jax.default_matmul_precision("highest"):
    variables = layer.init(jax.random.PRNGKey(0), example)
    bound, _ = layer.apply(variables, example, BoundOptions(method=method, iterations=500),
                           method="lipschitz_bound", mutable=[LIPSCHITZ_COLLECTION])
    estimate = _power_iteration_norm(layer, variables["params"]["kernel"], shape)
  # Sound (never below the norm) and exact up to the stated margins (power: its
  # probabilistic safety factor, 1.05 here).
  slack = (1 + ROUNDING_MARGIN) * (1.0 if method == "exact" else 1.05) + 1e-4
  assert estimate <= float(bound) <= estimate * slack, (float(bound), estimate)


@pytest.mark.parametrize("options, named", [
    (dict(padding="CIRCULAR"), "padding='CIRCULAR'"),
    (dict(padding="REFLECT"), "padding='REFLECT'"),
    (dict(mask=np.ones((3, 3, 4, 4), np.float32)), "mask"),
])
def test_conv_options_without_a_bound_are_refused_by_name(options, named):
  layer = Conv(features=4, kernel_size=(3, 3), name="conv", **options)
  example = jnp.zeros((1, 6, 6, 4))
  variables = layer.init(jax.random.PRNGKey(0), example)
  with pytest.raises(NotImplementedError, match=rf"layer conv \(Conv\) states no bound with "
                                                rf"{named}"):
    layer.apply(variables, example, BoundOptions(), method="lipschitz_bound",
                mutable=[LIPSCHITZ_COLLECTION])

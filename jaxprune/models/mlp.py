"""Fully connected models: MLPNet (784-40-20-10, no biases) and a two-layer MLP."""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxprune.models.common import out_features, params_of


class MLP(nn.Module):
  """``fc1 -> ReLU -> ... -> fcL`` on flattened inputs; layers are named ``fc1 .. fc{L}``.

  Attributes:
    widths: hidden widths, e.g. ``(40, 20)`` for MLPNet.
    num_classes: output width.
    use_bias: whether the Dense layers have biases.
  """
  widths: Sequence[int]
  num_classes: int = 10
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    x = x.reshape((x.shape[0], -1))
    for i, width in enumerate(self.widths):
      x = nn.relu(nn.Dense(width, use_bias=self.use_bias, name=f"fc{i + 1}")(x))
    return nn.Dense(self.num_classes, use_bias=self.use_bias, name=f"fc{len(self.widths) + 1}")(x)

  @classmethod
  def from_params(cls, variables: Any) -> "MLP":
    """The MLP whose widths match a (possibly pruned) parameter tree."""
    params = params_of(variables)
    n_layers = len([k for k in params.keys() if str(k).startswith("fc")])
    widths = tuple(out_features(params, f"fc{i}") for i in range(1, n_layers))
    return cls(widths=widths, num_classes=out_features(params, f"fc{n_layers}"),
               use_bias="bias" in params["fc1"].keys())


def mlpnet(widths: Sequence[int] = (40, 20), num_classes: int = 10) -> MLP:
  """MLPNet of the WoodFisher/CBS/CHITA/EWR benchmarks: 784-40-20-10, ReLU, no biases."""
  return MLP(widths=tuple(widths), num_classes=num_classes, use_bias=False)


def two_layer_mlp(hidden: int = 128, num_classes: int = 10, use_bias: bool = True) -> MLP:
  """One hidden layer (the i-SpaSP paper's two-layer network)."""
  return MLP(widths=(hidden,), num_classes=num_classes, use_bias=use_bias)

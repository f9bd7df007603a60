"""VGG with BatchNorm for CIFAR (kuangliu/pytorch-cifar layout, as in the Intra-Fusion code)."""
from __future__ import annotations

from typing import Any, Sequence, Union

import flax.linen as nn

from jaxprune.models.common import batch_norm, conv3x3, out_features, params_of

VGG11_CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
  """``[conv3x3 (bias) -> BN -> ReLU | maxpool 2x2]*`` then ``classifier`` on the flattened map.

  Convs are named ``conv{i}``/``bn{i}`` (i counts convs from 0); the head is ``classifier``.

  Attributes:
    cfg: channel widths, with ``"M"`` for a 2x2 max-pool.
  """
  cfg: Sequence[Union[int, str]] = VGG11_CFG
  num_classes: int = 10
  use_bias: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    i = 0
    for c in self.cfg:
      if c == "M":
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      else:
        x = conv3x3(int(c), 1, self.use_bias, name=f"conv{i}")(x)
        x = nn.relu(batch_norm(train, f"bn{i}")(x))
        i += 1
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(self.num_classes, name="classifier")(x)

  @classmethod
  def from_params(cls, variables: Any, base_cfg: Sequence[Union[int, str]] = VGG11_CFG) -> "VGG":
    """The VGG whose conv widths match a (possibly pruned) tree; pooling positions from ``base_cfg``."""
    params = params_of(variables)
    widths = iter(out_features(params, f"conv{i}") for i in range(sum(c != "M" for c in base_cfg)))
    cfg = tuple("M" if c == "M" else next(widths) for c in base_cfg)
    return cls(cfg=cfg, num_classes=out_features(params, "classifier"),
               use_bias="bias" in params["conv0"].keys())


def vgg11_bn(num_classes: int = 10, cfg: Sequence[Union[int, str]] = VGG11_CFG, use_bias: bool = True) -> VGG:
  """VGG11-BN for CIFAR (8 convs with bias + BN, 5 max-pools, one linear classifier)."""
  return VGG(cfg=tuple(cfg), num_classes=num_classes, use_bias=use_bias)

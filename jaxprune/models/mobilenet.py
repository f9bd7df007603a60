"""MobileNetV1 (depthwise-separable convs), with a CIFAR stem option."""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxprune.models.common import batch_norm, conv1x1, conv3x3, out_features, params_of

# (pointwise width, depthwise stride) of the 13 blocks of MobileNetV1.
MOBILENET_V1_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1),
                       (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))


class MobileNetV1(nn.Module):
  """Stem conv3x3 -> 13 x (depthwise 3x3 -> BN -> ReLU -> pointwise 1x1 -> BN -> ReLU) -> GAP -> ``fc``.

  Modules: ``conv0``/``bn0`` (stem), ``block{i}`` with ``dw``, ``dw_bn``, ``pw``, ``pw_bn``, and ``fc``.
  A depthwise conv ties its input and output channels (``feature_group_count`` = channels).

  Attributes:
    stem_width: output channels of the stem (32 in the paper).
    widths: pointwise widths of the 13 blocks.
    strides: depthwise strides of the 13 blocks.
    stem_stride: 2 for ImageNet, 1 for 32x32 CIFAR inputs (default).
  """
  stem_width: int = 32
  widths: Sequence[int] = tuple(w for w, _ in MOBILENET_V1_BLOCKS)
  strides: Sequence[int] = tuple(s for _, s in MOBILENET_V1_BLOCKS)
  stem_stride: int = 1
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = conv3x3(self.stem_width, self.stem_stride, name="conv0")(x)
    x = nn.relu(batch_norm(train, "bn0")(x))
    for i, (width, stride) in enumerate(zip(self.widths, self.strides)):
      x = _DepthwiseSeparable(width, stride, name=f"block{i}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="fc")(x)

  @classmethod
  def from_params(cls, variables: Any, strides: Sequence[int] = tuple(s for _, s in MOBILENET_V1_BLOCKS),
                  stem_stride: int = 1) -> "MobileNetV1":
    """The network whose widths match a (possibly pruned) parameter tree."""
    params = params_of(variables)
    n = len([k for k in params.keys() if str(k).startswith("block")])
    return cls(stem_width=out_features(params, "conv0"),
               widths=tuple(out_features(params[f"block{i}"], "pw") for i in range(n)),
               strides=tuple(strides)[:n], stem_stride=stem_stride, num_classes=out_features(params, "fc"))


class _DepthwiseSeparable(nn.Module):
  width: int
  stride: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    c = x.shape[-1]
    x = conv3x3(c, self.stride, name="dw", groups=c)(x)
    x = nn.relu(batch_norm(train, "dw_bn")(x))
    x = conv1x1(self.width, name="pw")(x)
    return nn.relu(batch_norm(train, "pw_bn")(x))

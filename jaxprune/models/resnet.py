"""CIFAR ResNets built from BasicBlocks: ResNet20 (3x3 stages of 16/32/64) and ResNet18 (CIFAR stem)."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxprune.models.common import batch_norm, conv1x1, conv3x3, out_features, params_of


class BasicBlock(nn.Module):
  """``conv1 3x3 -> bn1 -> ReLU -> conv2 3x3 -> bn2`` + shortcut, then ReLU.

  Attributes:
    hidden: output channels of conv1 (the block's own prunable width).
    width: output channels of conv2 (the residual stream width).
    stride: stride of conv1 and of the projection shortcut.
    downsample: use a 1x1 conv + BN shortcut (``downsample_conv``/``downsample_bn``).
  """
  hidden: int
  width: int
  stride: int = 1
  downsample: bool = False
  use_bias: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = conv3x3(self.hidden, self.stride, self.use_bias, name="conv1")(x)
    y = nn.relu(batch_norm(train, "bn1")(y))
    y = conv3x3(self.width, 1, self.use_bias, name="conv2")(y)
    y = batch_norm(train, "bn2")(y)
    if self.downsample:
      x = conv1x1(self.width, self.stride, self.use_bias, name="downsample_conv")(x)
      x = batch_norm(train, "downsample_bn")(x)
    return nn.relu(y + x)


class CifarResNet(nn.Module):
  """ResNet for 32x32 inputs: 3x3 stem (stride 1, no max-pool), BasicBlock stages, GAP, ``fc``.

  Modules are named ``conv1``, ``bn1``, ``layer{s}_{b}`` (stage s from 1, block b from 0), ``fc``,
  mirroring the PyTorch keys ``layer{s}.{b}``.

  Attributes:
    stage_sizes: blocks per stage, ``(3, 3, 3)`` for ResNet20, ``(2, 2, 2, 2)`` for ResNet18.
    stage_widths: residual stream width of each stage (the stem writes stage 1's stream).
    hidden_widths: conv1 width of every block (flat, in order); default: the stage width.
    downsample: per block, whether it has a projection shortcut; default: when the stride is
      2 or the stream width changes (as in the original models).
  """
  stage_sizes: Sequence[int]
  stage_widths: Sequence[int]
  hidden_widths: Optional[Sequence[int]] = None
  downsample: Optional[Sequence[bool]] = None
  num_classes: int = 10
  use_bias: bool = False

  def block_names(self) -> list[str]:
    return [f"layer{s + 1}_{b}" for s, n in enumerate(self.stage_sizes) for b in range(n)]

  @nn.compact
  def __call__(self, x, train: bool = False):
    n_blocks = sum(self.stage_sizes)
    hidden = self.hidden_widths or [w for w, n in zip(self.stage_widths, self.stage_sizes) for _ in range(n)]
    if len(hidden) != n_blocks:
      raise ValueError(f"hidden_widths has {len(hidden)} entries, the network has {n_blocks} blocks")
    x = conv3x3(self.stage_widths[0], 1, self.use_bias, name="conv1")(x)
    x = nn.relu(batch_norm(train, "bn1")(x))
    in_width, i = self.stage_widths[0], 0
    for s, (n, width) in enumerate(zip(self.stage_sizes, self.stage_widths)):
      for b in range(n):
        stride = 2 if (s > 0 and b == 0) else 1
        down = self.downsample[i] if self.downsample is not None else (stride != 1 or in_width != width)
        x = BasicBlock(hidden[i], width, stride, down, self.use_bias, name=f"layer{s + 1}_{b}")(x, train)
        in_width, i = width, i + 1
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="fc")(x)

  @classmethod
  def from_params(cls, variables: Any) -> "CifarResNet":
    """The network whose widths match a (possibly pruned) parameter tree."""
    params = params_of(variables)
    blocks = sorted((k for k in params.keys() if str(k).startswith("layer")),
                    key=lambda k: tuple(int(t) for t in k[len("layer"):].split("_")))
    stages = sorted({int(k[len("layer"):].split("_")[0]) for k in blocks})
    stage_sizes = tuple(sum(1 for k in blocks if k.startswith(f"layer{s}_")) for s in stages)
    stage_widths = tuple(out_features(params[f"layer{s}_0"], "conv2") for s in stages)
    return cls(stage_sizes=stage_sizes, stage_widths=stage_widths,
               hidden_widths=tuple(out_features(params[k], "conv1") for k in blocks),
               downsample=tuple("downsample_conv" in params[k].keys() for k in blocks),
               num_classes=out_features(params, "fc"),
               use_bias="bias" in params["conv1"].keys())


def resnet20(num_classes: int = 10, widths: Sequence[int] = (16, 32, 64), **kw) -> CifarResNet:
  """ResNet20 for CIFAR (He et al.): 3 stages x 3 BasicBlocks, 16/32/64 channels, no conv biases."""
  return CifarResNet(stage_sizes=(3, 3, 3), stage_widths=tuple(widths), num_classes=num_classes, **kw)


def resnet18(num_classes: int = 10, widths: Sequence[int] = (64, 128, 256, 512), use_bias: bool = False,
             **kw) -> CifarResNet:
  """ResNet18, CIFAR variant (3x3 stem, no max-pool), as in kuangliu/pytorch-cifar.

  ``use_bias=True`` gives the Intra-Fusion fork's variant with biases on every conv.
  """
  return CifarResNet(stage_sizes=(2, 2, 2, 2), stage_widths=tuple(widths), num_classes=num_classes,
                     use_bias=use_bias, **kw)

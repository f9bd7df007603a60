"""Layers shared by the reference models (PyTorch-equivalent padding and BatchNorm)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn

PAD1 = ((1, 1), (1, 1))  # PyTorch padding=1: SAME would pad (0, 1) at stride 2


def conv3x3(features: int, stride: int = 1, use_bias: bool = False, name: str | None = None, groups: int = 1):
  return nn.Conv(features, (3, 3), strides=(stride, stride), padding=PAD1, use_bias=use_bias,
                 feature_group_count=groups, name=name)


def conv1x1(features: int, stride: int = 1, use_bias: bool = False, name: str | None = None):
  return nn.Conv(features, (1, 1), strides=(stride, stride), padding="VALID", use_bias=use_bias, name=name)


def batch_norm(train: bool, name: str | None = None):
  # PyTorch defaults: momentum 0.1 (flax 0.9), eps 1e-5.
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def params_of(variables: Any) -> Any:
  """``variables["params"]`` if present, else the tree itself (a bare params dict)."""
  if hasattr(variables, "keys") and "params" in variables.keys():
    return variables["params"]
  return variables


def out_features(params: Any, module: str) -> int:
  return int(params[module]["kernel"].shape[-1])

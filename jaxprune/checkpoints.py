"""Import PyTorch checkpoints (``.npz`` of a ``state_dict``) into the reference Flax models.

Linear ``weight (out, in)`` -> Dense ``kernel (in, out)``; Conv ``weight (O, I, kh, kw)`` -> Conv
``kernel (kh, kw, I, O)``; BatchNorm ``weight/bias/running_mean/running_var`` ->
``params: scale/bias`` and ``batch_stats: mean/var``.
"""
from __future__ import annotations

import os
import re
from typing import Callable, Mapping

import numpy as np

_BN_PARAMS = {"weight": "scale", "bias": "bias"}
_BN_STATS = {"running_mean": "mean", "running_var": "var"}


def _set(tree: dict, path: list[str], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  if path[-1] in tree:
    raise ValueError(f"two checkpoint entries map to {'/'.join(path)}")
  tree[path[-1]] = value


def torch_to_flax(state_dict: Mapping[str, np.ndarray], rename: Callable[[str], str],
                  batchnorm: Callable[[str], bool]) -> dict:
  """Converts a PyTorch ``state_dict`` to linen ``{"params": ..., "batch_stats": ...}``.

  Args:
    state_dict: ``{"layer1.0.conv1.weight": array, ...}``.
    rename: maps a PyTorch module name (``"layer1.0.conv1"``) to a Flax path (``"layer1_0/conv1"``).
    batchnorm: says whether a PyTorch module name is a BatchNorm layer.
  """
  variables: dict = {"params": {}}
  for key, value in state_dict.items():
    module, _, leaf = key.rpartition(".")
    if leaf == "num_batches_tracked":
      continue
    path = rename(module).split("/")
    value = np.asarray(value)
    if batchnorm(module):
      if leaf in _BN_PARAMS:
        _set(variables["params"], path + [_BN_PARAMS[leaf]], value)
      elif leaf in _BN_STATS:
        _set(variables.setdefault("batch_stats", {}), path + [_BN_STATS[leaf]], value)
      else:
        raise ValueError(f"unexpected BatchNorm entry {key!r}")
    elif leaf == "weight" and value.ndim == 2:
      _set(variables["params"], path + ["kernel"], value.T)
    elif leaf == "weight" and value.ndim == 4:
      _set(variables["params"], path + ["kernel"], value.transpose(2, 3, 1, 0))
    elif leaf == "bias":
      _set(variables["params"], path + ["bias"], value)
    else:
      raise ValueError(f"unexpected checkpoint entry {key!r} with shape {value.shape}")
  return variables


def _load_npz(path: str | os.PathLike) -> dict:
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint not found: {path}")
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def load_mlpnet(path: str | os.PathLike) -> dict:
  """MLPNet (``fc1..fc3``, no biases) from ``mlpnet_mnist.npz``; use with :func:`jaxprune.models.mlpnet`."""
  return torch_to_flax(_load_npz(path), rename=lambda m: m, batchnorm=lambda m: False)


def _resnet_name(module: str) -> str:
  name = re.sub(r"^layer(\d+)\.(\d+)\.", r"layer\1_\2/", module)
  name = name.replace("downsample.0", "downsample_conv").replace("downsample.1", "downsample_bn")
  name = name.replace("shortcut.0", "downsample_conv").replace("shortcut.1", "downsample_bn")
  return name.replace("linear", "fc").replace(".", "/")


def _resnet_is_bn(module: str) -> bool:
  return bool(re.search(r"(^|\.)bn\d+$", module)) or module.endswith(("downsample.1", "shortcut.1"))


def load_resnet(path: str | os.PathLike) -> dict:
  """A CIFAR ResNet (``resnet20_cifar10.npz``, or kuangliu ResNet18 keys) as linen variables.

  Returns ``{"params", "batch_stats"}`` for :func:`jaxprune.models.resnet20` / ``resnet18``
  (or ``CifarResNet.from_params``).
  """
  return torch_to_flax(_load_npz(path), rename=_resnet_name, batchnorm=_resnet_is_bn)


load_resnet20 = load_resnet

"""In-memory datasets and their batches: what training, evaluation and the gradual driver iterate over."""
from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np


class Dataset(NamedTuple):
  """``x: (N, H, W, C)`` (float32 normalised, or uint8 raw) and ``y: (N,)`` int32 labels."""
  x: np.ndarray
  y: np.ndarray

  def __len__(self) -> int:   # noqa: D105  (number of examples, not of fields)
    return int(self.y.shape[0])


def batches(data: Dataset, batch_size: int, *, shuffle: bool = False, seed: int = 0,
            drop_remainder: bool = False) -> Iterator[Dataset]:
  """Iterates over ``data`` in batches of ``batch_size`` (the last one smaller unless dropped)."""
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  n = len(data)
  order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
  stop = n - n % batch_size if drop_remainder else n
  for start in range(0, stop, batch_size):
    idx = order[start:start + batch_size]
    yield Dataset(data.x[idx], data.y[idx])

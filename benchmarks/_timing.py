"""Timing helper shared by the benchmark scripts."""
import statistics
import time

import jax


def median_time(fn, repeats: int, *, warmup: bool = True):
  """``(first output, seconds of the first call, median seconds of ``repeats`` more calls)``."""
  t0 = time.perf_counter()
  out = fn()
  jax.block_until_ready(jax.tree_util.tree_leaves(out))
  first = time.perf_counter() - t0
  runs = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(jax.tree_util.tree_leaves(fn()))
    runs.append(time.perf_counter() - t0)
  return out, first, statistics.median(runs)

"""A size report users can read: parameters, FLOPs per example and measured latency, model by model.

Torch-Pruning users ask for exactly this ("MACs went down but latency did not"): masks zero weights
but the arrays, and so the FLOPs XLA runs and the latency, stay those of the dense model; only a
shrunk model (``mode="shrink"``, rebuilt with the narrower widths) runs fewer FLOPs. The report
shows both numbers side by side: ``nonzero`` parameters, and the FLOPs of the compiled program.

FLOPs come from XLA's cost analysis of the jitted ``apply_fn`` on the given inputs (``flops`` of
the compiled module, divided by the batch size); a multiply-accumulate is two FLOPs. Latency is
the median wall time of ``repeats`` jitted calls after a compiling one, on this machine's default
device.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import numpy as np

from jaxprune.core.checks import check_positive_int, traced_call_note
from jaxprune.core.forms import as_model


class ModelSize(NamedTuple):
  """One model's size. ``flops`` and ``latency_ms`` are for the inputs it was measured on."""
  name: str
  parameters: int           # elements of every array leaf of the tree (BatchNorm statistics included)
  nonzero: int              # of which nonzero
  flops: float              # per example, from XLA's cost analysis of the compiled apply
  latency_ms: float         # median jitted call on the whole batch
  batch: int


class SizeReport(NamedTuple):
  """Rows of :class:`ModelSize`; ``str(report)`` is a markdown table with ratios to the first row."""
  rows: tuple

  def __str__(self) -> str:
    base = self.rows[0]
    lines = ["| model | parameters | nonzero | MFLOPs / example | latency (ms, batch {}) | speed-up |".format(base.batch),
             "| --- | --- | --- | --- | --- | --- |"]
    for r in self.rows:
      lines.append(f"| {r.name} | {r.parameters:,} ({r.parameters / base.parameters:.2f}x) | "
                   f"{r.nonzero:,} ({r.nonzero / base.nonzero:.2f}x) | {r.flops / 1e6:.3f} ({r.flops / base.flops:.2f}x) | "
                   f"{r.latency_ms:.3f} | {base.latency_ms / r.latency_ms:.2f}x |")
    return "\n".join(lines)


ModelEntry = Union[Any, tuple]   # an nnx.Module, or (apply_fn, params)


def measure_size(apply_fn: Optional[Callable], params: Any, *inputs: Any, name: str = "model",
                 repeats: int = 20) -> ModelSize:
  """The :class:`ModelSize` of ``apply_fn(params, *inputs)`` (``apply_fn=None`` for an NNX module).

  ``inputs`` carry a leading batch axis; FLOPs are divided by its size.
  """
  check_positive_int(repeats, "repeats")
  model = as_model(params, apply_fn)
  if model.apply_fn is None:
    raise ValueError("apply_fn: needed to run the model (or pass an nnx.Module as params)")
  leaves = [np.asarray(x) for x in jax.tree.leaves(model.tree) if hasattr(x, "shape")]
  batch = int(np.shape(jax.tree.leaves(inputs)[0])[0]) if jax.tree.leaves(inputs) else 1
  _check_batch_axis(model, inputs, batch, name)
  fn = jax.jit(model.apply_fn)
  compiled = fn.lower(model.tree, *inputs).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float((cost or {}).get("flops", float("nan")))
  jax.block_until_ready(fn(model.tree, *inputs))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(model.tree, *inputs))
    times.append(time.perf_counter() - t0)
  return ModelSize(name, int(sum(x.size for x in leaves)), int(sum(np.count_nonzero(x) for x in leaves)),
                   flops / batch, 1e3 * statistics.median(times), batch)


def _check_batch_axis(model, inputs: tuple, batch: int, name: str) -> None:
  """FLOPs are divided by the inputs' leading axis, so the model's output must keep it: an input
  without the batch axis (one example, ``x[0]``) would give FLOPs per feature, silently."""
  try:
    out = jax.eval_shape(model.apply_fn, model.tree, *inputs)
  except Exception as error:
    traced_call_note(error, f"apply_fn(params, *inputs) of {name!r} for jaxprune.size_report", inputs)
    raise
  shape = tuple(jax.tree.leaves(out)[0].shape) if jax.tree.leaves(out) else ()
  if not shape or shape[0] != batch:
    raise ValueError(f"inputs: FLOPs are per example of the leading (batch) axis, of size {batch}, but model "
                     f"{name!r} returned shape {shape}; give the inputs a batch axis (x[:1] for one example)")


def size_report(models: dict, *inputs: Any, repeats: int = 20) -> SizeReport:
  """Sizes of several models on the same inputs, e.g. dense against pruned::

      print(jp.size_report({"dense": (model.apply, variables),
                            "pruned (mask)": (model.apply, masked.params),
                            "pruned (shrunk)": (small.apply, shrunk.params)}, x))

  Args:
    models: ``{name: (apply_fn, params)}`` or ``{name: nnx_module}``; the first is the baseline.
    inputs: the model's inputs with a leading batch axis.
    repeats: timed calls per model.
  """
  if not isinstance(models, dict) or not models:
    raise ValueError("models: give a non-empty dict {name: (apply_fn, params) or nnx.Module}")
  rows = []
  for name, entry in models.items():
    apply_fn, params = entry if isinstance(entry, tuple) else (None, entry)
    rows.append(measure_size(apply_fn, params, *inputs, name=str(name), repeats=repeats))
  return SizeReport(tuple(rows))

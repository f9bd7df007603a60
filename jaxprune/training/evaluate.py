"""Jitted, batched accuracy and mean cross-entropy of an apply function over a dataset."""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune.core.checks import check_labels, check_positive_int
from jaxprune.core.forms import as_model, require_apply_fn
from jaxprune.core.progress import progress


class Evaluation(NamedTuple):
  accuracy: float
  loss: float        # mean softmax cross-entropy over examples
  n: int


@functools.partial(jax.jit, static_argnums=0)
def _batch_stats(apply_fn, variables, x, y, weight):
  logits = apply_fn(variables, x)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  correct = (jnp.argmax(logits, -1) == y)
  return jnp.sum(correct * weight), jnp.sum(loss * weight)


def evaluate(apply_fn: Callable[[Any, jax.Array], jax.Array], variables: Any, x: np.ndarray, y: np.ndarray, *,
             batch_size: int = 1000, show_progress: bool = False) -> Evaluation:
  """Accuracy and mean loss of ``apply_fn(variables, x_batch) -> logits`` on ``(x, y)``.

  The last batch is padded to ``batch_size`` (with zero weight) so that one compiled
  function serves every batch. The model is a static argument of that step: the same (or an
  equal) model reuses it.

  Args:
    apply_fn, variables: the model as every method takes it; an ``nnx.Module`` is its own apply
      function: ``evaluate(None, module, x, y)``.
    x: ``(N, ...)`` inputs; y: ``(N,)`` integer labels.

  Returns:
    :class:`Evaluation` ``(accuracy, loss, n)``.
  """
  model = as_model(variables, apply_fn)
  apply_fn, variables = require_apply_fn(model, "evaluate", "variables"), model.tree
  x, y = np.asarray(x), np.asarray(y)
  if x.shape[0] != y.shape[0] or x.shape[0] == 0:
    raise ValueError(f"x and y must hold the same positive number of examples, got {x.shape[0]} and {y.shape[0]}")
  check_positive_int(batch_size, "batch_size")
  n_classes = jax.eval_shape(apply_fn, variables, jax.ShapeDtypeStruct((1,) + x.shape[1:], x.dtype)).shape[-1]
  check_labels(y, n_classes, "y")
  n = x.shape[0]
  bs = min(batch_size, n)
  correct = total_loss = 0.0
  for start in progress(range(0, n, bs), desc="evaluate", disable=not show_progress):
    xb, yb = x[start:start + bs], y[start:start + bs]
    m = xb.shape[0]
    weight = np.ones(bs, np.float32)
    if m < bs:
      pad = bs - m
      xb = np.concatenate([xb, np.zeros((pad,) + xb.shape[1:], xb.dtype)])
      yb = np.concatenate([yb, np.zeros(pad, yb.dtype)])
      weight[m:] = 0.0
    c, l = _batch_stats(apply_fn, variables, xb, yb, weight)
    correct += float(c)
    total_loss += float(l)
  return Evaluation(correct / n, total_loss / n, n)

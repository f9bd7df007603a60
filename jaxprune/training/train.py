"""Training and fine-tuning linen models with BatchNorm: one jitted optax step, epochs over a Dataset."""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from jaxprune.training.batches import Dataset, batches
from jaxprune.core.progress import progress


class TrainResult(NamedTuple):
  """``params`` (the trained tree) after training; ``losses``: mean training loss of each epoch."""
  params: Any
  losses: list


def cifar_augment(key: jax.Array, x: jax.Array, pad: int = 4) -> jax.Array:
  """Random crop (zero padding ``pad``) and horizontal flip of ``x: (B, H, W, C)``, per image."""
  b, h, w, _ = x.shape
  k1, k2, k3 = jax.random.split(key, 3)
  padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  dy = jax.random.randint(k1, (b,), 0, 2 * pad + 1)
  dx = jax.random.randint(k2, (b,), 0, 2 * pad + 1)
  crop = jax.vmap(lambda img, i, j: jax.lax.dynamic_slice(img, (i, j, 0), (h, w, img.shape[-1])))(padded, dy, dx)
  flip = jax.random.bernoulli(k3, 0.5, (b,))
  return jnp.where(flip[:, None, None, None], crop[:, :, ::-1, :], crop)


@functools.partial(jax.jit, static_argnames=("apply_fn", "optimizer", "augment", "train_bn"))
def _step(apply_fn, optimizer, augment, train_bn, variables, opt_state, x, y, key):
  if augment is not None:
    x = augment(key, x)
  params = variables["params"]
  rest = {k: v for k, v in variables.items() if k != "params"}

  def loss_fn(p):
    if not train_bn:
      logits, updates = apply_fn({"params": p, **rest}, x, train=False), {}
    elif rest:
      logits, updates = apply_fn({"params": p, **rest}, x, train=True, mutable=list(rest))
    else:
      logits, updates = apply_fn({"params": p}, x, train=True), {}
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, updates

  (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  upd, opt_state = optimizer.update(grads, opt_state, params)
  params = optax.apply_updates(params, upd)
  return {"params": params, **rest, **updates}, opt_state, loss


def train_epochs(apply_fn: Callable, variables: Any, data: Dataset, *, epochs: int,
                 optimizer: optax.GradientTransformation, batch_size: int = 128, seed: int = 0,
                 augment: Optional[Callable[[jax.Array, jax.Array], jax.Array]] = None,
                 train_bn: bool = True, show_progress: bool = True) -> TrainResult:
  """Trains a linen model with cross-entropy: ``epochs`` shuffled passes over ``data``.

  Args:
    apply_fn: ``model.apply``; called with ``train=True`` (and ``mutable=`` the non-``params``
      collections, so BatchNorm statistics update). Hashable (a bound ``apply`` is).
    variables: ``{"params": ..., "batch_stats": ...}``.
    data: training :class:`~jaxprune.data.Dataset` (``x`` normalised, ``y`` int labels).
    optimizer: any optax transformation (wrap it in :func:`jaxprune.keep_pruned_at_zero` to keep
      masked weights at zero).
    augment: ``fn(key, x) -> x`` applied inside the jitted step (e.g. :func:`cifar_augment`).
    train_bn: BatchNorm in train mode (batch statistics, running averages updated). ``False``
      keeps the running statistics fixed and trains the norms' scale and offset only, which is
      what a BN-folded network needs: its norms are identities whose statistics no longer
      describe the activations, and batch statistics would change the function at step one.

  Returns:
    :class:`TrainResult`.
  """
  if not isinstance(epochs, int) or epochs < 0:
    raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
  if "params" not in variables:
    raise ValueError("variables must be a linen variables dict with a 'params' collection")
  variables = dict(variables)
  opt_state = optimizer.init(variables["params"])
  key = jax.random.key(seed)
  losses = []
  for epoch in progress(range(epochs), desc="epochs", disable=not show_progress):
    total, count = 0.0, 0
    for xb, yb in batches(data, batch_size, shuffle=True, seed=seed + epoch, drop_remainder=True):
      key, sub = jax.random.split(key)
      variables, opt_state, loss = _step(apply_fn, optimizer, augment, train_bn, variables, opt_state, jnp.asarray(xb),
                                         jnp.asarray(yb), sub)
      total, count = total + float(loss), count + 1
    losses.append(total / max(count, 1))
  return TrainResult(variables, losses)

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn
from flax import nnx

import jaxprune as jp
from jaxprune import signals
from helpers import NNXNet, classification_problem


_setup = classification_problem


def test_rows_are_the_gradients_of_single_examples():
  model, v, (x, y), loss = _setup()
  G = signals.per_example_grads(loss, v, (x, y), chunk_size=8, show_progress=False)
  assert G.shape == (37, jp.count_prunable(v))
  for i in (0, 17, 36):
    g = jax.grad(loss)(v, (x[i:i + 1], y[i:i + 1]))
    ref, _ = jp.flatten(g, jp.Prunable(where=lambda p, l: p in set(jp.prunable_paths(v))))
    np.testing.assert_allclose(G[i], ref, rtol=1e-5, atol=1e-6)
  # the mean of the rows is the batch gradient
  full, _ = jp.flatten(jax.grad(loss)(v, (x, y)), jp.Prunable(where=lambda p, l: p in set(jp.prunable_paths(v))))
  np.testing.assert_allclose(G.mean(0), full, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chunk", [5, 37, 100])
def test_matrix_free_equals_materialised(chunk):
  model, v, batch, loss = _setup()
  G = signals.per_example_grads(loss, v, batch, chunk_size=chunk, show_progress=False)
  op = signals.gradient_operator(loss, v, batch, chunk_size=chunk)
  vec = jax.random.normal(jax.random.key(1), (G.shape[1],))
  u = jax.random.normal(jax.random.key(2), (G.shape[0],))
  np.testing.assert_allclose(op.matvec(vec), G @ vec, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(op.rmatvec(u), G.T @ u, rtol=1e-4, atol=1e-5)
  dense = signals.dense_operator(G)
  np.testing.assert_allclose(dense.matvec(vec), G @ vec, rtol=1e-5, atol=1e-5)


def test_bfloat16_storage():
  model, v, batch, loss = _setup()
  G = signals.per_example_grads(loss, v, batch, dtype=jnp.bfloat16, show_progress=False)
  G32 = signals.per_example_grads(loss, v, batch, show_progress=False)
  assert G.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(G, np.float32), G32, rtol=2e-2, atol=1e-3)


def test_nnx_state_params():
  graphdef, params, rest = nnx.split(NNXNet(nnx.Rngs(0)), nnx.Param, ...)
  x = jnp.ones((6, 4)) * jnp.arange(6)[:, None]
  y = jnp.arange(6) % 3

  def loss(p, batch):
    model = nnx.merge(graphdef, p, rest)
    model.eval()
    return jnp.mean(jax.nn.logsumexp(model(batch[0]), -1) - jnp.take_along_axis(model(batch[0]), batch[1][:, None], 1)[:, 0])

  G = signals.per_example_grads(loss, params, (x, y), show_progress=False)
  assert G.shape == (6, jp.count_prunable(params))


def test_noise_follows_the_official_recipe():
  G = jnp.asarray(np.random.default_rng(0).normal(size=(50, 1000)) * np.arange(1, 51)[:, None], jnp.float32)
  noisy = signals.add_gradient_noise(G, jax.random.key(0), 2.0, 0.1)
  changed = np.asarray(noisy != G)
  assert (changed.sum(1) == 100).all()                         # int(p * fraction) coordinates per row
  delta = np.asarray(noisy - G)[changed].reshape(50, 100)
  ratio = delta.std(1) / np.asarray(G).std(1)
  assert abs(ratio.mean() - 2.0) < 0.1                          # std = scale x that row's std
  again = signals.add_gradient_noise(G, jax.random.key(0), 2.0, 0.1)
  np.testing.assert_array_equal(noisy, again)
  assert not np.array_equal(noisy, signals.add_gradient_noise(G, jax.random.key(1), 2.0, 0.1))
  with pytest.raises(ValueError, match="fraction"):
    signals.add_gradient_noise(G, jax.random.key(0), 1.0, 1.5)


def test_bad_batches_and_nan_gradients():
  model, v, (x, y), loss = _setup()
  with pytest.raises(ValueError, match="leading example axis"):
    signals.per_example_grads(loss, v, (x[0, 0], y[0]), show_progress=False)
  with pytest.raises(ValueError, match="disagree"):
    signals.per_example_grads(loss, v, (x, y[:5]), show_progress=False)
  with pytest.raises(ValueError, match="chunk_size"):
    signals.per_example_grads(loss, v, (x, y), chunk_size=0, show_progress=False)
  nan_loss = lambda p, b: loss(p, b) * jnp.nan
  with pytest.raises(ValueError, match="NaN or infinite"):
    signals.per_example_grads(nan_loss, v, (x, y), show_progress=False)


def test_a_non_finite_gradient_is_caught_where_the_projection_weight_is_zero():
  """The finite check is read from the projections: ``0 x inf`` is NaN, so a non-finite gradient
  shows even where the projected weights are zero, and only its example is named."""
  model, v, (x, y), loss = _setup()
  x = x.at[3].set(jnp.inf)
  w, _ = jp.flatten(v)
  G, finite, proj = signals.grads_and_projections(loss, v, (x, y), jnp.zeros((w.size, 1)), chunk_size=8,
                                                   show_progress=False)
  rows = ~np.isfinite(np.asarray(G)).all(axis=1)
  np.testing.assert_array_equal(np.flatnonzero(rows), [3])
  np.testing.assert_array_equal(~np.asarray(finite), rows)
  with pytest.raises(ValueError, match=r"NaN or infinite .* for examples \[3\]"):
    signals.per_example_grads(loss, v, (x, y), chunk_size=8, show_progress=False)


def test_chunk_size_for_a_memory_budget_counts_rows_and_backward_intermediates():
  """``chunk_size_for`` divides the budget by one example's bytes: its gradient row (``4 p``) plus
  every intermediate of its backward pass (from the jaxpr), clamped to ``[1, N]``."""
  from jaxprune.signals.gradients import _example_loss_fn, _intermediate_bytes
  model, v, (x, y), loss = _setup()
  spec = jp.trees.flat_spec(v)
  w, _ = jp.flatten(v, spec=spec)
  jaxpr = jax.make_jaxpr(jax.grad(_example_loss_fn(loss, v, spec)))(w, (x[0], y[0])).jaxpr
  per_example = _intermediate_bytes(jaxpr) + 4 * spec.size
  assert _intermediate_bytes(jaxpr) >= 4 * spec.size          # the gradient itself is one of them
  for examples in (1, 5, 20):
    assert signals.chunk_size_for(loss, v, (x, y), memory_budget=examples * per_example + 3) == examples
  assert signals.chunk_size_for(loss, v, (x, y), memory_budget=1) == 1
  assert signals.chunk_size_for(loss, v, (x, y), memory_budget=1e15) == x.shape[0]
  assert (signals.chunk_size_for(loss, v, (x, y), memory_budget=5 * per_example, materialized=False)
          >= signals.chunk_size_for(loss, v, (x, y), memory_budget=5 * per_example))
  with pytest.raises(ValueError, match="memory_budget"):
    signals.chunk_size_for(loss, v, (x, y), memory_budget=0)
  assert signals.default_memory_budget() > 0


def test_chunk_size_for_a_loss_that_draws_random_numbers():
  """A loss that makes a PRNG key (dropout) has key-typed intermediates, which numpy cannot size
  (it raised); they count by their own item size, so the chunk is at most the plain loss's."""
  from jaxprune.signals.gradients import _example_loss_fn, _intermediate_bytes
  model, v, (x, y), loss = _setup()

  def dropout_loss(params, batch):
    keep = jax.random.bernoulli(jax.random.key(1), 0.9, batch[0].shape)
    return loss(params, (batch[0] * keep, batch[1]))

  spec = jp.trees.flat_spec(v)
  w, _ = jp.flatten(v, spec=spec)
  jaxpr = jax.make_jaxpr(jax.grad(_example_loss_fn(loss, v, spec)))(w, (x[0], y[0])).jaxpr
  budget = 3 * (_intermediate_bytes(jaxpr) + 4 * spec.size) + 3
  assert signals.chunk_size_for(loss, v, (x, y), memory_budget=budget) == 3
  assert 1 <= signals.chunk_size_for(dropout_loss, v, (x, y), memory_budget=budget) <= 3


class _ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(3, (3, 3), padding="SAME")(x))
    return nn.Dense(3)(h.reshape(len(x), -1))


def _conv_problem(n=37, side=6):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(n, side, side, 2)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, size=n), jnp.int32)
  model = _ConvNet()
  v = model.init(jax.random.key(0), x[:2])
  return model, v, (x, y), signals.classification_loss(model.apply)


@pytest.mark.parametrize("chunk", [2, 5, 37])
def test_matrix_free_equals_materialised_for_a_convolution(chunk):
  # on CPU the chunks of a convolution are unrolled (8 of 5 examples, 1 of 37); 19 chunks of 2 stay in lax.map
  model, v, batch, loss = _conv_problem()
  G = signals.per_example_grads(loss, v, batch, chunk_size=chunk, show_progress=False)
  op = signals.gradient_operator(loss, v, batch, chunk_size=chunk)
  assert op.unroll == (jax.default_backend() == "cpu")
  _, dense_v, dense_batch, dense_loss = _setup()
  assert not signals.gradient_operator(dense_loss, dense_v, dense_batch, chunk_size=chunk).unroll   # no convolution
  vec = jax.random.normal(jax.random.key(1), (G.shape[1],))
  u = jax.random.normal(jax.random.key(2), (G.shape[0],))
  np.testing.assert_allclose(jax.jit(lambda o, a: o.matvec(a))(op, vec), G @ vec, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(jax.jit(lambda o, b: o.rmatvec(b))(op, u), G.T @ u, rtol=1e-4, atol=1e-5)


def test_weight_reuse_counts_multiply_adds_per_prunable_weight():
  model, v, batch, loss = _conv_problem()
  spec = jp.trees.flat_spec(v, None)
  # conv: 6 x 6 positions x 3 outputs x a 3 x 3 x 2 filter; dense: 108 inputs x 3 outputs
  assert signals.weight_reuse(loss, v, batch) == pytest.approx((36 * 3 * 18 + 108 * 3) / spec.size)
  # the jaxpr is cached by shapes: other values give the same count, other shapes their own
  assert signals.weight_reuse(loss, v, (batch[0][:5] * 2.0, batch[1][:5])) == signals.weight_reuse(loss, v, batch)
  _, v8, batch8, loss8 = _conv_problem(side=8)
  p8 = jp.trees.flat_spec(v8, None).size
  assert signals.weight_reuse(loss8, v8, batch8) == pytest.approx((64 * 3 * 18 + 192 * 3) / p8)
  _, v2, batch2, loss2 = _setup()
  kernels = sum(leaf.size for path, leaf in jp.leaves_with_paths(v2) if path.endswith("kernel"))
  assert jp.trees.flat_spec(v2, None).size == kernels
  assert signals.weight_reuse(loss2, v2, batch2) == 1.0   # dense layers use each weight once per example

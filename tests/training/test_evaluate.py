
import numpy as np
import pytest
from flax import nnx

import jaxprune as jp


def _apply(w, x):
  return x @ w


@pytest.mark.parametrize("batch_size", [7, 50, 64, 1000])
def test_evaluate_matches_numpy_including_padded_last_batch(batch_size):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(50, 5)).astype(np.float32)
  y = rng.integers(0, 3, size=50).astype(np.int32)
  w = rng.normal(size=(5, 3)).astype(np.float32)
  ev = jp.evaluate(_apply, w, x, y, batch_size=batch_size)
  logits = x @ w
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  assert ev.n == 50
  assert ev.accuracy == pytest.approx(np.mean(logits.argmax(-1) == y))
  assert ev.loss == pytest.approx(-np.mean(logp[np.arange(50), y]), rel=1e-5)


def test_evaluate_bad_input():
  with pytest.raises(ValueError, match="same positive number"):
    jp.evaluate(_apply, np.ones((5, 3)), np.ones((4, 5)), np.ones(3, np.int32))
  with pytest.raises(TypeError, match="apply_fn: evaluate runs the model"):
    jp.evaluate(None, np.ones((5, 3)), np.ones((4, 5)), np.ones(4, np.int32))


def test_evaluate_an_nnx_module_as_its_own_apply_function():
  """As every method takes it: the module in the variables slot, apply_fn None; the same figures
  as its split state with a merging apply function. The module as apply_fn is the usual error."""
  module = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(20, 5)).astype(np.float32), rng.integers(0, 3, 20).astype(np.int32)
  graphdef, state = nnx.split(module)
  want = jp.evaluate(lambda s, xb: nnx.merge(graphdef, s)(xb), state, x, y)
  got = jp.evaluate(None, module, x, y)
  assert got.accuracy == want.accuracy and got.loss == pytest.approx(want.loss, rel=1e-6)
  logits = x @ np.asarray(module.kernel[...]) + np.asarray(module.bias[...])
  assert got.accuracy == pytest.approx(np.mean(logits.argmax(-1) == y))
  with pytest.raises(TypeError, match="apply_fn: an nnx.Module is not called with a state"):
    jp.evaluate(module, state, x, y)

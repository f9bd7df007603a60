
import numpy as np
import pytest

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

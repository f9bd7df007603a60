import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxprune as jp


def _mlp(widths=(20, 16, 3)):
  keys = jax.random.split(jax.random.key(0), len(widths) - 1)
  params = {f"fc{i}": {"kernel": jax.random.normal(k, (a, b))} for i, (k, a, b) in
            enumerate(zip(keys, widths[:-1], widths[1:]))}

  def apply_fn(p, x):
    for i in range(len(widths) - 1):
      x = x @ p[f"fc{i}"]["kernel"]
      x = jnp.tanh(x) if i < len(widths) - 2 else x
    return x
  return params, apply_fn


def test_flops_are_two_per_multiply_accumulate_and_fall_only_when_shrunk():
  params, apply_fn = _mlp()
  x = jnp.ones((8, 20))
  masked = jp.magnitude(params, 100).params
  small, small_apply = _mlp((20, 8, 3))
  report = jp.size_report({"dense": (apply_fn, params), "mask": (apply_fn, masked), "shrunk": (small_apply, small)},
                          x, repeats=3)
  dense, mask, shrunk = report.rows
  macs = 20 * 16 + 16 * 3
  assert dense.flops == pytest.approx(2 * macs, rel=0.05) and dense.parameters == macs == dense.nonzero
  assert mask.parameters == macs and mask.nonzero == 100 and mask.flops == dense.flops   # masks keep the arrays
  assert shrunk.parameters == 20 * 8 + 8 * 3 and shrunk.flops == pytest.approx(2 * shrunk.parameters, rel=0.05)
  assert all(r.latency_ms > 0 and r.batch == 8 for r in report.rows)
  table = str(report)
  assert "| shrunk |" in table and "184 (0.50x)" in table


def test_nnx_module_and_bad_input():
  module = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
  size = jp.measure_size(None, module, jnp.ones((5, 4)), repeats=2)
  assert size.parameters == 4 * 2 + 2 and size.flops >= 2 * 8
  with pytest.raises(ValueError, match="models"):
    jp.size_report({}, jnp.ones((5, 4)))
  with pytest.raises(ValueError, match="repeats"):
    jp.measure_size(None, module, jnp.ones((5, 4)), repeats=0)
  with pytest.raises(ValueError, match="apply_fn"):
    jp.measure_size(None, {"w": jnp.ones(3)}, jnp.ones((5, 4)))
  # one example without its batch axis: the output has no batch axis to divide the FLOPs by
  with pytest.raises(ValueError, match=r"inputs: FLOPs are per example .* of size 4, .* returned shape \(2,\)"):
    jp.measure_size(None, module, jnp.ones(4))
  with pytest.raises(TypeError) as failed:   # wrong features: the model's own error, with a note naming the call
    jp.size_report({"small": module}, jnp.ones((5, 3)))
  assert any("jaxprune.size_report" in note for note in getattr(failed.value, "__notes__", ["jaxprune.size_report"]))

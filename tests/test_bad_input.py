"""Issue 16's measured silent cases: each is now a clear error naming the argument, or a correct finite result."""
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp
from jaxprune import ot


def _mlp():
  keys = jax.random.split(jax.random.key(0), 2)
  params = {"fc1": {"kernel": jax.random.normal(keys[0], (6, 8))}, "fc2": {"kernel": jax.random.normal(keys[1], (8, 3))}}
  apply_fn = lambda p, x: jax.nn.relu(x @ p["fc1"]["kernel"]) @ p["fc2"]["kernel"]   # noqa: E731
  x = jax.random.normal(jax.random.key(1), (16, 6))
  return params, apply_fn, x


@pytest.mark.parametrize("relative", [True, False])
def test_entropic_plans_are_finite_for_zero_and_constant_costs(relative):
  for cost in (jnp.zeros((5, 3)), jnp.full((5, 3), 2.0)):
    plan, info = ot.entropic_plan(cost, jnp.full(5, 0.2), jnp.full(3, 1 / 3), 0.1, relative=relative)
    np.testing.assert_allclose(plan, np.full((5, 3), 1 / 15), atol=1e-6)   # the product plan: every coupling is optimal
  plan, _ = ot.entropic_plan_1d(jnp.ones(8), jnp.ones(8), 1.0, relative=True)
  np.testing.assert_allclose(plan, np.full((8, 8), 1 / 64), atol=1e-6)


def test_integer_and_half_precision_inputs_are_computed_in_float32():
  y = jnp.arange(6)
  ref, _ = ot.entropic_plan_1d(y.astype(jnp.float32), y[::-1].astype(jnp.float32), 1.0)
  for dtype in (jnp.int32, jnp.float16, jnp.bfloat16):
    plan, info = ot.entropic_plan_1d(y.astype(dtype), y[::-1].astype(dtype), 1.0)
    assert plan.dtype == jnp.float32 and float(plan.sum()) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(plan, ref, atol=1e-3 if dtype != jnp.int32 else 1e-7)


def test_sinkhorn_at_its_iteration_cap_warns_or_raises_and_rounding_is_an_option():
  y, z = jax.random.normal(jax.random.key(0), (2, 64)) * 30.0
  opts = ot.SinkhornOptions(max_iterations=20, momentum=False)
  plan, info = ot.entropic_plan_1d(y, z, 1e-2, options=opts)
  assert not bool(info.converged) and float(info.sinkhorn_error) > float(info.marginal_error)
  with pytest.warns(ot.ConvergenceWarning, match="max_iterations=20"):
    ot.report_convergence(info, opts, "test")
  with pytest.raises(RuntimeError, match="max_iterations=20"):
    ot.report_convergence(info, opts._replace(strict=True), "test")
  raw, raw_info = ot.entropic_plan_1d(y, z, 1e-2, options=opts._replace(round_to_marginals=False))
  assert float(raw_info.marginal_error) == pytest.approx(float(info.sinkhorn_error), rel=1e-5)
  params, apply_fn, x = _mlp()
  strict = ot.SinkhornOptions(max_iterations=10, threshold=1e-12, momentum=False, strict=True)
  with pytest.raises(RuntimeError, match="EWR stage 1, iteration 0: Sinkhorn stopped"):   # the IHT step
    jp.ewr(params, (x, jnp.arange(16) % 3), 20, apply_fn=apply_fn, eps=1e-4, stages=3, show_progress=False,
           sinkhorn=strict, official=True)
  with pytest.raises(RuntimeError, match="EWR stage 0, refit 0: Sinkhorn stopped"):     # the refit's plan
    jp.ewr(params, (x, jnp.arange(16) % 3), 20, apply_fn=apply_fn, eps=1e-4, stages=3, show_progress=False,
           sinkhorn=strict)
  # without strict, the warning points at the user's call, not at a frame inside jaxprune
  for official in (True, False):
    with pytest.warns(ot.ConvergenceWarning, match="EWR stage [0-9]") as record:
      jp.ewr(params, (x, jnp.arange(16) % 3), 20, apply_fn=apply_fn, eps=1e-4, stages=3, show_progress=False,
             sinkhorn=strict._replace(strict=False), official=official)
    assert {w.filename for w in record if w.category is ot.ConvergenceWarning} == {__file__}


def test_budgets_are_checked_at_every_level():
  scores = jnp.arange(6.0)
  for k, err in ((9, ValueError), (-1, ValueError), (2.5, TypeError), (float("nan"), TypeError), (True, TypeError)):
    with pytest.raises(err, match="k"):
      jp.topk_mask(scores, k)
  assert int(jax.jit(jp.topk_mask)(scores, 3).sum()) == 3   # traced budgets still work
  with pytest.raises(ValueError, match="k=100"):
    jp.uniform_allocation(100, [10, 20])
  with pytest.raises(ValueError, match="sizes"):
    jp.uniform_allocation(3, [10, 0])
  params, _, _ = _mlp()
  with pytest.raises(ValueError, match="rounding"):
    jp.k_from_sparsity(params, 0.5, rounding="bogus")


def test_nan_weights_labels_out_of_range_and_bad_batch_sizes_are_errors():
  params, apply_fn, x = _mlp()
  bad = jax.tree.map(lambda a: a.at[0, 0].set(jnp.nan), params)
  with pytest.raises(ValueError, match="params holds NaN or inf at fc1/kernel"):
    jp.magnitude(bad, 10)
  y = jnp.arange(16, dtype=jnp.int32) % 3
  with pytest.raises(ValueError, match=r"batch labels must lie in \[0, 3\)"):
    jp.lr(params, (x, y + 1), 10, apply_fn=apply_fn, show_progress=False)   # 1-indexed labels
  with pytest.raises(ValueError, match="batch holds NaN"):
    jp.lr(params, (x.at[0, 0].set(jnp.nan), y), 10, apply_fn=apply_fn, signals="matrix_free", show_progress=False)
  for method in (jp.lr, jp.ewr):   # inputs without labels, under the default loss
    with pytest.raises(TypeError, match=r"batch: the default loss needs batch = \(x, y\).*array of shape \(16, 6\)"):
      method(params, x, 10, apply_fn=apply_fn, show_progress=False)
  with pytest.raises(ValueError, match=r"y must lie in \[0, 3\)"):
    jp.evaluate(apply_fn, params, x, y + 10)
  for size in (-4, 0):
    with pytest.raises(ValueError, match="batch_size"):
      jp.evaluate(apply_fn, params, x, y, batch_size=size)


def test_recovery_budgets_gradual_data_and_dead_channels():
  from jaxprune.methods._recovery import RecoveryOptions
  out = lambda p, h: h @ p   # noqa: E731
  for k, err in ((9, ValueError), (-1, ValueError), (0, ValueError), (2.5, TypeError)):
    with pytest.raises(err, match="k"):
      jp.recover_support(out, jnp.ones((6, 2)), jnp.ones((4, 6)), k, None, RecoveryOptions(iterations=2))
  assert int(jp.recover_support(out, jnp.ones((6, 2)), jnp.arange(24.0).reshape(4, 6), 4, None,
                                RecoveryOptions(iterations=2)).mask.sum()) == 4   # 2k > C is the official top-all
  params, apply_fn, x = _mlp()
  data = jp.data.Dataset(np.asarray(x.at[3, 0].set(jnp.nan)), np.zeros(16, np.int32))
  with pytest.raises(ValueError, match="data holds NaN"):
    jp.gradual_prune(params, data, pruner="magnitude", loss_fn=None, apply_fn=apply_fn, target_sparsity=0.5,
                     key=jax.random.key(0), stages=2, n_examples=8, show_progress=False)
  dead = {"fc1": {"kernel": jnp.zeros((6, 8))}, "fc2": {"kernel": jnp.zeros((8, 3))}}   # every channel dead
  res = jp.intra_fusion(dead, None, 0.5, apply_fn=apply_fn, batch=x, solver="entropic", show_progress=False)
  assert all(bool(jnp.isfinite(a).all()) for a in jax.tree_util.tree_leaves(res.params))


def test_a_model_that_fails_on_the_example_says_which_call_and_shapes():
  """Inputs without the example axis, or with other features: the model's own error gets a note
  naming the traced call and the shapes given (Python 3.11+ notes; on 3.10 the error alone)."""
  params, apply_fn, x = _mlp()
  groups = jp.groups(apply_fn, params, x[:1])
  y = jnp.arange(16) % 3
  calls = {"jaxprune.groups": lambda: jp.groups(apply_fn, params, x[:1, :4]),
           "for the default loss": lambda: jp.lr(params, (x[:, :4], y), 10, apply_fn=apply_fn, show_progress=False),
           "read hidden activations": lambda: jp.ispasp(params, groups, 0.5, apply_fn=apply_fn, batch=x[:, :4],
                                                        show_progress=False)}
  for what, call in calls.items():
    with pytest.raises(TypeError) as info:   # jnp's matmul shape error
      call()
    if sys.version_info >= (3, 11):
      note = next(n for n in info.value.__notes__ if n.startswith("jaxprune:"))
      assert what in note and ("(1, 4)" in note or "(16, 4)" in note), note


def test_an_nnx_module_given_as_apply_fn_with_a_state_is_an_error_that_says_what_to_pass():
  """``reestimate_batchnorm(module, result.params, x)`` called ``module(state, x)``: a TypeError from
  the module's ``__call__``. Every method that takes ``apply_fn`` now says to pass the module as params."""
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.fc, self.bn, self.out = nnx.Linear(4, 6, rngs=rngs), nnx.BatchNorm(6, rngs=rngs), nnx.Linear(6, 2, rngs=rngs)

    def __call__(self, x):
      return self.out(nnx.relu(self.bn(self.fc(x))))

  module = Net(nnx.Rngs(0))
  module.eval()
  x = jax.random.normal(jax.random.key(0), (8, 4))
  y = jnp.arange(8) % 2
  state = nnx.state(module)
  calls = [lambda: jp.reestimate_batchnorm(module, state, x), lambda: jp.groups(module, state, x[:1]),
           lambda: jp.lr(state, (x, y), 10, apply_fn=module, show_progress=False),
           lambda: jp.ispasp(state, None, 0.5, apply_fn=module, batch=x, show_progress=False)]
  for call in calls:
    with pytest.raises(TypeError, match="apply_fn: an nnx.Module is not called with a state; pass the module"):
      call()
  assert jp.reestimate_batchnorm(None, module, x)["bn"]["mean"][...].shape == (6,)   # the right call


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp
from jaxprune import signals
from jaxprune import training as loops
from jaxprune.data import Dataset
from jaxprune.models import mlpnet
from helpers import linen_variables


@pytest.mark.parametrize("inner", [optax.sgd(0.1, momentum=0.9), optax.adamw(1e-2, weight_decay=0.1)])
def test_pruned_weights_stay_exactly_zero(inner):
  v = linen_variables()
  params = v["params"]
  res = jp.magnitude(params, 20)
  tx = loops.keep_pruned_at_zero(inner)            # masks from params != 0
  state = tx.init(res.params)
  p = res.params
  rng = np.random.default_rng(0)
  for _ in range(5):
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), p)
    updates, state = tx.update(grads, state, p)
    p = optax.apply_updates(p, updates)
  rep = jp.sparsity_report(p)
  assert rep.nonzero == 20
  for (path, a), (_, b) in zip(jp.leaves_with_paths(res.params), jp.leaves_with_paths(p)):
    if path.endswith("kernel"):
      kept = np.asarray(a) != 0
      assert np.all(np.asarray(b)[~kept] == 0) and np.all(np.asarray(b)[kept] != 0)
    else:
      assert not np.array_equal(a, b)               # dense leaves do train


def test_given_masks_and_set_masks():
  params = linen_variables()["params"]
  masks = jp.magnitude(params, 10).masks
  tx = loops.keep_pruned_at_zero(optax.sgd(0.1), masks)
  state = tx.init(params)                           # params still dense: the first update zeroes them
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, state = tx.update(grads, state, params)
  assert jp.sparsity_report(optax.apply_updates(params, updates)).nonzero == 10
  state = loops.set_masks(state, jp.masks_like(params))
  updates, _ = tx.update(grads, state, params)
  assert jp.sparsity_report(optax.apply_updates(params, updates)).nonzero == jp.count_prunable(params)
  with pytest.raises(ValueError, match="needs params"):
    tx.update(grads, state)


def test_schedules():
  s = jp.sparsity_schedule(0.95, 14, "cubic", include_initial=True)
  assert s[0] == 0.0 and s[-1] == pytest.approx(0.95) and all(a < b for a, b in zip(s, s[1:]))
  assert s[1] == pytest.approx(0.95 * (1 - (1 - 1 / 13) ** 3))   # official: s_T + (s_0 - s_T)(1 - (t-1)/(T-1))^3
  lin = jp.sparsity_schedule(0.9, 9, "linear")
  np.testing.assert_allclose(lin, [0.1 * t for t in range(1, 10)])
  poly = jp.polynomial_sparsity(0.9, 10, 110, power=3)
  assert poly(0) == 0.0 and poly(110) == pytest.approx(0.9) and poly(60) == pytest.approx(0.9 * (1 - 0.5 ** 3))
  with pytest.raises(ValueError, match="kind"):
    jp.sparsity_schedule(0.9, 3, "exp")
  with pytest.raises(ValueError, match="stages"):
    jp.sparsity_schedule(0.9, 0)


def test_gradual_driver_on_mnist(mlpnet_variables, mnist_test, data_dir):
  train = jp.data.load("mnist", "train", data_dir=data_dir, limit=2000)
  test = Dataset(mnist_test.x[:2000], mnist_test.y[:2000])
  model = mlpnet()
  loss = signals.classification_loss(model.apply)
  evaluate = lambda v: {"accuracy": jp.evaluate(model.apply, v, test.x, test.y).accuracy}
  # the official mask-only LR step, whose pruned weights fine-tuning must recover from
  out = loops.gradual_prune(mlpnet_variables, train, pruner=jp.pruner_for("lr", official=True), loss_fn=loss,
                            target_sparsity=0.9, stages=3, n_examples=100, batch_size=100,
                            key=jax.random.key(0), evaluate_fn=evaluate, show_progress=False)
  assert [h.k for h in out.history] == [32360, jp.k_from_sparsity(mlpnet_variables, 0.9 * (1 - 0.5 ** 3)), 3236]
  assert jp.sparsity_report(out.params).nonzero <= 3236 and jp.count_kept(out.masks) == 3236
  # fine-tuning recovers accuracy lost by pruning at the last stage
  assert out.history[-1].after_finetune["accuracy"] > out.history[-1].after_prune["accuracy"]
  with pytest.raises(TypeError, match="key"):
    loops.gradual_prune(mlpnet_variables, train, pruner="magnitude", loss_fn=loss,
                        target_sparsity=0.5)
  with pytest.raises(TypeError, match="key"):
    loops.gradual_prune(mlpnet_variables, train, pruner="magnitude", loss_fn=loss, target_sparsity=0.5, key=None)
  with pytest.raises(ValueError, match="unknown method 'nope'"):
    loops.gradual_prune(mlpnet_variables, train, pruner="nope", loss_fn=loss, target_sparsity=0.5,
                        key=jax.random.key(0))


class _Interrupted(Exception):
  pass


def test_an_interrupted_gradual_run_resumes_to_the_uninterrupted_result(mlpnet_variables, data_dir, tmp_path):
  train = jp.data.load("mnist", "train", data_dir=data_dir, limit=600)
  loss = signals.classification_loss(mlpnet().apply)
  kw = dict(pruner="lr", loss_fn=loss, target_sparsity=0.9, stages=4, n_examples=64, batch_size=100,
            key=jax.random.key(3), optimizer=optax.sgd(1e-3, momentum=0.9), show_progress=False)
  whole = loops.gradual_prune(mlpnet_variables, train, **kw)
  calls = []

  def stop_in_stage_3(params):
    calls.append(1)
    if len(calls) == 5:   # after_prune of stage 3: stages 1 and 2 are finished and saved
      raise _Interrupted
    return {}

  with pytest.raises(_Interrupted):
    loops.gradual_prune(mlpnet_variables, train, checkpoint_dir=tmp_path, evaluate_fn=stop_in_stage_3, **kw)
  resumed = loops.gradual_prune(mlpnet_variables, train, checkpoint_dir=tmp_path, **kw)
  assert [h.stage for h in resumed.history] == [1, 2, 3, 4]
  for a, b in zip(jax.tree_util.tree_leaves(resumed.params), jax.tree_util.tree_leaves(whole.params)):
    np.testing.assert_array_equal(a, b)
  assert jp.count_kept(resumed.masks) == jp.count_kept(whole.masks)
  again = loops.gradual_prune(mlpnet_variables, train, checkpoint_dir=tmp_path, **kw)   # finished: nothing to do
  np.testing.assert_array_equal(jax.tree_util.tree_leaves(again.params)[0], jax.tree_util.tree_leaves(whole.params)[0])
  with pytest.raises(ValueError, match="other arguments"):
    loops.gradual_prune(mlpnet_variables, train, checkpoint_dir=tmp_path, **dict(kw, target_sparsity=0.8))


def _key_free(tree):
  """Leaves as numpy, random keys as their data."""
  return [np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
          for x in jax.tree_util.tree_leaves(tree)]


def test_gradual_fine_tunes_only_trainable_leaves_of_nnx_and_linen_models(tmp_path):
  """An NNX CNN with BatchNorm and Dropout (its state holds an integer RNG count and a key, which
  jax.grad refuses: the driver raised TypeError) and a linen one with batch_stats under adamw's
  weight decay: fine-tuning changes the parameters only, masks mirror the whole tree, and an
  interrupted NNX run with checkpoints resumes to the uninterrupted result."""
  from flax import nnx
  import flax.linen as nn

  class CNN(nnx.Module):
    def __init__(self, rngs):
      self.conv, self.bn = nnx.Conv(1, 4, (3, 3), rngs=rngs), nnx.BatchNorm(4, rngs=rngs)
      self.drop, self.fc = nnx.Dropout(0.2, rngs=rngs), nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
      return self.fc(self.drop(nnx.relu(self.bn(self.conv(x))).mean((1, 2))))

  rng = np.random.default_rng(0)
  train = Dataset(rng.normal(size=(96, 6, 6, 1)).astype(np.float32), (np.arange(96) % 3).astype(np.int32))
  module = CNN(nnx.Rngs(0))
  module.eval()
  dense = nnx.state(module)
  kw = dict(pruner="magnitude", loss_fn=None, target_sparsity=0.5, stages=3, n_examples=32, batch_size=32,
            key=jax.random.key(1), optimizer=optax.adamw(1e-2, weight_decay=0.5), show_progress=False)
  whole = loops.gradual_prune(module, train, **kw)
  jp.check_masks(whole.params, whole.masks)
  assert jp.count_kept(whole.masks) == jp.count_prunable(dense) - jp.count_prunable(dense) // 2
  for name in ("mean", "var"):
    np.testing.assert_array_equal(whole.params["bn"][name][...], dense["bn"][name][...])
  np.testing.assert_array_equal(whole.params["drop"]["rngs"]["count"][...], dense["drop"]["rngs"]["count"][...])
  assert not np.array_equal(whole.params["bn"]["scale"][...], dense["bn"]["scale"][...])   # a parameter: trained

  calls = []

  def stop_in_stage_3(params):
    calls.append(1)
    if len(calls) == 5:
      raise _Interrupted
    return {}

  with pytest.raises(_Interrupted):
    loops.gradual_prune(module, train, checkpoint_dir=tmp_path, evaluate_fn=stop_in_stage_3, **kw)
  resumed = loops.gradual_prune(module, train, checkpoint_dir=tmp_path, **kw)
  for a, b in zip(_key_free(resumed.params), _key_free(whole.params)):
    np.testing.assert_array_equal(a, b)

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(4, (3, 3))(x))).mean((1, 2)))

  net = Net()
  v = net.init(jax.random.key(0), train.x[:1])
  v = {"params": v["params"], "batch_stats": jax.tree.map(lambda a: a + 0.5, v["batch_stats"])}
  res = loops.gradual_prune(v, train, **dict(kw, loss_fn=None), apply_fn=net.apply)
  jp.check_masks(res.params, res.masks)
  for a, b in zip(jax.tree_util.tree_leaves(res.params["batch_stats"]), jax.tree_util.tree_leaves(v["batch_stats"])):
    np.testing.assert_array_equal(a, b)   # adamw's weight decay would have shrunk them

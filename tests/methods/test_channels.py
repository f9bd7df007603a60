"""Default channel pruning: budgets, importances against numpy, the ResNet20 checkpoint on real data."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp
from helpers import compilations
from jaxprune import models

CIFAR = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)


@pytest.fixture(scope="module")
def resnet20_checkpoint(checkpoint_dir):
  v = jp.load_resnet20(f"{checkpoint_dir}/resnet20_cifar10.npz")
  return v, jp.groups(models.resnet20().apply, v, CIFAR)


def numpy_l1(variables, group, p=1):
  """Torch-Pruning's MagnitudeImportance written out on NHWC kernels: mean over kernels, / mean."""
  per_layer = []
  for m in group.members:
    if m.kind not in ("kernel", "depthwise"):
      continue
    w = np.abs(np.asarray(jp.trees.get_leaf(variables, m.path), np.float64)) ** p
    w = np.moveaxis(w, m.axis, 0)
    per_layer.append(w.reshape(w.shape[0], -1).sum(1))
  imp = np.mean(per_layer, axis=0)
  return imp / imp.mean()


def test_l1_and_l2_importance_match_numpy(resnet20_checkpoint):
  v, groups = resnet20_checkpoint
  for i in (0, 4, 8, 11):   # residual groups (several producers and consumers) and an inner group
    np.testing.assert_allclose(jp.magnitude_importance(v, groups[i], 1), numpy_l1(v, groups[i]), rtol=1e-5)
    np.testing.assert_allclose(jp.magnitude_importance(v, groups[i], 2), numpy_l1(v, groups[i], 2), rtol=1e-5)


def test_prune_channels_keeps_floor_budget_and_the_top_channels(resnet20_checkpoint):
  v, groups = resnet20_checkpoint
  res = jp.prune_channels(v, groups, 0.3, fold_bn=False, mode="mask", rounding="truncate", show_progress=False)
  default = jp.prune_channels(v, groups, 0.3, fold_bn=False, mode="mask", show_progress=False)
  for i, g in enumerate(groups):
    assert res.kept[i].size == int(g.size * 0.7) == res.info["groups"][i]["m"]          # official truncation
    assert default.kept[i].size == g.size - int(g.size * 0.3) == default.info["groups"][i]["m"]   # prune floor(s n)
  # group 0 is scored first, on the unpruned tree
  imp0 = numpy_l1(v, groups[0])
  np.testing.assert_array_equal(res.kept[0], np.sort(np.argsort(imp0, kind="stable")[-res.kept[0].size:]))
  # group 1 is scored after group 0 was pruned (its consumer layer3_2/conv2 lost output channels)
  after0 = jp.write_channels(v, groups[0], res.kept[0])
  imp1 = numpy_l1(after0, groups[1])
  np.testing.assert_array_equal(res.kept[1], np.sort(np.argsort(imp1, kind="stable")[-res.kept[1].size:]))


def _scored_on_written_tree(v, groups, sparsity, importance, mode, official=False):
  """prune_channels scoring every group on the tree written group by group (a callable importance
  takes that path); the reference for the default l1/l2 path, which never writes the tree."""
  p = 1 if importance == "l1" else 2
  return jp.prune_channels(v, groups, sparsity, importance=lambda vv, g: jp.magnitude_importance(vv, g, p),
                           mode=mode, official=official, show_progress=False)


def _assert_same_result(a, b):
  assert a.kept.keys() == b.kept.keys()
  for k in a.kept:
    np.testing.assert_array_equal(a.kept[k], b.kept[k])
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  for x, y in zip(jax.tree.leaves(a.masks), jax.tree.leaves(b.masks), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_default_l1_l2_without_writing_the_tree_match_scoring_the_written_tree(resnet20_checkpoint):
  """The default path reduces each kernel once and zeroes removed channels in the reductions;
  scoring the tree written group by group must keep the same channels and give the same tree."""
  v, groups = resnet20_checkpoint
  for importance, mode, official in (("l1", "shrink", False), ("l2", "mask", False), ("l1", "mask", True),
                                     ("l1", "shrink", True), ("l2", "shrink", True)):
    got = jp.prune_channels(v, groups, 0.5, importance=importance, mode=mode, official=official, show_progress=False)
    _assert_same_result(got, _scored_on_written_tree(v, groups, 0.5, importance, mode, official))


def test_magnitude_scores_follow_removals_on_flatten_and_shared_axes():
  """Hand-made groups: a flatten consumer (3 rows per channel) and two groups splitting one axis
  (rows no channel of a group owns keep their factor 1). Scores agree with magnitude_importance
  on the written tree at every step, and so does the whole prune."""
  from jaxprune.structure.importance import MagnitudeScores
  rng = np.random.default_rng(0)
  v = {"conv": {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32)},
       "d1": {"kernel": rng.normal(size=(12, 6)).astype(np.float32), "bias": rng.normal(size=6).astype(np.float32)},
       "d2": {"kernel": rng.normal(size=(6, 3)).astype(np.float32)}}
  flat = np.arange(12).reshape(3, 4).T   # NHWC flatten of (1, 3, 4): channel c owns rows c, c + 4, c + 8
  head = lambda rows: np.asarray(rows)[:, None]
  groups = [
      jp.make_group(v, [("conv/kernel", 3)], [jp.Member("d1/kernel", 0, "consumer", "kernel", flat)], size=4),
      jp.make_group(v, [jp.Member("d1/kernel", 1, "producer", "kernel", head(range(4))),
                        jp.Member("d1/bias", 0, "producer", "bias", head(range(4)))],
                    [jp.Member("d2/kernel", 0, "consumer", "kernel", head(range(4)))], size=4),
      jp.make_group(v, [jp.Member("d1/kernel", 1, "producer", "kernel", head([4, 5]))],
                    [jp.Member("d2/kernel", 0, "consumer", "kernel", head([4, 5]))], size=2)]
  for p in (1, 2):
    scores, written = MagnitudeScores(v, groups, p), v
    for g, keep in zip(groups, (np.array([1, 3]), np.array([0, 2]), np.array([1]))):
      np.testing.assert_allclose(scores(g), jp.magnitude_importance(written, g, p), rtol=1e-6)
      scores.remove(g, np.isin(np.arange(g.size), keep))
      written = jp.write_channels(written, g, keep)
    for mode in ("shrink", "mask"):
      importance = "l1" if p == 1 else "l2"
      got = jp.prune_channels(v, groups, 0.5, importance=importance, mode=mode, show_progress=False)
      _assert_same_result(got, _scored_on_written_tree(v, groups, 0.5, importance, mode))


def test_pruned_resnet20_rebuilt_from_shrunk_params_matches_mask_mode(resnet20_checkpoint, data_dir):
  v, groups = resnet20_checkpoint
  test = jp.data.load("cifar10_png5k", "test", data_dir=data_dir, source="local")
  x = jnp.asarray(test.x[:32])
  shrunk = jp.prune_channels(v, groups, 0.3, rounding="truncate", show_progress=False)
  masked = jp.prune_channels(v, groups, 0.3, mode="mask", rounding="truncate", show_progress=False)
  small = models.CifarResNet.from_params(shrunk.params)
  assert small.stage_widths == (11, 22, 44) and small.hidden_widths == (11,) * 3 + (22,) * 3 + (44,) * 3
  np.testing.assert_allclose(small.apply(shrunk.params, x), models.resnet20().apply(masked.params, x),
                             atol=1e-4, rtol=1e-4)
  for a, b in zip(shrunk.kept.values(), masked.kept.values()):
    np.testing.assert_array_equal(a, b)
  # masks mark exactly the removed channels of the original tree
  kernel = jp.trees.get_leaf(masked.masks, "params/layer3_0/conv1/kernel")
  assert kernel.shape == (3, 3, 32, 64)
  assert int(kernel.sum()) == 9 * 22 * 44
  assert int(kernel.any(axis=(0, 1, 3)).sum()) == 22 and int(kernel.any(axis=(0, 1, 2)).sum()) == 44


def test_real_accuracy_after_pruning_one_inner_group(resnet20_checkpoint, data_dir):
  v, groups = resnet20_checkpoint
  test = jp.data.load("cifar10_png5k", "test", data_dir=data_dir, source="local")
  model = models.resnet20()
  dense = jp.evaluate(model.apply, v, test.x, test.y, batch_size=500).accuracy
  same = jp.prune_channels(v, groups, 0.0, show_progress=False)
  assert jp.evaluate(model.apply, same.params, test.x, test.y, batch_size=500).accuracy == dense
  half = jp.prune_channels(v, groups, {11: 0.5}, show_progress=False)
  small = models.CifarResNet.from_params(half.params)
  acc = jp.evaluate(small.apply, half.params, test.x, test.y, batch_size=500).accuracy
  assert 0.85 < acc < dense   # half of layer1_0's inner channels removed by l1: a small, real loss


def test_taylor_importance_matches_numpy():
  model = models.MLP(widths=(6, 5), num_classes=3)
  v = model.init(jax.random.key(0), jnp.zeros((1, 4)))
  loss = jp.classification_loss(model.apply)
  rng = np.random.default_rng(0)
  batches = [(jnp.asarray(rng.normal(size=(8, 4)), jnp.float32), jnp.asarray(rng.integers(0, 3, 8))) for _ in range(3)]
  grads = jp.taylor_grads(loss, v, batches, show_progress=False)
  manual = [jax.grad(loss)(v, b) for b in batches]
  g = jp.groups(model.apply, v, jnp.zeros((1, 4)))[1]          # fc1 -> fc2, 6 channels
  w1, w2 = (np.asarray(v["params"][k]["kernel"]) for k in ("fc1", "fc2"))
  g1, g2 = (sum(np.asarray(m["params"][k]["kernel"]) for m in manual) for k in ("fc1", "fc2"))
  ref = (np.abs(w1 * g1).sum(0) + np.abs(w2 * g2).sum(1)) / 2
  np.testing.assert_allclose(jp.taylor_importance(v, grads, g), ref / ref.mean(), rtol=1e-4)
  res = jp.prune_channels(v, [g], 0.5, importance="taylor", loss_fn=loss, batches=batches, show_progress=False)
  np.testing.assert_array_equal(res.kept[0], np.sort(np.argsort(ref)[-3:]))


def test_random_and_callable_importance():
  model = models.MLP(widths=(10,), num_classes=3)
  v = model.init(jax.random.key(0), jnp.zeros((1, 4)))
  g = jp.groups(model.apply, v, jnp.zeros((1, 4)))
  a = jp.prune_channels(v, g, 0.4, importance="random", key=jax.random.key(3), show_progress=False)
  b = jp.prune_channels(v, g, 0.4, importance="random", key=jax.random.key(3), show_progress=False)
  np.testing.assert_array_equal(a.kept[0], b.kept[0])
  assert a.kept[0].size == 6
  c = jp.prune_channels(v, g, 0.4, importance=lambda variables, group: np.arange(group.size), show_progress=False)
  np.testing.assert_array_equal(c.kept[0], np.arange(4, 10))


def test_prune_channels_bad_input():
  model = models.MLP(widths=(10,), num_classes=3)
  v = model.init(jax.random.key(0), jnp.zeros((1, 4)))
  g = jp.groups(model.apply, v, jnp.zeros((1, 4)))
  for bad in (1.0, -0.1, True, "0.5", jnp.ones(2) / 2, jnp.asarray(True), float("nan")):
    with pytest.raises(ValueError, match="sparsity"):
      jp.prune_channels(v, g, bad, show_progress=False)
  # a concrete 0-d array is a number (jnp.float32(0.5) was rejected before)
  for same in (jnp.float32(0.5), np.asarray(0.5), {0: jnp.asarray(0.5, jnp.bfloat16)}):
    np.testing.assert_array_equal(jp.prune_channels(v, g, same, show_progress=False).kept[0],
                                  jp.prune_channels(v, g, 0.5, show_progress=False).kept[0])
  with pytest.raises(ValueError, match="keeps no channel"):
    jp.prune_channels(v, g, 0.95, rounding="truncate", show_progress=False)   # int(10 * 0.05) = 0
  assert jp.prune_channels(v, g, 0.95, show_progress=False).kept[0].size == 1   # prunes floor(9.5) = 9
  with pytest.raises(IndexError, match="sparsity: group 3"):
    jp.prune_channels(v, g, {3: 0.5}, show_progress=False)
  with pytest.raises(ValueError, match="not prunable"):
    jp.prune_channels(v, [dataclasses.replace(g[0], prunable=False, reason="test")], 0.5, show_progress=False)
  with pytest.raises(ValueError, match="mode"):
    jp.prune_channels(v, g, 0.5, mode="cut", show_progress=False)
  with pytest.raises(ValueError, match="importance must be one of"):
    jp.prune_channels(v, g, 0.5, importance="l3", show_progress=False)
  with pytest.raises(ValueError, match="needs grads="):
    jp.prune_channels(v, g, 0.5, importance="taylor", show_progress=False)
  with pytest.raises(ValueError, match="needs a jax.random key"):
    jp.prune_channels(v, g, 0.5, importance="random", show_progress=False)
  with pytest.raises(TypeError, match="no option 'which'"):
    jp.prune_channels(v, g, 0.5, which=0, show_progress=False)
  with pytest.raises(TypeError, match="groups must be"):
    jp.prune_channels(v, ["fc1"], 0.5, show_progress=False)


def test_round_to_keeps_multiples_of_eight_in_every_structured_method():
  model = models.resnet20()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 32, 32, 3)), jnp.float32)
  v = model.init(jax.random.key(0), x[:1])
  groups = jp.groups(model.apply, v, CIFAR)
  assert [jp.n_kept_channels(n, 0.3, round_to=8) for n in (16, 32, 64)] == [16, 24, 48]
  assert [jp.n_kept_channels(n, 0.3) for n in (16, 32, 64)] == [12, 23, 45]
  assert jp.n_kept_channels(10, 0.9, round_to=8) == 8 and jp.n_kept_channels(6, 0.5, round_to=8) == 6   # at most n
  results = {"prune_channels": jp.prune_channels(v, groups, 0.3, round_to=8, show_progress=False),
             "intra_fusion": jp.intra_fusion(v, groups, 0.3, round_to=8, show_progress=False),
             "ispasp": jp.ispasp(v, groups, 0.3, apply_fn=model.apply, batch=x, round_to=8, show_progress=False)}
  for name, r in results.items():
    assert {i: len(k) for i, k in r.kept.items()} == {i: jp.n_kept_channels(groups[i].size, 0.3, round_to=8)
                                                      for i in r.kept}, name
    small = models.CifarResNet.from_params(r.params)
    assert all(w % 8 == 0 for w in list(small.stage_widths) + list(small.hidden_widths)), name
  with pytest.raises(ValueError, match="round_to"):
    jp.prune_channels(v, groups, 0.3, round_to=0)


def test_structured_calls_on_host_trees_compile_nothing():
  """A tree in host memory is scored, folded, mapped, cut and masked in numpy: a first call at
  shapes no other test uses compiles no program (each eager jnp op used to compile once per
  shape). The equivalence of the numpy and jitted paths is tested in test_surgery."""
  import flax.linen as nn

  class OddNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(13, (3, 3))(x)))
      x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(11, (3, 3))(x)))
      return nn.Dense(5)(x.mean((1, 2)))

  model, x = OddNet(), jnp.ones((1, 9, 9, 3))
  v = model.init(jax.random.key(3), x)
  g = jp.groups(model.apply, v, x)
  assert compilations(lambda: jp.prune_channels(v, g, 0.5, show_progress=False))[1] == []
  assert compilations(lambda: jp.intra_fusion(v, g, 0.4, show_progress=False))[1] == []
  assert compilations(lambda: jp.prune_channels(v, g, 0.3, mode="mask", show_progress=False))[1] == []
  # repair runs the model: its passes compile, once each, whatever the number of layers corrected
  xs = jax.random.normal(jax.random.key(4), (24, 9, 9, 3))
  names = compilations(lambda: jp.prune_channels(v, g, 0.5, repair=xs, apply_fn=model.apply, show_progress=False))[1]
  assert len(names) == len(set(names)) and len(names) <= 6, names

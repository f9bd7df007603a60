"""Surgery (shrink vs mask, fusion maps), BatchNorm folding and default channel pruning."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax.linen as nn
import jaxprune as jp
from jaxprune import models

CIFAR = (2, 32, 32, 3)


def randomized(variables, seed=1):
  """Random BatchNorm statistics, offsets and scales so that folding and masking are not trivial."""
  leaves, tree = jax.tree_util.tree_flatten_with_path(variables)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = []
  for (path, x), k in zip(leaves, keys):
    name = jp.trees.path_str(path).rsplit("/", 1)[-1]
    if name == "var":
      x = jax.random.uniform(k, x.shape, minval=0.5, maxval=2.0)
    elif name in ("mean", "bias"):
      x = 0.3 * jax.random.normal(k, x.shape)
    elif name == "scale":
      x = jax.random.uniform(k, x.shape, minval=0.5, maxval=1.5)
    out.append(x.astype(leaves[len(out)][1].dtype))
  return jax.tree_util.tree_unflatten(tree, out)


MODELS = {
    "resnet20": (models.resnet20, CIFAR, models.CifarResNet.from_params),
    "vgg11_bn": (models.vgg11_bn, CIFAR, models.VGG.from_params),
    "resnet18": (models.resnet18, CIFAR, models.CifarResNet.from_params),
    "mobilenet_v1": (models.MobileNetV1, CIFAR, models.MobileNetV1.from_params),
    "mlp": (lambda: models.MLP(widths=(12, 8)), (2, 20), models.MLP.from_params),
}


@pytest.fixture(scope="module", params=list(MODELS))
def model_case(request):
  make, shape, rebuild = MODELS[request.param]
  model = make()
  v = randomized(model.init(jax.random.key(0), jnp.zeros(shape)))
  x = jax.random.normal(jax.random.key(2), shape)
  yield request.param, model, v, x, rebuild, jp.groups(model.apply, v, x)
  jax.clear_caches()   # one model's compilations at a time: keeps the suite's peak memory down


def test_masking_equals_removing_channels(model_case):
  name, model, v, x, rebuild, groups = model_case
  rng = np.random.default_rng(0)
  masked, plans = v, []
  for g in groups:
    keep = np.sort(rng.choice(g.size, max(1, g.size // 2), replace=False))
    masked = jp.write_channels(masked, g, keep)
    plans.append((g, keep))
  shrunk = jp.shrink_channels(masked, plans)
  out_mask = model.apply(masked, x)
  out_shrunk = rebuild(shrunk).apply(shrunk, x)
  np.testing.assert_allclose(out_shrunk, out_mask, atol=1e-4, rtol=1e-4)
  assert not np.allclose(out_mask, model.apply(v, x), atol=1e-3)   # pruning did change the model
  # every group lost exactly half its channels in every member
  leaves = dict(jp.trees.leaves_with_paths(shrunk))
  for g, keep in plans:
    for m in g.members:
      rows = 1 if m.index is None else m.index.shape[1]
      other = 0 if m.index is None else np.shape(masked_leaf(masked, m.path))[m.axis] - g.size * rows
      assert leaves[m.path].shape[m.axis] == keep.size * rows + other


def test_cutting_each_group_as_it_goes_equals_one_cut_at_the_end(model_case):
  """``write_kept`` cuts the axes a group owns whole as it writes them (its kept rows computed
  directly) and leaves the others for one cut at the end: the same tree as ``write_channels`` on
  every group and one ``shrink_channels``, with random fusion maps and unsorted ``keep``."""
  from jaxprune.structure.surgery import write_kept
  name, model, v, x, rebuild, groups = model_case
  rng = np.random.default_rng(3)
  full = cut = jax.tree.map(np.asarray, v)
  plans, rest_plans = [], []
  for g in groups:
    keep = rng.permutation(g.size)[:max(1, g.size // 2)]
    t = rng.uniform(size=(keep.size, g.size)).astype(np.float32)
    full = jp.write_channels(full, g, keep, t)
    cut, rest = write_kept(cut, g, keep, t)
    plans.append((g, keep))
    rest_plans.append((rest, keep))
  assert_same_trees(jp.shrink_channels(cut, rest_plans), jp.shrink_channels(full, plans))


def test_write_kept_defers_the_members_read_through_a_mapping():
  """A flatten-style member (several rows per channel) and an offset into a concatenated axis are
  written at full size and returned for the final cut; the plain members are cut at once."""
  from jaxprune.structure.surgery import write_kept
  rng = np.random.default_rng(1)
  rows = rng.permutation(12).reshape(4, 3)
  tree = {"a": {"kernel": rng.normal(size=(2, 12)).astype(np.float32)},
          "b": {"kernel": rng.normal(size=(12, 3)).astype(np.float32)},
          "c": {"kernel": rng.normal(size=(3, 3, 5, 4)).astype(np.float32), "bias": rng.normal(size=4).astype(np.float32)},
          "d": {"kernel": rng.normal(size=(7, 2)).astype(np.float32)}}
  g = jp.make_group(tree, [jp.Member("a/kernel", 1, "producer", "kernel", rows), ("c/kernel", 3), ("c/bias", 0)],
                    [jp.Member("b/kernel", 0, "consumer", "kernel", rows),
                     jp.Member("d/kernel", 0, "consumer", "kernel", np.arange(2, 6)[:, None])], size=4)
  keep, t = np.array([3, 0]), rng.uniform(size=(2, 4)).astype(np.float32)
  cut, rest = write_kept(tree, g, keep, t)
  assert [m.path for m in rest.members] == ["a/kernel", "b/kernel", "d/kernel"]
  assert cut["c"]["kernel"].shape == (3, 3, 5, 2) and cut["d"]["kernel"].shape == (7, 2)
  np.testing.assert_allclose(cut["c"]["bias"], (t @ tree["c"]["bias"])[[1, 0]], rtol=1e-6)
  assert_same_trees(jp.shrink_channels(cut, [(rest, keep)]),
                    jp.shrink_channels(jp.write_channels(tree, g, keep, t), [(g, keep)]))


def assert_same_trees(got, want):
  got, want = jp.trees.leaves_with_paths(got), jp.trees.leaves_with_paths(want)
  assert [p for p, _ in got] == [p for p, _ in want]
  for (path, a), (_, b) in zip(got, want):
    assert np.shape(a) == np.shape(b), path
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(b).max())), err_msg=path)


def masked_leaf(tree, path):
  return jp.trees.get_leaf(tree, path)


def test_folded_batchnorm_equals_unfolded(model_case):
  name, model, v, x, rebuild, groups = model_case
  if not groups.norms:      # the MLP has no BatchNorm: folding is a no-op
    assert name == "mlp"
    for (_, a), (_, b) in zip(jp.trees.leaves_with_paths(v), jp.trees.leaves_with_paths(jp.fold_batchnorm(v, groups))):
      np.testing.assert_array_equal(a, b)
    return
  ref = model.apply(v, x)
  folded = jp.fold_batchnorm(v, groups)
  np.testing.assert_allclose(model.apply(folded, x), ref, atol=2e-5 * float(jnp.abs(ref).max()) + 1e-5)
  official = jp.fold_batchnorm(v, groups, include_eps=False)
  err = float(jnp.abs(model.apply(official, x) - ref).max())
  assert err < 1e-3 * float(jnp.abs(ref).max())
  link = groups.norms[0]
  assert float(jp.trees.get_leaf(official, link.var)[0]) == 1.0
  assert float(jp.trees.get_leaf(folded, link.var)[0]) == pytest.approx(1 - link.eps)


def test_fold_matches_the_formula():
  model = models.vgg11_bn()
  v = randomized(model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  g = jp.groups(model.apply, v, jnp.zeros((1, 32, 32, 3)))
  link = next(l for l in g.norms if l.kernel == "params/conv3/kernel")
  assert link.kernel_bias == "params/conv3/bias" and link.eps == pytest.approx(1e-5)
  get = lambda tree, p: np.asarray(jp.trees.get_leaf(tree, p), np.float64)
  s = get(v, link.scale) / np.sqrt(get(v, link.var) + 1e-5)
  folded = jp.fold_batchnorm(v, g)
  np.testing.assert_allclose(get(folded, link.kernel), get(v, link.kernel) * s, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(get(folded, link.kernel_bias),
                             (get(v, link.kernel_bias) - get(v, link.mean)) * s + get(v, link.offset), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(get(folded, link.offset), 0.0)
  # host trees fold in numpy; traced (or device) trees in one jitted function: the same numbers
  for include_eps in (True, False):
    host = jp.fold_batchnorm(v, g, include_eps=include_eps)
    traced = jax.jit(lambda t: jp.fold_batchnorm(t, g, include_eps=include_eps))(v)
    for (path, a), (_, b) in zip(jp.trees.leaves_with_paths(host), jp.trees.leaves_with_paths(traced)):
      assert a.dtype == b.dtype, path
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=path)


def test_batchnorm_scales_are_the_factors_the_fold_applies():
  """Default pruning's official preset scores the folded tree from these factors without writing
  it: each must be exactly what fold_batchnorm multiplies its kernel by, along the right axis."""
  from jaxprune.structure.surgery import batchnorm_scales
  model = models.vgg11_bn()
  v = jax.tree.map(np.asarray, randomized(model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))))
  g = jp.groups(model.apply, v, jnp.zeros((1, 32, 32, 3)))
  for include_eps in (True, False):
    scales = batchnorm_scales(v, g, include_eps=include_eps)
    folded = jp.fold_batchnorm(v, g, include_eps=include_eps)
    assert set(scales) == {link.kernel for link in g.norms}
    for path, (axis, s) in scales.items():
      w = np.asarray(jp.trees.get_leaf(v, path))
      shape = [1] * w.ndim
      shape[axis] = -1
      np.testing.assert_array_equal(np.asarray(jp.trees.get_leaf(folded, path)), w * s.reshape(shape))
  no_eps = [dataclasses.replace(link, eps=None) for link in g.norms]
  with pytest.raises(ValueError, match="eps: the epsilon"):
    batchnorm_scales(v, no_eps)


def test_fold_keeps_every_leaf_dtype_of_a_bfloat16_model():
  """bfloat16 parameters with float32 statistics (flax's default): the folded bias stays bfloat16,
  host and traced alike, and still folds the statistics (to bfloat16 rounding)."""
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(8, (3, 3), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)(x)
      x = nn.BatchNorm(use_running_average=True, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)(x)
      return nn.Dense(3, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)(nn.relu(x).mean((1, 2)))

  net = Net()
  v = randomized(net.init(jax.random.key(0), jnp.zeros((1, 6, 6, 3))))
  g = jp.groups(net.apply, v, jnp.zeros((1, 6, 6, 3)))
  assert v["batch_stats"]["BatchNorm_0"]["mean"].dtype == jnp.float32
  for folded in (jp.fold_batchnorm(v, g), jax.jit(lambda t: jp.fold_batchnorm(t, g))(v)):
    for (path, a), (_, b) in zip(jp.trees.leaves_with_paths(v), jp.trees.leaves_with_paths(folded)):
      assert a.dtype == b.dtype, path
    stats, p = v["batch_stats"]["BatchNorm_0"], v["params"]
    s = np.asarray(p["BatchNorm_0"]["scale"], np.float64) / np.sqrt(np.asarray(stats["var"], np.float64) + 1e-5)
    ref = ((np.asarray(p["Conv_0"]["bias"], np.float64) - stats["mean"]) * s
           + np.asarray(p["BatchNorm_0"]["bias"], np.float64))
    np.testing.assert_allclose(np.asarray(folded["params"]["Conv_0"]["bias"], np.float64), ref, rtol=1e-2, atol=1e-2)
  res = jp.intra_fusion(v, g, 0.5, show_progress=False)
  assert {str(leaf.dtype) for leaf in jax.tree_util.tree_leaves(res.params["params"])} == {"bfloat16"}


def test_sparsity_zero_changes_nothing(model_case):
  name, model, v, x, rebuild, groups = model_case
  res = jp.prune_channels(v, groups, 0.0, fold_bn=False, show_progress=False)
  for (p, a), (_, b) in zip(jp.trees.leaves_with_paths(v), jp.trees.leaves_with_paths(res.params)):
    np.testing.assert_array_equal(a, b, err_msg=p)
  assert all(k.size == g.size for k, g in zip(res.kept.values(), groups))
  folded = jp.prune_channels(v, groups, 0.0, show_progress=False)
  ref = model.apply(v, x)
  np.testing.assert_allclose(model.apply(folded.params, x), ref, atol=2e-5 * float(jnp.abs(ref).max()) + 1e-5)


def test_fusion_map_on_an_mlp_matches_numpy():
  model = models.MLP(widths=(6,), num_classes=3)
  v = model.init(jax.random.key(0), jnp.zeros((1, 4)))
  g = jp.groups(model.apply, v, jnp.zeros((1, 4)))[0]
  keep = np.array([4, 1])      # any order: row k belongs to keep[k]
  t = np.random.default_rng(0).uniform(size=(2, 6)).astype(np.float32)
  out = jp.fuse_channels(v, g, keep, t, mode="shrink")
  p = {k: np.asarray(x) for k, x in v["params"]["fc1"].items()}
  q = np.asarray(v["params"]["fc2"]["kernel"])
  order = np.argsort(keep)       # shrunk channels come in sorted keep order
  np.testing.assert_allclose(out["params"]["fc1"]["kernel"], (p["kernel"] @ t.T)[:, order], rtol=1e-5)
  np.testing.assert_allclose(out["params"]["fc1"]["bias"], (t @ p["bias"])[order], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(out["params"]["fc2"]["kernel"], (t @ q)[order], rtol=1e-5)
  # a 0/1 selection map is plain pruning
  sel = np.eye(6, dtype=np.float32)[keep]
  a = jp.fuse_channels(v, g, keep, sel)
  b = jp.select_channels(v, g, keep)
  for (_, x1), (_, x2) in zip(jp.trees.leaves_with_paths(a), jp.trees.leaves_with_paths(b)):
    np.testing.assert_allclose(x1, x2)


def test_surgery_bad_input():
  model = models.MLP(widths=(6,), num_classes=3)
  v = model.init(jax.random.key(0), jnp.zeros((1, 4)))
  g = jp.groups(model.apply, v, jnp.zeros((1, 4)))[0]
  with pytest.raises(ValueError, match="keep is empty"):
    jp.select_channels(v, g, np.array([], int))
  with pytest.raises(ValueError, match="outside"):
    jp.select_channels(v, g, np.array([0, 6]))
  with pytest.raises(ValueError, match="repeated"):
    jp.select_channels(v, g, np.array([1, 1]))
  with pytest.raises(TypeError, match="int channel indices"):
    jp.select_channels(v, g, np.array([True, False]))
  with pytest.raises(ValueError, match="mode"):
    jp.select_channels(v, g, np.array([1]), mode="cut")
  with pytest.raises(ValueError, match=r"fusion_map must have shape \(m, n\) = \(2, 6\)"):
    jp.fuse_channels(v, g, np.array([1, 2]), np.ones((6, 2)))
  shrunk = jp.select_channels(v, g, np.array([1, 2]))
  with pytest.raises(ValueError, match="already shrunk"):
    jp.select_channels(shrunk, g, np.array([1, 2]))


def test_host_and_compiled_channel_sums_and_maps_agree():
  """Host trees score and map channels in numpy (nothing to compile); device trees use the jitted
  functions. Both agree, for a plain member and a flatten-style member (several rows per channel)."""
  from jaxprune.structure.importance import _channel_sums, _sums_jit
  from jaxprune.structure.surgery import _axis_scale, _channel_rows, _map_rows, _times_along, _times_along_jit
  _map_rows_host = functools.partial(_channel_rows, np)
  rng = np.random.default_rng(0)
  leaf = rng.normal(size=(3, 3, 12, 5)).astype(np.float32)
  grad = rng.normal(size=leaf.shape).astype(np.float32)
  coef = rng.normal(size=(4, 4)).astype(np.float32)
  scale = np.array([1.0, 0.0, 1.0, 0.0], np.float32)
  for axis, pos in ((3, np.arange(5)[:, None]), (2, np.arange(12).reshape(4, 3))):
    pos = pos.astype(np.int32)
    for kind in ("sum", 1, 2.0, "taylor"):
      np.testing.assert_allclose(_channel_sums(np, leaf, grad, pos, axis, kind),
                                 np.asarray(_sums_jit(jnp.asarray(leaf), jnp.asarray(grad), pos, axis, kind)),
                                 rtol=1e-5, atol=1e-5)
    rows = np.moveaxis(leaf, axis, 0)[pos]
    np.testing.assert_allclose(_channel_sums(np, leaf, None, pos, axis, "sum"),
                               rows.reshape(pos.shape[0], -1).sum(1), rtol=1e-5)
    n = leaf.shape[axis]   # the whole axis as a plain member: host GEMMs (a zero row, as a silenced channel's) against jnp
    plain = rng.normal(size=(n, n)).astype(np.float32)
    plain[2] = 0.0
    got = _map_rows_host(leaf, plain, np.arange(n)[:, None].astype(np.int32), axis, True)
    np.testing.assert_allclose(got, np.asarray(_map_rows(jnp.asarray(leaf), plain, np.arange(n)[:, None].astype(np.int32),
                                                         axis, True)), rtol=1e-5, atol=1e-5)
    assert not np.take(got, 2, axis=axis).any()
    if pos.shape[0] == 4:
      np.testing.assert_allclose(_map_rows_host(leaf, coef, pos, axis, False),
                                 np.asarray(_map_rows(jnp.asarray(leaf), coef, pos, axis, False)), rtol=1e-5, atol=1e-5)
      expected = np.moveaxis(leaf, axis, 0).copy()   # independent: scale each channel's rows in a loop
      for k in range(4):
        expected[pos[k]] *= scale[k]
      vec = _axis_scale(scale, pos, leaf.shape[axis])
      np.testing.assert_array_equal(_times_along(np, leaf, vec, axis), np.moveaxis(expected, 0, axis))
      np.testing.assert_array_equal(np.asarray(_times_along_jit(jnp.asarray(leaf), vec, axis)),
                                    np.moveaxis(expected, 0, axis))
  from jaxprune.structure.importance import _abs_sums, _abs_sums_jit
  for axes in ((3,), (2, 3), (0, 2)):
    for p in (1, 2.0):
      expected = (np.abs(leaf.astype(np.float64)) ** p).sum(axis=tuple(a for a in range(4) if a not in axes))
      np.testing.assert_allclose(_abs_sums(np, leaf, axes, p), expected, rtol=1e-5)
      np.testing.assert_allclose(np.asarray(_abs_sums_jit(jnp.asarray(leaf), axes, p)), expected, rtol=1e-5)
  plain = rng.normal(size=(4, 6)).astype(np.float32)
  np.testing.assert_allclose(_map_rows_host(plain, coef, np.arange(4, dtype=np.int32)[:, None], 0, True),
                             coef @ plain, rtol=1e-5, atol=1e-5)
  middle = rng.normal(size=(3, 3, 4, 5)).astype(np.float32)   # a consumer's axis: kept rows only
  sparse = coef * np.array([1, 0, 1, 0], np.float32)[:, None]  # two channels removed (zero rows)
  for c in (coef, sparse):
    np.testing.assert_allclose(_map_rows_host(middle, c, np.arange(4, dtype=np.int32)[:, None], 2, True),
                               np.einsum("kj,abjc->abkc", c, middle), rtol=1e-5, atol=1e-5)
  last = rng.normal(size=(3, 3, 2, 4)).astype(np.float32)   # channels last: the GEMM on a view
  for axis in (3, -1):
    np.testing.assert_allclose(_map_rows_host(last, coef, np.arange(4, dtype=np.int32)[:, None], axis, True),
                               np.einsum("kj,abcj->abck", coef, last), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(_map_rows(jnp.asarray(last), coef, np.arange(4, dtype=np.int32)[:, None],
                                                    axis, True)), np.einsum("kj,abcj->abck", coef, last),
                               rtol=1e-5, atol=1e-5)

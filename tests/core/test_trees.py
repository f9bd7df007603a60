import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxprune as jp
from jaxprune.core.masks import masks_from_flat
from helpers import linen_variables, nnx_split


def test_default_selection_linen_is_kernels_only():
  v = linen_variables()
  assert jp.prunable_paths(v) == ("params/Dense_0/kernel", "params/Dense_1/kernel", "params/Dense_2/kernel")
  assert jp.count_prunable(v) == 4 * 6 + 6 * 5 + 5 * 3


def test_default_selection_nnx_drops_value_suffix():
  _, params, _ = nnx_split()
  assert isinstance(params, nnx.State)
  assert jp.prunable_paths(params) == ("fc1/kernel", "fc2/kernel", "fc3/kernel")


@pytest.mark.parametrize("spec, expected", [
    (jp.Prunable(exclude=("*Dense_0*",)), ("Dense_1/kernel", "Dense_2/kernel")),
    (jp.Prunable(skip_first=True, skip_last=True), ("Dense_1/kernel",)),
    (jp.Prunable(skip_last=True), ("Dense_0/kernel", "Dense_1/kernel")),
    (["Dense_2/kernel"], ("Dense_2/kernel",)),
    (lambda path, leaf: path.endswith("bias"), ("BatchNorm_0/bias", "Dense_0/bias", "Dense_1/bias", "Dense_2/bias")),
])
def test_selection_options(spec, expected):
  params = linen_variables()["params"]
  assert jp.prunable_paths(params, spec) == expected


def test_skip_first_uses_natural_layer_order():
  params = {f"Dense_{i}": {"kernel": jnp.ones((2, 2))} for i in (0, 1, 2, 10)}
  # sorted dict order puts Dense_10 before Dense_2; the last layer is still Dense_10.
  assert jp.prunable_paths(params, jp.Prunable(skip_first=True, skip_last=True)) == ("Dense_1/kernel", "Dense_2/kernel")


def test_no_prunable_leaves_is_an_error():
  with pytest.raises(ValueError, match="no prunable leaves"):
    jp.prunable_paths({"bn": {"scale": jnp.ones(3)}})
  with pytest.raises(TypeError, match="prunable must be"):
    jp.prunable_paths({"a": {"kernel": jnp.ones((2, 2))}}, 3)


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_flatten_unflatten_roundtrip(kind):
  tree = linen_variables() if kind == "linen" else nnx_split()[1]
  w, spec = jp.flatten(tree)
  assert w.shape == (spec.size,) == (jp.count_prunable(tree),)
  # Independent reference: concatenating the kernels by hand.
  kernels = [x for p, x in jp.leaves_with_paths(tree) if p.endswith("kernel")]
  np.testing.assert_array_equal(w, np.concatenate([np.ravel(k) for k in kernels]))
  back = jp.unflatten(w * 2.0, tree, spec)
  assert type(back) is type(tree)
  for (p, a), (_, b) in zip(jp.leaves_with_paths(tree), jp.leaves_with_paths(back)):
    np.testing.assert_array_equal(b, 2 * a if p.endswith("kernel") else a)


def test_unflatten_checks_length_and_is_jittable():
  params = linen_variables()["params"]
  w, spec = jp.flatten(params)
  with pytest.raises(ValueError, match="expected"):
    jp.unflatten(w[:-1], params, spec)
  out = jax.jit(lambda w, t: jp.unflatten(w, t, spec))(jnp.zeros_like(w), params)
  assert all(float(jnp.abs(x).sum()) == 0 for p, x in jp.leaves_with_paths(out) if p.endswith("kernel"))


def test_host_results_are_placed_as_their_inputs():
  """Host paths (numpy, nothing compiled) return jax arrays placed as a jnp op would place them:
  uncommitted for uncommitted inputs (so they still mix with arrays sharded over a mesh), on the
  input's device when it is committed to one; the numbers equal the jnp computation."""
  tree = {"a": {"kernel": jnp.arange(6.0).reshape(2, 3)}, "b": {"kernel": jnp.ones((3, 1)) * -2.0}}
  w, spec = jp.trees.flatten(tree)
  assert not w.committed
  np.testing.assert_array_equal(w, jnp.concatenate([jnp.ravel(tree["a"]["kernel"]), jnp.ravel(tree["b"]["kernel"])]))
  back = jp.trees.unflatten(w * 2, tree, spec)
  np.testing.assert_array_equal(back["a"]["kernel"], tree["a"]["kernel"] * 2)
  assert not back["b"]["kernel"].committed and back["b"]["kernel"].shape == (3, 1)
  pinned = jax.tree.map(lambda x: jax.device_put(x, jax.devices()[0]), tree)
  w2, _ = jp.trees.flatten(pinned)
  assert w2.committed and w2.devices() == {jax.devices()[0]}
  keep = w > 2.0
  masks = masks_from_flat(keep, tree, spec)
  assert masks["b"]["kernel"].dtype == jnp.bool_ and not bool(masks["b"]["kernel"].any())
  out = jp.apply_masks(tree, masks)
  np.testing.assert_array_equal(out["a"]["kernel"], jnp.where(tree["a"]["kernel"] > 2.0, tree["a"]["kernel"], 0.0))
  assert not out["a"]["kernel"].committed


def test_to_devices_places_each_result_as_its_like():
  """Host results come back committed where their ``like`` was committed to a device, and
  uncommitted (in one transfer call) otherwise; values unchanged."""
  from jaxprune.core.trees import to_devices
  cpu = jax.devices("cpu")[0]
  likes = [jnp.zeros(2), jax.device_put(jnp.zeros(3), cpu), np.zeros(4)]
  values = [np.arange(2.0), np.arange(3.0), np.arange(4.0)]
  out = to_devices(values, likes)
  assert [x.committed for x in out] == [False, True, False]
  assert out[1].devices() == {cpu}
  for x, value in zip(out, values):
    np.testing.assert_array_equal(np.asarray(x), value)


def test_numpy_views_of_a_host_tree_are_placed_back_as_their_originals():
  """``as_numpy_tree`` gives numpy views of a host tree (no copy) and leaves any other tree as it
  is; ``placed_like`` places each numpy leaf whose original was a jax array as that one was
  (committed or not) and keeps numpy leaves numpy."""
  from jaxprune.core.trees import as_numpy_tree, placed_like
  cpu = jax.devices("cpu")[0]
  tree = {"a": jnp.arange(4.0), "b": jax.device_put(jnp.ones(3), cpu), "c": np.zeros(2)}
  views = as_numpy_tree(tree)
  assert all(isinstance(x, np.ndarray) for x in jax.tree_util.tree_leaves(views))
  assert views["a"].ctypes.data == tree["a"].unsafe_buffer_pointer()
  half = {"a": jnp.arange(4.0), "h": jnp.ones(2, jnp.bfloat16)}
  assert as_numpy_tree(half) is half   # bfloat16 stays with jax: the tree is left as it is
  back = placed_like(jax.tree.map(lambda x: x * 2, views), tree)
  assert isinstance(back["a"], jax.Array) and not back["a"].committed
  assert back["b"].committed and back["b"].devices() == {cpu}
  assert isinstance(back["c"], np.ndarray)
  np.testing.assert_array_equal(back["a"], np.arange(4.0) * 2)


def test_intra_fusion_returns_leaves_of_the_kind_it_was_given():
  """Intra-Fusion works on numpy views of a host tree and places its result once: jax leaves come
  back as jax arrays, numpy leaves as numpy, with the same values."""
  from jaxprune import models
  model = models.MLP(widths=(8, 6), num_classes=3)
  v = model.init(jax.random.key(0), jnp.zeros((1, 5)))
  g = jp.groups(model.apply, v, jnp.zeros((1, 5)))
  as_jax = jp.intra_fusion(v, g, 0.5, show_progress=False)
  as_numpy = jp.intra_fusion(jax.tree.map(np.asarray, v), g, 0.5, show_progress=False)
  for a, b in zip(jax.tree_util.tree_leaves(as_jax.params), jax.tree_util.tree_leaves(as_numpy.params)):
    assert isinstance(a, jax.Array) and isinstance(b, np.ndarray)
    np.testing.assert_array_equal(np.asarray(a), b)

"""i-SpaSP: the loop against a numpy port of the official set-based loop, sweeps, fixed points, units."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp
from jaxprune import models
from jaxprune.methods._recovery import RecoveryOptions, dense_sum, proxy, reduced_proxy, residual_sum_proxy

RELEASE_EACH_TEST = True   # each test compiles its own large programs (see conftest)


@dataclasses.dataclass(frozen=True)
class ModuleOutput:
  """A hashable output_fn from a standalone linen layer (the loop's static argument)."""
  module: nn.Module

  def __call__(self, params, hidden):
    return self.module.apply({"params": params}, hidden)


EPS = 1e-5


# ---- an independent float64 numpy port of the official prune_basic_block loop ----------------

def np_conv3x3(h, w):
  """SAME 3x3 convolution, stride 1: h (B, Y, X, C), w (3, 3, C, O)."""
  hp = np.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))
  y, x = h.shape[1:3]
  return sum(hp[:, dy:dy + y, dx:dx + x, :] @ w[dy, dx] for dy in range(3) for dx in range(3))


def np_conv3x3_input_grad(g, w, shape):
  """Gradient of <g, conv(h)> with respect to h."""
  out = np.zeros((shape[0], shape[1] + 2, shape[2] + 2, shape[3]))
  y, x = shape[1:3]
  for dy in range(3):
    for dx in range(3):
      out[:, dy:dy + y, dx:dx + x, :] += g @ w[dy, dx].T
  return out[:, 1:-1, 1:-1, :]


def np_reference(h, w, bias, bn, s, iterations, chunk, bn_mode, conv):
  """Official loop: sets, argsort descending, Python chunks; returns the sorted support."""
  h = np.asarray(h, np.float64)
  w = np.asarray(w, np.float64)
  layer = (lambda x, ww: np_conv3x3(x, ww)) if conv else (lambda x, ww: x @ ww)
  reduce_axes = (0, 1, 2) if conv else (0,)
  agg = h.sum(axis=reduce_axes)
  support = set()
  for _ in range(iterations):
    importance = np.zeros(h.shape[-1])
    for i in range(0, h.shape[0], chunk):
      hb = h[i:i + chunk]
      z = layer(hb, w) + bias
      if bn is None:
        u, scale = z, np.ones(z.shape[-1])
      else:
        scale = bn["scale"] / np.sqrt(bn["var"] + EPS)
        u = (z - bn["mean"]) * scale + bn["offset"]
      if support:
        idx = sorted(support)
        wp = w[..., idx, :]
        zp = layer(hb[..., idx], wp) + bias
        if bn is None:
          up = zp
        elif bn_mode == "eval":
          up = (zp - bn["mean"]) * scale + bn["offset"]
        else:   # a fresh torch BatchNorm in train mode: this chunk's statistics
          mu = zp.mean(axis=reduce_axes)
          var = zp.var(axis=reduce_axes)
          up = (zp - mu) / np.sqrt(var + EPS) * bn["scale"] + bn["offset"]
        v = u - up
      else:
        v = u
      gz = v * scale   # d(1/2 ||v||^2)/dz through the dense branch's eval-mode norm
      gh = np_conv3x3_input_grad(gz, w, hb.shape) if conv else gz @ w.T
      importance += gh.sum(axis=0).reshape(-1, h.shape[-1]).sum(axis=0)
    top = np.argsort(-importance, kind="stable")[:2 * s]
    indexer = np.array(sorted(set(top.tolist()) | support))
    best = np.argsort(-agg[indexer], kind="stable")[:s]
    support = set(indexer[best].tolist())
  return np.array(sorted(support))


def random_unit(conv, with_bn, seed=0, n=40, c=12, o=7):
  rng = np.random.default_rng(seed)
  shape = (n, 5, 5, c) if conv else (n, c)
  h = np.maximum(rng.normal(size=shape) + 0.3 * rng.normal(size=c), 0).astype(np.float32)
  w = rng.normal(size=(3, 3, c, o) if conv else (c, o)).astype(np.float32) / np.sqrt(c)
  bias = (np.zeros(o) if conv else rng.normal(size=o)).astype(np.float32)
  bn = None
  if with_bn:
    bn = {"scale": rng.uniform(0.5, 1.5, o), "offset": rng.normal(size=o), "mean": rng.normal(size=o),
          "var": rng.uniform(0.5, 2.0, o)}
    bn = {k: v.astype(np.float32) for k, v in bn.items()}
  if conv:
    module = nn.Conv(o, (3, 3), padding=((1, 1), (1, 1)), use_bias=False)
    params = {"kernel": jnp.asarray(w)}
  else:
    module = nn.Dense(o)
    params = {"kernel": jnp.asarray(w), "bias": jnp.asarray(bias)}
  norm = None if bn is None else jp.OutputNorm(*(jnp.asarray(bn[k]) for k in ("scale", "offset", "mean", "var")),
                                               jnp.asarray(EPS, jnp.float32))
  return dict(h=h, w=w, bias=bias, bn=bn, fn=ModuleOutput(module), params=params, norm=norm)


CASES = [(conv, bn, mode, proxy_kind) for conv in (False, True) for bn in (False, True)
         for mode in ("eval", "train") for proxy_kind in ("examples", "residual_sum", "reduced")
         if not (mode == "train" and (proxy_kind == "reduced" or not bn))]


@pytest.mark.parametrize("conv,with_bn,bn_mode,proxy_kind", CASES)
@pytest.mark.parametrize("keep", [0.1, 0.25, 0.4])
def test_selection_equals_numpy_reference_of_the_official_loop(conv, with_bn, bn_mode, proxy_kind, keep):
  u = random_unit(conv, with_bn, seed=int(keep * 100) + 7 * conv + 3 * with_bn)
  c = u["h"].shape[-1]
  s = int(c * keep)
  opts = RecoveryOptions(iterations=6, chunk_size=16, bn_mode=bn_mode, proxy=proxy_kind)
  got = jp.recover_support(u["fn"], u["params"], jnp.asarray(u["h"]), s, u["norm"], opts)
  ref = np_reference(u["h"], u["w"], u["bias"], u["bn"], s, 6, 16, bn_mode, conv)
  assert int(got.mask.sum()) == s
  np.testing.assert_array_equal(np.flatnonzero(np.asarray(got.mask)), ref)


def test_reduced_proxy_equals_per_example_proxy_for_any_support():
  u = random_unit(conv=True, with_bn=True, seed=3)
  h = jnp.asarray(u["h"])
  rng = np.random.default_rng(0)
  for mask in [np.zeros(12, bool), rng.random(12) < 0.3, rng.random(12) < 0.7]:
    mask = jnp.asarray(mask)
    full = proxy(u["fn"], u["params"], h, mask, u["norm"], chunk_size=16)
    red = reduced_proxy(u["fn"], u["params"], h.sum(0, keepdims=True), h.shape[0], mask, u["norm"])
    np.testing.assert_allclose(red, full, rtol=2e-4, atol=1e-3 * float(jnp.abs(full).max()))


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_residual_sum_proxy_equals_per_example_proxy_for_any_support(conv, bn_mode):
  # 40 examples in chunks of 16, 16 and 8: train-mode statistics per chunk, the last one partial
  u = random_unit(conv=conv, with_bn=True, seed=4)
  h = jnp.asarray(u["h"])
  dense = dense_sum(u["fn"], u["params"], h.sum(0, keepdims=True), h.shape[0], u["norm"])
  rng = np.random.default_rng(1)
  for mask in [np.zeros(12, bool), rng.random(12) < 0.3, rng.random(12) < 0.7]:
    mask = jnp.asarray(mask)
    full = proxy(u["fn"], u["params"], h, mask, u["norm"], chunk_size=16, bn_mode=bn_mode)
    summed = residual_sum_proxy(u["fn"], u["params"], h, mask, u["norm"], dense=dense, chunk_size=16,
                                bn_mode=bn_mode)
    np.testing.assert_allclose(summed, full, rtol=2e-4, atol=1e-4 * float(jnp.abs(full).max()))


def test_vmapped_sweep_equals_separate_calls(resnet20):
  v, model, x = resnet20
  unit = jp.two_layer_units(model.apply, v, x[:1])[-1]   # layer1_0: the first block
  hidden = unit.hidden_fn(v, x[:40])
  keeps = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
  recover = jax.jit(jp.recover_support, static_argnums=0, static_argnames="options")
  for proxy_kind in ("examples", "residual_sum", "reduced"):
    opts = RecoveryOptions(proxy=proxy_kind, chunk_size=16)
    swept = np.asarray(jp.ispasp_sweep(unit, v, hidden, [1 - r for r in keeps], proxy=proxy_kind, chunk_size=16,
                                       aggregate="signed_sum",
                                       rounding="truncate"))
    for row, r in zip(swept, keeps):
      one = recover(unit.output_fn, unit.params_fn(v), hidden, int(16 * r), unit.output_norm(v), options=opts)
      np.testing.assert_array_equal(row, np.asarray(one.mask))
      assert row.sum() == int(16 * r)


@pytest.mark.parametrize("conv", [False, True])
def test_fixed_point_stop_equals_the_full_iterations(conv):
  for seed in range(3):
    u = random_unit(conv, with_bn=True, seed=seed, c=24)
    h = jnp.asarray(u["h"])
    for s in (3, 6):
      full = jp.recover_support(u["fn"], u["params"], h, s, u["norm"], RecoveryOptions(iterations=20))
      # unrolled iterations that skip once fixed (per-example proxies on CPU), or a while_loop
      for proxy_kind, unroll in (("examples", None), ("examples", False), ("residual_sum", None), ("reduced", None)):
        early = jp.recover_support(u["fn"], u["params"], h, s, u["norm"],
                                   RecoveryOptions(iterations=20, stop_at_fixed_point=True, proxy=proxy_kind,
                                                   unroll=unroll))
        np.testing.assert_array_equal(early.mask, full.mask)
        assert not bool(full.changed) and not bool(early.changed)
        assert int(early.iterations) < 20


def test_support_is_monotone_in_aggregated_activation():
  u = random_unit(conv=False, with_bn=False, seed=5, c=30)
  h = jnp.asarray(u["h"])
  a = np.asarray(h.sum(0))
  totals = []
  for t in range(1, 8):
    m = jp.recover_support(u["fn"], u["params"], h, 5, None, RecoveryOptions(iterations=t)).mask
    totals.append(a[np.asarray(m)].sum())
  assert all(b >= x - 1e-6 for x, b in zip(totals, totals[1:]))


# ---- units and the whole-network driver ------------------------------------------------------

@pytest.fixture(scope="module")
def resnet20(checkpoint_dir, data_dir):
  v = jp.load_resnet20(f"{checkpoint_dir}/resnet20_cifar10.npz")
  test = jp.data.load("cifar10_png5k", "test", data_dir=data_dir, source="local")
  idx = np.random.default_rng(0).permutation(len(test.y))[:96]
  return v, models.resnet20(), jnp.asarray(test.x[idx])


def test_units_of_resnet20_mlpnet_and_mobilenet(resnet20, mlpnet_variables):
  v, model, x = resnet20
  every = jp.two_layer_units(model.apply, v, x[:1])
  units = [u for u in every if u.capture is not None]   # read by one layer
  assert [u.name for u in units] == [f"layer{s}_{b}/conv2" for s in (3, 2, 1) for b in (2, 1, 0)]
  assert all(u.norm.scale == f"params/{u.name.split('/')[0]}/bn2/scale" for u in units)
  assert all(u.affine and u.norm.eps == pytest.approx(1e-5) for u in units)
  streams = [u for u in every if u.capture is None]   # the residual streams: every reading layer at once
  assert [u.group_index for u in streams] == [0, 4, 8] and len(every) == 12
  assert streams[0].name == "fc + layer3_2/conv1 + layer3_1/conv1"
  mlp = jp.two_layer_units(models.mlpnet().apply, mlpnet_variables, jnp.zeros((1, 28, 28, 1)))
  assert [(u.name, u.size, u.norm) for u in mlp] == [("fc3", 20, None), ("fc2", 40, None)]
  mb = models.MobileNetV1(stem_width=8, widths=(16, 16, 32), strides=(1, 2, 1))
  mv = mb.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  mb_units = jp.two_layer_units(mb.apply, mv, jnp.zeros((1, 32, 32, 3)))
  # the pointwise convs read the depthwise channels; the classifier reads the last block's (after pooling)
  assert [u.name for u in mb_units] == ["fc", "block2/pw", "block1/pw", "block0/pw"]
  # the MobileNet hidden group holds the depthwise conv and both norms before the pointwise conv
  first = mb_units[-1]
  assert {m.kind for m in first.group.producers} >= {"kernel", "depthwise", "norm"}


class SkipConcat(nn.Module):
  """A U-Net step: the upsampled deep features joined with the skip features before one conv
  (and a BatchNorm after it)."""
  @nn.compact
  def __call__(self, x):
    skip = nn.relu(nn.Conv(4, (3, 3), name="skip")(x))
    deep = nn.relu(nn.Conv(6, (3, 3), strides=2, name="deep")(skip))
    up = jax.image.resize(deep, deep.shape[:1] + skip.shape[1:3] + deep.shape[3:], "nearest")
    joined = nn.Conv(5, (3, 3), name="join")(jnp.concatenate([up, skip], -1))
    joined = nn.BatchNorm(use_running_average=True, name="bn")(joined)
    return nn.Dense(2, name="head")(nn.relu(joined).mean((1, 2)))


def _skip_concat():
  model = SkipConcat()
  x = jax.random.normal(jax.random.key(1), (8, 8, 8, 3))
  v = model.init(jax.random.key(0), x[:1])
  stats = {"mean": 0.2 * jax.random.normal(jax.random.key(2), (5,)),
           "var": jax.random.uniform(jax.random.key(3), (5,), minval=0.5, maxval=2)}
  v = {"params": v["params"], "batch_stats": {"bn": stats}}
  v["params"]["bn"] = {"scale": jax.random.uniform(jax.random.key(4), (5,), minval=0.5, maxval=1.5),
                       "bias": jnp.ones(5)}
  return model, v, x


def _join_pre_activation(v, up, skip):
  """The joining conv (no norm) on the two parts, written out with flax's Conv."""
  return nn.Conv(5, (3, 3)).apply({"params": v["params"]["join"]}, jnp.concatenate([up, skip], -1))


def test_a_group_read_among_other_channels_of_a_concatenation_is_a_unit_of_its_share():
  """The joining conv reads the deep group's 6 channels among 10, and the skip group's 4 (the
  skip group is also read by the deep conv). Each unit's output, pruned minus dense, equals the
  joining layer's (after its BatchNorm) with those channels zeroed, minus the dense layer's:
  the other channels, the bias and the norm's shift cancel."""
  model, v, x = _skip_concat()
  groups = jp.groups(model.apply, v, x[:1])
  units = {u.group.name: u for u in jp.two_layer_units(model.apply, v, x[:1], groups)}
  _, state = model.apply(v, x, capture_intermediates=True, mutable=["intermediates"])
  inter = state["intermediates"]
  skip = jax.nn.relu(inter["skip"]["__call__"][0])
  deep = jax.nn.relu(inter["deep"]["__call__"][0])
  up = jax.image.resize(deep, deep.shape[:1] + skip.shape[1:3] + deep.shape[3:], "nearest")
  bn = v["params"]["bn"]["scale"] / jnp.sqrt(v["batch_stats"]["bn"]["var"] + 1e-5)
  dense = _join_pre_activation(v, up, skip)

  unit = units["params/deep"]
  hidden = unit.hidden_fn(v, x)
  np.testing.assert_allclose(hidden, up, rtol=1e-6)
  mask = jnp.array([1, 0, 1, 1, 0, 0], bool)
  ref = (_join_pre_activation(v, up * mask, skip) - dense) * bn
  np.testing.assert_allclose(unit.output(v, hidden, mask) - unit.output(v, hidden), ref, rtol=1e-4, atol=1e-5)

  unit = units["params/skip"]   # read by the joining conv (a share) and the deep conv (all of it)
  hidden = unit.hidden_fn(v, x)
  assert hidden.shape == (8, 64 + 64, 4)
  mask = jnp.array([0, 1, 1, 0], bool)
  out = unit.output(v, hidden, mask) - unit.output(v, hidden)
  ref_join = (_join_pre_activation(v, up, skip * mask) - dense) * bn
  ref_deep = (nn.Conv(6, (3, 3), strides=2).apply({"params": v["params"]["deep"]}, skip * mask)
              - inter["deep"]["__call__"][0])
  np.testing.assert_allclose(out[:, :64 * 5], ref_join.reshape(8, -1), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out[:, 64 * 5:], ref_deep.reshape(8, -1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("order", ["sequential", "parallel"])
def test_ispasp_prunes_a_concatenation_share_as_a_unit_given_by_hand(order):
  """The derived unit of the deep group keeps the channels that the same unit written by hand
  (its hidden activations and the joining conv's kernel rows, through make_unit) keeps."""
  model, v, x = _skip_concat()
  groups = jp.groups(model.apply, v, x[:1])
  i = [g.name for g in groups].index("params/deep")
  res = jp.ispasp(v, groups, {i: 0.5}, apply_fn=model.apply, batch=x, order=order, show_progress=False)
  assert res.info["skipped"] == {} and res.kept[i].size == 3

  def hidden_fn(variables, xx):
    _, state = model.apply(variables, xx, capture_intermediates=True, mutable=["intermediates"])
    deep = jax.nn.relu(state["intermediates"]["deep"]["__call__"][0])
    return jax.image.resize(deep, deep.shape[:1] + (8, 8) + deep.shape[3:], "nearest")

  def output_fn(p, h):   # the joining conv's share and its BatchNorm's scale (the rest cancels)
    z = jax.lax.conv_general_dilated(h, p["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return z * p["scale"]

  def params_fn(variables):
    bn = variables["params"]["bn"]["scale"] / jnp.sqrt(variables["batch_stats"]["bn"]["var"] + 1e-5)
    return {"kernel": variables["params"]["join"]["kernel"][:, :, :6], "scale": bn}

  by_hand = jp.make_unit(groups[i], hidden_fn, output_fn, affine=True, name="deep by hand", params_fn=params_fn)
  ref = jp.ispasp(v, [by_hand], 0.5, batch=x, show_progress=False)
  np.testing.assert_array_equal(res.kept[i], ref.kept["deep by hand"])
  shrunk = jp.ispasp(v, groups, 0.5, apply_fn=model.apply, batch=x, order=order, show_progress=False)
  assert shrunk.info["skipped"] == {} and shrunk.params["params"]["join"]["kernel"].shape == (3, 3, 3 + 2, 3)


def test_a_residual_stream_unit_outputs_every_reading_layer(resnet20):
  v, model, x = resnet20
  stream = next(u for u in jp.two_layer_units(model.apply, v, x[:1]) if u.group_index == 0)
  hidden = stream.hidden_fn(v, x[:8])
  assert hidden.shape == (8, 1 + 2 * 64, 64)   # pooled features for fc, then two 8x8 feature maps
  out = np.asarray(stream.output(v, hidden))
  _, state = model.apply(v, x[:8], capture_intermediates=True, mutable=["intermediates"])
  inter = state["intermediates"]
  bn1 = lambda block: np.asarray(inter[block]["bn1"]["__call__"][0]).reshape(8, -1)   # noqa: E731
  expected = np.concatenate([np.asarray(model.apply(v, x[:8])), bn1("layer3_2"), bn1("layer3_1")], axis=1)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
  masked = np.asarray(stream.output(v, hidden, jnp.arange(64) < 32))
  assert not np.allclose(masked, out)


@pytest.mark.parametrize("mode", ["shrink", "mask"])
def test_keep_ratio_one_changes_nothing(resnet20, mode):
  v, model, x = resnet20
  res = jp.ispasp(v, None, 0.0, apply_fn=model.apply, batch=x, rounding="truncate", mode=mode, show_progress=False)
  for a, b in zip(jax.tree_util.tree_leaves(res.params), jax.tree_util.tree_leaves(v)):
    np.testing.assert_array_equal(a, b)
  assert all(k.size == 16 or k.size == 32 or k.size == 64 for k in res.kept.values())


def test_sequential_prunes_each_unit_on_the_pruned_network(mlpnet_variables, mnist_test):
  model = models.mlpnet()
  x = jnp.asarray(mnist_test.x[:300])
  both = jp.ispasp(mlpnet_variables, None, 0.7, apply_fn=model.apply, batch=x, rounding="truncate", mode="mask", show_progress=False)
  # the same by hand: the shallow unit (group 1) first, then the deep one on the result
  first = jp.ispasp(mlpnet_variables, None, {1: 0.7}, apply_fn=model.apply, batch=x, rounding="truncate", mode="mask", show_progress=False)
  second = jp.ispasp(first.params, None, {0: 0.7}, apply_fn=model.apply, batch=x, rounding="truncate", mode="mask", show_progress=False)
  assert set(both.kept) == {0, 1}
  np.testing.assert_array_equal(both.kept[1], first.kept[1])
  np.testing.assert_array_equal(both.kept[0], second.kept[0])
  assert both.kept[0].size == 6 and both.kept[1].size == 12
  # one-shot: the deep unit sees dense activations instead
  oneshot = jp.ispasp(mlpnet_variables, None, 0.7, apply_fn=model.apply, batch=x, rounding="truncate", order="parallel", mode="mask", show_progress=False)
  np.testing.assert_array_equal(oneshot.kept[1], both.kept[1])
  dense_only = jp.ispasp(mlpnet_variables, None, {0: 0.7}, apply_fn=model.apply, batch=x, rounding="truncate", mode="mask", show_progress=False)
  np.testing.assert_array_equal(oneshot.kept[0], dense_only.kept[0])
  # one-shot errors are those of each unit on the dense network (fc2 is unit 1's layer and group 0's producer),
  # measured on the first error_examples (256 of the 300)
  unit = jp.two_layer_units(model.apply, mlpnet_variables, x[:1])[1]
  assert oneshot.info["units"][1]["error_examples"] == 256
  h = unit.hidden_fn(mlpnet_variables, x[:256])
  keep = np.zeros(40, bool)
  keep[oneshot.kept[1]] = True
  dense, pruned = unit.output(mlpnet_variables, h), unit.output(mlpnet_variables, h, jnp.asarray(keep))
  assert oneshot.info["units"][1]["relative_error"] == pytest.approx(
      float(jnp.linalg.norm(dense - pruned) / jnp.linalg.norm(dense)), rel=1e-5)
  # error_examples=None: all 300, in both orders
  h = unit.hidden_fn(mlpnet_variables, x)
  dense, pruned = unit.output(mlpnet_variables, h), unit.output(mlpnet_variables, h, jnp.asarray(keep))
  for order in ("parallel", "sequential"):
    every = jp.ispasp(mlpnet_variables, None, {1: 0.7}, apply_fn=model.apply, batch=x, rounding="truncate",
                      order=order, mode="mask", error_examples=None, show_progress=False)
    assert every.info["units"][1]["error_examples"] == 300
    assert every.info["units"][1]["relative_error"] == pytest.approx(
        float(jnp.linalg.norm(dense - pruned) / jnp.linalg.norm(dense)), rel=1e-5)


def test_oneshot_vmapped_units_equal_unit_by_unit(resnet20):
  v, model, x = resnet20
  x = x[:48]
  for proxy_kind, blocks in (("reduced", (1, 2, 3)), ("examples", (2,))):
    kw = dict(order="parallel", mode="mask", proxy=proxy_kind, chunk_size=32, rounding="truncate", show_progress=False)
    # reduced proxy: every group (nine blocks, three residual streams); per-example proxy: stage 3's
    # blocks only (its unrolled loop over three residual-stream readers costs a lot to compile)
    together = jp.ispasp(v, None, 0.6 if proxy_kind == "reduced" else {gi: 0.6 for gi in (1, 2, 3)},
                         apply_fn=model.apply, batch=x, **kw)
    assert len(together.kept) == (12 if proxy_kind == "reduced" else 3)
    for gi in blocks:   # stage 3 blocks share shapes: solved in one vmapped call above
      alone = jp.ispasp(v, None, {gi: 0.6}, apply_fn=model.apply, batch=x, **kw)
      np.testing.assert_array_equal(together.kept[gi], alone.kept[gi])


def test_shrunk_network_equals_masked_and_reports_the_unit_error(resnet20):
  v, model, x = resnet20
  res = jp.ispasp(v, None, 0.5, apply_fn=model.apply, batch=x, rounding="truncate", mode="shrink", show_progress=False)
  masked = jp.ispasp(v, None, 0.5, apply_fn=model.apply, batch=x, rounding="truncate", mode="mask", show_progress=False)
  small = models.CifarResNet.from_params(res.params)
  np.testing.assert_allclose(small.apply(res.params, x), model.apply(masked.params, x), rtol=1e-4, atol=1e-4)
  # the reported error of the first unit, recomputed by hand from its hidden activations
  unit = jp.two_layer_units(model.apply, v, x[:1])[-1]
  h = unit.hidden_fn(v, x)
  keep = np.zeros(16, bool)
  keep[res.kept[unit.group_index]] = True
  dense, pruned = unit.output(v, h), unit.output(v, h, jnp.asarray(keep))
  err = float(jnp.linalg.norm(dense - pruned) / jnp.linalg.norm(dense))
  assert res.info["units"][unit.group_index]["relative_error"] == pytest.approx(err, rel=1e-5)


def test_hand_made_unit_equals_the_derived_one(mlpnet_variables, mnist_test):
  model = models.mlpnet()
  v = mlpnet_variables
  x = jnp.asarray(mnist_test.x[:200])
  g = jp.make_group(v, producers=[("params/fc1/kernel", 1)], consumers=[("params/fc2/kernel", 0)])
  unit = jp.make_unit(g, hidden_fn=lambda vv, xx: jax.nn.relu(xx.reshape(len(xx), -1) @ vv["params"]["fc1"]["kernel"]),
                      output_fn=lambda p, h: h @ p["kernel"], params_fn=lambda vv: vv["params"]["fc2"], name="fc1")
  by_hand = jp.ispasp(v, [unit], 0.75, batch=x, rounding="truncate", mode="mask", show_progress=False)
  derived = jp.ispasp(v, None, {1: 0.75}, apply_fn=model.apply, batch=x, rounding="truncate", mode="mask", show_progress=False)
  np.testing.assert_array_equal(by_hand.kept["fc1"], derived.kept[1])
  # not marked affine: the per-example proxy; stopped at its fixed point, it keeps what all T iterations keep
  assert by_hand.info["units"]["fc1"]["proxy"] == "examples"
  full = jp.ispasp(v, [unit], 0.75, batch=x, rounding="truncate", mode="mask", stop_at_fixed_point=False,
                   show_progress=False)
  np.testing.assert_array_equal(full.kept["fc1"], by_hand.kept["fc1"])
  assert full.info["units"]["fc1"]["iterations"] == 20 > by_hand.info["units"]["fc1"]["iterations"]
  # hidden activations in uneven chunks (64, 64, 64, 8) give the same support; a NaN in any chunk is named
  for order in ("sequential", "parallel"):
    chunked = jp.ispasp(v, [unit], 0.75, batch=x, rounding="truncate", mode="mask", chunk_size=64, order=order,
                        show_progress=False)
    np.testing.assert_array_equal(chunked.kept["fc1"], by_hand.kept["fc1"])
    assert chunked.info["units"]["fc1"]["relative_error"] == pytest.approx(
        by_hand.info["units"]["fc1"]["relative_error"], rel=1e-4)
    with pytest.raises(ValueError, match="unit fc1: the hidden activations contain NaN or inf"):
      jp.ispasp(v, [unit], 0.75, batch=x.at[195, 3].set(jnp.nan), chunk_size=64, order=order, show_progress=False)


def test_train_mode_norm_runs_and_keeps_the_budget(resnet20):
  v, model, x = resnet20
  res = jp.ispasp(v, None, {3: 0.5}, apply_fn=model.apply, batch=x[:64], rounding="truncate", bn_mode="train", chunk_size=32, mode="mask", show_progress=False)
  (gi,) = res.kept
  assert res.kept[gi].size == 32 and res.info["units"][gi]["proxy"] == "residual_sum"
  # the summed residual's one pullback selects what per-example pullbacks select, iteration by iteration
  for stop in (True, False):
    step_by_step = jp.ispasp(v, None, {3: 0.5}, apply_fn=model.apply, batch=x[:64], rounding="truncate",
                             bn_mode="train", chunk_size=32, mode="mask", proxy="examples", stop_at_fixed_point=stop,
                             show_progress=False)
    np.testing.assert_array_equal(step_by_step.kept[gi], res.kept[gi])
    assert step_by_step.info["units"][gi]["iterations"] == (res.info["units"][gi]["iterations"] if stop else 20)


def test_bad_input_fails_clearly(resnet20, mlpnet_variables):
  v, model, x = resnet20
  for sparsity, match in [(1.0, "sparsity"), (-0.5, "sparsity"), (True, "sparsity"), (0.99, "keeps no channel"),
                          ({42: 0.5}, "unit 42")]:
    with pytest.raises((ValueError, IndexError), match=match):
      jp.ispasp(v, None, sparsity, apply_fn=model.apply, batch=x, rounding="truncate", show_progress=False)
  with pytest.raises(ValueError, match="order"):
    jp.ispasp(v, None, 0.5, apply_fn=model.apply, batch=x, order="oneshot", show_progress=False)
  for bad in (0, 2.5, True):
    with pytest.raises(ValueError, match="error_examples"):
      jp.ispasp(v, None, 0.5, apply_fn=model.apply, batch=x, error_examples=bad, show_progress=False)
  with pytest.raises(ValueError, match="bn_mode"):
    jp.ispasp(v, None, 0.5, apply_fn=model.apply, batch=x, rounding="truncate", bn_mode="frozen", show_progress=False)
  with pytest.raises(ValueError, match="reduced"):
    jp.ispasp(v, None, 0.5, apply_fn=model.apply, batch=x, rounding="truncate", bn_mode="train", proxy="reduced", show_progress=False)
  with pytest.raises(ValueError, match="iterations"):
    jp.ispasp(v, None, 0.5, apply_fn=model.apply, batch=x, rounding="truncate", iterations=0, show_progress=False)
  with pytest.raises(ValueError, match="batch"):
    jp.ispasp(v, None, 0.5, apply_fn=model.apply, batch=jnp.float32(1.0), rounding="truncate", show_progress=False)
  with pytest.raises(ValueError, match="NaN"):
    jp.ispasp(v, None, 0.5, apply_fn=model.apply, batch=x.at[0, 0, 0, 0].set(jnp.nan), rounding="truncate", show_progress=False)
  with pytest.raises(TypeError, match="groups"):
    jp.ispasp(v, [], 0.5, batch=x, show_progress=False)
  with pytest.raises(TypeError, match="apply_fn"):
    jp.ispasp(v, None, 0.5, batch=x, show_progress=False)
  g = jp.make_group(mlpnet_variables, producers=[("params/fc1/kernel", 1)], consumers=[("params/fc2/kernel", 0)])
  unit = jp.make_unit(g, hidden_fn=lambda vv, xx: xx[:, :39], output_fn=lambda p, h: h, name="bad")
  with pytest.raises(ValueError, match="expected"):
    jp.ispasp(mlpnet_variables, [unit], 0.5, batch=jnp.ones((4, 784)), rounding="truncate", show_progress=False)
  with pytest.raises(ValueError, match="affine"):
    jp.ispasp(mlpnet_variables, [unit], 0.5, batch=jnp.ones((4, 784)), rounding="truncate", proxy="reduced", show_progress=False)


class _LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(40, name="fc1")(x))
    x = nn.relu(nn.Dense(20, name="fc2")(x))
    return nn.Dense(3, name="fc3")(x)


def test_units_from_the_jaxpr_agree_across_model_forms():
  # One MLP as linen variables, as a pure function over its params dict and as an NNX module with the
  # same weights: the same units, the same outputs, the same kept channels.
  from flax import nnx
  x = jax.random.normal(jax.random.key(1), (64, 8))
  v = _LinenMLP().init(jax.random.key(0), x[:1])
  p = v["params"]

  def pure(params, xx):
    h = jax.nn.relu(xx @ params["fc1"]["kernel"] + params["fc1"]["bias"])
    h = jax.nn.relu(h @ params["fc2"]["kernel"] + params["fc2"]["bias"])
    return h @ params["fc3"]["kernel"] + params["fc3"]["bias"]

  class NNXMLP(nnx.Module):
    def __init__(self):
      rngs = nnx.Rngs(0)
      self.fc1, self.fc2, self.fc3 = nnx.Linear(8, 40, rngs=rngs), nnx.Linear(40, 20, rngs=rngs), nnx.Linear(20, 3, rngs=rngs)

    def __call__(self, xx):
      return self.fc3(nnx.relu(self.fc2(nnx.relu(self.fc1(xx)))))

  module = NNXMLP()
  for name in ("fc1", "fc2", "fc3"):
    getattr(module, name).kernel[...] = p[name]["kernel"]
    getattr(module, name).bias[...] = p[name]["bias"]
  forms = {"linen": (v, _LinenMLP().apply), "pure": (p, pure), "nnx": (module, None)}
  logits = _LinenMLP().apply(v, x)
  kept = {}
  for form, (params, apply_fn) in forms.items():
    tree = nnx.state(params) if form == "nnx" else params
    fn = (lambda s, xx: nnx.merge(nnx.graphdef(module), s)(xx)) if form == "nnx" else apply_fn
    units = jp.two_layer_units(fn, tree, x[:1])
    assert [u.size for u in units] == [20, 40]
    out = units[0].output(tree, units[0].hidden_fn(tree, x))   # fc3 reads group 0: its output is the logits
    np.testing.assert_allclose(out, logits, rtol=1e-5, atol=1e-5)
    res = jp.ispasp(params, None, 0.5, apply_fn=apply_fn, batch=x, mode="mask", show_progress=False)
    kept[form] = {g: k.tolist() for g, k in res.kept.items()}
  assert kept["linen"] == kept["pure"] == kept["nnx"]


def test_mlpnet_as_a_pure_function_and_as_an_nnx_module(mlpnet_variables, mnist_test):
  # Units come from the jaxpr, so i-SpaSP runs on any model form (no linen hooks).
  from flax import nnx
  p = mlpnet_variables["params"]

  def pure(params, xx):
    h = jax.nn.relu(xx.reshape(len(xx), -1) @ params["fc1"]["kernel"])
    h = jax.nn.relu(h @ params["fc2"]["kernel"])
    return h @ params["fc3"]["kernel"]

  class MLPNet(nnx.Module):
    def __init__(self):
      rngs = nnx.Rngs(0)
      self.fc1, self.fc2, self.fc3 = (nnx.Linear(a, b, use_bias=False, rngs=rngs)
                                      for a, b in ((784, 40), (40, 20), (20, 10)))

    def __call__(self, xx):
      return self.fc3(nnx.relu(self.fc2(nnx.relu(self.fc1(xx.reshape(len(xx), -1))))))

  module = MLPNet()
  for name in ("fc1", "fc2", "fc3"):
    getattr(module, name).kernel[...] = p[name]["kernel"]
  x, xt, yt = jnp.asarray(mnist_test.x[:1000]), jnp.asarray(mnist_test.x[5000:]), np.asarray(mnist_test.y[5000:])
  graphdef = nnx.graphdef(module)
  runs = {"pure": (p, pure, pure), "nnx": (module, None, lambda s, xx: nnx.merge(graphdef, s)(xx))}
  acc = lambda fn, params: float((np.asarray(fn(params, xt)).argmax(-1) == yt).mean())   # noqa: E731
  for form, (params, apply_fn, run) in runs.items():
    res = jp.ispasp(params, None, 0.5, apply_fn=apply_fn, batch=x, show_progress=False)
    assert {g: k.size for g, k in res.kept.items()} == {0: 10, 1: 20}, form
    rand = jp.prune_channels(params, None, 0.5, apply_fn=apply_fn, batch=x, importance="random",
                             key=jax.random.key(0), show_progress=False)
    assert acc(run, res.params) > acc(run, rand.params) + 0.05, form


def test_units_of_kernels_at_the_top_of_a_pure_jax_tree_are_named_by_them():
  """A pure-JAX model over {"w1", "b1", "w2"}: the unit reading the hidden group is named by its
  kernel, "w2" (the leaf name stripped left it nameless)."""
  params = {"w1": jax.random.normal(jax.random.key(0), (4, 8)), "b1": jnp.zeros(8),
            "w2": jax.random.normal(jax.random.key(1), (8, 3))}
  apply_fn = lambda p, x: jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"]   # noqa: E731
  x = jax.random.normal(jax.random.key(2), (16, 4))
  res = jp.ispasp(params, None, 0.5, apply_fn=apply_fn, batch=x, show_progress=False)
  assert res.info["units"][0]["name"] == "w2" and res.params["w2"].shape == (4, 3)

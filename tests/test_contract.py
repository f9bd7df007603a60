"""The contract every method keeps, checked alike on one small MLP in its three forms.

Forms: a pure-JAX function over a params dict, a Flax linen module's ``variables``, and a Flax
NNX module (passed as ``params``; its own apply function). For every method: the exact budget,
the same kind of tree out, no input mutated, the same bits twice (the second call compiling
nothing), ``official=True`` accepted and recorded, and the common ``info`` core.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxprune as jp
from helpers import compilations

WIDTHS = (8, 40, 20, 3)


def _pure():
  keys = jax.random.split(jax.random.key(0), 3)
  params = {f"fc{i + 1}": {"kernel": jax.random.normal(keys[i], (a, b)) / np.sqrt(a), "bias": jnp.zeros(b)}
            for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:]))}

  def apply_fn(p, x):
    h = jax.nn.relu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    h = jax.nn.relu(h @ p["fc2"]["kernel"] + p["fc2"]["bias"])
    return h @ p["fc3"]["kernel"] + p["fc3"]["bias"]
  return params, apply_fn


class _Linen(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(WIDTHS[1], name="fc1")(x))
    x = nn.relu(nn.Dense(WIDTHS[2], name="fc2")(x))
    return nn.Dense(WIDTHS[3], name="fc3")(x)


class _NNX(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(WIDTHS[0], WIDTHS[1], rngs=rngs)
    self.fc2 = nnx.Linear(WIDTHS[1], WIDTHS[2], rngs=rngs)
    self.fc3 = nnx.Linear(WIDTHS[2], WIDTHS[3], rngs=rngs)

  def __call__(self, x):
    return self.fc3(nnx.relu(self.fc2(nnx.relu(self.fc1(x)))))


def _form(name):
  """``(params, apply_fn or None, tree type the result must have)``."""
  if name == "pure":
    params, apply_fn = _pure()
    return params, apply_fn, dict
  if name == "linen":
    model = _Linen()
    return model.init(jax.random.key(0), jnp.ones((1, WIDTHS[0]))), model.apply, dict
  return _NNX(nnx.Rngs(0)), None, nnx.State


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.normal(size=(48, WIDTHS[0])), jnp.float32),
          jnp.asarray(rng.integers(0, WIDTHS[-1], 48), jnp.int32))


SPARSITY, CHANNEL_SPARSITY = 0.8, 0.3
UNSTRUCTURED = {
    "magnitude": (lambda p, b, k, f, **kw: jp.magnitude(p, k, **kw), jp.MagnitudeOptions),
    "random": (lambda p, b, k, f, **kw: jp.random(p, k, key=jax.random.key(3), **kw), jp.MagnitudeOptions),
    "lr": (lambda p, b, k, f, **kw: jp.lr(p, b, k, apply_fn=f, show_progress=False, **kw), jp.EWROptions),
    "ewr": (lambda p, b, k, f, **kw: jp.ewr(p, b, k, apply_fn=f, show_progress=False, **kw), jp.EWROptions),
}
STRUCTURED = {
    "prune_channels": (jp.prune_channels, jp.ChannelOptions),
    "intra_fusion": (jp.intra_fusion, jp.IntraFusionOptions),
    "ispasp": (jp.ispasp, jp.ISpaSPOptions),
}
FORMS = ("pure", "linen", "nnx")


def _leaves(tree):
  if isinstance(tree, nnx.Module):
    tree = nnx.state(tree)
  return [np.array(x) for x in jax.tree_util.tree_leaves(tree)]


def _assert_same(a, b):
  la, lb = _leaves(a), _leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(x, y)


def _run_twice(call, params):
  before = _leaves(params)
  first = call()
  for x, y in zip(before, _leaves(params)):   # no input mutated
    np.testing.assert_array_equal(x, y)
  second, compiled = compilations(call)
  assert compiled == [], f"the same call again compiled {compiled}"   # every program cached
  _assert_same(first.params, second.params)   # the same bits twice
  _assert_same(first.masks, second.masks)
  return first


def _check_info(result, method, options_cls, official):
  assert {"method", "options", "seconds"} <= set(result.info)
  assert result.info["method"] == method and result.info["seconds"] >= 0
  opts = result.info["options"]
  assert isinstance(opts, options_cls) and hash(opts) == hash(dataclasses.replace(opts))
  if official:
    expected = options_cls.official()
    expected = expected.replace(coupling="identity") if method == "lr" else expected
    if hasattr(expected, "signals"):   # the official step only multiplies by G: signals="auto" resolves to matrix-free
      expected = expected.replace(signals="matrix_free")
    assert opts == (expected.replace(mode="mask") if hasattr(expected, "mode") else expected)


@pytest.mark.parametrize("official", [False, True])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("method", sorted(UNSTRUCTURED))
def test_unstructured_contract(method, form, official, batch):
  params, apply_fn, tree_type = _form(form)
  fn, options_cls = UNSTRUCTURED[method]
  k = jp.k_from_sparsity(params if form != "nnx" else nnx.state(params), SPARSITY)
  result = _run_twice(lambda: fn(params, batch, k, apply_fn, official=official), params)
  assert isinstance(result.params, tree_type)
  assert jp.count_kept(result.masks) == k                                   # exact budget
  kept = sum(int(np.count_nonzero(np.asarray(x))) for x in jax.tree_util.tree_leaves(result.masks))
  assert kept == k
  _check_info(result, "lr" if method == "lr" else method, options_cls, official)
  if method == "lr":
    assert result.info["options"].coupling == "identity"


@pytest.mark.parametrize("official", [False, True])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("method", sorted(STRUCTURED))
def test_structured_contract(method, form, official, batch):
  params, apply_fn, tree_type = _form(form)
  fn, options_cls = STRUCTURED[method]
  result = _run_twice(lambda: fn(params, None, CHANNEL_SPARSITY, apply_fn=apply_fn, batch=batch[0], mode="mask",
                                 official=official, show_progress=False), params)
  assert isinstance(result.params, tree_type)
  rounding = "truncate" if official else "floor"
  # Both hidden groups (40 and 20 channels), each with the one rounding rule.
  assert sorted(len(v) for v in result.kept.values()) == sorted(
      jp.n_kept_channels(n, CHANNEL_SPARSITY, rounding) for n in WIDTHS[1:3])
  _check_info(result, method, options_cls, official)


@pytest.mark.parametrize("method", sorted(STRUCTURED))
def test_structured_methods_under_jit_name_the_traced_argument(method, batch):
  """Channels are chosen from concrete scores on the host: under jax.jit the call fails at once
  with a TypeError that names the traced argument (before, a TracerArrayConversionError from deep
  inside). The same call outside jit works (the contract test above)."""
  params, apply_fn, _ = _form("linen")
  fn, _ = STRUCTURED[method]
  groups = jp.groups(apply_fn, params, batch[0][:1])
  call = lambda p, x: fn(p, groups, CHANNEL_SPARSITY, apply_fn=apply_fn, batch=x, mode="mask",
                         show_progress=False).params
  with pytest.raises(TypeError, match=f"^params: jaxprune.{method} got traced arrays"):
    jax.jit(call)(params, batch[0])
  with pytest.raises(TypeError, match=f"^batch: jaxprune.{method} got traced arrays"):
    jax.jit(lambda x: call(params, x))(batch[0])
  pruned = fn(params, groups, CHANNEL_SPARSITY, apply_fn=apply_fn, batch=batch[0], show_progress=False)
  with pytest.raises(TypeError, match="^x: jaxprune.repair got traced arrays"):
    jax.jit(lambda x: jp.repair(apply_fn, params, pruned, x, show_progress=False).params)(batch[0])


def test_structured_methods_keep_the_same_counts(batch):
  # The same sparsity means the same widths for every structured method (linen MLP).
  params, apply_fn, _ = _form("linen")
  for s in (0.1, 0.3, 0.5, 0.9):
    counts = {name: sorted((g, len(v)) for g, v in fn(params, None, s, apply_fn=apply_fn, batch=batch[0],
                                                      mode="mask", show_progress=False).kept.items())
              for name, (fn, _) in STRUCTURED.items()}
    assert len({tuple(c) for c in counts.values()}) == 1, counts


def test_explicit_options_override_the_official_preset(batch):
  params, apply_fn, _ = _form("pure")
  k = jp.k_from_sparsity(params, 0.5)
  r = jp.lr(params, batch, k, apply_fn=apply_fn, official=True, stages=2, show_progress=False)
  assert r.info["options"] == jp.EWROptions.official().replace(stages=2, coupling="identity", signals="matrix_free")
  m = jp.lr(params, batch, k, apply_fn=apply_fn, official=True, signals="materialized", show_progress=False)
  assert m.info["options"] == jp.EWROptions.official().replace(coupling="identity", signals="materialized")
  c = jp.prune_channels(params, None, 0.3, apply_fn=apply_fn, batch=batch[0], official=True, rounding="floor",
                        show_progress=False)
  assert c.info["options"] == jp.ChannelOptions.official().replace(rounding="floor")
  with pytest.raises(TypeError, match="no option 'stage'"):
    jp.lr(params, batch, k, apply_fn=apply_fn, stage=2)
  with pytest.raises(ValueError, match="not both"):
    jp.magnitude(params, k, options=jp.MagnitudeOptions(), official=True)
  with pytest.raises(TypeError, match="loss_fn"):
    jp.ewr(params, batch, k)   # no loss_fn and no apply_fn


def test_mission_call_and_nnx_update(batch):
  # jaxprune.ewr(params, batch, k) on an NNX module: the result is its pruned state, for nnx.update.
  module = _NNX(nnx.Rngs(0))
  k = jp.k_from_sparsity(nnx.state(module), 0.9)
  result = jp.ewr(module, batch, k, show_progress=False)
  nnx.update(module, result.params)
  kernels = [module.fc1.kernel[...], module.fc2.kernel[...], module.fc3.kernel[...]]
  assert sum(int(np.count_nonzero(np.asarray(w))) for w in kernels) <= k
  assert module(batch[0]).shape == (48, 3)
  groups = jp.groups(None, module, batch[0][:1])   # an NNX module traces itself; paths into its state
  assert [g.size for g in groups] == [20, 40]
  # the module first, as every method takes it: not called on the example as if it were variables
  assert jp.groups(module, batch[0][:1]) == groups
  assert {m.path for m in groups[1].members} >= {"fc1/kernel", "fc1/bias", "fc2/kernel"}

"""NNX modules after shrinking: the arrays and the width attributes agree."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxprune as jp


class ConvNet(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.dw = nnx.Conv(8, 8, (3, 3), feature_group_count=8, rngs=rngs)   # depthwise
    self.pw = nnx.Conv(8, 12, (1, 1), rngs=rngs)
    self.fc = nnx.Linear(12, 4, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.conv(x)))
    x = nnx.relu(self.pw(nnx.relu(self.dw(x))))
    return self.fc(x.mean((1, 2)))


def test_a_shrunk_nnx_module_describes_its_arrays():
  module = ConvNet(nnx.Rngs(0))
  module.eval()
  x = jax.random.normal(jax.random.key(1), (4, 10, 10, 3))
  res = jp.prune_channels(module, None, 0.5, batch=x, show_progress=False)
  small = jp.resized_module(module, res.params)
  assert (small.conv.out_features, small.bn.num_features, small.dw.in_features, small.dw.out_features,
          small.dw.feature_group_count, small.pw.in_features, small.pw.out_features, small.fc.in_features) == (
              4, 4, 4, 4, 4, 4, 6, 6)
  assert module.conv.out_features == 8 and module.conv.kernel[...].shape[-1] == 8   # the input is untouched
  masked = jp.prune_channels(module, None, 0.5, batch=x, mode="mask", show_progress=False)
  np.testing.assert_allclose(small(x), nnx.merge(nnx.graphdef(module), masked.params)(x), rtol=1e-4, atol=1e-5)


class GroupNormNet(nnx.Module):
  """A GroupNorm of ``groups`` groups of ``size`` channels, and a Dropout (a PRNG key in the state)."""

  def __init__(self, rngs, groups=4, size=6):
    self.conv = nnx.Conv(3, groups * size, (3, 3), rngs=rngs)
    self.gn = nnx.GroupNorm(groups * size, num_groups=groups, rngs=rngs)
    self.drop = nnx.Dropout(0.1, rngs=rngs)
    self.fc = nnx.Linear(groups * size, 5, rngs=rngs)

  def __call__(self, x):
    return self.fc(self.drop(nnx.relu(self.gn(self.conv(x)))).mean((1, 2)))


def _group_norm_problem():
  module = GroupNormNet(nnx.Rngs(0))
  module.eval()
  x = jax.random.normal(jax.random.key(1), (8, 6, 6, 3))
  groups = jp.groups(module, x[:1])
  count = next(i for i, g in enumerate(groups) if g.size == 4)   # one group per GroupNorm group
  within = next(i for i, g in enumerate(groups) if g.size == 6)  # a channel's place within its group
  return module, x, groups, count, within


@pytest.mark.parametrize("prune", [jp.prune_channels, jp.intra_fusion])
def test_a_shrunk_group_norm_gets_its_group_count_from_the_plans(prune):
  module, x, groups, count, within = _group_norm_problem()
  assert groups[within].mask_note and not groups[count].mask_note   # statistics run within a group
  res = prune(module, groups, {count: 0.5, within: 0.5}, show_progress=False)
  with pytest.raises(ValueError, match="plans.*GroupNorm at 'gn' went from 24 to 6 channels"):
    jp.resized_module(module, res.params)          # 6 channels: 2 groups of 3, or 3 of 2?
  small = jp.resized_module(module, res.params, plans=res.info["plans"])
  assert (small.gn.num_groups, small.gn.group_size) == (2, 3)
  reference = GroupNormNet(nnx.Rngs(0), groups=2, size=3)   # built at those widths
  reference.eval()
  nnx.update(reference, res.params)
  np.testing.assert_allclose(small(x), reference(x), rtol=1e-6)
  # whole groups removed: the shrunk model computes what the masked one does
  res = prune(module, groups, {count: 0.5}, show_progress=False)
  small = jp.resized_module(module, res.params, plans=res.info["plans"])
  assert (small.gn.num_groups, small.gn.group_size) == (2, 6)
  masked = prune(module, groups, {count: 0.5}, mode="mask", show_progress=False)
  np.testing.assert_allclose(small(x), nnx.merge(nnx.graphdef(module), masked.params)(x), rtol=1e-4, atol=1e-5)


class TokenNet(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(20, 8, rngs=rngs)
    self.mix = nnx.Linear(8, 5, rngs=rngs)
    self.fc = nnx.Linear(5, 3, rngs=rngs)

  def __call__(self, tokens):
    return self.fc(nnx.relu(self.mix(self.embed(tokens))).mean(1))


def test_a_shrunk_embedding_describes_its_table():
  module = TokenNet(nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (4, 6), 0, 20)
  groups = jp.groups(module, tokens[:1])
  index = [g.name for g in groups].index("embed")
  res = jp.prune_channels(module, groups, {index: 0.5}, show_progress=False)
  small = jp.resized_module(module, res.params)
  assert (small.embed.num_embeddings, small.embed.features, small.mix.in_features) == (20, 4, 4)
  masked = jp.prune_channels(module, groups, {index: 0.5}, mode="mask", show_progress=False)
  np.testing.assert_allclose(small(tokens), nnx.merge(nnx.graphdef(module), masked.params)(tokens), rtol=1e-5, atol=1e-6)


def test_resized_module_rejects_a_non_module():
  with pytest.raises(TypeError, match="module"):
    jp.resized_module({"a": jnp.ones(2)}, {})


def test_a_linen_call_does_not_import_nnx():
  """No object can be an ``nnx.Module`` before ``flax.nnx`` is imported, so telling linen trees from
  modules must not import it (it costs a linen user's first call ~0.15 s)."""
  import subprocess
  import sys
  code = ("import sys, jax, jax.numpy as jnp, jaxprune as jp\n"
          "m = jp.models.MLP(widths=(6,), num_classes=3)\n"
          "v = m.init(jax.random.key(0), jnp.zeros((1, 4)))\n"
          "r = jp.prune_channels(v, jp.groups(m.apply, v, jnp.zeros((1, 4))), 0.5, show_progress=False)\n"
          "assert r.kept, r\n"
          "print('flax.nnx' in sys.modules)\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-1] == "False"


def test_the_default_loss_of_equal_models_is_one_function():
  """Jitted programs take the loss as a static argument: the default loss built again for the
  same model (or an equal linen module, or an NNX module's graph) must be equal to the last one,
  or every call compiles again. A model with other fields, or an unhashable apply function, gives
  another loss."""
  import flax.linen as nn
  from helpers import compilations
  from jaxprune.core.forms import as_model, classification_loss

  class Net(nn.Module):
    width: int = 6

    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(nn.relu(nn.Dense(self.width)(x)))

  assert classification_loss(Net().apply) == classification_loss(Net().apply)
  assert hash(classification_loss(Net().apply)) == hash(classification_loss(Net().apply))
  assert classification_loss(Net(width=7).apply) != classification_loss(Net().apply)
  assert classification_loss(Net().apply, train=False) != classification_loss(Net().apply)

  class Unhashable:
    __hash__ = None

    def __call__(self, p, x):
      return x

  f = Unhashable()
  assert classification_loss(f) != classification_loss(f) and hash(classification_loss(f)) is not None
  module = ConvNet(nnx.Rngs(0))
  assert as_model(module).apply_fn == as_model(module).apply_fn and as_model(module).view == as_model(module).view

  x = jax.random.normal(jax.random.key(0), (16, 4))
  batch = (x, jnp.arange(16) % 3)
  v = Net().init(jax.random.key(1), x[:1])
  jp.lr(v, batch, 20, apply_fn=Net().apply, official=True, show_progress=False)
  _, compiled = compilations(lambda: jp.lr(v, batch, 20, apply_fn=Net().apply, official=True, show_progress=False))
  assert compiled == []


def test_an_equal_linen_module_reuses_the_compiled_programs():
  """``apply_fn=Net().apply`` written in each call is a new bound method of a new (equal) module;
  the methods key their programs on the model, so the second call compiles nothing (repair's
  passes and i-SpaSP's per-unit programs compiled again on every call before)."""
  import flax.linen as nn
  from helpers import compilations

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(6, (3, 3))(x)))
      return nn.Dense(3)(nn.relu(nn.Conv(5, (3, 3))(x)).mean((1, 2)))

  x = jax.random.normal(jax.random.key(0), (12, 6, 6, 3))
  v = Net().init(jax.random.key(1), x[:1])
  g = jp.groups(Net().apply, v, x[:1])
  calls = (lambda: jp.prune_channels(v, g, 0.5, apply_fn=Net().apply, repair=x, show_progress=False),
           lambda: jp.ispasp(v, g, 0.5, apply_fn=Net().apply, batch=x, show_progress=False),
           lambda: jp.evaluate(Net().apply, v, x, jnp.arange(12) % 3))
  for call in calls:
    call()
    assert compilations(call)[1] == []

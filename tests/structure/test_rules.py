"""Tracer rules for lookups, windows at traced offsets, random masks and loops: channels that an
op leaves whole stay prunable (and removing them computes what masking them does); channels it
reorders, picks or ranks are unprunable with the op named; a scan's body is walked on its slices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn

import jaxprune as jp


class Around(nn.Module):
  """A conv of ``width`` channels, then ``op`` on its activations, then a Dense head."""
  op: object
  width: int = 6

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(self.width, (3, 3), name="a")(x))
    h = self.op(h)
    return nn.Dense(2, name="out")(h.reshape(h.shape[0], -1))


def _dropout(h):
  return h * jax.random.bernoulli(jax.random.key(3), 0.5, h.shape) / 0.5


WHOLE = {   # ops that leave the channel axis (last) whole
    "nearest resize (gather)": lambda h: jax.image.resize(h, h.shape[:1] + (16, 16) + h.shape[3:], "nearest"),
    "rows picked by index (gather)": lambda h: h[:, jnp.array([0, 2, 5]), :, :],
    "dynamic_slice": lambda h: jax.lax.dynamic_slice_in_dim(h, 1, 4, axis=1),
    "dynamic_update_slice": lambda h: jax.lax.dynamic_update_slice_in_dim(h, h[:, :2] * 2, 3, axis=1),
    "top_k over a spatial axis": lambda h: jnp.moveaxis(jax.lax.top_k(jnp.moveaxis(h, 3, 1), 4)[0], 1, 3),
    "cond": lambda h: jax.lax.cond(h.sum() > 0, lambda a: a * 2, jnp.sin, h),
    "take_along_axis (gather with batching axes, iota)":
        lambda h: jnp.take_along_axis(h, jnp.argsort(h, axis=1), axis=1),
    "spectral filter (fft)": lambda h: jnp.fft.irfft2(jnp.fft.rfft2(h, axes=(1, 2)) * 0.5, s=(8, 8), axes=(1, 2)),
    "switch": lambda h: jax.lax.switch(jnp.int32(h.sum() > 0), [lambda a: a * 2, jnp.sin, lambda a: a + 1], h),
}
ON_CHANNELS = {   # the same ops on the channel axis
    "gather": lambda h: h[..., jnp.array([0, 2, 5, 1, 3, 4])],
    "dynamic_slice": lambda h: jnp.concatenate([jax.lax.dynamic_slice_in_dim(h, 1, 3, axis=3)] * 2, -1),
    "dynamic_update_slice": lambda h: jax.lax.dynamic_update_slice_in_dim(h, h[..., :2] * 2, 1, axis=3),
    "top_k": lambda h: jnp.concatenate([jax.lax.top_k(h, 3)[0]] * 2, -1),
    "cond": lambda h: jax.lax.cond(h.sum() > 0, lambda a: a * 2, lambda a: jnp.roll(a, 1, axis=-1), h),
    "fft": lambda h: jnp.fft.fft(h, axis=-1).real,
}


@pytest.mark.parametrize("name", list(WHOLE))
def test_ops_that_keep_channels_whole_leave_them_prunable(name):
  model = Around(WHOLE[name])
  x = jax.random.normal(jax.random.key(1), (3, 8, 8, 3))
  v = model.init(jax.random.key(0), x[:1])
  g = jp.groups(model.apply, v, x[:1])
  assert [grp.name for grp in g] == ["params/a"], g
  shrunk = jp.prune_channels(v, g, 0.5, show_progress=False)
  masked = jp.prune_channels(v, g, 0.5, mode="mask", show_progress=False)
  np.testing.assert_allclose(Around(WHOLE[name], width=3).apply(shrunk.params, x), model.apply(masked.params, x),
                             rtol=1e-5, atol=1e-5)


def test_a_dropout_mask_from_random_bits_leaves_channels_prunable():
  """The mask's bits are new arrays (random_bits, then bitcast_convert_type to floats); multiplying
  the activations by it is element-wise. (No shrunk/masked comparison: the bits drawn depend on
  the width.)"""
  model = Around(_dropout)
  x = jnp.zeros((2, 8, 8, 3))
  g = jp.groups(model.apply, model.init(jax.random.key(0), x), x)
  assert [grp.name for grp in g] == ["params/a"], g


@pytest.mark.parametrize("name", list(ON_CHANNELS))
def test_ops_that_pick_channels_make_them_unprunable_with_the_op_named(name):
  model = Around(ON_CHANNELS[name])
  x = jnp.zeros((1, 8, 8, 3))
  g = jp.groups(model.apply, model.init(jax.random.key(0), x), x)
  assert "params/a" not in [grp.name for grp in g]
  reason = next(u.reason for u in g.unprunable if u.name == "params/a")
  assert name in reason, reason


class TokenModel(nn.Module):
  """``nn.Embed`` (a gather of table rows), then a Dense over the embedding's channels."""
  width: int = 8

  @nn.compact
  def __call__(self, tokens):
    h = nn.Embed(12, self.width, name="embed")(tokens)
    h = nn.relu(nn.Dense(6, name="mix")(h))
    return nn.Dense(3, name="head")(h.mean(1))


@pytest.mark.parametrize("prune", [jp.prune_channels, jp.intra_fusion])
def test_an_embedding_table_is_the_producer_of_its_channels(prune):
  model = TokenModel()
  tokens = jax.random.randint(jax.random.key(1), (4, 5), 0, 12)
  v = model.init(jax.random.key(0), tokens[:1])
  g = jp.groups(model.apply, v, tokens[:1])
  index = [grp.name for grp in g].index("params/embed")
  group = g[index]
  assert [(m.path, m.axis, m.kind) for m in group.producers] == [("params/embed/embedding", 1, "kernel")]
  assert [(m.path, m.axis) for m in group.consumers] == [("params/mix/kernel", 0)]
  shrunk = prune(v, g, {index: 0.5}, show_progress=False)
  masked = prune(v, g, {index: 0.5}, mode="mask", show_progress=False)
  assert shrunk.params["params"]["embed"]["embedding"].shape == (12, 4)
  np.testing.assert_allclose(TokenModel(width=4).apply(shrunk.params, tokens), model.apply(masked.params, tokens),
                             rtol=1e-5, atol=1e-6)
  # scored as a kernel: the group mean of the table's columns and the consumer's rows (l1)
  table, mix = (np.abs(np.asarray(v["params"][k][leaf])) for k, leaf in (("embed", "embedding"), ("mix", "kernel")))
  expected = (table.sum(0) + mix.sum(1)) / 2
  np.testing.assert_allclose(jp.magnitude_importance(v, group), expected / expected.mean(), rtol=1e-5)


def _scan_rows(h, step=lambda c, r: c + r):
  """A running sum over image rows by ``lax.scan`` (the carry is one row)."""
  _, ys = jax.lax.scan(lambda c, r: (step(c, r), c), jnp.zeros_like(h[:, 0]), jnp.moveaxis(h, 1, 0))
  return jnp.moveaxis(ys, 0, 1)


class Block(nn.Module):
  hidden: int

  @nn.compact
  def __call__(self, h, _):
    return h + nn.Dense(h.shape[-1], name="down")(nn.relu(nn.Dense(self.hidden, name="up")(h))), None


class Stack(nn.Module):
  """Three residual MLP blocks stacked by ``nn.scan``: kernels ``(3, d, h)`` and ``(3, h, d)``."""
  width: int = 8
  hidden: int = 12

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(self.width, name="embed")(x)
    blocks = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    h, _ = blocks(self.hidden, name="blocks")(h, None)
    return nn.Dense(2, name="head")(h)


@pytest.mark.parametrize("prune", [jp.prune_channels, jp.intra_fusion])
def test_a_scanned_layer_stack_loses_the_same_channels_in_every_layer(prune):
  model = Stack()
  x = jax.random.normal(jax.random.key(1), (5, 4))
  v = model.init(jax.random.key(0), x[:1])
  g = jp.groups(model.apply, v, x[:1])
  members = {grp.size: {(m.path, m.axis, m.role) for m in grp.members} for grp in g}
  assert members[12] == {("params/blocks/up/kernel", 2, "producer"), ("params/blocks/up/bias", 1, "producer"),
                         ("params/blocks/down/kernel", 1, "consumer")}
  assert {("params/embed/kernel", 1, "producer"), ("params/blocks/down/kernel", 2, "producer"),
          ("params/blocks/up/kernel", 1, "consumer"), ("params/head/kernel", 0, "consumer")} <= members[8]
  shrunk = prune(v, g, 0.5, show_progress=False)
  masked = prune(v, g, 0.5, mode="mask", show_progress=False)
  assert shrunk.params["params"]["blocks"]["up"]["kernel"].shape == (3, 4, 6)
  np.testing.assert_allclose(Stack(4, 6).apply(shrunk.params, x), model.apply(masked.params, x), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="no two-layer unit"):   # i-SpaSP cannot capture one step's activation
    jp.ispasp(v, g, 0.5, apply_fn=model.apply, batch=x, show_progress=False)


def test_a_scan_over_rows_keeps_channels_and_a_carry_that_moves_them_is_opaque():
  model = Around(_scan_rows)
  x = jax.random.normal(jax.random.key(1), (3, 8, 8, 3))
  v = model.init(jax.random.key(0), x[:1])
  g = jp.groups(model.apply, v, x[:1])
  assert [grp.name for grp in g] == ["params/a"]
  shrunk = jp.prune_channels(v, g, 0.5, show_progress=False)
  masked = jp.prune_channels(v, g, 0.5, mode="mask", show_progress=False)
  np.testing.assert_allclose(Around(_scan_rows, width=3).apply(shrunk.params, x), model.apply(masked.params, x),
                             rtol=1e-5, atol=1e-5)
  # a carry that rolls its channels every step; a fori_loop's body has the loop's own shapes, and
  # walked once as a call it saw one roll where the loop makes three
  for rolls in (lambda h: _scan_rows(h, lambda c, r: jnp.roll(c, 1, axis=-1) + r),
                lambda h: jax.lax.fori_loop(0, 3, lambda i, a: jnp.roll(a, 1, axis=-1) * 0.5 + 1, h)):
    g = jp.groups(Around(rolls).apply, v, x[:1])
    assert "params/a" not in [grp.name for grp in g]
    assert "scan" in next(u.reason for u in g.unprunable if u.name == "params/a")


def _looped(params, x):
  """Residual MLP layers applied by ``fori_loop`` over stacked kernels (a scan body that slices
  layer ``i`` with ``dynamic_slice``)."""
  h = x @ params["embed"]
  h = jax.lax.fori_loop(0, 3, lambda i, h: h + jax.nn.relu(h @ params["up"][i]) @ params["down"][i], h)
  return h @ params["head"]


def test_a_fori_loop_over_stacked_kernels_prunes_every_layer_alike():
  keys = jax.random.split(jax.random.key(0), 4)
  shapes = {"embed": (4, 8), "up": (3, 8, 12), "down": (3, 12, 8), "head": (8, 2)}
  params = {name: 0.3 * jax.random.normal(k, shape) for k, (name, shape) in zip(keys, shapes.items())}
  x = jax.random.normal(jax.random.key(1), (5, 4))
  g = jp.groups(_looped, params, x[:1])
  assert {(m.path, m.axis, m.role) for m in g[1].members} == {("up", 2, "producer"), ("down", 1, "consumer")}
  shrunk = jp.prune_channels(params, g, 0.5, show_progress=False)
  masked = jp.prune_channels(params, g, 0.5, mode="mask", show_progress=False)
  assert shrunk.params["up"].shape == (3, 4, 6)
  np.testing.assert_allclose(_looped(shrunk.params, x), _looped(masked.params, x), rtol=1e-5, atol=1e-5)


class Recurrent(nn.Module):
  """An LSTM over a sequence (``nn.RNN``: a scan whose carry is the cell and hidden state)."""
  hidden: int = 8

  @nn.compact
  def __call__(self, x):
    h = nn.RNN(nn.LSTMCell(self.hidden), name="rnn")(x)
    return nn.Dense(3, name="head")(h[:, -1])


def test_an_lstm_hidden_state_is_one_group_of_its_gates_and_recurrent_kernels():
  model = Recurrent()
  x = jax.random.normal(jax.random.key(1), (4, 6, 5))
  v = model.init(jax.random.key(0), x[:1])
  g = jp.groups(model.apply, v, x[:1])
  assert len(g.groups) == 1
  roles = {(m.path.split("/")[-2], m.axis, m.role) for m in g[0].members if m.kind == "kernel"}
  gates = ("i", "f", "g", "o")
  assert roles == ({(f"i{k}", 1, "producer") for k in gates} | {(f"h{k}", 1, "producer") for k in gates}
                   | {(f"h{k}", 0, "consumer") for k in gates} | {("head", 0, "consumer")})
  shrunk = jp.prune_channels(v, g, 0.5, show_progress=False)
  masked = jp.prune_channels(v, g, 0.5, mode="mask", show_progress=False)
  np.testing.assert_allclose(Recurrent(4).apply(shrunk.params, x), model.apply(masked.params, x), rtol=1e-5, atol=1e-6)

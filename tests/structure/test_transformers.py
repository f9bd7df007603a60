"""Transformers: whole heads, grouped-query attention, per-head dimensions and MLP channels as
channel groups, in the three model forms (a pure function, linen, NNX), and every structured
method on the reference transformer."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxprune as jp
from jaxprune import data
from jaxprune.models import Transformer
from jaxprune.structure.units import derive_units
from jaxprune.cli import train_repeats_transformer

RELEASE_EACH_TEST = True
D, HEADS, HEAD_DIM, MLP, DEPTH, VOCAB, LENGTH = 32, 4, 8, 64, 2, 16, 12


# --- a pre-LN transformer as a pure function over a dict --------------------------------------

def pure_init(key, kv_heads=HEADS):
  keys = iter(jax.random.split(key, 64))
  normal = lambda *shape: jax.random.normal(next(keys), shape) / np.sqrt(shape[0])   # noqa: E731
  small = lambda *shape: 0.1 * jax.random.normal(next(keys), shape)                  # noqa: E731
  p = {"embed": normal(VOCAB, D), "positions": small(LENGTH, D)}
  for b in range(DEPTH):
    p[f"block{b}"] = {
        "ln1": {"scale": 1 + small(D), "bias": small(D)},
        "query": {"kernel": normal(D, HEADS, HEAD_DIM), "bias": small(HEADS, HEAD_DIM)},
        "key": {"kernel": normal(D, kv_heads, HEAD_DIM), "bias": small(kv_heads, HEAD_DIM)},
        "value": {"kernel": normal(D, kv_heads, HEAD_DIM), "bias": small(kv_heads, HEAD_DIM)},
        "out": {"kernel": normal(HEADS, HEAD_DIM, D), "bias": small(D)},
        "ln2": {"scale": 1 + small(D), "bias": small(D)},
        "fc1": {"kernel": normal(D, MLP), "bias": small(MLP)},
        "fc2": {"kernel": normal(MLP, D), "bias": small(D)},
    }
  p["ln_final"] = {"scale": 1 + small(D), "bias": small(D)}
  p["head"] = {"kernel": normal(D, 2), "bias": small(2)}
  return p


def _layer_norm(p, x):
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + 1e-6) * p["scale"] + p["bias"]


def _attention(p, x):
  """Heads and key/value heads read from the array widths (grouped-query when fewer kv heads)."""
  q = jnp.einsum("bsd,dhk->bshk", x, p["query"]["kernel"]) + p["query"]["bias"]
  k = jnp.einsum("bsd,dhk->bshk", x, p["key"]["kernel"]) + p["key"]["bias"]
  v = jnp.einsum("bsd,dhk->bshk", x, p["value"]["kernel"]) + p["value"]["bias"]
  b, s, heads, kv_heads = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
  q = q.reshape(b, s, kv_heads, heads // kv_heads, q.shape[-1])
  weights = jax.nn.softmax(jnp.einsum("bqhgk,bthk->bhgqt", q, k) / np.sqrt(q.shape[-1]), axis=-1)
  o = jnp.einsum("bhgqt,bthk->bqhgk", weights, v).reshape(b, s, heads, v.shape[-1])
  return jnp.einsum("bshk,hkd->bsd", o, p["out"]["kernel"]) + p["out"]["bias"]


def pure_apply(p, tokens):
  x = jax.nn.one_hot(tokens, p["embed"].shape[0]) @ p["embed"] + p["positions"]
  for b in range(DEPTH):
    blk = p[f"block{b}"]
    x = x + _attention(blk, _layer_norm(blk["ln1"], x))
    h = jax.nn.gelu(_layer_norm(blk["ln2"], x) @ blk["fc1"]["kernel"] + blk["fc1"]["bias"])
    x = x + h @ blk["fc2"]["kernel"] + blk["fc2"]["bias"]
  return _layer_norm(p["ln_final"], x).mean(1) @ p["head"]["kernel"] + p["head"]["bias"]


def tokens(n=8, seed=1):
  return jax.random.randint(jax.random.key(seed), (n, LENGTH), 0, VOCAB)


def by_kind(groups):
  """``{"heads", "mlp", "qk", "v", "residual"}`` -> group indices (sizes tell them apart here)."""
  kinds = {"heads": [], "mlp": [], "qk": [], "v": [], "residual": []}
  for i, g in enumerate(groups):
    kind = ("mlp" if g.size == MLP else "residual" if g.size == D else "qk" if not g.consumers
            else "v" if g.size == HEAD_DIM else "heads")
    kinds[kind].append(i)
  return kinds


def test_pure_transformer_has_two_mlp_and_two_whole_head_groups_and_shrink_equals_mask():
  """The issue's done-when: 4 heads of 8, MLP 64, two blocks; half of the heads and MLP channels
  removed in shrink mode give a tree the same function runs, equal to mask mode to 1e-4."""
  p, x = pure_init(jax.random.key(0)), tokens()
  groups = jp.groups(pure_apply, p, x)
  kinds = by_kind(groups)
  assert len(kinds["mlp"]) == 2 and len(kinds["heads"]) == 2
  for i in kinds["heads"]:
    g = groups[i]
    assert g.size == HEADS and not g.mask_note
    assert {m.path for m in g.producers if m.kind == "kernel"} == {
        f"{blk}/{name}/kernel" for blk in {m.path.split("/")[0] for m in g.members} for name in ("query", "key", "value")}
    assert [m.path.split("/")[-2] for m in g.consumers] == ["out"]
  assert len(kinds["qk"]) == 2 and len(kinds["v"]) == 2        # per-head dimension groups stay available
  assert [groups[i].mask_note != "" for i in kinds["residual"]] == [True]   # LayerNorm over the stream
  half = {i: 0.5 for i in kinds["mlp"] + kinds["heads"]}
  shrunk = jp.prune_channels(p, groups, half, show_progress=False)
  masked = jp.prune_channels(p, groups, half, mode="mask", show_progress=False)
  assert shrunk.params["block0"]["query"]["kernel"].shape == (D, 2, HEAD_DIM)
  assert shrunk.params["block1"]["out"]["kernel"].shape == (2, HEAD_DIM, D)
  assert shrunk.params["block0"]["fc1"]["kernel"].shape == (D, 32)
  np.testing.assert_allclose(pure_apply(shrunk.params, x), pure_apply(masked.params, x), atol=1e-4)
  assert float(jnp.abs(pure_apply(shrunk.params, x) - pure_apply(p, x)).max()) > 1e-3   # something was removed


def test_grouped_query_attention_removes_a_kv_head_only_with_all_its_query_heads():
  p, x = pure_init(jax.random.key(0), kv_heads=2), tokens()
  groups = jp.groups(pure_apply, p, x)
  kv = [g for g in groups if g.size == 2 and "key" in {m.path.split("/")[-2] for m in g.producers}]
  within = [g for g in groups if g.size == 2 and {m.path.split("/")[-2] for m in g.producers if m.kind == "kernel"}
            == {"query"}]
  assert len(kv) == 2 and len(within) == 2
  query = next(m for m in kv[0].producers if m.path.endswith("query/kernel"))
  np.testing.assert_array_equal(query.positions(2), [[0, 1], [2, 3]])    # kv head j owns query heads 2j, 2j+1
  out = next(m for m in kv[0].consumers if m.path.endswith("out/kernel"))
  np.testing.assert_array_equal(out.positions(2), [[0, 1], [2, 3]])
  index = {id(g): i for i, g in enumerate(groups)}
  for g in kv:
    result = jp.prune_channels(p, groups, {index[id(g)]: 0.5}, show_progress=False)
    blk = g.members[0].path.split("/")[0]
    assert result.params[blk]["key"]["kernel"].shape == (D, 1, HEAD_DIM)
    assert result.params[blk]["query"]["kernel"].shape == (D, 2, HEAD_DIM)    # both of its query heads went
    masked = jp.prune_channels(p, groups, {index[id(g)]: 0.5}, mode="mask", show_progress=False)
    np.testing.assert_allclose(pure_apply(result.params, x), pure_apply(masked.params, x), atol=1e-4)


def test_every_method_runs_on_heads_and_mlp_channels_of_the_pure_function():
  p, x = pure_init(jax.random.key(0), kv_heads=2), tokens(64)
  groups = jp.groups(pure_apply, p, x[:1])
  kinds = by_kind(groups)
  half = {i: 0.5 for i in kinds["mlp"] + kinds["heads"]}
  y = jnp.asarray(np.random.default_rng(0).integers(0, 2, 64))
  loss = lambda params, batch: optax.softmax_cross_entropy_with_integer_labels(   # noqa: E731
      pure_apply(params, batch[0]), batch[1]).mean()
  runs = {"l1": jp.prune_channels(p, groups, half, show_progress=False),
          "taylor": jp.prune_channels(p, groups, half, importance="taylor", loss_fn=loss, batches=[(x, y)],
                                      show_progress=False),
          "intra_fusion": jp.intra_fusion(p, groups, half, show_progress=False),
          "ispasp": jp.ispasp(p, groups, half, apply_fn=pure_apply, batch=x, show_progress=False)}
  runs["repair"] = jp.repair(pure_apply, p, runs["l1"], x, show_progress=False)
  for name, r in runs.items():
    assert r.params["block0"]["value"]["kernel"].shape == (D, 1, HEAD_DIM), name
    assert r.params["block1"]["fc2"]["kernel"].shape == (32, D), name
    assert bool(jnp.all(jnp.isfinite(pure_apply(r.params, x)))), name
  layers = set(runs["repair"].info["repair"]["layers"])
  assert {f"block{b}/{name}" for b in range(DEPTH) for name in ("query", "key", "value", "out")} <= layers
  assert "embed" in layers and "" not in layers   # a top-level kernel is named by its own path
  assert not runs["repair"].info["repair"]["skipped"]


def test_units_of_head_groups_read_the_heads_axis_of_the_output_projection():
  """i-SpaSP's unit of a head group: ``H`` is the attention output with the head axis moved last,
  and the unit output equals the output projection of the traced program."""
  p, x = pure_init(jax.random.key(0)), tokens()
  groups = jp.groups(pure_apply, p, x[:1])
  units, skipped = derive_units(pure_apply, p, x[:1], groups)
  kinds = by_kind(groups)
  by_group = {u.group_index: u for u in units}
  assert set(kinds["heads"] + kinds["mlp"] + kinds["v"]) <= set(by_group)
  assert {i: skipped[i] for i in kinds["qk"]} == {i: "read by no layer" for i in kinds["qk"]}
  u = by_group[kinds["heads"][0]]
  hidden = u.hidden_fn(p, x)
  assert hidden.shape == (8, LENGTH, HEAD_DIM, HEADS)
  blk = p[u.name.split("/")[0]]
  o = jnp.moveaxis(hidden, -1, -2)
  want = jnp.einsum("bshk,hkd->bsd", o, blk["out"]["kernel"]) + blk["out"]["bias"]
  np.testing.assert_allclose(u.output(p, hidden), want, rtol=1e-5, atol=1e-5)
  mask = jnp.asarray([1.0, 0.0, 1.0, 1.0])
  want = jnp.einsum("bshk,hkd->bsd", o * mask[:, None], blk["out"]["kernel"]) + blk["out"]["bias"]
  np.testing.assert_allclose(u.output(p, hidden, mask), want, rtol=1e-5, atol=1e-5)


# --- linen: nn.MultiHeadDotProductAttention, RMSNorm and a SwiGLU MLP --------------------------

class LinenBlock(nn.Module):
  heads: int = HEADS
  qkv: int = HEADS * HEAD_DIM
  mlp: int = MLP

  @nn.compact
  def __call__(self, x):
    h = nn.RMSNorm(name="norm1")(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=self.qkv, out_features=D,
                                            name="attention")(h, h)
    h = nn.RMSNorm(name="norm2")(x)
    gated = nn.silu(nn.Dense(self.mlp, name="gate")(h)) * nn.Dense(self.mlp, name="up")(h)
    return x + nn.Dense(D, name="down")(gated)


class LinenNet(nn.Module):
  heads: int = HEADS
  qkv: int = HEADS * HEAD_DIM
  mlp: int = MLP

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(D, name="embed")(x)
    x = LinenBlock(self.heads, self.qkv, self.mlp, name="block")(x)
    return nn.Dense(3, name="head")(x.mean(1))


def test_linen_attention_block_heads_and_swiglu_channels_rebuilt_at_the_new_widths():
  x = jax.random.normal(jax.random.key(1), (4, LENGTH, 6))
  model = LinenNet()
  v = model.init(jax.random.key(0), x)
  groups = jp.groups(model.apply, v, x[:1])
  heads = [i for i, g in enumerate(groups) if g.size == HEADS]
  mlp = [i for i, g in enumerate(groups) if g.size == MLP]
  assert len(heads) == 1 and len(mlp) == 1
  assert set(groups[mlp[0]].modules("producer")) == {"params/block/gate", "params/block/up"}   # gate and up together
  assert set(groups[heads[0]].modules("producer")) == {f"params/block/attention/{n}" for n in ("query", "key", "value")}
  residual = [g for g in groups if g.size == D]
  assert len(residual) == 1 and "reduce_sum" in residual[0].mask_note    # RMSNorm over the stream
  half = {heads[0]: 0.5, mlp[0]: 0.5}
  shrunk = jp.prune_channels(v, groups, half, show_progress=False)
  masked = jp.prune_channels(v, groups, half, mode="mask", show_progress=False)
  small = LinenNet(heads=2, qkv=2 * HEAD_DIM, mlp=32)   # the recipe: the module again, at the widths of the arrays
  np.testing.assert_allclose(small.apply(shrunk.params, x), model.apply(masked.params, x), atol=1e-4)
  repaired = jp.repair(model.apply, v, shrunk, x, show_progress=False)
  assert not any("attention" in k for k in repaired.info["repair"]["skipped"])
  assert bool(jnp.all(jnp.isfinite(small.apply(repaired.params, x))))


# --- NNX: nnx.MultiHeadAttention, resized after shrinking -------------------------------------

class NNXBlock(nnx.Module):
  def __init__(self, rngs):
    self.norm1 = nnx.LayerNorm(D, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(num_heads=HEADS, in_features=D, qkv_features=HEADS * HEAD_DIM,
                                            decode=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(D, rngs=rngs)
    self.fc1, self.fc2 = nnx.Linear(D, MLP, rngs=rngs), nnx.Linear(MLP, D, rngs=rngs)

  def __call__(self, x):
    x = x + self.attention(self.norm1(x))
    return x + self.fc2(nnx.gelu(self.fc1(self.norm2(x))))


class NNXNet(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Linear(6, D, rngs=rngs)
    self.block = NNXBlock(rngs)
    self.head = nnx.Linear(D, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(self.block(self.embed(x)).mean(1))


def test_nnx_attention_block_shrinks_into_a_resized_module():
  x = jax.random.normal(jax.random.key(1), (4, LENGTH, 6))
  module = NNXNet(nnx.Rngs(0))
  groups = jp.groups(None, module, x[:1])
  heads = [i for i, g in enumerate(groups) if g.size == HEADS]
  mlp = [i for i, g in enumerate(groups) if g.size == MLP]
  assert len(heads) == 1 and len(mlp) == 1
  half = {heads[0]: 0.5, mlp[0]: 0.5}
  shrunk = jp.prune_channels(module, groups, half, show_progress=False)
  masked = jp.prune_channels(module, groups, half, mode="mask", show_progress=False)
  small = jp.resized_module(module, shrunk.params)
  assert (small.block.attention.num_heads, small.block.attention.head_dim) == (2, HEAD_DIM)
  assert small.block.attention.query.out_features == (2, HEAD_DIM)
  assert small.block.attention.out.in_features == (2, HEAD_DIM)
  assert small.block.fc1.out_features == 32 and module.block.attention.num_heads == HEADS   # input unchanged
  np.testing.assert_allclose(small(x), jp.resized_module(module, masked.params)(x), atol=1e-4)
  residual = [i for i, g in enumerate(groups) if g.size == D]
  cut = jp.prune_channels(module, groups, {residual[0]: 0.25}, show_progress=False)
  resized = jp.resized_module(module, cut.params)
  assert resized.block.attention.in_features == 24 and resized.block.norm1.num_features == 24
  assert resized(x).shape == (4, 3)     # runs: attention's input-width check reads the new width
  for name in ("intra_fusion", "ispasp"):
    kw = {"apply_fn": None, "batch": x} if name == "ispasp" else {}
    r = getattr(jp, name)(module, groups, half, show_progress=False, **kw)
    assert jp.resized_module(module, r.params).block.attention.num_heads == 2, name


# --- the reference transformer ------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained():
  train, test = data.repeats("train"), data.repeats("test", 500)
  model, v = train_repeats_transformer(train, show_progress=False)
  return model, v, train, test


def _accuracy(model, v, test):
  return float((model.apply(v, test.x).argmax(-1) == test.y).mean())


def test_reference_transformer_heads_pruned_by_every_method_rebuilds_from_params(trained):
  model, v, train, test = trained
  dense = _accuracy(model, v, test)
  assert dense > 0.9                      # the embedded task really trained (chance is about 0.5)
  groups = jp.groups(model.apply, v, train.x[:1])
  heads = [i for i, g in enumerate(groups) if g.size == HEADS]
  mlp = [i for i, g in enumerate(groups) if g.size == MLP]
  half = {i: 0.5 for i in heads + mlp}
  loss = jp.classification_loss(model.apply)
  batch = (train.x[:256], train.y[:256])
  runs = {
      "l1": jp.prune_channels(v, groups, half, show_progress=False),
      "taylor": jp.prune_channels(v, groups, half, importance="taylor", loss_fn=loss, batches=[batch],
                                  show_progress=False),
      "intra_fusion": jp.intra_fusion(v, groups, half, show_progress=False),
      "ispasp": jp.ispasp(v, groups, half, apply_fn=model.apply, batch=batch[0], show_progress=False),
      "l1+repair": jp.prune_channels(v, groups, half, apply_fn=model.apply, repair=train.x[:500],
                                     show_progress=False),
  }
  random = jp.prune_channels(v, groups, half, importance="random", key=jax.random.key(3), show_progress=False)
  small = Transformer.from_params(runs["l1"].params)
  assert [tuple(b) for b in small.blocks] == [(2, 2, HEAD_DIM, HEAD_DIM, 32)] * DEPTH
  floor = _accuracy(small, random.params, test)
  for name, r in runs.items():
    acc = _accuracy(Transformer.from_params(r.params), r.params, test)
    assert acc > 0.6, (name, acc)         # well above chance with half the heads and half the MLP gone
  assert max(_accuracy(small, r.params, test) for r in runs.values()) > floor


def test_nnx_grouped_query_attention_keeps_kv_heads_with_their_query_heads():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Linear(6, D, rngs=rngs)
      self.attention = nnx.MultiHeadAttention(num_heads=HEADS, num_kv_heads=2, in_features=D, qkv_features=D,
                                              decode=False, rngs=rngs)
      self.head = nnx.Linear(D, 3, rngs=rngs)

    def __call__(self, x):
      x = self.embed(x)
      return self.head((x + self.attention(x)).mean(1))

  x = jax.random.normal(jax.random.key(1), (4, LENGTH, 6))
  module = Net(nnx.Rngs(0))
  groups = jp.groups(None, module, x[:1])
  kv = [i for i, g in enumerate(groups) if g.size == 2 and "attention/key" in g.modules("producer")]
  assert len(kv) == 1
  shrunk = jp.prune_channels(module, groups, {kv[0]: 0.5}, show_progress=False)
  small = jp.resized_module(module, shrunk.params)
  assert (small.attention.num_heads, small.attention.num_kv_heads) == (2, 1)
  masked = jp.prune_channels(module, groups, {kv[0]: 0.5}, mode="mask", show_progress=False)
  np.testing.assert_allclose(small(x), jp.resized_module(module, masked.params)(x), atol=1e-4)

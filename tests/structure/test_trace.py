"""Channel groups traced from the jaxpr, against the Torch-Pruning tables of the Intra-Fusion brief."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxprune as jp
from jaxprune import models

CIFAR = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)

# ../shared/research/intrafusion.md section 2.1 (official code, backward order: group 0 nearest the output).
VGG_FEATURES = {0: "conv0", 4: "conv1", 8: "conv2", 11: "conv3", 15: "conv4", 18: "conv5", 22: "conv6", 25: "conv7"}
VGG11_TABLE = [(512, ["features.25"], ["classifier"]), (512, ["features.22"], ["features.25"]),
               (512, ["features.18"], ["features.22"]), (512, ["features.15"], ["features.18"]),
               (256, ["features.11"], ["features.15"]), (256, ["features.8"], ["features.11"]),
               (128, ["features.4"], ["features.8"]), (64, ["features.0"], ["features.4"])]
RESNET18_TABLE = [
    (512, ["layer4.1.conv2", "layer4.0.shortcut.0", "layer4.0.conv2"], ["linear", "layer4.1.conv1"]),
    (512, ["layer4.1.conv1"], ["layer4.1.conv2"]),
    (512, ["layer4.0.conv1"], ["layer4.0.conv2"]),
    (256, ["layer3.1.conv2", "layer3.0.shortcut.0", "layer3.0.conv2"],
     ["layer4.0.shortcut.0", "layer4.0.conv1", "layer3.1.conv1"]),
    (256, ["layer3.1.conv1"], ["layer3.1.conv2"]),
    (256, ["layer3.0.conv1"], ["layer3.0.conv2"]),
    (128, ["layer2.1.conv2", "layer2.0.shortcut.0", "layer2.0.conv2"],
     ["layer3.0.shortcut.0", "layer3.0.conv1", "layer2.1.conv1"]),
    (128, ["layer2.1.conv1"], ["layer2.1.conv2"]),
    (128, ["layer2.0.conv1"], ["layer2.0.conv2"]),
    (64, ["layer1.1.conv2", "conv1", "layer1.0.conv2"],
     ["layer2.0.shortcut.0", "layer2.0.conv1", "layer1.1.conv1", "layer1.0.conv1"]),
    (64, ["layer1.1.conv1"], ["layer1.1.conv2"]),
    (64, ["layer1.0.conv1"], ["layer1.0.conv2"]),
]


def torch_to_flax(name: str) -> str:
  if name.startswith("features."):
    return "params/" + VGG_FEATURES[int(name.split(".")[1])]
  if name == "linear":
    return "params/fc"
  if name == "classifier":
    return "params/classifier"
  parts = name.split(".")
  if parts[0].startswith("layer"):
    block = f"{parts[0]}_{parts[1]}"
    return f"params/{block}/" + ("downsample_conv" if parts[2] == "shortcut" else parts[2])
  return "params/" + name


def shapes(model, shape=(1, 32, 32, 3)):
  """Abstract variables: tracing needs shapes only."""
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))


def table_of(groups):
  return [(g.size, sorted(g.modules("producer")), sorted(g.modules("consumer"))) for g in groups]


def expected(table):
  return [(n, sorted(torch_to_flax(p) for p in prods), sorted(torch_to_flax(c) for c in cons))
          for n, prods, cons in table]


def init(model, shape=(1, 32, 32, 3)):
  return model.init(jax.random.key(0), jnp.zeros(shape))


def test_vgg11_bn_groups_equal_the_torch_pruning_table():
  model = models.vgg11_bn()
  g = jp.groups(model.apply, shapes(model), CIFAR)
  assert table_of(g) == expected(VGG11_TABLE)
  assert [u.modules("producer") for u in g.unprunable] == [("params/classifier",)]
  assert "reaches the model output" in g.unprunable[0].reason
  # each conv group also carries its bias and its BatchNorm (scale, offset, statistics)
  kinds = sorted((m.path, m.kind) for m in g[7].producers)
  assert kinds == [("batch_stats/bn0/mean", "stat"), ("batch_stats/bn0/var", "stat"), ("params/bn0/bias", "norm"),
                   ("params/bn0/scale", "norm"), ("params/conv0/bias", "bias"), ("params/conv0/kernel", "kernel")]
  assert all(m.axis == 3 for m in g[7].producers if m.kind == "kernel")
  assert [(m.path, m.axis) for m in g[7].consumers] == [("params/conv1/kernel", 2)]


def test_resnet18_groups_equal_the_torch_pruning_table():
  model = models.resnet18()
  g = jp.groups(model.apply, shapes(model), CIFAR)
  assert table_of(g) == expected(RESNET18_TABLE)
  # the residual group of stage 4: three producing convs and their three BatchNorms
  norms = sorted(m.path for m in g[0].producers if m.kind == "norm")
  assert norms == sorted(f"params/{b}/{x}" for b in ("layer4_1/bn2", "layer4_0/bn2", "layer4_0/downsample_bn")
                         for x in ("bias", "scale"))
  assert len(g.norms) == 20


def test_resnet20_groups_have_residual_stages_and_downsample_convs():
  model = models.resnet20()
  g = jp.groups(model.apply, shapes(model), CIFAR)
  assert [x.size for x in g] == [64, 64, 64, 64, 32, 32, 32, 32, 16, 16, 16, 16]
  stage1 = sorted(g[8].modules("producer"))
  assert stage1 == ["params/conv1", "params/layer1_0/conv2", "params/layer1_1/conv2", "params/layer1_2/conv2"]
  assert sorted(g[4].modules("producer")) == ["params/layer2_0/conv2", "params/layer2_0/downsample_conv",
                                               "params/layer2_1/conv2", "params/layer2_2/conv2"]
  assert sorted(g[4].modules("consumer")) == ["params/layer2_1/conv1", "params/layer2_2/conv1",
                                               "params/layer3_0/conv1", "params/layer3_0/downsample_conv"]
  assert g[0].modules("consumer")[0] == "params/fc"
  assert [x.modules("producer") for x in g][1:4] == [("params/layer3_2/conv1",), ("params/layer3_1/conv1",),
                                                    ("params/layer3_0/conv1",)]


def test_mobilenet_depthwise_ties_input_and_output_channels():
  model = models.MobileNetV1()
  g = jp.groups(model.apply, shapes(model), CIFAR)
  assert len(g) == 14
  last = g[13]   # stem output = block0's depthwise input and output
  kinds = {(m.path, m.kind) for m in last.producers if m.kind in ("kernel", "depthwise")}
  assert kinds == {("params/conv0/kernel", "kernel"), ("params/block0/dw/kernel", "depthwise")}
  assert last.modules("consumer") == ("params/block0/pw",)
  assert {m.path for m in last.producers if m.kind == "norm"} == {
      "params/bn0/scale", "params/bn0/bias", "params/block0/dw_bn/scale", "params/block0/dw_bn/bias"}


def test_mlp_groups_and_output_is_unprunable():
  model = models.mlpnet()
  g = jp.groups(model.apply, init(model, (1, 784)), jnp.zeros((2, 784)))
  assert table_of(g) == [(20, ["params/fc2"], ["params/fc3"]), (40, ["params/fc1"], ["params/fc2"])]
  assert g[1].producers[0].axis == 1 and g[1].consumers[0].axis == 0
  assert len(g.unprunable) == 1 and g.unprunable[0].size == 10


class ConcatFlatten(nn.Module):
  """Two conv branches concatenated, a conv on the concatenation, then flatten -> Dense."""
  a: int = 4
  b: int = 6
  c: int = 5

  @nn.compact
  def __call__(self, x):
    ya = nn.relu(nn.Conv(self.a, (3, 3), name="conv_a")(x))
    yb = nn.relu(nn.Conv(self.b, (1, 1), name="conv_b")(x))
    y = jnp.concatenate([ya, yb], axis=-1)
    y = nn.relu(nn.Conv(self.c, (3, 3), padding="VALID", name="conv_c")(y))
    y = y.reshape((y.shape[0], -1))
    return nn.Dense(3, name="head")(y)


def test_concatenation_offsets_and_flatten_rows():
  model = ConcatFlatten()
  v = model.init(jax.random.key(0), jnp.zeros((1, 6, 6, 2)))
  g = jp.groups(model.apply, v, jnp.zeros((2, 6, 6, 2)))
  by_name = {x.name: x for x in g}
  ga, gb, gc = by_name["params/conv_a"], by_name["params/conv_b"], by_name["params/conv_c"]
  ca = next(m for m in ga.consumers if m.path == "params/conv_c/kernel")
  cb = next(m for m in gb.consumers if m.path == "params/conv_c/kernel")
  np.testing.assert_array_equal(ca.positions(4)[:, 0], np.arange(4))
  np.testing.assert_array_equal(cb.positions(6)[:, 0], 4 + np.arange(6))
  # conv_c's 5 channels on a 4x4 map flattened NHWC: channel j at rows s * 5 + j
  head = gc.consumers[0]
  assert head.path == "params/head/kernel" and head.index.shape == (5, 16)
  np.testing.assert_array_equal(head.index, np.arange(16)[None, :] * 5 + np.arange(5)[:, None])


def test_concatenation_model_mask_equals_shrink():
  model = ConcatFlatten()
  v = model.init(jax.random.key(0), jnp.zeros((1, 6, 6, 2)))
  x = jax.random.normal(jax.random.key(1), (3, 6, 6, 2))
  g = jp.groups(model.apply, v, x)
  keeps = {"params/conv_a": np.array([0, 2, 3]), "params/conv_b": np.array([1, 4]), "params/conv_c": np.array([0, 1, 4])}
  masked = v
  plans = []
  for grp in g:
    masked = jp.write_channels(masked, grp, keeps[grp.name])
    plans.append((grp, keeps[grp.name]))
  shrunk = jp.shrink_channels(masked, plans)
  small = ConcatFlatten(a=3, b=2, c=3)
  np.testing.assert_allclose(small.apply(shrunk, x), model.apply(masked, x), atol=1e-5)
  assert not np.allclose(model.apply(masked, x), model.apply(v, x))


class ClassToken(nn.Module):
  """A ViT's class token, copied over the batch by ``jnp.tile`` and put before the tokens."""
  width: int = 8
  repeat_channels: bool = False

  @nn.compact
  def __call__(self, x):   # (B, T, 6)
    h = nn.Dense(self.width, name="embed")(x)
    cls = self.param("cls", nn.initializers.normal(1.0), (1, 1, self.width))
    h = jnp.concatenate([jnp.tile(cls, (x.shape[0], 1, 1)), h], axis=1)
    if self.repeat_channels:
      h = jnp.tile(h, (1, 1, 2))[..., :self.width]
    h = nn.relu(nn.Dense(5, name="mix")(h))
    return nn.Dense(3, name="head")(h[:, 0])


def test_a_tiled_class_token_joins_its_channels_group():
  model = ClassToken()
  x = jax.random.normal(jax.random.key(1), (4, 5, 6))
  v = model.init(jax.random.key(0), x[:1])
  g = jp.groups(model.apply, v, x[:1])
  embed = next(grp for grp in g if grp.name == "params/embed")
  assert ("params/cls", 2) in {(m.path, m.axis) for m in embed.members}
  assert not embed.mask_note
  shrunk = jp.prune_channels(v, g, {g.groups.index(embed): 0.5}, show_progress=False)
  masked = jp.prune_channels(v, g, {g.groups.index(embed): 0.5}, mode="mask", show_progress=False)
  assert shrunk.params["params"]["cls"].shape == (1, 1, 4)
  np.testing.assert_allclose(ClassToken(width=4).apply(shrunk.params, x), model.apply(masked.params, x), atol=1e-5)
  # copies of the channel axis itself repeat channels: not prunable, and the reason says so
  repeated = ClassToken(repeat_channels=True)
  g = jp.groups(repeated.apply, v, x[:1])
  assert "params/embed" not in [grp.name for grp in g]
  assert any("tile" in u.reason for u in g.unprunable if u.name == "params/embed")


def test_unsupported_and_mixing_ops_make_channels_unprunable_with_a_reason():
  class Mixed(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.relu(nn.Dense(6, name="sorted")(x))
      h = jnp.sort(h, axis=-1)                  # mixes channels
      k = nn.relu(nn.Dense(5, name="cum")(x))
      k = jax.lax.cumsum(k, axis=1)
      r = nn.relu(nn.Dense(4, name="plain")(x))
      return nn.Dense(2, name="out")(jnp.concatenate([h, k, r], -1))

  model = Mixed()
  v = model.init(jax.random.key(0), jnp.zeros((1, 3)))
  g = jp.groups(model.apply, v, jnp.zeros((2, 3)))
  assert [x.name for x in g] == ["params/plain"]
  reasons = {u.name: u.reason for u in g.unprunable}
  assert "sort mixes entries" in reasons["params/sorted"]
  assert "cumsum mixes entries" in reasons["params/cum"]


def test_exclude_moves_groups_to_unprunable():
  model = models.resnet20()
  g = jp.groups(model.apply, shapes(model), CIFAR, exclude=["*downsample*"])
  assert len(g) == 9   # the three residual groups hold a downsample conv
  assert all("excluded by the user" in u.reason for u in g.unprunable if u.size != 10)


class NNXMLP(nnx.Module):
  def __init__(self, widths, rngs):
    self.fc1 = nnx.Linear(4, widths[0], rngs=rngs)
    self.bn = nnx.BatchNorm(widths[0], use_running_average=True, rngs=rngs)
    self.fc2 = nnx.Linear(widths[0], widths[1], rngs=rngs)
    self.fc3 = nnx.Linear(widths[1], 3, rngs=rngs)

  def __call__(self, x):
    return self.fc3(nnx.relu(self.fc2(nnx.relu(self.bn(self.fc1(x))))))


def test_nnx_groups_prune_and_rebuild():
  graphdef, state = nnx.split(NNXMLP((6, 5), nnx.Rngs(0)))
  apply = lambda s, x: nnx.merge(graphdef, s)(x)
  x = jax.random.normal(jax.random.key(1), (7, 4))
  g = jp.groups(apply, state, x)
  assert table_of(g) == [(5, ["fc2"], ["fc3"]), (6, ["fc1"], ["fc2"])]
  assert {m.path: m.kind for m in g[1].producers} == {"fc1/kernel": "kernel", "fc1/bias": "bias", "bn/scale": "norm",
                                                      "bn/bias": "norm", "bn/mean": "stat", "bn/var": "stat"}
  res = jp.prune_channels(state, g, 0.5, mode="shrink", show_progress=False)
  small_def, _ = nnx.split(NNXMLP((3, 2), nnx.Rngs(0)))
  shrunk_out = nnx.merge(small_def, res.params)(x)
  masked = jp.prune_channels(state, g, 0.5, mode="mask", show_progress=False)
  np.testing.assert_allclose(shrunk_out, apply(masked.params, x), atol=1e-5)


def test_make_group_by_hand_equals_the_traced_group():
  model = models.mlpnet()
  v = init(model, (1, 784))
  traced = jp.groups(model.apply, v, jnp.zeros((1, 784)))[1]
  manual = jp.make_group(v, producers=[("params/fc1/kernel", 1)], consumers=[("params/fc2/kernel", 0)])
  assert manual == traced
  with pytest.raises(KeyError, match="no leaf"):
    jp.make_group(v, producers=[("params/fc9/kernel", 1)])
  with pytest.raises(ValueError, match="has 20 entries"):
    jp.make_group(v, producers=[("params/fc1/kernel", 1)], consumers=[("params/fc3/kernel", 0)])
  with pytest.raises(ValueError, match="needs at least one producer"):
    jp.make_group(v, producers=[])


def test_groups_bad_input():
  model = models.mlpnet()
  v = init(model, (1, 784))
  with pytest.raises(TypeError, match="apply_fn"):
    jp.groups(None, v, jnp.zeros((1, 784)))
  with pytest.raises(ValueError, match="variables"):
    jp.groups(model.apply, {}, jnp.zeros((1, 784)))


@pytest.mark.parametrize("method", ["prune_channels", "intra_fusion", "ispasp"])
def test_groups_of_another_tree_are_rejected_before_any_work(method):
  model = models.mlpnet()
  v = init(model, (1, 784))
  groups = jp.groups(model.apply, v, jnp.zeros((1, 784)))
  x = jnp.ones((8, 784))
  call = {"prune_channels": jp.prune_channels, "intra_fusion": jp.intra_fusion,
          "ispasp": lambda p, g, s: jp.ispasp(p, g, s, apply_fn=lambda q, x: model.apply({"params": q}, x), batch=x)}[method]
  # the linen variables' groups given its params dict: paths start with "params/"
  with pytest.raises(ValueError, match=r"refers to 'params/fc\d/kernel'.*it has 'fc\d/kernel'"):
    call(v["params"], groups, 0.5)
  for widths in ((20, 10), (80, 40)):   # a narrower and a wider MLPNet: fc2 has 10 or 40 outputs, not 20
    other = init(models.mlpnet(widths=widths), (1, 784))
    with pytest.raises(ValueError, match=re.escape("group 0 needs exactly 20 rows (one per channel) on axis 1 of "
                                                   f"'params/fc2/kernel', whose shape is {widths}")):
      call(other, groups, 0.5)


@jax.custom_vjp
def _clipped_relu(x):
  return jnp.clip(x, 0.0, 6.0)


_clipped_relu.defvjp(lambda x: (_clipped_relu(x), x), lambda x, g: (g * ((x > 0) & (x < 6)),))


def test_remat_and_custom_vjp_sub_jaxprs_are_followed():
  class Plain(nn.Module):
    wrap: bool = False

    @nn.compact
    def __call__(self, x):
      dense = nn.remat(nn.Dense) if self.wrap else nn.Dense
      h = dense(7, name="fc1")(x)
      h = _clipped_relu(h) if self.wrap else jnp.clip(h, 0.0, 6.0)
      h = jax.checkpoint(jnp.tanh)(h) if self.wrap else jnp.tanh(h)
      return nn.Dense(2, name="fc2")(h)

  x = jnp.zeros((2, 3))
  v = Plain().init(jax.random.key(0), x)
  plain = jp.groups(Plain().apply, v, x)
  wrapped = jp.groups(Plain(wrap=True).apply, v, x)
  assert table_of(wrapped) == table_of(plain) == [(7, ["params/fc1"], ["params/fc2"])]


def test_transposed_conv_kernels_keep_their_roles():
  class Up(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.relu(nn.Conv(6, (3, 3), name="enc")(x))
      h = nn.relu(nn.ConvTranspose(5, (3, 3), strides=(2, 2), name="up")(h))   # flips its kernel (rev)
      return nn.Conv(2, (1, 1), name="head")(h).mean(axis=(1, 2))

  model = Up()
  v = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  g = jp.groups(model.apply, v, jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32))
  assert table_of(g) == [(5, ["params/up"], ["params/head"]), (6, ["params/enc"], ["params/up"])]


def test_a_group_is_named_by_its_producer_module_or_by_a_top_level_kernel_itself():
  """A linen ``self.param`` at the top of the model is ``params/w``: the group was named
  ``"params"`` (the collection). Module kernels keep their module's path; pure dicts their key."""
  class Top(nn.Module):
    @nn.compact
    def __call__(self, x):
      w = self.param("w", nn.initializers.lecun_normal(), (x.shape[-1], 8))
      return nn.Dense(3, name="head")(jax.nn.relu(nn.Dense(6, name="fc")(jax.nn.relu(x @ w))))

  v = Top().init(jax.random.key(0), jnp.zeros((1, 4)))
  names = [g.name for g in jp.groups(Top().apply, v, jnp.zeros((1, 4)))]
  assert names == ["params/fc", "params/w"]
  params = {"w1": jnp.ones((4, 8)), "w2": jnp.ones((8, 3))}
  g = jp.groups(lambda p, x: jax.nn.relu(x @ p["w1"]) @ p["w2"], params, jnp.ones((1, 4)))
  assert [grp.name for grp in g] == ["w1"] and g[0].modules() == ("w1", "w2")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.models import MLP, CifarResNet, MobileNetV1, VGG, mlpnet, resnet18, resnet20, two_layer_mlp, vgg11_bn

X32 = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
X28 = jnp.asarray(np.random.default_rng(0).normal(size=(2, 28, 28, 1)), jnp.float32)

MODELS = [
    (mlpnet(), X28, 32360, MLP), (two_layer_mlp(64), X28, 784 * 64 + 64 * 10, MLP),
    (resnet20(), X32, None, CifarResNet), (resnet18(), X32, None, CifarResNet),
    (vgg11_bn(), X32, None, VGG), (MobileNetV1(), X32, None, MobileNetV1)]


@pytest.mark.parametrize("model, x, n_kernel, cls", MODELS, ids=lambda m: type(m).__name__)
def test_init_apply_and_from_params_roundtrip(model, x, n_kernel, cls):
  v = model.init(jax.random.key(0), x)
  y = model.apply(v, x)
  assert y.shape == (2, 10)
  if n_kernel is not None:
    assert sum(l.size for p, l in jax.tree_util.tree_leaves_with_path(v) if "kernel" in str(p[-1])) == n_kernel
  rebuilt = cls.from_params(v)
  np.testing.assert_allclose(rebuilt.apply(v, x), y, rtol=1e-5, atol=1e-5)
  if "batch_stats" in v:
    _, updates = model.apply(v, x, train=True, mutable=["batch_stats"])
    assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(v["batch_stats"])


def test_mlpnet_has_no_bias_and_the_reference_widths():
  v = mlpnet().init(jax.random.key(0), X28)
  assert {k: tuple(l["kernel"].shape) for k, l in v["params"].items()} == {
      "fc1": (784, 40), "fc2": (40, 20), "fc3": (20, 10)}
  assert all("bias" not in l for l in v["params"].values())


def test_resnet20_architecture():
  v = resnet20().init(jax.random.key(0), X32)
  p = v["params"]
  assert p["conv1"]["kernel"].shape == (3, 3, 3, 16)
  assert [k for k in p if k.startswith("layer")] == [f"layer{s}_{b}" for s in (1, 2, 3) for b in range(3)]
  assert "downsample_conv" in p["layer2_0"] and "downsample_conv" in p["layer3_0"]
  assert "downsample_conv" not in p["layer1_0"] and "downsample_conv" not in p["layer2_1"]
  assert p["layer3_0"]["downsample_conv"]["kernel"].shape == (1, 1, 32, 64)
  inner = sum(p[f"layer{s}_{b}"][c]["kernel"].size for s in (1, 2, 3) for b in range(3) for c in ("conv1", "conv2"))
  assert inner == 267264   # the 18 block convs pruned by CHITA/EWR
  assert set(v["batch_stats"]["bn1"]) == {"mean", "var"}


def test_mobilenet_depthwise_kernels():
  v = MobileNetV1().init(jax.random.key(0), X32)
  assert v["params"]["block1"]["dw"]["kernel"].shape == (3, 3, 1, 64)
  assert v["params"]["block12"]["pw"]["kernel"].shape == (1, 1, 1024, 1024)


def _shrink_resnet20_hidden(v, keep):
  """Structurally removes hidden channels (conv1 out / bn1 / conv2 in) of every block by hand."""
  p = jax.tree.map(lambda x: x, v["params"])
  s = jax.tree.map(lambda x: x, v["batch_stats"])
  for name in [k for k in p if k.startswith("layer")]:
    n = p[name]["conv1"]["kernel"].shape[-1]
    idx = np.arange(0, n, n // keep)[:keep] if keep < n else np.arange(n)
    p[name]["conv1"]["kernel"] = p[name]["conv1"]["kernel"][..., idx]
    p[name]["bn1"] = {k: a[idx] for k, a in p[name]["bn1"].items()}
    s[name]["bn1"] = {k: a[idx] for k, a in s[name]["bn1"].items()}
    p[name]["conv2"]["kernel"] = p[name]["conv2"]["kernel"][:, :, idx, :]
  return {"params": p, "batch_stats": s}


def test_from_params_rebuilds_a_structurally_pruned_resnet():
  v = resnet20().init(jax.random.key(0), X32)
  small = _shrink_resnet20_hidden(v, 8)
  model = CifarResNet.from_params(small)
  assert model.hidden_widths == (8,) * 9
  assert model.apply(small, X32).shape == (2, 10)
  with pytest.raises(Exception):
    resnet20().apply(small, X32)   # the dense architecture cannot run the shrunk tree


def test_from_params_rebuilds_pruned_mlp_and_vgg():
  v = mlpnet().init(jax.random.key(0), X28)
  p = v["params"]
  small = {"params": {"fc1": {"kernel": p["fc1"]["kernel"][:, :25]}, "fc2": {"kernel": p["fc2"]["kernel"][:25, :7]},
                      "fc3": {"kernel": p["fc3"]["kernel"][:7]}}}
  assert MLP.from_params(small).widths == (25, 7)
  assert MLP.from_params(small).apply(small, X28).shape == (2, 10)
  vgg = VGG(cfg=(8, "M", 16, "M", 16, 16, "M", 32, 32, "M", 32, 32, "M"))
  vv = vgg.init(jax.random.key(0), X32)
  np.testing.assert_allclose(VGG.from_params(vv).apply(vv, X32), vgg.apply(vv, X32), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_transformer_from_params_reads_every_width_back(kv_heads):
  from jaxprune.models import BlockWidths, Transformer, transformer
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 16, size=(3, 12)), jnp.int32)
  model = transformer(kv_heads=kv_heads)
  v = model.init(jax.random.key(0), tokens)
  assert model.apply(v, tokens).shape == (3, 2)
  rebuilt = Transformer.from_params(v)
  assert rebuilt.blocks == (BlockWidths(4, kv_heads or 4, 8, 8, 64),) * 2 and rebuilt.width == 32
  np.testing.assert_allclose(rebuilt.apply(v, tokens), model.apply(v, tokens), rtol=1e-5, atol=1e-5)
  uneven = Transformer(vocab=16, length=12, width=24, blocks=(BlockWidths(3, 1, 4, 6, 40), BlockWidths(2, 2, 8, 5, 7)))
  w = uneven.init(jax.random.key(1), tokens)
  assert Transformer.from_params(w) == uneven      # per-block widths, as a pruned tree has them
  with pytest.raises(ValueError, match="kv_heads"):
    transformer(heads=4, kv_heads=3).init(jax.random.key(0), tokens)

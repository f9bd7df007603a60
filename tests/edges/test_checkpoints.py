"""Real checkpoints on real data: the accuracies the pruning literature starts from."""
import numpy as np
import pytest

import jaxprune as jp
from jaxprune.models import mlpnet, resnet20


def test_mlpnet_checkpoint_reproduces_mnist_accuracy(mlpnet_variables, mnist_test):
  ev = jp.evaluate(mlpnet().apply, mlpnet_variables, mnist_test.x, mnist_test.y)
  assert ev.n == 10000
  assert ev.accuracy == pytest.approx(0.9397, abs=5e-5)


def test_resnet20_checkpoint_reproduces_cifar_accuracy(checkpoint_dir, data_dir):
  v = jp.load_resnet20(checkpoint_dir / "resnet20_cifar10.npz")
  test = jp.data.load("cifar10_png5k", "test", data_dir=data_dir, source="local")
  ev = jp.evaluate(resnet20().apply, v, test.x, test.y, batch_size=500)
  assert ev.n == 1000
  assert ev.accuracy == pytest.approx(0.907, abs=5e-4)


def test_checkpoint_layout_conversion(checkpoint_dir):
  raw = np.load(checkpoint_dir / "resnet20_cifar10.npz")
  v = jp.load_resnet20(checkpoint_dir / "resnet20_cifar10.npz")
  np.testing.assert_array_equal(v["params"]["layer2_0"]["conv1"]["kernel"],
                                raw["layer2.0.conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(v["params"]["fc"]["kernel"], raw["fc.weight"].T)
  np.testing.assert_array_equal(v["batch_stats"]["layer3_0"]["downsample_bn"]["var"],
                                raw["layer3.0.downsample.1.running_var"])
  np.testing.assert_array_equal(v["params"]["layer3_0"]["downsample_bn"]["scale"],
                                raw["layer3.0.downsample.1.weight"])
  with pytest.raises(FileNotFoundError):
    jp.load_mlpnet(checkpoint_dir / "missing.npz")


def test_global_magnitude_at_090_on_mlpnet_matches_the_published_mp(mlpnet_variables, mnist_test):
  """One-shot global MP at sparsity 0.9 (published: 90.30 in the CBS/CHITA tables)."""
  params = mlpnet_variables["params"]
  k = jp.k_from_sparsity(params, 0.9)
  assert k == 3236
  res = jp.magnitude(params, k)
  rep = jp.sparsity_report(res.params)
  assert rep.nonzero == k
  acc = jp.evaluate(mlpnet().apply, {"params": res.params}, mnist_test.x, mnist_test.y).accuracy
  assert abs(acc - 0.9030) < 0.003
  layer = jp.evaluate(mlpnet().apply, {"params": jp.magnitude(params, k, scope="layer").params},
                      mnist_test.x, mnist_test.y).accuracy
  assert layer < acc   # the published MP column is global, not layer-wise


def test_chita_budget_convention_reproduces_the_published_mp_column(mlpnet_variables, mnist_test):
  """With the CBS/CHITA budget k = int((1 - s) p), global MP gives the published column exactly."""
  params = mlpnet_variables["params"]
  published = {0.8: 0.9289, 0.9: 0.9030, 0.98: 0.3225}   # CBS exp_table.txt, MP column
  for s, acc in published.items():
    k = jp.k_from_sparsity(params, s, rounding="chita")
    got = jp.evaluate(mlpnet().apply, {"params": jp.magnitude(params, k).params}, mnist_test.x, mnist_test.y)
    assert got.accuracy == pytest.approx(acc, abs=5e-5)

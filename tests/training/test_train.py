"""train_epochs: loss goes down, BatchNorm statistics update only in train mode, augmentation keeps shapes."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp
from jaxprune import models
from jaxprune.training.train import cifar_augment, train_epochs


def test_training_lowers_the_loss_and_updates_batch_stats():
  data = jp.data.digits("train")
  model = models.MLP(widths=(32,), num_classes=10)
  v = model.init(jax.random.key(0), data.x[:1])
  res = train_epochs(model.apply, v, data, epochs=3, optimizer=optax.adam(1e-2), batch_size=64, show_progress=False)
  assert res.losses[-1] < 0.5 * res.losses[0]
  cnn = models.resnet20(widths=(4, 8, 8))
  x = np.random.default_rng(0).normal(size=(64, 8, 8, 3)).astype(np.float32)
  small = jp.data.Dataset(x, np.arange(64) % 10)
  v = cnn.init(jax.random.key(0), x[:1])
  trained = train_epochs(cnn.apply, v, small, epochs=1, optimizer=optax.sgd(0.01), batch_size=32, show_progress=False)
  frozen = train_epochs(cnn.apply, v, small, epochs=1, optimizer=optax.sgd(0.01), batch_size=32, train_bn=False,
                        show_progress=False)
  mean = lambda t: np.asarray(t.params["batch_stats"]["bn1"]["mean"])
  assert not np.allclose(mean(trained), 0.0) and np.array_equal(mean(frozen), np.zeros(4))
  with pytest.raises(ValueError, match="epochs"):
    train_epochs(cnn.apply, v, small, epochs=-1, optimizer=optax.sgd(0.01))


def test_cifar_augment_crops_and_flips_per_image():
  x = jnp.arange(2 * 32 * 32 * 3, dtype=jnp.float32).reshape(2, 32, 32, 3)
  out = cifar_augment(jax.random.key(1), x)
  assert out.shape == x.shape
  assert not np.array_equal(out, x)
  # every output pixel comes from the image or the zero padding
  assert set(np.unique(out[0])) <= set(np.unique(x[0])) | {0.0}

"""Small models shared by the tests (a linen MLP with BatchNorm and its NNX twin), and a counter
of the XLA programs a call compiles."""
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Dense(6, name="Dense_0")(x)
    x = nn.BatchNorm(use_running_average=not train, name="BatchNorm_0")(x)
    x = nn.Dense(5, name="Dense_1")(nn.relu(x))
    return nn.Dense(3, name="Dense_2")(nn.relu(x))


class NNXNet(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(4, 6, rngs=rngs)
    self.bn = nnx.BatchNorm(6, rngs=rngs)
    self.fc2 = nnx.Linear(6, 5, rngs=rngs)
    self.fc3 = nnx.Linear(5, 3, rngs=rngs)

  def __call__(self, x):
    return self.fc3(nnx.relu(self.fc2(nnx.relu(self.bn(self.fc1(x))))))


def linen_variables(seed=0):
  return LinenNet().init(jax.random.key(seed), jnp.ones((2, 4)))


def nnx_split(seed=0):
  """``(graphdef, params: nnx.State, rest)`` of the NNX twin."""
  return nnx.split(NNXNet(nnx.Rngs(seed)), nnx.Param, ...)


def classification_problem(n=37, seed=0):
  """``(model, variables, (x, y), loss_fn)``: the linen net on random 4-feature, 3-class data."""
  import numpy as np
  from jaxprune import signals
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(n, 4)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, size=n), jnp.int32)
  model = LinenNet()
  v = model.init(jax.random.key(seed), x[:2])
  return model, v, (x, y), signals.classification_loss(model.apply)


def compilations(fn) -> tuple:
  """``(fn(), names)``: ``names`` are the XLA programs ``fn()`` compiled (the ``Compiling ...``
  records of ``jax.log_compiles``), its result's leaves waited for."""
  seen = []

  class Record(logging.Handler):
    def emit(self, record):
      if record.getMessage().startswith("Compiling"):
        seen.append(record.getMessage().split(" with ")[0])
  handler, logger = Record(), logging.getLogger("jax")
  logger.addHandler(handler)
  try:
    with jax.log_compiles():
      result = fn()
      jax.block_until_ready(jax.tree_util.tree_leaves(getattr(result, "params", result)))
  finally:
    logger.removeHandler(handler)
  return result, seen

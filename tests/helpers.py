"""Small models shared by the tests: a linen MLP with BatchNorm and its NNX twin."""
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

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("JAXPRUNE_NO_PROGRESS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("JAXPRUNE_SHARED", REPO.parent / "shared"))


def _need(path: Path) -> Path:
  if not path.exists():
    pytest.fail(f"shared data missing at {path}: set JAXPRUNE_SHARED to the shared/ folder", pytrace=False)
  return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
  return _need(Path(os.environ.get("JAXPRUNE_DATA_DIR", SHARED / "data")))


@pytest.fixture(scope="session")
def checkpoint_dir() -> Path:
  return _need(SHARED / "checkpoints")


@pytest.fixture(scope="session")
def mnist_test(data_dir):
  import jaxprune
  return jaxprune.data.load("mnist", "test", data_dir=data_dir, source="local")


@pytest.fixture(scope="session")
def mlpnet_variables(checkpoint_dir):
  import jaxprune
  return jaxprune.load_mlpnet(checkpoint_dir / "mlpnet_mnist.npz")


@pytest.fixture
def rng():
  return np.random.default_rng(0)

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("JAXPRUNE_NO_PROGRESS", "1")
os.environ.setdefault("JAXPRUNE_COMPILATION_CACHE", "none")   # the CLI would set a process-wide cache

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("JAXPRUNE_SHARED", REPO.parent / "shared"))
# CI sets this: a missing shared file is then a failure, never a skip.
REQUIRE_SHARED = os.environ.get("JAXPRUNE_REQUIRE_SHARED", "") not in ("", "0")
REALDATA_FIXTURES = {"data_dir", "checkpoint_dir", "mnist_test", "mlpnet_variables", "shared_dir"}


def pytest_collection_modifyitems(config, items):
  # Every test that reads ../shared (through the fixtures below) carries the realdata marker.
  for item in items:
    if REALDATA_FIXTURES & set(getattr(item, "fixturenames", ())):
      item.add_marker(pytest.mark.realdata)


def _need(path: Path) -> Path:
  if not path.exists():
    reason = f"needs the shared data at {path} (set JAXPRUNE_SHARED to the shared/ folder)"
    if REQUIRE_SHARED:
      pytest.fail(reason + "; JAXPRUNE_REQUIRE_SHARED is set", pytrace=False)
    pytest.skip(reason)
  return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
  return _need(SHARED)


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


@pytest.fixture(scope="module", autouse=True)
def _release_compilations():
  # Compiled executables of one module are rarely reused by the next; dropping them keeps the
  # suite's peak memory at what one module needs (XLA:CPU caches grow to gigabytes otherwise).
  yield
  _release()


@pytest.fixture(autouse=True)
def _release_per_test(request):
  # Modules whose tests each compile large programs (RELEASE_EACH_TEST = True) drop them per test.
  yield
  if getattr(request.module, "RELEASE_EACH_TEST", False):
    _release()


def _release():
  import ctypes
  import gc
  import jax
  jax.clear_caches()
  gc.collect()
  try:   # hand the freed heap back to the OS (glibc keeps it otherwise, and the peak only grows)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


@pytest.fixture
def rng():
  return np.random.default_rng(0)

import gzip
import struct

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxprune import data


def _write_idx(path, arr, gz):
  header = struct.pack(">II", 2051 if arr.ndim == 3 else 2049, arr.shape[0])
  if arr.ndim == 3:
    header += struct.pack(">II", *arr.shape[1:])
  (gzip.open if gz else open)(path, "wb").write(header + arr.astype(np.uint8).tobytes())


@pytest.mark.parametrize("gz", [True, False])
def test_idx_files_and_mnist_layout(tmp_path, gz, monkeypatch):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
  labels = rng.integers(0, 10, size=6, dtype=np.uint8)
  (tmp_path / "mnist").mkdir()
  suffix = ".gz" if gz else ""
  _write_idx(tmp_path / "mnist" / f"t10k-images-idx3-ubyte{suffix}", images, gz)
  _write_idx(tmp_path / "mnist" / f"t10k-labels-idx1-ubyte{suffix}", labels, gz)
  raw = data.load("mnist", "test", data_dir=tmp_path, normalization=None)
  np.testing.assert_array_equal(raw.x[..., 0], images)
  np.testing.assert_array_equal(raw.y, labels)
  monkeypatch.setenv(data.ENV_VAR, str(tmp_path))
  norm = data.load("mnist", "test", source="local")     # found through $JAXPRUNE_DATA_DIR
  np.testing.assert_allclose(norm.x[..., 0], (images / 255.0 - 0.1307) / 0.3081, rtol=1e-5, atol=1e-5)
  custom = data.load("mnist", "test", source="local", normalization=((0.0,), (1.0,)), limit=2)
  assert custom.x.shape == (2, 28, 28, 1) and custom.x.max() <= 1.0


def test_shared_files(data_dir):
  tr = data.load("mnist", "train", data_dir=data_dir, source="local", normalization=None)
  assert tr.x.shape == (60000, 28, 28, 1) and tr.x.dtype == np.uint8 and len(tr) == 60000
  c = data.load("cifar10_png5k", "train", data_dir=data_dir, source="local")
  assert c.x.shape == (4000, 32, 32, 3) and c.x.dtype == np.float32
  assert -1.0 <= c.x.min() and c.x.max() <= 1.0
  assert set(np.unique(c.y)) == set(range(10))


def test_missing_local_files_are_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no local files"):
    data.load("mnist", "test", data_dir=tmp_path, source="local")
  with pytest.raises(ValueError, match="no local format"):
    data.load("fashion_mnist", "test", data_dir=tmp_path, source="local")
  with pytest.raises(ValueError, match="source"):
    data.load("mnist", source="web")


def test_tfds_path_with_mock_data(tmp_path):
  with tfds.testing.mock_data(num_examples=12):
    ds = data.load("mnist", "train", source="tfds", download=True)
    assert ds.x.shape == (12, 28, 28, 1) and ds.y.shape == (12,) and ds.y.dtype == np.int32
    # auto falls back to tfds when no local file exists
    auto = data.load("cifar10", "test", data_dir=tmp_path, normalization=None, download=True)
    assert auto.x.shape == (12, 32, 32, 3) and auto.x.dtype == np.uint8
    other = data.load("fashion_mnist", "test", limit=5, download=True)
    assert other.x.shape == (5, 28, 28, 1)


def test_batches_cover_every_example_once():
  d = data.Dataset(np.arange(10)[:, None], np.arange(10))
  got = [b.y for b in data.batches(d, 4, shuffle=True, seed=1)]
  assert [len(g) for g in got] == [4, 4, 2]
  assert sorted(np.concatenate(got)) == list(range(10))
  assert [len(b.y) for b in data.batches(d, 4, drop_remainder=True)] == [4, 4]
  with pytest.raises(ValueError, match="batch_size"):
    next(data.batches(d, 0))


def test_digits_is_embedded_and_split():
  tr, te = data.digits("train"), data.digits("test")
  assert len(tr) + len(te) == 1797 and tr.x.shape[1:] == (8, 8, 1)
  with pytest.raises(ValueError, match="split"):
    data.digits("val")


def test_repeats_is_generated_balanced_and_labelled_by_a_recurring_first_token():
  train, test = data.repeats("train"), data.repeats("test")
  assert train.x.shape == (4000, 12) and test.x.shape == (1000, 12) and train.x.dtype == np.int32
  for d in (train, test):
    expected = np.array([row[0] in row[1:] for row in d.x])
    np.testing.assert_array_equal(d.y, expected)            # an independent reading of the rule
    assert 0.4 < d.y.mean() < 0.6
  assert not np.array_equal(train.x[:1000], test.x)          # independent streams
  np.testing.assert_array_equal(data.repeats("test").x, test.x)   # deterministic
  assert data.repeats("train", 10, length=5, vocab=3, seed=2).x.max() < 3
  with pytest.raises(ValueError, match="split"):
    data.repeats("val")
  with pytest.raises(ValueError, match="length"):
    data.repeats("train", length=1)


def test_offline_load_fails_fast_naming_data_dir_and_the_variable(tmp_path, monkeypatch):
  # No local files and no prepared tfds copy: a FileNotFoundError that says where to point, no download.
  monkeypatch.delenv("JAXPRUNE_DATA_DIR", raising=False)
  for kwargs in ({}, {"data_dir": tmp_path}, {"data_dir": tmp_path, "source": "tfds"}):
    with pytest.raises(FileNotFoundError, match="JAXPRUNE_DATA_DIR") as err:
      data.load("mnist", "test", **kwargs)
    assert "data_dir" in str(err.value) and "download=True" in str(err.value)

"""Datasets as numpy arrays: local files on offline machines, tensorflow-datasets where online.

Local files are looked up in ``data_dir`` (argument), else ``$JAXPRUNE_DATA_DIR``:

* ``mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` (official IDX files)
* ``cifar10/cifar10_png5k.npz`` (name ``"cifar10_png5k"``: 4000 train / 1000 test, lossless)
* ``cifar10/cifar10_jpeg60k.npz`` (name ``"cifar10"``: all 60000 images, decoded from JPEG)

Any other name (and mnist/cifar10 when no local file is found) goes through
``tfds.data_source``, which needs no TensorFlow. Images come back NHWC.
"""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from jaxprune.training.batches import Dataset, batches  # noqa: F401  (re-exported: data.batches)

ENV_VAR = "JAXPRUNE_DATA_DIR"

# (mean, std) applied after x / 255; the checkpoints' own preprocessing.
NORMALIZATION = {
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),       # ResNet20 checkpoint (0.907 on png5k test)
    "cifar10_png5k": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}

_LOCAL_FILES = {
    "cifar10": "cifar10/cifar10_jpeg60k.npz",
    "cifar10_png5k": "cifar10/cifar10_png5k.npz",
}
_MNIST_SPLITS = {"train": "train", "test": "t10k"}


def resolve_data_dir(data_dir: Optional[Union[str, os.PathLike]] = None) -> Optional[Path]:
  """``data_dir`` if given, else ``$JAXPRUNE_DATA_DIR``, else ``None``."""
  if data_dir is None:
    data_dir = os.environ.get(ENV_VAR) or None
  return None if data_dir is None else Path(data_dir).expanduser()


def read_idx(path: Union[str, os.PathLike]) -> np.ndarray:
  """Reads an IDX file (optionally gzipped): images ``(N, rows, cols)`` or labels ``(N,)``, uint8."""
  path = Path(path)
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rb") as f:
    data = f.read()
  magic, count = struct.unpack(">II", data[:8])
  if magic == 2049:
    arr = np.frombuffer(data, np.uint8, count, offset=8)
  elif magic == 2051:
    rows, cols = struct.unpack(">II", data[8:16])
    arr = np.frombuffer(data, np.uint8, count * rows * cols, offset=16).reshape(count, rows, cols)
  else:
    raise ValueError(f"{path}: not an IDX file of uint8 images or labels (magic {magic})")
  return arr.copy()


def _find(root: Path, rel: str) -> Optional[Path]:
  for candidate in (root / rel, root / (rel + ".gz")):
    if candidate.exists():
      return candidate
  return None


def _local(name: str, split: str, root: Path) -> Optional[Dataset]:
  if name == "mnist":
    stem = _MNIST_SPLITS[split]
    images = _find(root, f"mnist/{stem}-images-idx3-ubyte") or _find(root, f"{stem}-images-idx3-ubyte")
    labels = _find(root, f"mnist/{stem}-labels-idx1-ubyte") or _find(root, f"{stem}-labels-idx1-ubyte")
    if images is None or labels is None:
      return None
    return Dataset(read_idx(images)[..., None], read_idx(labels).astype(np.int32))
  rel = _LOCAL_FILES.get(name)
  if rel is None or not (root / rel).exists():
    return None
  with np.load(root / rel) as f:
    return Dataset(f[f"{split}_x"], f[f"{split}_y"].astype(np.int32))


def _missing(name: str, split: str, root: Optional[Path], why: str) -> str:
  where = f"data_dir={str(root)!r}" if root is not None else f"data_dir=None and ${ENV_VAR} unset"
  return (f"dataset {name!r} split {split!r}: no local files ({where}) and {why}. Pass data_dir= or set "
          f"${ENV_VAR} to the folder holding the files, or download=True to let tensorflow-datasets fetch it")


def _tfds(name: str, split: str, data_dir: Optional[Path], download: bool,
          image_key: str, label_key: str, local_root: Optional[Path]) -> Dataset:
  import tensorflow_datasets as tfds  # imported lazily: heavy, and only needed here
  tfds_dir = None if data_dir is None else str(data_dir)
  try:
    source = tfds.data_source(name, split=split, data_dir=tfds_dir, download=download)
  except Exception as err:   # without download: not prepared (tfds raises KeyError/AssertionError), or unknown
    if download:
      raise
    raise FileNotFoundError(_missing(name, split, local_root,
                                     f"no prepared tensorflow-datasets copy ({type(err).__name__}: {err})")) from None
  records = [source[i] for i in range(len(source))]
  x = np.stack([np.asarray(r[image_key]) for r in records])
  y = np.asarray([r[label_key] for r in records], dtype=np.int32)
  if x.ndim == 3:
    x = x[..., None]
  return Dataset(x, y)


def normalize(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """``(x / 255 - mean) / std`` per channel, as float32."""
  x = x.astype(np.float32) / 255.0
  return ((x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(np.float32)


def load(name: str, split: str = "test", data_dir: Optional[Union[str, os.PathLike]] = None, *,
         download: bool = False, source: str = "auto", normalization: Union[str, None, tuple] = "default",
         limit: Optional[int] = None, image_key: str = "image", label_key: str = "label") -> Dataset:
  """Loads an image-classification split as numpy arrays.

  Args:
    name: ``"mnist"``, ``"cifar10"``, ``"cifar10_png5k"`` (local or tfds), or any tfds
      image-classification dataset name (tfds only).
    split: ``"train"`` or ``"test"`` (tfds accepts its own split strings such as ``"train[:10%]"``).
    data_dir: folder with the local files (see the module doc); default ``$JAXPRUNE_DATA_DIR``.
      For ``source="tfds"`` it is passed to tfds as its ``data_dir``.
    source: ``"auto"`` (local files if found, else tfds), ``"local"`` or ``"tfds"``.
    normalization: ``"default"`` (the model zoo's normalisation for this dataset, e.g. MNIST
      (0.1307, 0.3081)), ``(mean, std)``, or ``None`` for the raw uint8 images.
    limit: keep only the first ``limit`` examples. The local ``cifar10`` (jpeg60k) arrays are
      stored sorted by class, so their first examples are all airplanes: draw a random subset
      of those instead (``x[np.random.default_rng(0).permutation(len(x))[:n]]``).
    download: let tfds download and prepare the dataset (Colab). Off by default: without local
      files or a prepared tfds copy, ``load`` raises ``FileNotFoundError`` within seconds, naming
      ``data_dir`` and ``$JAXPRUNE_DATA_DIR``, instead of reaching for the network.

  Returns:
    :class:`Dataset` ``(x: (N, H, W, C), y: (N,) int32)``.
  """
  if source not in ("auto", "local", "tfds"):
    raise ValueError(f"source must be 'auto', 'local' or 'tfds', got {source!r}")
  root = resolve_data_dir(data_dir)
  data = None
  if source in ("auto", "local") and name in NORMALIZATION:
    if split not in ("train", "test"):
      raise ValueError(f"split must be 'train' or 'test' for local files, got {split!r}")
    if root is not None:
      data = _local(name, split, root)
    if data is None and source == "local":
      raise FileNotFoundError(
          f"no local files for {name!r} {split!r} under data_dir={root} (set data_dir or ${ENV_VAR})")
  elif source == "local":
    raise ValueError(f"no local format for dataset {name!r}; local names: {sorted(NORMALIZATION)}")
  if data is None:
    tfds_name = "cifar10" if name == "cifar10_png5k" else name
    data = _tfds(tfds_name, split, root if source == "tfds" else None, download, image_key, label_key, root)
  x, y = data
  if limit is not None:
    x, y = x[:limit], y[:limit]
  if normalization is None:
    return Dataset(x, y)
  if isinstance(normalization, str):
    if normalization != "default":
      raise ValueError(f"normalization must be 'default', None or (mean, std), got {normalization!r}")
    mean, std = NORMALIZATION.get(name, ((0.0,), (1.0,)))
  else:
    mean, std = normalization
  return Dataset(normalize(x, mean, std), y)


def digits(split: str = "train", test_fraction: float = 0.25, seed: int = 0) -> Dataset:
  """scikit-learn's bundled 8x8 digits (1797 images, no download), standardised, split by ``seed``.

  Returns ``x: (N, 8, 8, 1)`` float32 and ``y: (N,)``; the embedded default of ``python -m jaxprune``.
  """
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  from sklearn.datasets import load_digits
  raw = load_digits()
  x = (raw.images.astype(np.float32) / 16.0 - 0.5) / 0.5
  y = raw.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(y))
  n_test = int(round(test_fraction * len(y)))
  idx = order[:n_test] if split == "test" else order[n_test:]
  return Dataset(x[idx][..., None], y[idx])


def repeats(split: str = "train", n: Optional[int] = None, *, length: int = 12, vocab: int = 16,
            seed: int = 0) -> Dataset:
  """Token sequences labelled 1 when the first token occurs again later in the sequence.

  Generated, so nothing is downloaded; the task needs attention (each position compares its token
  with the first), and with the defaults the two labels are about equally frequent. The
  embedded task of the CLI's transformer.

  Args:
    split: ``"train"`` (default 4000 sequences) or ``"test"`` (1000); the splits are drawn from
      independent streams of ``seed``.
    n: number of sequences (default by split).
    length, vocab: sequence length and number of distinct tokens.

  Returns:
    :class:`Dataset` ``(x: (n, length) int32, y: (n,) int32)``.
  """
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  if n is None:
    n = 4000 if split == "train" else 1000
  if int(n) < 1 or int(length) < 2 or int(vocab) < 2:
    raise ValueError(f"n, length, vocab: need n >= 1, length >= 2, vocab >= 2, got {n}, {length}, {vocab}")
  rng = np.random.default_rng((int(seed), 0 if split == "train" else 1))
  x = rng.integers(0, vocab, size=(int(n), int(length))).astype(np.int32)
  y = (x[:, 1:] == x[:, :1]).any(axis=1).astype(np.int32)
  return Dataset(x, y)

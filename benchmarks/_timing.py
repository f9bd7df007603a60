"""Timing and result writing shared by the benchmark scripts."""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax


RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(description: str) -> argparse.Namespace:
  """``--quick`` (small settings, CI) and ``--out`` (default ``benchmarks/results``)."""
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--quick", action="store_true")
  p.add_argument("--out", default=str(RESULTS))
  return p.parse_args()


def run_child(code: str, *args: str, python: str = sys.executable, timeout: int = 1800) -> dict:
  """Runs ``python -c code *args`` in a fresh process (first calls are per process; ``python``
  may be another environment's, e.g. an official code's) with progress bars off, and returns the
  JSON object on the last line of its output; raises with its stderr if it fails."""
  env = {**os.environ, "JAXPRUNE_NO_PROGRESS": "1"}
  proc = subprocess.run([python, "-c", code, *args], capture_output=True, text=True, timeout=timeout, env=env)
  if proc.returncode != 0:
    raise RuntimeError(proc.stderr[-3000:])
  return json.loads(proc.stdout.strip().splitlines()[-1])


def median_time(fn, repeats: int, *, warmup: bool = True):
  """``(first output, seconds of the first call, median seconds of ``repeats`` more calls)``."""
  t0 = time.perf_counter()
  out = fn()
  jax.block_until_ready(jax.tree_util.tree_leaves(out))
  first = time.perf_counter() - t0
  runs = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(jax.tree_util.tree_leaves(fn()))
    runs.append(time.perf_counter() - t0)
  return out, first, statistics.median(runs)


def markdown_table(rows: list) -> list:
  """Lines of a markdown table with one column per key of the first row."""
  header = list(rows[0])
  return (["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
          + ["| " + " | ".join(str(r[h]) for h in header) + " |" for r in rows])


def write_results(out: str, stem: str, payload: dict, md: list, repeats: int) -> None:
  """``{stem}.json`` (payload plus the machine) and ``{stem}.md`` under ``out``."""
  folder = Path(out)
  folder.mkdir(parents=True, exist_ok=True)
  meta = {"device": str(jax.devices()[0]), "backend": jax.default_backend(), "jax": jax.__version__,
          "date": time.strftime("%Y-%m-%d"), "repeats": repeats}
  (folder / f"{stem}.json").write_text(json.dumps({**meta, **payload}, indent=1))
  (folder / f"{stem}.md").write_text("\n".join(md) + "\n")


def gradient_problem(model: str, n: int, shared: Path):
  """``(variables, loss, batch, prunable, chunk_size)`` of the EWR/LR benchmarks: MLPNet on ``n``
  MNIST training images, or ResNet20's 18 block convs on ``n`` ``cifar10_png5k`` images."""
  import re
  import jax.numpy as jnp
  import jaxprune as jp
  from jaxprune.models import mlpnet, resnet20
  if model == "mlpnet":
    v = jp.load_mlpnet(shared / "checkpoints/mlpnet_mnist.npz")
    data = jp.data.load("mnist", "train", data_dir=shared / "data", limit=n)
    apply, prunable, chunk = mlpnet().apply, None, 1000
  else:
    v = jp.load_resnet20(shared / "checkpoints/resnet20_cifar10.npz")
    data = jp.data.load("cifar10_png5k", "train", data_dir=shared / "data", limit=n)
    apply, chunk = resnet20().apply, 100
    prunable = jp.Prunable(where=lambda p, l: re.fullmatch(r"params/layer\d+_\d+/conv[12]/kernel", p) is not None)
  return v, jp.classification_loss(apply), (jnp.asarray(data.x), jnp.asarray(data.y)), prunable, chunk

"""Shared plumbing of the experiment scripts: arguments, data, machine facts, outputs."""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import time
from pathlib import Path

import jax
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("JAXPRUNE_SHARED", REPO.parent / "shared"))


def parser(description: str) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--quick", action="store_true", help="small settings (CI)")
  p.add_argument("--out", default=None, help="output folder (default experiments/results/<name>)")
  p.add_argument("--data-dir", default=os.environ.get("JAXPRUNE_DATA_DIR", str(SHARED / "data")))
  p.add_argument("--checkpoint-dir", default=str(SHARED / "checkpoints"))
  p.add_argument("--no-progress", action="store_true")
  return p


def machine() -> dict:
  cpu = platform.processor() or platform.machine()
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  return {"backend": jax.default_backend(), "device": str(jax.devices()[0]), "cpu": cpu,
          "cores": os.cpu_count(), "jax": jax.__version__, "date": time.strftime("%Y-%m-%d")}


def out_dir(args, name: str) -> Path:
  out = Path(args.out) if args.out else REPO / "experiments" / "results" / (name + ("_quick" if args.quick else ""))
  out.mkdir(parents=True, exist_ok=True)
  return out


def write(out: Path, name: str, rows: list[dict], meta: dict) -> None:
  with open(out / f"{name}.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  (out / f"{name}.json").write_text(json.dumps({"machine": machine(), **meta, "rows": rows}, indent=1))
  print(f"wrote {out / (name + '.csv')} and .json")


def plot_lines(path: Path, series: dict, xlabel: str, ylabel: str, title: str, hline=None, errors: dict | None = None):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  if hline is not None:
    ax.axhline(hline, color="gray", ls="--", label="dense")
  for name, pts in series.items():
    xs, ys = zip(*sorted(pts))
    if errors and name in errors:
      es = [errors[name][x] for x in xs]
      ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=name)
    else:
      ax.plot(xs, ys, marker="o", label=name)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  print(f"wrote {path}")


def markdown_table(header: list[str], rows: list[list]) -> str:
  lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
  lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
  return "\n".join(lines)


def checkpoint_model(name: str, args):
  """``(variables, train, test, model, example)`` for the shared checkpoints: ``"resnet20"``
  (cifar10_png5k, lossless) or ``"mlpnet"`` (MNIST); ``example`` is an abstract input for tracing."""
  import jax.numpy as jnp
  import jaxprune as jp
  from jaxprune.models import mlpnet, resnet20
  if name == "resnet20":
    v = jp.load_resnet20(f"{args.checkpoint_dir}/resnet20_cifar10.npz")
    data, model, shape = "cifar10_png5k", resnet20(), (1, 32, 32, 3)
  elif name == "mlpnet":
    v = jp.load_mlpnet(f"{args.checkpoint_dir}/mlpnet_mnist.npz")
    data, model, shape = "mnist", mlpnet(), (1, 28, 28, 1)
  else:
    raise ValueError(f"unknown checkpoint model {name!r}")
  train = jp.data.load(data, "train", data_dir=args.data_dir, source="local")
  test = jp.data.load(data, "test", data_dir=args.data_dir, source="local")
  return v, train, test, model, jax.ShapeDtypeStruct(shape, jnp.float32)


T90 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 9: 1.833}   # two-sided 90% t quantiles by dof


def ci90(values) -> tuple[float, float]:
  """Mean and half-width of the two-sided 90% t-interval (nan for a single value)."""
  v = np.asarray(values, float)
  if v.size < 2:
    return float(v.mean()), float("nan")
  return float(v.mean()), T90.get(v.size - 1, 1.645) * float(v.std(ddof=1)) / math.sqrt(v.size)

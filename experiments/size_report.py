"""Size report, dense against pruned: parameters, FLOPs per example, jitted latency and accuracy.

ResNet20 (the CIFAR-10 checkpoint; 1000 lossless test images) with every channel group at 30% and 50%,
and the reference transformer (trained here on the generated ``repeats`` task, 1000 test
sequences) with half of its whole heads and MLP channels in both blocks, each by default pruning
with repair. A masked model keeps the dense arrays, so only the shrunk one (rebuilt from the
arrays by ``from_params``) runs fewer FLOPs, and odd widths can run slower than the dense ones
(``round_to=8`` keeps multiples of 8). Latency: median of ``--repeats`` jitted calls on a
batch of 256 on this machine's default device.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jaxprune as jp  # noqa: E402
from jaxprune.cli import heads_and_mlp, train_repeats_transformer  # noqa: E402
from jaxprune.models import CifarResNet, Transformer, resnet20  # noqa: E402

import _common  # noqa: E402


def rows_for(label, variants: dict, x, test, repeats) -> list[dict]:
  """``variants``: ``{name: (model, variables)}``, the dense one first."""
  report = jp.size_report({name: (m.apply, v) for name, (m, v) in variants.items()}, x, repeats=repeats)
  accuracy = {name: jp.evaluate(m.apply, v, test.x, test.y).accuracy for name, (m, v) in variants.items()}
  print(f"\n{label}\n{report}")
  return [{"model": label, "variant": r.name, "parameters": r.parameters, "nonzero": r.nonzero,
           "mflops_per_example": round(r.flops / 1e6, 4), "latency_ms": round(r.latency_ms, 3),
           "batch": r.batch, "accuracy": round(100 * accuracy[r.name], 2)} for r in report.rows]


def resnet20_rows(args, repeats) -> list[dict]:
  variables = jp.load_resnet(Path(args.checkpoint_dir) / "resnet20_cifar10.npz")
  train = jp.data.load("cifar10_png5k", "train", data_dir=args.data_dir, source="local")
  test = jp.data.load("cifar10_png5k", "test", data_dir=args.data_dir, source="local")
  if args.quick:
    test = jp.data.Dataset(test.x[:200], test.y[:200])
  model = resnet20()
  groups = jp.groups(model.apply, variables, test.x[:1])
  calibration = train.x[:500]
  variants = {"dense": (model, variables)}
  for s in (0.3, 0.5):
    shrunk = jp.prune_channels(variables, groups, s, apply_fn=model.apply, repair=calibration, show_progress=False)
    if s == 0.3:
      masked = jp.prune_channels(variables, groups, s, mode="mask", apply_fn=model.apply, repair=calibration,
                                 show_progress=False)
      variants["30% mask"] = (model, masked.params)
    variants[f"{s:.0%} shrunk"] = (CifarResNet.from_params(shrunk.params), shrunk.params)
    if s == 0.3:   # the same with widths kept at multiples of 8 (12, 23, 45 -> 16, 24, 48)
      rounded = jp.prune_channels(variables, groups, s, apply_fn=model.apply, repair=calibration, round_to=8,
                                  show_progress=False)
      variants["30% shrunk, round_to=8"] = (CifarResNet.from_params(rounded.params), rounded.params)
  return rows_for("ResNet20, every group (l1 + repair)", variants, test.x[:256], test, repeats)


def transformer_rows(args, repeats) -> list[dict]:
  train, test = jp.data.repeats("train"), jp.data.repeats("test")
  model, variables = train_repeats_transformer(train, show_progress=not args.no_progress)
  groups = jp.groups(model.apply, variables, train.x[:1])
  half = {i: 0.5 for i in heads_and_mlp(groups)}
  calibration = train.x[:500]
  shrunk = jp.prune_channels(variables, groups, half, apply_fn=model.apply, repair=calibration, show_progress=False)
  masked = jp.prune_channels(variables, groups, half, mode="mask", apply_fn=model.apply, repair=calibration,
                             show_progress=False)
  variants = {"dense": (model, variables), "50% mask": (model, masked.params),
              "50% shrunk": (Transformer.from_params(shrunk.params), shrunk.params)}
  return rows_for("transformer, heads and MLP channels of both blocks (l1 + repair)", variants, test.x[:256], test,
                  repeats)


def plot(out: Path, rows: list[dict]) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  models = list(dict.fromkeys(r["model"] for r in rows))
  fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
  for ax, m in zip(axes[0], models):
    mine = [r for r in rows if r["model"] == m]
    base = mine[0]
    metrics = ("parameters", "mflops_per_example", "latency_ms")
    width = 0.8 / len(mine)
    for j, r in enumerate(mine):
      ax.bar(np.arange(3) + width * j, [r[k] / base[k] for k in metrics], width=width, label=r["variant"])
    ax.set_xticks(np.arange(3) + 0.4 - width / 2, ["parameters", "FLOPs / example", "latency"])
    ax.set_ylabel("relative to dense")
    ax.set_title(m, fontsize=9)
    ax.legend()
  fig.tight_layout()
  fig.savefig(out / "size_report.png", dpi=110)
  plt.close(fig)


def main() -> None:
  args = _common.parser(__doc__.splitlines()[0]).parse_args()
  out = _common.out_dir(args, "size_report")
  repeats = 5 if args.quick else 50
  started = time.perf_counter()
  rows = resnet20_rows(args, repeats) + transformer_rows(args, repeats)
  lines = ["| model | variant | parameters | MFLOPs / example | latency (ms, batch 256) | accuracy (%) |",
           "| --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    lines.append(f"| {r['model']} | {r['variant']} | {r['parameters']:,} | {r['mflops_per_example']:.3f} | "
                 f"{r['latency_ms']:.2f} | {r['accuracy']:.2f} |")
  print("\n" + "\n".join(lines))
  _common.write(out, "size_report", rows, {"seconds": round(time.perf_counter() - started, 1), "repeats": repeats})
  (out / "size_report.md").write_text("\n".join(lines) + "\n")
  plot(out, rows)


if __name__ == "__main__":
  main()

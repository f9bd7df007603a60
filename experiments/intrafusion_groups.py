"""Experiment 5a: data-free per-group tables, default pruning vs Intra-Fusion (the paper's Tables 10-13 format).

For each group of the ResNet20 checkpoint (cifar10_png5k test, 1000 lossless images) and of
MLPNet (MNIST test, 10,000 images): prune that group alone at channel sparsity 10-70% with the
default procedure (keep the top m, delete the rest) and with Intra-Fusion (same m channels as
targets, exact OT, official sum semantics), no fine-tuning, BatchNorm folded first in both.
Importances: l1 (data-free) and Taylor (gradients summed over 5 training batches of 128, as the
official code). For l1 the non-paper averaging variant is also reported. delta = IF - default.
"""
import time

import numpy as np

import jaxprune as jp
from jaxprune.core.progress import progress

import _common


def setup(name, args):
  v, train, test, model, example = _common.checkpoint_model(name, args)
  if args.quick:
    test = jp.data.Dataset(test.x[:300], test.y[:300])
  return v, train, test, model, example


def taylor_batches(train, n_batches=5, batch_size=128, seed=0):
  idx = np.random.default_rng(seed).permutation(len(train))[:n_batches * batch_size]
  return [(train.x[idx[i:i + batch_size]], train.y[idx[i:i + batch_size]]) for i in range(0, idx.size, batch_size)]


def print_table(rows, importances):
  cols = []
  for imp in importances:
    cols += [imp, f"IF({imp})", "delta"]
  print("| model | G | Sp | " + " | ".join(cols) + " |")
  print("| --- | --- | --- | " + " | ".join("---" for _ in cols) + " |")
  keys = sorted({(r["model"], r["group"], r["sparsity"]) for r in rows}, key=lambda k: (k[0], k[1], k[2]))
  for model, g, s in keys:
    cells = []
    for imp in importances:
      r = next(r for r in rows if (r["model"], r["group"], r["sparsity"], r["importance"]) == (model, g, s, imp))
      cells += [f"{r['default']:.2f}", f"{r['intra_fusion']:.2f}", f"{r['delta']:+.2f}"]
    print(f"| {model} | {g} | {int(round(100 * s))} | " + " | ".join(cells) + " |")


def main():
  p = _common.parser(__doc__.splitlines()[0])
  p.add_argument("--models", nargs="+", default=["resnet20", "mlpnet"])
  args = p.parse_args()
  show = not args.no_progress
  sparsities = [0.3, 0.7] if args.quick else [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
  importances = ["l1", "taylor"]
  rows, meta = [], {}
  for name in args.models:
    v, train, test, model, example = setup(name, args)
    groups = jp.groups(model.apply, v, example)
    which = [0, len(groups) - 1] if args.quick else list(range(len(groups)))
    loss = jp.classification_loss(model.apply)
    folded = jp.fold_batchnorm(v, groups)
    grads = jp.taylor_grads(loss, folded, taylor_batches(train), show_progress=False)
    acc = lambda vv: 100 * jp.evaluate(model.apply, vv, test.x, test.y, batch_size=500).accuracy
    meta[name] = {"dense": round(acc(v), 2), "n_test": len(test),
                  "groups": [{"index": i, "n": g.size, "producers": g.modules("producer")} for i, g in enumerate(groups)]}
    print(name, meta[name]["dense"], flush=True)
    for gi in progress(which, desc=name, disable=not show):
      for s in sparsities:
        for imp in importances:
          kw = dict(importance=imp, mode="mask", rounding="truncate", show_progress=False,
                  grads=grads if imp == "taylor" else None)
          default = jp.prune_channels(v, groups, {gi: s}, **kw)
          t0 = time.perf_counter()
          fused = jp.intra_fusion(v, groups, {gi: s}, p=1, **kw)   # the official l1 cost, as recorded
          secs = time.perf_counter() - t0
          row = {"model": name, "group": gi, "n": groups[gi].size, "sparsity": s, "importance": imp,
                 "kept": int(default.kept[gi].size), "default": round(acc(default.params), 2),
                 "intra_fusion": round(acc(fused.params), 2), "if_seconds": round(secs, 3)}
          row["delta"] = round(row["intra_fusion"] - row["default"], 2)
          if imp == "l1":
            avg = jp.intra_fusion(v, groups, {gi: s}, semantics="average", p=1, **kw)
            row["if_average"] = round(acc(avg.params), 2)
          else:
            row["if_average"] = ""
          rows.append(row)
          print(row, flush=True)
  print_table(rows, importances)
  summary = {}
  for name in args.models:
    for imp in importances:
      d = [r["delta"] for r in rows if r["model"] == name and r["importance"] == imp]
      summary[f"{name}/{imp}"] = {"mean_delta": round(float(np.mean(d)), 2), "wins": int(sum(x > 0 for x in d)),
                                  "losses": int(sum(x < 0 for x in d)), "cells": len(d)}
  print(summary)
  out = _common.out_dir(args, "intrafusion_groups")
  _common.write(out, "intrafusion_groups", rows, {"models": meta, "summary": summary, "solver": "exact (POT emd)"})
  for name in args.models:
    series = {}
    for imp in importances:
      for gi in sorted({r["group"] for r in rows if r["model"] == name}):
        pts = [(r["sparsity"], r["delta"]) for r in rows
               if r["model"] == name and r["group"] == gi and r["importance"] == imp]
        series[f"{imp} G{gi}"] = pts
    _common.plot_lines(out / f"{name}_delta.png", series, "channel sparsity of the pruned group",
                       "IF - default (accuracy points)", f"{name}: Intra-Fusion gain per group", hline=0.0)


if __name__ == "__main__":
  main()

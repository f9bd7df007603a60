"""Experiment 3a: MLPNet on MNIST, one-shot pruning without fine-tuning.

Magnitude, LR and EWR (single step, and multi-stage with G recomputed at the current weights
and the weights written back), N = 1000 training examples, beside the published one-shot
numbers of MP, WF and CBS (research/oneshot-tables.md section 2, verified) and CHITA++ at 0.98
(derived from its abstract). Writes oneshot.csv/.json/.png and prints a markdown table.
"""
import time

import jax
import numpy as np

import jaxprune as jp
from jaxprune.models import mlpnet
from jaxprune.core.progress import progress

import _common

PUBLISHED = {  # sparsity: (MP, WF, CBS), one-shot, no fine-tuning (CBS authors' table)
    0.5: (93.93, 94.02, 93.96), 0.6: (93.78, 93.82, 93.96), 0.7: (93.62, 93.77, 93.98), 0.8: (92.89, 93.57, 93.90),
    0.9: (90.30, 91.69, 93.14), 0.95: (83.64, 85.54, 88.92), 0.98: (32.25, 38.26, 55.45)}
TARGETS = {0.5: 93.96, 0.6: 93.96, 0.7: 93.98, 0.8: 93.90, 0.9: 93.14, 0.95: 88.92, 0.98: 90.4}


def main():
  args = _common.parser(__doc__.splitlines()[0]).parse_args()
  show = not args.no_progress
  sparsities = [0.5, 0.9, 0.98] if args.quick else sorted(PUBLISHED)
  n = 200 if args.quick else 1000
  multi = dict(stages=3, iterations=2) if args.quick else dict(stages=10, iterations=5)
  variables = jp.load_mlpnet(f"{args.checkpoint_dir}/mlpnet_mnist.npz")
  train = jp.data.load("mnist", "train", data_dir=args.data_dir, source="local")
  test = jp.data.load("mnist", "test", data_dir=args.data_dir, source="local")
  idx = np.random.default_rng(0).choice(len(train), n, replace=False)
  batch = (train.x[idx], train.y[idx])
  model = mlpnet()
  loss = jp.classification_loss(model.apply)
  acc = lambda params: 100 * jp.evaluate(model.apply, {"params": params} if "params" not in params else params,
                                         test.x, test.y).accuracy
  methods = {
      "magnitude": lambda k: jp.magnitude(variables, k),
      "LR (1 step)": lambda k: jp.lr(variables, batch, k, loss_fn=loss, show_progress=False),
      "EWR (1 step)": lambda k: jp.ewr(variables, batch, k, loss_fn=loss, show_progress=False),
      "LR multi-stage": lambda k: jp.lr(variables, batch, k, loss_fn=loss, update_weights=True, show_progress=False, **multi),
      "EWR multi-stage": lambda k: jp.ewr(variables, batch, k, loss_fn=loss, update_weights=True, show_progress=False, **multi),
  }
  rows = []
  for s in progress(sparsities, desc="sparsities", disable=not show):
    k = jp.k_from_sparsity(variables, s)
    for name, fn in methods.items():
      t0 = time.perf_counter()
      res = fn(k)
      jax.block_until_ready(res.params)
      seconds = time.perf_counter() - t0
      rows.append({"sparsity": s, "method": name, "k": k, "accuracy": round(acc(res.params), 2),
                   "seconds": round(seconds, 2)})
      print(rows[-1], flush=True)
  out = _common.out_dir(args, "ewr_mlpnet_oneshot")
  meta = {"n_examples": n, "multi_stage": multi, "eps": 1.0, "lam": 0.01, "published": PUBLISHED, "targets": TARGETS,
          "dense_accuracy": round(acc(variables), 2)}
  _common.write(out, "oneshot", rows, meta)
  series = {m: [(r["sparsity"], r["accuracy"]) for r in rows if r["method"] == m] for m in methods}
  for i, name in enumerate(("MP (published)", "WF (published)", "CBS (published)")):
    series[name] = [(s, PUBLISHED[s][i]) for s in sparsities]
  _common.plot_lines(out / "oneshot.png", series, "sparsity", "test accuracy (%)",
                     f"MLPNet/MNIST one-shot, no fine-tuning (N={n})", hline=meta["dense_accuracy"])
  header = ["sparsity"] + list(methods) + ["MP", "WF", "CBS", "target"]
  table = [[s] + [next(r["accuracy"] for r in rows if r["sparsity"] == s and r["method"] == m) for m in methods]
           + list(PUBLISHED[s]) + [TARGETS[s]] for s in sparsities]
  print(_common.markdown_table(header, table))


if __name__ == "__main__":
  main()

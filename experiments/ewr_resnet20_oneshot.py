"""Experiment 3d: ResNet20 on CIFAR-10, one-shot pruning without fine-tuning, sparsity 0.5-0.9.

The prunable set is the 18 3x3 convs inside the blocks (267,264 weights, as CHITA/EWR).
Gradients from the cifar10_png5k training images (lossless), accuracy on its 1000 test
images, BatchNorm in inference mode. Magnitude against LR and EWR with jaxprune's default solver
(magnitude support and ridge refit, G recomputed at the current weights each stage, lam by
sparsity) with ``--stages`` stages (default 10, fewer than the MLPNet defaults of 10-20 to fit the
CPU budget: each ResNet20 stage computes 500 per-example gradients of 267k weights).
"""
import re
import time

import jax
import numpy as np

import jaxprune as jp
from jaxprune.models import resnet20
from jaxprune.core.progress import progress

import _common

BLOCK_CONVS = jp.Prunable(where=lambda path, leaf: re.fullmatch(r"(params/)?layer\d+_\d+/conv[12]/kernel", path) is not None)
PUBLISHED_MP = {0.5: 88.44, 0.6: 85.24, 0.7: 78.79, 0.8: 54.01, 0.9: 11.79}   # CBS/CHITA tables [MEM], full test set


def main():
  p = _common.parser(__doc__.splitlines()[0])
  p.add_argument("--stages", type=int, default=10)
  args = p.parse_args()
  show = not args.no_progress
  variables = jp.load_resnet20(f"{args.checkpoint_dir}/resnet20_cifar10.npz")
  assert jp.count_prunable(variables, BLOCK_CONVS) == 267264
  train = jp.data.load("cifar10_png5k", "train", data_dir=args.data_dir, source="local")
  test = jp.data.load("cifar10_png5k", "test", data_dir=args.data_dir, source="local")
  if args.quick:
    sparsities, n, multi = [0.5, 0.9], 32, dict(stages=2)
    test = jp.data.Dataset(test.x[:200], test.y[:200])
  else:
    sparsities, n, multi = [0.5, 0.6, 0.7, 0.8, 0.9], 500, dict(stages=args.stages)
  idx = np.random.default_rng(0).choice(len(train), n, replace=False)
  batch = (train.x[idx], train.y[idx])
  model = resnet20()
  loss = jp.classification_loss(model.apply)
  acc = lambda v: round(100 * jp.evaluate(model.apply, v, test.x, test.y, batch_size=500).accuracy, 2)
  methods = {
      "magnitude": lambda k: jp.magnitude(variables, k, prunable=BLOCK_CONVS),
      "LR": lambda k: jp.lr(variables, batch, k, loss_fn=loss, prunable=BLOCK_CONVS, chunk_size=100,
                             show_progress=False, **multi),
      "EWR": lambda k: jp.ewr(variables, batch, k, loss_fn=loss, prunable=BLOCK_CONVS, chunk_size=100,
                               show_progress=False, **multi),
  }
  rows = []
  for s in progress(sparsities, desc="sparsities", disable=not show):
    k = jp.k_from_sparsity(variables, s, prunable=BLOCK_CONVS)
    for name, fn in methods.items():
      t0 = time.perf_counter()
      res = fn(k)
      jax.block_until_ready(res.params)
      rows.append({"sparsity": s, "method": name, "k": k, "accuracy": acc(res.params),
                   "seconds": round(time.perf_counter() - t0, 1)})
      print(rows[-1], flush=True)
  out = _common.out_dir(args, "ewr_resnet20_oneshot")
  dense = acc(variables)
  _common.write(out, "resnet20_oneshot", rows, {"n_examples": n, "multi_stage": multi, "dense_accuracy": dense,
                                               "test_images": len(test), "published_mp": PUBLISHED_MP})
  series = {m: [(r["sparsity"], r["accuracy"]) for r in rows if r["method"] == m] for m in methods}
  series["MP (published, full test set)"] = [(s, PUBLISHED_MP[s]) for s in sparsities]
  _common.plot_lines(out / "resnet20_oneshot.png", series, "sparsity", "test accuracy (%)",
                     f"ResNet20/CIFAR-10 one-shot (png5k test, N={n})", hline=dense)
  table = [[s] + [next(r["accuracy"] for r in rows if r["sparsity"] == s and r["method"] == m) for m in methods]
           + [PUBLISHED_MP[s]] for s in sparsities]
  print(_common.markdown_table(["sparsity"] + list(methods) + ["MP published"], table))


if __name__ == "__main__":
  main()

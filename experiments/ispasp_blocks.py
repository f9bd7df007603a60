"""Experiment 6b: i-SpaSP block by block on MLPNet and ResNet20, against default channel pruning and Intra-Fusion.

The units are the two-layer units that ``jaxprune.two_layer_units`` derives: MLPNet's two hidden
layers (fc1 -> fc2 and fc2 -> fc3) and ResNet20's nine BasicBlocks (conv1's channels, residual
taken after bn2 before the skip addition). Every unit keeps ``int(n r)`` channels, r in
{0.3, 0.5, 0.7}; the residual streams are not pruned. i-SpaSP runs as the official code:
sequential, shallow to deep, each block on the pruned network's activations, N = 1280 random
training images, T = 20, inference-mode BatchNorm (``--train-bn-ratio`` adds the official
train-mode BatchNorm at one ratio). Default channel pruning (l1) and Intra-Fusion (l1, exact OT)
prune the same groups to the same sizes, BatchNorm folded as in the official MetaPruner; on
ResNet20 default pruning also runs without folding (``default_bn_kept``, scored on the unfolded
weights), so that fine-tuning compares networks with the same BatchNorm layout as i-SpaSP's.

Accuracy is measured without fine-tuning and after a short fine-tune, the same for every method:
SGD 0.01, momentum 0.9, batch 128, BatchNorm in train mode; ResNet20 2 epochs on the 4000
cifar10_png5k training images (crop/flip), MLPNet 1 epoch on MNIST. Tests: the 1000 png5k test
images, the 10,000 MNIST test images.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxprune as jp
from jaxprune.models import MLP, CifarResNet
from jaxprune.training.train import cifar_augment, train_epochs

import _common

SETUPS = {
    "mlpnet": dict(rebuild=MLP.from_params, epochs=1, augment=None),
    "resnet20": dict(rebuild=CifarResNet.from_params, epochs=2, augment=cifar_augment),
}


def main():
  p = _common.parser(__doc__.splitlines()[0])
  p.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7])
  p.add_argument("--examples", type=int, default=1280)
  p.add_argument("--train-bn-ratio", type=float, default=0.5, help="keep ratio for the train-mode BN variant (0: off)")
  p.add_argument("--models", nargs="+", default=list(SETUPS))
  args = p.parse_args()
  show = not args.no_progress
  rows, dense = [], {}
  for name in args.models:
    cfg = SETUPS[name]
    v, train, test, model, example = _common.checkpoint_model(name, args)
    ratios, epochs, n = args.ratios, cfg["epochs"], args.examples
    if args.quick:
      ratios, epochs, n = ratios[:1], 1, 128
      train = jp.data.Dataset(train.x[:512], train.y[:512])
      test = jp.data.Dataset(test.x[:300], test.y[:300])
    groups = jp.groups(model.apply, v, example)
    units = jp.two_layer_units(model.apply, v, example, groups)
    unit_groups = sorted(u.group_index for u in units)
    x_prune = jnp.asarray(train.x[np.random.default_rng(0).permutation(len(train.y))[:n]])
    acc = lambda mdl, vv: round(100 * jp.evaluate(mdl.apply, vv, test.x, test.y, batch_size=500).accuracy, 2)
    dense[name] = acc(model, v)
    print(f"{name}: dense {dense[name]}, units on groups {unit_groups}", flush=True)
    for r in ratios:
      # error_examples=None: the recorded mean unit error is over the whole pruning batch
      runs = {"ispasp": lambda: jp.ispasp(v, groups, 1 - r, apply_fn=model.apply, batch=x_prune, rounding="truncate",
                                          error_examples=None, show_progress=show),
              "default": lambda: jp.prune_channels(v, groups, {g: 1 - r for g in unit_groups}, importance="l1",
                                                   rounding="truncate", show_progress=False),
              "intra_fusion": lambda: jp.intra_fusion(v, groups, {g: 1 - r for g in unit_groups}, importance="l1",
                                                      p=1, rounding="truncate", show_progress=False),
              "default_bn_kept": lambda: jp.prune_channels(v, groups, {g: 1 - r for g in unit_groups}, importance="l1",
                                                           fold_bn=False, rounding="truncate", show_progress=False)}
      if name == "mlpnet":   # no BatchNorm: the same as default
        del runs["default_bn_kept"]
      if args.train_bn_ratio and abs(r - args.train_bn_ratio) < 1e-9 and name == "resnet20":
        runs["ispasp_train_bn"] = lambda: jp.ispasp(v, groups, 1 - r, apply_fn=model.apply, batch=x_prune,
                                                    rounding="truncate", bn_mode="train", error_examples=None,
                                                    show_progress=show)
      sizes = None
      for method, run in runs.items():
        t0 = time.perf_counter()
        res = run()
        seconds = time.perf_counter() - t0
        kept = {g: len(res.kept[g]) for g in unit_groups}
        if sizes is None:
          sizes = kept
        assert kept == sizes, f"{method} kept {kept}, i-SpaSP {sizes}"
        small = cfg["rebuild"](res.params)
        before = acc(small, res.params)
        tuned = train_epochs(small.apply, res.params, train, epochs=epochs, optimizer=optax.sgd(0.01, momentum=0.9),
                             batch_size=128, augment=cfg["augment"], show_progress=show)
        row = {"model": name, "keep": r, "method": method, "params": int(sum(
            x.size for x in jax.tree_util.tree_leaves(res.params["params"]))), "no_finetune": before,
            "finetuned": acc(small, tuned.params), "finetune_epochs": epochs, "prune_seconds": round(seconds, 2)}
        if method.startswith("ispasp"):
          errs = [u["relative_error"] for u in res.info["units"].values()]
          row["mean_unit_error"] = round(float(np.mean(errs)), 4)
          row["fixed_points"] = sum(u["converged"] for u in res.info["units"].values())
        rows.append(row)
        print(row, flush=True)
  methods = ("ispasp", "default", "intra_fusion", "default_bn_kept")
  header = (["model", "keep", "params"] + ["i-SpaSP", "default", "IF", "default, BN kept"]
            + [f"{m} + FT" for m in ("i-SpaSP", "default", "IF", "default, BN kept")])
  table = []
  for name in args.models:
    for r in sorted({row["keep"] for row in rows if row["model"] == name}):
      get = {row["method"]: row for row in rows if (row["model"], row["keep"]) == (name, r)}
      table.append([name, r, get["ispasp"]["params"]] + [get[m]["no_finetune"] if m in get else "-" for m in methods]
                   + [get[m]["finetuned"] if m in get else "-" for m in methods])
  print(_common.markdown_table(header, table))
  out = _common.out_dir(args, "ispasp_blocks")
  for row in rows:
    row.setdefault("mean_unit_error", "")
    row.setdefault("fixed_points", "")
  _common.write(out, "ispasp_blocks", rows, {"dense": dense, "examples": args.examples if not args.quick else 128,
                                             "optimizer": "sgd(0.01, momentum=0.9)"})
  for name in args.models:
    series = {f"{m}{' + FT' if ft else ''}": [(row["keep"], row["finetuned" if ft else "no_finetune"]) for row in rows
                                               if row["model"] == name and row["method"] == m]
              for m in methods for ft in (False, True)}
    series = {k: pts for k, pts in series.items() if pts}
    _common.plot_lines(out / f"{name}_blocks.png", series, "keep ratio (every unit)", "test accuracy (%)",
                       f"{name}: units pruned block by block", hline=dense[name])


if __name__ == "__main__":
  main()

"""Default structured pruning of the ResNet20 checkpoint: per-group l1 channel pruning, 10-70%.

The baseline of the Intra-Fusion tables: groups from ``jaxprune.groups`` (12: three residual-stream
groups and nine inner block groups, group 0 nearest the output), BatchNorm folded first (as the
official MetaPruner), one group pruned at a time at channel sparsity s (m = floor(n (1 - s)) kept),
no data, no fine-tuning. Accuracy on the 1000 lossless cifar10_png5k test images. Also all groups
pruned together at each sparsity. Evaluated in mask mode (same shapes, one compilation); shrink
mode gives the same outputs (tests/test_structure.py), and the script checks it on one case.
"""
import time

import jax
import jax.numpy as jnp

import jaxprune as jp
from jaxprune.models import CifarResNet, resnet20
from jaxprune.core.progress import progress

import _common


def print_table(rows, sparsities, groups):
  """The paper's layout: one row per group, one column per sparsity."""
  print("| group | n | " + " | ".join(f"{int(round(100 * s))}%" for s in sparsities) + " |")
  print("| --- | --- | " + " | ".join("---" for _ in sparsities) + " |")
  for g in list(range(len(groups))) + ["all"]:
    acc = {r["sparsity"]: r["accuracy"] for r in rows if r["group"] == g}
    n = groups[g].size if g != "all" else ""
    print(f"| {g} | {n} | " + " | ".join(f"{acc[s]:.1f}" for s in sparsities) + " |")


def main():
  p = _common.parser(__doc__.splitlines()[0])
  p.add_argument("--importance", default="l1")
  args = p.parse_args()
  show = not args.no_progress
  variables = jp.load_resnet20(f"{args.checkpoint_dir}/resnet20_cifar10.npz")
  test = jp.data.load("cifar10_png5k", "test", data_dir=args.data_dir, source="local")
  sparsities = [0.1, 0.3, 0.5, 0.7] if args.quick else [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
  if args.quick:
    test = jp.data.Dataset(test.x[:200], test.y[:200])
  model = resnet20()
  t0 = time.perf_counter()
  groups = jp.groups(model.apply, variables, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  trace_s = time.perf_counter() - t0
  print(groups.describe())
  acc = lambda v: round(100 * jp.evaluate(model.apply, v, test.x, test.y, batch_size=500).accuracy, 2)
  dense = acc(variables)
  folded = acc(jp.fold_batchnorm(variables, groups))
  print(f"dense {dense}  folded {folded}  groups traced in {trace_s:.2f}s")
  rows = []
  which = [[i] for i in range(len(groups))] + [list(range(len(groups)))]
  for grp in progress(which, desc="groups", disable=not show):
    for s in sparsities:
      res = jp.prune_channels(variables, groups, {g: s for g in grp}, importance=args.importance, mode="mask",
                              rounding="truncate", show_progress=False)
      m = res.info["groups"][grp[0]]["m"]
      rows.append({"group": grp[0] if len(grp) == 1 else "all", "n": groups[grp[0]].size if len(grp) == 1 else "",
                   "sparsity": s, "kept": m if len(grp) == 1 else "", "accuracy": acc(res.params)})
      print(rows[-1], flush=True)
  # shrink mode on one case: same accuracy with a rebuilt smaller network
  res = jp.prune_channels(variables, groups, 0.5, importance=args.importance, mode="shrink", show_progress=False)
  small = CifarResNet.from_params(res.params)
  shrunk_acc = round(100 * jp.evaluate(small.apply, res.params, test.x, test.y, batch_size=500).accuracy, 2)
  masked_acc = next(r["accuracy"] for r in rows if r["group"] == "all" and r["sparsity"] == 0.5)
  print(f"all groups at 0.5: mask {masked_acc} shrink {shrunk_acc}")
  print_table(rows, sparsities, groups)
  out = _common.out_dir(args, "channels_resnet20")
  _common.write(out, f"resnet20_{args.importance}", rows,
                {"dense_accuracy": dense, "folded_accuracy": folded, "trace_seconds": round(trace_s, 3),
                 "shrink_check": {"mask": masked_acc, "shrink": shrunk_acc}, "n_test": len(test),
                 "groups": [{"index": i, "n": g.size, "producers": g.modules("producer"),
                             "consumers": g.modules("consumer")} for i, g in enumerate(groups)]})
  series = {f"group {g}": [(r["sparsity"], r["accuracy"]) for r in rows if r["group"] == g]
            for g in list(range(len(groups))) + ["all"]}
  _common.plot_lines(out / f"resnet20_{args.importance}.png", series, "channel sparsity per group", "test accuracy (%)",
                     f"ResNet20: default {args.importance} channel pruning, no fine-tuning", hline=dense)


if __name__ == "__main__":
  main()

"""Experiment 5b: all groups pruned together, default vs Intra-Fusion, before and after a short fine-tune.

ResNet20 (cifar10_png5k: fine-tune on its 4000 lossless training images with crop/flip
augmentation, test on its 1000 test images) and MLPNet (MNIST: fine-tune on the 60,000 training
images, test on 10,000). Every group at the same channel sparsity, l1 importance, BatchNorm
folded, exact OT (sum semantics), shrunk networks rebuilt with ``from_params``. Fine-tuning: SGD
with momentum 0.9 at the paper's fine-tuning learning rate 0.01, batch 128, BatchNorm in train mode
(the folded norms are identities; in train mode they normalise again, as in the official code; with
their statistics frozen instead, fine-tuning the folded ResNet20 diverged at this learning rate).
"""
import functools
import time

import jax
import optax

import jaxprune as jp
from jaxprune.models import MLP, CifarResNet
from jaxprune.training.train import cifar_augment, train_epochs

import _common

SETUPS = {
    "resnet20": dict(rebuild=CifarResNet.from_params, epochs=4, augment=cifar_augment,
                     sparsities=[0.1, 0.2, 0.3, 0.5]),
    "mlpnet": dict(rebuild=MLP.from_params, epochs=1, augment=None, sparsities=[0.1, 0.3, 0.5, 0.7]),
}


def main():
  args = _common.parser(__doc__.splitlines()[0]).parse_args()
  show = not args.no_progress
  rows, dense = [], {}
  for name, cfg in SETUPS.items():
    v, train, test, model, example = _common.checkpoint_model(name, args)
    sparsities, epochs = cfg["sparsities"], cfg["epochs"]
    if args.quick:
      sparsities, epochs = sparsities[:1], 1
      train = jp.data.Dataset(train.x[:512], train.y[:512])
      test = jp.data.Dataset(test.x[:300], test.y[:300])
    groups = jp.groups(model.apply, v, example)
    dense[name] = round(100 * jp.evaluate(model.apply, v, test.x, test.y, batch_size=500).accuracy, 2)
    for s in sparsities:
      for method, fn in (("default", jp.prune_channels), ("intra_fusion", functools.partial(jp.intra_fusion, p=1))):   # l1 cost, as recorded
        res = fn(v, groups, s, importance="l1", show_progress=False)
        small = cfg["rebuild"](res.params)
        acc = lambda vv: round(100 * jp.evaluate(small.apply, vv, test.x, test.y, batch_size=500).accuracy, 2)
        before = acc(res.params)
        t0 = time.perf_counter()
        tuned = train_epochs(small.apply, res.params, train, epochs=epochs, optimizer=optax.sgd(0.01, momentum=0.9),
                             batch_size=128, augment=cfg["augment"], show_progress=show)
        rows.append({"model": name, "sparsity": s, "method": method, "params": int(sum(
            x.size for x in jax.tree_util.tree_leaves(res.params["params"]))), "no_finetune": before,
            "finetuned": acc(tuned.params), "finetune_epochs": epochs,
            "finetune_seconds": round(time.perf_counter() - t0, 1)})
        print(rows[-1], flush=True)
  print("| model | sparsity | params | default | IF | default + FT | IF + FT |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for name in SETUPS:
    for s in sorted({r["sparsity"] for r in rows if r["model"] == name}):
      d = next(r for r in rows if (r["model"], r["sparsity"], r["method"]) == (name, s, "default"))
      f = next(r for r in rows if (r["model"], r["sparsity"], r["method"]) == (name, s, "intra_fusion"))
      print(f"| {name} | {s} | {d['params']} | {d['no_finetune']} | {f['no_finetune']} | {d['finetuned']} | {f['finetuned']} |")
  out = _common.out_dir(args, "intrafusion_all_groups")
  _common.write(out, "intrafusion_all_groups", rows, {"dense": dense, "optimizer": "sgd(0.01, momentum=0.9)"})
  for name in SETUPS:
    series = {f"{m}{' + FT' if ft else ''}": [(r["sparsity"], r["finetuned" if ft else "no_finetune"]) for r in rows
                                               if r["model"] == name and r["method"] == m]
              for m in ("default", "intra_fusion") for ft in (False, True)}
    _common.plot_lines(out / f"{name}_all_groups.png", series, "channel sparsity (every group)", "test accuracy (%)",
                       f"{name}: all groups pruned, default vs Intra-Fusion", hline=dense[name])


if __name__ == "__main__":
  main()

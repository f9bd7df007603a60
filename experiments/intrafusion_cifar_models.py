"""Experiment 5c: the paper's own models, VGG11-BN and ResNet18, trained on CIFAR-10 and pruned per group.

Trains from scratch on cifar10_jpeg60k (50,000 JPEG-decoded training images; crop/flip
augmentation, SGD momentum 0.9, weight decay 5e-4, batch 128, a cosine schedule from the paper's
learning rate 0.05) for a wall-clock budget (``--max-minutes``), then runs the data-free per-group
table (default vs Intra-Fusion, l1 and Taylor, 10-70%) on the jpeg60k test images. The paper
trains for 300 epochs on a GPU; on a 2-core CPU this script gets through a few epochs, so its
dense accuracy (reported) is far below the paper's ~89.5 (VGG11-BN) and ~94.9 (ResNet18), and
the tables are those of an under-trained network. Trained weights are saved under
``experiments/checkpoints/`` (ignored by git).
"""
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxprune as jp
from jaxprune import models
from jaxprune.data import batches
from jaxprune.core.progress import progress
from jaxprune.training.train import _step, cifar_augment

import _common

MODELS = {"vgg11_bn": models.vgg11_bn, "resnet18": models.resnet18}


def train(model, train_set, *, max_minutes, epochs, lr, seed, show):
  v = model.init(jax.random.key(seed), jnp.zeros((1, 32, 32, 3)))
  steps_per_epoch = len(train_set) // 128
  total = steps_per_epoch * epochs
  schedule = optax.cosine_decay_schedule(lr, total)
  tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(schedule, momentum=0.9))
  opt_state = tx.init(v["params"])
  key = jax.random.key(seed)
  t0, step, losses = time.perf_counter(), 0, []
  for epoch in progress(range(epochs), desc="epochs", disable=not show):
    for xb, yb in batches(train_set, 128, shuffle=True, seed=seed + epoch, drop_remainder=True):
      key, sub = jax.random.split(key)
      v, opt_state, loss = _step(model.apply, tx, cifar_augment, True, v, opt_state, jnp.asarray(xb), jnp.asarray(yb), sub)
      step += 1
      if step % 50 == 0:
        losses.append(round(float(loss), 4))
      if time.perf_counter() - t0 > 60 * max_minutes:
        return v, step / steps_per_epoch, losses, time.perf_counter() - t0
  return v, step / steps_per_epoch, losses, time.perf_counter() - t0


def main():
  p = _common.parser(__doc__.splitlines()[0])
  p.add_argument("--model", choices=list(MODELS), default="vgg11_bn")
  p.add_argument("--max-minutes", type=float, default=30.0, help="wall-clock training budget")
  p.add_argument("--epochs", type=int, default=5, help="planned epochs (the cosine schedule's length)")
  p.add_argument("--lr", type=float, default=0.05)
  p.add_argument("--n-test", type=int, default=2000)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--sparsities", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7])
  p.add_argument("--importances", nargs="+", default=["l1", "taylor"])
  p.add_argument("--reuse", action="store_true", help="skip training: load the weights this script saved")
  args = p.parse_args()
  show = not args.no_progress
  model = MODELS[args.model]()
  train_set = jp.data.load("cifar10", "train", data_dir=args.data_dir, source="local")
  test = jp.data.load("cifar10", "test", data_dir=args.data_dir, source="local")
  sparsities, importances = args.sparsities, args.importances
  if args.quick:
    train_set = jp.data.Dataset(train_set.x[::100], train_set.y[::100])
    args.epochs, args.max_minutes, args.n_test, sparsities, args.reuse = 1, 1.0, 200, [0.5], False
  ckpt = Path(__file__).resolve().parent / "checkpoints" / f"{args.model}_jpeg60k.npz"
  if args.reuse:
    saved = np.load(ckpt)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    v = jp.trees.replace_leaves(shapes, {p: jnp.asarray(saved[p]) for p, _ in jp.trees.leaves_with_paths(shapes)})
    trained = json.loads(ckpt.with_suffix(".json").read_text())
    epochs_done, losses, train_s = trained["epochs"], trained["losses"], trained["seconds"]
  else:
    v, epochs_done, losses, train_s = train(model, train_set, max_minutes=args.max_minutes, epochs=args.epochs,
                                            lr=args.lr, seed=args.seed, show=show)
    if not args.quick:
      ckpt.parent.mkdir(exist_ok=True)
      np.savez(ckpt, **{p: np.asarray(x) for p, x in jp.trees.leaves_with_paths(v)})
      ckpt.with_suffix(".json").write_text(json.dumps({"epochs": epochs_done, "losses": losses, "seconds": train_s}))
  full = test if not args.quick else jp.data.Dataset(test.x[::50], test.y[::50])
  full_acc = round(100 * jp.evaluate(model.apply, v, full.x, full.y, batch_size=500).accuracy, 2)
  pick = np.random.default_rng(0).permutation(len(test))[:args.n_test]   # jpeg60k's test set is sorted by class
  test = jp.data.Dataset(test.x[pick], test.y[pick])
  acc = lambda vv: round(100 * jp.evaluate(model.apply, vv, test.x, test.y, batch_size=500).accuracy, 2)
  dense = acc(v)
  print(f"{args.model}: {epochs_done:.2f} epochs in {train_s / 60:.1f} min, test accuracy {full_acc} "
        f"(10,000 images), {dense} on the {len(test)} used below", flush=True)
  groups = jp.groups(model.apply, v, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  folded = jp.fold_batchnorm(v, groups)
  grads = None
  if "taylor" in importances:
    idx = np.random.default_rng(0).permutation(len(train_set))[:5 * 128]
    grads = jp.taylor_grads(jp.classification_loss(model.apply), folded,
                            [(train_set.x[idx[i:i + 128]], train_set.y[idx[i:i + 128]])
                             for i in range(0, idx.size, 128)], show_progress=False)
  which = [0, len(groups) - 1] if args.quick else list(range(len(groups)))
  rows = []
  for gi in progress(which, desc="groups", disable=not show):
    for s in sparsities:
      for imp in importances:
        kw = dict(importance=imp, mode="mask", rounding="truncate", show_progress=False,
                  grads=grads if imp == "taylor" else None)
        d = acc(jp.prune_channels(v, groups, {gi: s}, **kw).params)
        f = acc(jp.intra_fusion(v, groups, {gi: s}, p=1, **kw).params)   # the official l1 cost, as recorded
        rows.append({"model": args.model, "group": gi, "n": groups[gi].size, "sparsity": s, "importance": imp,
                     "default": d, "intra_fusion": f, "delta": round(f - d, 2)})
        print(rows[-1], flush=True)
  print("| G | Sp | " + " | ".join(f"{i} | IF({i}) | delta" for i in importances) + " |")
  print("| --- | --- | " + " | ".join("--- | --- | ---" for _ in importances) + " |")
  for gi in which:
    for s in sparsities:
      r = {imp: next(x for x in rows if (x["group"], x["sparsity"], x["importance"]) == (gi, s, imp))
           for imp in importances}
      print(f"| {gi} | {int(round(100 * s))} | " + " | ".join(f"{r[i]['default']:.2f} | {r[i]['intra_fusion']:.2f} | "
                                                             f"{r[i]['delta']:+.2f}" for i in importances) + " |")
  out = _common.out_dir(args, "intrafusion_cifar_models")
  _common.write(out, f"{args.model}_groups", rows,
                {"model": args.model, "epochs_trained": round(epochs_done, 2), "train_minutes": round(train_s / 60, 1),
                 "planned_epochs": args.epochs, "lr": args.lr, "loss_every_50_steps": losses,
                 "test_accuracy_10000": full_acc, "dense_on_subset": dense, "n_test": len(test)})
  series = {f"{imp} G{gi}": [(r["sparsity"], r["delta"]) for r in rows if r["group"] == gi and r["importance"] == imp]
            for imp in importances for gi in which}
  _common.plot_lines(out / f"{args.model}_delta.png", series, "channel sparsity of the pruned group",
                     "IF - default (accuracy points)", f"{args.model} ({epochs_done:.1f} CPU epochs): IF gain", hline=0.0)


if __name__ == "__main__":
  main()

"""Experiment 3c: MLPNet gradual pruning (EWR's Table 1 protocol) to 0.95 and 0.98.

14 stages on the official cubic schedule (stage 1 at sparsity 0), each: 1000 fresh training
examples, one pruning step, then one epoch of masked SGD (lr 1e-3, momentum 0.5, batch 64, as the
official MLPNet config). The pruning step is magnitude, LR or EWR with jaxprune's default solver
(one stage per call: magnitude support and ridge refit at the current weights), or the official
LR step (mask only, w_ref = the dense weights). Test accuracy after each prune and each
fine-tuning epoch, over seeds (example draws and shuffles).
"""
import jax

import jaxprune as jp
from jaxprune.models import mlpnet

import _common


def main():
  p = _common.parser(__doc__.splitlines()[0])
  p.add_argument("--seeds", type=int, default=3)
  args = p.parse_args()
  show = not args.no_progress
  variables = jp.load_mlpnet(f"{args.checkpoint_dir}/mlpnet_mnist.npz")
  train = jp.data.load("mnist", "train", data_dir=args.data_dir, source="local",
                       limit=5000 if args.quick else None)
  test = jp.data.load("mnist", "test", data_dir=args.data_dir, source="local")
  targets, stages, n, seeds = ([0.95], 3, 200, 1) if args.quick else ([0.95, 0.98], 14, 1000, args.seeds)
  pruners = {"magnitude": "magnitude", "LR": "lr", "EWR": "ewr", "LR (official)": jp.pruner_for("lr", official=True)}
  model = mlpnet()
  loss = jp.classification_loss(model.apply)
  evaluate = lambda v: (lambda e: {"accuracy": round(100 * e.accuracy, 2), "loss": round(e.loss, 4)})(
      jp.evaluate(model.apply, v, test.x, test.y))
  rows, final = [], []
  import optax
  dest = _common.out_dir(args, "ewr_gradual")
  for target in targets:
    for method, pruner in pruners.items():
      for seed in range(seeds):
        # Resumable: a rerun after an interruption continues after the last finished stage.
        tag = method.replace(" ", "_").replace("(", "").replace(")", "")
        out = jp.gradual_prune(variables, train, pruner=pruner, loss_fn=loss, target_sparsity=target,
                               stages=stages, n_examples=n, optimizer=optax.sgd(1e-3, momentum=0.5), batch_size=64,
                               key=jax.random.key(seed), evaluate_fn=evaluate, show_progress=show,
                               checkpoint_dir=dest / "checkpoints" / f"{tag}_{target}_seed{seed}")
        for st in out.history:
          rows.append({"target": target, "method": method, "seed": seed, "stage": st.stage,
                       "sparsity": round(st.sparsity, 4), "k": st.k, "acc_after_prune": st.after_prune["accuracy"],
                       "acc_after_finetune": st.after_finetune["accuracy"],
                       "loss_after_finetune": st.after_finetune["loss"], "prune_seconds": round(st.prune_seconds, 2),
                       "finetune_seconds": round(st.finetune_seconds, 2)})
        print(rows[-1], flush=True)
      last = [r for r in rows if r["target"] == target and r["method"] == method and r["stage"] == stages]
      prune, tune = (_common.ci90([r[c] for r in last]) for c in ("acc_after_prune", "acc_after_finetune"))
      final.append([target, method, f"{prune[0]:.2f} ± {prune[1]:.2f}", f"{tune[0]:.2f} ± {tune[1]:.2f}"])
      print(final[-1], flush=True)
  _common.write(dest, "gradual", rows, {"stages": stages, "n_examples": n, "seeds": seeds, "schedule": "cubic (official)",
                                        "optimizer": "sgd lr 1e-3 momentum 0.5 batch 64, 1 epoch per stage"})
  series = {f"{m} -> {t}": [(st, _common.ci90([r["acc_after_finetune"] for r in rows if r["method"] == m
                                                 and r["target"] == t and r["stage"] == st])[0]) for st in range(1, stages + 1)]
            for t in targets for m in pruners}
  _common.plot_lines(dest / "gradual.png", series, "stage", "test accuracy after fine-tuning (%)",
                     "MLPNet gradual pruning (14 stages, cubic)")
  print(_common.markdown_table(["target", "method", "accuracy after last prune (mean ± 90% CI)",
                                "after last fine-tune epoch"], final))


if __name__ == "__main__":
  main()

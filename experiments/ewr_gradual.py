"""Experiment 3c: MLPNet gradual pruning (EWR's Table 1 protocol) to 0.95 and 0.98.

14 stages on the official cubic schedule (stage 1 at sparsity 0), each: 1000 fresh training
examples, one pruning step (LR or EWR: official step, mask only, w_ref = dense weights; or
magnitude), then one epoch of masked SGD (lr 1e-3, momentum 0.5, batch 64, as the official
MLPNet config). Test accuracy after each prune and each fine-tuning epoch.
"""
import jax

import jaxprune as jp
from jaxprune.models import mlpnet

import _common


def main():
  args = _common.parser(__doc__.splitlines()[0]).parse_args()
  show = not args.no_progress
  variables = jp.load_mlpnet(f"{args.checkpoint_dir}/mlpnet_mnist.npz")
  train = jp.data.load("mnist", "train", data_dir=args.data_dir, source="local",
                       limit=5000 if args.quick else None)
  test = jp.data.load("mnist", "test", data_dir=args.data_dir, source="local")
  targets, stages, n = ([0.95], 3, 200) if args.quick else ([0.95, 0.98], 14, 1000)
  model = mlpnet()
  loss = jp.classification_loss(model.apply)
  evaluate = lambda v: (lambda e: {"accuracy": round(100 * e.accuracy, 2), "loss": round(e.loss, 4)})(
      jp.evaluate(model.apply, v, test.x, test.y))
  rows, final = [], []
  import optax
  dest = _common.out_dir(args, "ewr_gradual")
  for target in targets:
    for method in ("magnitude", "LR", "EWR"):
      # Resumable: a rerun after an interruption continues after the last finished stage.
      out = jp.gradual_prune(variables, train, pruner=method.lower(), loss_fn=loss, target_sparsity=target,
                             stages=stages, n_examples=n, optimizer=optax.sgd(1e-3, momentum=0.5), batch_size=64,
                             key=jax.random.key(0), evaluate_fn=evaluate, show_progress=show,
                             checkpoint_dir=dest / "checkpoints" / f"{method}_{target}")
      for st in out.history:
        rows.append({"target": target, "method": method, "stage": st.stage, "sparsity": round(st.sparsity, 4),
                     "k": st.k, "acc_after_prune": st.after_prune["accuracy"],
                     "acc_after_finetune": st.after_finetune["accuracy"], "loss_after_finetune": st.after_finetune["loss"],
                     "prune_seconds": round(st.prune_seconds, 2), "finetune_seconds": round(st.finetune_seconds, 2)})
      last = out.history[-1]
      final.append([target, method, last.after_prune["accuracy"], last.after_finetune["accuracy"]])
      print(final[-1], flush=True)
  _common.write(dest, "gradual", rows, {"stages": stages, "n_examples": n, "schedule": "cubic (official)",
                                        "optimizer": "sgd lr 1e-3 momentum 0.5 batch 64, 1 epoch per stage"})
  series = {f"{m} -> {t}": [(r["stage"], r["acc_after_finetune"]) for r in rows if r["method"] == m and r["target"] == t]
            for t in targets for m in ("magnitude", "LR", "EWR")}
  _common.plot_lines(dest / "gradual.png", series, "stage", "test accuracy after fine-tuning (%)",
                     "MLPNet gradual pruning (14 stages, cubic)")
  print(_common.markdown_table(["target", "method", "accuracy after last prune", "after last fine-tune epoch"], final))


if __name__ == "__main__":
  main()

"""Experiment 3b: robustness to noisy gradients, EWR versus LR (the paper's headline claim).

MLPNet on MNIST, no fine-tuning, the official per-stage step (mask only, one IHT step per stage,
G recomputed at the current weights with fresh noise, w_ref = the dense weights) over a few
stages to each target sparsity. Noise as in the official code: for each example, N(0, (scale x
std of that example's gradient)^2) on a random fraction of its coordinates. Test loss and
accuracy over 5 seeds (each seed draws its own examples and noise), mean with a 90% t-interval.
"""
import time

import jax
import numpy as np

import jaxprune as jp
from jaxprune.models import mlpnet
from jaxprune.core.progress import progress

import _common

def main():
  p = _common.parser(__doc__.splitlines()[0])
  p.add_argument("--seeds", type=int, default=5)
  args = p.parse_args()
  show = not args.no_progress
  if args.quick:
    sparsities, noises, seeds, n, stages = [0.9], [(0.0, 0.0), (2.0, 0.25)], 2, 200, 2
  else:
    sparsities, noises, seeds, n, stages = [0.75, 0.85, 0.95], [(0.0, 0.0), (1.0, 0.1), (1.0, 0.25),
                                                                           (2.0, 0.1), (2.0, 0.25)], args.seeds, 500, 5
  variables = jp.load_mlpnet(f"{args.checkpoint_dir}/mlpnet_mnist.npz")
  train = jp.data.load("mnist", "train", data_dir=args.data_dir, source="local")
  test = jp.data.load("mnist", "test", data_dir=args.data_dir, source="local")
  model = mlpnet()
  loss = jp.classification_loss(model.apply)
  rows = []
  todo = [(s, nz, seed, m) for s in sparsities for nz in noises for seed in range(seeds) for m in ("LR", "EWR")]
  for s, (scale, frac), seed, method in progress(todo, desc="runs", disable=not show):
    idx = np.random.default_rng(seed).choice(len(train), n, replace=False)
    k = jp.k_from_sparsity(variables, s)
    fn = jp.ewr if method == "EWR" else jp.lr
    t0 = time.perf_counter()
    res = fn(variables, (train.x[idx], train.y[idx]), k, loss_fn=loss, stages=stages, stage_schedule="cubic",
             noise=(scale, frac) if frac > 0 else None, key=jax.random.key(seed), show_progress=False)
    ev = jp.evaluate(model.apply, res.params, test.x, test.y)
    rows.append({"sparsity": s, "noise_scale": scale, "noise_fraction": frac, "seed": seed, "method": method,
                 "test_loss": round(ev.loss, 5), "accuracy": round(100 * ev.accuracy, 2),
                 "seconds": round(time.perf_counter() - t0, 2)})
    print(rows[-1], flush=True)
  out = _common.out_dir(args, "ewr_noise")
  _common.write(out, "noise", rows, {"n_examples": n, "stages": stages, "eps": 1.0, "lam": 0.01, "seeds": seeds})
  summary, table = [], []
  for s in sparsities:
    for scale, frac in noises:
      cell = [s, f"{scale:g} x std on {frac:.0%}" if frac else "none"]
      stats = {}
      for m in ("LR", "EWR"):
        sel = [r for r in rows if r["sparsity"] == s and r["noise_scale"] == scale and r["noise_fraction"] == frac
               and r["method"] == m]
        stats[m] = (_common.ci90([r["test_loss"] for r in sel]), _common.ci90([r["accuracy"] for r in sel]))
        summary.append({"sparsity": s, "noise": cell[1], "method": m, "loss_mean": stats[m][0][0],
                        "loss_ci90": stats[m][0][1], "acc_mean": stats[m][1][0], "acc_ci90": stats[m][1][1]})
      for m in ("LR", "EWR"):
        (lm, lc), (am, ac) = stats[m]
        cell += [f"{lm:.4f} ± {lc:.4f}", f"{am:.2f} ± {ac:.2f}"]
      cell.append(f"{100 * (stats['EWR'][0][0] - stats['LR'][0][0]) / stats['LR'][0][0]:+.1f}%")
      table.append(cell)
  _common.write(out, "noise_summary", summary, {})
  series = {f"{m}, noise {nz}": [(r["sparsity"], r["loss_mean"]) for r in summary if r["method"] == m and r["noise"] == nz]
            for m in ("LR", "EWR") for nz in sorted({r["noise"] for r in summary})}
  errors = {f"{m}, noise {nz}": {r["sparsity"]: r["loss_ci90"] for r in summary if r["method"] == m and r["noise"] == nz}
            for m in ("LR", "EWR") for nz in sorted({r["noise"] for r in summary})}
  _common.plot_lines(out / "noise.png", series, "sparsity", "test loss", "MLPNet: EWR vs LR under gradient noise",
                     errors=errors)
  print(_common.markdown_table(["sparsity", "noise", "LR loss", "LR acc", "EWR loss", "EWR acc",
                                "EWR loss vs LR (+ = higher)"], table))


if __name__ == "__main__":
  main()

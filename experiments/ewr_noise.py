"""Experiment 3b: the paper's claim, EWR against LR under noisy gradients and noisy labels.

MLPNet on MNIST, no fine-tuning, both with jaxprune's default solver (multi-stage magnitude or OBS
support and ridge refit, lam by sparsity; EWR's target from the exact sorted matching) but
``--stages`` stages (default 5) and N = 500 to fit the CPU budget. Gradient noise as in the official code: for each example,
N(0, (scale x std of that example's gradient)^2) on a random fraction of its coordinates, drawn
afresh at every stage. Label noise: a fraction of the N examples get a uniformly drawn wrong
label. Test loss and accuracy over seeds (each seed draws its own examples and noise), mean with
a 90% t-interval. A second table moves EWR's eps (absolute 1 as the official code, relative 0.1
and 0.01) at 0.9.
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
  p.add_argument("--stages", type=int, default=5)
  p.add_argument("--sparsities", type=float, nargs="+", default=[0.75, 0.9, 0.98])
  args = p.parse_args()
  show = not args.no_progress
  if args.quick:
    sparsities, noises, seeds, n, stages = [0.9], [("none", 0, 0), ("grad", 2.0, 0.25)], 2, 200, 2
  else:
    sparsities, seeds, n, stages = args.sparsities, args.seeds, 500, args.stages
    noises = [("none", 0, 0), ("grad", 1.0, 0.1), ("grad", 1.0, 0.25), ("grad", 2.0, 0.1), ("grad", 2.0, 0.25),
              ("labels", 0, 0.25)]
  eps_variants = {} if args.quick else {"EWR eps=1 (abs)": dict(eps=1.0), "EWR eps=0.1 (rel)": dict(eps=0.1, relative_eps=True),
                                        "EWR eps=0.01 (rel)": dict(eps=0.01, relative_eps=True)}
  variables = jp.load_mlpnet(f"{args.checkpoint_dir}/mlpnet_mnist.npz")
  train = jp.data.load("mnist", "train", data_dir=args.data_dir, source="local")
  test = jp.data.load("mnist", "test", data_dir=args.data_dir, source="local")
  model = mlpnet()
  loss = jp.classification_loss(model.apply)
  rows = []
  todo = [(s, nz, seed, m, {}) for s in sparsities for nz in noises for seed in range(seeds) for m in ("LR", "EWR")]
  todo += [(0.9, nz, seed, m, kw) for nz in noises[:1] + noises[-2:-1] for seed in range(seeds)
           for m, kw in eps_variants.items()]
  for s, (kind, scale, frac), seed, method, extra in progress(todo, desc="runs", disable=not show):
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(train), n, replace=False)
    labels = np.asarray(train.y[idx]).copy()
    if kind == "labels":
      flip = rng.choice(n, int(frac * n), replace=False)
      labels[flip] = (labels[flip] + rng.integers(1, 10, flip.size)) % 10
    k = jp.k_from_sparsity(variables, s)
    fn = jp.lr if method == "LR" else jp.ewr
    t0 = time.perf_counter()
    res = fn(variables, (train.x[idx], labels), k, loss_fn=loss, stages=stages,
             noise=(scale, frac) if kind == "grad" else None, key=jax.random.key(seed), show_progress=False, **extra)
    ev = jp.evaluate(model.apply, res.params, test.x, test.y)
    noise = "none" if kind == "none" else (f"{scale:g} x std on {frac:.0%}" if kind == "grad" else f"{frac:.0%} labels")
    rows.append({"sparsity": s, "noise": noise, "seed": seed, "method": method,
                 "test_loss": round(ev.loss, 5), "accuracy": round(100 * ev.accuracy, 2),
                 "seconds": round(time.perf_counter() - t0, 2)})
    print(rows[-1], flush=True)
  out = _common.out_dir(args, "ewr_noise")
  _common.write(out, "noise", rows, {"n_examples": n, "stages": stages, "seeds": seeds,
                                     "solver": "default (magnitude/OBS support, ridge refit), EWR eps=0"})
  summary = []
  for key in sorted({(r["sparsity"], r["noise"], r["method"]) for r in rows}, key=str):
    sel = [r for r in rows if (r["sparsity"], r["noise"], r["method"]) == key]
    (lm, lc), (am, ac) = _common.ci90([r["test_loss"] for r in sel]), _common.ci90([r["accuracy"] for r in sel])
    summary.append({"sparsity": key[0], "noise": key[1], "method": key[2], "loss_mean": lm, "loss_ci90": lc,
                    "acc_mean": am, "acc_ci90": ac, "runs": len(sel)})
  _common.write(out, "noise_summary", summary, {})
  cell = lambda s, nz, m, f: next((f"{r[f + '_mean']:.{4 if f == 'loss' else 2}f} ± {r[f + '_ci90']:.{4 if f == 'loss' else 2}f}"
                                   for r in summary if (r["sparsity"], r["noise"], r["method"]) == (s, nz, m)), "")
  by = {(r["sparsity"], r["noise"], r["method"]): r for r in summary}
  table = []
  for s in sparsities:
    for nz in dict.fromkeys(r["noise"] for r in rows):
      if (s, nz, "LR") not in by:
        continue
      lr, ewr = by[s, nz, "LR"], by[s, nz, "EWR"]
      wins = "EWR" if ewr["loss_mean"] + ewr["loss_ci90"] < lr["loss_mean"] - lr["loss_ci90"] else (
          "LR" if lr["loss_mean"] + lr["loss_ci90"] < ewr["loss_mean"] - ewr["loss_ci90"] else "tie")
      table.append([s, nz, cell(s, nz, "LR", "loss"), cell(s, nz, "LR", "acc"), cell(s, nz, "EWR", "loss"),
                    cell(s, nz, "EWR", "acc"), wins])
  print(_common.markdown_table(["sparsity", "noise", "LR loss", "LR acc", "EWR loss", "EWR acc",
                                "lower loss (90% CIs apart)"], table))
  eps_table = [[m, nz, cell(0.9, nz, m, "loss"), cell(0.9, nz, m, "acc")] for m in ["LR", "EWR", *eps_variants]
               for nz in dict.fromkeys(r["noise"] for r in rows if r["method"] in eps_variants)] if eps_variants else []
  if eps_table:
    print(_common.markdown_table(["method (0.9)", "noise", "test loss", "accuracy"], eps_table))
  noises_seen = list(dict.fromkeys(r["noise"] for r in rows))
  series = {f"{m}, {nz}": [(r["sparsity"], r["acc_mean"]) for r in summary if r["method"] == m and r["noise"] == nz]
            for m in ("LR", "EWR") for nz in noises_seen}
  errors = {f"{m}, {nz}": {r["sparsity"]: r["acc_ci90"] if r["acc_ci90"] == r["acc_ci90"] else 0.0 for r in summary
                           if r["method"] == m and r["noise"] == nz} for m in ("LR", "EWR") for nz in noises_seen}
  _common.plot_lines(out / "noise.png", {k: v for k, v in series.items() if v}, "sparsity", "test accuracy (%)",
                     "MLPNet: EWR vs LR under noise (default solver)", errors=errors)

if __name__ == "__main__":
  main()

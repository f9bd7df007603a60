"""Experiment 3a: MLPNet on MNIST, one-shot pruning without fine-tuning.

Magnitude against the default LR and EWR calls (jaxprune's multi-stage solver: magnitude support
and exact ridge refit, stages and lam by sparsity) and the official single step (which is
magnitude pruning from the dense point), N = 1000 training examples drawn per seed, beside the
published one-shot numbers of MP, WF and CBS (research/oneshot-tables.md section 2), CBS-S at 0.98
and CHITA++ at 0.98 (from its abstract). Mean and 90% t-interval over seeds, with the seconds per
call. Writes oneshot.csv/.json/.png and prints a markdown table.
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
CBS_S = {0.98: 66.64}
CHITA_PP = {0.98: 90.4}


def main():
  p = _common.parser(__doc__.splitlines()[0])
  p.add_argument("--seeds", type=int, default=5)
  p.add_argument("--sparsities", type=float, nargs="+", default=sorted(PUBLISHED))
  p.add_argument("--methods", nargs="+", default=["magnitude", "LR", "EWR", "LR (official)"])
  args = p.parse_args()
  show = not args.no_progress
  sparsities = [0.5, 0.95] if args.quick else args.sparsities
  n, seeds = (200, 1) if args.quick else (1000, args.seeds)
  quick = dict(stages=3) if args.quick else {}
  variables = jp.load_mlpnet(f"{args.checkpoint_dir}/mlpnet_mnist.npz")
  train = jp.data.load("mnist", "train", data_dir=args.data_dir, source="local")
  test = jp.data.load("mnist", "test", data_dir=args.data_dir, source="local")
  model = mlpnet()
  loss = jp.classification_loss(model.apply)
  acc = lambda params: 100 * jp.evaluate(model.apply, params, test.x, test.y).accuracy
  calls = {
      "magnitude": lambda b, k: jp.magnitude(variables, k),
      "LR": lambda b, k: jp.lr(variables, b, k, loss_fn=loss, show_progress=False, **quick),
      "EWR": lambda b, k: jp.ewr(variables, b, k, loss_fn=loss, show_progress=False, **quick),
      "LR (official)": lambda b, k: jp.lr(variables, b, k, loss_fn=loss, official=True, show_progress=False),
      "LR (obs support)": lambda b, k: jp.lr(variables, b, k, loss_fn=loss, support="obs", show_progress=False,
                                             **quick),
  }
  methods = [m for m in args.methods if m in calls]
  rows = []
  todo = [(s, seed, m) for s in sparsities for seed in range(seeds) for m in methods]
  for s, seed, name in progress(todo, desc="runs", disable=not show):
    idx = np.random.default_rng(seed).choice(len(train), n, replace=False)
    k = jp.k_from_sparsity(variables, s)
    t0 = time.perf_counter()
    res = calls[name]((train.x[idx], train.y[idx]), k)
    jax.block_until_ready(res.params)
    seconds = time.perf_counter() - t0
    assert jp.count_kept(res.masks) == k
    opts = res.info.get("options")
    rows.append({"sparsity": s, "seed": seed, "method": name, "k": k, "accuracy": round(acc(res.params), 2),
                 "seconds": round(seconds, 2), "stages": getattr(opts, "stages", ""), "lam": getattr(opts, "lam", "")})
    print(rows[-1], flush=True)
  out = _common.out_dir(args, "ewr_mlpnet_oneshot")
  meta = {"n_examples": n, "seeds": seeds, "published": PUBLISHED, "cbs_s": CBS_S, "chita_pp": CHITA_PP,
          "dense_accuracy": round(acc(variables), 2)}
  _common.write(out, "oneshot", rows, meta)
  stats = {(s, m): (_common.ci90([r["accuracy"] for r in rows if r["sparsity"] == s and r["method"] == m]),
                    float(np.mean([r["seconds"] for r in rows if r["sparsity"] == s and r["method"] == m])))
           for s in sparsities for m in methods}
  series = {m: [(s, stats[s, m][0][0]) for s in sparsities] for m in methods}
  errors = {m: {s: (0.0 if np.isnan(stats[s, m][0][1]) else stats[s, m][0][1]) for s in sparsities} for m in methods}
  for i, name in enumerate(("MP (published)", "WF (published)", "CBS (published)")):
    series[name] = [(s, PUBLISHED[s][i]) for s in sparsities if s in PUBLISHED]
  _common.plot_lines(out / "oneshot.png", series, "sparsity", "test accuracy (%)",
                     f"MLPNet/MNIST one-shot, no fine-tuning (N={n}, {seeds} seeds)", hline=meta["dense_accuracy"],
                     errors=errors)
  fmt = lambda s, m: f"{stats[s, m][0][0]:.2f} ± {stats[s, m][0][1]:.2f} ({stats[s, m][1]:.1f} s)"
  header = ["sparsity"] + methods + ["MP", "WF", "CBS", "CBS-S / CHITA++"]
  table = [[s] + [fmt(s, m) for m in methods] + list(PUBLISHED.get(s, ("", "", "")))
           + [f"{CBS_S[s]} / {CHITA_PP[s]}" if s in CBS_S else ""] for s in sparsities]
  print(_common.markdown_table(header, table))


if __name__ == "__main__":
  main()

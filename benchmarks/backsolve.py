"""Benchmark: one stage of the default EWR/LR solver against computing G alone, and the whole
default call. MLPNet (N = 1000) and ResNet20 (its 18 block convs, N = 500).

One process per model; each timing is the median of warm calls after a compiling one, so the
ratios are side by side in one run on one machine.
  G               per_example_grads (materialised)
  stage (LR)      G + y = G w + magnitude support + ridge refit (Woodbury N x N, k > N)
  stage (k<=N)    the same with the k x k Cholesky refit at k = N/2
  stage (EWR)     G + y + the sorted-matching target N Pi^T y (eps = 0) + refit
  OBS saliency    the optimal-brain-surgeon scores on a dense support (the 0.98 default's support)
  default call    jp.lr(params, batch, k) at 0.9 sparsity (20 stages), timed once
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _timing import gradient_problem, write_results

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("JAXPRUNE_SHARED", REPO.parent / "shared"))


def run_model(model: str, n: int, repeats: int, whole: bool) -> list[dict]:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import jaxprune as jp
  from jaxprune.methods import _backsolve, _ewr
  from jaxprune.ot.plans import SinkhornOptions

  v, loss, batch, prunable, chunk = gradient_problem(model, n, SHARED)
  spec = jp.trees.flat_spec(v, prunable)
  w, _ = jp.flatten(v, spec=spec)
  p = spec.size
  k = p // 10
  mu = jnp.asarray(n * 1e-5, jnp.float32)
  ewr_cfg = _ewr.StepConfig("entropic", 0.0, False, 1e-3, "official", True, SinkhornOptions())

  def grads():
    return jp.per_example_grads(loss, v, batch, spec=spec, chunk_size=chunk, show_progress=False)

  def stage(kind):
    G = grads()
    y = G @ w
    budget = n // 2 if kind == "cholesky" else k
    keep = jp.topk_mask(jnp.abs(w), budget)
    if kind == "ewr":
      y = _ewr.regression_target(y, G @ jnp.where(keep, w, 0.0), ewr_cfg)[0]
    if kind == "cholesky":
      return _backsolve.refit_cholesky(G, keep, y, w, mu, budget)
    return _backsolve.refit_woodbury(G, keep, y, w, mu)

  G0 = grads()
  timings = {"G": grads, "stage (LR)": lambda: stage("woodbury"), "stage (k<=N)": lambda: stage("cholesky"),
             "stage (EWR)": lambda: stage("ewr"), "OBS saliency": lambda: _backsolve.obs_saliency(G0, w, mu)}
  rows = []
  for name, fn in timings.items():
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    runs = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      runs.append(time.perf_counter() - t0)
    rows.append({"model": model, "n": n, "p": p, "what": name, "first_s": round(first, 3),
                 "warm_s": round(float(np.median(runs)), 3)})
    print(rows[-1], file=sys.stderr, flush=True)
  if whole:
    t0 = time.perf_counter()
    res = jp.lr(v, batch, k, loss_fn=loss, prunable=prunable, chunk_size=chunk, show_progress=False)
    jax.block_until_ready(res.params)
    rows.append({"model": model, "n": n, "p": p, "what": f"default call ({res.info['options'].stages} stages)",
                 "first_s": round(time.perf_counter() - t0, 2), "warm_s": ""})
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
  ap.add_argument("--child", nargs=3, metavar=("MODEL", "N", "WHOLE"), help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    print(json.dumps(run_model(args.child[0], int(args.child[1]), args.repeats, args.child[2] == "1")))
    return
  configs = [("mlpnet", 200, 0)] if args.quick else [("mlpnet", 1000, 1), ("resnet20", 500, 0)]
  rows = []
  for model, n, whole in configs:
    proc = subprocess.run([sys.executable, __file__, "--child", model, str(n), str(whole), "--repeats",
                           str(1 if args.quick else args.repeats)], capture_output=True, text=True, check=True,
                          env={**os.environ, "JAXPRUNE_NO_PROGRESS": "1"})
    rows += json.loads(proc.stdout.strip().splitlines()[-1])
  lines = [f"cores: {os.cpu_count()}", "", "| model | N | p | what | first call (s) | warm (s) | warm / G |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    g = next(x["warm_s"] for x in rows if x["model"] == r["model"] and x["what"] == "G")
    ratio = f"{r['warm_s'] / g:.2f}" if r["warm_s"] != "" else f"{r['first_s'] / g:.1f} (first)"
    lines.append(f"| {r['model']} | {r['n']} | {r['p']} | {r['what']} | {r['first_s']} | {r['warm_s']} | {ratio} |")
  print("\n".join(lines))
  write_results(args.out, "backsolve_quick" if args.quick else "backsolve", {"cores": os.cpu_count(), "rows": rows},
                lines, 1 if args.quick else args.repeats)


if __name__ == "__main__":
  main()

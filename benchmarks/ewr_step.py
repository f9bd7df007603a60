"""Benchmark: one EWR step against computing G alone and against one LR step; materialised
versus matrix-free time and peak memory. MLPNet (N=1000) and ResNet20 (N=100, 1000).

Every configuration runs in its own subprocess (so peak RSS is its own), compiles once, then
times the median of ``--repeats`` warm calls. Ratios are taken within this one run.
  G          per_example_grads (materialised, chunk 250)
  LR step    G + y = G w + one jitted IHT step with the identity plan
  EWR step   G + y + one jitted IHT step with the entropic plan (Sinkhorn, eps=1)
  *-mf       the same step with the matrix-free operator (G never formed)
The IHT step is taken at magnitude-pruned weights (a non-trivial step, as in stage 2 onward).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from _timing import gradient_problem

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("JAXPRUNE_SHARED", REPO.parent / "shared"))


def run_one(model: str, n: int, what: str, repeats: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import jaxprune as jp
  from jaxprune.methods._ewr import StepConfig, iht_step
  from jaxprune.ot.plans import SinkhornOptions

  v, loss, batch, prunable, chunk = gradient_problem(model, n, SHARED)
  spec = jp.trees.flat_spec(v, prunable)
  w_ref, _ = jp.flatten(v, spec=spec)
  k = spec.size // 10
  w = jnp.where(jp.topk_mask(jnp.abs(w_ref), k), w_ref, 0.0)
  coupling = "entropic" if what.startswith("ewr") else "identity"
  cfg = StepConfig(coupling, 1.0, False, 0.01, "official", True, SinkhornOptions())

  def call():
    if what == "G":
      return jp.per_example_grads(loss, v, batch, spec=spec, chunk_size=chunk, show_progress=False)
    if what.endswith("-mf"):
      op = jp.gradient_operator(loss, v, batch, spec=spec, chunk_size=chunk)
    else:
      op = jp.signals.dense_operator(jp.per_example_grads(loss, v, batch, spec=spec, chunk_size=chunk,
                                                         show_progress=False))
    y = op.matvec(w_ref)
    return iht_step(op, w, w_ref, y, k, cfg)

  jax.block_until_ready(call())            # compile
  times = []
  repeats = max(1, repeats)
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(call())
    times.append(time.perf_counter() - t0)
  extra = {}
  if what.startswith("ewr"):
    extra["sinkhorn_iterations"] = int(out[2].sinkhorn_iterations)
  return {"model": model, "n": n, "p": spec.size, "what": what, "seconds": float(np.median(times)),
          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **extra}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
  p.add_argument("--child", nargs=3, metavar=("MODEL", "N", "WHAT"), help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    print(json.dumps(run_one(args.child[0], int(args.child[1]), args.child[2], args.repeats)))
    return
  all_steps = ["G", "lr", "ewr", "lr-mf", "ewr-mf"]
  # (model, N, what to time, timed repeats after the compiling call); ResNet20 at N=1000 is the
  # expensive one (G ~ 1 GB, the matrix-free step runs ~8 passes over 1000 examples).
  configs = [("mlpnet", 200, all_steps, 2)] if args.quick else [
      ("mlpnet", 1000, all_steps, args.repeats), ("resnet20", 100, all_steps, 3),
      ("resnet20", 1000, ["G", "lr", "ewr", "ewr-mf"], 1)]
  rows = []
  for model, n, whats, repeats in configs:
    for what in whats:
      proc = subprocess.run([sys.executable, __file__, "--child", model, str(n), what, "--repeats", str(repeats)],
                            capture_output=True, text=True, check=True, env={**os.environ, "JAXPRUNE_NO_PROGRESS": "1"})
      rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
      print(rows[-1], flush=True)
  import jax
  machine = {"backend": jax.default_backend(), "device": str(jax.devices()[0]), "cores": os.cpu_count(), "jax": jax.__version__}
  lines = [f"machine: {machine}", "",
           "| model | N | p | G (s) | LR step (s) | EWR step (s) | EWR/G | EWR/LR | EWR matrix-free (s) | peak MB: G / EWR / EWR-mf | Sinkhorn its |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for model, n, _, _ in configs:
    r = {x["what"]: x for x in rows if x["model"] == model and x["n"] == n}
    lines.append(f"| {model} | {n} | {r['G']['p']} | {r['G']['seconds']:.3f} | {r['lr']['seconds']:.3f} | "
                 f"{r['ewr']['seconds']:.3f} | {r['ewr']['seconds'] / r['G']['seconds']:.2f} | "
                 f"{r['ewr']['seconds'] / r['lr']['seconds']:.2f} | {r['ewr-mf']['seconds']:.3f} | "
                 f"{r['G']['peak_rss_mb']:.0f} / {r['ewr']['peak_rss_mb']:.0f} / {r['ewr-mf']['peak_rss_mb']:.0f} | "
                 f"{r['ewr']['sinkhorn_iterations']} |")
  table = "\n".join(lines)
  print(table)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  name = "ewr_step_quick" if args.quick else "ewr_step"
  (out / f"{name}.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
  (out / f"{name}.md").write_text(table + "\n")


if __name__ == "__main__":
  main()

"""Intra-Fusion speed: all groups of VGG11-BN and ResNet18, against default pruning of the same groups.

Per model (random-init weights with random BatchNorm statistics; timing does not depend on the
values): ``prune_channels`` (l1, every group at 50%, shrink) against ``intra_fusion`` with the
exact solver (POT network simplex on the host), the entropic solver (ott-jax Sinkhorn, jitted),
sequential (official order) and parallel (one vmapped Sinkhorn per (n, m) shape). Warm timings:
median of 3 after one warm-up call (compilation excluded). Then the growth with group size: the
cost matrix and each solver on synthetic pairing vectors (n, D=4608), m = n/2.
"""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxprune as jp
from jaxprune import models, ot
from jaxprune.methods._intrafusion import pairing_cost

from _timing import parse_args, markdown_table, median_time, write_results

REPO = Path(__file__).resolve().parents[1]


def timed(fn, repeats):
  return median_time(fn, repeats)[2]


def main():
  args = parse_args(__doc__.splitlines()[0])
  repeats = 1 if args.quick else 3
  rows = []
  cases = {"ResNet20": models.resnet20} if args.quick else {"VGG11-BN": models.vgg11_bn, "ResNet18": models.resnet18}
  for name, make in cases.items():
    model = make()
    v = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    g = jp.groups(model.apply, v, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    run = lambda fn, **kw: (lambda: fn(v, g, 0.5, show_progress=False, **kw).params)
    base = timed(run(jp.prune_channels), repeats)
    row = {"model": name, "groups": len(g), "default_s": round(base, 3)}
    for label, kw in (("exact", dict(solver="exact")), ("entropic", dict(solver="entropic")),
                      ("entropic_parallel", dict(solver="entropic", order="parallel"))):
      t = timed(run(jp.intra_fusion, **kw), repeats)
      row[f"if_{label}_s"] = round(t, 3)
      row[f"if_{label}_ratio"] = round(t / base, 1)
    rows.append(row)
    print(row, flush=True)
  sizes = [64, 128, 256] if args.quick else [64, 128, 256, 512, 1024, 2048]
  growth = []
  rng = np.random.default_rng(0)
  for n in sizes:
    m = n // 2
    x = jnp.asarray(rng.normal(size=(n, 4608)), jnp.float32)
    keep = np.arange(m)
    cost_s = timed(lambda: pairing_cost(x, keep), repeats)
    c = np.asarray(pairing_cost(x, keep), np.float64)
    a, b = np.full(n, 1 / n), np.full(m, 1 / m)
    exact_s = timed(lambda: ot.exact_plan(c, a, b), repeats)
    cj, aj, bj = (jnp.asarray(t, jnp.float32) for t in (c, a, b))
    opts = ot.SinkhornOptions(threshold=1e-5, max_iterations=20000)
    ent = jax.jit(lambda c, a, b: ot.entropic_plan(c, a, b, 0.001, options=opts))
    ent_s = timed(lambda: ent(cj, aj, bj), repeats)
    iters = int(ent(cj, aj, bj)[1].iterations)
    growth.append({"n": n, "m": m, "cost_s": round(cost_s, 4), "exact_s": round(exact_s, 4),
                   "entropic_s": round(ent_s, 4), "sinkhorn_iterations": iters})
    print(growth[-1], flush=True)
  md = []
  for table in (rows, growth):
    md += markdown_table(table) + [""]
  print("\n".join(md))
  write_results(args.out, "intrafusion_quick" if args.quick else "intrafusion", {"models": rows, "growth": growth},
                md, repeats)

if __name__ == "__main__":
  main()

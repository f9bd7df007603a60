"""Benchmark: one official-preset LR/EWR stage against its floor, computing G by ``jit(vmap(grad))``.

The issue-15 target: a whole official stage (gradients, projections, plan, IHT step, threshold,
masks) within 1.3x of computing ``G`` alone. Each row is timed interleaved with the floor in one
process (calls alternate, so machine noise hits all alike); medians of ``--repeats`` warm calls.
  floor          jit(vmap(grad)) of the per-example loss over all N examples
  lr / ewr       jp.lr / jp.ewr(official=True): eager, with the host checks and one transfer; its
                 signals (``"auto"``: matrix-free on MLPNet, G on ResNet20) in the "signals" column
  lr jit / ...   jax.jit(functools.partial(jp.lr, k=..., ...)): the whole stage as one program
"first" is the first call in the process (compilation included). The EWR rows also report
Sinkhorn's iterations (the N x N log-domain solve is EWR's extra cost).
"""
import functools
import os
import statistics
import time
from pathlib import Path

import jax

from _timing import gradient_problem, markdown_table, parse_args, write_results

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("JAXPRUNE_SHARED", REPO.parent / "shared"))


def calls(model: str, n: int) -> tuple[dict, dict]:
  """``({name: zero-argument call}, {method: zero-argument call returning its info})`` for one model."""
  import jaxprune as jp
  from jaxprune.signals.gradients import _example_loss_fn
  v, loss, batch, prunable, _ = gradient_problem(model, n, SHARED)
  spec = jp.trees.flat_spec(v, prunable)
  w, _ = jp.flatten(v, spec=spec)
  one = _example_loss_fn(loss, v, spec)
  floor = jax.jit(lambda w_, b: jax.vmap(jax.grad(one), in_axes=(None, 0))(w_, b))
  out = {"floor": lambda: floor(w, batch)}
  infos = {}
  for method in ("lr", "ewr"):
    fn = functools.partial(getattr(jp, method), k=spec.size // 10, loss_fn=loss, prunable=prunable, official=True,
                           show_progress=False, chunk_size=n)
    jitted = jax.jit(fn)
    out[method] = (lambda f: lambda: f(v, batch).params)(fn)
    out[f"{method} jit"] = (lambda f: lambda: f(v, batch).params)(jitted)
    infos[method] = (lambda f: lambda: f(v, batch).info)(fn)
  return out, infos


def interleaved(fns: dict, repeats: int) -> dict:
  """``{name: (first call s, median warm s)}``, the warm calls alternating between the names."""
  first = {}
  for name, fn in fns.items():
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first[name] = time.perf_counter() - t0
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - t0)
  return {name: (first[name], statistics.median(t)) for name, t in times.items()}


def main():
  args = parse_args(__doc__.splitlines()[0])
  configs = [("mlpnet", 200, 3)] if args.quick else [("mlpnet", 1000, 15), ("resnet20", 200, 7)]
  rows = []
  for model, n, repeats in configs:
    fns, infos = calls(model, n)
    timed = interleaved(fns, repeats)
    infos = {method: info() for method, info in infos.items()}   # after timing: the first calls are first
    floor = timed["floor"][1]
    for name, (first, warm) in timed.items():
      method = name.split()[0]
      its = infos[method]["steps"][0].get("sinkhorn_iterations") if method == "ewr" else None
      signals = infos[method]["options"].signals if method in infos else ""
      rows.append({"model": model, "N": n, "call": name, "signals": signals, "first (s)": round(first, 3),
                   "warm (s)": round(warm, 4), "warm / floor": round(warm / floor, 2),
                   "Sinkhorn its": "" if its is None else int(its)})
      print(rows[-1], flush=True)
  md = markdown_table(rows)
  print("\n".join(md))
  write_results(args.out, "official_stage_quick" if args.quick else "official_stage", {"rows": rows}, md,
                max(r for _, _, r in configs))


if __name__ == "__main__":
  main()

"""i-SpaSP speed: one ResNet block against per-example and per-chunk reimplementations of the official loop,
and a vmapped sweep over 8 keep ratios against 8 separate calls.

The block is ResNet20's ``layer1_0`` (the shared checkpoint): hidden activations ``H: (N, 32, 32, 16)``
from N = 1280 cifar10_png5k training images, keep ratio 0.4, T = 20. Compared, all producing the
same support (checked):
- ``official, per example``: the official loop's structure (Python loops over iterations and
  examples, index sets on the host) with a jitted per-example gradient (batches of one);
- ``official, chunks of 256``: the same with the official chunk size;
- ``jaxprune examples``: :func:`jaxprune.recover_support` with the per-example proxy (one
  compiled loop, chunks of 256 unrolled);
- ``jaxprune residual_sum``: the pruned branch per example, one pullback of the summed residual
  (what ``proxy="auto"`` picks with train-mode BatchNorm, so with ``official=True``);
- ``jaxprune reduced``: the exact reduced proxy (the default for this block).
Then 8 keep ratios (0.1 .. 0.8) in one vmapped call (:func:`jaxprune.ispasp_sweep`) against 8
calls of the compiled single-ratio function, for both proxies (the per-example one on N = 256).
Last, ``jaxprune.ispasp`` on all nine ResNet20 units (sequential, keep 0.5): the defaults, with and
without the stop at the fixed point, the per-example proxy, ``official=True`` and ``official=True``
computed step by step as the official code (per-example proxy, all T iterations).
Warm timings (compiled), median of ``repeats``; the per-example loop runs once (its one small
compilation is included).
"""
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxprune as jp
from jaxprune import models

from _timing import parse_args, markdown_table, median_time, write_results

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def official_loop(unit, variables, hidden, s, iterations, chunk):
  """The official prune_basic_block loop, host-side sets; gradients jitted per chunk."""
  @jax.jit
  def chunk_grad(h, keep_mask, empty):
    dense = lambda x: unit.output(variables, x)
    u, pullback = jax.vjp(dense, h)
    u_hat = jnp.where(empty, 0.0, unit.output(variables, h, keep_mask))
    return jnp.sum(pullback(u - u_hat)[0], axis=(0, 1, 2))

  agg = np.asarray(jnp.sum(hidden, axis=(0, 1, 2)))
  support = set()
  for _ in range(iterations):
    keep_mask = np.zeros(hidden.shape[-1], bool)
    keep_mask[sorted(support)] = True
    importance = np.zeros(hidden.shape[-1])
    for i in range(0, hidden.shape[0], chunk):
      importance += np.asarray(chunk_grad(hidden[i:i + chunk], jnp.asarray(keep_mask), not support))
    top = np.argsort(-importance, kind="stable")[:2 * s]
    indexer = np.array(sorted(set(top.tolist()) | support))
    support = set(indexer[np.argsort(-agg[indexer], kind="stable")[:s]].tolist())
  mask = np.zeros(hidden.shape[-1], bool)
  mask[sorted(support)] = True
  return mask


def main():
  args = parse_args(__doc__.splitlines()[0])
  repeats = 1 if args.quick else 3
  n, iterations = (64, 4) if args.quick else (1280, 20)
  v = jp.load_resnet20(str(SHARED / "checkpoints" / "resnet20_cifar10.npz"))
  model = models.resnet20()
  train = jp.data.load("cifar10_png5k", "train", data_dir=str(SHARED / "data"), source="local")
  x = jnp.asarray(train.x[np.random.default_rng(0).permutation(len(train.y))[:n]])
  unit = jp.two_layer_units(model.apply, v, x[:1])[-1]
  hidden = jax.block_until_ready(unit.hidden_fn(v, x))
  s = int(unit.size * 0.4)
  recover = jax.jit(jp.recover_support, static_argnums=0, static_argnames="options")
  opts = {k: jp.RecoveryOptions(iterations=iterations, proxy=k) for k in ("examples", "residual_sum", "reduced")}
  rows, masks = [], {}
  cases = {"official, per example": lambda: official_loop(unit, v, hidden, s, iterations, 1),
           "official, chunks of 256": lambda: official_loop(unit, v, hidden, s, iterations, 256)}
  for k, o in opts.items():
    cases[f"jaxprune {k}"] = (lambda o=o: recover(unit.output_fn, unit.params_fn(v), hidden, s, unit.output_norm(v),
                                                  options=o).mask)
  for name, fn in cases.items():
    if name.startswith("official, per"):   # one run (minutes); its compile is well under 1% of it
      t0 = time.perf_counter()
      out = fn()
      first = warm = time.perf_counter() - t0
    else:
      out, first, warm = median_time(fn, repeats)
    masks[name] = np.asarray(out)
    rows.append({"method": name, "N": n, "T": iterations, "first_call_s": round(first, 4), "warm_s": round(warm, 4)})
    print(rows[-1], flush=True)
  ref = masks["official, per example"]
  assert all(np.array_equal(m, ref) for m in masks.values()), {k: np.flatnonzero(m) for k, m in masks.items()}
  for r in rows:
    r["speedup_vs_per_example"] = round(rows[0]["warm_s"] / r["warm_s"], 1)

  keeps = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
  sweep_rows = []
  for k, n_sweep in (("reduced", n), ("examples", min(n, 256))):
    h = hidden[:n_sweep]
    o = jp.RecoveryOptions(iterations=iterations, proxy=k)
    _, _, vmapped = median_time(lambda: jp.ispasp_sweep(unit, v, h, [1 - r for r in keeps], proxy=k,
                                                         iterations=iterations, rounding="truncate"), repeats)
    one = lambda r: recover(unit.output_fn, unit.params_fn(v), h, int(unit.size * r), unit.output_norm(v), options=o).mask
    _, _, separate = median_time(lambda: [one(r) for r in keeps], repeats)
    sweep_rows.append({"proxy": k, "N": n_sweep, "ratios": len(keeps), "vmapped_s": round(vmapped, 4),
                       "separate_calls_s": round(separate, 4), "separate_over_vmapped": round(separate / vmapped, 2)})
    print(sweep_rows[-1], flush=True)
  network_rows = []
  for label, kw in (("defaults (eval BN, reduced proxy, stop at the fixed point)", {}),
                    ("defaults, all T iterations", {"stop_at_fixed_point": False}),
                    ("eval BN, per-example proxy", {"proxy": "examples"}),
                    ("official=True (train-mode BN, residual_sum proxy, stop at the fixed point)", {"official": True}),
                    ("official=True, per-example proxy, all T (the official computation step by step)",
                     {"official": True, "proxy": "examples", "stop_at_fixed_point": False})):
    def run(kw=kw):
      r = jp.ispasp(v, None, 0.5, apply_fn=model.apply, batch=x, iterations=iterations, show_progress=False, **kw)
      return r.params, r.kept
    (_, kept), first, warm = median_time(run, 1)
    network_rows.append({"whole ResNet20, sequential, keep 0.5": label, "N": n, "T": iterations,
                         "first_call_s": round(first, 2), "warm_s": round(warm, 2),
                         "kept": sum(len(k) for k in kept.values())})
    print(network_rows[-1], flush=True)
  md = ["### One ResNet20 block (layer1_0, 16 channels at 32x32), keep 0.4", ""] + markdown_table(rows)
  md += ["", "### 8 keep ratios: one vmapped call vs 8 calls", ""] + markdown_table(sweep_rows)
  md += ["", f"### All {len(kept)} units of ResNet20", ""] + markdown_table(network_rows)
  print("\n".join(md))
  write_results(args.out, "ispasp_quick" if args.quick else "ispasp", {"block": rows, "sweep": sweep_rows, "network": network_rows}, md, repeats)


if __name__ == "__main__":
  main()

"""Matrix-free LR and EWR on MobileNetV1 with 1000 classes (p = 4.2M) and N = 1000: peak memory and time.

A materialised G would take N p 4 bytes = 16.8 GB on one device (what the official code builds).
Each configuration runs in its own process (so its peak RSS is its own): ``jp.lr`` / ``jp.ewr``
with ``signals="matrix_free"`` and the official preset (one stage, one IHT step, 10% of the
weights kept), on 1000 ``cifar10_png5k`` training images at 32 x 32 (random-init weights; time
and memory do not depend on them). Every ``G v`` and ``G^T u`` is a pass over the examples in
chunks of ``--chunk`` with ``jax.jvp`` / ``jax.vjp``, so memory is O(p + N^2 + chunk activations).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("JAXPRUNE_SHARED", REPO.parent / "shared"))


def run_one(method: str, n: int, chunk: int) -> dict:
  import jax
  import jax.numpy as jnp
  import jaxprune as jp
  from jaxprune.models import MobileNetV1
  model = MobileNetV1(num_classes=1000)
  data = jp.data.load("cifar10_png5k", "train", data_dir=SHARED / "data", limit=n)
  v = model.init(jax.random.key(0), jnp.asarray(data.x[:1]))
  p = jp.count_prunable(v)
  k = p // 10
  fn = jp.lr if method == "lr" else jp.ewr
  t0 = time.perf_counter()
  result = fn(v, (jnp.asarray(data.x), jnp.asarray(data.y)), k, apply_fn=model.apply, official=True,
              signals="matrix_free", chunk_size=chunk, show_progress=False)
  jax.block_until_ready(jax.tree_util.tree_leaves(result.params))
  seconds = time.perf_counter() - t0
  assert jp.count_kept(result.masks) == k
  return {"method": method, "n": n, "p": p, "k": k, "chunk": chunk, "seconds": round(seconds, 1),
          "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
          "materialised_g_gb": round(n * p * 4 / 1e9, 1)}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="N = 64 (the slow tests use it)")
  ap.add_argument("--chunk", type=int, default=100)
  ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
  ap.add_argument("--child", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    print(json.dumps(run_one(args.child[0], int(args.child[1]), args.chunk)))
    return
  n = 64 if args.quick else 1000
  rows = []
  for method in ("lr", "ewr"):
    proc = subprocess.run([sys.executable, __file__, "--child", method, str(n), "--chunk", str(min(args.chunk, n))],
                          capture_output=True, text=True, env={**os.environ, "JAXPRUNE_NO_PROGRESS": "1"})
    if proc.returncode != 0:
      raise RuntimeError(proc.stderr[-3000:])
    rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(rows[-1], flush=True)
  import jax
  lines = ["| method | N | p | seconds | peak RSS (GB) | a materialised G (GB) |", "| --- | --- | --- | --- | --- | --- |"]
  lines += [f"| {r['method']} (matrix-free, official step) | {r['n']} | {r['p']:,} | {r['seconds']} | {r['peak_rss_gb']} | "
            f"{r['materialised_g_gb']} |" for r in rows]
  print("\n".join(lines))
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  stem = "mobilenet_memory_quick" if args.quick else "mobilenet_memory"
  meta = {"backend": jax.default_backend(), "device": str(jax.devices()[0]), "cores": os.cpu_count(),
          "jax": jax.__version__, "date": time.strftime("%Y-%m-%d")}
  (out / f"{stem}.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
  (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()

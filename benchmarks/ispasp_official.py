"""i-SpaSP against the official code, side by side: one ResNet34 block at N = 1280.

The block is ResNet34's ``layer3`` BasicBlock (256 -> 256 -> 256 channels at 14 x 14, identity
shortcut, BatchNorm in inference mode); its input ``X: (1280, 256, 14, 14)`` and weights are
random (seeded) and shared by both sides. The hidden layer keeps 102 of 256 channels (the
official ``int(256 * 0.4)``), T = 20 iterations, the official chunk of 128 examples.

- ``official``: ``prune_basic_block`` of ``prune_resnet34_ispasp.py`` from a checkout of
  https://github.com/wolfecameron/i-SpaSP (``--official-repo``), run by a Python that has PyTorch
  (``--official-python``), in its own process. The driver reads the function from the checkout;
  the file's training imports (torchvision, fvcore, its data loaders) are given empty stand-ins,
  as ``prune_basic_block`` uses only torch. Nothing of it is copied into this repository.
- ``jaxprune defaults`` and ``jaxprune official=True``: ``jp.ispasp`` on the same block as a linen
  module, each in a fresh process.

Each side reports its first call (compilation included for JAX) and the median of ``--repeats``
warm calls, and the kept channels; the supports are compared. Example::

  python -m venv /tmp/torch-env && /tmp/torch-env/bin/pip install torch numpy
  git clone https://github.com/wolfecameron/i-SpaSP /tmp/i-SpaSP
  python benchmarks/ispasp_official.py --official-repo /tmp/i-SpaSP --official-python /tmp/torch-env/bin/python
"""
import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from _timing import RESULTS, markdown_table, run_child

CHANNELS, SIDE, KEEP_RATIO, ITERATIONS, CHUNK = 256, 14, 0.4, 20, 128

OFFICIAL_CHILD = r"""
import json, statistics, sys, time, types
import numpy as np
import torch
repo, data, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
for name in ("torchvision", "fvcore", "fvcore.nn", "lib", "lib.data", "lib.utils"):   # training-only imports
    sys.modules[name] = types.ModuleType(name)
sys.modules["fvcore.nn"].FlopCountAnalysis = None
sys.modules["lib.data"].get_dataset_ft = None
sys.modules["lib.utils"].accuracy = sys.modules["lib.utils"].AverageMeter = None
source = open(repo + "/prune_resnet34_ispasp.py").read()
module = types.ModuleType("official")
exec(compile(source, repo + "/prune_resnet34_ispasp.py", "exec"), module.__dict__)
arrays = np.load(data)
block = module.PrunedBasicBlock(256, 256, 256)
with torch.no_grad():
    for conv in ("conv1", "conv2"):
        getattr(block, conv).weight.copy_(torch.from_numpy(arrays[conv]))
    for bn in ("bn1", "bn2"):
        layer = getattr(block, bn)
        for field in ("weight", "bias", "running_mean", "running_var"):
            getattr(layer, field).copy_(torch.from_numpy(arrays[f"{bn}_{field}"]))
block.eval()
x = torch.from_numpy(arrays["x"])
def once():
    t0 = time.perf_counter()
    pruned = module.prune_basic_block(x, block, ratio=%(ratio)r, num_iter=%(iters)d, bs=%(chunk)d)
    return time.perf_counter() - t0, pruned
first, pruned = once()
warm = statistics.median(once()[0] for _ in range(repeats))
rows = pruned.conv1.weight.detach().numpy().reshape(pruned.conv1.weight.shape[0], -1)
dense = arrays["conv1"].reshape(256, -1)
kept = sorted(int(np.flatnonzero((dense == r).all(axis=1))[0]) for r in rows)
print(json.dumps({"first": first, "warm": warm, "kept": kept, "threads": torch.get_num_threads()}))
""" % {"ratio": KEEP_RATIO, "iters": ITERATIONS, "chunk": CHUNK}

JAX_CHILD = r"""
import json, statistics, sys, time
import numpy as np
import jax, jax.numpy as jnp
import flax.linen as nn
import jaxprune as jp
data, official, repeats, sparsity = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), float(sys.argv[4])
arrays = np.load(data)
class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Conv(256, (3, 3), padding=1, use_bias=False, name="conv1")(x)
        h = nn.relu(nn.BatchNorm(use_running_average=True, epsilon=1e-5, name="bn1")(h))
        h = nn.Conv(256, (3, 3), padding=1, use_bias=False, name="conv2")(h)
        return nn.relu(nn.BatchNorm(use_running_average=True, epsilon=1e-5, name="bn2")(h) + x)
hwio = lambda w: jnp.asarray(np.transpose(w, (2, 3, 1, 0)))
v = {"params": {"conv1": {"kernel": hwio(arrays["conv1"])}, "conv2": {"kernel": hwio(arrays["conv2"])},
                **{bn: {"scale": jnp.asarray(arrays[f"{bn}_weight"]), "bias": jnp.asarray(arrays[f"{bn}_bias"])}
                   for bn in ("bn1", "bn2")}},
     "batch_stats": {bn: {"mean": jnp.asarray(arrays[f"{bn}_running_mean"]),
                          "var": jnp.asarray(arrays[f"{bn}_running_var"])} for bn in ("bn1", "bn2")}}
x = jnp.asarray(np.transpose(arrays["x"], (0, 2, 3, 1)))
model = Block()
groups = jp.groups(model.apply, v, x[:1])
hidden = next(i for i, g in enumerate(groups) if any(m.path.endswith("conv1/kernel") for m in g.members))
kw = dict(official=True, chunk_size=%(chunk)d) if official else {}
def once():
    t0 = time.perf_counter()
    r = jp.ispasp(v, groups, {hidden: sparsity}, apply_fn=model.apply, batch=x, iterations=%(iters)d,
                  show_progress=False, **kw)
    jax.block_until_ready(jax.tree_util.tree_leaves(r.params))
    return time.perf_counter() - t0, r
first, r = once()
warm = statistics.median(once()[0] for _ in range(repeats))
print(json.dumps({"first": first, "warm": warm, "kept": [int(i) for i in r.kept[hidden]]}))
""" % {"chunk": CHUNK, "iters": ITERATIONS}


def make_data(path: Path, n: int, seed: int = 0) -> None:
  """Weights (PyTorch layouts) and the block's input, float32."""
  rng = np.random.default_rng(seed)
  fan_in = CHANNELS * 9
  arrays = {"x": np.maximum(rng.normal(size=(n, CHANNELS, SIDE, SIDE)), 0.0)}
  for conv in ("conv1", "conv2"):
    arrays[conv] = rng.normal(size=(CHANNELS, CHANNELS, 3, 3)) * np.sqrt(2.0 / fan_in)
  for bn in ("bn1", "bn2"):
    arrays[f"{bn}_weight"] = 1.0 + 0.1 * rng.normal(size=CHANNELS)
    arrays[f"{bn}_bias"] = 0.1 * rng.normal(size=CHANNELS)
    arrays[f"{bn}_running_mean"] = 0.1 * rng.normal(size=CHANNELS)
    arrays[f"{bn}_running_var"] = 1.0 + np.abs(rng.normal(size=CHANNELS))
  np.savez(path, **{k: v.astype(np.float32) for k, v in arrays.items()})


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--official-repo", required=True, help="a checkout of wolfecameron/i-SpaSP")
  p.add_argument("--official-python", required=True, help="a Python with torch installed")
  p.add_argument("--n", type=int, default=1280)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--out", default=str(RESULTS))
  args = p.parse_args()
  if not (Path(args.official_repo) / "prune_resnet34_ispasp.py").exists():
    sys.exit(f"--official-repo: no prune_resnet34_ispasp.py in {args.official_repo}")
  kept = int(CHANNELS * KEEP_RATIO)
  sparsity = (CHANNELS - kept) / CHANNELS        # jp's floor rule keeps exactly `kept` too
  with tempfile.TemporaryDirectory() as tmp:
    data = Path(tmp) / "block.npz"
    make_data(data, args.n)
    results = {"official": run_child(OFFICIAL_CHILD, args.official_repo, str(data), str(args.repeats),
                                     python=args.official_python),
               "jaxprune official=True": run_child(JAX_CHILD, str(data), "1", str(args.repeats), str(sparsity)),
               "jaxprune defaults": run_child(JAX_CHILD, str(data), "0", str(args.repeats), str(sparsity))}
  ref = results["official"]
  rows = []
  for name, r in results.items():
    assert len(r["kept"]) == kept, (name, len(r["kept"]))
    rows.append({"implementation": name, "first (s)": round(r["first"], 2), "warm (s)": round(r["warm"], 3),
                 "official / this, warm": round(ref["warm"] / r["warm"], 1),
                 "official / this, first": round(ref["first"] / r["first"], 1),
                 "kept shared with official": f"{len(set(r['kept']) & set(ref['kept']))}/{kept}"})
    print(rows[-1], flush=True)
  import jax
  md = [f"ResNet34 layer3 block, N = {args.n}, keep {kept}/{CHANNELS}, T = {ITERATIONS}; "
        f"{jax.devices()[0]}, {os.cpu_count()} cores, torch threads {ref['threads']}", ""] + markdown_table(rows)
  print("\n".join(md))
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "ispasp_official.json").write_text(json.dumps({"n": args.n, "rows": rows, "raw": results}, indent=1))
  (out / "ispasp_official.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
  main()

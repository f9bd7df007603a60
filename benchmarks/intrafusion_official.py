"""Intra-Fusion and its default pruning against the official code, side by side: VGG11-BN, every group at 50%.

The model is the official ``VGG("VGG11")`` (BatchNorm, conv biases), initialised by PyTorch with a
fixed seed, its BatchNorm statistics and affine parameters randomised (timing and fusion do not
depend on the values being trained); both sides prune the same weights.

- ``official``: from a checkout of https://github.com/alexandertheus/Intra-Fusion
  (``--official-repo``), run by a Python with PyTorch, POT and scikit-learn (``--official-python``),
  in its own process: the two calls of its ``prune.py`` (a ``MagnitudePruner`` with
  ``MagnitudeImportance(1)``, the classifier ignored, backward order, and ``step()`` over all
  groups) with ``OptimalTransport(p=1)`` on the CPU, as its ``main.py`` sets them up, and without
  it (``optimal_transport=None``: the official default pruning, Intra-Fusion's baseline). The driver
  imports the checkout; nothing of it is copied into this repository. Building the pruner (its
  dependency graph, a traced forward pass) is timed apart from ``step()``.
- ``jaxprune defaults`` and ``jaxprune official=True``: ``jp.intra_fusion`` and ``jp.prune_channels``
  on the same weights, each in a fresh process; ``jp.groups`` (tracing) is timed apart from the call.

Each side imports its libraries first (the official script imports POT and scikit-learn at
startup), then reports its first call and the median of ``--repeats`` more, each on a fresh copy
of the model. The pruned kernels of ``official=True`` are compared with the official ones.
Example::

  python -m venv /tmp/torch-env && /tmp/torch-env/bin/pip install torch==2.13.0 numpy POT scikit-learn
  git clone https://github.com/alexandertheus/Intra-Fusion /tmp/Intra-Fusion
  python benchmarks/intrafusion_official.py --official-repo /tmp/Intra-Fusion \
      --official-python /tmp/torch-env/bin/python
"""
import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from _timing import RESULTS, markdown_table, run_child

SPARSITY = 0.5

OFFICIAL_CHILD = r"""
import copy, json, statistics, sys, time
repo, data, pruned_path, repeats, fuse = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1"
sys.path.insert(0, repo)
import numpy as np
import torch
import torch_pruning as tp
from torch_pruning.optimal_transport import OptimalTransport
from model_architectures.vgg import VGG
torch.manual_seed(0)
model = VGG("VGG11")
convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
norms = [m for m in model.features if isinstance(m, torch.nn.BatchNorm2d)]
with torch.no_grad():
    for bn in norms:
        bn.weight.normal_(1.0, 0.1); bn.bias.normal_(0.0, 0.1)
        bn.running_mean.normal_(0.0, 0.1); bn.running_var.uniform_(0.5, 2.0)
model.eval()
arrays = {}
for i, (c, bn) in enumerate(zip(convs, norms)):
    arrays.update({f"conv{i}_w": c.weight, f"conv{i}_b": c.bias, f"bn{i}_w": bn.weight, f"bn{i}_b": bn.bias,
                   f"bn{i}_mean": bn.running_mean, f"bn{i}_var": bn.running_var})
arrays.update({"fc_w": model.classifier.weight, "fc_b": model.classifier.bias})
np.savez(data, **{k: v.detach().numpy() for k, v in arrays.items()})
example = torch.randn(1, 3, 32, 32)
def once():
    m = copy.deepcopy(model)
    t0 = time.perf_counter()
    pruner = tp.pruner.MagnitudePruner(m, example, importance=tp.importance.MagnitudeImportance(1),
                                       iterative_steps=1, ch_sparsity=%(sparsity)r, ignored_layers=[m.classifier],
                                       optimal_transport=OptimalTransport(p=1, gpu_id=-1) if fuse else None,
                                       backward_pruning=True, dimensionality_preserving=False)
    t1 = time.perf_counter()
    pruner.step(group_idxs=None)
    return t1 - t0, time.perf_counter() - t1, m
graph_first, first, pruned = once()
runs = [once()[:2] for _ in range(repeats)]   # timings only: results kept alive would grow memory call by call
np.savez(pruned_path, **{f"conv{i}_w": c.weight.detach().numpy() for i, c in
                         enumerate(c for c in pruned.features if isinstance(c, torch.nn.Conv2d))})
print(json.dumps({"graph_first": graph_first, "first": first, "graph": statistics.median(r[0] for r in runs),
                  "warm": statistics.median(r[1] for r in runs), "threads": torch.get_num_threads()}))
""" % {"sparsity": SPARSITY}

JAX_CHILD = r"""
import json, statistics, sys, time
import numpy as np
import ot, scipy.spatial.distance   # imported at startup, as the official script does
import jax, jax.numpy as jnp
import jaxprune as jp
from jaxprune import models
data, pruned_path, official, repeats, fuse = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4]), sys.argv[5] == "1"
a = np.load(data)
params, stats = {}, {}
for i in range(8):
    params[f"conv{i}"] = {"kernel": jnp.asarray(np.transpose(a[f"conv{i}_w"], (2, 3, 1, 0))),
                          "bias": jnp.asarray(a[f"conv{i}_b"])}
    params[f"bn{i}"] = {"scale": jnp.asarray(a[f"bn{i}_w"]), "bias": jnp.asarray(a[f"bn{i}_b"])}
    stats[f"bn{i}"] = {"mean": jnp.asarray(a[f"bn{i}_mean"]), "var": jnp.asarray(a[f"bn{i}_var"])}
params["classifier"] = {"kernel": jnp.asarray(a["fc_w"].T), "bias": jnp.asarray(a["fc_b"])}
v = {"params": params, "batch_stats": stats}
model = models.vgg11_bn()
def once():
    t0 = time.perf_counter()
    groups = jp.groups(model.apply, v, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    t1 = time.perf_counter()
    r = (jp.intra_fusion if fuse else jp.prune_channels)(v, groups, %(sparsity)r, official=official, show_progress=False)
    jax.block_until_ready(jax.tree_util.tree_leaves(r.params))
    return t1 - t0, time.perf_counter() - t1, r
graph_first, first, r = once()
runs = [once()[:2] for _ in range(repeats)]   # timings only: results kept alive would grow memory call by call
np.savez(pruned_path, **{f"conv{i}_w": np.transpose(np.asarray(r.params["params"][f"conv{i}"]["kernel"]), (3, 2, 0, 1))
                         for i in range(8)})
print(json.dumps({"graph_first": graph_first, "first": first, "graph": statistics.median(x[0] for x in runs),
                  "warm": statistics.median(x[1] for x in runs)}))
""" % {"sparsity": SPARSITY}


def kernel_difference(a: Path, b: Path) -> float:
  """Largest ``|a - b| / max |a|`` over the pruned conv kernels (inf when shapes differ)."""
  x, y = np.load(a), np.load(b)
  worst = 0.0
  for k in x.files:
    if x[k].shape != y[k].shape:
      return float("inf")
    worst = max(worst, float(np.abs(x[k] - y[k]).max() / np.abs(x[k]).max()))
  return worst


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--official-repo", required=True, help="a checkout of alexandertheus/Intra-Fusion")
  p.add_argument("--official-python", required=True, help="a Python with torch, POT and scikit-learn")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--out", default=str(RESULTS))
  args = p.parse_args()
  if not (Path(args.official_repo) / "torch_pruning" / "optimal_transport.py").exists():
    sys.exit(f"--official-repo: no torch_pruning/optimal_transport.py in {args.official_repo}")
  results, same = {}, {}
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    data = tmp / "vgg11_bn.npz"
    for method, fuse in (("intra_fusion", "1"), ("default pruning", "0")):
      results[(method, "official")] = run_child(OFFICIAL_CHILD, args.official_repo, str(data),
                                                str(tmp / "official.npz"), str(args.repeats), fuse,
                                                python=args.official_python)
      for name, flag in (("jaxprune official=True", "1"), ("jaxprune defaults", "0")):
        results[(method, name)] = run_child(JAX_CHILD, str(data), str(tmp / f"{flag}.npz"), flag,
                                            str(args.repeats), fuse)
      same[method] = kernel_difference(tmp / "official.npz", tmp / "1.npz")
  rows = []
  for (method, name), r in results.items():
    ref = results[(method, "official")]
    rows.append({"method": method, "implementation": name, "groups or graph, first (s)": round(r["graph_first"], 3),
                 "first (s)": round(r["first"], 3), "warm (s)": round(r["warm"], 3),
                 "official / this, warm": round(ref["warm"] / r["warm"], 1),
                 "official / this, first": round(ref["first"] / r["first"], 1),
                 "with graph, official / this, warm": round((ref["graph"] + ref["warm"]) / (r["graph"] + r["warm"]), 1)})
    print(rows[-1], flush=True)
  import jax
  threads = results[("intra_fusion", "official")]["threads"]
  md = [f"VGG11-BN, every group at {SPARSITY}, l1 targets (Intra-Fusion: exact OT); {jax.devices()[0]}, "
        f"{os.cpu_count()} cores, torch threads {threads}; official=True kernels against the official ones, max "
        "relative difference: " + ", ".join(f"{m} {d:.2e}" for m, d in same.items()), ""] + markdown_table(rows)
  print("\n".join(md))
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  raw = {f"{m} / {n}": r for (m, n), r in results.items()}
  (out / "intrafusion_official.json").write_text(json.dumps({"rows": rows, "raw": raw,
                                                             "official_true_kernel_difference": same}, indent=1))
  (out / "intrafusion_official.md").write_text("\n".join(md) + "\n")

if __name__ == "__main__":
  main()

"""EWR and LR against the official code, side by side: one pruning stage of MLPNet on N MNIST images.

Both sides prune the same MLPNet checkpoint (``../shared/checkpoints/mlpnet_mnist.npz``, the
official layout) to 90% sparsity in one stage, from the same ``N`` MNIST training images
(``jp.data``, normalised once by the driver and handed to both).

- ``official``: ``OptimalTransportPruner.on_epoch_begin`` of ``pruners/optimal_transport_pruner.py``
  from a checkout of https://github.com/youlei202/Entropic-Wasserstein-Pruning
  (``--official-repo``), run by a Python with PyTorch and POT (``--official-python``), in its own
  process. That is one whole official stage: the per-example gradients (its loader with batch size
  1, computed twice: once by ``on_epoch_begin``, once inside ``_get_weight_update``), the plan
  (POT's Sinkhorn with ``reg = 1`` for EWR, ``ot = False`` for LR), the step size search (bisection
  for ``tau_c``, Adam on ``tau``, the 1.05 growth) and the hard threshold. The pruner is built
  without its training framework: ``__init__`` is skipped and the attributes the stage reads are
  set; the file's imports that the stage does not use (its plotting, logging and I/O helpers, the
  ``GradualPruner`` base) get stand-ins. Nothing of it is copied into this repository.
- ``jaxprune official=True`` and ``jaxprune defaults``: ``jp.ewr`` / ``jp.lr`` with the same ``k``
  (``int(p (1 - 0.9))``, the official rounding), each in a fresh process.

Each side imports its libraries first (the official file imports POT at its top; for EWR the
jaxprune side imports ott-jax, which ``import jaxprune`` leaves to the first entropic plan, and
reports how long that took), then reports its first call and the median of ``--repeats`` more,
each from the dense checkpoint. The supports are compared with the official
one. Example::

  python -m venv /tmp/torch-env && /tmp/torch-env/bin/pip install torch==2.13.0 numpy POT
  git clone https://github.com/youlei202/Entropic-Wasserstein-Pruning /tmp/EWR
  python benchmarks/ewr_official.py --official-repo /tmp/EWR --official-python /tmp/torch-env/bin/python
"""
import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from _timing import RESULTS, markdown_table, run_child

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("JAXPRUNE_SHARED", REPO.parent / "shared"))
SPARSITY, REG, LAYERS = 0.9, 1.0, ("fc1", "fc2", "fc3")

OFFICIAL_CHILD = r"""
import json, statistics, sys, time, types
import numpy as np
import torch
repo, data, repeats, method, sparsity, reg = sys.argv[1:7]
repeats, sparsity, reg = int(repeats), float(sparsity), float(reg)
def stand_in(name, **attrs):   # imports of the file that one stage does not use
    sys.modules[name] = types.ModuleType(name)
    sys.modules[name].__dict__.update(attrs)
class GradualPruner:
    pass
for name in ("matplotlib", "matplotlib.pyplot", "utils", "common", "policies"):
    stand_in(name)
stand_in("utils.utils", flatten_tensor_list=lambda ts: torch.cat([t.flatten() for t in ts]),
         get_summary_stats=None, dump_tensor_to_mat=None, add_noise_to_grads=None)
stand_in("utils.plot", analyze_new_weights=None)
stand_in("common.io", _load=None, _dump=None)
stand_in("common.timer", Timer=None)
stand_in("policies.pruners", GradualPruner=GradualPruner)
def load(path):
    module = types.ModuleType(path)
    exec(compile(open(repo + "/" + path).read(), repo + "/" + path, "exec"), module.__dict__)
    return module
Pruner = load("pruners/optimal_transport_pruner.py").OptimalTransportPruner
MlpNet = load("models/mlpnet.py").MlpNet
arrays = np.load(data)
n = len(arrays["y"])
dset = torch.utils.data.TensorDataset(torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"]))

def fresh():
    model = MlpNet(None, "mnist")
    with torch.no_grad():
        for layer in ("fc1", "fc2", "fc3"):
            getattr(model, layer).weight.copy_(torch.from_numpy(arrays[layer]))
    model.eval()
    pruner = Pruner.__new__(Pruner)
    pruner._model, pruner._modules = model, [model.fc1, model.fc2, model.fc3]
    for m in pruner._modules:
        m.weight_mask = torch.ones_like(m.weight)
    pruner._weight_only, pruner._fisher_mini_bsz = True, 1
    pruner.args = types.SimpleNamespace(add_noise=None, aux_gpu_id=-1, disable_log_soft=False, fisher_mini_bsz=1,
                                        fisher_subsample_size=n, dump_grads_mat=False, ot=method == "ewr", reg=reg,
                                        dump_ot_files=False, seed=0)
    pruner._start, pruner._freq, pruner._end = 1, 1, 2           # one stage, at epoch 1
    pruner._initial_sparsity, pruner._target_sparsity = 0.0, sparsity
    pruner._pruner_not_active = lambda epoch: False
    pruner._target_weights, pruner._original_mask = pruner._get_weights()
    return pruner

def once():
    torch.manual_seed(0)
    pruner = fresh()
    t0 = time.perf_counter()
    pruner.on_epoch_begin(dset, list(range(n)), torch.device("cpu"), 0, 1)
    seconds = time.perf_counter() - t0
    mask = torch.cat([m.weight_mask.flatten() for m in pruner._modules]).numpy()
    return seconds, np.flatnonzero(mask).tolist()
first, kept = once()
warm = statistics.median(once()[0] for _ in range(repeats))
print(json.dumps({"first": first, "warm": warm, "kept": kept, "threads": torch.get_num_threads()}))
"""

JAX_CHILD = r"""
import json, statistics, sys, time
import numpy as np
import jax, jax.numpy as jnp
import jaxprune as jp
from jaxprune.models import mlpnet
data, method, official, repeats, k = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4]), int(sys.argv[5])
t0 = time.perf_counter()
if method == "ewr":   # the libraries the call uses, imported first, as the official file imports POT
    from ott.geometry import geometry
    from ott.problems.linear import linear_problem
    from ott.solvers.linear import acceleration, sinkhorn
imports = time.perf_counter() - t0
arrays = np.load(data)
variables = {"params": {layer: {"kernel": jnp.asarray(arrays[layer].T)} for layer in ("fc1", "fc2", "fc3")}}
batch = (jnp.asarray(np.transpose(arrays["x"], (0, 2, 3, 1))), jnp.asarray(arrays["y"]))
loss = jp.classification_loss(mlpnet().apply)
prune = getattr(jp, method)
def once():
    t0 = time.perf_counter()
    r = prune(variables, batch, k, loss_fn=loss, official=official, show_progress=False)
    jax.block_until_ready(r.masks)
    return time.perf_counter() - t0, r
first, r = once()
warm = statistics.median(once()[0] for _ in range(repeats))
# the support in the official flat order: each layer's (out, in) weight, row-major
mask = np.concatenate([np.asarray(r.masks["params"][layer]["kernel"]).T.ravel() for layer in ("fc1", "fc2", "fc3")])
print(json.dumps({"first": first, "warm": warm, "kept": np.flatnonzero(mask).tolist(), "imports": imports,
                  "signals": r.info["options"].signals}))
"""


def make_data(path: Path, n: int) -> None:
  """The checkpoint's weights (PyTorch layout) and ``n`` MNIST training images, NCHW, float32."""
  import jaxprune as jp
  weights = np.load(SHARED / "checkpoints/mlpnet_mnist.npz")
  data = jp.data.load("mnist", "train", data_dir=os.environ.get("JAXPRUNE_DATA_DIR", SHARED / "data"), limit=n)
  np.savez(path, x=np.transpose(np.asarray(data.x, np.float32), (0, 3, 1, 2)), y=np.asarray(data.y, np.int64),
           **{layer: weights[f"{layer}.weight"].astype(np.float32) for layer in LAYERS})


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--official-repo", required=True, help="a checkout of youlei202/Entropic-Wasserstein-Pruning")
  p.add_argument("--official-python", required=True, help="a Python with torch and POT installed")
  p.add_argument("--n", type=int, default=1000)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--out", default=str(RESULTS))
  args = p.parse_args()
  if not (Path(args.official_repo) / "pruners/optimal_transport_pruner.py").exists():
    sys.exit(f"--official-repo: no pruners/optimal_transport_pruner.py in {args.official_repo}")
  rows, raw = [], {}
  with tempfile.TemporaryDirectory() as tmp:
    data = Path(tmp) / "mlpnet.npz"
    make_data(data, args.n)
    p_total = sum(np.load(data)[layer].size for layer in LAYERS)
    k = int(p_total * (1 - SPARSITY))   # the official non_zero_params_num
    for method in ("lr", "ewr"):
      got = {"official": run_child(OFFICIAL_CHILD, args.official_repo, str(data), str(args.repeats), method,
                                   str(SPARSITY), str(REG), python=args.official_python)}
      for name, flag in (("jaxprune official=True", "1"), ("jaxprune defaults", "0")):
        got[name] = run_child(JAX_CHILD, str(data), method, flag, str(args.repeats), str(k))
      ref = got["official"]
      for name, r in got.items():
        rows.append({"method": method, "implementation": name, "first (s)": round(r["first"], 3),
                     "warm (s)": round(r["warm"], 3), "official / this, warm": round(ref["warm"] / r["warm"], 1),
                     "official / this, first": round(ref["first"] / r["first"], 1),
                     "signals": r.get("signals", "G"), "kept": len(r["kept"]),
                     "shared with official": len(set(r["kept"]) & set(ref["kept"]))})
        print(rows[-1], flush=True)
      raw[method] = {name: {key: val for key, val in r.items() if key != "kept"} for name, r in got.items()}
  imports = raw["ewr"]["jaxprune official=True"]["imports"]
  import jax
  md = [f"MLPNet, N = {args.n} MNIST training images, p = {p_total}, k = {k} (90% sparsity), one stage; "
        f"{jax.devices()[0]}, {os.cpu_count()} cores, torch threads {raw['lr']['official']['threads']}; "
        f"importing ott-jax before the EWR calls took {imports:.2f} s", ""]
  md += markdown_table(rows)
  print("\n".join(md))
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "ewr_official.json").write_text(json.dumps({"n": args.n, "k": k, "rows": rows, "raw": raw}, indent=1))
  (out / "ewr_official.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
  main()

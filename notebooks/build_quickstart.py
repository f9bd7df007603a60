"""Writes notebooks/quickstart.ipynb (run from the repository root: python notebooks/build_quickstart.py).

Edit the cells here, not in the notebook, so that the notebook stays reviewable as code.
"""
import nbformat as nbf
nb = nbf.v4.new_notebook()
md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
cells = [
md("""# jaxprune quickstart

Pruning as pure functions over Flax parameter pytrees. This notebook runs top to bottom on a CPU, a
Colab GPU or a Colab TPU:

1. load MNIST (local files when `JAXPRUNE_DATA_DIR` points at them, otherwise `tensorflow-datasets`);
2. get MLPNet (784-40-20-10): the pretrained checkpoint of the pruning literature when it is on disk,
   otherwise a quick training run;
3. prune it with `jaxprune.magnitude` and `jaxprune.random`, read the sparsity report, evaluate;
4. sweep sparsities and plot accuracy;
5. do the same on a Flax NNX model.

Set `JAXPRUNE_QUICK=1` for small settings (CI does)."""),
code("""# Install: jaxprune is installed from your copy of the repository (it is not on PyPI).
# - from a clone, run this notebook from its notebooks/ folder: the cell installs the checkout above it;
# - in Colab, upload the repository (or a wheel built with `pip wheel .`) and point JAXPRUNE_SOURCE at it,
#   e.g. os.environ["JAXPRUNE_SOURCE"] = "/content/jaxprune" or "/content/jaxprune-0.2.0-py3-none-any.whl".
# Skipped when jaxprune is already importable.
import importlib.util, os
if importlib.util.find_spec("jaxprune") is None:
    source = os.environ.get("JAXPRUNE_SOURCE", "..")
    get_ipython().run_line_magic("pip", f"install -q {source}")"""),
code("""import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxprune as jp
from jaxprune.models import mlpnet

QUICK = os.environ.get("JAXPRUNE_QUICK", "0") == "1"
# Local data: $JAXPRUNE_DATA_DIR, or the project's shared folder when run from a checkout.
DATA_DIR = os.environ.get("JAXPRUNE_DATA_DIR") or next(
    (str(p) for p in (Path("../../shared/data"), Path("../shared/data")) if p.exists()), None)
CHECKPOINT = next((p for p in (Path("../../shared/checkpoints/mlpnet_mnist.npz"),
                               Path("../shared/checkpoints/mlpnet_mnist.npz")) if p.exists()), None)
print("jax", jax.__version__, "on", jax.default_backend(), "| data:", DATA_DIR or "tfds", "| quick:", QUICK)"""),
md("## 1. Data"),
code("""test = jp.data.load("mnist", "test", data_dir=DATA_DIR)      # local files, else tfds (downloads on Colab)
print(test.x.shape, test.x.dtype, test.y[:10])"""),
md("""## 2. The model
The MLPNet checkpoint (WoodFisher/CBS/CHITA/EWR benchmark, 93.97% test accuracy) when available;
otherwise we train MLPNet for a short while with optax."""),
code("""model = mlpnet()
if CHECKPOINT is not None:
    variables = jp.load_mlpnet(CHECKPOINT)
else:
    train = jp.data.load("mnist", "train", data_dir=DATA_DIR, limit=10000 if QUICK else None)
    variables = model.init(jax.random.key(0), train.x[:1])
    tx = optax.sgd(0.05, momentum=0.9)
    opt_state = tx.init(variables["params"])

    @jax.jit
    def step(params, opt_state, x, y):
        loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    params = variables["params"]
    for epoch in range(1 if QUICK else 5):
        for xb, yb in jp.data.batches(train, 128, shuffle=True, seed=epoch):
            params, opt_state, loss = step(params, opt_state, xb, yb)
    variables = {"params": params}

dense = jp.evaluate(model.apply, variables, test.x, test.y)
print(f"dense accuracy {dense.accuracy:.4f}, loss {dense.loss:.4f}")"""),
md("""## 3. Prune
A budget `k` is the number of prunable weights kept (by default the Dense/Conv kernels).
`k_from_sparsity` converts a sparsity exactly; every method keeps exactly `k`."""),
code("""params = variables["params"]
k = jp.k_from_sparsity(params, 0.9)
result = jp.magnitude(params, k)                      # global magnitude pruning
print(jp.sparsity_report(result.params, result.masks))
pruned = jp.evaluate(model.apply, {"params": result.params}, test.x, test.y)
print(f"k={k}: accuracy {pruned.accuracy:.4f} (dense {dense.accuracy:.4f})", result.info)"""),
code("""# Leave the first and last layer dense, prune per layer, or pick leaves by path.
skip = jp.Prunable(skip_first=True, skip_last=True)
r = jp.magnitude(params, jp.k_from_sparsity(params, 0.5, prunable=skip), prunable=skip)
print(jp.sparsity_report(r.params, r.masks))
r = jp.random(params, k, key=jax.random.key(0), scope="layer")
print(jp.sparsity_report(r.params, r.masks))"""),
md("## 4. Sweep"),
code("""import matplotlib.pyplot as plt

sparsities = [0.5, 0.8, 0.9, 0.95] if QUICK else [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98]
methods = {
    "magnitude (global)": lambda p, k: jp.magnitude(p, k),
    "magnitude (layer)": lambda p, k: jp.magnitude(p, k, scope="layer"),
    "random": lambda p, k: jp.random(p, k, key=jax.random.key(0)),
}
curves = {}
for name, prune in methods.items():
    curves[name] = [jp.evaluate(model.apply, {"params": prune(params, jp.k_from_sparsity(params, s)).params},
                                test.x, test.y).accuracy for s in sparsities]
    print(f"{name:>20}", " ".join(f"{100 * a:6.2f}" for a in curves[name]))

plt.figure(figsize=(5, 3.5))
for name, accs in curves.items():
    plt.plot(sparsities, [100 * a for a in accs], marker="o", label=name)
plt.axhline(100 * dense.accuracy, color="gray", ls="--", label="dense")
plt.xlabel("sparsity"); plt.ylabel("test accuracy (%)"); plt.legend(); plt.grid(alpha=0.3)
plt.show()"""),
md("""## 5. EWR and LR (per-example gradients + optimal transport)
`jp.ewr(params, batch, k, apply_fn=...)` regresses the per-example gradients of the loss (softmax
cross-entropy of `apply_fn`, or your own `loss_fn=`) with an
OT fit (ott-jax); `jp.lr` is its Euclidean twin. By default both prune over several stages, each
recomputing the gradients at the current weights, keeping the largest weights and refitting them
exactly (a ridge regression on the kept support). `official=True` is the official single step,
which from the dense weights is magnitude pruning (the residual is zero there)."""),
code("""train = jp.data.load("mnist", "train", data_dir=DATA_DIR, limit=5000)
batch = (train.x[:256], train.y[:256]) if QUICK else (train.x[:1000], train.y[:1000])
loss_fn = jp.classification_loss(model.apply)          # loss_fn(variables, (x, y)) -> mean cross-entropy
stages = {"stages": 3} if QUICK else {}                # default: stages and lam by sparsity
for name, method in (("LR", jp.lr), ("EWR", jp.ewr)):
    res = method(variables, batch, k, apply_fn=model.apply, **stages)
    acc = jp.evaluate(model.apply, res.params, test.x, test.y).accuracy
    print(f"{name}: accuracy {acc:.4f} at sparsity 0.9 | {res.info['options'].stages} stages, last refit:",
          {key: round(v, 6) for key, v in res.info["steps"][-1].items() if key in ("objective_after", "refit_residual")})"""),
md("""## 6. Fine-tune with optax, pruned weights kept at zero
`jp.keep_pruned_at_zero(optimizer)` wraps any optax transformation; its updates keep the pruned
weights exactly at zero, so the usual `optax.apply_updates` loop needs nothing else."""),
code("""tx = jp.keep_pruned_at_zero(optax.sgd(1e-3, momentum=0.5))
params = res.params["params"]
opt_state = tx.init(params)                           # masks: params != 0

@jax.jit
def finetune_step(params, opt_state, x, y):
    grads = jax.grad(lambda p: loss_fn({"params": p}, (x, y)))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

for xb, yb in jp.data.batches(train, 64, shuffle=True):
    params, opt_state = finetune_step(params, opt_state, xb, yb)
print("after fine-tuning:", jp.evaluate(model.apply, {"params": params}, test.x, test.y).accuracy,
      "| sparsity", round(jp.sparsity_report(params).sparsity, 4))"""),
md("""## 7. Structured pruning: channel groups, default pruning and Intra-Fusion
`jp.groups` traces the model once (nothing runs) and returns its channel groups: which kernel
axes, biases and norms share a channel, found from the jaxpr (residual adds, flattens, depthwise
convs and concatenations included). `jp.prune_channels` keeps the top channels of each group;
`jp.intra_fusion` keeps the same channels but fuses all of them into the survivors with an exact
OT map. Both shrink the arrays; `from_params` rebuilds the smaller network."""),
code("""groups = jp.groups(model.apply, variables, test.x[:1])
print(groups)                                                   # group 0 is nearest the output
for name, method in (("default", jp.prune_channels), ("Intra-Fusion", jp.intra_fusion)):
    res = method(variables, groups, {1: 0.5}, importance="l1", show_progress=False)   # fc1 -> fc2, 40 -> 20
    small = type(model).from_params(res.params)
    acc = jp.evaluate(small.apply, res.params, test.x, test.y).accuracy
    print(f"{name}: widths {small.widths}, accuracy {acc:.4f}")"""),
code("""# The same on a CIFAR ResNet20: 12 groups, residual streams merged across blocks.
from jaxprune.models import resnet20
resnet = resnet20()
abstract = jax.eval_shape(resnet.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))   # shapes suffice
print(jp.groups(resnet.apply, abstract, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)))"""),
md("""## 8. i-SpaSP: structured pruning by sparse signal recovery
`jp.ispasp` derives the model's two-layer units (a hidden group and the one layer that reads it:
MLP hidden layers, ResNet BasicBlocks, MobileNet blocks) and prunes each with the official loop:
residual between dense and pruned unit output, signed proxy from its gradient, top-2s merged with
the support, thresholded to the s channels with the most activation, T = 20 iterations; block by
block, shallow to deep, on the pruned network's own activations. The support is a mask with
rank-based top-k, so `jp.ispasp_sweep` solves many sparsities in one vmapped call."""),
code("""x_prune = train.x[:256] if QUICK else train.x[:1280]            # the official code uses 1280 images
res = jp.ispasp(variables, None, 0.5, apply_fn=model.apply, batch=x_prune, show_progress=False)
small = type(model).from_params(res.params)
acc = jp.evaluate(small.apply, res.params, test.x, test.y).accuracy
print(f"i-SpaSP: widths {small.widths}, accuracy {acc:.4f}")
for g, u in res.info["units"].items():
    print(f"  group {g} ({u['name']} reads it): kept {u['m']}/{u['n']}, output error {u['relative_error']:.3f}, "
          f"fixed point: {u['converged']}")

units = jp.two_layer_units(model.apply, variables, test.x[:1])
hidden = units[1].hidden_fn(variables, x_prune)                 # fc1's 40 hidden neurons, read by fc2
masks = jp.ispasp_sweep(units[1], variables, hidden, [0.9, 0.75, 0.5, 0.25])   # sparsities
print("vmapped sweep, kept per sparsity:", masks.sum(axis=1))"""),
md("""## 9. Flax NNX
The same functions take an `nnx.State` from `nnx.split` and return one: merge it back into the model."""),
code("""from flax import nnx

class TinyMLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(784, 64, rngs=rngs)
        self.fc2 = nnx.Linear(64, 10, rngs=rngs)
    def __call__(self, x):
        return self.fc2(nnx.relu(self.fc1(x.reshape(x.shape[0], -1))))

graphdef, nnx_params, rest = nnx.split(TinyMLP(nnx.Rngs(0)), nnx.Param, ...)
res = jp.magnitude(nnx_params, jp.k_from_sparsity(nnx_params, 0.8))
pruned_model = nnx.merge(graphdef, res.params, rest)
print(type(res.params).__name__, jp.sparsity_report(res.params, res.masks).sparsity)
print(pruned_model(jnp.asarray(test.x[:4])).shape)

# Or pass the module itself: it is its own apply function, and the result is its pruned nnx.State.
module = TinyMLP(nnx.Rngs(0))
res = jp.lr(module, batch, jp.k_from_sparsity(nnx.state(module), 0.8), stages=2, show_progress=False)
nnx.update(module, res.params)
print("NNX module after LR:", type(res.params).__name__, module(jnp.asarray(test.x[:4])).shape)"""),
]
nb["cells"] = cells
nb["metadata"] = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                  "language_info": {"name": "python"}, "accelerator": "GPU", "colab": {"provenance": []}}
nbf.write(nb, "notebooks/quickstart.ipynb")

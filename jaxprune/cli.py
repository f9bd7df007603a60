"""``python -m jaxprune``: prune a model with every available method over a sparsity sweep.

With no arguments it trains a small MLP on scikit-learn's bundled digits (no download, a few
seconds) and sweeps it, then trains a two-block transformer on a generated sequence task
(:func:`jaxprune.data.repeats`, seconds) and prunes its whole attention heads and MLP channels
with every structured method. ``--dataset mnist --data-dir DIR --checkpoint mlpnet_mnist.npz`` runs
the one-shot MLPNet/MNIST benchmark of the pruning literature instead.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

from jaxprune import data
from jaxprune.core import budget
from jaxprune.core.forms import classification_loss
from jaxprune.core.trees import count_prunable
from jaxprune.structure.trace import groups as trace_groups
from jaxprune.training import registry as methods
from jaxprune.checkpoints import load_mlpnet
from jaxprune.training.evaluate import evaluate
from jaxprune.models import mlpnet, MLP, transformer
from jaxprune.training.train import train_epochs
from jaxprune.core.progress import progress

CACHE_DIR = Path.home() / ".cache" / "jaxprune" / "xla"

DEFAULT_SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
DEFAULT_CHANNEL_SPARSITIES = (0.1, 0.3, 0.5, 0.7)


def train_digits_mlp(train: data.Dataset, *, steps: int = 400, seed: int = 0, show_progress: bool = True):
  """A 64-256-128-10 MLP (no biases) trained full-batch with Adam on the digits training split."""
  model = MLP(widths=(256, 128), num_classes=10, use_bias=False)
  variables = model.init(jax.random.key(seed), train.x[:1])
  tx = optax.adam(1e-2)
  x, y = jnp.asarray(train.x), jnp.asarray(train.y)

  def loss_fn(params):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  params, opt_state = variables["params"], tx.init(variables["params"])
  for _ in progress(range(steps), desc="train digits MLP", disable=not show_progress):
    params, opt_state, _ = step(params, opt_state)
  return model, {"params": params}


def train_repeats_transformer(train: data.Dataset, *, epochs: int = 16, seed: int = 0, show_progress: bool = True):
  """The reference transformer (2 blocks, 4 heads of 8, MLP 64) trained with Adam on
  :func:`jaxprune.data.repeats` (about 500 steps of 128; about 99% test accuracy)."""
  model = transformer()
  variables = model.init(jax.random.key(seed), train.x[:1])
  result = train_epochs(model.apply, variables, train, epochs=epochs, optimizer=optax.adam(3e-3), seed=seed,
                        show_progress=show_progress)
  return model, result.params


def heads_and_mlp(groups) -> list[int]:
  """Indices of the whole-head groups (query, key and value heads read by ``out``) and the MLP
  channel groups (written by ``fc1``) of the reference transformer."""
  found = []
  for i, g in enumerate(groups):
    producers = {m.rsplit("/", 1)[-1] for m in g.modules("producer")}
    consumers = {m.rsplit("/", 1)[-1] for m in g.modules("consumer")}
    if producers == {"fc1"} or ({"query", "key", "value"} <= producers and consumers == {"out"}):
      found.append(i)
  return found


# One-shot EWR/LR as the CLI runs them: the official per-stage step (one IHT step, mask only)
# over several stages with G recomputed at the current weights. A single step from the dense
# point is magnitude pruning (the residual is zero there), hence the stages.
# One-shot lr/ewr: the methods' own defaults (stages and lam by sparsity), not the gradual driver's one stage.
ONE_SHOT = {"stages": None}
PRESETS = {"lr": ONE_SHOT, "ewr": ONE_SHOT}


def sweep(model, variables, test: data.Dataset, sparsities, method_names, *, batch, seed: int = 0,
          show_progress: bool = True) -> list[dict]:
  """Accuracy and loss of every method at every sparsity (one-shot, no fine-tuning)."""
  rows = [dense_row(model, variables, test)]
  loss_fn = classification_loss(model.apply)
  todo = [(m, s) for m in method_names for s in sparsities]
  for name, s in progress(todo, desc="sweep", disable=not show_progress):
    k = budget.k_from_sparsity(variables, s)
    prune = methods.pruner_for(name, **PRESETS.get(name, {}))
    t0 = time.perf_counter()
    result = prune(variables, batch, k, key=jax.random.key(seed), loss_fn=loss_fn)
    jax.block_until_ready(result.params)
    seconds = time.perf_counter() - t0
    ev = evaluate(model.apply, result.params, test.x, test.y)
    rows.append({"model": "mlp", "method": name, "kind": "unstructured", "sparsity": s, "k": k,
                 "accuracy": ev.accuracy, "loss": ev.loss, "seconds": seconds})
  return rows


def dense_row(model, variables, test: data.Dataset, name: str = "mlp") -> dict:
  dense = evaluate(model.apply, variables, test.x, test.y)
  return {"model": name, "method": "dense", "kind": "dense", "sparsity": 0.0, "k": count_prunable(variables),
          "accuracy": dense.accuracy, "loss": dense.loss, "seconds": 0.0}


def structured_sweep(model, variables, test: data.Dataset, sparsities, method_names, *, batch, seed: int = 0,
                     show_progress: bool = True, select=None, name: str = "mlp") -> list[dict]:
  """Accuracy of every structured method with every channel group (or the groups ``select``
  picks from the traced groups) at each channel sparsity.

  ``k`` is the number of channels kept over the pruned groups.
  """
  groups = trace_groups(model.apply, variables, test.x[:1])
  chosen = None if select is None else select(groups)
  rows = []
  todo = [(m, s) for m in method_names for s in sparsities]
  for method, s in progress(todo, desc=f"structured sweep ({name})", disable=not show_progress):
    t0 = time.perf_counter()
    sparsity = s if chosen is None else {i: s for i in chosen}
    result = methods.pruner_for(method)(variables, groups, sparsity, key=jax.random.key(seed), apply_fn=model.apply,
                                        batch=batch[0])
    jax.block_until_ready(jax.tree_util.tree_leaves(result.params))
    seconds = time.perf_counter() - t0
    ev = evaluate(model.apply, result.params, test.x, test.y)
    rows.append({"model": name, "method": method, "kind": "structured", "sparsity": s,
                 "k": int(sum(k.size for k in result.kept.values())), "accuracy": ev.accuracy, "loss": ev.loss,
                 "seconds": seconds})
  return rows


TABLE_TITLES = {
    ("mlp", "unstructured"): "accuracy (%) by sparsity, one-shot, no fine-tuning",
    ("mlp", "structured"): "accuracy (%) by channel sparsity of every group, one-shot, no fine-tuning",
    ("transformer", "structured"): "transformer: accuracy (%) by sparsity of its whole heads and MLP channels "
                                   "(every block), one-shot, no fine-tuning",
}


def format_table(rows: list[dict], method_names, kind: str = "unstructured", model: str = "mlp") -> str:
  rows = [r for r in rows if r["model"] == model]
  sparsities = sorted({r["sparsity"] for r in rows if r["kind"] == kind})
  acc = {(r["method"], r["sparsity"]): r["accuracy"] for r in rows}
  dense = acc[("dense", 0.0)]
  width = max(len(m) for m in list(method_names) + ["sparsity"])
  what = TABLE_TITLES[(model, kind)]
  lines = [f"dense accuracy: {100 * dense:.2f}%", what,
           f"{'method':<{width}}" + "".join(f"{s:>8.2f}" for s in sparsities)]
  for m in method_names:
    lines.append(f"{m:<{width}}" + "".join(f"{100 * acc[(m, s)]:>8.2f}" for s in sparsities))
  return "\n".join(lines)


def plot(rows: list[dict], method_names, path: Path, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  structured = [m for m in method_names if m in methods.STRUCTURED]
  panels = [("mlp", "unstructured", [m for m in method_names if m not in methods.STRUCTURED], "weight sparsity",
             f"{title}: unstructured")]
  if structured:
    panels.append(("mlp", "structured", structured, "channel sparsity (every group)", f"{title}: structured"))
  if any(r["model"] == "transformer" for r in rows):
    panels.append(("transformer", "structured", structured, "sparsity of heads and MLP channels",
                   "transformer on repeats: structured"))
  fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
  for ax, (model, kind, names, xlabel, heading) in zip(axes[0], panels):
    mine = [r for r in rows if r["model"] == model]
    dense = next(r["accuracy"] for r in mine if r["method"] == "dense")
    ax.axhline(100 * dense, color="gray", ls="--", label="dense")
    for m in names:
      pts = sorted((r["sparsity"], r["accuracy"]) for r in mine if r["method"] == m and r["kind"] == kind)
      ax.plot([s for s, _ in pts], [100 * a for _, a in pts], marker="o", label=m)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(heading)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


class _Parser(argparse.ArgumentParser):
  """argparse with one-line errors that name the flag (no usage dump)."""

  def error(self, message: str):
    self.exit(2, f"jaxprune: error: {message} (see jaxprune --help)\n")


def _typed(cast, valid, accepted: str):
  """An argparse type: ``cast(text)`` that must pass ``valid`` (argparse names the flag in the error)."""
  def parse(text: str):
    try:
      value = cast(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected {accepted}, got {text!r}") from None
    if not valid(value):
      raise argparse.ArgumentTypeError(f"expected {accepted}, got {value}")
    return value
  return parse


_fraction = _typed(float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")
_positive_int = _typed(int, lambda v: v >= 1, "a positive integer")


def parse_args(argv=None) -> argparse.Namespace:
  available = list(methods.UNSTRUCTURED) + list(methods.STRUCTURED)
  p = _Parser(prog="jaxprune", description=__doc__.splitlines()[0],
              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--dataset", default="digits", choices=["digits", "mnist"],
                 help="digits: embedded, trains a small MLP; mnist: the MLPNet checkpoint benchmark")
  p.add_argument("--data-dir", default=None, help=f"local data folder (None: ${data.ENV_VAR})")
  p.add_argument("--checkpoint", default=None, help="mlpnet_mnist.npz (required with --dataset mnist)")
  p.add_argument("--sparsities", type=_fraction, nargs="+", default=list(DEFAULT_SPARSITIES),
                 help="weight sparsities of the unstructured methods")
  p.add_argument("--methods", nargs="+", default=available, choices=available, metavar="METHOD",
                 help=f"methods to run, of {', '.join(available)}; lr and ewr run one-shot with their "
                      "defaults (multi-stage magnitude support and ridge refit, stages and lam by sparsity)")
  p.add_argument("--channel-sparsities", type=_fraction, nargs="+",
                 default=list(DEFAULT_CHANNEL_SPARSITIES),
                 help="per-group channel sparsities of the structured methods (every group pruned)")
  p.add_argument("--out", default=None,
                 help="folder for results.csv, results.json, accuracy.png (None: a new jaxprune_out/run-* folder)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--n-examples", type=_positive_int, default=500,
                 help="training examples whose per-example gradients EWR/LR use")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  p.add_argument("--no-transformer", action="store_true",
                 help="skip the transformer's structured sweep (run with --dataset digits and structured methods)")
  p.add_argument("--compilation-cache", default=os.environ.get("JAXPRUNE_COMPILATION_CACHE", str(CACHE_DIR)),
                 help="folder of JAX's persistent compilation cache, so a second run skips most compiles "
                      "(default: $JAXPRUNE_COMPILATION_CACHE or %(default)s); 'none' turns it off")
  args = p.parse_args(argv)
  if args.dataset == "mnist" and not args.checkpoint:
    p.error("--checkpoint PATH (mlpnet_mnist.npz) is required with --dataset mnist")
  return args


def _out_dir(out) -> Path:
  """``--out`` as given, else a fresh ``jaxprune_out/run-YYYYmmdd-HHMMSS[-n]`` (no run overwrites another)."""
  if out is not None:
    return Path(out)
  stamp = time.strftime("%Y%m%d-%H%M%S")
  path, n = Path("jaxprune_out") / f"run-{stamp}", 1
  while path.exists():
    n += 1
    path = Path("jaxprune_out") / f"run-{stamp}-{n}"
  return path


def enable_compilation_cache(folder) -> None:
  """Points JAX's persistent compilation cache at ``folder`` (``None``/``"none"``: off): every
  compiled program is written there and read back by later processes. Every one, however quick to
  compile (JAX's default keeps only those over 1 s): the CLI's own are small, and with
  ``magnitude`` and ``lr`` on digits none took 0.5 s, while caching all 32 cut a second run from
  7.5 s to 5.7 s (2-core CPU, jax 0.10.2)."""
  if folder is None or str(folder).lower() == "none":
    return
  Path(folder).mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(folder))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def main(argv=None) -> int:
  args = parse_args(argv)
  enable_compilation_cache(args.compilation_cache)
  names = list(dict.fromkeys(args.methods))
  unstructured = [m for m in names if m in methods.UNSTRUCTURED]
  structured = [m for m in names if m in methods.STRUCTURED]
  show = not args.no_progress
  if args.dataset == "digits":
    train, test = data.digits("train", seed=args.seed), data.digits("test", seed=args.seed)
    model, variables = train_digits_mlp(train, seed=args.seed, show_progress=show)
    title = "digits MLP 64-256-128-10"
    calibration = data.Dataset(train.x[:args.n_examples], train.y[:args.n_examples])
  else:
    try:
      test = data.load("mnist", "test", data_dir=args.data_dir, source="local")
      calibration = data.load("mnist", "train", data_dir=args.data_dir, source="local", limit=args.n_examples)
    except FileNotFoundError as err:
      sys.exit(f"jaxprune: error: --data-dir: {err}")
    try:
      model, variables = mlpnet(), load_mlpnet(args.checkpoint)
    except (FileNotFoundError, ValueError) as err:
      sys.exit(f"jaxprune: error: --checkpoint: {err}")
    title = "MLPNet on MNIST (one-shot)"
  batch = (calibration.x, calibration.y)
  rows = sweep(model, variables, test, args.sparsities, unstructured, batch=batch, seed=args.seed,
               show_progress=show)
  if structured:
    rows += structured_sweep(model, variables, test, args.channel_sparsities, structured, batch=batch,
                             seed=args.seed, show_progress=show)
  with_transformer = structured and args.dataset == "digits" and not args.no_transformer
  if with_transformer:
    seq_train, seq_test = data.repeats("train", seed=args.seed), data.repeats("test", seed=args.seed)
    tmodel, tvars = train_repeats_transformer(seq_train, seed=args.seed, show_progress=show)
    rows.append(dense_row(tmodel, tvars, seq_test, "transformer"))
    rows += structured_sweep(tmodel, tvars, seq_test, args.channel_sparsities, structured,
                             batch=(seq_train.x[:args.n_examples], seq_train.y[:args.n_examples]), seed=args.seed,
                             show_progress=show, select=heads_and_mlp, name="transformer")
  # Tables only after every progress bar has closed (tqdm writes to stderr; flush it first).
  sys.stderr.flush()
  if unstructured:
    print(format_table(rows, unstructured))
  if structured:
    print(format_table(rows, structured, kind="structured"))
  if with_transformer:
    print(format_table(rows, structured, kind="structured", model="transformer"))
  out = _out_dir(args.out)
  out.mkdir(parents=True, exist_ok=True)
  with open(out / "results.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  meta = {"dataset": args.dataset, "jax": jax.__version__, "backend": jax.default_backend(),
          "device": str(jax.devices()[0]), "rows": rows}
  (out / "results.json").write_text(json.dumps(meta, indent=1))
  plot(rows, names, out / "accuracy.png", title)
  print(f"wrote {out / 'results.csv'}, {out / 'results.json'}, {out / 'accuracy.png'}")
  return 0

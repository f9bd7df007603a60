"""Experiment 6a: i-SpaSP on the paper's two-layer network (MNIST): output error and time against kept neurons.

A one-hidden-layer ReLU MLP (784-512-10, biases) is trained on MNIST (Adam 1e-3, 3 epochs). Its
hidden layer is pruned to s neurons from N = 1024 training images by
- i-SpaSP (official loop, T = 20; the reduced proxy, which is exact here, and the per-example
  proxy, timed both),
- random neurons (mean of 5 seeds),
- magnitude: the s neurons with the largest activation norm over the N images, l1 (for ReLU
  neurons the official i-SpaSP thresholding score, so the comparison isolates the proxy/merge
  step) and l2,
- i-SpaSP with ``aggregate="l2"`` (an option: it thresholds by the l2 activation norm),
- greedy forward selection (GFS-style): start empty, add the neuron whose addition gives the
  smallest output error on the N images, each candidate evaluated by a forward pass of the pruned
  layer (all candidates per step, vmapped); also timed with rank-one updates of the residual,
  which selects the same neurons with far less work.
Error: ||U - U_s||_F / ||U||_F of the logits, on the N pruning images and on 2000 test images.
Times are warm (compiled) medians on this machine; the kept neurons reuse the dense weights.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxprune as jp
from jaxprune.models import two_layer_mlp
from jaxprune.training.train import train_epochs

import _common


def timed(fn, repeats=3):
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn())
  runs = [time.perf_counter() - t0] if repeats == 0 else []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    runs.append(time.perf_counter() - t0)
  return out, float(np.median(runs))


def greedy_forward(output_fn, params, hidden, target, s, chunk=64):
  """GFS-style selection: each step evaluates every remaining neuron by a forward pass."""
  c = hidden.shape[-1]
  cands = jnp.arange(c).reshape(-1, chunk)

  def step(mask, _):
    def err(j):
      return jnp.sum(jnp.square(target - output_fn(params, hidden * mask.at[j].set(True))))
    errs = jax.lax.map(jax.vmap(err), cands).reshape(-1)
    j = jnp.argmin(jnp.where(mask, jnp.inf, errs))
    return mask.at[j].set(True), j

  mask, order = jax.lax.scan(step, jnp.zeros(c, bool), None, length=s)
  return mask


def greedy_incremental(kernel, hidden, target, bias, s):
  """The same greedy choice from rank-one residual updates (a linear second layer only)."""
  c = hidden.shape[-1]
  h_sq = jnp.sum(hidden * hidden, 0)
  w_sq = jnp.sum(kernel * kernel, 1)

  def step(carry, _):
    mask, resid = carry
    gain = 2 * jnp.einsum("nc,nd,cd->c", hidden, resid, kernel) - h_sq * w_sq
    j = jnp.argmax(jnp.where(mask, -jnp.inf, gain))
    return (mask.at[j].set(True), resid - jnp.outer(hidden[:, j], kernel[j])), j

  (mask, _), _ = jax.lax.scan(step, (jnp.zeros(c, bool), target - bias), None, length=s)
  return mask


def main():
  p = _common.parser(__doc__.splitlines()[0])
  p.add_argument("--hidden", type=int, default=512)
  p.add_argument("--examples", type=int, default=1024)
  args = p.parse_args()
  hidden_width, n, sizes, epochs = args.hidden, args.examples, [8, 16, 32, 64, 128, 192, 256], 3
  if args.quick:
    hidden_width, n, sizes, epochs = 128, 256, [8, 16, 32], 1
  train = jp.data.load("mnist", "train", data_dir=args.data_dir, source="local")
  test = jp.data.load("mnist", "test", data_dir=args.data_dir, source="local")
  model = two_layer_mlp(hidden_width)
  v = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  v = train_epochs(model.apply, v, train, epochs=epochs, optimizer=optax.adam(1e-3), batch_size=128,
                   show_progress=not args.no_progress).params
  dense_acc = jp.evaluate(model.apply, v, test.x, test.y, batch_size=1000).accuracy
  print(f"dense test accuracy {dense_acc:.4f}")

  rng = np.random.default_rng(0)
  x_prune = jnp.asarray(train.x[rng.permutation(len(train.y))[:n]])
  test_idx = rng.permutation(len(test.y))[:2000]
  x_test, y_test = jnp.asarray(test.x[test_idx]), test.y[test_idx]
  (unit,) = jp.two_layer_units(model.apply, v, x_prune[:1])
  h, h_test = unit.hidden_fn(v, x_prune), unit.hidden_fn(v, x_test)
  u, u_test = unit.output(v, h), unit.output(v, h_test)
  params = unit.params_fn(v)

  def error(mask, hh, uu):
    return float(jnp.linalg.norm(uu - unit.output(v, hh, mask)) / jnp.linalg.norm(uu))

  def accuracy(mask):
    return float(np.mean(np.asarray(jnp.argmax(unit.output(v, h_test, mask), -1)) == y_test))

  recover = jax.jit(jp.recover_support, static_argnums=0, static_argnames="options")
  greedy = jax.jit(greedy_forward, static_argnums=(0, 4))
  greedy_fast = jax.jit(greedy_incremental, static_argnums=4)
  norms = {"l1": jnp.sum(jnp.abs(h), axis=0), "l2": jnp.linalg.norm(h, axis=0)}
  rows = []
  for s in sizes:
    res = {}
    sup, res["ispasp_s"] = timed(lambda: recover(unit.output_fn, params, h, s, None,
                                                 options=jp.RecoveryOptions(proxy="reduced")))
    sup_ex, res["ispasp_examples_s"] = timed(lambda: recover(unit.output_fn, params, h, s, None,
                                                             options=jp.RecoveryOptions(proxy="examples")))
    assert np.array_equal(sup.mask, sup_ex.mask), "the reduced and per-example proxies disagree"
    masks = {"ispasp": sup.mask}
    masks["ispasp_l2"] = recover(unit.output_fn, params, h, s, None,
                                 options=jp.RecoveryOptions(proxy="reduced", aggregate="l2")).mask
    masks["magnitude"], res["magnitude_s"] = timed(lambda: jp.topk_mask(norms["l1"], s))
    masks["magnitude_l2"] = jp.topk_mask(norms["l2"], s)
    compiled = greedy.lower(unit.output_fn, params, h, u, s).compile()   # one long run, compiled first
    masks["greedy"], res["greedy_s"] = timed(lambda: compiled(params, h, u), repeats=0)
    fast, res["greedy_incremental_s"] = timed(lambda: greedy_fast(params["kernel"], h, u, params["bias"], s))
    res["greedy_same_as_incremental"] = bool(np.array_equal(fast, masks["greedy"]))
    row = {"kept": s, "of": hidden_width}
    for name, m in masks.items():
      row[f"{name}_error"] = round(error(m, h, u), 4)
      row[f"{name}_test_error"] = round(error(m, h_test, u_test), 4)
      row[f"{name}_test_acc"] = round(100 * accuracy(m), 2)
    rand = [jax.random.permutation(jax.random.key(seed), hidden_width) < s for seed in range(5)]
    row["random_error"] = round(float(np.mean([error(m, h, u) for m in rand])), 4)
    row["random_test_error"] = round(float(np.mean([error(m, h_test, u_test) for m in rand])), 4)
    row["random_test_acc"] = round(100 * float(np.mean([accuracy(m) for m in rand])), 2)
    row.update({k: (round(val, 5) if isinstance(val, float) else val) for k, val in res.items()})
    row["greedy_over_ispasp"] = round(res["greedy_s"] / res["ispasp_s"], 1)
    row["greedy_incremental_over_ispasp"] = round(res["greedy_incremental_s"] / res["ispasp_s"], 1)
    row["ispasp_iterations_to_fixed_point"] = int(recover(unit.output_fn, params, h, s, None, options=jp.RecoveryOptions(
        proxy="reduced", stop_at_fixed_point=True)).iterations)
    rows.append(row)
    print(row, flush=True)

  header = ["kept", "i-SpaSP", "random", "magnitude (l1)", "magnitude (l2)", "i-SpaSP (l2 option)", "greedy",
            "i-SpaSP s", "greedy s", "greedy (rank-1) s", "greedy / i-SpaSP"]
  table = [[r["kept"], r["ispasp_error"], r["random_error"], r["magnitude_error"], r["magnitude_l2_error"],
            r["ispasp_l2_error"], r["greedy_error"], r["ispasp_s"], r["greedy_s"], r["greedy_incremental_s"],
            r["greedy_over_ispasp"]] for r in rows]
  print(_common.markdown_table(header, table))
  out = _common.out_dir(args, "ispasp_two_layer")
  _common.write(out, "ispasp_two_layer", rows, {"dense_test_accuracy": dense_acc, "hidden": hidden_width,
                                                "examples": n, "iterations": 20})
  series = {name: [(r["kept"], r[f"{key}_error"]) for r in rows]
            for name, key in (("i-SpaSP", "ispasp"), ("i-SpaSP, l2 option", "ispasp_l2"), ("random", "random"),
                              ("magnitude (l1 activation norm)", "magnitude"),
                              ("magnitude (l2 activation norm)", "magnitude_l2"), ("greedy forward", "greedy"))}
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
  for name, pts in series.items():
    xs, ys = zip(*pts)
    ax1.plot(xs, ys, marker="o", label=name)
  ax1.set(xscale="log", yscale="log", xlabel="kept hidden neurons", ylabel="relative output error",
          title=f"two-layer MLP 784-{hidden_width}-10, MNIST (N={n})")
  ax1.legend(fontsize=8)
  ax1.grid(alpha=0.3)
  for name, key in (("i-SpaSP", "ispasp_s"), ("greedy forward", "greedy_s"), ("greedy, rank-1 updates", "greedy_incremental_s"),
                    ("magnitude", "magnitude_s")):
    ax2.plot([r["kept"] for r in rows], [r[key] for r in rows], marker="o", label=name)
  ax2.set(xscale="log", yscale="log", xlabel="kept hidden neurons", ylabel="pruning time (s, warm)",
          title=f"{_common.machine()['backend']}: pruning time")
  ax2.legend(fontsize=8)
  ax2.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(out / "ispasp_two_layer.png", dpi=120)
  print(f"wrote {out / 'ispasp_two_layer.png'}")


if __name__ == "__main__":
  main()

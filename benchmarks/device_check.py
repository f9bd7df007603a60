"""Every method on whatever accelerator is present: first-call and warm times, and the jitted kernels
run with ``jax.transfer_guard("disallow")`` (no implicit host transfer inside a step).

Self-contained (random-init models, synthetic inputs: nothing from ``../shared``), so it runs on a
lent GPU/TPU machine as it is: ``python benchmarks/device_check.py``. Part 1 times the public calls
end to end (their host drivers included): MLPNet for magnitude/LR/EWR, ResNet20 for the structured
methods and repair. Part 2 places every input on the device first and runs each jitted kernel
inside the transfer guard: a whole official LR and EWR stage (``jax.jit`` of the public call),
per-example gradients, one LR and one EWR backsolve stage, the i-SpaSP
loop of one unit, one repair pass, one entropic plan. A kernel that needs a host transfer fails
there, and the row says so instead of a time.
"""
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxprune as jp
from jaxprune import models
from jaxprune.methods import _ewr, _repair
from jaxprune.signals.gradients import DenseOperator, _grads_chunk

from _timing import markdown_table, median_time, parse_args, write_results


def problems(n):
  """MLPNet and ResNet20 (random weights), synthetic inputs and labels, ``n`` examples each."""
  rng = np.random.default_rng(0)
  mlp, resnet = models.mlpnet(), models.resnet20()
  xm = jnp.asarray(rng.normal(size=(n, 28, 28, 1)), jnp.float32)
  xr = jnp.asarray(rng.normal(size=(n, 32, 32, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, n), jnp.int32)
  vm = mlp.init(jax.random.key(0), xm[:1])
  vr = resnet.init(jax.random.key(1), xr[:1])
  return (mlp, vm, xm, y), (resnet, vr, xr, y)


def end_to_end(mlp_problem, resnet_problem, repeats):
  mlp, vm, xm, y = mlp_problem
  resnet, vr, xr, _ = resnet_problem
  k = jp.k_from_sparsity(vm, 0.9)
  groups = jp.groups(resnet.apply, vr, xr[:1])
  pruned = jp.prune_channels(vr, groups, 0.5, mode="mask", show_progress=False)
  calls = {
      "magnitude (MLPNet)": lambda: jp.magnitude(vm, k).params,
      "lr, 3 stages (MLPNet)": lambda: jp.lr(vm, (xm, y), k, apply_fn=mlp.apply, stages=3, show_progress=False).params,
      "ewr, 3 stages (MLPNet)": lambda: jp.ewr(vm, (xm, y), k, apply_fn=mlp.apply, stages=3,
                                               show_progress=False).params,
      "prune_channels 50% (ResNet20)": lambda: jp.prune_channels(vr, groups, 0.5, show_progress=False).params,
      "intra_fusion exact 50% (ResNet20)": lambda: jp.intra_fusion(vr, groups, 0.5, show_progress=False).params,
      "intra_fusion entropic, parallel": lambda: jp.intra_fusion(vr, groups, 0.5, solver="entropic", order="parallel",
                                                                 show_progress=False).params,
      "ispasp 50% (ResNet20)": lambda: jp.ispasp(vr, groups, 0.5, apply_fn=resnet.apply, batch=xr,
                                                 show_progress=False).params,
      "repair (ResNet20)": lambda: jp.repair(resnet.apply, vr, pruned, xr, groups=groups, show_progress=False).params,
  }
  rows = []
  for name, fn in calls.items():
    _, first, warm = median_time(fn, repeats)
    rows.append({"what": name, "first_s": round(first, 3), "warm_s": round(warm, 4)})
    print(rows[-1], flush=True)
  return rows


def kernels(mlp_problem, resnet_problem, repeats):
  """``{name: (jitted function, device-resident arguments)}``."""
  mlp, vm, xm, y = mlp_problem
  resnet, vr, xr, _ = resnet_problem
  loss = jp.classification_loss(mlp.apply)
  spec = jp.trees.flat_spec(vm, None)
  w, _ = jp.flatten(vm, spec=spec)
  G = jp.per_example_grads(loss, vm, (xm, y), show_progress=False)
  n, p = G.shape
  k = jnp.asarray(p // 10, jnp.int32)
  mu = jnp.asarray(n * 1e-5, jnp.float32)
  o = jp.EWROptions()
  step = lambda coupling: _ewr.StepConfig(coupling, 0.0, o.relative_eps, 1e-5, o.direction, o.scale_by_n,  # noqa: E731
                                          o.sinkhorn, o.step)
  rcfg = _ewr.RefitConfig("magnitude", "woodbury")
  op = DenseOperator(G)
  unit = jp.two_layer_units(resnet.apply, vr, xr[:1])[-1]
  hidden, norm = unit.hidden_fn(vr, xr), unit.output_norm(vr)
  groups = jp.groups(resnet.apply, vr, xr[:1])
  pruned = jp.prune_channels(vr, groups, 0.5, mode="mask", show_progress=False)
  shapes = {q: np.shape(a) for q, a in jp.leaves_with_paths(vr)}
  targets, _ = _repair.find_targets(groups, pruned.info["plans"], "all", shapes)
  kept = tuple(jnp.asarray(_repair.kept_channels(t, pruned.info["plans"], shapes[t.kernel])) for t in targets)
  dense = _repair.dense_stats(resnet.apply, targets, vr, xr, None, False)
  a = jnp.full((n,), 1.0 / n)
  cost = jnp.abs(jnp.arange(n, dtype=jnp.float32)[:, None] - jnp.arange(n, dtype=jnp.float32)[None, :]) / n
  recover = jax.jit(jp.recover_support, static_argnums=0, static_argnames="options")
  official = {m: jax.jit(functools.partial(getattr(jp, m), k=p // 10, loss_fn=loss, official=True, show_progress=False))
              for m in ("lr", "ewr")}
  return {
      "official LR stage, whole (jax.jit(jp.lr))": (lambda vv, b: official["lr"](vv, b).params, (vm, (xm, y))),
      "official EWR stage, whole (jax.jit(jp.ewr))": (lambda vv, b: official["ewr"](vv, b).params, (vm, (xm, y))),
      "per-example grads (MLPNet)": (lambda ww, pp, c: _grads_chunk(ww, pp, c, loss_fn=loss, spec=spec,
                                                                      dtype=jnp.float32)[0], (w, vm, (xm, y))),
      "backsolve stage, LR": (lambda o_, w_, k_, m_: _ewr.backsolve_stage(o_, w_, w_, k_, m_, step("identity"), rcfg),
                              (op, w, k, mu)),
      "backsolve stage, EWR": (lambda o_, w_, k_, m_: _ewr.backsolve_stage(o_, w_, w_, k_, m_, step("entropic"), rcfg),
                               (op, w, k, mu)),
      "i-SpaSP loop, one unit": (lambda pp, h, kk, nn_: recover(unit.output_fn, pp, h, kk, nn_),
                                 (unit.params_fn(vr), hidden, jnp.asarray(8, jnp.int32), norm)),
      "repair pass (ResNet20)": (lambda tree, xx, d, kk: _repair.correction_pass(resnet.apply, targets, "repair", 1e-4,
                                                                                tree, xx, d, kk, None),
                                 (pruned.params, xr, dense, kept)),
      "entropic plan (N x N)": (jax.jit(lambda c, aa: jp.ot.entropic_plan(c, aa, aa, 1e-2)[0]), (cost, a)),
  }


def guarded(fn, args, repeats):
  """Times ``fn(*args)`` with the arguments on the device and host transfers disallowed."""
  args = jax.device_put(args)
  jax.block_until_ready(jax.tree_util.tree_leaves(args))
  try:
    with jax.transfer_guard("disallow"):
      _, first, warm = median_time(lambda: fn(*args), repeats)
    return {"first_s": round(first, 3), "warm_s": round(warm, 4), "transfer_guard": "ok"}
  except Exception as err:   # report, do not hide: the row names the failure
    return {"first_s": "", "warm_s": "", "transfer_guard": f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"}


def main():
  args = parse_args(__doc__.splitlines()[0])
  repeats = 1 if args.quick else 3
  n = 64 if args.quick else 512
  t0 = time.perf_counter()
  mlp_problem, resnet_problem = problems(n)
  rows = [{"part": "call", **r} for r in end_to_end(mlp_problem, resnet_problem, repeats)]
  for name, (fn, fargs) in kernels(mlp_problem, resnet_problem, repeats).items():
    rows.append({"part": "kernel", "what": name, **guarded(fn, fargs, repeats)})
    print(rows[-1], flush=True)
  rows = [{"part": r["part"], "what": r["what"], "first_s": r["first_s"], "warm_s": r["warm_s"],
           "transfer_guard": r.get("transfer_guard", "-")} for r in rows]
  md = [f"Device: {jax.devices()[0]} ({jax.default_backend()}), N = {n}, {round(time.perf_counter() - t0)} s in all", ""]
  md += markdown_table(rows)
  print("\n".join(md))
  write_results(args.out, "device_check" + ("_quick" if args.quick else ""), {"n": n, "rows": rows}, md, repeats)


if __name__ == "__main__":
  main()

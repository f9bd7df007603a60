"""Tracing channel groups and pruning channels: time per reference model, side by side.

For each model: ``jax.make_jaxpr`` of its inference call alone, ``jaxprune.groups`` (the same
trace plus the analysis), their ratio, and ``prune_channels`` (l1, every group at 50%, shrink)
against one jitted forward pass of a 32-image batch. Warm timings are the median of 5 runs
after one warm-up call.
"""
from pathlib import Path

import jax
import jax.numpy as jnp

import jaxprune as jp
from jaxprune import models

from _timing import parse_args, markdown_table, median_time as timed, write_results

REPO = Path(__file__).resolve().parents[1]
MODELS = {
    "MLPNet": (models.mlpnet, (1, 784)),
    "ResNet20": (models.resnet20, (1, 32, 32, 3)),
    "VGG11-BN": (models.vgg11_bn, (1, 32, 32, 3)),
    "ResNet18": (models.resnet18, (1, 32, 32, 3)),
    "MobileNetV1": (models.MobileNetV1, (1, 32, 32, 3)),
}


def main():
  args = parse_args(__doc__.splitlines()[0])
  repeats = 1 if args.quick else 5
  names = ["MLPNet", "ResNet20"] if args.quick else list(MODELS)
  rows = []
  for name in names:
    make, shape = MODELS[name]
    model = make()
    v = model.init(jax.random.key(0), jnp.zeros(shape))
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    _, _, jaxpr_s = timed(lambda: jax.make_jaxpr(model.apply)(v, x), repeats)
    groups, first_s, groups_s = timed(lambda: jp.groups(model.apply, v, x), repeats)
    _, _, prune_s = timed(lambda: jp.prune_channels(v, groups, 0.5, show_progress=False).params, repeats)
    batch = jnp.zeros((32,) + shape[1:])
    fwd = jax.jit(model.apply)
    _, _, fwd_s = timed(lambda: fwd(v, batch), repeats)
    rows.append({"model": name, "groups": len(groups), "make_jaxpr_s": round(jaxpr_s, 4),
                 "groups_first_s": round(first_s, 4), "groups_s": round(groups_s, 4),
                 "groups_over_make_jaxpr": round(groups_s / jaxpr_s, 2), "prune_channels_s": round(prune_s, 4),
                 "forward32_s": round(fwd_s, 4), "prune_over_forward": round(prune_s / fwd_s, 1)})
    print(rows[-1], flush=True)
  table = markdown_table(rows)
  print("\n".join(table))
  write_results(args.out, "structure_quick" if args.quick else "structure", {"rows": rows}, table, repeats)

if __name__ == "__main__":
  main()

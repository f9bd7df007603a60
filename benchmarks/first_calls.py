"""First calls: what a one-shot user pays in a fresh process, and how much of it is compilation.

Each row runs in its own Python process: the models and data are loaded, then the call is timed
once (``first``: compilation and first-use imports included) and three more times (``warm``,
the median). ``compilations`` counts the XLA programs the first call compiled
(``jax.log_compiles``) and ``compile_s`` their compile time. Real checkpoints and data from
``../shared`` (MLPNet on 1000 MNIST training images; ResNet20 on 256 ``cifar10_png5k`` images).
  magnitude        jp.magnitude at 90% sparsity (MLPNet)
  lr official      jp.lr(official=True), one stage (MLPNet, N = 1000)
  ewr official     jp.ewr(official=True), one stage (MLPNet, N = 1000)
  prune + repair   jp.prune_channels at 0.5 with repair on the 256 images (ResNet20)
"""
import os
from pathlib import Path

from _timing import markdown_table, parse_args, run_child, write_results

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("JAXPRUNE_SHARED", REPO.parent / "shared"))

CHILD = r"""
import json, logging, re, statistics, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
import jax, jax.numpy as jnp
import jaxprune as jp
from _timing import gradient_problem
which, shared = sys.argv[1], Path(sys.argv[2])
if which == "prune + repair":
    v = jp.load_resnet20(shared / "checkpoints/resnet20_cifar10.npz")
    data = jp.data.load("cifar10_png5k", "train", data_dir=shared / "data", limit=256)
    apply = jp.models.resnet20().apply
    x = jnp.asarray(data.x)
    groups = jp.groups(apply, v, x[:1])
    call = lambda: jp.prune_channels(v, groups, 0.5, repair=x, apply_fn=apply, show_progress=False)
else:
    v, loss, batch, prunable, _ = gradient_problem("mlpnet", 1000, shared)
    k = jp.k_from_sparsity(v, 0.9, prunable=prunable)
    call = {"magnitude": lambda: jp.magnitude(v, k, prunable=prunable),
            "lr official": lambda: jp.lr(v, batch, k, loss_fn=loss, official=True, show_progress=False),
            "ewr official": lambda: jp.ewr(v, batch, k, loss_fn=loss, official=True, show_progress=False)}[which]
compiled = []
class Record(logging.Handler):
    def emit(self, record):
        m = re.match(r"Finished XLA compilation of (\S+) in ([0-9.e-]+) sec", record.getMessage())
        if m:
            compiled.append(float(m.group(2)))
logging.getLogger("jax").addHandler(Record())
logging.getLogger("jax").setLevel(logging.DEBUG)
def once():
    t0 = time.perf_counter()
    jax.block_until_ready(jax.tree_util.tree_leaves(call().params))
    return time.perf_counter() - t0
with jax.log_compiles():
    first = once()
n_compiled, compile_s = len(compiled), sum(compiled)
warm = statistics.median(once() for _ in range(3))
print(json.dumps({"first": first, "warm": warm, "compilations": n_compiled, "compile_s": compile_s}))
"""

CALLS = ("magnitude", "lr official", "ewr official", "prune + repair")


def main():
  args = parse_args(__doc__.splitlines()[0])
  rows = []
  for which in (CALLS[:2] if args.quick else CALLS):
    r = run_child(CHILD, which, str(SHARED), str(Path(__file__).parent))
    rows.append({"call": which, "first_s": round(r["first"], 3), "warm_s": round(r["warm"], 4),
                 "compilations": r["compilations"], "compile_s": round(r["compile_s"], 3)})
    print(rows[-1], flush=True)
  table = markdown_table(rows)
  print("\n".join(table))
  write_results(args.out, "first_calls_quick" if args.quick else "first_calls", {"rows": rows}, table, 3)


if __name__ == "__main__":
  main()

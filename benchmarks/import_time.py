"""Import time of jaxprune against its own dependencies, each in a fresh process, alternating.

``import jaxprune`` should cost at most 1.5x ``import jax, flax.linen, flax.nnx, optax`` (issue 11):
ott-jax, POT, tensorflow-datasets, matplotlib and scikit-learn are imported only where used.
"""
import statistics
import subprocess
import sys

from _timing import markdown_table, parse_args, write_results

BASE = "import jax, flax.linen, flax.nnx, optax"
STATEMENTS = {"jax + flax + optax": BASE, "jaxprune": "import jaxprune",
              "jaxprune + ott (first entropic plan)": "import jaxprune.ot.plans as p; p._ott()"}


def _seconds(statement: str) -> float:
  code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
  return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main():
  args = parse_args(__doc__)
  repeats = 3 if args.quick else 7
  times = {name: [] for name in STATEMENTS}
  for _ in range(repeats):
    for name, statement in STATEMENTS.items():
      times[name].append(_seconds(statement))
  base = statistics.median(times["jax + flax + optax"])
  rows = [{"import": name, "median_s": round(statistics.median(t), 3),
           "ratio_to_jax_flax_optax": round(statistics.median(t) / base, 2)} for name, t in times.items()]
  stem = "import_time_quick" if args.quick else "import_time"
  md = markdown_table(rows)
  write_results(args.out, stem, {"rows": rows}, md, repeats)
  print("\n".join(md))


if __name__ == "__main__":
  main()

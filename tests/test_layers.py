"""The package's layers (DESIGN.md): every import inside jaxprune points down or sideways, never up."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "jaxprune"
LAYERS = ("core", "signals", "ot", "structure", "methods", "training")   # then the edges


def _layer(module: str) -> int:
  """0-5 for the layer folders, 6 for the edges (data, models, checkpoints, cli, the package face)."""
  parts = module.split(".")
  return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else len(LAYERS)


def _imports(path: Path):
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxprune"):
      names = [node.module] if node.module != "jaxprune" else [f"jaxprune.{a.name}" for a in node.names]
      yield from names
    elif isinstance(node, ast.Import):
      yield from (a.name for a in node.names if a.name.startswith("jaxprune"))


def test_every_import_points_down():
  upward = []
  for path in PACKAGE.rglob("*.py"):
    module = "jaxprune." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    for target in _imports(path):
      if _layer(target) > _layer(module):
        upward.append(f"{module} imports {target}")
  assert not upward, "imports against the layers:\n" + "\n".join(sorted(upward))


def test_layers_are_folders():
  assert all((PACKAGE / name / "__init__.py").exists() for name in LAYERS)
  flat = sorted(p.stem for p in PACKAGE.glob("*.py"))
  assert flat == ["__init__", "__main__", "checkpoints", "cli", "data"], flat

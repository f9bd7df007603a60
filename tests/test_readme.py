"""Every Python block of README.md runs as written, in order, from the shared/ folder (no example drifts)."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks():
  return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_blocks_and_stays_short():
  assert len(_blocks()) >= 6
  assert len(README.read_text().splitlines()) <= 300


def test_readme_python_blocks_run(shared_dir, monkeypatch):
  monkeypatch.chdir(shared_dir)
  monkeypatch.setenv("JAXPRUNE_NO_PROGRESS", "1")
  namespace = {"__name__": "readme"}
  for i, block in enumerate(_blocks()):
    try:
      exec(compile(block, f"README.md block {i}", "exec"), namespace)
    except Exception as err:  # name the block: the traceback alone points into exec
      raise AssertionError(f"README.md python block {i} failed: {type(err).__name__}: {err}\n{block}") from err

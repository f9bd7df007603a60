"""The quickstart notebook runs top to bottom (small settings, local data)."""
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.parametrize("name", ["quickstart.ipynb"])
def test_notebook_executes(name, data_dir, monkeypatch):
  monkeypatch.setenv("JAXPRUNE_QUICK", "1")
  monkeypatch.setenv("JAXPRUNE_DATA_DIR", str(data_dir))
  monkeypatch.setenv("MPLBACKEND", "Agg")
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
  assert "dense accuracy 0.9397" in outputs     # the checkpoint is found from the notebook folder
  assert "State" in outputs
  assert "EWR: accuracy" in outputs and "after fine-tuning" in outputs and "sparsity 0.9" in outputs
  assert "Intra-Fusion: widths (20, 20)" in outputs and "layer3_0/downsample_conv" in outputs
  assert "i-SpaSP: widths (20, 10)" in outputs and "kept per sparsity: [ 4 10 20 30]" in outputs

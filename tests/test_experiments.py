"""The experiment and benchmark scripts run end to end in --quick mode (slow: run by .ci/run)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {
    "experiments/ewr_mlpnet_oneshot.py": "oneshot",
    "experiments/ewr_noise.py": "noise_summary",
    "experiments/ewr_gradual.py": "gradual",
    "experiments/ewr_resnet20_oneshot.py": "resnet20_oneshot",
    "experiments/channels_resnet20.py": "resnet20_l1",
    "experiments/intrafusion_groups.py": "intrafusion_groups",
    "experiments/intrafusion_all_groups.py": "intrafusion_all_groups",
    "experiments/intrafusion_cifar_models.py": "vgg11_bn_groups",
    "experiments/ispasp_two_layer.py": "ispasp_two_layer",
    "experiments/ispasp_blocks.py": "ispasp_blocks",
    "experiments/repair_structured.py": "repair_structured",
    "experiments/size_report.py": "size_report",
}


@pytest.mark.slow
@pytest.mark.parametrize("script, stem", sorted(SCRIPTS.items()))
def test_experiment_quick(script, stem, tmp_path, data_dir, checkpoint_dir):
  proc = subprocess.run([sys.executable, str(REPO / script), "--quick", "--no-progress", "--out", str(tmp_path),
                         "--data-dir", str(data_dir), "--checkpoint-dir", str(checkpoint_dir)],
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads((tmp_path / f"{stem}.json").read_text())["rows"]
  assert rows and (tmp_path / f"{stem}.csv").exists()
  assert any(p.suffix == ".png" for p in tmp_path.iterdir())
  assert any(h in proc.stdout for h in ("| sparsity |", "| target |", "| group |", "| G |", "| kept |", "| model |"))


@pytest.mark.slow
@pytest.mark.parametrize("script, stem, whats, seconds", [
    ("benchmarks/ewr_step.py", "ewr_step_quick", {"G", "lr", "ewr", "lr-mf", "ewr-mf"}, "seconds"),
    ("benchmarks/backsolve.py", "backsolve_quick", {"G", "stage (LR)", "stage (k<=N)", "stage (EWR)", "OBS saliency"},
     "warm_s")])
def test_regression_benchmarks_quick(script, stem, whats, seconds, tmp_path):
  proc = subprocess.run([sys.executable, str(REPO / script), "--quick", "--out", str(tmp_path)],
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads((tmp_path / f"{stem}.json").read_text())["rows"]
  assert {r["what"] for r in rows} == whats
  assert all(r[seconds] > 0 for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("script, stem, key", [("benchmarks/structure.py", "structure_quick", "rows"),
                                               ("benchmarks/intrafusion.py", "intrafusion_quick", "models"),
                                               ("benchmarks/ispasp.py", "ispasp_quick", "block"),
                                               ("benchmarks/device_check.py", "device_check_quick", "rows"),
                                               ("benchmarks/structured_calls.py", "structured_calls_quick", "rows")])
def test_structure_benchmarks_quick(script, stem, key, tmp_path):
  proc = subprocess.run([sys.executable, str(REPO / script), "--quick", "--out", str(tmp_path)],
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads((tmp_path / f"{stem}.json").read_text())[key]
  assert rows and all(v > 0 for r in rows for k, v in r.items() if k.endswith("_s"))



@pytest.mark.slow
def test_first_calls_benchmark_quick(tmp_path):
  """Fresh processes on the real MLPNet checkpoint: magnitude compiles nothing on its first call
  (host weights are ranked in numpy); an official LR stage compiles its own programs only."""
  proc = subprocess.run([sys.executable, str(REPO / "benchmarks/first_calls.py"), "--quick", "--out", str(tmp_path)],
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = {r["call"]: r for r in json.loads((tmp_path / "first_calls_quick.json").read_text())["rows"]}
  assert set(rows) == {"magnitude", "lr official"}
  assert all(r["first_s"] > 0 and r["warm_s"] > 0 for r in rows.values())
  assert rows["magnitude"]["compilations"] == 0
  assert 1 <= rows["lr official"]["compilations"] <= 12

@pytest.mark.slow
def test_official_stage_benchmark_quick(tmp_path):
  proc = subprocess.run([sys.executable, str(REPO / "benchmarks/official_stage.py"), "--quick", "--out", str(tmp_path)],
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads((tmp_path / "official_stage_quick.json").read_text())["rows"]
  assert {r["call"] for r in rows} == {"floor", "lr", "lr jit", "ewr", "ewr jit"}
  assert all(r["warm (s)"] > 0 and r["first (s)"] > 0 for r in rows)
  assert all(r["Sinkhorn its"] > 0 for r in rows if r["call"].startswith("ewr"))

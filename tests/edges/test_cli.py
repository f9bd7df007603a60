import csv
import json
import subprocess
import sys

import pytest

from jaxprune import cli
from jaxprune.training import registry as methods


def test_default_main_job_on_embedded_digits(tmp_path, capsys):
  assert cli.main(["--out", str(tmp_path), "--sparsities", "0.5", "0.9", "--no-progress", "--n-examples", "200"]) == 0
  out = capsys.readouterr().out
  assert "accuracy (%) by sparsity" in out
  everything = list(csv.DictReader(open(tmp_path / "results.csv")))
  rows = [r for r in everything if r["model"] == "mlp"]
  assert {r["method"] for r in rows} == {"dense", *methods.UNSTRUCTURED, *methods.STRUCTURED}
  assert len(rows) == 1 + 2 * len(methods.UNSTRUCTURED) + 4 * len(methods.STRUCTURED)
  assert "by channel sparsity of every group" in out
  # the transformer's whole heads and MLP channels, pruned by every structured method
  seq = [r for r in everything if r["model"] == "transformer"]
  assert len(seq) == 1 + 4 * len(methods.STRUCTURED) and "transformer: accuracy" in out
  seq_acc = {(r["method"], float(r["sparsity"])): float(r["accuracy"]) for r in seq}
  assert seq_acc[("dense", 0.0)] > 0.9                   # the embedded sequence task really trained
  for m in methods.STRUCTURED:
    assert int(next(r["k"] for r in seq if r["method"] == m and float(r["sparsity"]) == 0.5)) == 2 * (2 + 32)
    assert seq_acc[(m, 0.3)] > 0.6
  by = {(r["method"], float(r["sparsity"])): float(r["accuracy"]) for r in rows}
  assert by[("dense", 0.0)] > 0.9                       # the MLP really trained
  assert by[("magnitude", 0.5)] > by[("random", 0.5)]   # magnitude beats random
  assert by[("lr", 0.5)] > by[("random", 0.5)] and by[("ewr", 0.5)] > by[("random", 0.5)]
  assert by[("channels_l1", 0.1)] > 0.5 and by[("intra_fusion", 0.1)] > 0.5   # light channel pruning keeps most
  kept = {(r["method"], float(r["sparsity"])): int(r["k"]) for r in rows}
  assert kept[("channels_l1", 0.5)] == kept[("intra_fusion", 0.5)] == kept[("ispasp", 0.5)] == 128 + 64  # 256, 128 hidden
  assert by[("ispasp", 0.1)] > 0.5
  assert (tmp_path / "accuracy.png").stat().st_size > 1000
  assert json.loads((tmp_path / "results.json").read_text())["backend"] == "cpu"


def test_mnist_benchmark_mode(tmp_path, capsys, data_dir, checkpoint_dir):
  cli.main(["--dataset", "mnist", "--data-dir", str(data_dir), "--checkpoint",
            str(checkpoint_dir / "mlpnet_mnist.npz"), "--sparsities", "0.9", "--methods", "magnitude",
            "--out", str(tmp_path), "--no-progress"])
  rows = {r["method"]: float(r["accuracy"]) for r in csv.DictReader(open(tmp_path / "results.csv"))}
  assert rows["dense"] == pytest.approx(0.9397, abs=5e-5)
  assert abs(rows["magnitude"] - 0.903) < 0.003


@pytest.mark.parametrize("argv, flag", [
    (["--methods", "nope"], "--methods"),
    (["--dataset", "mnist"], "--checkpoint"),
    (["--sparsities", "1.5"], "--sparsities"),
    (["--sparsities", "abc"], "--sparsities"),
    (["--channel-sparsities", "-0.1"], "--channel-sparsities"),
    (["--n-examples", "0"], "--n-examples"),
    (["--seed", "x"], "--seed"),
    (["--bogus"], "--bogus"),
])
def test_every_bad_flag_is_a_one_line_error_naming_it(argv, flag, tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(argv + ["--out", str(tmp_path)])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and flag in err and err.startswith("jaxprune: error:"), err


def test_each_run_gets_its_own_output_folder(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  first = cli._out_dir(None)
  first.mkdir(parents=True)
  second = cli._out_dir(None)
  assert first != second and first.parent == second.parent == tmp_path.joinpath("jaxprune_out").relative_to(tmp_path)
  assert cli._out_dir("mine") == cli.Path("mine")


def test_python_dash_m_entry_point(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "jaxprune", "--help"], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and "--dataset" in proc.stdout
  assert "(default: 500)" in proc.stdout and "(default: digits)" in proc.stdout   # --help shows defaults


def test_persistent_compilation_cache_is_written_and_can_be_turned_off(tmp_path):
  import subprocess
  import sys
  cache = tmp_path / "xla"
  cmd = [sys.executable, "-m", "jaxprune", "--methods", "magnitude", "--sparsities", "0.5", "--no-progress",
         "--out", str(tmp_path / "run")]
  proc = subprocess.run(cmd + ["--compilation-cache", str(cache)], capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert any(cache.iterdir())                      # compiled programs were cached for the next run
  assert cli.parse_args(["--compilation-cache", "none"]).compilation_cache == "none"


def test_a_missing_data_folder_or_checkpoint_is_a_one_line_error_naming_its_flag(tmp_path, data_dir):
  """Before the checkpoint case was a FileNotFoundError traceback."""
  for argv, flag in [(["--data-dir", str(tmp_path / "none"), "--checkpoint", "x.npz"], "--data-dir"),
                     (["--data-dir", str(data_dir), "--checkpoint", str(tmp_path / "none.npz")], "--checkpoint")]:
    with pytest.raises(SystemExit) as exit_info:
      cli.main(["--dataset", "mnist", *argv, "--out", str(tmp_path)])
    message = str(exit_info.value.code)
    assert message.startswith(f"jaxprune: error: {flag}: ") and len(message.splitlines()) == 1, message

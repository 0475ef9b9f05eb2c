"""bench/bench_optimizer.py runs and reports the fused and chained Adafactor updates agreeing."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("flags", [[], ["--palm"]], ids=["t5x", "palm"])
def test_bench_optimizer_smoke(tmp_path, flags):
  out = tmp_path / "opt.json"
  proc = subprocess.run(
      [sys.executable, str(REPO / "bench" / "bench_optimizer.py"), "--model", "tiny",
       "--rounds", "2", "--json", str(out), *flags],
      capture_output=True, text=True, timeout=600, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "fused / chain, round by round" in proc.stdout
  result = json.loads(out.read_text())
  assert result["model"] == "tiny" and result["rounds"] == 2 and result["num_params"] > 0
  assert result["settings"] == ("palm" if flags else "t5x")
  assert result["max_relative_difference"] < 1e-5
  for name in ("chain", "fused", "one_pass"):
    assert result[f"{name}_ms_best"] > 0

"""bench/profile_step.py attributes a traced train step's time to the model's parts."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(sys.platform != "linux", reason="traces XLA:CPU's thunks (Linux CPU build)")
def test_profile_step_attributes_the_traced_step(tmp_path):
  out = tmp_path / "profile.json"
  # One CPU device, as on a user's machine (the suite simulates 8; on several devices the
  # model's loss defaults to whole logits, which this run checks the chunked loss of).
  env = dict(os.environ, XLA_FLAGS=re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                                          os.environ.get("XLA_FLAGS", "")))
  proc = subprocess.run(
      [sys.executable, str(REPO / "bench" / "profile_step.py"), "--model", "tiny",
       "--batch", "4", "--length", "64", "--steps", "1", "--json", str(out)],
      capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "part | products (ms/step)" in proc.stdout
  result = json.loads(out.read_text())
  parts = result["parts"]
  assert {"mlp", "attention", "layer norms", "loss", "optimizer"} <= set(parts), parts
  # The FLOPs read from the compiled dots are the model's: palm_tiny has 2 layers,
  # d_model 128, d_ff 512 and a 4096-token vocabulary; 4 x 64 tokens; forward and backward.
  tokens, layers, d, f, vocab = 4 * 64, 2, 128, 512, 4096
  assert parts["mlp"]["product_gflop"] == pytest.approx(6 * tokens * 3 * d * f * layers / 1e9)
  assert parts["loss"]["product_gflop"] == pytest.approx(6 * tokens * d * vocab / 1e9)
  for name in ("mlp", "attention", "loss"):
    assert parts[name]["products_ms"] > 0 and parts[name]["other_ms"] > 0, parts[name]
  assert parts["optimizer"]["other_ms"] > 0 and parts["optimizer"]["products_ms"] == 0
  # Every moment's time is split among the thunks running then: the parts add up to it.
  total = sum(p["products_ms"] + p["other_ms"] for p in parts.values())
  assert total == pytest.approx(result["busy_ms"], rel=1e-6)
  assert 0 <= result["two_or_more_at_once_ms"] <= result["busy_ms"]
  assert all(g > 0 for g in result["peak_gflops"])

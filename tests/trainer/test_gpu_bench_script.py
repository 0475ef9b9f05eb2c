"""bench/gpu_train_mfu.py, the script prepared for a lent accelerator, runs where only jax,
flax, optax and orbax are installed (the lent H200's image has no TensorFlow, seqio, gin or
Beam, and nothing can be installed there beyond a few small wheels)."""
import json
import math
import os
import pathlib
import subprocess
import sys
import textwrap

REPO = pathlib.Path(__file__).resolve().parents[2]
ABSENT = ("tensorflow", "tensorflow_text", "tensorflow_datasets", "seqio", "gin",
          "apache_beam", "sentencepiece")


def test_gpu_script_runs_without_tensorflow_seqio_gin_or_beam(tmp_path):
  # A child interpreter in which importing any of ABSENT fails, as it would there; the
  # script runs its CPU smoke test (--tiny) from the checkout, by path.
  runner = tmp_path / "run.py"
  # palmflow is not installed there either: the editable install's finder and any path
  # entry into the checkout are dropped, so the script must find the checkout itself.
  runner.write_text(textwrap.dedent(f"""
      import importlib.abc, runpy, sys
      class Absent(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
          if name.split(".")[0] in {ABSENT!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
      sys.meta_path[:] = [Absent()] + [f for f in sys.meta_path
                                       if "__editable__" not in getattr(f, "__module__", "")]
      sys.path[:] = [p for p in sys.path if "__editable__" not in p and (
          "site-packages" in p or not (p + "/").startswith({str(REPO) + "/"!r}))]
      sys.path_importer_cache.clear()
      sys.argv = sys.argv[1:]
      try:
        runpy.run_path(sys.argv[0], run_name="__main__")  # ends in sys.exit
      finally:
        print("palmflow from", getattr(sys.modules.get("palmflow"), "__file__", None))
      """))
  out = tmp_path / "gpu.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run(
      [sys.executable, str(runner), str(REPO / "bench" / "gpu_train_mfu.py"), "--tiny",
       "--json", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert "MFU vs measured bf16 matmul peak" in proc.stdout
  assert f"palmflow from {REPO / 'palmflow' / '__init__.py'}" in proc.stdout, proc.stdout
  assert result["seconds_per_step"] > 0 and 0 < result["mfu_measured_peak"] < 1, result
  assert all(map(math.isfinite, result["losses"])) and len(result["losses"]) >= 2, result


def test_gpu_script_retries_a_setting_that_runs_out_of_memory(tmp_path, monkeypatch, capsys):
  """Device time is scarce: a setting that runs out of memory is retried with remat, then
  with half the batch, after the failed try's arrays are freed; the JSON lists what did not
  fit; any other error is raised."""
  import importlib.util
  import weakref
  import jax
  import pytest
  from palmflow.trainer import train_lib
  # The script sets XLA_PYTHON_CLIENT_MEM_FRACTION if unset: not for the later tests.
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
  spec = importlib.util.spec_from_file_location("gpu_train_mfu",
                                                REPO / "bench" / "gpu_train_mfu.py")
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  partition = train_lib.partition_train_step
  failures, failed_params = [], []

  def failing(*args, **kwargs):
    step = partition(*args, **kwargs)

    def run(params, *rest):  # each step takes the next of `failures`: an error, or None
      error = failures.pop(0)
      if error:
        failed_params.append(weakref.ref(jax.tree.leaves(params)[0]))
        raise error()
      return step(params, *rest)
    return run
  monkeypatch.setattr(train_lib, "partition_train_step", failing)
  oom = lambda: RuntimeError("RESOURCE_EXHAUSTED: Out of memory while allocating 9.1GiB")
  failures[:] = [oom, oom] + [None] * 99
  out = tmp_path / "gpu.json"
  assert script.main(["--tiny", "--json", str(out)]) == 0   # --tiny: batch 2 a device
  result = json.loads(out.read_text())
  assert result["out_of_memory"] == [{"batch_per_device": 2, "remat": False},
                                     {"batch_per_device": 2, "remat": True}]
  assert result["args"]["batch"] == 1 and result["args"]["remat"]
  assert "out of device memory with batch 2 (RESOURCE_EXHAUSTED" in capsys.readouterr().out
  assert len(failed_params) == 2 and all(ref() is None for ref in failed_params)
  failures[:] = [lambda: ValueError("a bug, not memory")] + [None] * 99
  with pytest.raises(ValueError, match="a bug"):
    script.main(["--tiny", "--json", str(out)])
  # The model's state itself not fitting is not retried: no batch or remat changes it.
  def state_too_big(*args):
    raise oom()
  monkeypatch.setattr(train_lib, "place_on_mesh", state_too_big)
  with pytest.raises(script.ParametersDoNotFit, match="optimizer state alone exceed"):
    script.main(["--tiny", "--json", str(out)])
  assert "retrying" not in capsys.readouterr().out

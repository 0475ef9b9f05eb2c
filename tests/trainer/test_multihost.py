"""Partitioned training: the same loss curve on every mesh and with two processes.

On the 8 simulated CPU devices of tests/conftest.py, the tiny model trains 6 steps with each
`gin/partitioning/*.gin` file (data_parallel 8x1, model_parallel 1x8, fully_sharded 2x4); the
loss curves agree to rtol 1e-4 and every parameter is placed as the logical axis rules say.

The multi-host test (marked slow) starts two processes of 4 CPU devices each, joined through
`jax.distributed` (coordinator on localhost, gloo collectives, set up by the binaries'
`gin_utils.setup_runtime`); each process feeds its half of the global batch, and the loss curve
matches the single-process 2x4 run. On the 2x4 mesh the workers then run inference (scores and
greedy predictions) and write what one process writes. This file is also the worker script:

    python tests/trainer/test_multihost.py --worker --port P --process_index I --model_dir D
"""

import argparse
import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import progressions

REPO = pathlib.Path(__file__).resolve().parents[2]
VOCAB, LENGTH, BATCH, STEPS = 64, 32, 8, 6
TASK = "palmflow_test_multihost_progressions"
CURVE_RTOL = 1e-4


def register_progressions(name: str) -> None:
  # 9 validation examples: over two processes, shards of 5 and 4, so one process has a batch
  # fewer to evaluate than the other (it must still take part in every evaluation step).
  progressions.register_progressions(name, vocab=VOCAB, length=LENGTH, num_examples=128,
                                     splits=("train", "validation"),
                                     split_sizes={"validation": 9})


def tiny_model():
  """The tiny model (8 heads, d_ff 128, vocab 64: divisible by every mesh axis)."""
  from palmflow.trainer import lm, models, optimizers
  config = models.PaLMConfig(vocab_size=VOCAB, num_layers=2, d_model=64, num_heads=8,
                             head_dim=8, d_ff=128)
  return lm.DecoderOnlyModel(config=config,
                             optimizer=optimizers.adafactor(learning_rate=0.05))


def infer_tiny(partitioner, model_dir, out_dir) -> None:
  """The infer binary's library on the trained checkpoint: scores and 4 decoded tokens of
  the 9 validation examples, batches of 8 (the second one padded)."""
  from palmflow.trainer import checkpoints, eval_lib
  for mode in ("score", "predict"):
    eval_lib.infer(model=tiny_model(), partitioner=partitioner,
                   checkpoint_path=str(checkpoints.step_dir(model_dir, STEPS)),
                   mixture_or_task_name=TASK, task_feature_lengths={"targets": LENGTH},
                   output_dir=str(out_dir), mode=mode, split="validation", batch_size=BATCH,
                   max_decode_length=4, feature_converter="lm")


def infer_rows(out_dir) -> dict[str, list[dict]]:
  return {mode: [json.loads(l) for l in (pathlib.Path(out_dir) / f"{TASK}-{mode}.jsonl-00000-"
                                         "of-00001").read_text().splitlines()]
          for mode in ("score", "predict")}


def train_tiny(partitioner, model_dir) -> dict:
  """6 steps of the tiny model."""
  from palmflow.trainer import checkpoints, data, train_lib
  model = tiny_model()
  cfg = data.DatasetConfig(mixture_or_task_name=TASK, task_feature_lengths={"targets": LENGTH},
                           batch_size=BATCH, shuffle=False, seed=0, feature_converter="lm")
  eval_cfg = dataclasses.replace(cfg, split="validation")
  return train_lib.train(model=model, train_dataset_cfg=cfg, partitioner=partitioner,
                         model_dir=str(model_dir), total_steps=STEPS, log_every=1,
                         train_eval_dataset_cfg=eval_cfg, eval_period=3,
                         checkpoint_cfg=checkpoints.SaveCheckpointConfig(period=1000))


def eval_curve(model_dir) -> np.ndarray:
  """(step, loss, accuracy) rows of the training evaluation (steps 0, 3 and 6)."""
  rows = [json.loads(l) for l in (pathlib.Path(model_dir) / "training_eval" / TASK /
                                  "metrics.jsonl").read_text().splitlines() if l.strip()]
  assert [r["step"] for r in rows] == [0, 3, 6]
  return np.array([[r["step"], r["loss"], r["accuracy"]] for r in rows])


def loss_curve(model_dir) -> np.ndarray:
  rows = [json.loads(l) for l in (pathlib.Path(model_dir) / "train" / "metrics.jsonl")
          .read_text().splitlines() if l.strip()]
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  return np.array([r["loss"] for r in rows])


def worker(argv) -> None:
  """One process of the 2-process run (4 CPU devices each, XLA_FLAGS set by the parent)."""
  parser = argparse.ArgumentParser()
  for flag in ("--port", "--process_index", "--model_dir"):
    parser.add_argument(flag, required=True)
  parser.add_argument("--mesh", default="fully_sharded")
  parser.add_argument("--infer_dir", default=None)
  a = parser.parse_args(argv)
  import jax
  from palmflow.trainer import gin_utils, partitioning
  args = gin_utils.parse_flags(
      [f"--coordinator_address=localhost:{a.port}", "--process_count=2",
       f"--process_index={a.process_index}"], "worker")
  gin_utils.setup_runtime(args)  # what the train/eval binaries do with these flags
  assert jax.config.jax_cpu_collectives_implementation == "gloo"
  assert jax.process_count() == 2 and jax.local_device_count() == 4
  assert jax.device_count() == 8
  register_progressions(TASK)
  shape, rules = {"fully_sharded": ((2, 4), partitioning.FULLY_SHARDED_RULES),
                  "model_parallel": ((1, 8), partitioning.MODEL_PARALLEL_RULES)}[a.mesh]
  partitioner = partitioning.Partitioner(mesh_shape=shape, logical_axis_rules=rules)
  result = train_tiny(partitioner, a.model_dir)
  if a.infer_dir:
    infer_tiny(partitioner, a.model_dir, a.infer_dir)
  if jax.process_index() == 0:
    (pathlib.Path(a.model_dir) / "worker_result.json").write_text(json.dumps(
        {"process_count": jax.process_count(), "specs": result["param_partition_specs"]}))
  jax.distributed.shutdown()


if __name__ == "__main__" and "--worker" in sys.argv:
  sys.path.insert(0, str(REPO))
  argv = [x for x in sys.argv[1:] if x != "--worker"]
  worker(argv)
  sys.exit(0)


import gin  # noqa: E402  (the worker above must set up jax before anything imports it)
import jax  # noqa: E402
import pytest  # noqa: E402

from palmflow.trainer import gin_utils, partitioning  # noqa: E402

GIN_FILES = {"data_parallel": ((8, 1), partitioning.STANDARD_RULES),
             "model_parallel": ((1, 8), partitioning.MODEL_PARALLEL_RULES),
             "fully_sharded": ((2, 4), partitioning.FULLY_SHARDED_RULES)}

# What the rules say for a few parameters (mesh axis per dimension; stacked layers first).
EXPECTED_SPECS = {
    "data_parallel": {"embedding": "(model, None)",  # model axis of size 1: replicated
                      "layers/mlp/wi": "(None, None, model)"},
    "model_parallel": {"embedding": "(model, None)", "layers/mlp/wi": "(None, None, model)",
                       "layers/mlp/wo": "(None, model, None)",
                       "layers/attention/query": "(None, None, model, None)",
                       "layers/attention/key": "(None, None, None)",
                       "final_norm/scale": "(None)"},
    "fully_sharded": {"embedding": "(model, data)", "layers/mlp/wi": "(None, data, model)",
                      "layers/mlp/wo": "(None, model, data)",
                      "layers/attention/query": "(None, data, model, None)",
                      "layers/attention/key": "(None, data, None)",
                      "layers/pre_norm/scale": "(None, data)",
                      "final_norm/scale": "(data)"},
}


def gin_partitioner(name: str) -> partitioning.Partitioner:
  """PARTITIONER of runs/pretrain.gin + models/palm_tiny.gin + partitioning/<name>.gin."""
  gin.clear_config()
  try:
    gin_utils.parse(["runs/pretrain.gin", "models/palm_tiny.gin", f"partitioning/{name}.gin"],
                    [])
    return gin.query_parameter("%PARTITIONER").scoped_configurable_fn()
  finally:
    gin.clear_config()


@pytest.fixture(scope="module", autouse=True)
def _task():
  import seqio
  register_progressions(TASK)
  yield
  seqio.TaskRegistry.remove(TASK)


@pytest.fixture(scope="module")
def mesh_runs(tmp_path_factory):
  """{gin file name: (partitioner, model_dir, result)} after 6 steps on that mesh."""
  runs = {}
  for name in GIN_FILES:
    partitioner = gin_partitioner(name)
    model_dir = tmp_path_factory.mktemp(name)
    runs[name] = (partitioner, model_dir, train_tiny(partitioner, model_dir))
  return runs


@pytest.mark.parametrize("name", list(GIN_FILES))
def test_partitioning_gin_files_build_their_mesh(name):
  mesh_shape, rules = GIN_FILES[name]
  p = gin_partitioner(name)
  assert tuple(p.mesh.shape.values()) == mesh_shape
  assert p.logical_axis_rules == rules


def test_same_loss_curve_on_every_mesh(mesh_runs):
  curves = {name: loss_curve(model_dir) for name, (_, model_dir, _) in mesh_runs.items()}
  ref = curves["data_parallel"]
  assert ref[-1] < ref[0] - 1.0  # it learns
  for name, curve in curves.items():
    np.testing.assert_allclose(curve, ref, rtol=CURVE_RTOL, err_msg=name)
  evals = {name: eval_curve(model_dir) for name, (_, model_dir, _) in mesh_runs.items()}
  for name, curve in evals.items():
    np.testing.assert_allclose(curve, evals["data_parallel"], rtol=CURVE_RTOL, err_msg=name)


@pytest.mark.parametrize("name", list(GIN_FILES))
def test_parameters_are_sharded_as_the_rules_say(mesh_runs, name):
  partitioner, model_dir, result = mesh_runs[name]
  specs = result["param_partition_specs"]
  for path, spec in EXPECTED_SPECS[name].items():
    assert specs[path] == spec, (path, specs[path])
  # Every parameter, from the rules (model-info.txt) and from the trained arrays themselves.
  info = (model_dir / "model-info.txt").read_text()
  assert f"Mesh: data={GIN_FILES[name][0][0]} x model={GIN_FILES[name][0][1]}" in info
  for path, spec in specs.items():
    row = next(l for l in info.splitlines() if l.strip().startswith(path + " "))
    assert spec in row, (path, spec, row)
  if name == "fully_sharded":  # the 64 x 64 embedding: 16 x 32 per device
    row = next(l for l in info.splitlines() if l.strip().startswith("embedding "))
    assert row.rstrip().endswith("(16, 32)")
  # The optimizer state is sharded as its parameters: Adafactor's factored moments of
  # layers/mlp/wi (None, data, model) keep the mesh axes of the axes they keep.
  state = info[info.index("Optimizer state:"):].splitlines()
  want = {"fully_sharded": ("(None, data)", "(None, model)"),
          "model_parallel": ("(None, None)", "(None, model)"),
          "data_parallel": ("(None, None)", "(None, model)")}[name]
  for moment, spec in zip(("v_row", "v_col"), want):
    row = next(l for l in state if f"/{moment}/layers/mlp/wi " in l)
    assert spec in row, (moment, spec, row)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["fully_sharded", "model_parallel"])
def test_two_processes_match_the_single_process_loss(mesh_runs, tmp_path, mesh):
  """Two jax processes (4 CPU devices each, gloo collectives) train the tiny model; the loss
  curve matches one process with 8 devices. On the 2x4 fully sharded mesh each process reads
  and feeds its half of every batch; on the 1x8 model-parallel mesh (the batch replicated
  across both processes) each reads and feeds the whole batch (the data layout follows the
  mesh, not the process count)."""
  env = dict(os.environ)
  # 4 devices per process; cheaper LLVM passes cut the workers' compile time by about a third.
  env["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=4 "
                      "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
  port = _free_port()
  model_dir = tmp_path / "run"
  procs = []
  for i in range(2):
    log = open(tmp_path / f"worker{i}.log", "w")
    procs.append((subprocess.Popen(
        [sys.executable, __file__, "--worker", "--port", str(port), "--process_index", str(i),
         "--model_dir", str(model_dir), "--mesh", mesh,
         *(["--infer_dir", str(tmp_path / "infer")] if mesh == "fully_sharded" else [])],
        env=env, cwd=REPO, stdout=log,
        stderr=subprocess.STDOUT), log))
  try:
    codes = [p.wait(timeout=420) for p, _ in procs]
  finally:
    for p, log in procs:
      if p.poll() is None:
        p.kill()
      log.close()
  logs = "\n".join((tmp_path / f"worker{i}.log").read_text()[-3000:] for i in range(2))
  assert codes == [0, 0], logs
  single = loss_curve(mesh_runs[mesh][1])
  np.testing.assert_allclose(loss_curve(model_dir), single, rtol=CURVE_RTOL)
  # The training evaluation (9 examples: 5 and 4 per process on the 2x4 mesh) too.
  np.testing.assert_allclose(eval_curve(model_dir), eval_curve(mesh_runs[mesh][1]),
                             rtol=CURVE_RTOL)
  worker_result = json.loads((model_dir / "worker_result.json").read_text())
  assert worker_result["process_count"] == 2
  assert worker_result["specs"] == mesh_runs[mesh][2]["param_partition_specs"]
  if mesh == "fully_sharded":
    # Inference on two processes (each feeding half of every batch, the outputs gathered
    # whole) gives the single process's scores and predictions, written once.
    partitioner, single_dir, _ = mesh_runs[mesh]
    infer_tiny(partitioner, single_dir, tmp_path / "infer_single")
    got, want = infer_rows(tmp_path / "infer"), infer_rows(tmp_path / "infer_single")
    assert len(got["score"]) == 9
    np.testing.assert_allclose([r["score"] for r in got["score"]],
                               [r["score"] for r in want["score"]], rtol=1e-4)
    assert got["predict"] == want["predict"]
    assert [r["inputs"] for r in got["score"]] == [r["inputs"] for r in want["score"]]

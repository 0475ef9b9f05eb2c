"""bf16 MFU of a ~1B-parameter PaLM trained through train_lib's step (issue #4.10, accelerator).

Prepared for a lent GPU (one H100 or H200); self-contained: synthetic tokens, no data
pipeline, no checkpoints. It builds a PaLM decoder of ~1.0B parameters (16 layers, d_model
2048, 16 heads of 128 with multi-query attention, SwiGLU d_ff 8192, 32k shared vocabulary),
jits
`train_lib.make_train_step` through the `Partitioner` exactly as `train_lib.train` does
(donated state, pinned shardings, `shard_batch` of a host batch every step), trains a handful
of steps in bfloat16 (float32 parameters and Adafactor state), and prints

  * the measured peak of a large bf16 x bf16 -> f32 matmul on this device, and the spec peak
    (H100 and H200 SXM: 989 TFLOP/s dense bf16; H100 PCIe: 756);
  * step time, tokens/s, model FLOP/s (`train_lib.model_flops_per_token`: 6N + 12 L H Q T,
    no rematerialisation counted) and MFU against both peaks (target >= 50%; PaLM reported
    46.2% on TPU v4).

    python bench/gpu_train_mfu.py                       # the ~1B run (a few minutes)
    python bench/gpu_train_mfu.py --batch 16 --remat    # more tokens per step
    python bench/gpu_train_mfu.py --tiny                # CPU smoke test (well under a minute)

It needs jax (with the accelerator's plugin), flax, optax and orbax-checkpoint, not
TensorFlow, seqio, gin or Beam (the train step's modules import without them), and runs
from an uninstalled checkout, as on a lent GPU whose image has those packages:
    PYTHONUNBUFFERED=1 python3 bench/gpu_train_mfu.py --json $OUT/gpu.json

Exit status 0 whatever the MFU; `--json PATH` writes the numbers. A setting whose steps run
out of device memory is retried with rematerialised layers, then with half the batch (each
retry is printed and listed in the JSON), so one call on a lent device gives a number;
parameters and optimizer state that do not fit end the run at once (ParametersDoNotFit).
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import sys
import time
from pathlib import Path

# Let XLA take most of the GPU's memory up front (must precede the first jax import).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")



def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tiny", action="store_true", help="a tiny model, for a CPU smoke test")
  p.add_argument("--layers", type=int, default=16)
  p.add_argument("--d_model", type=int, default=2048)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--head_dim", type=int, default=128)
  p.add_argument("--d_ff", type=int, default=8192)
  p.add_argument("--vocab", type=int, default=32768)
  p.add_argument("--multi_head", action="store_true", help="multi-head instead of multi-query")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--length", type=int, default=2048)
  p.add_argument("--steps", type=int, default=10, help="timed steps")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps (the first compiles)")
  p.add_argument("--remat", action="store_true", help="rematerialise each layer")
  p.add_argument("--scan_unroll", type=int, default=0, help="PaLMConfig.scan_unroll")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--peak_size", type=int, default=8192, help="n of the n^3 peak matmul")
  p.add_argument("--spec_peak_tflops", type=float, default=None,
                 help="dense bf16 spec peak of one device (default: by device name, "
                      "train_lib.DEVICE_PEAK_FLOPS)")
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  if args.tiny:
    args.layers, args.d_model, args.heads, args.head_dim = 2, 128, 4, 32
    args.d_ff, args.vocab, args.batch, args.length = 512, 1024, 2, 128
    args.steps, args.warmup, args.peak_size = min(args.steps, 3), 1, 1024
  return args


class ParametersDoNotFit(Exception):
  """The model's state does not fit on the device, whatever the batch (not retried)."""


def _out_of_memory(e: Exception) -> bool:
  if isinstance(e, ParametersDoNotFit):
    return False
  text = str(e)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _smaller(args: argparse.Namespace) -> argparse.Namespace | None:
  """The next setting to try after running out of memory: rematerialised layers first, then
  half the batch; None when the batch is 1 already."""
  if not args.remat:
    return argparse.Namespace(**{**vars(args), "remat": True})
  if args.batch > 1:
    return argparse.Namespace(**{**vars(args), "batch": args.batch // 2})
  return None


def _timed_steps(args: argparse.Namespace, n_dev: int):
  """Builds the model and trains it: (seconds per timed step, first step's seconds, losses,
  parameters, global batch, length, model FLOPs per step)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  from palmflow.trainer import lm, models, optimizers, train_lib
  from palmflow.trainer.partitioning import Partitioner

  config = models.PaLMConfig(
      vocab_size=args.vocab, num_layers=args.layers, d_model=args.d_model,
      num_heads=args.heads, head_dim=args.head_dim, d_ff=args.d_ff,
      multi_query=not args.multi_head, dtype=args.dtype, param_dtype="float32",
      remat=args.remat, scan_unroll=args.scan_unroll)
  schedule = optimizers.create_learning_rate_scheduler(
      base_learning_rate=1.0, warmup_steps=1000)
  model = lm.DecoderOnlyModel(config=config, optimizer=optimizers.adafactor(
      learning_rate=schedule, factored=False, momentum=0.9))  # PaLM's, as palm_base.gin
  n_params = config.num_params()
  B, L = args.batch * n_dev, args.length
  flops_per_step = train_lib.model_flops_per_token(
      config, num_params=n_params, length=L) * B * L
  print(f"model: {n_params / 1e9:.3f}B parameters ({args.layers} layers, d_model "
        f"{args.d_model}, {args.heads}x{args.head_dim} heads, "
        f"{'multi-head' if args.multi_head else 'multi-query'}, d_ff {args.d_ff}, vocab "
        f"{args.vocab}); batch {B} x {L} tokens; {flops_per_step / 1e12:.2f} TFLOP per step",
        flush=True)

  # As train_lib.train: sharded init, optimizer state on the mesh, donated pinned state.
  partitioner = Partitioner(num_partitions=1)
  init_fn = functools.partial(model.init, batch_size=1, length=L)
  try:
    variables, abstract = partitioner.sharded_init(init_fn, jax.random.PRNGKey(0))
    params = variables["params"]
    tx = optimizers.with_param_axes(model.optimizer,
                                    nn.get_partition_spec(abstract["params"]))
    opt_state = train_lib.place_on_mesh(jax.jit(tx.init)(params), partitioner.mesh)
  except Exception as e:  # noqa: BLE001
    if _out_of_memory(e):  # no retry with remat or a smaller batch can make these fit
      raise ParametersDoNotFit(f"the parameters and optimizer state alone exceed the "
                               f"device's memory: {str(e).splitlines()[0][:160]}") from None
    raise
  step_fn = train_lib.partition_train_step(
      partitioner, train_lib.make_train_step(model, tx, num_microbatches=1, dropout_seed=0,
                                             learning_rate_fn=schedule),
      abstract["params"], opt_state)

  rng = np.random.default_rng(0)
  batches = [{
      "decoder_input_tokens": rng.integers(1, args.vocab, (B, L), dtype=np.int32),
      "decoder_target_tokens": rng.integers(1, args.vocab, (B, L), dtype=np.int32),
      "decoder_loss_weights": np.ones((B, L), np.int32),
      "decoder_segment_ids": np.ones((B, L), np.int32),
      "decoder_positions": np.tile(np.arange(L, dtype=np.int32), (B, 1)),
  } for _ in range(2)]

  losses, step = [], 0

  def run(n_steps: int) -> float:
    nonlocal params, opt_state, step
    metrics = None
    t = time.perf_counter()
    for _ in range(n_steps):
      batch = partitioner.shard_batch(batches[step % len(batches)])
      params, opt_state, metrics = step_fn(params, opt_state, batch, jnp.asarray(step))
      step += 1
    losses.append(float(jax.device_get(metrics)["loss"]))
    return time.perf_counter() - t

  t_compile = run(1)
  print(f"first step (compile + run): {t_compile:.1f}s, loss {losses[-1]:.4f}", flush=True)
  if args.warmup > 1:
    run(args.warmup - 1)
  seconds = run(args.steps) / args.steps
  return seconds, t_compile, losses, n_params, B, L, flops_per_step


def main(argv=None) -> int:
  args = parse_args(argv)
  import jax
  import jax.numpy as jnp

  try:
    import palmflow  # noqa: F401
  except ImportError:  # run from a checkout that is not installed (a lent accelerator)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

  devices = jax.devices()
  kind = devices[0].device_kind
  n_dev = len(devices)
  print(f"jax {jax.__version__}; {n_dev} x {kind} ({jax.default_backend()})", flush=True)

  # Peak: a large bf16 x bf16 product accumulating in float32 (what the model's matmuls do).
  n = args.peak_size
  a = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(jnp.bfloat16)
  b = jax.random.normal(jax.random.PRNGKey(2), (n, n), jnp.float32).astype(jnp.bfloat16)
  dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  jax.block_until_ready(dot(a, b))
  best = float("inf")
  for _ in range(10):
    t = time.perf_counter()
    jax.block_until_ready(dot(a, b))
    best = min(best, time.perf_counter() - t)
  measured_peak = 2 * n ** 3 / best
  from palmflow.trainer import train_lib
  known = train_lib.device_peak_flops(kind, "bfloat16")  # data-sheet dense bf16 peaks
  spec = args.spec_peak_tflops or (known / 1e12 if known else None)
  print(f"peak bf16 matmul ({n}^3): {measured_peak / 1e12:.1f} TFLOP/s measured"
        + (f"; spec {spec:.0f} TFLOP/s" if spec else ""), flush=True)
  del a, b

  out_of_memory = []  # the settings that did not fit
  while True:
    try:
      seconds, t_compile, losses, n_params, B, L, flops_per_step = _timed_steps(args, n_dev)
      break
    except Exception as e:  # noqa: BLE001 - XLA reports running out of memory as it likes
      smaller = _smaller(args) if _out_of_memory(e) else None
      if smaller is None:
        raise
      print(f"out of device memory with batch {args.batch}{' and remat' * args.remat} "
            f"({str(e).splitlines()[0][:160]}); retrying with batch {smaller.batch}"
            f"{' and remat' * smaller.remat}", flush=True)
    # Out of the handler, the failed attempt's arrays are garbage (its traceback is gone).
    out_of_memory.append({"batch_per_device": args.batch, "remat": args.remat})
    args = smaller
    gc.collect()
    jax.clear_caches()
  tokens_per_s = B * L / seconds
  flops = flops_per_step / seconds
  mfu_measured = flops / (measured_peak * n_dev)
  mfu_spec = flops / (spec * 1e12 * n_dev) if spec else None
  mem = {}
  try:
    mem = {k: v for k, v in (devices[0].memory_stats() or {}).items()
           if k in ("peak_bytes_in_use", "bytes_limit")}
  except Exception:  # noqa: BLE001 - memory stats are optional (CPU has none)
    pass
  print(f"\n{args.steps} steps: {seconds:.3f} s/step, {tokens_per_s:,.0f} tokens/s, "
        f"{flops / 1e12:.1f} model TFLOP/s; loss {losses[0]:.3f} -> {losses[-1]:.3f}")
  print(f"MFU vs measured bf16 matmul peak: {100 * mfu_measured:.1f}%"
        + (f"; vs spec {spec:.0f} TFLOP/s: {100 * mfu_spec:.1f}%" if spec else "")
        + " (target >= 50%)")
  if mem:
    print("device memory" + (" (the process's peak: failed tries included)" if out_of_memory
                             else "") + ": "
          + ", ".join(f"{k} {v / 2**30:.1f} GiB" for k, v in mem.items()))
  if args.json:
    Path(args.json).write_text(json.dumps({
        "device": kind, "devices": n_dev, "jax": jax.__version__, "params": n_params,
        "batch": B, "length": L, "seconds_per_step": seconds, "tokens_per_second": tokens_per_s,
        "model_flops_per_second": flops, "measured_peak_flops": measured_peak,
        "spec_peak_tflops": spec, "mfu_measured_peak": mfu_measured, "mfu_spec_peak": mfu_spec,
        "first_step_seconds": t_compile, "losses": losses, "memory": mem,
        "out_of_memory": out_of_memory,
        "args": vars(args)}, indent=1))
    print(f"wrote {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

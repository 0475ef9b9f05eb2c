"""Training speed: our train loop against a hand-written flax+optax loop, and MFU (issue #4.10).

In one process, for each compute dtype, this runs alternately (rounds of a few steps each):

  ours         the step of `train_lib.make_train_step`, jitted by the `Partitioner` with the
               shardings and donation `train_lib.train` uses, fed as `train` feeds it: a host
               numpy batch through `partitioner.shard_batch`, the step as `jnp.asarray(step)`,
               metrics fetched every `--log_every` steps;
  handwritten  a minimal jitted flax+optax step on the same model (`PaLMDecoder`), optimizer
               (the model's Adafactor) and batches: cross-entropy + z-loss, `value_and_grad`,
               `tx.update`, donated state, `jax.device_put` of the host batch;

and, between rounds, the peak matmul rate of the same dtype (a large `jnp.dot`: float32, and
bf16 x bf16 accumulating in float32). It prints steps/s, ours / handwritten, model FLOP/s
(`train_lib.model_flops_per_token`), MFU against that measured peak, and the bf16 / float32
speed-up, plus the CPU features that decide the bf16 rate (AMX, AVX512-BF16).

For A/Bs, other variants of our loop run in the same rounds: `--compare_models_at REF`
(models.py and losses.py at a git revision), `ours_logits` / `ours_chunkN` (the loss's chunking),
`ours_mbN` (gradient accumulation over N microbatches, as `train(num_microbatches=N)`),
`--xla_options` (`ours_xla`: the step compiled with XLA options) and `--gin_variant`
(`ours_NAME`: the model with extra gin bindings). Rounds alternate their
order, and each variant's round-by-round median time ratio to `ours` is printed: on a
noisy machine that is a better measure than the best rounds.

On a CPU, glibc returns large freed blocks to the kernel, so every step faults in its
activations again (~600k page faults, >1 s of system time per palm_small step). By default
this script re-executes itself with MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=<large> (unless already set); `--malloc default` measures without.

Local (CPU; tiny takes ~1 minute, small ~8 minutes on 2 cores):
    .venv/bin/python bench/bench_train.py --model tiny --batch 16 --length 128
    .venv/bin/python bench/bench_train.py --model small --batch 8 --length 512 --steps 2 \\
        --rounds 6 --json /tmp/bench_small.json
Accelerator: see bench/gpu_train_mfu.py (a ~1B model in bf16).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path

import benchlib

MALLOC_ENV = benchlib.CPU_MALLOC_ENV  # what `train` runs with on a CPU
CPU_FLAGS = ("amx_bf16", "amx_tile", "amx_int8", "avx512_bf16", "avx512f", "avx512_vnni",
             "avx2", "fma")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="tiny", help="gin/models/palm_<model>.gin (tiny, small, ...)")
  p.add_argument("--vocab_size", type=int, default=None, help="VOCAB_SIZE (default: the gin's)")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--length", type=int, default=128)
  p.add_argument("--dtypes", default="float32,bfloat16",
                 help="comma-separated ACTIVATION_DTYPEs to run")
  p.add_argument("--steps", type=int, default=5, help="steps per timed round")
  p.add_argument("--rounds", type=int, default=3, help="alternating rounds per variant")
  p.add_argument("--log_every", type=int, default=10, help="metrics fetch period of our loop")
  p.add_argument("--variants", default="ours,handwritten",
                 help="ours, handwritten, ours_logits (ours with the loss over the whole "
                      "materialised logits, as before the chunked projected loss), "
                      "ours_chunkN (ours with the loss N tokens at a time), ours_mbN (ours "
                      "with gradient accumulation over N microbatches: num_microbatches)")
  p.add_argument("--compare_models_at", default=None, metavar="GIT_REF",
                 help="also run our loop with palmflow/trainer/models.py and losses.py as "
                      "of this git revision (e.g. 66925b9, before the CPU speed work)")
  p.add_argument("--xla_options", default=None, metavar="NAME=VALUE;...",
                 help="also run our loop compiled with these XLA options (variant 'ours_xla'; "
                      "DebugOptions names, enum values spelled out, e.g. "
                      "xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT): "
                      "an A/B of compiler settings in one process, unlike --xla_flags; keep "
                      "'ours' in --variants for the round-by-round ratio, and use an even "
                      "--rounds (the order alternates)")
  p.add_argument("--gin_variant", action="append", default=[], metavar="NAME=BINDING;...",
                 help="also run our loop with these extra gin bindings (variant 'ours_NAME'; "
                      "repeatable), e.g. 'scan1=models.PaLMConfig.scan_unroll = 1'; the "
                      "bindings may not change the model's size, vocabulary or dtype")
  p.add_argument("--peak_size", type=int, default=2048, help="n of the n x n x n peak matmul")
  p.add_argument("--malloc", choices=("tuned", "default"), default="tuned")
  p.add_argument("--xla_flags", default="", help="appended to XLA_FLAGS before jax starts")
  p.add_argument("--json", default=None, help="write the results here")
  return p.parse_args(argv)


def parse_xla_options(text: str) -> dict:
  """`--xla_options` as a compiler_options dict (integers, decimals and true/false
  converted; anything else stays a string)."""
  options = {}
  for item in filter(None, (x.strip() for x in text.split(";"))):
    name, sep, value = item.partition("=")
    if not sep:
      raise SystemExit(f"--xla_options: {item!r} is not NAME=VALUE")
    value = value.strip()
    if re.fullmatch(r"-?\d+", value):
      value = int(value)
    elif re.fullmatch(r"-?\d*\.\d+(e-?\d+)?", value):
      value = float(value)
    else:
      value = {"true": True, "false": False}.get(value.lower(), value)
    options[name.strip()] = value
  return options


def maybe_reexec(args: argparse.Namespace) -> None:
  """Restarts the process with the malloc settings and XLA flags (both read at start-up)."""
  env = dict(os.environ)
  want = {}
  if args.malloc == "tuned":
    want.update({k: v for k, v in MALLOC_ENV.items() if k not in env})
  if args.xla_flags and args.xla_flags not in env.get("XLA_FLAGS", ""):
    want["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
  if want and not env.get("PALMFLOW_BENCH_REEXEC"):
    env.update(want, PALMFLOW_BENCH_REEXEC="1")
    os.execve(sys.executable, [sys.executable] + sys.argv, env)


def cpu_features() -> dict:
  """Model name and the matmul-relevant ISA flags of /proc/cpuinfo (empty off Linux)."""
  info = {"model": "unknown", "flags": {}, "cores": os.cpu_count()}
  try:
    text = Path("/proc/cpuinfo").read_text()
  except OSError:
    return info
  flags = set()
  for line in text.splitlines():
    key, _, value = line.partition(":")
    if key.strip() == "model name" and info["model"] == "unknown":
      info["model"] = value.strip()
    if key.strip() == "flags":
      flags = set(value.split())
  info["flags"] = {f: f in flags for f in CPU_FLAGS}
  return info


def main(argv=None) -> int:
  args = parse_args(argv)
  xla_options = parse_xla_options(args.xla_options) if args.xla_options else None
  maybe_reexec(args)

  import functools

  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from palmflow.trainer import optimizers, train_lib
  from palmflow.trainer.partitioning import Partitioner

  feats = cpu_features()
  malloc = {k: os.environ.get(k) for k in MALLOC_ENV}
  print(f"CPU: {feats['model']}, {feats['cores']} cores; "
        + " ".join(f"{k}={'yes' if v else 'no'}" for k, v in feats["flags"].items()))
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}; "
        f"malloc: {malloc}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
  if jax.default_backend() == "cpu" and not (feats["flags"].get("amx_bf16")
                                             or feats["flags"].get("avx512_bf16")):
    print("note: no AMX / AVX512-BF16 here: bf16 matmuls run at (or below) the float32 rate")

  B, L = args.batch, args.length
  rng = np.random.default_rng(0)

  def load_model(dtype: str, extra_bindings: tuple[str, ...] = ()):
    bindings = ["DROPOUT_RATE = 0.0", f"ACTIVATION_DTYPE = '{dtype}'"]
    if args.vocab_size:
      bindings.append(f"VOCAB_SIZE = {args.vocab_size}")
    return benchlib.gin_model(args.model, bindings + list(extra_bindings))

  def host_batches(vocab: int, n: int = 4):
    return [benchlib.random_batch(rng, vocab, B, L) for _ in range(n)]

  partitioner = Partitioner(num_partitions=1)

  def models_at(ref: str):
    """`DecoderOnlyModel` whose module is `PaLMDecoder` from models.py at git revision `ref`,
    and whose loss is losses.py's at `ref`."""
    import importlib.util
    import subprocess
    import tempfile
    from palmflow.trainer import lm
    repo = Path(__file__).resolve().parents[1]
    tmp = Path(tempfile.mkdtemp())

    def load(name: str):
      source = subprocess.run(["git", "show", f"{ref}:palmflow/trainer/{name}.py"], cwd=repo,
                              check=True, capture_output=True, text=True).stdout
      path = tmp / f"{name}_at_{ref}.py"
      path.write_text(source)
      spec = importlib.util.spec_from_file_location(f"{name}_at_{ref}", path)
      mod = importlib.util.module_from_spec(spec)
      sys.modules[spec.name] = mod
      spec.loader.exec_module(mod)
      return mod
    mod, old_losses = load("models"), load("losses")
    fields = set(mod.PaLMConfig.__dataclass_fields__)

    class OldModel(lm.DecoderOnlyModel):
      @property
      def module(self):
        return mod.PaLMDecoder(mod.PaLMConfig(**{
            k: v for k, v in dataclasses.asdict(self.config).items() if k in fields}))

      def loss_fn(self, params, batch, dropout_rng=None):
        current, lm.losses = lm.losses, old_losses  # only while tracing
        try:
          return super().loss_fn(params, batch, dropout_rng)
        finally:
          lm.losses = current
    return lambda m: OldModel(**{f.name: getattr(m, f.name)
                                 for f in dataclasses.fields(lm.DecoderOnlyModel)})

  old_model = models_at(args.compare_models_at) if args.compare_models_at else None

  def make_ours(model, schedule, batches, compiler_options=None, microbatches=1):
    """`train_lib.train`'s step function and feeding, without data loading and checkpoints."""
    init_fn = functools.partial(model.init, batch_size=1, length=L)
    variables, abstract = partitioner.sharded_init(init_fn, jax.random.PRNGKey(0))
    params = variables["params"]
    tx = optimizers.with_param_axes(model.optimizer, nn.get_partition_spec(abstract["params"]))
    opt_state = train_lib.place_on_mesh(jax.jit(tx.init)(params), partitioner.mesh)
    step_fn = train_lib.partition_train_step(
        partitioner, train_lib.make_train_step(model, tx, num_microbatches=microbatches,
                                               dropout_seed=0, learning_rate_fn=schedule),
        abstract["params"], opt_state, compiler_options=compiler_options)
    state = {"params": params, "opt": opt_state, "step": 0}

    def run(n: int) -> float:
      metrics = None
      for _ in range(n):
        s = state["step"]
        batch = partitioner.shard_batch(batches[s % len(batches)])
        state["params"], state["opt"], metrics = step_fn(state["params"], state["opt"], batch,
                                                         jnp.asarray(s))
        state["step"] = s + 1
        if state["step"] % args.log_every == 0:
          jax.device_get(metrics)
      return float(jax.device_get(metrics)["loss"])
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    return run, n_params

  def make_handwritten(model, batches):
    """The smallest honest flax+optax training step on the same module and optimizer."""
    module, z_loss = model.module, model.z_loss
    init = lambda k: module.init(k, jnp.zeros((1, L), jnp.int32))["params"]
    params = jax.jit(lambda k: nn.unbox(init(k)))(jax.random.PRNGKey(0))
    # The same optimizer as ours: Adafactor factored by the parameters' logical axes.
    tx = optimizers.with_param_axes(
        model.optimizer, nn.get_partition_spec(jax.eval_shape(init, jax.random.PRNGKey(0))))
    opt_state = jax.jit(tx.init)(params)

    def loss_fn(p, batch):
      logits = module.apply({"params": p}, batch["decoder_input_tokens"],
                            segment_ids=batch["decoder_segment_ids"],
                            positions=batch["decoder_positions"])
      targets, weights = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
      xent = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
      log_z = jax.nn.logsumexp(logits, axis=-1)
      per_token = (xent + z_loss * jnp.square(log_z)) * weights
      return jnp.sum(per_token) / jnp.maximum(jnp.sum(weights), 1)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(p, s, batch):
      loss, grads = jax.value_and_grad(loss_fn)(p, batch)
      updates, s = tx.update(grads, s, p)
      return optax.apply_updates(p, updates), s, loss

    state = {"params": params, "opt": opt_state, "step": 0}

    def run(n: int) -> float:
      loss = None
      for _ in range(n):
        s = state["step"]
        batch = jax.device_put(batches[s % len(batches)])
        state["params"], state["opt"], loss = train_step(state["params"], state["opt"], batch)
        state["step"] = s + 1
      return float(loss)
    return run

  def make_peak(dtype: str):
    n = args.peak_size
    a = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(2), (n, n), jnp.float32)
    if dtype == "float32":
      f = jax.jit(lambda a, b: jnp.dot(a, b, precision="highest"))
    else:
      a, b = a.astype(dtype), b.astype(dtype)
      f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    jax.block_until_ready(f(a, b))

    def run(reps: int = 3) -> float:
      best = float("inf")
      for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(a, b))
        best = min(best, time.perf_counter() - t)
      return 2 * n ** 3 / best
    return run

  gin_variants = {}
  for item in args.gin_variant:
    name, sep, text = item.partition("=")
    name = name.strip()
    if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
      raise SystemExit(f"--gin_variant: {item!r} is not NAME=BINDING;... (NAME: letters, "
                       "digits, _)")
    if name in gin_variants:
      raise SystemExit(f"--gin_variant: the name {name!r} is given twice")
    gin_variants[name] = tuple(b.strip() for b in text.split(";") if b.strip())
  dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
  variants = [v.strip() for v in args.variants.split(",") if v.strip()]
  for v in variants:
    n = re.fullmatch(r"ours_(?:chunk|mb)(\d+)", v)
    if v not in ("ours", "handwritten", "ours_logits") and not (n and int(n.group(1)) > 0):
      raise SystemExit(f"--variants: unknown variant {v!r} (see --help)")
    if v.startswith("ours_mb") and B % int(n.group(1)):
      raise SystemExit(f"--variants {v}: --batch {B} is not divisible into {n.group(1)} "
                       "microbatches")
  runners, flops_per_step, peaks = {}, {}, {}
  for dtype in dtypes:
    model, schedule = load_model(dtype)
    batches = host_batches(model.config.vocab_size)
    t0 = time.perf_counter()
    flops_per_step[dtype] = train_lib.model_flops_per_token(
        model.config, num_params=model.config.num_params(), length=L) * B * L
    if "ours" in variants:
      runners[(dtype, "ours")], _ = make_ours(model, schedule, batches)
    for v in variants:  # ours_chunkN: the loss N tokens at a time; ours_logits: all at once
      if v == "ours_logits" or v.startswith("ours_chunk"):
        chunk = -1 if v == "ours_logits" else int(v[len("ours_chunk"):])
        runners[(dtype, v)], _ = make_ours(
            dataclasses.replace(model, loss_chunk_tokens=chunk), schedule, batches)
      elif v.startswith("ours_mb"):  # gradient accumulation over N microbatches
        runners[(dtype, v)], _ = make_ours(model, schedule, batches,
                                           microbatches=int(v[len("ours_mb"):]))
    if xla_options:
      runners[(dtype, "ours_xla")], _ = make_ours(model, schedule, batches, xla_options)
    for name, extra in gin_variants.items():
      v_model, v_schedule = load_model(dtype, extra)
      # The rows' FLOPs, batches and dtype are the base model's: a variant must keep them.
      if (v_model.config.num_params() != model.config.num_params()
              or v_model.config.vocab_size != model.config.vocab_size
              or v_model.config.dtype != model.config.dtype):
        raise SystemExit(f"--gin_variant {name}: changes the model's size, vocabulary or "
                         "dtype; compare those in separate runs")
      if (dtype, f"ours_{name}") in runners:
        raise SystemExit(f"--gin_variant: the name {name!r} is taken by another variant")
      runners[(dtype, f"ours_{name}")], _ = make_ours(v_model, v_schedule, batches)
    if old_model is not None:
      runners[(dtype, f"ours@{args.compare_models_at}")], _ = make_ours(
          old_model(model), schedule, batches)
    if "handwritten" in variants:
      runners[(dtype, "handwritten")] = make_handwritten(model, batches)
    for key in [k for k in runners if k[0] == dtype]:
      loss = runners[key](1)  # compile + first step
      print(f"{dtype:9s} {key[1]:12s} first loss {loss:.4f}", flush=True)
    print(f"{dtype}: compiled and warmed up in {time.perf_counter() - t0:.1f}s "
          f"({model.config.num_params() / 1e6:.1f}M parameters, "
          f"{flops_per_step[dtype] / 1e9:.1f} GFLOP per step)", flush=True)
    peaks[dtype] = {"run": make_peak(dtype), "best": 0.0}

  times = {k: [] for k in runners}
  for r in range(args.rounds):
    # every other round in reverse order, so that no variant always runs first or last
    for key, run in (list(runners.items()) if r % 2 == 0 else list(runners.items())[::-1]):
      peaks[key[0]]["best"] = max(peaks[key[0]]["best"], peaks[key[0]]["run"]())
      t = time.perf_counter()
      run(args.steps)
      times[key].append((time.perf_counter() - t) / args.steps)
    print(f"round {r + 1}/{args.rounds}: " + ", ".join(
        f"{k[0]}/{k[1]} {v[-1]:.3f}s" for k, v in times.items()), flush=True)
  for dtype in dtypes:
    peaks[dtype]["best"] = max(peaks[dtype]["best"], peaks[dtype]["run"]())

  results = {"cpu": feats, "malloc": malloc, "xla_flags": os.environ.get("XLA_FLAGS", ""),
             "jax": jax.__version__, "platform": jax.default_backend(),
             "model": args.model, "batch": B, "length": L, "steps": args.steps,
             "rounds": args.rounds, "load_average": os.getloadavg(), "rows": []}
  print(f"\nmodel palm_{args.model}, batch {B} x {L} tokens, best of {args.rounds} rounds of "
        f"{args.steps} steps (load average {os.getloadavg()[0]:.2f})")
  header = ("dtype", "variant", "s/step", "steps/s", "vs handwritten", "model TFLOP/s",
            "peak TFLOP/s", "MFU")
  print(" | ".join(header))
  best = {k: min(v) for k, v in times.items()}
  for (dtype, variant), t in best.items():
    hand = best.get((dtype, "handwritten"))
    flops = flops_per_step[dtype] / t
    peak = peaks[dtype]["best"]
    row = {"dtype": dtype, "variant": variant, "seconds_per_step": t,
           "median_seconds_per_step": float(np.median(times[(dtype, variant)])),
           "steps_per_second": 1 / t, "ratio_to_handwritten": (hand / t) if hand else None,
           "model_flops_per_second": flops, "peak_flops_per_second": peak, "mfu": flops / peak}
    results["rows"].append(row)
    ratio = f"{hand / t:.3f}x" if hand else "-"
    print(f"{dtype} | {variant} | {t:.3f} | {1 / t:.2f} | {ratio} | {flops / 1e12:.3f} | "
          f"{peak / 1e12:.3f} | {100 * flops / peak:.1f}%")
  for (dtype, variant), ts in times.items():  # A/Bs: round by round against our loop
    base = times.get((dtype, "ours"))
    if variant != "ours" and base and len(ts) == len(base):
      ratios = np.asarray(ts) / np.asarray(base)
      results.setdefault("paired_ratio_to_ours", {})[f"{dtype}/{variant}"] = float(
          np.median(ratios))
      print(f"{dtype} {variant} / ours, round by round: median {np.median(ratios):.3f}, "
            f"faster in {int((ratios < 1).sum())} of {len(ratios)} rounds")
  if "float32" in dtypes and "bfloat16" in dtypes:
    # What the two matmul units allow: a step whose bf16 and float32 MFU were equal would be
    # this much faster in bf16.
    peak_ratio = peaks["bfloat16"]["best"] / peaks["float32"]["best"]
    results["bf16_peak_over_float32_peak"] = peak_ratio
    print(f"peak matmul rate, bfloat16 / float32: {peak_ratio:.2f}x")
    for variant in dict.fromkeys(v for _, v in runners):
      if ("float32", variant) in best and ("bfloat16", variant) in best:
        speedup = best[("float32", variant)] / best[("bfloat16", variant)]
        results[f"bf16_speedup_{variant}"] = speedup
        # One round's float32 and bfloat16 steps ran within a minute or so of each other;
        # the two best rounds may be the whole run apart, each from a fast minute of this
        # machine. Both ratios are printed.
        paired = (np.asarray(times[("float32", variant)])
                  / np.asarray(times[("bfloat16", variant)]))
        results[f"bf16_speedup_paired_{variant}"] = float(np.median(paired))
        print(f"bfloat16 vs float32 ({variant}): {speedup:.2f}x faster per step (best "
              f"rounds); round by round: median {np.median(paired):.2f}x, "
              f"range {paired.min():.2f}-{paired.max():.2f}x")
  if args.json:
    Path(args.json).write_text(json.dumps(results, indent=1, default=float))
    print(f"wrote {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

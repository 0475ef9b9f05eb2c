"""Adafactor's update: `optimizers.adafactor` (fused) against `optimizers.adafactor_chain`.

Both are the same optimizer (Adafactor with t5x's defaults: global-norm clip, factored
second moments, update clipping, parameter scaling, lr² decay; `--palm`: PaLM's, unfactored
with momentum 0.9, as gin/models/palm_base.gin trains); the chain is optax's transformations one
after the other, the fused one computes the step in fewer passes over memory. The fused
one timed is the one that trains (per-layer statistics for the stacked layers); the
agreement check runs it with whole-array statistics, as the chain has them. In one
process, on the parameter shapes of a gin model, this times one update plus
`optax.apply_updates` (jitted, state donated) of each, alternating in rounds, and, as a
floor, one elementwise pass ``p - lr * g`` over the same parameters. It prints each one's
median and best time, the round-by-round median ratio fused / chain, and the largest
difference between the two after a few steps.

    .venv/bin/python bench/bench_optimizer.py --model small --rounds 20
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import benchlib


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="small", help="gin/models/palm_<model>.gin")
  p.add_argument("--rounds", type=int, default=20)
  p.add_argument("--palm", action="store_true",
                 help="PaLM's settings (factored=False, momentum=0.9) instead of t5x's defaults")
  p.add_argument("--json", default=None, help="write the results here")
  args = p.parse_args(argv)
  benchlib.reexec_with_cpu_malloc()

  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from palmflow.trainer import optimizers

  # Parameters and optimizer state are float32 whatever the compute dtype.
  model, schedule = benchlib.gin_model(
      args.model, ["DROPOUT_RATE = 0.0", "ACTIVATION_DTYPE = 'float32'"])
  params = jax.jit(lambda k: nn.unbox(model.module.init(
      k, jnp.zeros((1, 16), jnp.int32)))["params"])(jax.random.PRNGKey(0))
  n_params = sum(x.size for x in jax.tree.leaves(params))
  rng = np.random.default_rng(0)
  grads = [jax.tree.map(lambda x: jnp.asarray(
      rng.normal(size=x.shape).astype(np.float32) * 1e-3), params) for _ in range(2)]
  settings = dict(factored=False, momentum=0.9) if args.palm else {}
  txs = {"chain": optimizers.adafactor_chain(learning_rate=schedule, **settings),
         "fused": optimizers.adafactor(learning_rate=schedule, **settings)}

  def make_step(tx):
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(p, s, g):
      updates, s = tx.update(g, s, p)
      return optax.apply_updates(p, updates), s
    return step

  @functools.partial(jax.jit, donate_argnums=(0,))
  def one_pass(p, g):
    return jax.tree.map(lambda a, b: a - 1e-3 * b, p, g)

  steps = {name: make_step(tx) for name, tx in txs.items()}
  copy = lambda t: jax.tree.map(jnp.copy, t)
  after = {}
  whole = optimizers.adafactor(learning_rate=schedule, stacked_layers_key=None, **settings)
  for name, tx, step in (("chain", txs["chain"], steps["chain"]),
                         ("fused", whole, make_step(whole))):  # agreement after 5 steps
    p, s = copy(params), jax.jit(tx.init)(params)
    for i in range(5):
      p, s = step(p, s, grads[i % 2])
    after[name] = p
  diff = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
             for a, b in zip(jax.tree.leaves(after["fused"]), jax.tree.leaves(after["chain"])))
  print(f"palm_{args.model}: {n_params / 1e6:.1f}M parameters; fused vs chain after 5 steps: "
        f"largest difference {diff:.2e} of the parameter's largest value", flush=True)

  state = {name: (copy(params), jax.jit(txs[name].init)(params)) for name in txs}
  floor_p = one_pass(copy(params), grads[0])
  times = {name: [] for name in (*txs, "one_pass")}
  for r in range(args.rounds):
    for name in (list(txs) if r % 2 else list(txs)[::-1]):
      p, s = state[name]
      t = time.perf_counter()
      p, s = steps[name](p, s, grads[r % 2])
      jax.block_until_ready(p)
      times[name].append(time.perf_counter() - t)
      state[name] = (p, s)
    t = time.perf_counter()
    floor_p = jax.block_until_ready(one_pass(floor_p, grads[r % 2]))
    times["one_pass"].append(time.perf_counter() - t)
  result = {"model": args.model, "settings": "palm" if args.palm else "t5x",
            "num_params": int(n_params), "rounds": args.rounds,
            "max_relative_difference": diff}
  for name, ts in times.items():
    result[f"{name}_ms_median"] = 1e3 * float(np.median(ts))
    result[f"{name}_ms_best"] = 1e3 * float(min(ts))
    print(f"{name:9s} median {1e3 * np.median(ts):7.1f} ms   best {1e3 * min(ts):7.1f} ms")
  ratios = np.array(times["fused"]) / np.array(times["chain"])
  result["fused_over_chain_paired_median"] = float(np.median(ratios))
  print(f"fused / chain, round by round: median {np.median(ratios):.3f} "
        f"(range {ratios.min():.3f}-{ratios.max():.3f}), fused faster in "
        f"{int((ratios < 1).sum())} of {args.rounds}")
  if args.json:
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())

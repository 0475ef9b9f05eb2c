"""Where a training step's time goes: products and other work, per part of the model.

This traces our train step (`train_lib.make_train_step` on one device) with
`jax.profiler`, which records every thunk XLA:CPU runs (a product, an elementwise fusion,
a reduction, a copy). XLA runs independent thunks at the same time, so a thunk's wall time
overstates its cost: each moment's wall time is split evenly among the thunks running then.
Each thunk is attributed to a part of the model by the Python call stack XLA keeps in its
HLO metadata (backward ops keep their forward op's stack; a fusion of ops from two parts
goes to the part its own metadata names):

  mlp          `models.SwiGLU` (its products, the SwiGLU and its gradient)
  attention    `models.Attention` (projections, rotary, softmax, the attention products)
  layer norms  `models.LayerNorm`
  loss         `losses` (the chunked projected loss, or the loss over whole logits)
  optimizer    `optimizers` and optax
  model        the rest of `PaLMDecoder` (embedding, residual stream, masks)
  step         the rest of the step (gradient normalisation, metrics)

and as products (a fusion that contains a dot) or other work. It prints, per step: a table
of the parts, the busy time and how much of it ran two thunks at once, the products' rate
(model FLOPs are not used: the FLOPs of the dots XLA compiled) against the peak of a large
product of the same dtype measured in the same process, and the costliest thunks.

    .venv/bin/python bench/profile_step.py --model small --batch 8 --length 512 \\
        --dtype bfloat16
"""
from __future__ import annotations

import argparse
import collections
import functools
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import benchlib

# (part, a function name in the call stack, or a file path fragment), innermost frame first.
PARTS = (("mlp", "SwiGLU.__call__"), ("attention", "Attention.__call__"),
         ("layer norms", "LayerNorm.__call__"), ("loss", "/palmflow/trainer/losses.py"),
         ("optimizer", "/palmflow/trainer/optimizers.py"), ("optimizer", "/optax/"),
         ("model", "PaLMDecoder.__call__"))
# Trace events that are not thunks (the executor, Python, the thread pool).
NOT_THUNKS = ("ThunkExecutor", "$", "SlinkyThreadPool", "PjitFunction", "end:", "Common",
              "Allocate", "Parse", "Handle", "Wait", "Python", "Threadpool")


def _table(text: str, name: str) -> dict[int, str]:
  m = re.search(r"^" + name + r"\n((?:\d+ .*\n)+)", text, re.M)
  return {int(k): v for k, v in (ln.split(" ", 1) for ln in m.group(1).splitlines())} if m \
      else {}


class HloIndex:
  """Per instruction of an optimized HLO module's text: its part and its dots' FLOPs."""

  def __init__(self, text: str):
    files = {k: v.strip('"') for k, v in _table(text, "FileNames").items()}
    funcs = {k: v.strip('"') for k, v in _table(text, "FunctionNames").items()}
    self._locs = {}
    for k, v in _table(text, "FileLocations").items():
      d = dict(re.findall(r"(\w+)=(\d+)", v))
      self._locs[k] = (files[int(d["file_name_id"])], funcs[int(d["function_name_id"])])
    self._frames = {}
    for k, v in _table(text, "StackFrames").items():
      d = dict(re.findall(r"(\w+)=(\d+)", v))
      # The text prints a frame's parent id plus one (0: none).
      self._frames[k] = (int(d["file_location_id"]), int(d["parent_frame_id"]) - 1)
    self.computations: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
      m = re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{$", line)
      if m:
        current = self.computations.setdefault(m.group(1), [])
      elif current is not None and line.startswith("  "):
        current.append(line)
    self.instructions: dict[str, tuple[str, list[str]]] = {}  # name -> (line, called body)
    for lines in self.computations.values():
      for line in lines:
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = ", line)
        if m:
          called = re.search(r"calls=%([\w.\-]+)", line)
          body = self.computations.get(called.group(1), []) if called else []
          self.instructions[m.group(1)] = (line, body)

  def part(self, name: str) -> str:
    line, body = self.instructions.get(name, ("", []))
    for candidate in [line] + body:
      m = re.search(r"stack_frame_id=(\d+)", candidate)
      if m:
        return self._part_of_frame(int(m.group(1)))
    return "step"

  def _part_of_frame(self, frame: int) -> str:
    stack, seen = [], set()
    while frame in self._frames and frame not in seen:
      seen.add(frame)
      loc, frame = self._frames[frame]
      stack.append(self._locs.get(loc, ("", "")))
    for file, func in stack:
      for part, key in PARTS:
        if key == func or (key.startswith("/") and key in file):
          return part
    return "step"

  def dot_flops(self, name: str) -> int:
    """FLOPs of the dots in a thunk's fused computation (0: not a product)."""
    _, body = self.instructions.get(name, ("", []))
    shapes = dict(re.findall(r"%([\w.\-]+) = \w+\[([\d,]*)\]", "\n".join(body)))
    flops = 0
    for line in body:
      m = re.search(r"= \w+\[([\d,]*)\]\S* dot\(%([\w.\-]+), %[\w.\-]+\).*"
                    r"lhs_contracting_dims=\{([\d,]*)\}", line)
      if m:
        out = [int(x) for x in m.group(1).split(",") if x]
        lhs = [int(x) for x in shapes.get(m.group(2), "").split(",") if x]
        contracted = 1
        for i in m.group(3).split(","):
          if i and lhs:
            contracted *= lhs[int(i)]
        size = 1
        for x in out:
          size *= x
        flops += 2 * size * contracted
    return flops


def attribute(events: list[dict], index: HloIndex, steps: int) -> dict:
  """Splits the traced wall time among concurrent thunks; sums per part and kind."""
  events = [e for e in events if e.get("ph") == "X" and not e["name"].startswith(NOT_THUNKS)]
  points = sorted([(e["ts"], 1, i) for i, e in enumerate(events)]
                  + [(e["ts"] + e["dur"], -1, i) for i, e in enumerate(events)])
  share: collections.Counter = collections.Counter()
  at_once: collections.Counter = collections.Counter()
  active: set[int] = set()
  last = None
  for t, kind, i in points:
    if last is not None and active and t > last:
      at_once[min(len(active), 2)] += t - last  # 1, or 2 for two or more
      for j in active:
        share[j] += (t - last) / len(active)
    last = t
    (active.add if kind == 1 else active.discard)(i)
  parts: dict = collections.defaultdict(lambda: {"products_ms": 0.0, "other_ms": 0.0,
                                                 "product_gflop": 0.0})
  thunks: collections.Counter = collections.Counter()
  for i, seconds in share.items():
    name = events[i]["name"]
    flops = index.dot_flops(name)
    row = parts[index.part(name)]
    row["products_ms" if flops else "other_ms"] += seconds / 1e3 / steps
    row["product_gflop"] += flops / 1e9 / steps
    thunks[name] += seconds / 1e3 / steps
  per_step = 1e3 * steps
  return {"busy_ms": sum(at_once.values()) / per_step,
          "two_or_more_at_once_ms": at_once[2] / per_step,
          "parts": dict(parts),
          "top_thunks": [(n, ms, index.part(n)) for n, ms in thunks.most_common(15)]}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="small", help="gin/models/palm_<model>.gin")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--length", type=int, default=512)
  p.add_argument("--dtype", default="bfloat16", help="ACTIVATION_DTYPE")
  p.add_argument("--steps", type=int, default=2, help="traced steps (after 2 warm-up steps)")
  p.add_argument("--json", default=None, help="write the results here")
  args = p.parse_args(argv)
  benchlib.reexec_with_cpu_malloc()

  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np

  from palmflow.trainer import optimizers, train_lib
  from palmflow.trainer.partitioning import Partitioner

  model, schedule = benchlib.gin_model(
      args.model, ["DROPOUT_RATE = 0.0", f"ACTIVATION_DTYPE = '{args.dtype}'"])
  B, L = args.batch, args.length
  batch = benchlib.random_batch(np.random.default_rng(0), model.config.vocab_size, B, L)
  partitioner = Partitioner(num_partitions=1, devices=jax.devices()[:1])  # one device
  variables, abstract = partitioner.sharded_init(
      functools.partial(model.init, batch_size=1, length=L), jax.random.PRNGKey(0))
  params = variables["params"]
  tx = optimizers.with_param_axes(model.optimizer, nn.get_partition_spec(abstract["params"]))
  opt_state = train_lib.place_on_mesh(jax.jit(tx.init)(params), partitioner.mesh)
  step_fn = train_lib.make_train_step(model, tx, num_microbatches=1, dropout_seed=0,
                                      learning_rate_fn=schedule)
  batch = partitioner.shard_batch(batch)
  with partitioner.activate():
    compiled = jax.jit(step_fn, donate_argnums=(0, 1)).lower(
        params, opt_state, batch, jnp.asarray(0)).compile()
  index = HloIndex(compiled.as_text())

  def run(n: int, start: int) -> None:
    nonlocal params, opt_state
    for s in range(start, start + n):
      params, opt_state, metrics = compiled(params, opt_state, batch, jnp.asarray(s))
      jax.block_until_ready(metrics)

  run(2, 0)
  peak_a = jnp.ones((2048, 2048), args.dtype)
  peak_fn = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32))
  jax.block_until_ready(peak_fn(peak_a))

  def peak() -> float:
    best = float("inf")
    for _ in range(5):
      t = time.perf_counter()
      jax.block_until_ready(peak_fn(peak_a))
      best = min(best, time.perf_counter() - t)
    return 2 * 2048 ** 3 / best
  peak_before = peak()
  with tempfile.TemporaryDirectory() as trace_dir:
    t0 = time.perf_counter()
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    run(args.steps, 2)
    jax.profiler.stop_trace()
    wall = (time.perf_counter() - t0) / args.steps
    traces = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not traces:
      raise SystemExit(f"profile_step: jax.profiler wrote no Perfetto trace under {trace_dir}")
    with gzip.open(traces[0]) as f:
      events = json.load(f)["traceEvents"]
  peak_after = peak()
  result = attribute(events, index, args.steps)
  result.update(model=args.model, batch=B, length=L, dtype=args.dtype, steps=args.steps,
                traced_wall_ms_per_step=1e3 * wall,
                peak_gflops=[peak_before / 1e9, peak_after / 1e9])

  print(f"palm_{args.model}, batch {B} x {L}, {args.dtype}: {args.steps} traced steps, "
        f"{result['traced_wall_ms_per_step']:.0f} ms per step (with tracing); thunks busy "
        f"{result['busy_ms']:.0f} ms, two or more at once for "
        f"{result['two_or_more_at_once_ms']:.0f} ms")
  print(f"peak ({args.dtype} 2048^3 product, same process): {peak_before / 1e9:.0f} GFLOP/s "
        f"before, {peak_after / 1e9:.0f} after")
  print("part | products (ms/step) | products GFLOP/s | other work (ms/step)")
  print("---|---|---|---")
  for part, row in sorted(result["parts"].items(), key=lambda kv: -sum(
      v for k, v in kv[1].items() if k.endswith("_ms"))):
    rate = row["product_gflop"] / (row["products_ms"] / 1e3) if row["products_ms"] else 0.0
    print(f"{part} | {row['products_ms']:.1f} | {rate:.0f} | {row['other_ms']:.1f}")
  print("costliest thunks (ms/step, part):")
  for name, ms, part in result["top_thunks"]:
    print(f"  {ms:7.2f}  {name}  ({part})")
  if args.json:
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Decoding with a key/value cache against re-running the model on the whole buffer.

`DecoderOnlyModel.predict_batch` decodes with a cache (a prefill of the prefixes, then one
token per example per step); ``use_cache=False`` re-runs the model on the whole buffer every
step (how palmflow decoded before). In one process, on a gin model with random parameters
and random prefixes (prefix LM, as fine-tuning and eval batches are), this times both,
jitted, alternating in rounds, for greedy decoding and for beam search, reports the share
of tokens on which they agree, and prints each one's median and best time and the round-by-round
median ratio uncached / cached (the speed-up).

    .venv/bin/python bench/bench_decode.py --model small --batch 4 --length 256 \
        --decode_length 32 --rounds 3
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import benchlib


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="small", help="gin/models/palm_<model>.gin")
  p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--length", type=int, default=256, help="the decoding buffer")
  p.add_argument("--decode_length", type=int, default=32, help="tokens decoded per example")
  p.add_argument("--beams", type=int, default=4, help="beam search's beams (0: greedy only)")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--json", default=None, help="write the results here")
  args = p.parse_args(argv)
  benchlib.reexec_with_cpu_malloc()

  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np

  model, _ = benchlib.gin_model(
      args.model, ["DROPOUT_RATE = 0.0", f"ACTIVATION_DTYPE = '{args.dtype}'"])
  params = jax.jit(lambda k: nn.unbox(model.module.init(
      k, jnp.zeros((1, 16), jnp.int32)))["params"])(jax.random.PRNGKey(0))
  n_params = sum(x.size for x in jax.tree.leaves(params))
  rng = np.random.default_rng(0)
  b, length = args.batch, args.length
  # Prefixes of different lengths, leaving room for the decoded tokens.
  plen = rng.integers(length // 4, length - args.decode_length, b)
  tokens = rng.integers(2, model.config.vocab_size, (b, length)).astype(np.int32)
  batch = {"decoder_input_tokens": tokens, "decoder_target_tokens": tokens,
           "decoder_causal_attention": (np.arange(length)[None, :] < plen[:, None]
                                        ).astype(np.int32)}
  kinds = {"greedy": {}}
  if args.beams > 1:
    kinds[f"beam{args.beams}"] = {"num_beams": args.beams}
  fns = {}
  for kind, kw in kinds.items():
    for cached in (True, False):
      # eos_id -1: every example decodes all its tokens.
      fns[kind, cached] = jax.jit(lambda p, x, kw=kw, c=cached: model.predict_batch(
          p, x, max_decode_length=args.decode_length, eos_id=-1, use_cache=c, **kw))
  outs, compile_s = {}, {}
  for key, fn in fns.items():
    t = time.perf_counter()
    outs[key] = np.asarray(fn(params, batch))
    compile_s[key] = time.perf_counter() - t
  print(f"palm_{args.model} ({args.dtype}): {n_params / 1e6:.1f}M parameters, batch {b}, "
        f"buffer {length}, {args.decode_length} tokens decoded after prefixes of "
        f"{plen.min()}-{plen.max()}", flush=True)
  result = {"model": args.model, "dtype": args.dtype, "num_params": int(n_params),
            "batch": b, "length": length, "decode_length": args.decode_length,
            "rounds": args.rounds}
  for kind in kinds:
    same = float(np.mean(outs[kind, True] == outs[kind, False]))
    result[f"{kind}_same_tokens"] = same
    times = {True: [], False: []}
    for r in range(args.rounds):
      for cached in ((True, False) if r % 2 else (False, True)):
        t = time.perf_counter()
        jax.block_until_ready(fns[kind, cached](params, batch))
        times[cached].append(time.perf_counter() - t)
    for cached, ts in times.items():
      name = f"{kind}_{'cached' if cached else 'uncached'}"
      result[f"{name}_s_median"] = float(np.median(ts))
      result[f"{name}_s_best"] = float(min(ts))
      result[f"{name}_first_call_s"] = compile_s[kind, cached]
      print(f"{name:16s} median {np.median(ts):8.3f} s   best {min(ts):8.3f} s   "
            f"(first call, with compilation: {compile_s[kind, cached]:.1f} s)", flush=True)
    ratios = np.array(times[False]) / np.array(times[True])
    result[f"{kind}_speedup_paired_median"] = float(np.median(ratios))
    print(f"{kind}: uncached / cached, round by round: median {np.median(ratios):.2f}x "
          f"(range {ratios.min():.2f}-{ratios.max():.2f}); same tokens: {100 * same:.1f}%",
          flush=True)
  if args.json:
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())

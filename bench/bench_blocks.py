"""Benchmark: the Beam tokenize+block job against a plain Python loop doing the same work.

In one go, on the same ~20 MB corpus and the same SentencePiece model:
  loop    read the JSONL documents, encode them with sentencepiece (batched, one thread, as
          the job does), concatenate with EOS, cut into blocks of `--block_length` with segment
          ids and positions, serialize tf.Example (the job's functions for joining, cutting
          and serializing, so that the ratio is Beam's overhead), write a TFRecord file:
          the plain Python baseline that the ratios divide by;
  loop_mt the same loop with sentencepiece's default threads (all cores), for reference;
  beam1   `pipelines.blocks.run` on DirectRunner, `--direct_num_workers=1`;
  beam2   the same with `--direct_running_mode=multi_processing --direct_num_workers=2`
          (Beam starts two fresh worker processes for the job, and each imports Beam);
  beam2_pool  two workers in palmflow's warm worker pool (`pipelines/transforms/worker_pool.py`,
          how `palmflow run` runs multi_processing jobs): the pool is started once, before
          the timings, as the imports are for every variant; its start-up time is reported.
Each variant runs in a process of its own (imports and one warm-up run first, untimed), then
`--repeats` times, interleaved with the others. Ratios are Beam time / loop time (lower is
better; < 1 is faster than the loop): of the best times, and the median of the repeats'
ratios (repeat k of a variant against repeat k of the loop, run next to it), which the
shared machines' drift disturbs less.

The corpus is built from ../shared/data (tiny-shakespeare and Moby Dick paragraphs, SST-2
sentences, each its own document unless `--sst2_per_doc` groups them) and the running Python's
standard library source files, in that order, until `--target_mb` MB of text (going over
them again, ids marked `~2`, `~3`..., when they are shorter); the vocabulary
(8k unigram by default) is trained once on a sample of it. Both are cached in `--work_dir`.
Reported: wall seconds (best of the repeats), MB/s of text, time / loop, and the CPU seconds
of the best run (the variant's process, its finished children and the pool's processes),
which other load disturbs less.

    .venv/bin/python bench/bench_blocks.py --repeats 3 --results bench/results_data.md
    .venv/bin/python bench/bench_blocks.py --repeats 3 --sst2_per_doc 100 --append \
        --results bench/results_data.md
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT / ".." / "shared" / "data"
EOS_ID, PAD_ID = 1, 0
VARIANTS = "loop,loop_mt,beam1,beam2,beam2_pool"


# ----------------------------------------------------------------------------- corpus, vocab

def _paragraphs(text: str):
  para: list[str] = []
  for line in text.splitlines():
    if line.strip():
      para.append(line)
    elif para:
      yield "\n".join(para)
      para = []
  if para:
    yield "\n".join(para)


def iter_documents(data: Path, sst2_per_doc: int = 1):
  """(id, text) of the benchmark corpus, in a fixed order (`sst2_per_doc` SST-2 sentences
  a document, one per line)."""
  from pipelines.transforms.ingest import strip_gutenberg_lines
  text = (data / "tiny_shakespeare" / "input.txt").read_text(encoding="utf-8")
  for i, p in enumerate(_paragraphs(text)):
    yield f"shakespeare:input.txt:{i}", p
  lines = (data / "gutenberg_moby_dick" / "2701-0.txt").read_text(
      encoding="utf-8-sig").splitlines()
  lo, hi = strip_gutenberg_lines(lines) or (0, len(lines))
  for i, p in enumerate(_paragraphs("\n".join(lines[lo:hi]))):
    yield f"moby_dick:2701-0.txt:{i}", p
  with open(data / "glue_sst2" / "train.tsv", encoding="utf-8") as f:
    next(f)
    sentences = [line.split("\t")[0].strip() for line in f]
  for i in range(0, len(sentences), sst2_per_doc):
    yield f"sst2:train.tsv:{i}", "\n".join(sentences[i:i + sst2_per_doc])
  stdlib = Path(sysconfig.get_paths()["stdlib"])
  for path in sorted(stdlib.rglob("*.py")):
    rel = path.relative_to(stdlib).as_posix()
    if rel.startswith(("site-packages/", "dist-packages/")):
      continue
    try:
      yield f"stdlib:{rel}:0", path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
      continue


def build_corpus(data: Path, out_dir: Path, target_bytes: int, num_files: int,
                 sst2_per_doc: int = 1) -> dict:
  """Writes `documents.jsonl-NNNNN-of-NNNNN` until `target_bytes` of text; returns info."""
  out_dir.mkdir(parents=True, exist_ok=True)
  docs = []
  total = 0
  passes = 0
  while total < target_bytes:  # the sources once, and again (ids marked ~2, ~3...) if short
    passes += 1
    for doc_id, text in iter_documents(data, sst2_per_doc):
      if not text.strip():
        continue
      docs.append({"id": doc_id if passes == 1 else f"{doc_id}~{passes}",
                   "source": doc_id.partition(":")[0], "text": text})
      total += len(text.encode("utf-8"))
      if total >= target_bytes:
        break
  for k in range(num_files):  # document i goes to file i % num_files: balanced, mixed
    with open(out_dir / f"documents.jsonl-{k:05d}-of-{num_files:05d}", "w",
              encoding="utf-8") as f:
      for d in docs[k::num_files]:
        f.write(json.dumps(d, ensure_ascii=False) + "\n")
  sources: dict = {}
  for d in docs:
    sources[d["source"]] = sources.get(d["source"], 0) + 1
  info = {"documents": len(docs), "text_bytes": total, "sources": sources,
          "files": num_files, "passes_over_sources": passes}
  (out_dir / "info.json").write_text(json.dumps(info, indent=2))
  return info


def train_vocab(data: Path, path: Path, target_bytes: int, vocab_size: int,
                max_lines: int) -> None:
  """A unigram model on every k-th non-blank line of the corpus text (whatever its grouping
  into documents)."""
  from palmflow.stages.vocab import VocabSettings, train_sentencepiece
  lines, total = [], 0
  for _, text in iter_documents(data):
    if not text.strip():
      continue
    lines.extend(s[:4096] for s in text.splitlines() if s.strip())
    total += len(text.encode("utf-8"))
    if total >= target_bytes:
      break
  step = max(1, len(lines) // max_lines)
  model = train_sentencepiece(lines[::step], VocabSettings(
      vocab_size=vocab_size, model_type="unigram", num_threads=os.cpu_count() or 1))
  path.write_bytes(model)


# ----------------------------------------------------------------------------- the plain loop

def plain_loop(doc_files: list[str], vocab: str, out_path: str, block_length: int,
               batch_size: int = 256, num_threads: int = 1) -> dict:
  """The same work as the Beam job, as one plain Python loop; returns its counts.

  It encodes with the same sentencepiece calls as the job (`batch_size` documents a call,
  `num_threads` threads; -1: sentencepiece's default, all cores), and joins documents, cuts
  blocks and serializes them with the job's own functions (`join_documents`,
  `block_features`, `serialize_block`), so the difference is Beam's.
  """
  import numpy as np
  import sentencepiece as spm
  import tensorflow as tf
  from pipelines.blocks import block_features, join_documents, serialize_block
  sp = spm.SentencePieceProcessor(model_file=vocab)
  L = block_length
  counts = {"documents": 0, "tokens": 0, "blocks": 0, "non_pad_tokens": 0}
  carry_tok = np.zeros(0, np.int64)   # tokens not yet in a block, and their document numbers
  carry_doc = np.zeros(0, np.int64)
  next_doc = 0

  with tf.io.TFRecordWriter(out_path) as writer:
    def emit(tok, doc):
      writer.write(serialize_block(*block_features(tok, doc, L)))
      counts["blocks"] += 1
      counts["non_pad_tokens"] += len(tok)

    def flush(texts):
      nonlocal carry_tok, carry_doc, next_doc
      ids = [x for x in sp.encode(texts, num_threads=num_threads) if x]
      counts["documents"] += len(texts)
      if not ids:
        return
      tok, doc = join_documents(ids, next_doc)
      next_doc += len(ids)
      counts["tokens"] += len(tok)
      tok, doc = np.concatenate([carry_tok, tok]), np.concatenate([carry_doc, doc])
      full = len(tok) // L
      for b in range(full):
        emit(tok[b * L:(b + 1) * L], doc[b * L:(b + 1) * L])
      carry_tok, carry_doc = tok[full * L:], doc[full * L:]

    batch: list[str] = []
    for name in doc_files:
      with open(name, encoding="utf-8") as f:
        for line in f:
          batch.append(json.loads(line)["text"])
          if len(batch) >= batch_size:
            flush(batch)
            batch = []
    if batch:
      flush(batch)
    if len(carry_tok):
      emit(carry_tok, carry_doc)
  return counts


# ----------------------------------------------------------------------------- runs

def _cpu_seconds(pool=None) -> float:
  """CPU time of this process, of its finished children (multi_processing workers) and of
  the worker pool's running processes (from /proc, on Linux)."""
  import resource
  own = resource.getrusage(resource.RUSAGE_SELF)
  kids = resource.getrusage(resource.RUSAGE_CHILDREN)
  total = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
  for proc in (pool._procs if pool is not None else ()):
    try:
      fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
      total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
      pass
  return total


def run_beam(docs_glob: str, vocab: str, out_dir: str, block_length: int, workers: int,
             num_buckets: int, num_shards: int, pool=None) -> dict:
  from pipelines import blocks
  argv = [f"--documents={docs_glob}", f"--vocab={vocab}", f"--output_dir={out_dir}",
          f"--block_length={block_length}", f"--num_buckets={num_buckets}",
          f"--num_shards={num_shards}", "--runner=DirectRunner",
          f"--direct_num_workers={workers}"]
  if pool is not None:
    argv += pool.beam_args()
  elif workers > 1:
    argv.append("--direct_running_mode=multi_processing")
  return blocks.run(argv)


def run_variant(v: str, args, docs_glob: str, doc_files: list[str], vocab: str, work: Path,
                pool=None) -> dict:
  """One run of variant `v`; returns the job's (or the loop's) counts."""
  out = work / "out" / f"{v}-{os.getpid()}"
  shutil.rmtree(out, ignore_errors=True)
  out.mkdir(parents=True)
  if v in ("loop", "loop_mt"):
    return plain_loop(doc_files, vocab, str(out / "blocks.tfrecord"), args.block_length,
                      num_threads=1 if v == "loop" else -1)
  return run_beam(docs_glob, vocab, str(out), args.block_length,
                  workers=int(v[len("beam"):].split("_")[0]), num_buckets=args.num_buckets,
                  num_shards=args.num_shards, pool=pool if v.endswith("_pool") else None)


_REPLY = "@@bench "  # how a variant process's replies start (other output passes through)


def serve_variant(v: str, args, docs_glob: str, doc_files: list[str], vocab: str,
                  work: Path) -> int:
  """A variant's own process: imports, starts the pool (`_pool` variants), runs once to warm
  up, then runs once for each line on stdin, replying with seconds, CPU seconds, counts."""
  import apache_beam  # noqa: F401  (imports outside the timings, for every variant alike)
  import sentencepiece  # noqa: F401
  import tensorflow  # noqa: F401
  pool, ready = None, {}
  if v.endswith("_pool"):
    from pipelines.transforms.worker_pool import LocalWorkerPool
    t = time.perf_counter()
    pool = LocalWorkerPool(2).start()
    ready["pool_start"] = time.perf_counter() - t
  try:
    run_variant(v, args, docs_glob, doc_files, vocab, work, pool)  # warm-up
    print(_REPLY + json.dumps(ready), flush=True)
    for _ in sys.stdin:
      t, cpu = time.perf_counter(), _cpu_seconds(pool)
      res = run_variant(v, args, docs_glob, doc_files, vocab, work, pool)
      dt, dcpu = time.perf_counter() - t, _cpu_seconds(pool) - cpu
      print(_REPLY + json.dumps([dt, dcpu, res]), flush=True)
  finally:
    if pool is not None:
      pool.close()
  return 0


class VariantProcess:
  """A variant run in a process of its own, so that no variant runs in a heap or among
  threads another variant left behind (a Beam job timed in the process that had just run
  the loop, or the loop after a Beam job, was up to 10% slower). `run` times one run."""

  def __init__(self, v: str, args):
    self.v = v
    self._cmd = [sys.executable, str(Path(__file__).resolve()), *args.argv,
                 "--serve_variant", v]

  def start(self) -> dict:
    import subprocess
    self._proc = subprocess.Popen(self._cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, cwd=ROOT)
    return self._reply()

  def _reply(self):
    for line in self._proc.stdout:
      if line.startswith(_REPLY):
        return json.loads(line[len(_REPLY):])
      sys.stdout.write(line)
    raise RuntimeError(f"the {self.v} process stopped (exit status {self._proc.wait()})")

  def run(self) -> tuple[float, float, dict]:
    self._proc.stdin.write("run\n")
    self._proc.stdin.flush()
    dt, dcpu, res = self._reply()
    return dt, dcpu, res

  def close(self) -> None:
    if getattr(self, "_proc", None) and self._proc.poll() is None:
      self._proc.stdin.close()
      self._proc.wait(timeout=60)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--work_dir", default=os.path.join(tempfile.gettempdir(),
                                                         "palmflow_bench_blocks"),
                      help="cache of the corpus and vocabulary, and the runs' outputs")
  parser.add_argument("--data_dir", default=str(DATA), help="the shared datasets")
  parser.add_argument("--target_mb", type=float, default=20.0, help="corpus text size (1e6 B)")
  parser.add_argument("--sst2_per_doc", type=int, default=1,
                      help="SST-2 sentences per document (1: each sentence is a document; "
                           "larger: fewer, longer documents, less per-document overhead)")
  parser.add_argument("--vocab_size", type=int, default=8000)
  parser.add_argument("--vocab_lines", type=int, default=200_000,
                      help="lines in the vocabulary training sample")
  parser.add_argument("--block_length", type=int, default=2048)
  parser.add_argument("--num_buckets", type=int, default=8)
  parser.add_argument("--num_shards", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--variants", default=VARIANTS)
  parser.add_argument("--results", default="", help="write a Markdown results table here")
  parser.add_argument("--append", action="store_true", help="append to --results")
  parser.add_argument("--serve_variant", default="", help=argparse.SUPPRESS)
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parser.parse_args(argv)
  args.argv = argv
  data = Path(args.data_dir)
  if not data.exists():
    print(f"shared data not found at {data.resolve()}", file=sys.stderr)
    return 2

  work = Path(args.work_dir)
  key = hashlib.sha256(f"{args.target_mb}:{args.sst2_per_doc}:v2".encode()).hexdigest()[:10]
  corpus = work / f"corpus-{key}"
  if not (corpus / "info.json").exists():
    t = time.perf_counter()
    shutil.rmtree(corpus, ignore_errors=True)
    build_corpus(data, corpus, int(args.target_mb * 1e6), num_files=4,
                 sst2_per_doc=args.sst2_per_doc)
    print(f"built corpus in {time.perf_counter() - t:.1f}s", flush=True)
  info = json.loads((corpus / "info.json").read_text())
  vocab = work / f"spm-unigram-{args.vocab_size}-{args.target_mb}.model"
  if not vocab.exists():
    t = time.perf_counter()
    train_vocab(data, vocab, int(args.target_mb * 1e6), args.vocab_size, args.vocab_lines)
    print(f"trained vocabulary in {time.perf_counter() - t:.1f}s", flush=True)
  docs_glob = str(corpus / "documents.jsonl-*")
  doc_files = sorted(glob.glob(docs_glob))
  mb = info["text_bytes"] / 1e6
  if args.serve_variant:
    return serve_variant(args.serve_variant, args, docs_glob, doc_files, str(vocab), work)
  print(f"corpus: {info['documents']} documents, {mb:.1f} MB of text {info['sources']}",
        flush=True)

  variants = [v for v in args.variants.split(",") if v]
  runners = {v: VariantProcess(v, args) for v in variants}
  times: dict[str, list[float]] = {v: [] for v in variants}
  cpu_times: dict[str, list[float]] = {v: [] for v in variants}
  results: dict[str, dict] = {}
  pool_start = None
  try:
    for v, runner in runners.items():  # imports and a first run, outside the timings
      ready = runner.start()
      pool_start = ready.get("pool_start", pool_start)
      print(f"{v}: ready (imports and a warm-up run done)", flush=True)
    for r in range(args.repeats):
      for v, runner in runners.items():
        dt, dcpu, res = runner.run()
        times[v].append(dt)
        cpu_times[v].append(dcpu)
        results[v] = res
        print(f"repeat {r + 1} {v:7s} {dt:7.2f}s  {mb / dt:6.2f} MB/s  cpu {dcpu:6.2f}s",
              flush=True)
  finally:
    for runner in runners.values():
      runner.close()

  best = {v: min(ts) for v, ts in times.items()}
  loop = best.get("loop")
  summary = {
      "corpus_mb": round(mb, 2), "documents": info["documents"],
      "block_length": args.block_length, "vocab_size": args.vocab_size,
      "best_seconds": {v: round(t, 2) for v, t in best.items()},
      "all_seconds": {v: [round(t, 2) for t in ts] for v, ts in times.items()},
      "mb_per_s": {v: round(mb / t, 2) for v, t in best.items()},
      "cpu_seconds_of_best": {v: round(cpu_times[v][times[v].index(t)], 2)
                              for v, t in best.items()},
      "ratio_to_loop": ({v: round(t / loop, 3) for v, t in best.items() if v != "loop"}
                        if loop else {}),
      "median_ratio_to_loop": ({v: round(statistics.median(
          a / b for a, b in zip(ts, times["loop"])), 3) for v, ts in times.items()
          if v != "loop"} if loop else {}),
      "cpus": os.cpu_count(), "load_avg": [round(x, 2) for x in os.getloadavg()],
  }
  if pool_start is not None:
    summary["pool_start_seconds"] = round(pool_start, 2)
  for v in variants:
    res = results[v]
    if "packing_efficiency" in res:
      summary.setdefault("packing_efficiency", {})[v] = res["packing_efficiency"]
    summary.setdefault("blocks", {})[v] = res["blocks"]
    summary.setdefault("non_pad_tokens", {})[v] = res["non_pad_tokens"]
  if len(set(summary["non_pad_tokens"].values())) > 1:
    print(f"WARNING: the variants disagree on the tokens: {summary['non_pad_tokens']}",
          file=sys.stderr)
  print(json.dumps(summary, indent=2))
  if args.results:
    write_results(Path(args.results), summary, info, args)
  return 0


def write_results(path: Path, s: dict, info: dict, args) -> None:
  extra = f" --target_mb {args.target_mb:g}" if args.target_mb != 20.0 else ""
  extra += f" --sst2_per_doc {args.sst2_per_doc}" if args.sst2_per_doc != 1 else ""
  extra += f" --variants {args.variants}" if args.variants != VARIANTS else ""
  extra += " --append" if args.append else ""
  cmd = ("`.venv/bin/python bench/bench_blocks.py --repeats "
         f"{args.repeats}{extra} --results {args.results}`")
  lines = [
      "## Tokenize + block: Beam job vs plain Python loop"
      + (f" ({args.sst2_per_doc} SST-2 sentences a document)" if args.sst2_per_doc != 1
         else "") + (f", {s['corpus_mb']:.0f} MB" if args.target_mb != 20.0 else ""), "",
      f"Command: {cmd} (from the repository root; needs ../shared/data).", "",
      f"Corpus: {s['corpus_mb']} MB of text, {s['documents']} documents "
      f"({', '.join(f'{k} {v}' for k, v in info['sources'].items())}); SentencePiece "
      f"unigram {s['vocab_size']}; blocks of {s['block_length']} tokens. Machine: "
      f"{s['cpus']} cores ({platform.processor() or platform.machine()}), shared with other "
      f"jobs (load average at the end {s['load_avg']}); {args.repeats} interleaved runs "
      "each, every variant in its own process after a warm-up run.", "",
      "| variant | seconds (best) | all runs | MB/s | time / loop (best) "
      "| time / loop (median of repeats) | CPU seconds (best run) |",
      "|---|---|---|---|---|---|---|"]
  names = {"loop": "plain Python loop (sentencepiece on 1 thread, as the job)",
           "loop_mt": "plain Python loop, sentencepiece on all cores (num_threads=-1)",
           "beam1": "Beam DirectRunner, 1 worker",
           "beam2": "Beam DirectRunner, 2 workers (multi_processing: fresh processes)",
           "beam2_pool": "Beam DirectRunner, 2 workers in the warm worker pool"}
  for v, t in s["best_seconds"].items():
    ratio = "1" if v == "loop" else f"{s['ratio_to_loop'].get(v, float('nan')):.2f}×"
    median = ("1" if v == "loop"
              else f"{s['median_ratio_to_loop'].get(v, float('nan')):.2f}×")
    lines.append(f"| {names.get(v, v)} | {t:.2f} | {', '.join(map(str, s['all_seconds'][v]))}"
                 f" | {s['mb_per_s'][v]:.2f} | {ratio} | {median} "
                 f"| {s['cpu_seconds_of_best'][v]:.2f} |")
  if "pool_start_seconds" in s:
    lines += ["", f"The worker pool started once, before the timings, in "
              f"{s['pool_start_seconds']:.2f} s (its processes import Beam and the job's "
              "modules then; a `palmflow run` pays this once for all its Beam stages)."]
  if s.get("packing_efficiency"):
    eff = ", ".join(f"{v} {100 * e:.4f}%" for v, e in s["packing_efficiency"].items())
    lines += ["", f"Packing efficiency (non-pad / all tokens, from the job's stats.json): "
              f"{eff}; blocks: {s['blocks']}; non-pad tokens: {s['non_pad_tokens']}."]
  text = "\n".join(lines) + "\n"
  if args.append and path.exists():
    text = path.read_text() + "\n" + text
  path.write_text(text)


if __name__ == "__main__":
  sys.exit(main())

"""Evaluation and inference on a model trained to memorize a tiny mapping: greedy decoding
returns the right strings, top-k sampling with k=1 is greedy, ranking picks the label with
the highest log-likelihood (checked against scoring by hand), and `palmflow infer` writes
t5x's layout."""
from __future__ import annotations

import json
from pathlib import Path

import gin
import numpy as np
import pytest

from palmflow.trainer import checkpoints as ckpt_lib
from tiny_text_task import PAIRS, make_task, model_flags, run_binary

TASK = "pf_evalinfer_map"
STEPS = 30


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(task.json, checkpoint path) of a tiny model that memorized PAIRS."""
  root = tmp_path_factory.mktemp("evalinfer")
  task_json = make_task(root / "data", TASK)
  model_dir = root / "model"
  rc = run_binary("train", [
      "--gin_file=runs/test_pretrain.gin", *model_flags(task_json, TASK),
      f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={STEPS}",
      "--gin.FEATURE_CONVERTER='prefix_lm'", f"--gin.CHECKPOINT_PERIOD={STEPS // 2}",
      "--gin.LR_FACTORS='constant'", "--gin.BASE_LEARNING_RATE=0.05"])
  assert rc == 0
  return task_json, ckpt_lib.step_dir(model_dir, STEPS)


def _run_eval(trained, out: Path, *extra: str) -> int:
  task_json, ckpt = trained
  return run_binary("eval", ["--gin_file=runs/test_eval.gin", *model_flags(task_json, TASK),
                             f"--gin.CHECKPOINT_PATH='{ckpt}'", f"--gin.EVAL_OUTPUT_DIR='{out}'",
                             *extra])


def _eval(trained, out: Path, *extra: str) -> tuple[list[dict], dict]:
  assert _run_eval(trained, out, *extra) == 0
  rows = [json.loads(l) for l in (out / f"{TASK}-{STEPS:06}.jsonl").read_text().splitlines()]
  metrics = json.loads((out / f"{TASK}-metrics.jsonl").read_text().splitlines()[-1])
  return rows, metrics


def test_greedy_eval_writes_the_decoded_strings(trained, tmp_path):
  rows, metrics = _eval(trained, tmp_path)
  assert [(r["input"]["inputs_pretokenized"], r["prediction"], r["target"]) for r in rows] == \
      [(a, b, b) for a, b in PAIRS]
  assert metrics["step"] == STEPS and metrics["accuracy"] == 100.0


def test_checkpoint_mode_all_evaluates_each_checkpoint_and_latest_the_newest(trained, tmp_path,
                                                                              capsys):
  task_json, ckpt = trained
  model_dir = ckpt.parent
  common = ["--gin_file=runs/test_eval.gin", *model_flags(task_json, TASK),
            f"--gin.CHECKPOINT_PATH='{model_dir}'"]
  assert run_binary("eval", common + [f"--gin.EVAL_OUTPUT_DIR='{tmp_path / 'all'}'",
                                      "--gin.CHECKPOINT_MODE='all'"]) == 0
  lines = (tmp_path / "all" / f"{TASK}-metrics.jsonl").read_text().splitlines()
  metrics = [json.loads(l) for l in lines]
  assert [m["step"] for m in metrics] == [STEPS // 2, STEPS]
  assert metrics[-1]["accuracy"] == 100.0
  assert sorted(p.name for p in (tmp_path / "all").glob(f"{TASK}-*[0-9].jsonl")) == sorted(
      [f"{TASK}-{STEPS // 2:06}.jsonl", f"{TASK}-{STEPS:06}.jsonl"])
  assert run_binary("eval", common + [f"--gin.EVAL_OUTPUT_DIR='{tmp_path / 'latest'}'",
                                      "--gin.CHECKPOINT_MODE='latest'"]) == 0
  lines = (tmp_path / "latest" / f"{TASK}-metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["step"] for l in lines] == [STEPS]
  # Evaluating a step again in the same directory replaces its metrics line.
  assert run_binary("eval", common + [f"--gin.EVAL_OUTPUT_DIR='{tmp_path / 'all'}'",
                                      "--gin.CHECKPOINT_MODE='latest'"]) == 0
  lines = (tmp_path / "all" / f"{TASK}-metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["step"] for l in lines] == [STEPS // 2, STEPS]
  capsys.readouterr()
  assert _run_eval(trained, tmp_path / "one", "--gin.CHECKPOINT_MODE='all'") == 2
  assert "CHECKPOINT_MODE 'all' evaluates every checkpoint under a directory" in (
      capsys.readouterr().err)


def test_eval_on_a_split_the_task_lacks_fails_naming_its_splits(trained, tmp_path, capsys):
  """seqio skips a task without the split (or without metrics) with an info log; the run
  used to end with exit 0 and no metrics, and a pipeline's eval stage would cache that."""
  rc = _run_eval(trained, tmp_path, "--gin.EVAL_SPLIT='valdation'")
  err = capsys.readouterr().err
  assert rc == 2, err
  assert (f"field 'EVAL_SPLIT': nothing to evaluate in '{TASK}' on split 'valdation'" in err
          and f"{TASK}: splits ['train', 'validation']" in err), err
  assert not list(tmp_path.glob("*.jsonl"))


def test_eval_and_infer_measure_the_feature_lengths_when_none_are_given(trained, tmp_path,
                                                                       caplog):
  """TASK_FEATURE_LENGTHS = None, eval.gin's and infer.gin's default (t5x's eval computes
  them): each feature's longest example in the split, nothing cut; USE_CACHED_TASKS reaches
  seqio (this task has no cache: seqio preprocesses it on the fly)."""
  import logging
  import seqio
  task_json, ckpt = trained
  flags = [f for f in model_flags(task_json, TASK) if "TASK_FEATURE_LENGTHS" not in f]
  caplog.set_level(logging.INFO)
  assert run_binary("eval", ["--gin_file=runs/test_eval.gin", *flags, "--gin.USE_CACHED_TASKS=True",
                             f"--gin.CHECKPOINT_PATH='{ckpt}'",
                             f"--gin.EVAL_OUTPUT_DIR='{tmp_path / 'eval'}'"]) == 0
  rows = [json.loads(l) for l in
          (tmp_path / "eval" / f"{TASK}-{STEPS:06}.jsonl").read_text().splitlines()]
  assert [(r["input"]["inputs_pretokenized"], r["prediction"]) for r in rows] == PAIRS
  vocab = seqio.get_mixture_or_task(TASK).output_features["targets"].vocabulary
  want = {"inputs": max(len(vocab.encode(a)) for a, _ in PAIRS) + 1,   # + EOS
          "targets": max(len(vocab.encode(b)) for _, b in PAIRS) + 1}
  assert f"longest examples: {want}" in caplog.text
  assert f"Task '{TASK}' does not support caching" in caplog.text
  caplog.clear()
  assert run_binary("infer", ["--gin_file=runs/test_infer.gin", *flags,
                              "--gin.USE_CACHED_TASKS=True", f"--gin.CHECKPOINT_PATH='{ckpt}'",
                              f"--gin.INFER_OUTPUT_DIR='{tmp_path / 'infer'}'"]) == 0
  predicted = [json.loads(l) for l in (tmp_path / "infer" / f"{TASK}-predict.jsonl-00000-of-"
                                       "00001").read_text().splitlines()]
  assert [(r["inputs"]["inputs_pretokenized"], r["prediction"]) for r in predicted] == PAIRS
  assert f"longest examples: {want}" in caplog.text
  assert f"Task '{TASK}' does not support caching" in caplog.text
  assert run_binary("infer", ["--gin_file=runs/test_infer.gin", *flags,
                              "--gin.INFER_SPLIT='valdation'", f"--gin.CHECKPOINT_PATH='{ckpt}'",
                              f"--gin.INFER_OUTPUT_DIR='{tmp_path / 'none'}'"]) == 2


def test_ranking_with_measured_lengths_leaves_room_for_the_longest_label(tmp_path):
  """TASK_FEATURE_LENGTHS = None in rank mode: the targets' room is the longest label
  option's too, not only the longest target read (with EVALUATOR_NUM_EXAMPLES = 1, the
  first example's): a longer option was cut and its log-likelihood inflated."""
  import seqio
  from palmflow.trainer import data, eval_lib, lm, models, partitioning
  pairs = [("red fruit", "fig"), ("blue sky", "a very long label indeed")]
  name = "pf_rank_room"
  data.register_task_specs([str(make_task(tmp_path / "data", name, pairs=pairs))])
  try:
    vocab = seqio.get_mixture_or_task(name).output_features["targets"].vocabulary
    model = lm.DecoderOnlyModel(config=models.PaLMConfig(
        vocab_size=64, num_layers=1, d_model=32, num_heads=2, head_dim=16, d_ff=64))
    evaluator = eval_lib.InferenceEvaluator(
        model=model, partitioner=partitioning.Partitioner(num_partitions=1),
        mixture_or_task_name=name, task_feature_lengths=None, output_dir=str(tmp_path),
        mode="rank", num_examples=1, batch_size=8)
    read = len(vocab.encode("fig")) + 1
    room = len(vocab.encode(pairs[1][1])) + 1
    assert read < room and evaluator.task_feature_lengths["targets"] == room
    assert evaluator.task_feature_lengths["inputs"] == len(vocab.encode("red fruit")) + 1
  finally:
    seqio.TaskRegistry.remove(name)


def test_lm_decoding_with_measured_lengths_leaves_room_after_the_longest_example(
    trained, tmp_path, caplog):
  """TASK_FEATURE_LENGTHS = None with the LM converter, decoding: an example is the prompt
  that decoding continues in the same buffer, so the buffer is the longest example plus the
  decode steps (default: as many again); it was the longest example alone, which then had no
  room to decode. Ranking and scoring decode nothing and get no room."""
  import logging
  import seqio
  import tensorflow as tf
  from palmflow.trainer import eval_lib, lm, models, partitioning
  task_json, ckpt = trained
  vocab = seqio.SentencePieceVocabulary(str(task_json.parent / "spm.model"))
  texts = [f"{a} {b}" for a, b in PAIRS]
  name = "pf_lm_room"
  seqio.TaskRegistry.add(
      name, source=seqio.FunctionDataSource(
          lambda split, shuffle_files, seed=None: tf.data.Dataset.from_tensor_slices(
              {"targets": texts}), splits=["validation"]),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
      output_features={"targets": seqio.Feature(vocab)},
      metric_fns=[lambda targets, predictions: {"n": len(predictions)}])
  try:
    model = lm.DecoderOnlyModel(config=models.PaLMConfig(
        vocab_size=64, num_layers=1, d_model=32, num_heads=2, head_dim=16, d_ff=64))
    longest = max(len(vocab.encode(t)) for t in texts) + 1  # + EOS

    def evaluator(**kw):
      return eval_lib.InferenceEvaluator(
          model=model, partitioner=partitioning.Partitioner(num_partitions=1),
          mixture_or_task_name=name, task_feature_lengths=None, output_dir=str(tmp_path),
          feature_converter="lm", batch_size=8, **kw)
    e = evaluator()
    assert e.task_feature_lengths == {"targets": 2 * longest}
    assert e._fns_args["max_decode_length"] == longest
    e = evaluator(max_decode_length=3)
    assert e.task_feature_lengths == {"targets": longest + 3}
    assert e._fns_args["max_decode_length"] == 3
    caplog.set_level(logging.INFO)
    flags = [f for f in model_flags(task_json, TASK) if "TASK_FEATURE_LENGTHS" not in f]
    for mode, lengths in (("predict", 2 * longest), ("score", longest)):
      caplog.clear()
      assert run_binary("infer", ["--gin_file=runs/test_infer.gin", *flags,
                                  f"--gin.MIXTURE_OR_TASK_NAME='{name}'",
                                  "--gin.FEATURE_CONVERTER='lm'", f"--gin.INFER_MODE='{mode}'",
                                  f"--gin.CHECKPOINT_PATH='{ckpt}'",
                                  f"--gin.INFER_OUTPUT_DIR='{tmp_path / 'infer'}'"]) == 0
      rows = (tmp_path / "infer" / f"{name}-{mode}.jsonl-00000-of-00001").read_text()
      assert len(rows.splitlines()) == len(texts)
      assert (f"room to decode {longest} tokens after each example: {{'targets': {lengths}}}"
              in caplog.text) == (mode == "predict"), caplog.text
  finally:
    seqio.TaskRegistry.remove(name)


def test_eval_with_an_lm_converter_on_a_task_with_inputs_is_refused(trained, tmp_path, capsys):
  """The LM converter drops a text-to-text task's inputs: decoding would start after the
  target, and the metrics would mean nothing."""
  rc = _run_eval(trained, tmp_path, "--gin.FEATURE_CONVERTER='lm'")
  err = capsys.readouterr().err
  assert rc == 2, err
  assert f"FEATURE_CONVERTER='lm' reads only 'targets', but {TASK} has 'inputs'" in err, err


@pytest.fixture(scope="module")
def tiny_model(trained):
  """(model, vocabulary, restored numpy parameters) of the trained checkpoint."""
  import seqio
  from palmflow.trainer import gin_utils, lm
  gin.clear_config()
  try:
    gin_utils.parse(["precision/float32.gin", "models/palm_tiny.gin"],
                    ["VOCAB_SIZE = 64", "DROPOUT_RATE = 0.0"])
    model = gin.get_configurable(lm.DecoderOnlyModel)()
  finally:
    gin.clear_config()
  spec = json.loads(Path(trained[0]).read_text())
  return model, seqio.SentencePieceVocabulary(spec["vocab_path"]), ckpt_lib.load_params(trained[1])


def _score_by_hand(model, params, vocab, inputs: str, target: str, length: int = 20) -> float:
  """log P(target + EOS | inputs + EOS) from the model's logits, one token at a time."""
  import jax
  inp, tgt = list(vocab.encode(inputs)) + [1], list(vocab.encode(target)) + [1]
  seq = inp + tgt
  decoder_inputs = np.zeros((1, length), np.int32)   # causal: padding after changes nothing
  decoder_inputs[0, 1:len(seq)] = seq[:-1]
  prefix = np.zeros_like(decoder_inputs)
  prefix[0, :len(inp) + 1] = 1
  logits = _apply(model)(params, decoder_inputs, prefix)
  logp = np.asarray(jax.nn.log_softmax(np.asarray(logits[0], np.float32), -1))
  return float(sum(logp[len(inp) + i, t] for i, t in enumerate(tgt)))


_APPLY = {}


def _apply(model):
  import jax
  if id(model) not in _APPLY:
    _APPLY[id(model)] = jax.jit(lambda p, x, m: model.module.apply(
        {"params": p}, x, causal_attention_mask=m))
  return _APPLY[id(model)]


def test_rank_picks_the_most_likely_label(trained, tiny_model, tmp_path):
  rows, metrics = _eval(trained, tmp_path, "--gin.INFERENCE_MODE='rank'")
  assert metrics["accuracy"] == 100.0
  model, vocab, params = tiny_model
  labels = sorted(b for _, b in PAIRS)
  for r in rows:
    given = r["input"]["inputs_pretokenized"]
    by_hand = {l: _score_by_hand(model, params, vocab, given, l) for l in labels}
    assert r["label_scores"].keys() == by_hand.keys()
    for l in labels:
      assert r["label_scores"][l] == pytest.approx(by_hand[l], abs=1e-3), (r, l)
    assert r["prediction"] == max(by_hand, key=by_hand.get) == r["target"]


def test_top_k_1_sampling_is_greedy(trained, tiny_model):
  import seqio
  from palmflow.trainer import data as data_lib, eval_lib, partitioning
  from tasks import specs
  task_json, ckpt = trained
  specs.register_from_file(str(task_json))
  model, vocab, _ = tiny_model
  partitioner = partitioning.Partitioner(
      num_partitions=1, logical_axis_rules=partitioning.logical_axis_rules("standard"))
  lengths = {"inputs": 12, "targets": 8}
  _, params = eval_lib.load_params(model, str(ckpt), partitioner, sum(lengths.values()))
  task_ds = seqio.get_mixture_or_task(TASK).get_dataset(lengths, split="validation",
                                                      shuffle=False)
  ds = data_lib.make_feature_converter("prefix_lm", pack=False)(task_ds, lengths).enumerate()

  def fns(**kw):
    return eval_lib.ModelFns(model=model, params=params, partitioner=partitioner,
                             batch_size=8, mode="predict", max_decode_length=8, **kw)

  def decode(f):
    return [vocab.decode(t.tolist()) for _, t in sorted(f.predict(ds), key=lambda x: x[0])]

  greedy = decode(fns())
  assert greedy == [b for _, b in PAIRS]
  assert decode(fns(temperature=1.0, top_k=1, seed=3)) == greedy
  # Hot sampling without a top-k cut is random, yet reproducible for a seed.
  hot = fns(temperature=5.0, top_k=0, seed=1)
  samples = decode(hot)
  assert samples == decode(hot) and samples != greedy


def test_infer_writes_t5x_layout(trained, tiny_model, tmp_path):
  task_json, ckpt = trained
  common = ["--gin_file=runs/test_infer.gin", *model_flags(task_json, TASK),
            f"--gin.CHECKPOINT_PATH='{ckpt}'", f"--gin.INFER_OUTPUT_DIR='{tmp_path}'"]
  assert run_binary("infer", common) == 0
  assert run_binary("infer", common + ["--gin.INFER_MODE='score'"]) == 0
  predicted = [json.loads(l) for l in
               (tmp_path / f"{TASK}-predict.jsonl-00000-of-00001").read_text().splitlines()]
  scored = [json.loads(l) for l in
            (tmp_path / f"{TASK}-score.jsonl-00000-of-00001").read_text().splitlines()]
  assert [(r["inputs"]["inputs_pretokenized"], r["prediction"]) for r in predicted] == PAIRS
  # t5x's "inputs": the example's texts (include_all_inputs adds its token ids)
  assert set(predicted[0]) == {"inputs", "prediction"}
  assert set(predicted[0]["inputs"]) == {"inputs_pretokenized", "targets_pretokenized"}
  everything = tmp_path / "all"
  assert run_binary("infer", common + [f"--gin.INFER_OUTPUT_DIR='{everything}'",
                                       "--gin_bindings=eval_lib.infer.include_all_inputs=True",
                                       "--gin.INFER_NUM_EXAMPLES=1"]) == 0
  row = json.loads((everything / f"{TASK}-predict.jsonl-00000-of-00001").read_text())
  assert {"inputs", "targets", "inputs_pretokenized"} <= set(row["inputs"])
  assert all(isinstance(t, int) for t in row["inputs"]["inputs"])
  model, vocab, params = tiny_model
  for (a, b), r in zip(PAIRS, scored):
    assert r["inputs"]["targets_pretokenized"] == b
    assert r["score"] == pytest.approx(_score_by_hand(model, params, vocab, a, b), abs=1e-3)
  result = json.loads((tmp_path / "infer_result.json").read_text())
  assert result["step"] == STEPS and result["examples"] == {TASK: len(PAIRS)}
  # predict_with_aux: t5x's {"aux": {"scores"}}, the log-likelihood of each prediction
  # (here the memorized target, so the score by hand of the target).
  assert run_binary("infer", common + ["--gin.INFER_MODE='predict_with_aux'"]) == 0
  with_aux = [json.loads(l) for l in (tmp_path / f"{TASK}-predict_with_aux.jsonl-00000-of-"
                                      "00001").read_text().splitlines()]
  for (a, b), r in zip(PAIRS, with_aux, strict=True):
    assert r["prediction"] == b and set(r["aux"]) == {"scores"}
    assert r["aux"]["scores"] == pytest.approx(_score_by_hand(model, params, vocab, a, b),
                                               abs=1e-3)
  assert (tmp_path / "config.gin").exists()
  # Beam search finds the memorized answers too; it does not sample.
  beam_dir = tmp_path / "beam"
  assert run_binary("infer", common + ["--gin.DECODE_NUM_BEAMS=4",
                                       f"--gin.INFER_OUTPUT_DIR='{beam_dir}'"]) == 0
  beamed = [json.loads(l) for l in
            (beam_dir / f"{TASK}-predict.jsonl-00000-of-00001").read_text().splitlines()]
  assert [(r["inputs"]["inputs_pretokenized"], r["prediction"]) for r in beamed] == PAIRS
  assert run_binary("infer", common + ["--gin.DECODE_NUM_BEAMS=4",
                                       "--gin.DECODE_TEMPERATURE=1.0"]) == 2


def test_lm_decoding_continues_after_the_last_token(tiny_model):
  """Without a prefix mask (LM batches) decoding is causal and starts after the last target."""
  import jax
  model, vocab, params = tiny_model
  length, steps = 20, 4
  rows = [list(vocab.encode(a)) + [1] + list(vocab.encode(b))[:1] for a, b in PAIRS]
  targets = np.zeros((8, length), np.int32)
  for i, r in enumerate(rows):
    targets[i, :len(r)] = r
  inputs = np.concatenate([np.zeros((8, 1), np.int32), targets[:, :-1]], 1)
  got = np.asarray(jax.jit(lambda p, b: model.predict_batch(p, b, max_decode_length=steps))(
      params, {"decoder_input_tokens": inputs, "decoder_target_tokens": targets}))
  for i, r in enumerate(rows):
    seq, want = list(r), []
    for _ in range(steps):
      x = np.zeros((1, length), np.int32)
      x[0, 1:len(seq) + 1] = seq
      nxt = int(np.argmax(np.asarray(_apply(model)(params, x, None))[0, len(seq)]))
      want.append(nxt)
      if nxt == 1:
        break
      seq.append(nxt)
    assert got[i, :len(want)].tolist() == want and not got[i, len(want):].any(), (got[i], want)

"""Orbax checkpoints: keep-N, what counts as finished, corrupt-checkpoint fallback, shape and
vocabulary checks when fine-tuning (on small sharded trees; no training here)."""
from __future__ import annotations

import glob
import logging
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from palmflow.errors import ConfigError
from palmflow.trainer import checkpoints as ckpt_lib


@pytest.fixture(scope="module")
def mesh():
  devices = np.array(jax.devices("cpu")[:8])
  return jax.sharding.Mesh(devices.reshape(len(devices) // 2, 2), ("data", "model"))


def _state(mesh, value: float = 0.0, vocab: int = 16):
  P = jax.sharding.PartitionSpec
  put = lambda x, spec: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
  params = {"embedding": put(jnp.full((vocab, 8), value), P("model", None)),
            "layers": {"mlp": {"wi": put(jnp.arange(32.0).reshape(4, 8) + value, P()),
                               "wo": put(jnp.ones((8, 4)) * value, P(None, "model"))}}}
  opt_state = {"count": put(jnp.asarray(int(value), jnp.int32), P()),
               "v": jax.tree.map(jnp.zeros_like, params)}
  return params, opt_state


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      tree)


def _save_steps(directory: Path, mesh, steps, *, keep=None, meta=None):
  ck = ckpt_lib.Checkpointer(directory, ckpt_lib.SaveCheckpointConfig(keep=keep))
  for s in steps:
    params, opt = _state(mesh, float(s))
    ck.save(s, params, opt, {"step": s, "data_batches_consumed": s, **(meta or {})})
  ck.close()


def _truncate_arrays(step_dir: Path, item: str = "params") -> None:
  files = glob.glob(str(step_dir / item / "**" / "d" / "*"), recursive=True)
  assert files
  for f in files:
    with open(f, "r+b") as fh:
      fh.truncate(5)


def test_keep_n_and_the_data_position_in_meta(tmp_path, mesh):
  _save_steps(tmp_path, mesh, [2, 4, 6, 8], keep=2)
  assert ckpt_lib.finished_steps(tmp_path) == [6, 8]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_6", "checkpoint_8"]
  assert ckpt_lib.read_meta(tmp_path / "checkpoint_8")["data_batches_consumed"] == 8
  params, opt = _state(mesh)
  ck = ckpt_lib.Checkpointer(tmp_path, ckpt_lib.SaveCheckpointConfig(keep=2))
  step, got, got_opt, meta = ck.restore_latest(_abstract(params), _abstract(opt))
  assert step == 8 and meta["step"] == 8 and int(got_opt["count"]) == 8
  np.testing.assert_array_equal(np.asarray(got["layers"]["mlp"]["wi"]),
                                np.arange(32.0).reshape(4, 8) + 8)
  assert got["embedding"].sharding == params["embedding"].sharding
  ck.close()


def test_half_written_checkpoints_are_never_restored(tmp_path, mesh, caplog):
  _save_steps(tmp_path, mesh, [1, 2])
  # What a kill leaves: orbax's temporary directory, or (on object stores) no commit marker.
  shutil.copytree(tmp_path / "checkpoint_2", tmp_path / "checkpoint_3.orbax-checkpoint-tmp-7")
  shutil.copytree(tmp_path / "checkpoint_2", tmp_path / "checkpoint_4")
  (tmp_path / "checkpoint_4" / ckpt_lib.COMMIT_MARKER).unlink()
  assert ckpt_lib.finished_steps(tmp_path) == [1, 2]
  assert not ckpt_lib.is_finished(tmp_path / "checkpoint_4")
  params, opt = _state(mesh)
  with caplog.at_level(logging.WARNING, logger="palmflow"):
    ck = ckpt_lib.Checkpointer(tmp_path, ckpt_lib.SaveCheckpointConfig())
    step, *_ = ck.restore_latest(_abstract(params), _abstract(opt))
  assert step == 2
  assert "checkpoint_4: its save did not finish" in caplog.text
  # Fine-tuning from the directory takes the newest finished one; naming the unfinished
  # one is an error that says so.
  cfg = ckpt_lib.RestoreCheckpointConfig(path=str(tmp_path), mode="latest")
  assert ckpt_lib.restore_initial(cfg, _abstract(params), None)[0] == 2
  with pytest.raises(ConfigError, match="checkpoint_4 is not finished"):
    ckpt_lib.restore_initial(ckpt_lib.RestoreCheckpointConfig(path=str(tmp_path / "checkpoint_4")),
                             _abstract(params), None)
  # The run saves step 4 again: the unfinished directory is replaced.
  ck.save(4, params, opt, {"step": 4})
  assert ckpt_lib.finished_steps(tmp_path) == [1, 2, 4]
  # orbax removes temporary directories of killed runs (in the background; done by a save).
  assert not (tmp_path / "checkpoint_3.orbax-checkpoint-tmp-7").exists()
  ck.close()


@pytest.mark.parametrize("spoil", ["params", "meta"])
def test_corrupt_latest_falls_back_to_the_previous_one(tmp_path, mesh, caplog, spoil):
  _save_steps(tmp_path, mesh, [10, 20, 30])
  if spoil == "params":
    _truncate_arrays(tmp_path / "checkpoint_30")
  else:
    for f in (tmp_path / "checkpoint_30" / "meta").iterdir():
      f.write_text("{not json")
  params, opt = _state(mesh)
  ck = ckpt_lib.Checkpointer(tmp_path, ckpt_lib.SaveCheckpointConfig())
  with caplog.at_level(logging.WARNING, logger="palmflow"):
    step, got, _, meta = ck.restore_latest(_abstract(params), _abstract(opt))
  assert step == 20 and meta["step"] == 20
  assert float(np.asarray(got["layers"]["mlp"]["wo"])[0, 0]) == 20.0
  assert (f"checkpoint {tmp_path / 'checkpoint_30'} is corrupt or unreadable" in caplog.text
          and f"falling back to {tmp_path / 'checkpoint_20'}" in caplog.text), caplog.text
  # The other array reads of the failed restore are not reported again by asyncio (with a
  # traceback, at exit); asyncio's other reports still are.
  quiet = logging.getLogger("asyncio").filters
  assert any(isinstance(f, ckpt_lib._UnretrievedRestoreReads) for f in quiet)
  record = lambda msg: logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, None, None)
  unretrieved = "Task exception was never retrieved\nfuture: <Task coro=<async_deserialize()>>"
  assert not all(f.filter(record(unretrieved)) for f in quiet)
  assert all(f.filter(record("Task exception was never retrieved\nfuture: <Task coro=<x()>>"))
             for f in quiet)
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="palmflow"):
    ck.save(30, params, opt, {"step": 30})
  assert "replacing the unusable checkpoint" in caplog.text
  assert ck.restore_latest(_abstract(params), _abstract(opt))[0] == 30
  ck.close()


def test_every_checkpoint_corrupt_starts_over(tmp_path, mesh, caplog):
  _save_steps(tmp_path, mesh, [5])
  _truncate_arrays(tmp_path / "checkpoint_5")
  params, opt = _state(mesh)
  ck = ckpt_lib.Checkpointer(tmp_path, ckpt_lib.SaveCheckpointConfig())
  with caplog.at_level(logging.WARNING, logger="palmflow"):
    assert ck.restore_latest(_abstract(params), _abstract(opt)) is None
  assert "no earlier checkpoint: starting over" in caplog.text
  ck.close()


def test_fine_tuning_with_other_shapes_names_the_parameter(tmp_path, mesh):
  _save_steps(tmp_path, mesh, [3])
  path = str(tmp_path / "checkpoint_3")
  cfg = ckpt_lib.RestoreCheckpointConfig(path=path)
  # orbax's item metadata gives the saved shapes without reading the arrays.
  manager = ckpt_lib._manager(tmp_path, read_only=True)
  try:
    saved = ckpt_lib._metadata_tree(manager.item_metadata(3)["params"])
  finally:
    manager.close()  # close what the test opens, as the library does
  assert tuple(saved["embedding"].shape) == (16, 8)

  params, _ = _state(mesh, vocab=32)
  with pytest.raises(ConfigError) as e:
    ckpt_lib.restore_initial(cfg, _abstract(params), None)
  msg = str(e.value)
  assert "parameter embedding has shape (16, 8) in the checkpoint but (32, 8)" in msg
  assert "vocabulary size differs" in msg and path in msg

  params, _ = _state(mesh)
  extra = dict(params, layers={"mlp": dict(params["layers"]["mlp"],
                                           wi_gate=params["layers"]["mlp"]["wi"])})
  with pytest.raises(ConfigError, match="parameter layers/mlp/wi_gate of the model is not"):
    ckpt_lib.restore_initial(cfg, _abstract(extra), None)
  fewer = {"embedding": params["embedding"],
           "layers": {"mlp": {"wi": params["layers"]["mlp"]["wi"]}}}
  with pytest.raises(ConfigError, match="checkpoint parameter layers/mlp/wo is not in the model"):
    ckpt_lib.restore_initial(cfg, _abstract(fewer), None)


def test_fine_tuning_with_another_vocabulary_names_the_embedding(tmp_path, mesh):
  _save_steps(tmp_path, mesh, [3], meta={"vocab_sha256": "a" * 64})
  params, opt = _state(mesh)
  cfg = ckpt_lib.RestoreCheckpointConfig(path=str(tmp_path / "checkpoint_3"))
  with pytest.raises(ConfigError, match=r"parameter embedding was trained with vocabulary "
                                        r"aaaaaaaaaaaa but this run's task uses vocabulary bbbb"):
    ckpt_lib.restore_initial(cfg, _abstract(params), None, vocab_digest="b" * 64)
  step, got, got_opt = ckpt_lib.restore_initial(cfg, _abstract(params), _abstract(opt),
                                                vocab_digest="a" * 64)
  assert step == 3 and got_opt is None  # parameters only, unless asked
  cfg = ckpt_lib.RestoreCheckpointConfig(path=cfg.path, restore_optimizer_state=True)
  assert int(ckpt_lib.restore_initial(cfg, _abstract(params), _abstract(opt))[2]["count"]) == 3
  # An optimizer state of other shapes (another optimizer's, or an older Adafactor's) is
  # named before anything is read.
  opt["v"]["layers"]["mlp"]["wi"] = jnp.zeros((4,))
  with pytest.raises(ConfigError, match=r"restore_optimizer_state.*arrays of other shapes: "
                                        r"\(4, 8\) in the checkpoint, \(4,\) in this run"):
    ckpt_lib.restore_initial(cfg, _abstract(params), _abstract(opt))


def test_vocabulary_digest_tells_vocabularies_apart(tmp_path):
  import seqio
  from tiny_text_task import make_vocab
  a = make_vocab(tmp_path / "a.model", ["red fruit apple"] * 20 + ["blue sky ocean"] * 20)
  b = make_vocab(tmp_path / "b.model", ["green leaf tree"] * 20 + ["yellow fruit banana"] * 20)
  da = ckpt_lib.vocabulary_digest(seqio.SentencePieceVocabulary(str(a)))
  assert da == ckpt_lib.vocabulary_digest(seqio.SentencePieceVocabulary(str(a)))
  assert da != ckpt_lib.vocabulary_digest(seqio.SentencePieceVocabulary(str(b)))
  assert ckpt_lib.vocabulary_digest(seqio.PassThroughVocabulary(10)) is None


def test_missing_initial_checkpoint(tmp_path, mesh):
  params, _ = _state(mesh)
  cfg = ckpt_lib.RestoreCheckpointConfig(path=str(tmp_path / "nowhere" / "checkpoint_5"))
  with pytest.raises(ConfigError, match="initial checkpoint not found"):
    ckpt_lib.restore_initial(cfg, _abstract(params), None)
  cfg = ckpt_lib.RestoreCheckpointConfig(path=cfg.path, fallback_to_scratch=True)
  assert ckpt_lib.restore_initial(cfg, _abstract(params), None) is None


def test_bfloat16_checkpoints_restore_into_float32(tmp_path, mesh):
  params, opt = _state(mesh, 1.5)
  ck = ckpt_lib.Checkpointer(tmp_path, ckpt_lib.SaveCheckpointConfig(dtype="bfloat16"))
  ck.save(1, params, opt, {"step": 1})
  ck.close()
  assert ckpt_lib.load_params(tmp_path / "checkpoint_1")["embedding"].dtype == jnp.bfloat16
  step, got, _ = ckpt_lib.restore_initial(
      ckpt_lib.RestoreCheckpointConfig(path=str(tmp_path / "checkpoint_1")), _abstract(params),
      None)
  assert got["embedding"].dtype == jnp.float32 and float(got["embedding"][0, 0]) == 1.5


def test_assignment_map_renames_and_leaves_parameters_to_their_initialization(tmp_path, mesh,
                                                                               caplog):
  _save_steps(tmp_path, mesh, [3])
  path = str(tmp_path / "checkpoint_3")
  saved, _ = _state(mesh, 3.0)
  init, _ = _state(mesh, -1.0)
  # The model calls the MLP "ffn", and its embedding is trained from scratch.
  model = {"embedding": init["embedding"], "layers": {"ffn": init["layers"]["mlp"]}}
  cfg = ckpt_lib.RestoreCheckpointConfig(path=path, strict=False, assignment_map=[
      (r"layers/ffn/(.*)", r"layers/mlp/\1"), ("embedding", None)])
  caplog.set_level(logging.INFO, logger=ckpt_lib.log.name)
  step, got, _ = ckpt_lib.restore_initial(cfg, _abstract(model), None, init_params=model)
  assert step == 3
  for k in ("wi", "wo"):
    np.testing.assert_array_equal(got["layers"]["ffn"][k], saved["layers"]["mlp"][k])
    assert got["layers"]["ffn"][k].sharding == model["layers"]["ffn"][k].sharding
  np.testing.assert_array_equal(got["embedding"], init["embedding"])
  assert "keep their initialization: embedding" in caplog.text
  # strict: the same (the checkpoint's embedding was left out on purpose, so it counts as
  # used), but a rule that matches nothing (a typo) is an error, and a parameter the
  # checkpoint does not have after renaming is named.
  strict = ckpt_lib.RestoreCheckpointConfig(path=path, assignment_map=cfg.assignment_map)
  _, got, _ = ckpt_lib.restore_initial(strict, _abstract(model), None, init_params=model)
  np.testing.assert_array_equal(got["layers"]["ffn"]["wo"], saved["layers"]["mlp"]["wo"])
  typo = ckpt_lib.RestoreCheckpointConfig(path=path, assignment_map=[
      (r"layers/fnn/(.*)", r"layers/mlp/\1"), ("embedding", None)])
  with pytest.raises(ConfigError, match="assignment_map rule 'layers/fnn/\\(.\\*\\)' matches "
                                        "no parameter of the model"):
    ckpt_lib.restore_initial(typo, _abstract(model), None, init_params=model)
  with pytest.raises(ConfigError, match="parameter layers/ffn/wi of the model is not in the "
                                        "checkpoint \\(after assignment_map\\)"):
    ckpt_lib.restore_initial(
        ckpt_lib.RestoreCheckpointConfig(path=path, assignment_map=[("embedding", None)]),
        _abstract(model), None, init_params=model)
  # A renamed parameter whose shape differs names both names.
  wrong = ckpt_lib.RestoreCheckpointConfig(path=path, strict=False, assignment_map=[
      ("layers/ffn/wi", "layers/mlp/wo"), ("layers/ffn/wo", "layers/mlp/wi")])
  with pytest.raises(ConfigError, match=r"parameter layers/ffn/wi \(from checkpoint parameter "
                                        r"layers/mlp/wo\) has shape \(8, 4\) in the checkpoint "
                                        r"but \(4, 8\)"):
    ckpt_lib.restore_initial(wrong, _abstract(model), None, init_params=model)


def test_two_parameters_restored_from_one_get_buffers_of_their_own(tmp_path, mesh):
  """The train step donates its parameters: two leaves sharing one buffer could not both be
  donated (XLA refuses to donate a buffer twice)."""
  _save_steps(tmp_path, mesh, [3])
  saved, _ = _state(mesh, 3.0)
  init, _ = _state(mesh, -1.0)
  wi = init["layers"]["mlp"]["wi"]
  model = {"embedding": init["embedding"], "layers": {"mlp": {"wi": wi, "wi_copy": wi,
                                                              "wo": init["layers"]["mlp"]["wo"]}}}
  cfg = ckpt_lib.RestoreCheckpointConfig(path=str(tmp_path / "checkpoint_3"), assignment_map=[
      ("layers/mlp/wi_copy", "layers/mlp/wi")])
  _, got, _ = ckpt_lib.restore_initial(cfg, _abstract(model), None, init_params=model)
  mlp = got["layers"]["mlp"]
  np.testing.assert_array_equal(mlp["wi_copy"], saved["layers"]["mlp"]["wi"])
  np.testing.assert_array_equal(mlp["wi"], saved["layers"]["mlp"]["wi"])
  step = jax.jit(lambda p: jax.tree.map(lambda x: x + 1.0, p), donate_argnums=0)
  out = step(got)  # raised "Attempt to donate the same buffer twice" when they shared one
  np.testing.assert_array_equal(out["layers"]["mlp"]["wi_copy"],
                                saved["layers"]["mlp"]["wi"] + 1.0)


def test_a_partial_restore_keeps_what_the_checkpoint_lacks_and_skips_what_it_has_more(
    tmp_path, mesh, caplog):
  _save_steps(tmp_path, mesh, [3])
  saved, _ = _state(mesh, 3.0)
  init, _ = _state(mesh, -1.0)
  model = {"embedding": init["embedding"],
           "layers": {"mlp": {"wi": init["layers"]["mlp"]["wi"],
                              "wi_gate": init["layers"]["mlp"]["wi"]}}}
  cfg = ckpt_lib.RestoreCheckpointConfig(path=str(tmp_path / "checkpoint_3"), strict=False,
                                         dtype="bfloat16")
  _, got, _ = ckpt_lib.restore_initial(cfg, _abstract(model), None, init_params=model)
  assert got["embedding"].dtype == jnp.bfloat16       # RestoreCheckpointConfig.dtype
  np.testing.assert_array_equal(got["embedding"].astype(jnp.float32), saved["embedding"])
  np.testing.assert_array_equal(got["layers"]["mlp"]["wi"].astype(jnp.float32),
                                saved["layers"]["mlp"]["wi"])
  np.testing.assert_array_equal(got["layers"]["mlp"]["wi_gate"].astype(jnp.float32),
                                init["layers"]["mlp"]["wi"])
  assert "1 model parameters are not in" in caplog.text and "wi_gate" in caplog.text
  assert "are not restored (the model does not use them): layers/mlp/wo" in caplog.text


def test_config_validation():
  with pytest.raises(ConfigError, match="CHECKPOINTS_TO_KEEP"):
    ckpt_lib.SaveCheckpointConfig(keep=0)
  with pytest.raises(ConfigError, match="CHECKPOINT_PERIOD"):
    ckpt_lib.SaveCheckpointConfig(period=0)
  with pytest.raises(ConfigError, match="mode"):
    ckpt_lib.RestoreCheckpointConfig(path="x", mode="all")
  with pytest.raises(ConfigError, match="checkpoint_steps"):
    ckpt_lib.SaveCheckpointConfig(checkpoint_steps=[0, 5])
  with pytest.raises(ConfigError, match="checkpoint_steps"):
    ckpt_lib.SaveCheckpointConfig(checkpoint_steps="5")
  assert ckpt_lib.SaveCheckpointConfig(checkpoint_steps=5).checkpoint_steps == (5,)
  cfg = ckpt_lib.SaveCheckpointConfig(period=10, checkpoint_steps=[7, 3])
  assert [s for s in range(1, 26) if cfg.saves_at(s, 25)] == [3, 7, 10, 20, 25]
  with pytest.raises(ConfigError, match="assignment_map.*pair"):
    ckpt_lib.RestoreCheckpointConfig(path="x", assignment_map=["layers/.*"])
  with pytest.raises(ConfigError, match="does not compile"):
    ckpt_lib.RestoreCheckpointConfig(path="x", assignment_map=[("layers/(", None)])
  with pytest.raises(ConfigError, match="restore_optimizer_state"):
    ckpt_lib.RestoreCheckpointConfig(path="x", restore_optimizer_state=True, strict=False)
  with pytest.raises(ConfigError, match="dtype"):
    ckpt_lib.RestoreCheckpointConfig(path="x", dtype="int8")


def test_a_checkpoint_of_another_configuration_stops_the_resume_and_is_kept(tmp_path, mesh):
  """Resuming with another optimizer state (here one more array, as float16's loss scaling
  or momentum would add) or other parameter shapes is a config error: falling back or
  starting over would retrain from scratch in MODEL_DIR and then replace its checkpoints."""
  _save_steps(tmp_path, mesh, [10, 20])
  params, opt = _state(mesh)
  opt["loss_scale"] = opt["count"]
  ck = ckpt_lib.Checkpointer(tmp_path, ckpt_lib.SaveCheckpointConfig())
  with pytest.raises(ConfigError, match=r"checkpoint_20, field 'MODEL_DIR': cannot resume: the "
                                        r"optimizer state has 4 arrays in the checkpoint but 5"):
    ck.restore_latest(_abstract(params), _abstract(opt))
  # As many arrays, other shapes (Adafactor's moments factored over other axes): named.
  params, opt = _state(mesh)
  opt["v"]["layers"]["mlp"]["wi"] = jnp.zeros((4,))
  with pytest.raises(ConfigError, match=r"optimizer state has arrays of other shapes: \(4, 8\) "
                                        r"in the checkpoint, \(4,\) in this run"):
    ck.restore_latest(_abstract(params), _abstract(opt))
  params, opt = _state(mesh, vocab=32)
  with pytest.raises(ConfigError, match="cannot resume: parameter embedding has shape "
                                        r"\(16, 8\) in the checkpoint but \(32, 8\)"):
    ck.restore_latest(_abstract(params), _abstract(opt))
  ck.close()
  assert ckpt_lib.finished_steps(tmp_path) == [10, 20]

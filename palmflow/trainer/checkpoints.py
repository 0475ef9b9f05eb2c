"""Orbax checkpoints in t5x's layout: `MODEL_DIR/checkpoint_<step>/{params,opt_state,meta}`.

`params` and `opt_state` are separate items, so fine-tuning can restore parameters alone
(a different optimizer needs no arcane settings); `meta` records the step, the data position
(`data_batches_consumed`), the task and its vocabulary's digest.

What counts as a checkpoint: a directory named exactly `checkpoint_<step>` holding orbax's
`commit_success.txt` (written just before the atomic rename that finishes a save). Orbax's
temporary directories (`checkpoint_<step>.orbax-checkpoint-tmp-*`) and directories without
the marker are never restored. A checkpoint that fails to restore (corrupt, truncated) is
skipped with a warning in favour of the previous one, and replaced when the run saves that
step again.

    python -c "from palmflow.trainer import checkpoints as c; print(c.describe('/run/checkpoint_400'))"
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from palmflow.errors import ConfigError

log = logging.getLogger("palmflow.checkpoints")
PREFIX = "checkpoint"
COMMIT_MARKER = "commit_success.txt"
ITEMS = ("params", "opt_state", "meta")


@dataclasses.dataclass(frozen=True)
class SaveCheckpointConfig:
  """When and how to save (t5x names).

  Attributes:
    period: save every this many steps (and always at the end).
    keep: keep the newest N checkpoints (None keeps all).
    dtype: "float32" or "bfloat16" for saved parameters.
    save_dataset: t5x's flag, accepted for its gin files; the data position (batches
      consumed, in `meta`) is always saved, so resuming never repeats or skips data.
  """

  period: int = 1000
  keep: int | None = None
  dtype: str = "float32"
  save_dataset: bool = True

  def __post_init__(self):
    if self.period < 1:
      raise ConfigError(f"period must be >= 1, not {self.period}",
                        field="SaveCheckpointConfig.period (CHECKPOINT_PERIOD)")
    if self.keep is not None and self.keep < 1:
      raise ConfigError(f"keep must be None or >= 1, not {self.keep}",
                        field="SaveCheckpointConfig.keep (CHECKPOINTS_TO_KEEP)")
    if self.dtype not in ("float32", "bfloat16"):
      raise ConfigError(f"dtype must be float32 or bfloat16, not {self.dtype!r}",
                        field="SaveCheckpointConfig.dtype")


@dataclasses.dataclass(frozen=True)
class RestoreCheckpointConfig:
  """What to restore when MODEL_DIR has no checkpoint yet.

  Attributes:
    path: a `checkpoint_<step>` directory (INITIAL_CHECKPOINT_PATH), or None.
    mode: "specific" (that checkpoint) or "latest" (newest under `path`).
    restore_optimizer_state: also restore optimizer state (needs the same optimizer).
    strict: check the checkpoint's parameter names and shapes against the model before
      restoring, so that a mismatch is an error naming the parameter. False skips the check
      (orbax's restore then fails on any difference, with its own message); a partial
      restore (ignoring extra checkpoint parameters) is not supported.
    fallback_to_scratch: start from scratch if `path` has no checkpoint.
  """

  path: str | None = None
  mode: str = "specific"
  restore_optimizer_state: bool = False
  strict: bool = True
  fallback_to_scratch: bool = False

  def __post_init__(self):
    if self.mode not in ("specific", "latest"):
      raise ConfigError(f"mode must be 'specific' or 'latest', not {self.mode!r}",
                        field="RestoreCheckpointConfig.mode")


def _handlers() -> dict:
  # Registering the handlers lets `item_metadata` describe the items (shapes, dtypes)
  # without restoring them; without them orbax 0.12 returns None for every item.
  return {"params": ocp.StandardCheckpointHandler(),
          "opt_state": ocp.StandardCheckpointHandler(),
          "meta": ocp.JsonCheckpointHandler()}


def _manager(directory: Path, *, keep: int | None = None, read_only: bool = False):
  return ocp.CheckpointManager(
      Path(directory).resolve(),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=keep, step_prefix=PREFIX, create=not read_only, read_only=read_only,
          enable_async_checkpointing=False,
          # A killed run leaves `checkpoint_<step>.orbax-checkpoint-tmp-*`: removed on resume.
          cleanup_tmp_directories=not read_only),
      item_handlers=_handlers())


def step_dir(directory: str | Path, step: int) -> Path:
  return Path(directory) / f"{PREFIX}_{step}"


def is_finished(path: str | Path) -> bool:
  """True for a `checkpoint_<step>` directory whose save completed (orbax's commit marker)."""
  p = Path(path)
  _, step = split_checkpoint_path(p)
  return step is not None and p.is_dir() and (p / COMMIT_MARKER).exists()


def finished_steps(directory: str | Path) -> list[int]:
  """Steps of the finished checkpoints under `directory`, oldest first (no orbax needed)."""
  d = Path(directory)
  if not d.is_dir():
    return []
  out = []
  for p in d.iterdir():
    _, step = split_checkpoint_path(p)
    if step is not None and is_finished(p):
      out.append(step)
  return sorted(out)


def _flat(tree) -> dict[str, Any]:
  """{'layers/mlp/wi': leaf} (the names model-info.txt uses)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                   for k in path): leaf for path, leaf in flat}


def _metadata_tree(meta) -> Any:
  """The tree of ArrayMetadata inside an orbax item metadata (0.12: TreeMetadata.tree)."""
  return getattr(meta, "tree", meta)


class Checkpointer:
  """Saves and restores train states under MODEL_DIR (keep-N, corrupt-checkpoint fallback)."""

  def __init__(self, model_dir: str | Path, cfg: SaveCheckpointConfig):
    self.dir = Path(model_dir)
    self.cfg = cfg
    self._mngr = _manager(self.dir, keep=cfg.keep)

  def steps(self) -> list[int]:
    """Finished checkpoints, oldest first."""
    return [s for s in sorted(self._mngr.all_steps()) if is_finished(step_dir(self.dir, s))]

  def save(self, step: int, params, opt_state, meta: dict) -> None:
    """Saves (synchronously) `checkpoint_<step>`; replaces an unusable one of that step."""
    if step in self._mngr.all_steps():
      # Only a checkpoint that could not be restored (corrupt, unfinished) can be here: a
      # run resumes after its latest usable checkpoint and never saves a step twice.
      log.warning("replacing the unusable checkpoint %s", step_dir(self.dir, step))
      self._mngr.delete(step)
    if self.cfg.dtype == "bfloat16":
      import jax.numpy as jnp
      params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    self._mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
        meta=ocp.args.JsonSave(meta)), force=True)
    self._mngr.wait_until_finished()

  def _check_fits(self, step: int, abstract_params, abstract_opt_state) -> None:
    """Raises ConfigError if checkpoint `step`'s saved tree does not fit this run's state.

    A checkpoint of another configuration (model shapes, an optimizer with other state,
    float16's loss-scale state) is no corrupt checkpoint: falling back to an older one, or
    starting over, would train from scratch in this MODEL_DIR and then replace the user's
    checkpoints. Unreadable metadata is left to the restore (and its fallback).
    """
    try:
      meta = self._mngr.item_metadata(step)
      saved_params, saved_opt = meta["params"], meta["opt_state"]
    except Exception:  # noqa: BLE001 - unreadable metadata: the restore decides (fallback)
      return
    if saved_params is None or saved_opt is None:
      return
    path = str(step_dir(self.dir, step))
    hint = ("MODEL_DIR holds a run of another configuration: use a new MODEL_DIR, or the "
            "configuration it was trained with (its config.gin)")
    mismatch = _shape_mismatch(saved_params, abstract_params)
    if mismatch is not None:
      raise ConfigError(f"cannot resume: {mismatch[0]}", path=path, field="MODEL_DIR",
                        hint=hint)
    shapes = lambda tree: sorted(tuple(x.shape) for x in jax.tree.leaves(_metadata_tree(tree)))
    got, want = shapes(saved_opt), shapes(abstract_opt_state)
    if got != want:
      raise ConfigError(
          f"cannot resume: the optimizer state has {len(got)} arrays in the checkpoint but "
          f"{len(want)} in this run (another optimizer, optimizer settings or precision "
          "policy, e.g. float16's loss scaling)", path=path, field="MODEL_DIR", hint=hint)

  def restore_latest(self, abstract_params, abstract_opt_state):
    """(step, params, opt_state, meta) of the newest restorable checkpoint, or None.

    Unfinished directories are ignored; a checkpoint that fails to restore is skipped with
    a warning naming it and the one used instead.

    Raises:
      ConfigError: the checkpoint to restore was saved by another configuration (its
        parameter shapes or optimizer state differ): nothing is restored, skipped or
        replaced.
    """
    unfinished = sorted(set(self._mngr.all_steps()) - set(self.steps()))
    for s in unfinished:
      log.warning("ignoring %s: its save did not finish (no %s)", step_dir(self.dir, s),
                  COMMIT_MARKER)
    candidates = list(reversed(self.steps()))
    for i, step in enumerate(candidates):
      self._check_fits(step, abstract_params, abstract_opt_state)
      try:
        out = self._mngr.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params),
            opt_state=ocp.args.StandardRestore(abstract_opt_state),
            meta=ocp.args.JsonRestore()))
        return step, out["params"], out["opt_state"], out["meta"]
      except Exception as e:  # noqa: BLE001 - any failure means this checkpoint is unusable
        nxt = (f"falling back to {step_dir(self.dir, candidates[i + 1])}"
               if i + 1 < len(candidates) else "no earlier checkpoint: starting over")
        log.warning("checkpoint %s is corrupt or unreadable (%s: %s); %s",
                    step_dir(self.dir, step), type(e).__name__,
                    (str(e).splitlines() or [""])[0][:200], nxt)
    return None

  def close(self):
    self._mngr.close()


def split_checkpoint_path(path: str | Path) -> tuple[Path, int | None]:
  """`.../checkpoint_1200` -> (`...`, 1200); a directory of checkpoints -> (dir, None)."""
  p = Path(path)
  if p.name.startswith(PREFIX + "_") and p.name[len(PREFIX) + 1:].isdigit():
    return p.parent, int(p.name[len(PREFIX) + 1:])
  return p, None


def _shape_mismatch(saved: Any, expected: Any) -> tuple[str, str] | None:
  """(message, hint) for the first parameter whose shape differs or is missing, else None."""
  other_architecture = ("the checkpoint is of another architecture (compare model-info.txt "
                        "of both runs)")
  flat_s, flat_e = _flat(_metadata_tree(saved)), _flat(expected)
  for name, e in flat_e.items():
    if name not in flat_s:
      return f"parameter {name} of the model is not in the checkpoint", other_architecture
    ss, es = tuple(flat_s[name].shape), tuple(e.shape)
    if ss != es:
      extra = (" (the vocabulary size differs: fine-tune with the pretraining vocabulary and "
               "VOCAB_SIZE)" if "embedding" in name or "logits" in name else "")
      return (f"parameter {name} has shape {ss} in the checkpoint but {es} in the "
              f"model{extra}", "use the model gin file (and overrides) the checkpoint was "
              "trained with; see its config.gin and model-info.txt")
  for name in flat_s:
    if name not in flat_e:
      return f"checkpoint parameter {name} is not in the model", other_architecture
  return None


def check_shapes(saved: Any, expected: Any, *, path: str) -> None:
  """Raises ConfigError naming the first parameter whose shape differs or is missing.

  Args:
    saved: the checkpoint's parameter tree (arrays, ShapeDtypeStructs or orbax metadata).
    expected: the model's parameter tree (anything with `.shape`).
    path: the checkpoint, for the message.
  """
  mismatch = _shape_mismatch(saved, expected)
  if mismatch is not None:
    message, hint = mismatch
    raise ConfigError(message, path=path, hint=hint)


def vocabulary_digest(vocabulary) -> str | None:
  """sha256 of a seqio SentencePiece vocabulary's model (None for other vocabularies)."""
  sp_model = getattr(vocabulary, "sp_model", None)
  if not sp_model:
    return None
  return hashlib.sha256(sp_model).hexdigest()


def _embedding_name(abstract_params) -> str:
  names = [n for n in _flat(abstract_params) if "embedding" in n]
  return names[0] if names else "embedding"


def restore_initial(cfg: RestoreCheckpointConfig, abstract_params, abstract_opt_state, *,
                    vocab_digest: str | None = None):
  """Restores from `cfg.path` (INITIAL_CHECKPOINT_PATH).

  Args:
    cfg: where and what to restore.
    abstract_params: ShapeDtypeStructs (with shardings) of the model's parameters.
    abstract_opt_state: the same for the optimizer state (used if restore_optimizer_state).
    vocab_digest: the digest of the vocabulary the run uses; a checkpoint trained with
      another one is refused (its embedding would be meaningless).
  Returns:
    (step, params, opt_state or None), or None with fallback_to_scratch and no checkpoint.
  Raises:
    ConfigError: no checkpoint there, or shapes/vocabulary differ (naming the parameter).
  """
  directory, step = split_checkpoint_path(cfg.path)
  if not directory.exists() or (step is not None and not step_dir(directory, step).exists()):
    if cfg.fallback_to_scratch:
      return None
    raise ConfigError("initial checkpoint not found", path=str(cfg.path),
                      field="INITIAL_CHECKPOINT_PATH",
                      hint="point it at a checkpoint_<step> directory of a finished run")
  if step is None or cfg.mode == "latest":
    done = finished_steps(directory)
    step = done[-1] if done else None
  if step is None:
    if cfg.fallback_to_scratch:
      return None
    raise ConfigError("no finished checkpoint in this directory", path=str(cfg.path),
                      field="INITIAL_CHECKPOINT_PATH")
  if not is_finished(step_dir(directory, step)):
    raise ConfigError(f"checkpoint_{step} is not finished (no {COMMIT_MARKER}): its save was "
                      "interrupted", path=str(cfg.path), field="INITIAL_CHECKPOINT_PATH",
                      hint="use an earlier checkpoint_<step> of that run")
  mngr = _manager(directory, read_only=True)
  try:
    meta = mngr.item_metadata(step)
    saved = meta["params"] if meta is not None and "params" in meta else None
    if cfg.strict:
      if saved is None:
        raise ConfigError("the checkpoint has no parameter metadata", path=str(cfg.path),
                          field="INITIAL_CHECKPOINT_PATH")
      check_shapes(saved, abstract_params, path=str(cfg.path))
    items = {"params": ocp.args.StandardRestore(abstract_params), "meta": ocp.args.JsonRestore()}
    if cfg.restore_optimizer_state:
      items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
    out = mngr.restore(step, args=ocp.args.Composite(**items))
  finally:
    mngr.close()
  saved_vocab = (out.get("meta") or {}).get("vocab_sha256")
  if vocab_digest and saved_vocab and saved_vocab != vocab_digest:
    raise ConfigError(
        f"parameter {_embedding_name(abstract_params)} was trained with vocabulary "
        f"{saved_vocab[:12]} but this run's task uses vocabulary {vocab_digest[:12]}",
        path=str(cfg.path), field="INITIAL_CHECKPOINT_PATH",
        hint="fine-tune on a task tokenized with the pretraining vocabulary")
  return step, out["params"], out.get("opt_state") if cfg.restore_optimizer_state else None


def read_meta(path: str | Path) -> dict:
  """The `meta` item (step, data position, task, vocabulary) of a `checkpoint_<step>`."""
  directory, step = split_checkpoint_path(path)
  mngr = _manager(directory, read_only=True)
  try:
    return dict(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
  finally:
    mngr.close()


def load_params(path: str | Path) -> dict:
  """The parameters of a `checkpoint_<step>` as numpy arrays on this host (for tools/tests)."""
  directory, step = split_checkpoint_path(path)
  if step is None:
    raise ConfigError("expected a checkpoint_<step> directory", path=str(path))
  mngr = _manager(directory, read_only=True)
  try:
    tree = _metadata_tree(mngr.item_metadata(step)["params"])
    device = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype,
                                                         sharding=device), tree)
    out = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
  finally:
    mngr.close()
  return to_numpy_tree(out["params"])


def describe(path: str | Path) -> str:
  """A line per parameter (name, shape, dtype) and the meta of a `checkpoint_<step>`."""
  directory, step = split_checkpoint_path(path)
  mngr = _manager(directory, read_only=True)
  try:
    tree = _metadata_tree(mngr.item_metadata(step)["params"])
  finally:
    mngr.close()
  lines = [f"{n}  {tuple(m.shape)}  {m.dtype}" for n, m in sorted(_flat(tree).items())]
  return "\n".join([f"{path}: {read_meta(path)}"] + lines)


def to_numpy_tree(tree):
  return jax.tree.map(lambda x: np.asarray(x), tree)

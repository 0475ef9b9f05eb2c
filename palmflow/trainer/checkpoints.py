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

    python -c "from palmflow.trainer.checkpoints import describe; print(describe('/m/ckpt_4'))"
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import re
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
    dtype: "float32" or "bfloat16" for saved parameters. bfloat16 halves the files, but a
      run resumed from one goes on from rounded parameters: it no longer ends where an
      uninterrupted run would (the optimizer state is saved in float32 either way).
    save_dataset: t5x's flag, accepted for its gin files; the data position (batches
      consumed, in `meta`) is always saved, so resuming never repeats or skips data.
    checkpoint_steps: further steps to save at, besides every `period` steps (e.g. the
      steps of a learning-rate schedule's changes). keep-N counts them as any other.
  """

  period: int = 1000
  keep: int | None = None
  dtype: str = "float32"
  save_dataset: bool = True
  checkpoint_steps: tuple[int, ...] | None = None

  def __post_init__(self):
    steps = self.checkpoint_steps
    if steps is not None:
      steps = list(steps) if isinstance(steps, (list, tuple, set, frozenset)) else [steps]
      if not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= 1
                 for x in steps):
        raise ConfigError(f"checkpoint_steps must be a list of steps >= 1, not "
                          f"{self.checkpoint_steps!r}",
                          field="SaveCheckpointConfig.checkpoint_steps")
      object.__setattr__(self, "checkpoint_steps", tuple(sorted(int(x) for x in steps)))
    if self.period < 1:
      raise ConfigError(f"period must be >= 1, not {self.period}",
                        field="SaveCheckpointConfig.period (CHECKPOINT_PERIOD)")
    if self.keep is not None and self.keep < 1:
      raise ConfigError(f"keep must be None or >= 1, not {self.keep}",
                        field="SaveCheckpointConfig.keep (CHECKPOINTS_TO_KEEP)")
    if self.dtype not in ("float32", "bfloat16"):
      raise ConfigError(f"dtype must be float32 or bfloat16, not {self.dtype!r}",
                        field="SaveCheckpointConfig.dtype")

  def saves_at(self, step: int, total_steps: int) -> bool:
    """Whether the run saves a checkpoint after `step` (periodic, listed, or the last)."""
    return (step % self.period == 0 or step == total_steps
            or step in (self.checkpoint_steps or ()))


@dataclasses.dataclass(frozen=True)
class RestoreCheckpointConfig:
  """What to restore when MODEL_DIR has no checkpoint yet.

  Attributes:
    path: a `checkpoint_<step>` directory (INITIAL_CHECKPOINT_PATH), or None.
    mode: "specific" (that checkpoint) or "latest" (newest under `path`).
    restore_optimizer_state: also restore optimizer state (needs the same optimizer).
    strict: every model parameter (but those `assignment_map` maps to None) must be in the
      checkpoint and every checkpoint parameter must be used, else an error names the
      first that is not. False: a partial restore; model parameters the checkpoint lacks
      keep their fresh initialization, unused checkpoint parameters are left on disk
      (both listed in a warning). A shape that differs is an error either way.
    fallback_to_scratch: start from scratch if `path` has no checkpoint.
    assignment_map: t5x's renaming, a sequence of (regex, replacement) pairs over the model's
      parameter names as model-info.txt writes them (``layers/mlp/wi``). The first regex that
      matches the whole name gives the checkpoint name to restore it from
      (``re.Match.expand``: ``\\1`` and ``\\g<name>`` refer to groups); a replacement None
      restores nothing into it (fresh initialization; the checkpoint's parameter of that name
      then counts as used). Names no regex matches restore from the same name. A rule that
      matches no model parameter is an error with strict (a typo), a warning without.
    dtype: the dtype restored parameters are cast to; None keeps the model's parameter dtype.
      Training refuses another dtype than its parameters' (its optimizer state is theirs);
      eval and infer take theirs from `eval_lib.evaluate/infer.restore_dtype` (e.g.
      'bfloat16': half the memory).
  """

  path: str | None = None
  mode: str = "specific"
  restore_optimizer_state: bool = False
  strict: bool = True
  fallback_to_scratch: bool = False
  assignment_map: tuple[tuple[str, str | None], ...] | None = None
  dtype: str | None = None

  def __post_init__(self):
    check_local_path(self.path, "RestoreCheckpointConfig.path")
    if self.mode not in ("specific", "latest"):
      raise ConfigError(f"mode must be 'specific' or 'latest', not {self.mode!r}",
                        field="RestoreCheckpointConfig.mode",
                        hint="'all' is for evaluation: the eval binary's CHECKPOINT_MODE = "
                             "'all' evaluates every checkpoint of a run")
    if self.dtype is not None and self.dtype not in ("float32", "bfloat16", "float16"):
      raise ConfigError(f"dtype must be None, float32, bfloat16 or float16, not "
                        f"{self.dtype!r}", field="RestoreCheckpointConfig.dtype")
    if self.assignment_map is not None:
      field = "RestoreCheckpointConfig.assignment_map"
      rules = []
      for rule in self.assignment_map:
        if (not isinstance(rule, (tuple, list)) or len(rule) != 2
            or not isinstance(rule[0], str) or not isinstance(rule[1], (str, type(None)))):
          raise ConfigError(f"each rule must be a (regex, replacement or None) pair, not "
                            f"{rule!r}", field=field,
                            hint=r"e.g. ((r'layers/mlp/(.*)', r'layers/ffn/\1'), "
                                 r"(r'embedding', None))")
        try:
          re.compile(rule[0])
        except re.error as e:
          raise ConfigError(f"the regex {rule[0]!r} does not compile: {e}",
                            field=field) from None
        rules.append((rule[0], rule[1]))
      object.__setattr__(self, "assignment_map", tuple(rules))
    if self.restore_optimizer_state and (self.assignment_map or not self.strict):
      raise ConfigError("restore_optimizer_state restores the optimizer state of the same "
                        "parameters: not with assignment_map or strict = False",
                        field="RestoreCheckpointConfig.restore_optimizer_state",
                        hint="restore the parameters only (restore_optimizer_state = False)")

  def source_of(self, name: str) -> str | None:
    """The checkpoint parameter that model parameter `name` restores from (None: none)."""
    for pattern, replacement in self.assignment_map or ():
      m = re.fullmatch(pattern, name)
      if m:
        return None if replacement is None else m.expand(replacement)
    return name


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


# `gs://b/x`, or `gs:/b/x` as pathlib writes it (two characters at least: not `C:/`).
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/")
# The binaries' path settings, checked by `gin_utils.check_local_paths` before anything is
# written.
PATH_MACROS = ("MODEL_DIR", "INITIAL_CHECKPOINT_PATH", "CHECKPOINT_PATH", "EVAL_OUTPUT_DIR",
               "INFER_OUTPUT_DIR")


def check_local_path(value: str | Path | None, field: str) -> None:
  """Raises ConfigError for a URI (gs://, s3://, ...): the trainer's own files (metrics,
  predictions, config.gin, checkpoint listings) go through the local filesystem, where
  pathlib would make `gs://b/run` a local folder named `gs:` and the run would seem to
  work."""
  m = _URI.match(str(value)) if value is not None else None
  if m:
    raise ConfigError(
        f"{str(value)!r} is a {m.group(1)}:// URI; palmflow's trainer reads and writes its "
        "directories through the local filesystem, so a bucket must be mounted",
        field=field, hint="mount the bucket (e.g. gcsfuse for gs://) and give the local path "
                          "there")


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


class _UnretrievedRestoreReads(logging.Filter):
  """Drops asyncio's "Task exception was never retrieved" report of an orbax array read.

  Orbax reads a checkpoint's arrays as concurrent tasks; when a corrupt checkpoint fails to
  restore, the restore raises the first failure (reported and handled: the run falls back
  to an older checkpoint), and the other reads' failures are never retrieved. asyncio then
  prints each with a traceback when the task is collected, often at exit, after the run's
  own clear warning.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not ("Task exception was never retrieved" in message
                and "async_deserialize" in message)


_UNRETRIEVED_READS = _UnretrievedRestoreReads()


def _quiet_unretrieved_restore_reads() -> None:
  """Installs `_UnretrievedRestoreReads` on asyncio's logger (once a restore failed)."""
  asyncio_log = logging.getLogger("asyncio")
  if _UNRETRIEVED_READS not in asyncio_log.filters:
    asyncio_log.addFilter(_UNRETRIEVED_READS)


def _opt_state_mismatch(saved_opt, abstract_opt_state) -> str | None:
  """What differs between a checkpoint's optimizer state (metadata) and this run's, or
  None."""
  shapes = lambda tree: sorted(tuple(x.shape) for x in jax.tree.leaves(_metadata_tree(tree)))
  got, want = shapes(saved_opt), shapes(abstract_opt_state)
  if got == want:
    return None
  if len(got) != len(want):
    what = f"has {len(got)} arrays in the checkpoint but {len(want)} in this run"
  else:
    only = lambda a, b: sorted((collections.Counter(a) - collections.Counter(b)).elements())
    what = (f"has arrays of other shapes: {_shapes_text(only(got, want))} in the "
            f"checkpoint, {_shapes_text(only(want, got))} in this run")
  return (f"the optimizer state {what} (another optimizer, optimizer settings or precision "
          "policy, e.g. float16's loss scaling, or a checkpoint of a palmflow before train "
          "version 2, whose Adafactor factored other axes)")


def _shapes_text(shapes: list[tuple], most: int = 3) -> str:
  text = ", ".join(str(s) for s in shapes[:most])
  return text + (f" and {len(shapes) - most} more" if len(shapes) > most else "")


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
    what = _opt_state_mismatch(saved_opt, abstract_opt_state)
    if what is not None:
      raise ConfigError(f"cannot resume: {what}", path=path, field="MODEL_DIR", hint=hint)

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
        _quiet_unretrieved_restore_reads()
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


def _restore_plan(cfg: RestoreCheckpointConfig, abstract_params, saved, *,
                  path: str) -> dict[str, str | None]:
  """Model parameter name -> the checkpoint parameter it restores from (None: keeps its
  initialization), after `cfg`'s assignment_map and strictness.

  Raises:
    ConfigError: a shape differs; with strict, a parameter is missing or unused.
  """
  model, ckpt = _flat(abstract_params), _flat(_metadata_tree(saved))
  plan = {name: cfg.source_of(name) for name in model}
  renamed = " (after assignment_map)" if cfg.assignment_map else ""
  idle = [pattern for pattern, _ in cfg.assignment_map or ()
          if not any(re.fullmatch(pattern, name) for name in model)]
  if idle:
    message = (f"assignment_map rule {idle[0]!r} matches no parameter of the model"
               + (f" ({len(idle) - 1} more)" if len(idle) > 1 else ""))
    if cfg.strict:
      raise ConfigError(message, path=path, field="RestoreCheckpointConfig.assignment_map",
                        hint="rules match the model's names as model-info.txt lists them")
    log.warning("%s", message)
  for name, src in plan.items():
    if src is not None and src in ckpt:
      ss, es = tuple(ckpt[src].shape), tuple(model[name].shape)
      if ss != es:
        what = name if src == name else f"{name} (from checkpoint parameter {src})"
        raise ConfigError(f"parameter {what} has shape {ss} in the checkpoint but {es} in "
                          "the model", path=path, field="INITIAL_CHECKPOINT_PATH",
                          hint="map it elsewhere, or to None to train it from scratch, with "
                               "RestoreCheckpointConfig.assignment_map")
  missing = sorted(n for n, src in plan.items() if src is not None and src not in ckpt)
  # A checkpoint parameter is used when restored, or when the model parameter of its name
  # is left to its initialization on purpose (mapped to None).
  used = {src for src in plan.values() if src is not None}
  used |= {name for name, src in plan.items() if src is None}
  unused = sorted(set(ckpt) - used)
  hint = ("set RestoreCheckpointConfig.strict = False to restore what matches (the rest "
          "keeps its initialization), or map names with assignment_map")
  if missing:
    if cfg.strict:
      raise ConfigError(f"parameter {missing[0]} of the model is not in the checkpoint"
                        f"{renamed}: it would restore from {plan[missing[0]]}"
                        + (f" ({len(missing) - 1} more)" if len(missing) > 1 else ""),
                        path=path, field="INITIAL_CHECKPOINT_PATH", hint=hint)
    log.warning("%d model parameters are not in %s and keep their initialization: %s",
                len(missing), path, ", ".join(missing))
    for n in missing:
      plan[n] = None
  if unused:
    if cfg.strict:
      raise ConfigError(f"checkpoint parameter {unused[0]} is not used by the model"
                        f"{renamed}" + (f" ({len(unused) - 1} more)" if len(unused) > 1
                                        else ""),
                        path=path, field="INITIAL_CHECKPOINT_PATH", hint=hint)
    log.warning("%d parameters of %s are not restored (the model does not use them): %s",
                len(unused), path, ", ".join(unused))
  skipped = sorted(n for n, src in plan.items() if src is None and n not in missing)
  if skipped:
    log.info("assignment_map: %d parameters keep their initialization: %s", len(skipped),
             ", ".join(skipped))
  return plan


def _nest(flat: dict[str, Any]) -> dict:
  """{'a/b': x} -> {'a': {'b': x}} (the inverse of `_flat` for trees of dicts whose keys
  hold no '/', as flax parameters are)."""
  out: dict = {}
  for name, leaf in flat.items():
    *parents, last = name.split("/")
    node = out
    for k in parents:
      node = node.setdefault(k, {})
    node[last] = leaf
  return out


def _restore_renamed(directory: Path, step: int, plan: dict[str, str | None],
                     abstract_params, init_params, dtype) -> Any:
  """The model's parameters: each from its checkpoint parameter in `plan` (placed as the
  model's, cast to `dtype`), or from `init_params` where the plan says None."""
  model = _flat(abstract_params)
  target = {}
  for name, src in plan.items():
    if src is not None and src not in target:
      a = model[name]
      target[src] = jax.ShapeDtypeStruct(a.shape, dtype or a.dtype, sharding=a.sharding)
  restored = {}
  if target:
    nested = _nest(target)
    # A tree checkpoint handler reads the params item as saved by the standard handler,
    # and can restore part of it (the standard handler restores all or nothing).
    mngr = ocp.CheckpointManager(
        Path(directory).resolve(),
        options=ocp.CheckpointManagerOptions(step_prefix=PREFIX, read_only=True,
                                             create=False),
        item_handlers={"params": ocp.PyTreeCheckpointHandler()})
    try:
      out = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.PyTreeRestore(
          nested, restore_args=ocp.checkpoint_utils.construct_restore_args(nested),
          partial_restore=True)))
    finally:
      mngr.close()
    restored = _flat(out["params"])
  init = _flat(init_params) if init_params is not None else {}
  leaves, taken = [], set()
  for name in model:
    src = plan[name]
    want = dtype or model[name].dtype
    if src is None:
      if name not in init:
        raise ConfigError(f"parameter {name} is not restored and no initialization was "
                          "given", field="RestoreCheckpointConfig.assignment_map")
      leaves.append(init[name].astype(want))
    else:
      x = restored[src].astype(want)
      # Several parameters restored from one checkpoint parameter get buffers of their own:
      # the train step donates its parameters, and one buffer cannot be donated twice.
      leaves.append(jax.device_put(x, model[name].sharding, may_alias=src not in taken))
      taken.add(src)
  return jax.tree.unflatten(jax.tree.structure(abstract_params), leaves)


def restore_initial(cfg: RestoreCheckpointConfig, abstract_params, abstract_opt_state, *,
                    vocab_digest: str | None = None, init_params=None):
  """Restores from `cfg.path` (INITIAL_CHECKPOINT_PATH).

  Args:
    cfg: where and what to restore (its assignment_map, strictness and dtype too).
    abstract_params: ShapeDtypeStructs (with shardings) of the model's parameters.
    abstract_opt_state: the same for the optimizer state (used if restore_optimizer_state).
    vocab_digest: the digest of the vocabulary the run uses; a checkpoint trained with
      another one is refused (its embedding would be meaningless).
    init_params: the freshly initialized parameters, for those the checkpoint does not
      provide (assignment_map to None, or missing with strict = False).
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
    if saved is None:
      raise ConfigError("the checkpoint has no parameter metadata", path=str(cfg.path),
                        field="INITIAL_CHECKPOINT_PATH",
                        hint="its save did not finish or it is not a palmflow checkpoint")
    if cfg.strict and not cfg.assignment_map:
      check_shapes(saved, abstract_params, path=str(cfg.path))  # its messages, name by name
    plan = _restore_plan(cfg, abstract_params, saved, path=str(cfg.path))
    whole = all(src == name for name, src in plan.items()) and len(plan) == len(
        _flat(_metadata_tree(saved)))
    target = abstract_params
    if cfg.dtype:
      target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, cfg.dtype,
                                                           sharding=a.sharding), target)
    items = {"meta": ocp.args.JsonRestore()}
    if whole:
      items["params"] = ocp.args.StandardRestore(target)
    if cfg.restore_optimizer_state:
      saved_opt = meta.get("opt_state") if hasattr(meta, "get") else None
      what = None if saved_opt is None else _opt_state_mismatch(saved_opt, abstract_opt_state)
      if what is not None:
        raise ConfigError(f"cannot restore the optimizer state: {what}", path=str(cfg.path),
                          field="RestoreCheckpointConfig.restore_optimizer_state",
                          hint="restore the parameters only (restore_optimizer_state=False) "
                               "or train with the checkpoint's optimizer settings")
      items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
    out = dict(mngr.restore(step, args=ocp.args.Composite(**items)))
  finally:
    mngr.close()
  if not whole:
    out["params"] = _restore_renamed(directory, step, plan, abstract_params, init_params,
                                     cfg.dtype)
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

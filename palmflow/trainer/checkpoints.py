"""Orbax checkpoints in t5x's layout: `MODEL_DIR/checkpoint_<step>/{params,opt_state,meta}`.

`params` and `opt_state` are separate items, so fine-tuning can restore parameters alone
(a different optimizer needs no arcane settings); `meta` records the step, the data position
and the model's shapes. A checkpoint that fails to restore (corrupt or half-written) is
skipped with a warning in favour of the previous one.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from palmflow.errors import ConfigError

log = logging.getLogger("palmflow.checkpoints")
PREFIX = "checkpoint"


@dataclasses.dataclass(frozen=True)
class SaveCheckpointConfig:
  """When and how to save (t5x names).

  Attributes:
    period: save every this many steps (and always at the end).
    keep: keep the newest N checkpoints (None keeps all).
    dtype: "float32" or "bfloat16" for saved parameters.
    save_dataset: record the data position (always on: it is the step count here).
  """

  period: int = 1000
  keep: int | None = None
  dtype: str = "float32"
  save_dataset: bool = True


@dataclasses.dataclass(frozen=True)
class RestoreCheckpointConfig:
  """What to restore when MODEL_DIR has no checkpoint yet.

  Attributes:
    path: a `checkpoint_<step>` directory (INITIAL_CHECKPOINT_PATH), or None.
    mode: "specific" (that checkpoint) or "latest" (newest under `path`).
    restore_optimizer_state: also restore optimizer state (needs the same optimizer).
    strict: shapes must match exactly; a mismatch names the parameter.
    fallback_to_scratch: start from scratch if `path` has no checkpoint.
  """

  path: str | None = None
  mode: str = "specific"
  restore_optimizer_state: bool = False
  strict: bool = True
  fallback_to_scratch: bool = False


def _manager(directory: Path, *, keep: int | None = None, read_only: bool = False):
  return ocp.CheckpointManager(
      Path(directory).resolve(),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=keep, step_prefix=PREFIX, create=not read_only, read_only=read_only,
          enable_async_checkpointing=False),
      item_names=("params", "opt_state", "meta"))


class Checkpointer:
  """Saves and restores train states under MODEL_DIR."""

  def __init__(self, model_dir: str | Path, cfg: SaveCheckpointConfig):
    self.dir = Path(model_dir)
    self.cfg = cfg
    self._mngr = _manager(self.dir, keep=cfg.keep)

  def steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def save(self, step: int, params, opt_state, meta: dict) -> None:
    if self.cfg.dtype == "bfloat16":
      import jax.numpy as jnp
      params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    self._mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
        meta=ocp.args.JsonSave(meta)), force=True)
    self._mngr.wait_until_finished()

  def restore_latest(self, abstract_params, abstract_opt_state):
    """(step, params, opt_state, meta) of the newest restorable checkpoint, or None."""
    for step in reversed(self.steps()):
      try:
        out = self._mngr.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params),
            opt_state=ocp.args.StandardRestore(abstract_opt_state),
            meta=ocp.args.JsonRestore()))
        return step, out["params"], out["opt_state"], out["meta"]
      except Exception as e:  # noqa: BLE001 - any failure means this checkpoint is unusable
        log.warning("checkpoint %s/%s_%d cannot be restored (%s: %s); falling back to the "
                    "previous one", self.dir, PREFIX, step, type(e).__name__,
                    str(e).splitlines()[0][:200])
    return None

  def close(self):
    self._mngr.close()


def split_checkpoint_path(path: str | Path) -> tuple[Path, int | None]:
  """`.../checkpoint_1200` -> (`...`, 1200); a directory of checkpoints -> (dir, None)."""
  p = Path(path)
  if p.name.startswith(PREFIX + "_") and p.name[len(PREFIX) + 1:].isdigit():
    return p.parent, int(p.name[len(PREFIX) + 1:])
  return p, None


def check_shapes(saved: Any, expected: Any, *, path: str) -> None:
  """Raises ConfigError naming the first parameter whose shape differs or is missing."""
  flat_s = {jax.tree_util.keystr(k): v for k, v in
            jax.tree_util.tree_flatten_with_path(saved)[0]}
  flat_e = {jax.tree_util.keystr(k): v for k, v in
            jax.tree_util.tree_flatten_with_path(expected)[0]}
  for name, e in flat_e.items():
    if name not in flat_s:
      raise ConfigError(f"parameter {name} of the model is not in the checkpoint", path=path,
                        hint="the checkpoint is of another architecture")
    ss, es = tuple(flat_s[name].shape), tuple(e.shape)
    if ss != es:
      extra = (" (the vocabulary differs: fine-tune with the pretraining vocabulary)"
               if "embedding" in name or "logits" in name else "")
      raise ConfigError(f"parameter {name} has shape {ss} in the checkpoint but {es} in the "
                        f"model{extra}", path=path)
  for name in flat_s:
    if name not in flat_e:
      raise ConfigError(f"checkpoint parameter {name} is not in the model", path=path,
                        hint="set RestoreCheckpointConfig.strict=False to ignore it")


def restore_initial(cfg: RestoreCheckpointConfig, abstract_params, abstract_opt_state):
  """Restores from `cfg.path` (INITIAL_CHECKPOINT_PATH): (step, params, opt_state|None)."""
  directory, step = split_checkpoint_path(cfg.path)
  if not directory.exists():
    if cfg.fallback_to_scratch:
      return None
    raise ConfigError("initial checkpoint not found", path=str(cfg.path),
                      field="INITIAL_CHECKPOINT_PATH",
                      hint="point it at a checkpoint_<step> directory of a finished run")
  mngr = _manager(directory, read_only=True)
  if step is None or cfg.mode == "latest":
    step = mngr.latest_step()
  if step is None:
    if cfg.fallback_to_scratch:
      return None
    raise ConfigError("no checkpoint in this directory", path=str(cfg.path),
                      field="INITIAL_CHECKPOINT_PATH")
  meta = mngr.item_metadata(step)
  saved = meta["params"] if meta is not None and "params" in meta else None
  if saved is not None and cfg.strict:
    check_shapes(saved, abstract_params, path=str(cfg.path))
  items = {"params": ocp.args.StandardRestore(abstract_params)}
  if cfg.restore_optimizer_state:
    items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
  out = mngr.restore(step, args=ocp.args.Composite(**items))
  mngr.close()
  return step, out["params"], out.get("opt_state") if cfg.restore_optimizer_state else None


def to_numpy_tree(tree):
  return jax.tree.map(lambda x: np.asarray(x), tree)

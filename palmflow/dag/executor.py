"""Plans and runs a pipeline: fingerprints every stage, reuses finished ones, runs the rest."""
from __future__ import annotations

import dataclasses
import datetime
import difflib
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

from palmflow.dag import fingerprint as fp_lib
from palmflow.dag import kinds as kinds_lib
from palmflow.dag import spec as spec_lib
from palmflow.dag.store import Store
from palmflow.errors import ConfigError, PalmflowError, StageFailed


@dataclasses.dataclass
class PlannedStage:
  name: str
  kind: str
  fingerprint: str
  identity: dict
  inputs: dict[str, str | list[str]]   # slot -> upstream fingerprint(s)
  action: str                          # "run" | "reuse" | "resume"
  reasons: list[str]


def _log(msg: str) -> None:
  ts = datetime.datetime.now().strftime("%H:%M:%S")
  print(f"[{ts}] {msg}", file=sys.stderr, flush=True)


def stage_identity(pipeline: spec_lib.Pipeline, name: str) -> dict:
  """A stage's identity (its settings, with the digests of the files they name).

  Raises:
    ConfigError: a file the settings name is missing, or the kind rejects a setting (e.g. a
      gin file that is not found); it names the pipeline file, the stage's line and the stage.
  """
  st = pipeline.stages[name]
  kind = kinds_lib.registry()[st.kind]
  try:
    identity = kind.identity(_advisory_defaults(kind, st.settings), base_dir=pipeline.base_dir)
  except OSError as e:  # a missing file, a folder where a file was expected, no permission
    raise ConfigError(str(e), path=str(pipeline.path), line=st.line, stage=name,
                      field="settings",
                      hint="paths are relative to the pipeline file's folder") from None
  except ConfigError as e:
    if e.stage:
      raise
    if e.field and e.field.startswith("settings"):  # the kind named the setting at fault
      raise ConfigError(e.message, path=str(pipeline.path), line=st.line, stage=name,
                        field=e.field, hint=e.hint) from None
    raise ConfigError(str(e), path=str(pipeline.path), line=st.line, stage=name,
                      field="settings") from None
  return identity


def _advisory_defaults(kind, settings):
  """`settings` with the kind's advisory settings at their defaults: they do not change
  the output, and with their defaults in it a stage keeps the fingerprint it had before
  they were advisory, when it was run with them unset."""
  if not kind.advisory:
    return settings
  defaults = {}
  for f in dataclasses.fields(settings):
    if f.name in kind.advisory:
      defaults[f.name] = (f.default_factory() if f.default is dataclasses.MISSING
                          else f.default)
  return dataclasses.replace(settings, **defaults)


def plan(pipeline: spec_lib.Pipeline, store: Store) -> list[PlannedStage]:
  """Fingerprints each stage (in dependency order) and decides whether it runs.

  Returns:
    One `PlannedStage` per stage, with the reasons it runs (what changed).
  """
  registry = kinds_lib.registry()
  fps: dict[str, str] = {}
  out: list[PlannedStage] = []
  will_run: set[str] = set()
  for name in pipeline.order:
    st = pipeline.stages[name]
    kind = registry[st.kind]
    identity = stage_identity(pipeline, name)
    inputs = {slot: ([fps[r] for r in ref] if isinstance(ref, list) else fps[ref])
              for slot, ref in sorted(st.inputs.items())}
    fp = fp_lib.fingerprint(kind=st.kind, version=kind.version, identity=identity,
                            inputs=inputs)
    fps[name] = fp
    if store.is_complete(name, fp):
      out.append(PlannedStage(name, st.kind, fp, identity, inputs, "reuse", ["up to date"]))
      continue
    reasons = []
    latest = store.latest(name)
    if latest is None:
      reasons.append("never run")
    else:
      old_version = latest.get("kind_version")
      if old_version is None:  # a LATEST record of an older palmflow: its manifest says
        try:
          old_version = store.manifest(name, latest["fingerprint"]).get("kind_version")
        except (OSError, ValueError, KeyError):
          pass
      if old_version not in (None, kind.version):
        reasons.append(f"kind {st.kind} version {old_version} -> {kind.version}")
      changes = fp_lib.diff(latest.get("identity", {}), identity)
      reasons += [f"setting {c}" for c in changes]
      for slot, ref in st.inputs.items():
        if latest.get("inputs", {}).get(slot) != inputs[slot]:
          refs = ref if isinstance(ref, list) else [ref]
          running = [r for r in refs if r in will_run]
          reasons.append(f"input '{slot}' ({', '.join(running)}) will run" if running
                         else f"input '{slot}' ({', '.join(refs)}) changed")
      if not reasons:
        reasons.append("code version of kind changed")
    action = "run"
    if store.stage_dir(name, fp).exists() and kind.resumable:
      action = "resume"
      reasons.append("resuming a partial run")
    will_run.add(name)
    out.append(PlannedStage(name, st.kind, fp, identity, inputs, action, reasons))
  return out


def format_plan(planned: list[PlannedStage], store: Store) -> str:
  width = max(len(p.name) for p in planned)
  lines = []
  for p in planned:
    tag = {"reuse": "reuse ", "run": "RUN   ", "resume": "RESUME"}[p.action]
    lines.append(f"  {tag} {p.name:<{width}}  {p.kind:<9} {p.fingerprint}  "
                 f"{'; '.join(p.reasons)}")
  return f"store: {store.root}\n" + "\n".join(lines)


def run(pipeline: spec_lib.Pipeline, store: Store, *,
        log: Callable[[str], None] = _log,
        only: set[str] | None = None) -> tuple[list[PlannedStage], list[str]]:
  """Runs every stage that is not finished, in dependency order.

  Args:
    pipeline: a validated pipeline.
    store: where outputs go.
    log: where progress lines go.
    only: if given, run only these stages; other pending stages are skipped. A selected
        stage whose upstream is neither finished nor selected, and a name that is no stage,
        are ConfigErrors.
  Returns:
    (the plan, the names of the stages that ran now).
  Raises:
    StageFailed: a stage raised; finished stages stay published, the failed one does not.
  """
  from palmflow.stages.common import close_worker_pool
  registry = kinds_lib.registry()
  planned = plan(pipeline, store)
  by_name = {p.name: p for p in planned}
  if only is not None and only - set(by_name):
    unknown = sorted(only - set(by_name))
    close = {n: difflib.get_close_matches(n, list(by_name), n=1) for n in unknown}
    raise ConfigError(
        f"--only names no stage of this pipeline: {', '.join(unknown)}",
        path=str(pipeline.path), field="--only",
        hint="; ".join(f"did you mean {c[0]!r} for {n!r}?" for n, c in close.items() if c)
        or f"its stages: {', '.join(by_name)}")
  log(f"pipeline '{pipeline.name}' ({pipeline.path}), store {store.root}")
  executed: list[str] = []
  done = {p.name for p in planned if p.action == "reuse"}

  def upstream(ref: str) -> kinds_lib.Upstream:
    u = by_name[ref]
    return kinds_lib.Upstream(name=ref, kind=u.kind, fingerprint=u.fingerprint,
                              path=store.stage_dir(ref, u.fingerprint),
                              manifest=store.manifest(ref, u.fingerprint))

  def inputs_of(st) -> dict:
    return {slot: ([upstream(r) for r in ref] if isinstance(ref, list) else upstream(ref))
            for slot, ref in st.inputs.items()}

  try:
    for i, p in enumerate(planned):
      if p.action == "reuse":
        log(f"stage {p.name}: up to date ({p.fingerprint}), reused")
        st = pipeline.stages[p.name]
        kind = registry[st.kind]
        if kind.advisory:  # its warnings follow the advisory settings as they are now
          for w in kind.advise(st.settings, inputs_of(st)):
            log(f"  {p.name}: WARNING: {w}")
        continue
      if only is not None and p.name not in only:
        log(f"stage {p.name}: would run but is not selected (--only); skipped")
        continue
      missing = [u for u in pipeline.stages[p.name].upstream_names() if u not in done]
      if missing:
        raise ConfigError(
            f"stage {p.name} needs {', '.join(missing)}, not finished and not selected",
            path=str(pipeline.path), field="--only",
            hint=f"add {', '.join(missing)} to --only, or run without --only")
      st = pipeline.stages[p.name]
      kind = registry[st.kind]
      log(f"stage {p.name} ({st.kind}) {p.fingerprint}: running ({'; '.join(p.reasons)})")
      out_dir = store.prepare(p.name, p.fingerprint, resumable=kind.resumable)
      inputs = inputs_of(st)
      all_up = {}
      stack = list(st.upstream_names())
      while stack:
        n = stack.pop()
        if n not in all_up:
          all_up[n] = upstream(n)
          stack.extend(pipeline.stages[n].upstream_names())
      ctx = kinds_lib.StageContext(
          name=p.name, pipeline=pipeline.name, out_dir=out_dir, settings=st.settings,
          inputs=inputs, placement=pipeline.placement, fingerprint=p.fingerprint,
          all_upstream=all_up, log=lambda m, _n=p.name: log(f"  {_n}: {m}"),
          store_root=store.root, base_dir=pipeline.base_dir)
      started = time.time()
      try:
        summary = kind.run(ctx) or {}
      except PalmflowError as e:  # already actionable: say which stage it came from
        if getattr(e, "stage", None) is None and f"stage '{p.name}'" not in str(e):
          e.args = (f"stage '{p.name}' ({st.kind}): {e}",) + e.args[1:]
        raise
      except Exception as e:  # noqa: BLE001 - reported with the stage's name, then re-raised
        tb = traceback.format_exc()
        (out_dir / "error.txt").write_text(tb)
        raise StageFailed(f"stage '{p.name}' ({st.kind}) failed: {type(e).__name__}: {e}\n"
                          f"  full traceback: {out_dir / 'error.txt'}\n  partial output "
                          f"kept in {out_dir} (not marked COMPLETED)") from e
      finished = time.time()
      store.publish(p.name, p.fingerprint, {
          "stage": p.name, "kind": st.kind, "kind_version": kind.version,
          "fingerprint": p.fingerprint, "identity": p.identity, "inputs": p.inputs,
          "upstream": {slot: ref for slot, ref in st.inputs.items()},
          "produces": kind.produces, "summary": summary,
          "started": datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
          "finished": datetime.datetime.fromtimestamp(finished).isoformat(timespec="seconds"),
          "duration_s": round(finished - started, 2), "pipeline_file": str(pipeline.path)})
      (out_dir / "error.txt").unlink(missing_ok=True)
      log(f"stage {p.name}: done in {finished - started:.1f}s -> {out_dir}")
      executed.append(p.name)
      done.add(p.name)
      if not any(registry[pipeline.stages[q.name].kind].runs_beam
                 for q in planned[i + 1:] if q.action != "reuse"):
        close_worker_pool()  # no Beam job is left: free the pool's processes now
  finally:  # the Beam jobs' shared worker pool, if one was started
    close_worker_pool()
  return planned, executed


def resolve_path(base_dir: Path, p: str) -> Path:
  """A settings path, relative to the pipeline file's folder unless absolute."""
  q = Path(p).expanduser()
  return q if q.is_absolute() else (base_dir / q)

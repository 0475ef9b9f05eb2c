"""`mixture`: several task-producing stages combined into one seqio Mixture, by rate.

    mix:
      kind: mixture
      inputs: {tasks: [web_blocks, book_blocks]}
      settings:
        rates: {web_blocks: 3, book_blocks: 1}
        rate_by: examples          # examples | tokens | token_share
        planned_train_steps: 10000 # optional: check that no source starves
        planned_batch_size: 256

`rate_by` says what the rates weigh:
  - `examples`: rates are relative numbers of examples (blocks) drawn from each source;
  - `tokens`: each rate is multiplied by the source's token count (non-pad tokens in its
    blocks, from the upstream manifest's stats): all rates 1 mixes in proportion to size;
  - `token_share`: rates are relative numbers of *tokens* drawn (PaLM-style proportions,
    e.g. {web: 27, books: 13}); each is divided by the source's non-pad tokens per block.
A source missing from `rates` gets 1.

With `planned_train_steps` and `planned_batch_size`, each source's expected examples are
share × steps × batch size; a source expected to get fewer than `min_examples_per_source`
is reported as a warning in the stage log and in the manifest summary's `warnings`. These
three settings are advisory: they are not part of the stage's identity (changing the plan
reruns neither the mixture nor the training that reads it), and a reused mixture checks
them again, logging its warnings for the plan as it now is.

The stage writes `task.json` (`"type": "mixture"`, the component task specs and the seqio
rates) and produces a `task`: a train stage takes it as `data` like a single task. The
mixture's name carries the stage's fingerprint, as a task's does.
"""
from __future__ import annotations

import dataclasses

from palmflow.dag.kinds import Slot, StageKind, register, setting
from palmflow.dag.store import write_json
from palmflow.errors import ConfigError

RATE_BY = ("examples", "tokens", "token_share")


@dataclasses.dataclass(frozen=True)
class MixtureSettings:
  rates: dict[str, float] = setting(default_factory=dict,
                                    doc="input stage name -> rate (missing: 1)")
  rate_by: str = setting("examples", doc="examples | tokens (rate x the source's token "
                                         "count) | token_share (rates are shares of tokens)")
  planned_train_steps: int | None = setting(None, doc="TRAIN_STEPS the mixture is planned "
                                                      "for (the starvation check)")
  planned_batch_size: int | None = setting(None, doc="BATCH_SIZE it is planned for")
  min_examples_per_source: float = setting(1.0, doc="warn when a source's expected examples "
                                                    "in the planned run are below this")

  def validate(self):
    if self.rate_by not in RATE_BY:
      raise ValueError(f"rate_by: {self.rate_by!r} is not one of {', '.join(RATE_BY)}")
    for k, v in self.rates.items():
      if v < 0:
        raise ValueError(f"rates: the rate of {k!r} is negative ({v})")
    if self.rates and not any(v > 0 for v in self.rates.values()):
      raise ValueError("rates: every rate is 0")
    for f in ("planned_train_steps", "planned_batch_size"):
      v = getattr(self, f)
      if v is not None and v < 1:
        raise ValueError(f"{f}: must be at least 1")
    if (self.planned_train_steps is None) != (self.planned_batch_size is None):
      raise ValueError("planned_batch_size: set both planned_train_steps and "
                       "planned_batch_size, or neither")
    if self.min_examples_per_source < 0:
      raise ValueError("min_examples_per_source: must be >= 0")


def _stats(up) -> dict:
  return up.manifest["summary"].get("stats") or {}


def source_rates(components: list[tuple[str, dict, dict]], *, rates: dict[str, float],
                 rate_by: str) -> list[float]:
  """The seqio rate of each component.

  Args:
    components: (stage name, task spec, blocks stats) per input, in order.
    rates: stage name -> rate (missing: 1).
    rate_by: `examples`, `tokens` or `token_share` (see the module docstring).
  Returns:
    The relative rates seqio samples by, in the order of `components`.
  Raises:
    ValueError: a token-based rate for a source whose stats have no token counts.
  """
  out = []
  for stage, _, stats in components:
    r = float(rates.get(stage, 1.0))
    if rate_by == "examples":
      out.append(r)
      continue
    tokens = stats.get("non_pad_tokens", stats.get("tokens"))
    blocks = stats.get("blocks")
    if not tokens or not blocks:
      raise ValueError(f"rate_by {rate_by}: input '{stage}' has no token/block counts in its "
                       "stats (only blocks stages have them); use rate_by: examples")
    out.append(r * tokens if rate_by == "tokens" else r * blocks / tokens)
  return out


def starvation_report(components, seqio_rates, *, steps: int | None, batch: int | None,
                      min_examples: float) -> tuple[list[dict], list[str]]:
  """Each source's share and expected examples in the planned run; warnings for starving ones.

  Returns:
    (one row per source: stage, task, rate, share, and with a plan expected_examples,
    expected_tokens and expected_epochs; the warning messages).
  """
  total = sum(seqio_rates)
  rows, warnings = [], []
  for (stage, spec, stats), rate in zip(components, seqio_rates):
    share = rate / total
    row = {"stage": stage, "task": spec["name"], "rate": rate, "share": share,
           "blocks": stats.get("blocks"), "tokens": stats.get("non_pad_tokens",
                                                              stats.get("tokens"))}
    if steps and batch:
      expected = share * steps * batch
      row["expected_examples"] = expected
      if row["blocks"]:
        row["expected_epochs"] = expected / row["blocks"]
        if row["tokens"]:
          row["expected_tokens"] = expected * row["tokens"] / row["blocks"]
      if expected < min_examples:
        warnings.append(
            f"source '{stage}' would get {expected:.2f} examples ({share:.4%} of "
            f"{steps} steps x {batch} examples), below min_examples_per_source="
            f"{min_examples:g}: raise its rate or drop it from the mixture")
    rows.append(row)
  return rows, warnings


def _components(inputs) -> list[tuple[str, dict, dict]]:
  """(stage name, task spec, blocks stats) of each mixed input, in order."""
  ups = inputs["tasks"]
  ups = ups if isinstance(ups, list) else [ups]
  return [(u.name, u.manifest["summary"]["task"], _stats(u)) for u in ups]


def _common(components, key: str, *, what: str, stage: str):
  values = {repr(spec.get(key)) for _, spec, _ in components}
  if len(values) > 1:
    detail = ", ".join(f"{s}: {spec.get(key)!r}" for s, spec, _ in components)
    raise ConfigError(f"the mixed tasks must share {what}, but they differ ({detail})",
                      stage=stage, field="inputs.tasks")
  return components[0][1].get(key)


@register
class Mixture(StageKind):
  kind = "mixture"
  version = "1"
  produces = "task"
  settings_cls = MixtureSettings
  slots = {"tasks": Slot(("task",), many=True, doc="the task-producing stages to mix (list)")}
  doc = "seqio Mixture of several tasks by rate (examples, tokens or token shares)"
  advisory = ("planned_train_steps", "planned_batch_size", "min_examples_per_source")

  def advise(self, settings, inputs):
    components = _components(inputs)
    rates = source_rates(components, rates=dict(settings.rates), rate_by=settings.rate_by)
    return starvation_report(components, rates, steps=settings.planned_train_steps,
                             batch=settings.planned_batch_size,
                             min_examples=settings.min_examples_per_source)[1]

  def check_inputs(self, settings, inputs):
    names = inputs.get("tasks") or []
    names = names if isinstance(names, list) else [names]
    unknown = sorted(set(settings.rates) - set(names))
    if unknown:
      raise ValueError(f"rates: {', '.join(map(repr, unknown))} is not among inputs.tasks "
                       f"{names}; rates are keyed by the names of the mixed stages")

  def run(self, ctx):
    from palmflow.stages.blocks import task_name
    s = ctx.settings
    # rates naming no input, and a stage listed twice, were refused when the file loaded
    components = _components(ctx.inputs)
    try:
      rates = source_rates(components, rates=dict(s.rates), rate_by=s.rate_by)
    except ValueError as e:
      raise ConfigError(str(e), stage=ctx.name, field="settings.rate_by") from None
    if not any(r > 0 for r in rates):
      raise ConfigError("every source's rate is 0", stage=ctx.name, field="settings.rates")
    vocab_key = "vocab_sha256" if all(c[1].get("vocab_sha256") for c in components) \
        else "vocab_path"
    _common(components, vocab_key, what="one vocabulary", stage=ctx.name)
    _common(components, "feature_lengths", what="feature lengths", stage=ctx.name)
    _common(components, "feature_converter", what="a feature converter", stage=ctx.name)
    first = components[0][1]
    splits = [sp for sp in first.get("splits", ["train"])
              if all(sp in c[1].get("splits", ["train"]) for c in components)]
    rows, warnings = starvation_report(
        components, rates, steps=s.planned_train_steps, batch=s.planned_batch_size,
        min_examples=s.min_examples_per_source)
    for r in rows:
      plan = (f", ~{r['expected_examples']:.1f} examples in the planned run"
              if "expected_examples" in r else "")
      ctx.log(f"{r['stage']}: rate {r['rate']:.6g}, share {r['share']:.2%}{plan}")
    for w in warnings:
      ctx.log(f"WARNING: {w}")
    spec = {"type": "mixture", "name": task_name(ctx.pipeline, ctx.name, ctx.fingerprint),
            "components": [c[1] for c in components],
            "rates": [[c[1]["name"], r] for c, r in zip(components, rates)],
            "rate_by": s.rate_by, "vocab_path": first["vocab_path"],
            "vocab_sha256": first.get("vocab_sha256"),
            "feature_lengths": first["feature_lengths"],
            "feature_converter": first["feature_converter"], "splits": splits}
    if "block_length" in first:
      spec["block_length"] = first["block_length"]
    write_json(ctx.out_dir / "task.json", spec)
    return {"task": spec, "sources": rows, "warnings": warnings,
            "planned": {"train_steps": s.planned_train_steps,
                        "batch_size": s.planned_batch_size}}

"""`report`: one Markdown page (and an HTML twin) with the DAG, stage times, data stats,
loss/accuracy curves and evaluation metrics, drawn as PNG pictures."""
from __future__ import annotations

import dataclasses
import html
import json
import logging
import re
import textwrap
from pathlib import Path

from palmflow.dag.kinds import Slot, StageKind, register, setting
from palmflow.dag.store import write_text

ALL_KINDS = ("documents", "vocabulary", "task", "checkpoint", "metrics")


@dataclasses.dataclass(frozen=True)
class ReportSettings:
  title: str = setting("palmflow run report", doc="the page title")


def _read_jsonl(p: Path) -> list[dict]:
  """The records of a metrics.jsonl; a line that is not a JSON object is skipped with a
  warning (a run killed while appending leaves a partial last line)."""
  if not p.exists():
    return []
  out = []
  for number, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except ValueError:
      record = None
    if not isinstance(record, dict):
      logging.getLogger("palmflow.report").warning(
          "%s:%d: skipping a line that is not a JSON object", p, number)
      continue
    out.append(record)
  return out


# DAG boxes by what a stage does: data (blue), training (green), evaluation (orange).
_KIND_COLORS = {**dict.fromkeys(("corpus", "vocab", "blocks", "dataset", "mixture"), "#cfe2f3"),
                "train": "#d9ead3", "eval": "#fce5cd"}


def draw_dag(stages: dict, edges: list[tuple[str, str]], path: Path) -> None:
  """Draws the DAG left to right by depth (boxes = stages, arrows = inputs)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  depth: dict[str, int] = {}

  def d(n):
    if n not in depth:
      ups = [a for a, b in edges if b == n]
      depth[n] = 1 + max((d(u) for u in ups), default=-1)
    return depth[n]
  for n in stages:
    d(n)
  cols: dict[int, list[str]] = {}
  for n in stages:
    cols.setdefault(depth[n], []).append(n)
  pos = {}
  for c, names in cols.items():
    for i, n in enumerate(names):
      pos[n] = (c * 2.6, -(i - (len(names) - 1) / 2) * 1.3)
  fig, ax = plt.subplots(figsize=(max(6, 2.6 * len(cols)),
                                  1.6 + 1.3 * max(map(len, cols.values()))))
  # The report reads every stage; draw only its edges from sinks to keep the picture legible.
  has_down = {a for a, b in edges if stages[b]["kind"] != "report"}
  edges = [(a, b) for a, b in edges if stages[b]["kind"] != "report" or a not in has_down]
  bow = 0.0
  for a, b in edges:
    (x0, y0), (x1, y1) = pos[a], pos[b]
    span = depth[b] - depth[a]
    to_report = stages[b]["kind"] == "report"
    # An edge that skips a column bows away from the middle row (above it from the upper
    # half, below from the lower), so that it passes around the boxes between, not through.
    rad = 0.0 if span <= 1 else (-0.3 if (y0 + y1) / 2 >= 0 else 0.3)
    bow = max(bow, abs(rad) * (x1 - x0 - 1.9) / 2)
    ax.annotate("", xy=(x1 - 0.95, y1), xytext=(x0 + 0.95, y0),
                arrowprops=dict(arrowstyle="->", color="#bbb" if to_report else "#444",
                                linestyle="--" if to_report else "-",
                                connectionstyle=f"arc3,rad={rad}"))
  for n, (x, y) in pos.items():
    info = stages[n]
    color = _KIND_COLORS.get(info["kind"], "#eeeeee")
    ax.add_patch(matplotlib.patches.FancyBboxPatch((x - 0.95, y - 0.4), 1.9, 0.8,
                                                    boxstyle="round,pad=0.05", fc=color,
                                                    ec="#333"))
    ax.text(x, y + 0.12, n, ha="center", va="center", fontsize=10, weight="bold")
    ax.text(x, y - 0.18, f"{info['kind']} · {info.get('duration_s', 0):.0f}s", ha="center",
            va="center", fontsize=8)
  ax.set_xlim(-1.2, max(x for x, _ in pos.values()) + 1.2)
  ys = [y for _, y in pos.values()]
  ax.set_ylim(min(ys) - 0.8 - bow, max(ys) + 0.8 + bow)
  ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def draw_curves(series: dict[str, list[tuple[int, float]]], path: Path, *, title: str,
                ylabel: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 3.6))
  for name, pts in series.items():
    if pts:
      ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None,
              label=name)
  ax.set_xlabel("step")
  ax.set_ylabel(ylabel)
  ax.set_title(textwrap.fill(title, 80), fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def draw_bars(values: dict[str, float], path: Path, *, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(values)))
  names = list(values)
  ax.barh(names, [values[n] for n in names], color="#6fa8dc")
  for i, n in enumerate(names):
    ax.text(values[n], i, f" {values[n]:.1f}", va="center", fontsize=8)
  ax.set_title(title)
  ax.set_xlim(0, max(100.0, max(values.values()) * 1.15))
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


@register
class Report(StageKind):
  kind = "report"
  version = "2"  # 2: documents in and blocked, the curves' titles, HTML inline code, DAG edges
  produces = "report"
  settings_cls = ReportSettings
  slots = {"stages": Slot(ALL_KINDS, many=True, doc="the stages to report on (list)")}
  doc = "Markdown/HTML page: DAG picture, timings, data stats, loss/accuracy curves, metrics"

  def run(self, ctx):
    out = ctx.out_dir
    ups = ctx.all_upstream
    edges = []
    for name, u in ups.items():
      for ref in u.manifest.get("upstream", {}).values():
        for r in (ref if isinstance(ref, list) else [ref]):
          edges.append((r, name))
    nodes = {n: {"kind": u.kind, "duration_s": u.manifest.get("duration_s", 0)}
             for n, u in ups.items()}
    nodes[ctx.name] = {"kind": "report", "duration_s": 0}
    direct = ctx.inputs["stages"]
    edges += [(u.name, ctx.name) for u in (direct if isinstance(direct, list) else [direct])]
    draw_dag(nodes, edges, out / "dag.png")
    md = [f"# {ctx.settings.title}", "", f"Pipeline `{ctx.pipeline}`.", "",
          "![DAG](dag.png)", "", "## Stages", "",
          "| stage | kind | fingerprint | time (s) | finished | output |",
          "|---|---|---|---|---|---|"]
    order = sorted(ups, key=lambda n: ups[n].manifest.get("finished", ""))
    for n in order:
      m = ups[n].manifest
      md.append(f"| {n} | {m['kind']} | `{m['fingerprint']}` | {m.get('duration_s', 0):.1f} "
                f"| {m.get('finished', '')} | `{ups[n].path}` |")
    total = sum(u.manifest.get('duration_s', 0) for u in ups.values())
    md.append(f"\nTotal stage time: {total:.0f} s.\n")
    images = []
    loss_series, acc_series, eval_loss, eval_acc = {}, {}, {}, {}
    task_metric_series = {}  # training's inference evaluation: a task metric per step
    metric_bars = {}
    for n in order:
      u, m = ups[n], ups[n].manifest
      summ = m.get("summary", {})
      if u.kind == "corpus":
        md += [f"## Data: `{n}`", "", f"{summ.get('documents')} documents, "
               f"{summ.get('bytes', 0) / 1e6:.2f} MB after cleaning.", ""]
        stats = u.path / "stats.json"
        if stats.exists():
          st = json.loads(stats.read_text())
          if st.get("rejections"):
            md.append("Rejections: " + ", ".join(f"{k}: {v['count']}" for k, v in
                                                 st["rejections"].items()) + "\n")
      elif u.kind == "vocab":
        md += [f"## Vocabulary: `{n}`", "", f"{summ.get('vocab_size')} pieces, sha256 "
               f"`{summ.get('sha256', '')[:16]}`.", ""]
      elif u.kind == "blocks":
        st = summ.get("stats", {})
        docs_in = st.get("documents_in", st.get("documents"))
        docs_out = st.get("documents_out", docs_in)
        md += [f"## Blocks: `{n}`", "", "| documents in | documents blocked | tokens | "
               "blocks | block length | packing efficiency | task |",
               "|---|---|---|---|---|---|---|",
               f"| {docs_in} | {docs_out} | {st.get('tokens')} | {st.get('blocks')} | "
               f"{st.get('block_length')} | {st.get('packing_efficiency', 0):.4f} | "
               f"`{summ['task']['name']}` |", ""]
        rejected = {k: v for k, v in (st.get("rejections") or {}).items() if v}
        if rejected:
          md += ["Documents not blocked: " + ", ".join(
              f"{k.replace('_', ' ')} {v}" for k, v in sorted(rejected.items())), ""]
      elif u.kind == "mixture":
        md += [f"## Mixture: `{n}`", "", f"Task `{summ['task']['name']}`, rates by "
               f"`{summ['task'].get('rate_by')}`:", "",
               "| source | rate | share | expected examples in the planned run |",
               "|---|---|---|---|"]
        for r in summ.get("sources", []):
          exp = r.get("expected_examples")
          md.append(f"| {r['stage']} | {r['rate']:.4g} | {r['share']:.2%} | "
                    f"{'' if exp is None else f'{exp:,.0f}'} |")
        md += [""] + [f"**Warning:** {w}" for w in summ.get("warnings", [])] + [""]
      elif u.kind == "dataset":
        st = summ.get("stats", {})
        examples = st.get("examples")
        if isinstance(examples, dict):
          examples = ", ".join(f"{k} {v:,}" for k, v in examples.items())
        labels = summ["task"].get("label_names")
        md += [f"## Downstream data: `{n}`", "", f"Examples: {examples}"
               + (f"; labels: {', '.join(map(str, labels))}" if labels else "") + ".", ""]
      elif u.kind == "train":
        rows = _read_jsonl(u.path / "train" / "metrics.jsonl")
        loss_series[f"{n} (train)"] = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        acc_series[f"{n} (train)"] = [(r["step"], 100 * r["accuracy"]) for r in rows
                                      if "accuracy" in r]
        for d in sorted((u.path / "training_eval").glob("*")):
          er = _read_jsonl(d / "metrics.jsonl")
          eval_loss[f"{n} (eval)"] = [(r["step"], r["loss"]) for r in er]
          eval_acc[f"{n} (eval)"] = [(r["step"], 100 * r["accuracy"]) for r in er]
        metric_files = sorted((u.path / "inference_eval").glob("*-metrics.jsonl"))
        for f in metric_files:
          rows_ = sorted(_read_jsonl(f), key=lambda r: r.get("step", 0))
          task = f.name[:-len("-metrics.jsonl")]
          where = n if len(metric_files) == 1 else f"{n}, {task}"
          for key in sorted({k for r in rows_ for k in r} - {"step"}):
            task_metric_series[f"{where}: {key}"] = [
                (r["step"], r[key]) for r in rows_ if isinstance(r.get(key), (int, float))]
        first = rows[0]["loss"] if rows else float("nan")
        last = rows[-1]["loss"] if rows else float("nan")
        md += [f"## Training: `{n}`", "", f"Steps {summ.get('start_step', 0)} → "
               f"{summ.get('step')}, {summ.get('num_params', 0):,} parameters; training loss "
               f"{first:.3f} → {last:.3f}. Files: `config.gin`, `model-info.txt`, "
               f"`command.sh` in `{u.path}`.", ""]
      elif u.kind == "eval":
        md += [f"## Evaluation: `{n}`", "", f"Step {summ.get('step')}, split "
               f"`{summ.get('split')}`, mode `{summ.get('mode')}`:", "",
               "| metric | value |", "|---|---|"]
        for k, v in summ.get("metrics", {}).items():
          md.append(f"| {k} | {v:.2f} |")
          metric_bars[f"{n}: {k}"] = v
        md.append("")
        pf = summ.get("predictions_file")
        if pf and Path(pf).exists():
          rows = _read_jsonl(Path(pf))[:5]
          md += ["Sample predictions:", "", "| inputs | prediction | target |", "|---|---|---|"]
          for r in rows:
            cut = lambda s: html.escape(str(s)[:90]).replace("|", "\\|")
            given = r.get("input") or {}
            given = given.get("inputs_pretokenized", given.get("inputs", "")) \
                if isinstance(given, dict) else given
            md.append(f"| {cut(given)} | {cut(r.get('prediction', r.get('score', '')))} | "
                      f"{cut(r.get('target', ''))} |")
          md.append("")
    if loss_series:
      draw_curves({**loss_series, **eval_loss}, out / "loss.png",
                  title="loss per target token (every token of a pretraining block; "
                  "a fine-tuning example's targets)",
                  ylabel="cross-entropy + z-loss per token")
      images.append(("Loss curves", "loss.png"))
    if acc_series:
      draw_curves({**acc_series, **eval_acc}, out / "accuracy.png",
                  title="token accuracy (each target token predicted from the true ones "
                  "before it, EOS included; not the task's accuracy)", ylabel="%")
      images.append(("Token accuracy (teacher-forced next-token predictions, not the task's "
                     "metric: see the task metrics)", "accuracy.png"))
    if task_metric_series:
      draw_curves(task_metric_series, out / "task_metrics.png",
                  title="task metrics on the model's predictions during training",
                  ylabel="metric")
      images.append(("Task metrics during training", "task_metrics.png"))
    if metric_bars:
      draw_bars(metric_bars, out / "metrics.png", title="evaluation metrics")
      images.append(("Evaluation metrics", "metrics.png"))
    md += ["## Curves", ""] + [f"### {t}\n\n![{t}]({f})\n" for t, f in images]
    text = "\n".join(md) + "\n"
    write_text(out / "report.md", text)
    write_text(out / "report.html", _to_html(text, ctx.settings.title))
    ctx.log(f"report: {out / 'report.md'}")
    return {"report": str(out / "report.md"), "images": [f for _, f in images] + ["dag.png"]}


def _inline(text: str) -> str:
  """Markdown's `code` and **bold** inside a line, as HTML (the text is already escaped
  where it came from data)."""
  text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
  return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)


def _to_html(md: str, title: str) -> str:
  """A minimal Markdown-to-HTML rendering (headings, tables, images, paragraphs)."""
  body, table = [], []

  def flush():
    if table:
      rows = [r for r in table if not set(r.replace("|", "").strip()) <= {"-"}]
      # Cells split on the pipes that are not escaped (`\\|` is a pipe inside a cell).
      cells = [[_inline(c.strip().replace("\\|", "|"))
                for c in re.split(r"(?<!\\)\|", r.strip().removeprefix("|").removesuffix("|"))]
               for r in rows]
      body.append("<table>" + "".join(
          "<tr>" + "".join(f"<{'th' if i == 0 else 'td'}>{c}</{'th' if i == 0 else 'td'}>"
                           for c in row) + "</tr>" for i, row in enumerate(cells)) + "</table>")
      table.clear()
  for line in md.splitlines():
    if line.startswith("|"):
      table.append(line)
      continue
    flush()
    if line.startswith("#"):
      level = len(line) - len(line.lstrip("#"))
      body.append(f"<h{level}>{_inline(html.escape(line.lstrip('# ')))}</h{level}>")
    elif line.startswith("!["):
      alt, src = line[2:].split("](")
      body.append(f'<img alt="{alt}" src="{src.rstrip(")")}">')
    elif line.strip():
      body.append(f"<p>{_inline(line)}</p>")
  flush()
  return (f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
          "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
          "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}"
          "img{max-width:100%}</style>\n" + "\n".join(body) + "\n")

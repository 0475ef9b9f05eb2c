"""The report's HTML page: its tables, inline code and escaped pipes."""
from palmflow.stages.report import _to_html


def test_html_renders_inline_code_bold_and_pipes_inside_cells():
  md = ("## Training: `pretrain`\n\nSteps 0 → 4, **warning** in `x`.\n\n"
        "| inputs | prediction |\n|---|---|\n| a \\| b | `c` |\n")
  page = _to_html(md, "t")
  assert "<h2>Training: <code>pretrain</code></h2>" in page
  assert "<p>Steps 0 → 4, <b>warning</b> in <code>x</code>.</p>" in page
  assert "<tr><th>inputs</th><th>prediction</th></tr>" in page
  assert "<tr><td>a | b</td><td><code>c</code></td></tr>" in page
  assert "`" not in page

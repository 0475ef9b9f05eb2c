"""Which of a train/eval binary's output lines the pipeline's console shows
(`palmflow.stages.common.echoed`) when the pipeline does not run in a terminal (in one, the
binary's stderr goes straight to it); every such line goes to the stage's log file."""
from __future__ import annotations

import pytest

from palmflow.stages import common

# Lines as the binaries print them (a stdlib_demo run's train.log and eval.log; a bad
# --gin_file).
SHOWN = [
    "train step 20/300 loss=5.406 accuracy=0.1636",
    "05:06:07 palmflow.eval: eval at step 500: {'stdlib_demo_packages': {'accuracy': 67.97}}",
    "05:05:26 palmflow.train: eval step 350: loss=0.5574 accuracy=0.8282",
    "05:05:59 absl: Given sequence lengths are longer than necessary for some evaluation "
    "inputs or targets, resulting in wasted computation.",
    "palmflow train: error: nope.gin, field '--gin_file': gin file not found",
]
HIDDEN = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1795920259.540737   21890 port.cc:153] oneDNN custom operations are on.",
    "E0000 00:00:1795920268.423597   21890 cuda_platform.cc:52] failed call to cuInit: "
    "INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)",
    "W0000 00:00:1795920268.5 21890 warning.cc:1] a native warning",
    "05:04:07 palmflow.train: checkpoint written",
]


@pytest.mark.parametrize("line", SHOWN)
def test_progress_results_errors_and_warnings_are_shown(line):
  assert common.echoed(line)


@pytest.mark.parametrize("line", HIDDEN)
def test_native_log_lines_and_the_absl_preamble_stay_in_the_log_file(line):
  assert not common.echoed(line)

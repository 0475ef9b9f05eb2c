"""Pretraining mixtures: several blocked sources drawn by rate into one seqio Mixture.

Like the tasks they mix, palmflow's mixtures are fingerprinted outputs of the `mixture`
stage, so they are registered from the spec that stage writes (`task.json` with
`"type": "mixture"`), not at import: `register_from_spec(spec)` registers each component
task (through `tasks.specs`) and then the mixture, under a name that carries the mixture
stage's fingerprint. Nothing is read at registration; seqio samples the components by
rate when a dataset is built.

    python -c "from tasks import specs; print(specs.register_from_file('STORE/mix/FP/task.json'))"
"""
from __future__ import annotations

from typing import Mapping, Sequence

import seqio

import tasks.pretraining  # noqa: F401 - the component tasks' declarations


BLOCK_FEATURES = ("targets_segment_ids", "targets_positions")


class BlockedMixture(seqio.Mixture):
  """A `seqio.Mixture` that keeps the blocks' segment ids and positions.

  `seqio.Mixture.get_dataset` keeps only the output features (`targets`) unless told
  otherwise, which would turn packed blocks into one long document each; this mixture
  passes `targets_segment_ids` and `targets_positions` through by default, so
  `BlockedLMFeatureConverter` sees the same features as with a single blocked task.
  """

  def get_dataset(self, *args, passthrough_features=None, **kwargs):
    keep = list(passthrough_features or []) + [f for f in BLOCK_FEATURES
                                               if f not in (passthrough_features or [])]
    return super().get_dataset(*args, passthrough_features=keep, **kwargs)


def register_mixture(name: str, tasks_and_rates: Sequence[tuple[str, float]]) -> seqio.Mixture:
  """Registers (or re-registers) a mixture of registered tasks.

  Args:
    name: the mixture name (carries the mixture stage's fingerprint).
    tasks_and_rates: (task name, rate) pairs in a fixed order; rates are relative (seqio
      draws each example from task i with probability rate_i / sum of rates).
  Returns:
    The registered `seqio.Mixture`.
  Raises:
    ValueError: a rate is negative or all rates are zero.
  """
  pairs = [(t, float(r)) for t, r in tasks_and_rates]
  if any(r < 0 for _, r in pairs) or not any(r > 0 for _, r in pairs):
    raise ValueError(f"mixture {name}: rates must be >= 0 and not all 0, got {pairs}")
  seqio.MixtureRegistry.remove(name)
  return seqio.MixtureRegistry.add(name, pairs, mixture_cls=BlockedMixture)


def register_from_spec(spec: Mapping) -> str:
  """Registers a `"type": "mixture"` spec's components, then the mixture; returns its name.

  The spec (written by the `mixture` stage) has `name`, `components` (task specs, each
  registered by `tasks.specs.register_from_spec`, mixtures allowed) and `rates`, a list of
  `[task name, rate]` in the components' order.
  """
  from tasks import specs
  for component in spec["components"]:
    specs.register_from_spec(component)
  register_mixture(spec["name"], [(t, r) for t, r in spec["rates"]])
  return spec["name"]

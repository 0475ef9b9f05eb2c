"""Test-wide setup that must happen before jax is imported.

Gives the CPU platform 8 simulated devices, so mesh and sharding tests run anywhere
(select them with ``jax.devices("cpu")``, which also works where a GPU/TPU is the default),
and makes XLA compile quickly: the tests' programs are tiny, so compilation, not running,
dominates their time (about a third less with these flags; results stay within the tests'
float tolerances). Subprocesses the tests start (train/eval binaries) inherit the flags.
"""

import os

_FLAGS = {
    "xla_force_host_platform_device_count": "8",
    "xla_backend_optimization_level": "0",
    "xla_llvm_disable_expensive_passes": "true",
}
_current = os.environ.get("XLA_FLAGS", "")
for _name, _value in _FLAGS.items():
  if _name not in _current:
    _current = f"{_current} --{_name}={_value}".strip()
os.environ["XLA_FLAGS"] = _current

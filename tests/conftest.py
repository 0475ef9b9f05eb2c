"""Test-wide setup that must happen before jax is imported.

Gives the CPU platform 8 simulated devices, so mesh and sharding tests run anywhere
(select them with ``jax.devices("cpu")``, which also works where a GPU/TPU is the default).
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()

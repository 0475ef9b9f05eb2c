"""Device mesh and logical axis rules: where each parameter and activation lives.

The mesh has two axes, ``data`` and ``model``. Model code names array axes logically
(``batch``, ``embed``, ``mlp``, ``heads``, ``vocab``, ...); a rule list maps each logical name to
a mesh axis or to None (replicated). A rule is skipped when its mesh axis is already used by
another dimension of the same array, so the next rule for that name (or replication) applies.

Local check on 8 simulated CPU devices::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -c "\
from palmflow.trainer import partitioning as p; print(p.Partitioner(mesh_shape=(2, 4)).mesh)"

On a TPU/GPU slice the same code builds the mesh from all devices of all processes (call
``jax.distributed.initialize()`` first on multi-host).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from palmflow.errors import ConfigError

LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

MESH_AXES = ("data", "model")

STANDARD_RULES: LogicalRules = (
    ("batch", "data"),
    ("vocab", "model"),
    ("mlp", "model"),
    ("heads", "model"),
    ("joined_kv", "model"),
    ("embed", None),
    ("kv", None),
    ("length", None),
    ("layers", None),
)
"""t5x's standard rules: batch over ``data``; vocab, mlp, heads, joined_kv over ``model``."""

DATA_PARALLEL_RULES: LogicalRules = (
    ("batch", "data"),
    ("vocab", None),
    ("mlp", None),
    ("heads", None),
    ("joined_kv", None),
    ("embed", None),
    ("kv", None),
    ("length", None),
    ("layers", None),
)
"""Pure data parallelism: parameters replicated, batch over ``data``."""

MODEL_PARALLEL_RULES: LogicalRules = (
    ("batch", None),
    ("vocab", "model"),
    ("mlp", "model"),
    ("heads", "model"),
    ("joined_kv", "model"),
    ("embed", None),
    ("kv", None),
    ("length", None),
    ("layers", None),
)
"""Pure tensor parallelism: batch replicated, wide axes over ``model``."""

FULLY_SHARDED_RULES: LogicalRules = (
    ("batch", "data"),
    ("vocab", "model"),
    ("mlp", "model"),
    ("heads", "model"),
    ("joined_kv", "model"),
    ("embed", "data"),
    ("kv", None),
    ("length", None),
    ("layers", None),
)
"""2-D sharding: as STANDARD_RULES, and parameters' ``embed`` axis over ``data`` too (ZeRO-3 /
FSDP-like). Activations keep batch on ``data``, so their ``embed`` axis falls back to replicated.
"""


def _is_box(x: Any) -> bool:
  return isinstance(x, nn.Partitioned)


def _format_axes(axes: Sequence[Any]) -> str:
  return "(" + ", ".join("None" if a is None else str(a) for a in axes) + ")"


class Partitioner:
  """A ``data`` x ``model`` device mesh plus logical axis rules.

  Model code run inside `activate` (or through `partition`) sees the mesh and the rules, so
  ``nn.with_logical_constraint`` and boxed parameters turn into sharding constraints.
  """

  def __init__(
      self,
      *,
      num_partitions: int | None = None,
      mesh_shape: tuple[int, int] | None = None,
      logical_axis_rules: LogicalRules = STANDARD_RULES,
      devices: Sequence[jax.Device] | None = None,
      model_parallel_submesh: tuple[int, ...] | None = None,
  ) -> None:
    """Builds the mesh.

    Args:
        num_partitions: size of the ``model`` axis; ``data`` gets the remaining devices.
            -1: every device on the ``model`` axis. Give this or ``mesh_shape``;
            neither means ``num_partitions=1``.
        mesh_shape: (data, model) sizes whose product is the number of devices.
        logical_axis_rules: (logical name, mesh axis or None) pairs, in priority order.
        devices: the devices to use; default all devices of all processes.
        model_parallel_submesh: t5x's alternative to num_partitions, the TPU submesh
            (x, y, z, cores) of one model replica. Only its product is used, as the
            ``model`` axis size; the device order is jax's (topology-aware on TPU), not the
            submesh's shape.

    Raises:
        ValueError: if the mesh does not fit the devices or the rules name unknown mesh axes.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    given = [name for name, v in (("num_partitions", num_partitions),
                                  ("mesh_shape", mesh_shape),
                                  ("model_parallel_submesh", model_parallel_submesh))
             if v is not None]
    if len(given) > 1:
      raise ConfigError(f"give one of num_partitions, mesh_shape and model_parallel_submesh, "
                        f"not {' and '.join(given)}",
                        field="Partitioner." + " / ".join(given),
                        hint="set NUM_PARTITIONS, MESH_SHAPE or MODEL_PARALLEL_SUBMESH, and "
                             "the others to None")
    if model_parallel_submesh is not None:
      sub = tuple(model_parallel_submesh) if isinstance(
          model_parallel_submesh, (list, tuple)) else (model_parallel_submesh,)
      if len(sub) != 4 or not all(isinstance(d, (int, np.integer))
                                  and not isinstance(d, bool) and d >= 1 for d in sub):
        raise ConfigError(f"model_parallel_submesh must be 4 sizes >= 1, (x, y, z, cores), "
                          f"e.g. (1, 1, 1, 2), not {model_parallel_submesh!r}",
                          field="Partitioner.model_parallel_submesh (MODEL_PARALLEL_SUBMESH)")
      num_partitions = math.prod(int(d) for d in sub)
    if mesh_shape is None:
      num_partitions = 1 if num_partitions is None else num_partitions
      if num_partitions == -1:
        num_partitions = n
      if num_partitions < 1 or n % num_partitions:
        raise ConfigError(
            f"num_partitions={num_partitions} must divide the number of devices ({n})",
            field="Partitioner.num_partitions (NUM_PARTITIONS)")
      mesh_shape = (n // num_partitions, num_partitions)
    mesh_shape = tuple(int(s) for s in mesh_shape)
    if len(mesh_shape) != 2 or math.prod(mesh_shape) != n or min(mesh_shape) < 1:
      raise ConfigError(
          f"mesh_shape={mesh_shape} must be (data, model) with data * model == {n} "
          f"devices", field="Partitioner.mesh_shape (MESH_SHAPE)",
          hint=f"e.g. ({n}, 1) for data parallelism or (1, {n}) for model parallelism")
    for logical, mesh_axes in logical_axis_rules:
      named = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
      for axis in named:
        if axis not in MESH_AXES:
          raise ConfigError(
              f"logical axis rule ({logical!r}, {mesh_axes!r}) names mesh axis "
              f"{axis!r}; the mesh axes are {MESH_AXES}",
              field="Partitioner.logical_axis_rules")
    self._rules: LogicalRules = tuple((k, v) for k, v in logical_axis_rules)
    self._mesh = Mesh(self._device_grid(devices, mesh_shape), MESH_AXES)

  @staticmethod
  def _device_grid(devices: list[jax.Device], mesh_shape: tuple[int, int]) -> np.ndarray:
    """Arranges devices so that the ``model`` axis uses the fastest links where known."""
    if devices and devices[0].platform == "tpu":
      from jax.experimental import mesh_utils
      try:
        return mesh_utils.create_device_mesh(mesh_shape, devices=devices)
      except (ValueError, NotImplementedError, AssertionError) as e:
        logging.getLogger(__name__).warning(
            "mesh %s: no topology-aware TPU device order (%s: %s); devices are placed in "
            "jax.devices() order", mesh_shape, type(e).__name__, e)
    # jax.devices() lists devices process by process, so the model axis stays within a host
    # whenever it fits there.
    return np.asarray(devices, dtype=object).reshape(mesh_shape)

  @property
  def mesh(self) -> Mesh:
    """The ``("data", "model")`` device mesh."""
    return self._mesh

  @property
  def logical_axis_rules(self) -> LogicalRules:
    """The logical axis rules, in priority order."""
    return self._rules

  @contextlib.contextmanager
  def activate(self) -> Iterator[Partitioner]:
    """Context in which jit/init/apply see this mesh and the logical axis rules.

    Yields:
        This partitioner.
    """
    with jax.set_mesh(self._mesh), nn.logical_axis_rules(self._rules):
      yield self

  def logical_to_mesh_spec(self, logical_spec_tree: Any) -> Any:
    """Maps a tree of logical ``PartitionSpec``s to mesh ``PartitionSpec``s.

    Args:
        logical_spec_tree: pytree whose leaves are PartitionSpecs of logical names.

    Returns:
        The same tree with mesh-axis PartitionSpecs.
    """
    return nn.logical_to_mesh(logical_spec_tree, self._rules)

  def logical_to_mesh_sharding(self, logical_spec_tree: Any) -> Any:
    """Maps a tree of logical ``PartitionSpec``s to ``NamedSharding``s on this mesh.

    Args:
        logical_spec_tree: pytree whose leaves are PartitionSpecs of logical names.

    Returns:
        The same tree with ``NamedSharding`` leaves.
    """
    return nn.logical_to_mesh_sharding(logical_spec_tree, self._mesh, self._rules)

  def get_param_shardings(self, abstract_boxed_params: Any) -> Any:
    """Shardings for a tree of (abstract) parameters boxed with logical axis names.

    Args:
        abstract_boxed_params: e.g. ``jax.eval_shape(model.init, ...)``; leaves are
            ``nn.LogicallyPartitioned`` boxes (unboxed leaves are replicated).

    Returns:
        A tree of ``NamedSharding`` with the structure of the *unboxed* parameters, usable as
        jit ``in_shardings``/``out_shardings``.

    Raises:
        ValueError: naming the parameter, if a dimension does not divide evenly over the mesh
            axes its logical axis maps to.
    """
    leaves = jax.tree_util.tree_flatten_with_path(abstract_boxed_params, is_leaf=_is_box)[0]
    for path, leaf in leaves:
      if not _is_box(leaf):
        continue
      names = tuple(leaf.names)
      mesh_axes = nn.logical_to_mesh_axes(names, self._rules)
      shape = leaf.unbox(apply_constraint=False).shape
      for dim, (size, name, axes) in enumerate(zip(shape, names, mesh_axes)):
        shards = _axis_size(self._mesh, axes)
        if size % shards:
          raise ConfigError(
              f"parameter {_format_path(path)} {tuple(shape)}: dimension {dim} "
              f"(logical {name!r}, size {size}) cannot be split over mesh axis "
              f"{axes!r} of size {shards} (mesh {_format_mesh(self._mesh)})",
              field="Partitioner.mesh_shape / logical_axis_rules",
              hint=f"choose a mesh whose {axes!r} size divides {size}, or map {name!r} to "
              "None in the logical axis rules")
    return self.logical_to_mesh_sharding(nn.get_partition_spec(abstract_boxed_params))

  def data_sharding(self, ndim: int = 1) -> NamedSharding:
    """Sharding of a batch array: its leading axis follows the ``batch`` rule.

    Args:
        ndim: rank of the array.

    Returns:
        The ``NamedSharding`` for an array of that rank.
    """
    spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), self._rules)
    return NamedSharding(self._mesh, spec)

  def data_layout(self, global_batch: int) -> tuple[int, int]:
    """(shard index, number of shards) of the data this process must read.

    The rows of a global batch that this process's devices hold, as the ``batch`` rule
    places them (t5x's data layout): with the batch split over every process (data
    parallelism), each reads its own part; where several processes hold the same rows (a
    mesh whose batch axes are smaller than the number of processes, e.g. model parallelism
    across hosts), they read the same shard, and with a replicated batch every process reads
    the whole batch. `Partitioner.shard_batch` then takes those rows.

    Raises:
        ConfigError: the process's rows are not one contiguous, even part of the batch.
    """
    indices = self.data_sharding(1).devices_indices_map((global_batch,))
    mine = sorted({(s[0].start or 0, global_batch if s[0].stop is None else s[0].stop)
                   for d, s in indices.items() if d.process_index == jax.process_index()})
    start, stop = mine[0][0], mine[-1][1]
    size = stop - start
    if sum(b - a for a, b in mine) != size or global_batch % size or start % size:
      raise ConfigError(
          f"process {jax.process_index()} holds rows {mine} of a batch of {global_batch} "
          f"on the mesh {dict(self._mesh.shape)}: not one even part of it",
          field="Partitioner.mesh_shape / logical_axis_rules",
          hint="order the mesh's devices so that each process holds one block of the "
               "data axis")
    return start // size, global_batch // size

  def shard_batch(self, batch: Any) -> Any:
    """Places this process's part of a batch on the mesh, split along ``batch``.

    Every process passes its own rows; the global batch is their concatenation in process
    order (with a replicated ``batch`` rule every process must pass the same rows).

    Args:
        batch: pytree of host arrays (e.g. a dict of numpy arrays), batch-major.

    Returns:
        The same tree of global ``jax.Array``s.

    Raises:
        ValueError: if the rows cannot be split evenly over the local devices.
    """
    def place(x: Any) -> jax.Array:
      x = np.asarray(x)
      sharding = self.data_sharding(x.ndim)
      shards = _axis_size(self._mesh, sharding.spec[0] if x.ndim else None)
      local = max(1, shards // jax.process_count())
      if x.ndim == 0 or x.shape[0] % local:
        raise ConfigError(
            f"a batch array of shape {x.shape} cannot be split over {local} local "
            f"shards of the mesh {dict(self._mesh.shape)}", field="BATCH_SIZE",
            hint=f"make the per-process batch size a multiple of {local}")
      return jax.make_array_from_process_local_data(sharding, x)
    return jax.tree.map(place, batch)

  def abstract_init(self, init_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Shapes of ``init_fn(*args, **kwargs)`` without computing or allocating anything.

    Args:
        init_fn: e.g. ``model.init``, returning boxed variables.
        *args: its positional arguments (arrays or ``jax.ShapeDtypeStruct``s).
        **kwargs: its keyword arguments.

    Returns:
        The tree of boxed ``jax.ShapeDtypeStruct``s.
    """
    with self.activate():
      return jax.eval_shape(init_fn, *args, **kwargs)

  def sharded_init(self, init_fn: Callable[..., Any], *args: Any,
                   **kwargs: Any) -> tuple[Any, Any]:
    """Runs ``init_fn`` under jit so that each parameter is created directly in its shards.

    Args:
        init_fn: e.g. ``model.init``, returning boxed variables.
        *args: its positional arguments (e.g. an rng key and dummy inputs).
        **kwargs: its keyword arguments.

    Returns:
        ``(params, abstract_boxed_params)``: the unboxed, sharded variables, and their boxed
        shapes (for `get_param_shardings` and `describe`).
    """
    abstract = self.abstract_init(init_fn, *args, **kwargs)
    shardings = self.get_param_shardings(abstract)
    with self.activate():
      params = jax.jit(lambda *a, **k: nn.unbox(init_fn(*a, **k)),
                       out_shardings=shardings)(*args, **kwargs)
    return params, abstract

  def partition(self, fn: Callable[..., Any], *, in_shardings: Any = None,
                out_shardings: Any = None, static_argnums: int | Sequence[int] = (),
                donate_argnums: int | Sequence[int] = (),
                compiler_options: dict[str, Any] | None = None) -> Callable[..., Any]:
    """jit ``fn`` with shardings, tracing and running it inside `activate`.

    Args:
        fn: the function to compile.
        in_shardings: as for ``jax.jit`` (None: inferred from the arguments).
        out_shardings: as for ``jax.jit`` (None: chosen by the compiler).
        static_argnums: as for ``jax.jit``.
        donate_argnums: as for ``jax.jit``.
        compiler_options: as for ``jax.jit``: XLA options for this function only (the
            ``DebugOptions`` field names of ``XLA_FLAGS``; enum values spelled out).

    Returns:
        A callable with ``fn``'s signature.
    """
    jit_kwargs: dict[str, Any] = {"static_argnums": static_argnums,
                                  "donate_argnums": donate_argnums}
    if in_shardings is not None:
      jit_kwargs["in_shardings"] = in_shardings
    if out_shardings is not None:
      jit_kwargs["out_shardings"] = out_shardings
    if compiler_options:
      jit_kwargs["compiler_options"] = dict(compiler_options)
    jitted = jax.jit(fn, **jit_kwargs)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
      with self.activate():
        return jitted(*args, **kwargs)
    return wrapped

  def describe(self, params: Any, *, title: str = "Parameters", header: bool = True,
               skip_scalars: bool = False) -> str:
    """Human-readable mesh, rules and per-parameter sharding (the model-info.txt text).

    Args:
        params: boxed parameters (concrete or from `abstract_init`), or unboxed arrays (their
            logical axes are then unknown and the spec is read from the array if placed).
        title: what the table lists ("Parameters", "Optimizer state").
        header: start with the mesh and the rules.
        skip_scalars: leave out arrays of one value (step counts, placeholders), counted.

    Returns:
        Lines: the mesh, the rules, then for every parameter its path, shape, dtype, logical
        axes, mesh PartitionSpec and per-device shard shape, and the totals.
    """
    mesh = self._mesh
    devices = mesh.devices.flatten()
    lines = []
    if header:
      lines = [
          f"Mesh: {_format_mesh(mesh)} = {devices.size} devices "
          f"({devices[0].platform}, {jax.process_count()} process(es))",
          "Logical axis rules (first free match wins):",
      ]
      lines += [f"  {logical:<10} -> {mesh_axes}" for logical, mesh_axes in self._rules]
    rows = [("path", "shape", "dtype", "logical axes", "mesh spec", "per-device shard")]
    total = total_bytes = skipped = 0
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_box)[0]
    for path, leaf in leaves:
      if skip_scalars and not _is_box(leaf) and math.prod(np.shape(leaf)) <= 1:
        skipped += 1
        continue
      if _is_box(leaf):
        value = leaf.unbox(apply_constraint=False)
        names = tuple(leaf.names)
        spec = PartitionSpec(*nn.logical_to_mesh_axes(names, self._rules))
        logical = _format_axes(names)
      else:
        value = leaf
        sharding = getattr(value, "sharding", None)
        spec = sharding.spec if isinstance(sharding, NamedSharding) else PartitionSpec()
        logical = "-"
      shape = tuple(value.shape)
      dtype = np.dtype(value.dtype)
      padded = tuple(spec) + (None,) * (len(shape) - len(spec))
      shard = tuple(-(-dim // _axis_size(mesh, axes)) for dim, axes in zip(shape, padded))
      size = math.prod(shape)
      total += size
      total_bytes += size * dtype.itemsize
      rows.append((_format_path(path), str(shape), dtype.name, logical,
                   _format_axes(padded), str(shard)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines.append(f"{title}: {len(rows) - 1} arrays, {total:,} values, "
                 f"{_format_bytes(total_bytes)}"
                 + (f" ({skipped} arrays of one value not listed)" if skipped else ""))
    for row in rows:
      lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(lines) + "\n"


def _axis_size(mesh: Mesh, axes: str | tuple[str, ...] | None) -> int:
  """Number of shards a dimension mapped to ``axes`` is split into."""
  if axes is None:
    return 1
  if isinstance(axes, str):
    axes = (axes,)
  return math.prod(mesh.shape[a] for a in axes)


def _format_bytes(num: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if num < 1024 or unit == "GiB":
      return f"{num:.1f} {unit}" if unit != "B" else f"{num} B"
    num /= 1024
  return f"{num} B"


def _format_mesh(mesh: Mesh) -> str:
  return " x ".join(f"{name}={size}" for name, size in mesh.shape.items())


def _format_path(path: Sequence[Any]) -> str:
  parts = []
  for key in path:
    name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
    parts.append(str(name))
  return "/".join(parts)


RULE_SETS: dict[str, LogicalRules] = {
    "standard": STANDARD_RULES,
    "data_parallel": DATA_PARALLEL_RULES,
    "model_parallel": MODEL_PARALLEL_RULES,
    "fully_sharded": FULLY_SHARDED_RULES,
}


def logical_axis_rules(name: str = "standard") -> LogicalRules:
  """A named rule set (what ``gin/partitioning/*.gin`` bind).

  Args:
      name: one of ``RULE_SETS``.

  Returns:
      The rules.

  Raises:
      ValueError: for an unknown name.
  """
  if name not in RULE_SETS:
    raise ConfigError(f"unknown logical axis rule set {name!r}; known: {sorted(RULE_SETS)}",
                      field="partitioning.logical_axis_rules.name")
  return RULE_SETS[name]

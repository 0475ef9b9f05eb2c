"""Tests of meshes, logical axis rules and sharded init/apply on 8 simulated CPU devices.

tests/conftest.py gives the CPU platform 8 devices before jax is imported.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from palmflow.trainer import losses, models, partitioning

CPUS = jax.devices("cpu")
# Heads, mlp and vocab divide by 8, so every mesh below can shard them.
CONFIG = models.PaLMConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=8, head_dim=8,
                           d_ff=64)
MESHES = [(8, 1), (1, 8), (2, 4)]


def setup_module():
  assert len(CPUS) >= 8, (
      "tests/conftest.py must set XLA_FLAGS=--xla_force_host_platform_device_count=8 before "
      "jax is imported")


def _batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, CONFIG.vocab_size, size=(8, 16)).astype(np.int32)
  segment_ids = np.repeat([[1] * 10 + [2] * 6], 8, axis=0).astype(np.int32)
  positions = np.concatenate([np.arange(10), np.arange(6)])[None].repeat(8, 0).astype(np.int32)
  return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions,
          "targets": np.roll(tokens, -1, axis=1), "weights": np.ones((8, 16), np.float32)}


def _loss_fn(model):
  def loss(params, batch):
    logits = model.apply(params, batch["tokens"], segment_ids=batch["segment_ids"],
                         positions=batch["positions"])
    return losses.cross_entropy_loss(logits, batch["targets"], weights=batch["weights"],
                                     label_smoothing=0.1)[0]
  return loss


def _partitioner(mesh_shape, rules=partitioning.STANDARD_RULES):
  return partitioning.Partitioner(mesh_shape=mesh_shape, logical_axis_rules=rules,
                                  devices=CPUS[:math.prod(mesh_shape)])


MODEL = models.PaLMDecoder(config=CONFIG)


@pytest.fixture(scope="module")
def reference():
  """Parameters, loss and gradients on a single device."""
  params = nn.unbox(jax.jit(MODEL.init)(jax.random.key(0), jnp.zeros((8, 16), jnp.int32)))
  loss, grads = jax.jit(jax.value_and_grad(_loss_fn(MODEL)))(params, _batch())
  return params, float(loss), grads


@pytest.fixture(scope="module")
def fully_sharded():
  """A 2x4 FULLY_SHARDED partitioner and the parameters its `sharded_init` created."""
  partitioner = _partitioner((2, 4), partitioning.FULLY_SHARDED_RULES)
  params, abstract = partitioner.sharded_init(MODEL.init, jax.random.key(0),
                                              jnp.zeros((8, 16), jnp.int32))
  return partitioner, params, abstract


def _expected_spec(names, rules):
  table = dict(rules)
  used, spec = set(), []
  for name in names:
    axis = table.get(name)
    spec.append(axis if axis not in used else None)
    used.add(axis)
  return tuple(spec)


def _assert_sharded_by_rules(partitioner, params, abstract):
  boxes = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  arrays = jax.tree.leaves(params)
  assert len(boxes) == len(arrays) == 10
  for box, array in zip(boxes, arrays):
    expected = _expected_spec(box.names, partitioner.logical_axis_rules)
    padded = tuple(array.sharding.spec) + (None,) * (array.ndim - len(array.sharding.spec))
    assert padded == expected, box.names
    shard_shape = tuple(
        dim // (1 if axis is None else partitioner.mesh.shape[axis])
        for dim, axis in zip(array.shape, expected))
    assert {s.data.shape for s in array.addressable_shards} == {shard_shape}, box.names


@pytest.mark.parametrize("mesh_shape, rules_name", [
    ((8, 1), "STANDARD_RULES"), ((1, 8), "STANDARD_RULES"), ((2, 4), "STANDARD_RULES"),
    ((2, 4), "FULLY_SHARDED_RULES")], ids=lambda x: x if isinstance(x, str) else "%dx%d" % x)
def test_same_forward_loss_on_every_mesh_with_params_sharded_by_rules(
        reference, mesh_shape, rules_name):
  partitioner = _partitioner(mesh_shape, getattr(partitioning, rules_name))
  assert partitioner.mesh.shape == {"data": mesh_shape[0], "model": mesh_shape[1]}
  abstract = partitioner.abstract_init(MODEL.init, jax.random.key(0),
                                       jnp.zeros((8, 16), jnp.int32))
  shardings = partitioner.get_param_shardings(abstract)
  params = jax.device_put(reference[0], shardings)
  _assert_sharded_by_rules(partitioner, params, abstract)
  loss = partitioner.partition(_loss_fn(MODEL), in_shardings=(shardings, None))(
      params, partitioner.shard_batch(_batch()))
  np.testing.assert_allclose(loss, reference[1], rtol=1e-5)

  embedding = params["params"]["embedding"]
  data_size = mesh_shape[0] if rules_name == "FULLY_SHARDED_RULES" else 1
  assert embedding.sharding.shard_shape(embedding.shape) == (
      CONFIG.vocab_size // mesh_shape[1], CONFIG.d_model // data_size)


def test_sharded_init_and_gradients_match_single_device(reference, fully_sharded):
  partitioner, params, abstract = fully_sharded
  _assert_sharded_by_rules(partitioner, params, abstract)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params), reference[0])
  shardings = partitioner.get_param_shardings(abstract)
  step = partitioner.partition(jax.value_and_grad(_loss_fn(MODEL)),
                               in_shardings=(shardings, partitioner.data_sharding(2)),
                               out_shardings=(None, shardings))
  loss, grads = step(params, partitioner.shard_batch(_batch()))
  np.testing.assert_allclose(loss, reference[1], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5),
               jax.tree.map(np.asarray, grads), reference[2])
  _assert_sharded_by_rules(partitioner, grads, abstract)


def test_num_partitions_and_mesh_errors():
  assert partitioning.Partitioner(num_partitions=4, devices=CPUS[:8]).mesh.shape == {
      "data": 2, "model": 4}
  assert partitioning.Partitioner(devices=CPUS[:8]).mesh.shape == {"data": 8, "model": 1}
  for n in (4, 8):  # -1 (model_parallel.gin's default): every device on the model axis
    assert partitioning.Partitioner(num_partitions=-1, devices=CPUS[:n]).mesh.shape == {
        "data": 1, "model": n}
  with pytest.raises(ValueError, match="data \\* model == 8"):
    partitioning.Partitioner(mesh_shape=(3, 2), devices=CPUS[:8])
  with pytest.raises(ValueError, match="must divide"):
    partitioning.Partitioner(num_partitions=3, devices=CPUS[:8])
  with pytest.raises(ValueError, match="'replica'"):
    partitioning.Partitioner(logical_axis_rules=(("batch", "replica"),), devices=CPUS[:8])
  # t5x's model_parallel_submesh: its product is the model axis.
  assert partitioning.Partitioner(model_parallel_submesh=(1, 1, 2, 2),
                                  devices=CPUS[:8]).mesh.shape == {"data": 2, "model": 4}
  with pytest.raises(ValueError, match="not num_partitions and model_parallel_submesh"):
    partitioning.Partitioner(num_partitions=2, model_parallel_submesh=(1, 1, 1, 2),
                             devices=CPUS[:8])
  for bad in ((1, 1, 1, 0), (2, 2)):
    with pytest.raises(ValueError, match="model_parallel_submesh must be 4 sizes"):
      partitioning.Partitioner(model_parallel_submesh=bad, devices=CPUS[:8])


def test_partition_passes_compiler_options_to_xla():
  """`Partitioner.partition(compiler_options=...)` compiles with them (bench_train's A/Bs of
  XLA settings rely on it): an invalid value is rejected by XLA, naming the option."""
  partitioner = partitioning.Partitioner(devices=CPUS[:1])
  fn = lambda x: jnp.max(x * 2, axis=-1)
  x = jnp.ones((4, 8))
  plain = partitioner.partition(fn)(x)
  tuned = partitioner.partition(fn, compiler_options={
      "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"})(x)
  np.testing.assert_array_equal(np.asarray(tuned), np.asarray(plain))
  bad = partitioner.partition(fn, compiler_options={
      "xla_cpu_experimental_ynn_fusion_type": "NOT_A_FUSION_TYPE"})
  with pytest.raises(jax.errors.JaxRuntimeError, match="xla_cpu_experimental_ynn_fusion_type"):
    bad(x)


def test_rule_sets():
  standard = dict(partitioning.STANDARD_RULES)
  assert standard["batch"] == "data"
  assert {standard[k] for k in ("vocab", "mlp", "heads", "joined_kv")} == {"model"}
  assert {standard[k] for k in ("embed", "kv", "length", "layers")} == {None}
  data = dict(partitioning.DATA_PARALLEL_RULES)
  assert data.pop("batch") == "data" and set(data.values()) == {None}
  model = dict(partitioning.MODEL_PARALLEL_RULES)
  assert model["batch"] is None and model["mlp"] == "model"
  fully = dict(partitioning.FULLY_SHARDED_RULES)
  assert fully["embed"] == "data" and fully["batch"] == "data"


def test_shard_batch_splits_rows_over_data_and_replicates_under_model_parallel_rules():
  partitioner = partitioning.Partitioner(mesh_shape=(2, 4), devices=CPUS[:8])
  batch = partitioner.shard_batch({"tokens": np.arange(32).reshape(8, 4)})
  tokens = batch["tokens"]
  assert tokens.shape == (8, 4) and tokens.sharding.spec == P("data", None)
  assert {s.data.shape for s in tokens.addressable_shards} == {(4, 4)}
  np.testing.assert_array_equal(tokens, np.arange(32).reshape(8, 4))
  with pytest.raises(ValueError, match="multiple of 2"):
    partitioner.shard_batch({"tokens": np.zeros((3, 4))})
  replicated = partitioning.Partitioner(
      mesh_shape=(2, 4), logical_axis_rules=partitioning.MODEL_PARALLEL_RULES,
      devices=CPUS[:8]).shard_batch(np.zeros((3, 4)))
  assert replicated.sharding.is_fully_replicated


def test_activation_constraints_follow_the_rules(fully_sharded):
  partitioner, params, _ = fully_sharded
  logits = partitioner.partition(MODEL.apply)(params, partitioner.shard_batch(_batch())["tokens"])
  # batch -> data; vocab -> model; the activations' embed axis loses "data" to batch.
  assert logits.sharding.spec == P("data", None, "model")


def test_describe_lists_mesh_rules_and_every_parameter():
  partitioner = _partitioner((2, 4), partitioning.FULLY_SHARDED_RULES)
  abstract = partitioner.abstract_init(MODEL.init, jax.random.key(0),
                                       jnp.zeros((1, 8), jnp.int32))
  text = partitioner.describe(abstract)
  assert "Mesh: data=2 x model=4 = 8 devices" in text
  assert f"{models.count_params(CONFIG):,} values" in text
  line = next(x for x in text.splitlines() if "layers/mlp/wi_gate" in x)
  assert line.split() == ["params/layers/mlp/wi_gate", "(2,", "32,", "64)", "float32",
                          "(layers,", "embed,", "mlp)", "(None,", "data,", "model)",
                          "(2,", "16,", "16)"]
  paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(
      abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]]
  assert len(paths) == 10 and all(
      "/".join(str(k.key) for k in path) in text for path in paths)


def test_indivisible_parameter_is_named():
  partitioner = partitioning.Partitioner(mesh_shape=(1, 8), devices=CPUS[:8])
  config = models.PaLMConfig(vocab_size=64, num_layers=1, d_model=32, num_heads=4,
                             head_dim=8, d_ff=64)
  abstract = partitioner.abstract_init(models.PaLMDecoder(config=config).init,
                                       jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  with pytest.raises(ValueError, match="layers/attention/.*'heads', size 4.*'model'"):
    partitioner.get_param_shardings(abstract)


def test_named_rule_sets_for_gin():
  assert partitioning.logical_axis_rules("fully_sharded") is partitioning.FULLY_SHARDED_RULES
  assert partitioning.logical_axis_rules() is partitioning.STANDARD_RULES
  with pytest.raises(ValueError, match="data_parallel"):
    partitioning.logical_axis_rules("fsdp")


@pytest.mark.parametrize("name", ["adamw", "adafactor with momentum"])
def test_optimizer_state_is_sharded_like_its_parameters(fully_sharded, name):
  # Adam's moments and Adafactor's momentum have the parameters' shapes and shardings;
  # Adafactor's factored moments keep the mesh axes of the axes they keep; counts are
  # replicated (t5x partitions the optimizer state as the parameters).
  from palmflow.trainer import optimizers, train_lib
  partitioner, params, abstract = fully_sharded
  params = nn.unbox(params)["params"]
  tx = {"adamw": optimizers.adamw(learning_rate=0.1),
        "adafactor with momentum": optimizers.adafactor(learning_rate=0.1, momentum=0.9)}[name]
  axes = nn.get_partition_spec(abstract["params"])
  tx = optimizers.with_param_axes(tx, axes)
  shardings = train_lib.optimizer_state_shardings(
      jax.eval_shape(tx.init, params), params, partitioner.mesh,
      moment_axes=optimizers.factored_moment_axes(tx, axes))
  state = jax.jit(tx.init, out_shardings=shardings)(params)
  wi = params["layers"]["mlp"]["wi"]
  assert wi.sharding.spec == P(None, "data", "model")
  found = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    key = jax.tree_util.keystr(path)
    if key.endswith("['layers']['mlp']['wi']") and leaf.size > 1:
      found[key.split("[")[2].split(".")[-1]] = (leaf.shape, leaf.sharding.spec)
    elif leaf.ndim == 0 or leaf.shape == (1,):  # counts, placeholders
      assert leaf.sharding.spec == P(), key
  if name == "adamw":
    assert found == {"mu": (wi.shape, wi.sharding.spec), "nu": (wi.shape, wi.sharding.spec)}
  else:
    assert found == {"v_row": ((2, 32), P(None, "data")), "v_col": ((2, 64), P(None, "model")),
                     "ema": (wi.shape, wi.sharding.spec)}


def test_factored_moments_keep_the_mesh_axes_of_the_axes_the_rules_keep():
  # A kernel whose embed and mlp axes have one size: v_col keeps (layers, mlp), sharded
  # (None, model); matching axes by size alone would have taken embed's data axis.
  from palmflow.trainer import optimizers, train_lib
  mesh = _partitioner((2, 4)).mesh
  params = {"layers": {"w": jax.device_put(
      jnp.ones((2, 16, 16)), jax.sharding.NamedSharding(mesh, P(None, "data", "model")))}}
  axes = {"layers": {"w": P("layers", "embed", "mlp")}}
  tx = optimizers.adafactor(learning_rate=0.1)
  shardings = train_lib.optimizer_state_shardings(
      jax.eval_shape(optimizers.with_param_axes(tx, axes).init, params), params, mesh,
      moment_axes=optimizers.factored_moment_axes(tx, axes))
  moments = shardings[1][0]
  assert moments.v_row["layers"]["w"].spec == P(None, "data")
  assert moments.v_col["layers"]["w"].spec == P(None, "model")
  assert moments.v["layers"]["w"].spec == P()

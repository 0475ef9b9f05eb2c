"""Tests of the PaLM decoder: shapes and parameter counts, masking, positions, numerics, gin."""

import pathlib
import re

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from palmflow.trainer import models

GIN_DIR = pathlib.Path(__file__).resolve().parents[2] / "gin"
LOGICAL_AXES = {"vocab", "embed", "mlp", "heads", "kv", "joined_kv", "layers"}

TINY = models.PaLMConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, head_dim=8,
                         d_ff=64)


def _config_from_gin(name: str, bindings: tuple[str, ...] = ()) -> models.PaLMConfig:
  gin.clear_config()
  gin.add_config_file_search_path(str(GIN_DIR))
  try:
    # A model file is used with a run file, which defines DROPOUT_RATE and includes the
    # precision default; stand in for it here.
    gin.parse_config_files_and_bindings(["precision/float32.gin", f"models/{name}.gin"],
                                        ["DROPOUT_RATE = 0.0", *bindings])
    return gin.query_parameter("%MODEL_CONFIG").scoped_configurable_fn()
  finally:
    gin.clear_config()


def _abstract_params(config: models.PaLMConfig):
  model = models.PaLMDecoder(config=config)
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))


def _num_values(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _bump(tokens, position: int):
  """``tokens`` with the token at [0, position] replaced by the next id."""
  return tokens.at[0, position].set((tokens[0, position] + 1) % TINY.vocab_size)


@pytest.fixture(scope="module")
def tiny_params():
  """Parameters of TINY (shared by the variants that only change numerics)."""
  model = models.PaLMDecoder(config=TINY)
  return jax.jit(model.init)(jax.random.key(0), jnp.zeros((2, 8), jnp.int32))


@pytest.fixture(scope="module")
def tiny(tiny_params):
  """Jitted ``apply(tokens, **kwargs)`` of TINY in full float32 matmul precision."""
  model = models.PaLMDecoder(config=TINY)

  @jax.jit
  def apply(tokens, segment_ids=None, positions=None, causal_attention_mask=None):
    with jax.default_matmul_precision("highest"):
      return model.apply(tiny_params, tokens, segment_ids=segment_ids,
                         positions=positions, causal_attention_mask=causal_attention_mask)
  return apply


@pytest.mark.parametrize("name, paper_billions", [
    ("palm_8b", 8.63), ("palm_62b", 62.50), ("palm_540b", 540.35)])
def test_paper_sizes_from_gin_match_paper_param_counts(name, paper_billions):
  config = _config_from_gin(name)
  assert config.vocab_size == 256000 and config.multi_query and config.parallel_block
  counted = _num_values(_abstract_params(config))
  assert counted == models.count_params(config) == config.num_params()
  assert abs(counted / 1e9 - paper_billions) / paper_billions < 0.01


@pytest.mark.parametrize("path", sorted(GIN_DIR.glob("models/*.gin")), ids=lambda p: p.name)
def test_every_model_gin_file_parses(path):
  gin.clear_config()
  gin.add_config_file_search_path(str(GIN_DIR))
  try:
    gin.parse_config_file(str(path))
  finally:
    gin.clear_config()


def test_tiny_and_small_gin_override_only_dimensions_and_macros_work():
  tiny = _config_from_gin("palm_tiny", ("DROPOUT_RATE = 0.1", "ACTIVATION_DTYPE = 'bfloat16'"))
  base = _config_from_gin("palm_8b")
  assert tiny.dropout_rate == 0.1 and tiny.dtype == "bfloat16"
  assert tiny.num_params() < 2_000_000
  assert 20e6 < _config_from_gin("palm_small").num_params() < 40e6
  size_fields = {"vocab_size", "num_layers", "d_model", "num_heads", "head_dim", "d_ff"}
  for field in models.PaLMConfig.__dataclass_fields__:
    if field not in size_fields | {"dropout_rate", "dtype"}:
      assert getattr(tiny, field) == getattr(base, field), field


@pytest.mark.parametrize("overrides", [
    {}, {"multi_query": False}, {"parallel_block": False}, {"shared_embedding": False}])
def test_count_params_and_logical_axes_of_every_parameter(overrides):
  config = models.PaLMConfig(**{**TINY.__dict__, **overrides})
  abstract = _abstract_params(config)
  assert _num_values(abstract) == models.count_params(config)
  leaves = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  for leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned)
    assert set(leaf.names) <= LOGICAL_AXES and len(leaf.names) == len(leaf.value.shape)
  params = abstract["params"]
  kv_names = ("layers", "embed", "kv") if config.multi_query else (
      "layers", "embed", "heads", "kv")
  assert params["layers"]["attention"]["key"].names == kv_names
  assert params["layers"]["attention"]["query"].names == ("layers", "embed", "heads", "kv")
  assert params["layers"]["mlp"]["wo"].names == ("layers", "mlp", "embed")
  assert params["embedding"].names == ("vocab", "embed")
  assert ("logits_kernel" in params) == (not config.shared_embedding)


def test_logits_shape_dtype_and_mixed_precision(tiny_params):
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, TINY.vocab_size)
  config = models.PaLMConfig(**{**TINY.__dict__, "dtype": "bfloat16"})
  model = models.PaLMDecoder(config=config)
  params = tiny_params
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype("float32")}
  logits_bf16 = jax.jit(model.apply)(params, tokens)
  logits_f32 = jax.jit(models.PaLMDecoder(config=TINY).apply)(params, tokens)
  assert logits_bf16.shape == (2, 8, TINY.vocab_size) and logits_bf16.dtype == jnp.float32
  np.testing.assert_allclose(logits_bf16, logits_f32, atol=0.1)
  param_bf16 = models.PaLMConfig(**{**TINY.__dict__, "param_dtype": "bfloat16"})
  params = jax.eval_shape(models.PaLMDecoder(config=param_bf16).init, jax.random.key(0),
                          tokens)
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(jnp.bfloat16)}


def test_shared_embedding_logits_are_scaled_by_inverse_sqrt_d_model(tiny_params):
  model = models.PaLMDecoder(config=TINY)
  tokens = jnp.arange(8)[None] % TINY.vocab_size
  params = tiny_params
  apply = jax.jit(lambda p, t: model.apply(
      p, t, capture_intermediates=lambda mdl, _: mdl.name == "final_norm"))
  logits, state = apply(params, tokens)
  normed = state["intermediates"]["final_norm"]["__call__"][0]
  embedding = nn.unbox(params)["params"]["embedding"]
  expected = normed @ embedding.T / np.sqrt(TINY.d_model)
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)


def test_causal_later_tokens_do_not_change_earlier_logits(tiny):
  tokens = jax.random.randint(jax.random.key(1), (1, 8), 0, TINY.vocab_size)
  changed = _bump(tokens, 5)
  a, b = tiny(tokens), tiny(changed)
  np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-6)
  assert np.abs(a[:, 5:] - b[:, 5:]).max() > 1e-4


def test_packed_segments_are_independent_and_equal_unpacked(tiny):
  doc_a = jnp.array([5, 6, 7, 8, 9])
  doc_b = jnp.array([11, 12, 13])
  tokens = jnp.concatenate([doc_a, doc_b])[None]
  segment_ids = jnp.array([[1, 1, 1, 1, 1, 2, 2, 2]])
  positions = jnp.array([[0, 1, 2, 3, 4, 0, 1, 2]])
  packed = tiny(tokens, segment_ids=segment_ids, positions=positions)
  alone_b = tiny(jnp.pad(doc_b, (0, 5))[None])
  np.testing.assert_allclose(packed[0, 5:], alone_b[0, :3], atol=1e-5)
  # Another document's tokens do not influence this one.
  other = tokens.at[0, :5].set(jnp.array([1, 2, 3, 4, 20]))
  repacked = tiny(other, segment_ids=segment_ids, positions=positions)
  np.testing.assert_allclose(packed[0, 5:], repacked[0, 5:], atol=1e-6)
  # Without segment ids the second document does see the first.
  unmasked = tiny(tokens, positions=positions)
  assert np.abs(unmasked[0, 5:] - packed[0, 5:]).max() > 1e-4


def test_padding_segment_does_not_disturb_real_tokens(tiny):
  tokens = jnp.array([[3, 4, 5, 6, 0, 0, 0, 0]])
  segment_ids = jnp.array([[1, 1, 1, 1, 0, 0, 0, 0]])
  out = tiny(tokens, segment_ids=segment_ids)
  assert np.isfinite(out).all()
  changed = tiny(tokens.at[0, 6].set(9), segment_ids=segment_ids)
  np.testing.assert_allclose(out[0, :4], changed[0, :4], atol=1e-6)


def test_prefix_lm_is_bidirectional_inside_the_prefix_only(tiny):
  tokens = jax.random.randint(jax.random.key(2), (1, 8), 0, TINY.vocab_size)
  prefix = jnp.array([[1, 1, 1, 1, 0, 0, 0, 0]])
  base = tiny(tokens, causal_attention_mask=prefix)
  # A later prefix token changes earlier prefix positions...
  edit_prefix = _bump(tokens, 3)
  in_prefix = tiny(edit_prefix, causal_attention_mask=prefix)
  assert np.abs(in_prefix[0, :3] - base[0, :3]).max() > 1e-4
  # ...which plain causal attention forbids.
  np.testing.assert_allclose(tiny(tokens)[0, :3], tiny(edit_prefix)[0, :3], atol=1e-6)
  # Target positions stay causal.
  in_targets = tiny(_bump(tokens, 6), causal_attention_mask=prefix)
  np.testing.assert_allclose(in_targets[0, :6], base[0, :6], atol=1e-6)


def test_rotary_embedding_depends_on_relative_positions_only(tiny):
  tokens = jax.random.randint(jax.random.key(3), (1, 8), 0, TINY.vocab_size)
  shifted = tiny(tokens, positions=jnp.arange(8)[None] + 37)
  np.testing.assert_allclose(tiny(tokens), shifted, atol=2e-4)
  reordered = tiny(tokens, positions=jnp.array([[0, 2, 1, 3, 4, 5, 6, 7]]))
  assert np.abs(reordered - tiny(tokens)).max() > 1e-4


def test_dropout_only_when_not_deterministic(tiny_params):
  config = models.PaLMConfig(**{**TINY.__dict__, "dropout_rate": 0.5})
  model = models.PaLMDecoder(config=config)
  tokens = jnp.arange(8)[None]
  params = tiny_params
  np.testing.assert_allclose(jax.jit(model.apply)(params, tokens),
                             jax.jit(models.PaLMDecoder(config=TINY).apply)(params, tokens),
                             atol=1e-6)
  train = jax.jit(lambda p, t, key: model.apply(p, t, deterministic=False,
                                                rngs={"dropout": key}))
  a = train(params, tokens, jax.random.key(1))
  b = train(params, tokens, jax.random.key(2))
  assert np.abs(a - b).max() > 1e-3


def test_remat_gives_the_same_gradients(tiny_params):
  tokens = jnp.arange(8)[None]

  def grads(config):
    model = models.PaLMDecoder(config=config)
    params = tiny_params
    return jax.jit(jax.grad(lambda p: model.apply(p, tokens).sum()))(params)

  remat = models.PaLMConfig(**{**TINY.__dict__, "remat": True})
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               grads(TINY), grads(remat))


@pytest.mark.parametrize("multi_query", [True, False])
def test_causal_attention_by_query_blocks_equals_one_block(tiny_params, multi_query):
  """Blocks of query positions, each against the keys up to its end (the blocks above the
  diagonal skipped): the same logits and gradients as one block, with packed segments; a
  prefix-LM mask (not causal) and a length the blocks do not divide use one block."""
  rng = np.random.default_rng(3)
  tokens = jnp.asarray(rng.integers(1, TINY.vocab_size, (2, 8)), jnp.int32)
  segments = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 0, 0]])

  def run(blocks, **kwargs):
    config = models.PaLMConfig(**{**TINY.__dict__, "multi_query": multi_query,
                                  "attention_blocks": blocks})
    model = models.PaLMDecoder(config=config)
    params = model.init(jax.random.key(1), tokens)

    def f(p):
      with jax.default_matmul_precision("float32"):
        return model.apply(p, tokens, segment_ids=segments, **kwargs)
    return jax.jit(f)(params), jax.jit(jax.grad(lambda p: jnp.sum(f(p) ** 2)))(params)

  want, want_grads = run(1)
  for blocks in (2, 4, 8):
    got, got_grads = run(blocks)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"{blocks} blocks")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 got_grads, want_grads)
  assert models.PaLMConfig(**{**TINY.__dict__, "attention_blocks": 3}).causal_blocks(8) == 1
  assert TINY.causal_blocks(512) == 4 and TINY.causal_blocks(128) == 1
  # prefix LM: the inputs attend to later inputs, so no block may skip keys
  prefix = jnp.asarray([[1, 1, 1, 1, 0, 0, 0, 0]] * 2)
  np.testing.assert_allclose(run(4, causal_attention_mask=prefix)[0],
                             run(1, causal_attention_mask=prefix)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("field, value, message", [
    ("head_dim", 7, "even"), ("dtype", "fp8", "dtype"), ("num_layers", 0, "positive"),
    ("dropout_rate", 1.0, "dropout_rate"), ("attention_blocks", -1, "attention_blocks")])
def test_config_validation_names_the_field(field, value, message):
  with pytest.raises(ValueError, match=message):
    models.PaLMConfig(**{**TINY.__dict__, field: value})


@pytest.mark.parametrize("variant", [
    {}, {"multi_query": False}, {"shared_embedding": False}, {"parallel_block": False},
    {"scan_unroll": 1}, {"remat": True}])
def test_bfloat16_gradients_follow_float32_in_every_variant(variant):
  """The custom-vjp products (`models.matmul`: transposed operands, optimization barriers)
  compile and give the float32 gradients, within bfloat16 rounding, in every layout."""
  base = models.PaLMConfig(**{**TINY.__dict__, "num_layers": 3, **variant})
  tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, TINY.vocab_size)
  segments = jnp.array([[1] * 10 + [2] * 6, [1] * 16])
  params = jax.jit(models.PaLMDecoder(config=base).init)(jax.random.key(0), tokens)

  def grads(dtype):
    model = models.PaLMDecoder(config=models.PaLMConfig(**{**base.__dict__, "dtype": dtype}))

    def loss(p):
      logits = model.apply(p, tokens, segment_ids=segments)
      return -jnp.mean(jax.nn.log_softmax(logits.astype(jnp.float32))[..., 0])
    return jax.jit(jax.grad(loss))(params)

  g32, g16 = nn.unbox(grads("float32")), nn.unbox(grads("bfloat16"))
  leaves16 = jax.tree.leaves(g16)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g32), leaves16, strict=True):
    name = jax.tree_util.keystr(path)
    assert b.shape == a.shape and b.dtype == np.float32, name
    a, b = np.asarray(a), np.asarray(b)
    cos = float(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
    assert cos > 0.99, f"{name}: cosine {cos:.4f} ({variant})"
    np.testing.assert_allclose(np.linalg.norm(b), np.linalg.norm(a), rtol=0.05,
                               err_msg=name)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_swiglu_value_and_gradients_follow_the_float32_expression(dtype):
  kg, kl, kc = jax.random.split(jax.random.PRNGKey(3), 3)
  gate = 3 * jax.random.normal(kg, (64, 48), jnp.float32)
  lin = jax.random.normal(kl, (64, 48), jnp.float32)
  ct = jax.random.normal(kc, (64, 48), jnp.float32)
  cast = lambda x: x.astype(dtype)
  out, vjp = jax.vjp(models.swiglu, cast(gate), cast(lin))
  grads = vjp(cast(ct))
  # the reference: autodiff of the expression in float32, from the same (rounded) inputs
  ref_out, ref_vjp = jax.vjp(lambda g, x: nn.silu(g) * x, cast(gate).astype(jnp.float32),
                             cast(lin).astype(jnp.float32))
  ref_grads = ref_vjp(cast(ct).astype(jnp.float32))
  assert out.dtype == jnp.dtype(dtype) and all(g.dtype == jnp.dtype(dtype) for g in grads)
  # float32: equal to rounding; bf16: the float32 result rounded once (8 mantissa bits)
  tol = 1e-6 if dtype == "float32" else 2 ** -8
  for got, want in zip((out,) + tuple(grads), (ref_out,) + tuple(ref_grads)):
    got, want = np.asarray(got, np.float32), np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


def _compiled_products(fn, *args) -> list[tuple[list[str], str]]:
  """(operand dtypes, lhs contracting dims) of every dot in `fn`'s optimized CPU HLO."""
  text = jax.jit(fn).lower(*args).compile().as_text()
  types = dict(re.findall(r"%(\S+) = (\w+)\[", text))
  products = []
  for line in text.splitlines():
    m = re.search(r"= \w+\[[\d,]*\]\S* dot\(%(\S+), %(\S+)\), lhs_contracting_dims=\{(\d*)\}",
                  line)
    if m:
      products.append(([types[m.group(1)], types[m.group(2)]], m.group(3)))
  return products


@pytest.mark.skipif(jax.default_backend() != "cpu",
                    reason="checks the products XLA:CPU compiles (JAX's default backend here is "
                           "not the CPU)")
@pytest.mark.parametrize("transpose_b", [False, True])
# (m, n) with k = 32: the weight gradient transposes `a` for (96, 48), the cotangent for
# (96, 8) either way and for (8, 48) with transpose_b (the smaller operand; models.py)
@pytest.mark.parametrize("m,n", [(96, 48), (8, 48), (96, 8)])
def test_matmul_products_stay_bf16_with_the_left_operand_contracted_minor(transpose_b, m, n):
  """On a CPU, all three products of `models.matmul` (forward, both gradients) multiply
  bf16 operands with the left one contracted along its minor axis: the only form XLA:CPU
  runs on its bf16 kernels. A transposed operand folded back into a product (or a
  column-major copy) shows up here as float32 operands or another contracting axis."""
  a = jax.random.normal(jax.random.key(0), (m, 32), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, 32) if transpose_b else (32, n), jnp.float32)

  def loss(a, b):
    return jnp.sum(models.matmul(a, b, transpose_b, jnp.bfloat16, jnp.float32) ** 2)
  products = _compiled_products(jax.grad(loss, argnums=(0, 1)), a, b)
  assert len(products) == 3, products
  for dtypes, lhs_contracting in products:
    assert dtypes == ["bf16", "bf16"] and lhs_contracting == "1", products
  ga, gb = jax.grad(loss, argnums=(0, 1))(a, b)
  with jax.default_matmul_precision("highest"):
    ra, rb = jax.grad(lambda a, b: jnp.sum((a @ (b.T if transpose_b else b)) ** 2),
                      argnums=(0, 1))(a, b)
  for got, want in ((ga, ra), (gb, rb)):
    np.testing.assert_allclose(got, want, rtol=0.05, atol=0.05 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("name", ["palm_8b", "palm_540b", "palm_tiny"])
def test_model_files_train_with_palms_optimizer_and_schedule(name):
  """PaLM paper, section 5: Adafactor without factorization, beta1 = 0.9, beta2 = 1 - k^-0.8,
  update clipping 1.0 (and global-norm clipping 1.0), lr^2 weight decay, parameter scaling;
  a learning rate of 1e-2 for the first 10k steps, then 1/sqrt(k)."""
  gin.clear_config()
  gin.add_config_file_search_path(str(GIN_DIR))
  try:
    gin.parse_config_files_and_bindings(["precision/float32.gin", f"models/{name}.gin"],
                                        ["DROPOUT_RATE = 0.0"])
    model = gin.query_parameter("%MODEL").scoped_configurable_fn()
    schedule = gin.query_parameter("%LEARNING_RATE").scoped_configurable_fn()
  finally:
    gin.clear_config()
  args = model.optimizer.arguments
  assert args["factored"] is False and args["momentum"] == 0.9
  assert args["decay_exponent"] == 0.8 and args["clipping_threshold"] == 1.0
  assert args["global_norm_clip"] == 1.0 and args["weight_decay_exponent"] == 2.0
  assert args["multiply_by_parameter_scale"] is True
  lrs = [float(schedule(k)) for k in (0, 1, 9999, 10000, 40000, 160000)]
  np.testing.assert_allclose(lrs, [1e-2, 1e-2, 1e-2, 1e-2, 5e-3, 2.5e-3], rtol=1e-6)

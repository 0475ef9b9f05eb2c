"""Tests of the cross-entropy loss against a direct numpy transcription of t5x's semantics."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from palmflow.trainer import lm, losses, models


def _reference(logits, targets, weights, label_smoothing, z_loss):
  """Per-token (cross-entropy, z-term), written with explicit one-hot soft targets."""
  logits = np.asarray(logits, np.float64)
  vocab = logits.shape[-1]
  confidence = 1.0 - label_smoothing
  low = label_smoothing / (vocab - 1)
  soft = np.full(logits.shape, low)
  np.put_along_axis(soft, targets[..., None], confidence, axis=-1)
  log_z = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
  log_probs = logits - log_z[..., None]
  constant = -(confidence * np.log(confidence) + (vocab - 1) * low * np.log(low + 1e-20))
  xent = -np.sum(soft * log_probs, axis=-1) - constant
  return xent * weights, z_loss * log_z ** 2 * weights


@pytest.fixture
def batch():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
  targets = rng.integers(0, 11, size=(3, 5))
  weights = np.ones((3, 5), np.float32)
  weights[0, 3:] = 0  # padding
  weights[2, 1:] = 0
  return logits, targets, weights


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("z_loss", [0.0, 1e-4, 0.5])
def test_matches_reference_per_real_target_token(batch, label_smoothing, z_loss):
  logits, targets, weights = batch
  xent, z = _reference(logits, targets, weights, label_smoothing, z_loss)
  total, z_part, stats = losses.cross_entropy_loss(
      jnp.asarray(logits), jnp.asarray(targets), weights=jnp.asarray(weights),
      label_smoothing=label_smoothing, z_loss=z_loss)
  np.testing.assert_allclose(total, (xent.sum() + z.sum()) / weights.sum(), rtol=1e-5)
  np.testing.assert_allclose(z_part, z.sum() / weights.sum(), rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(stats["cross_ent_loss_sum"], xent.sum(), rtol=1e-5)
  np.testing.assert_allclose(stats["z_loss_sum"], z.sum(), rtol=1e-5, atol=1e-9)
  assert stats["normalizing_factor"] == weights.sum()


def test_normalizing_factors(batch):
  logits, targets, weights = batch
  xent, z = _reference(logits, targets, weights, 0.1, 1e-4)
  per_token = xent + z

  def total(factor):
    return losses.cross_entropy_loss(
        jnp.asarray(logits), jnp.asarray(targets), weights=jnp.asarray(weights),
        label_smoothing=0.1, loss_normalizing_factor=factor)[0]

  np.testing.assert_allclose(total(7.0), per_token.sum() / 7.0, rtol=1e-5)
  np.testing.assert_allclose(total("NUM_REAL_TARGET_TOKENS"), per_token.sum() / weights.sum(),
                             rtol=1e-5)
  np.testing.assert_allclose(total(None), per_token.sum(), rtol=1e-5)  # t5x: not divided
  np.testing.assert_allclose(total("num_total_target_tokens"), per_token.sum() / 15,
                             rtol=1e-5)
  per_sequence = per_token.sum(-1) / weights.sum(-1)
  np.testing.assert_allclose(total(losses.LossNormalizingFactor.AVERAGE_PER_SEQUENCE),
                             per_sequence.mean(), rtol=1e-5)
  with pytest.raises(ValueError, match="NUM_REAL_TARGET_TOKENS"):
    total("per_token")


def test_average_per_sequence_averages_per_document_in_packed_rows(batch):
  """With segment ids (packed rows), t5x's AVERAGE_PER_SEQUENCE averages per document:
  a row of two documents counts twice, each document's mean once."""
  logits, targets, weights = batch
  segments = np.array([[1, 1, 2, 0, 0], [1, 2, 2, 3, 3], [1, 0, 0, 0, 0]])
  weights = (segments > 0).astype(np.float32)
  xent, z = _reference(logits, targets, weights, 0.0, 1e-4)
  per_token = xent + z
  means = [per_token[r][segments[r] == s].mean() for r in range(3)
           for s in sorted(set(segments[r]) - {0})]
  assert len(means) == 6
  factor = losses.LossNormalizingFactor.AVERAGE_PER_SEQUENCE
  total, _, stats = losses.cross_entropy_loss(
      jnp.asarray(logits), jnp.asarray(targets), weights=jnp.asarray(weights),
      loss_normalizing_factor=factor, segment_ids=jnp.asarray(segments))
  np.testing.assert_allclose(total, np.mean(means), rtol=1e-5)
  assert float(stats["normalizing_factor"]) == 6
  hidden = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 4))
  kernel = jax.random.normal(jax.random.PRNGKey(1), (11, 4))
  kwargs = dict(weights=jnp.asarray(weights), loss_normalizing_factor=factor,
                segment_ids=jnp.asarray(segments))
  projected = losses.projected_cross_entropy_loss(hidden, kernel, jnp.asarray(targets),
                                                  chunk_tokens=5, **kwargs)[0]
  whole = losses.cross_entropy_loss(hidden @ kernel.T, jnp.asarray(targets), **kwargs)[0]
  np.testing.assert_allclose(projected, whole, rtol=1e-5)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_predicting_the_smoothed_targets_costs_nothing(label_smoothing):
  vocab = 7
  targets = jnp.array([[0, 3, 6]])
  soft = jax.nn.one_hot(targets, vocab) * (1 - label_smoothing - label_smoothing / (vocab - 1))
  soft = soft + label_smoothing / (vocab - 1)
  logits = jnp.log(jnp.maximum(soft, 1e-30))  # log-normaliser is 0, so z-loss is 0 too
  total, z_part, _ = losses.cross_entropy_loss(logits, targets, label_smoothing=label_smoothing)
  np.testing.assert_allclose(total, 0.0, atol=1e-5)
  np.testing.assert_allclose(z_part, 0.0, atol=1e-9)


def test_accuracy_stats_and_padding_is_ignored(batch):
  logits, targets, weights = batch
  _, _, stats = losses.cross_entropy_loss(jnp.asarray(logits), jnp.asarray(targets),
                                          weights=jnp.asarray(weights))
  correct = (logits.argmax(-1) == targets) * weights
  assert stats["accuracy_numerator"] == correct.sum()
  assert stats["accuracy_denominator"] == weights.sum()
  scrambled = logits.copy()
  scrambled[weights == 0] = 100.0
  np.testing.assert_allclose(
      losses.cross_entropy_loss(jnp.asarray(scrambled), jnp.asarray(targets),
                                weights=jnp.asarray(weights))[0],
      losses.cross_entropy_loss(jnp.asarray(logits), jnp.asarray(targets),
                                weights=jnp.asarray(weights))[0], rtol=1e-6)


def test_gradient_is_finite_and_matches_softmax_minus_targets():
  logits = jnp.array([[[1.0, 2.0, 0.5]]])
  targets = jnp.array([[1]])
  grad = jax.grad(lambda x: losses.cross_entropy_loss(x, targets, z_loss=0.0)[0])(logits)
  np.testing.assert_allclose(grad, jax.nn.softmax(logits) - jax.nn.one_hot(targets, 3),
                             atol=1e-6)


def test_all_padding_gives_zero_not_nan():
  total, z_part, _ = losses.cross_entropy_loss(
      jnp.zeros((1, 2, 4)), jnp.zeros((1, 2), jnp.int32), weights=jnp.zeros((1, 2)))
  assert total == 0.0 and z_part == 0.0


@pytest.mark.parametrize("kwargs, message", [
    ({"targets": jnp.zeros((2, 3), jnp.int32)}, "vocab axis"),
    ({"weights": jnp.ones((2,))}, "weights"),
    ({"label_smoothing": 1.0}, "label_smoothing"),
    ({"loss_normalizing_factor": True}, "loss_normalizing_factor"),
])
def test_bad_arguments_are_explained(kwargs, message):
  args = {"logits": jnp.zeros((1, 2, 4)), "targets": jnp.zeros((1, 2), jnp.int32), **kwargs}
  with pytest.raises(ValueError, match=message):
    losses.cross_entropy_loss(args.pop("logits"), args.pop("targets"), **args)


def _projection_case(seed=0, batch=3, length=10, d=16, vocab=40, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.standard_normal((batch, length, d)), dtype)
  kernel = jnp.asarray(rng.standard_normal((vocab, d)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, vocab, (batch, length)), jnp.int32)
  weights = jnp.asarray(rng.random((batch, length)) > 0.25, jnp.float32)
  return hidden, kernel, targets, weights


@pytest.mark.parametrize("vocab_major", [True, False])
@pytest.mark.parametrize("factor", [None, "NUM_TOTAL_TARGET_TOKENS", "AVERAGE_PER_SEQUENCE",
                                    7.0])
@pytest.mark.parametrize("chunk_tokens", [1, 6, 15, 1000])
def test_projected_loss_equals_the_loss_of_the_logits(vocab_major, factor, chunk_tokens):
  """The chunked projection + loss gives cross_entropy_loss's value, stats and gradients for
  the hidden states and the kernel, whatever the chunking (1 position a chunk; a chunk
  length that must divide 10; one chunk)."""
  hidden, kernel, targets, weights = _projection_case()
  kernel = kernel if vocab_major else kernel.T
  settings = dict(weights=weights, label_smoothing=0.1, z_loss=1e-3,
                  loss_normalizing_factor=factor)

  def reference(h, k):
    logits = (h @ (k.T if vocab_major else k)) * 0.25
    loss, z, stats = losses.cross_entropy_loss(logits, targets, **settings)
    return loss, (z, stats)

  def projected(h, k):
    loss, z, stats = losses.projected_cross_entropy_loss(
        h, k, targets, vocab_major=vocab_major, scale=0.25, chunk_tokens=chunk_tokens,
        **settings)
    return loss, (z, stats)

  (want, (want_z, want_stats)), want_grads = jax.value_and_grad(
      reference, argnums=(0, 1), has_aux=True)(hidden, kernel)
  (got, (got_z, got_stats)), got_grads = jax.jit(jax.value_and_grad(
      projected, argnums=(0, 1), has_aux=True))(hidden, kernel)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(got_z, want_z, rtol=1e-5)
  for name in want_stats:
    np.testing.assert_allclose(got_stats[name], want_stats[name], rtol=1e-5, err_msg=name)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
  # without differentiation (evaluation) the same values
  loss, _, stats = jax.jit(lambda h, k: losses.projected_cross_entropy_loss(
      h, k, targets, vocab_major=vocab_major, scale=0.25, chunk_tokens=chunk_tokens,
      **settings))(hidden, kernel)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(stats["accuracy_numerator"], want_stats["accuracy_numerator"])


def test_projected_loss_in_bfloat16_and_float16():
  """Reduced-precision products with float32 accumulation: close to the float32 loss and
  gradients; the gradients come back in the inputs' dtypes; a float16 loss scale that
  float16 cannot hold (2**20) does not overflow the hidden states' gradient."""
  hidden, kernel, targets, weights = _projection_case(seed=1)

  def loss_of(h, k, dtype, scale=1.0):
    return scale * losses.projected_cross_entropy_loss(
        h, k, targets, weights=weights, scale=0.25, dtype=dtype, chunk_tokens=8)[0]

  want, (want_h, want_k) = jax.value_and_grad(loss_of, argnums=(0, 1))(
      hidden, kernel, jnp.float32)
  for dtype in (jnp.bfloat16, jnp.float16):
    got, (got_h, got_k) = jax.jit(jax.value_and_grad(loss_of, argnums=(0, 1)),
                                  static_argnums=2)(hidden.astype(dtype), kernel, dtype)
    assert got_h.dtype == dtype and got_k.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=2e-2)
    np.testing.assert_allclose(np.asarray(got_h, np.float32), want_h, rtol=0.1,
                               atol=0.05 * float(jnp.max(jnp.abs(want_h))))
    np.testing.assert_allclose(got_k, want_k, rtol=0.1,
                               atol=0.05 * float(jnp.max(jnp.abs(want_k))))
  # 2**17 is past float16's range (65504); the scaled gradients (at most ~0.04 * 2**17) fit
  scale = 2.0 ** 17
  scaled_h = jax.jit(jax.grad(loss_of), static_argnums=2)(
      hidden.astype(jnp.float16), kernel, jnp.float16, scale)
  assert bool(jnp.all(jnp.isfinite(scaled_h.astype(jnp.float32))))
  np.testing.assert_allclose(np.asarray(scaled_h, np.float32) / scale, want_h, rtol=0.1,
                             atol=0.05 * float(jnp.max(jnp.abs(want_h))))


def test_projected_loss_chunks_divide_the_length():
  assert losses._chunk_length(batch=8, length=512, chunk_tokens=512) == 64
  assert losses._chunk_length(batch=3, length=10, chunk_tokens=15) == 5
  # a prime length: one chunk, not a loop over single positions
  assert losses._chunk_length(batch=3, length=7, chunk_tokens=15) == 7
  assert losses._chunk_length(batch=8, length=2039, chunk_tokens=512) == 2039
  assert losses._chunk_length(batch=64, length=512, chunk_tokens=32) == 1
  assert losses._chunk_length(batch=2, length=10, chunk_tokens=1000) == 10
  with pytest.raises(ValueError, match="targets"):
    losses.projected_cross_entropy_loss(jnp.zeros((2, 3, 4)), jnp.zeros((5, 4)),
                                        jnp.zeros((2, 4), jnp.int32))


@pytest.mark.parametrize("shared_embedding", [True, False])
def test_model_loss_is_the_same_chunked_or_over_whole_logits(shared_embedding):
  """DecoderOnlyModel.loss_fn (chunked projected loss by default) against the loss over the
  materialised logits (loss_chunk_tokens < 0): same loss, stats and parameter gradients."""
  config = models.PaLMConfig(vocab_size=48, num_layers=2, d_model=16, num_heads=2,
                             head_dim=8, d_ff=32, shared_embedding=shared_embedding)
  model = lm.DecoderOnlyModel(config=config, label_smoothing=0.1, loss_chunk_tokens=6)
  whole = dataclasses.replace(model, loss_chunk_tokens=-1)
  rng = np.random.default_rng(2)
  targets = jnp.asarray(rng.integers(1, 48, (2, 6)), jnp.int32)
  batch = {"decoder_input_tokens": jnp.pad(targets[:, :-1], ((0, 0), (1, 0))),
           "decoder_target_tokens": targets,
           "decoder_loss_weights": jnp.asarray([[1] * 6, [1] * 4 + [0] * 2], jnp.float32)}
  params = model.init(jax.random.key(0), batch_size=2, length=6)["params"]
  params = nn.unbox(params)
  with jax.default_matmul_precision("float32"):
    (got, got_stats), got_grads = jax.value_and_grad(model.loss_fn, has_aux=True)(
        params, batch)
    (want, want_stats), want_grads = jax.value_and_grad(whole.loss_fn, has_aux=True)(
        params, batch)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for name in want_stats:
    np.testing.assert_allclose(got_stats[name], want_stats[name], rtol=1e-5, err_msg=name)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               got_grads, want_grads)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_accelerator_code_paths_give_the_cpu_paths_loss_and_gradients(monkeypatch, dtype):
  """models and losses take other routes off the CPU (products on transposed operands in
  place, rotary tables without a conditional, the kernel gradient contracted in place).
  Nothing here has an accelerator, so the CPU is told it is one: the accelerator routes
  must give the CPU routes' loss, stats and gradients."""
  config = models.PaLMConfig(vocab_size=48, num_layers=2, d_model=16, num_heads=2,
                             head_dim=8, d_ff=32, dtype=dtype)
  model = lm.DecoderOnlyModel(config=config, z_loss=1e-4, loss_chunk_tokens=6)
  rng = np.random.default_rng(5)
  targets = jnp.asarray(rng.integers(1, 48, (2, 12)), jnp.int32)
  batch = {"decoder_input_tokens": jnp.pad(targets[:, :-1], ((0, 0), (1, 0))),
           "decoder_target_tokens": targets,
           "decoder_loss_weights": jnp.asarray([[1] * 12, [1] * 9 + [0] * 3], jnp.float32),
           "decoder_segment_ids": jnp.asarray([[1] * 7 + [2] * 5, [1] * 12], jnp.int32),
           "decoder_positions": jnp.asarray([list(range(7)) + list(range(5)),
                                             list(range(12))], jnp.int32)}
  params = nn.unbox(model.init(jax.random.key(0), batch_size=2, length=12)["params"])

  def run():
    # a fresh jit traces again: the routes are chosen while tracing
    fn = jax.jit(jax.value_and_grad(model.loss_fn, has_aux=True))
    with jax.default_matmul_precision("float32"):
      return fn(params, batch), fn.lower(params, batch).as_text()
  ((want, want_stats), want_grads), cpu_text = run()
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  ((got, got_stats), got_grads), accelerator_text = run()
  # the routes differ: the CPU's rotary tables behind a conditional, the accelerator's
  # products contracting the token axis in place
  assert "stablehlo.case" in cpu_text and "stablehlo.case" not in accelerator_text
  assert "contracting_dims = [0] x [0]" in accelerator_text
  assert "contracting_dims = [0] x [0]" not in cpu_text
  tol = 1e-5 if dtype == "float32" else 2e-2
  np.testing.assert_allclose(got, want, rtol=tol)
  for name in want_stats:
    np.testing.assert_allclose(got_stats[name], want_stats[name], rtol=tol, err_msg=name)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want_grads),
                          jax.tree.leaves(got_grads), strict=True):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(b, a, rtol=tol, atol=tol * np.abs(a).max(),
                               err_msg=jax.tree_util.keystr(path))

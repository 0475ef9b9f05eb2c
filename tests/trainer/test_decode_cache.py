"""Cached decoding: a prefill fills every layer's keys and values, then each step runs one new
token per example. Checked against the whole sequence (the model's logits) and against
decoding without a cache (the tokens), for every attention and block variant."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from palmflow.trainer import lm, models

VOCAB, LENGTH = 40, 12
VARIANTS = [dict(multi_query=True, parallel_block=True),
            dict(multi_query=False, parallel_block=False),
            dict(multi_query=True, parallel_block=False, shared_embedding=False)]


def _config(**kw) -> models.PaLMConfig:
  return models.PaLMConfig(vocab_size=VOCAB, num_layers=2, d_model=32, num_heads=4,
                           head_dim=8, d_ff=64, **kw)


def _params(config: models.PaLMConfig, seed: int = 0):
  model = models.PaLMDecoder(config)
  return nn.unbox(model.init(jax.random.key(seed), jnp.zeros((1, LENGTH), jnp.int32)))[
      "params"]


@pytest.mark.parametrize("variant", VARIANTS, ids=["mq-parallel", "mh-serial", "unshared"])
@pytest.mark.parametrize("prefix_lm", [False, True], ids=["lm", "prefix-lm"])
def test_cached_steps_give_the_whole_sequences_logits(variant, prefix_lm):
  config = _config(**variant)
  model, params = models.PaLMDecoder(config), _params(config)
  tokens = jax.random.randint(jax.random.key(1), (3, LENGTH), 2, VOCAB)
  plen = np.asarray([3, 5, 8])  # each example's prefix; later positions are decoded
  idx = np.arange(LENGTH)[None, :]
  prefix = (idx < plen[:, None]).astype(jnp.int32) if prefix_lm else None
  full = jax.jit(lambda p, t: model.apply({"params": p}, t, causal_attention_mask=prefix))(
      params, tokens)

  @jax.jit
  def decode(p, tokens):
    # The prefill sees only the prefix (zeros after it), as decoding does.
    buf = jnp.where(idx < plen[:, None], tokens, 0)
    _, cache = model.apply({"params": p}, buf, causal_attention_mask=prefix,
                           return_cache=True)
    steps = []
    for i in range(LENGTH - int(plen.max())):
      pos = jnp.asarray(plen + i)
      tok = jnp.take_along_axis(tokens, pos[:, None], 1)
      logits, cache = model.apply({"params": p}, tok, cache=cache, cache_index=pos)
      steps.append(logits[:, 0])
    return jnp.stack(steps, 1)

  got = np.asarray(decode(params, tokens))
  full = np.asarray(full)
  for row, start in enumerate(plen):
    want = full[row, start:start + got.shape[1]]
    np.testing.assert_allclose(got[row], want, atol=2e-5, rtol=1e-5)


def test_the_cache_has_one_entry_per_layer_position_and_head():
  for mq, shape in ((True, (2, 3, LENGTH, 8)), (False, (2, 3, LENGTH, 4, 8))):
    config = _config(multi_query=mq, dtype="bfloat16")
    model = models.PaLMDecoder(config)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, LENGTH), jnp.int32))
    _, cache = jax.eval_shape(
        lambda v, t: model.apply(v, t, return_cache=True), params,
        jnp.zeros((3, LENGTH), jnp.int32))
    assert [a.shape for a in cache] == [shape, shape]
    assert all(a.dtype == jnp.bfloat16 for a in cache)  # the compute dtype


def test_a_cached_step_refuses_a_whole_sequence():
  config = _config()
  model, params = models.PaLMDecoder(config), _params(config)
  tokens = jnp.zeros((2, LENGTH), jnp.int32)
  _, cache = model.apply({"params": params}, tokens, return_cache=True)
  with pytest.raises(ValueError, match="one token per example"):
    model.apply({"params": params}, tokens, cache=cache, cache_index=jnp.zeros(2, jnp.int32))


def _batch(prefixes: list[list[int]], prefix_lm: bool) -> dict:
  """Decoding batches: LM (continue after the targets) or prefix LM (inputs as prefix)."""
  n = len(prefixes)
  targets = np.zeros((n, LENGTH), np.int32)
  for i, p in enumerate(prefixes):
    targets[i, :len(p)] = p
  inputs = np.concatenate([np.zeros((n, 1), np.int32), targets[:, :-1]], 1)
  batch = {"decoder_input_tokens": inputs, "decoder_target_tokens": targets}
  if prefix_lm:
    batch["decoder_causal_attention"] = (
        np.arange(LENGTH)[None, :] <= np.asarray([len(p) for p in prefixes])[:, None]
    ).astype(np.int32)
  return batch


# The last prefix leaves room for 2 of the 6 steps: its buffer fills up.
PREFIXES = [[5, 7, 9], [11], [3, 3, 8, 20, 2], [4] * (LENGTH - 3)]


@pytest.mark.parametrize("variant,prefix_lm", [(VARIANTS[0], False), (VARIANTS[1], True)],
                         ids=["mq-parallel-lm", "mh-serial-prefix-lm"])
def test_cached_decoding_gives_the_uncached_tokens(variant, prefix_lm):
  config = _config(**variant)
  model = lm.DecoderOnlyModel(config=config)
  params = _params(config, seed=3)
  batch = _batch(PREFIXES, prefix_lm)
  kinds = [dict(), dict(temperature=0.8, top_k=5, rng=jax.random.key(7)), dict(num_beams=3)]

  def decode(use_cache, eos_id, kw):
    fn = jax.jit(lambda p, b, e: model.predict_batch(p, b, max_decode_length=6, eos_id=e,
                                                     use_cache=use_cache, **kw))
    return np.asarray(fn(params, batch, jnp.int32(eos_id)))

  # EOS: a token some row emits, so that rows finish at different steps; -1: none does.
  eos = int(decode(False, -1, {})[1, 2])
  for kw in kinds:
    for eos_id in (-1, eos):
      uncached = decode(False, eos_id, kw)
      np.testing.assert_array_equal(decode(True, eos_id, kw), uncached, err_msg=str(kw))
  assert (uncached == 0).any()  # some row did finish early


def test_a_padding_row_decodes_without_disturbing_the_others():
  # A padding row of a prefix-LM batch has no prefix (decoder_causal_attention all 0): it
  # reads position 0, and the other rows' tokens are those they get without it.
  config = _config()
  model = lm.DecoderOnlyModel(config=config)
  params = _params(config, seed=4)
  batch = _batch(PREFIXES[:2], prefix_lm=True)
  padded = {k: np.concatenate([v, np.zeros_like(v[:1])]) for k, v in batch.items()}
  for kw in ({}, {"num_beams": 2}):
    fn = jax.jit(lambda p, b, kw=kw: model.predict_batch(p, b, max_decode_length=4, **kw))
    alone, with_pad = np.asarray(fn(params, batch)), np.asarray(fn(params, padded))
    np.testing.assert_array_equal(with_pad[:2], alone)
    assert ((with_pad[2] >= 0) & (with_pad[2] < VOCAB)).all()
  with pytest.raises(ValueError, match="max_decode_length must be >= 1"):
    model.predict_batch(params, batch, max_decode_length=0)


def test_option_scores_from_one_prefill_equal_scoring_each_option_whole():
  # Rank classification: each option's log-likelihood after each prefix, from a prefill per
  # example and cached steps, against score_batch of the prefix and option together (the
  # last prefix leaves room for only part of the longest option: the rest counts nothing).
  from palmflow.trainer import eval_lib
  for variant in VARIANTS[:2]:
    config = _config(**variant)
    model = lm.DecoderOnlyModel(config=config)
    params = _params(config, seed=6)
    prefixes = [np.asarray(p, np.int32) for p in ([5, 7, 9], [11], [4] * (LENGTH - 3))]
    options = [[3, 1], [8, 8, 2, 1], [1]]
    table = np.zeros((len(options), 4), np.int32)
    for i, o in enumerate(options):
      table[i, :len(o)] = o
    got = np.asarray(jax.jit(lambda p, b: model.score_options(p, b, jnp.asarray(table)))(
        params, eval_lib.prefix_batch(prefixes, LENGTH)))
    score = jax.jit(model.score_batch)
    want = np.stack([np.asarray(score(params, eval_lib.option_batch(
        prefixes, [np.asarray(o, np.int32)] * len(prefixes), LENGTH))) for o in options], -1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=str(variant))
    assert (want < 0).all()  # every option has a scored token

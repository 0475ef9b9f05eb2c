"""Beam search (`DecoderOnlyModel.predict_batch` with num_beams > 1) on a small random model,
against greedy decoding and against scoring every possible continuation."""
from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from palmflow.trainer import lm, models

VOCAB, LENGTH, STEPS = 8, 8, 3


@pytest.fixture(scope="module")
def model_and_params():
  config = models.PaLMConfig(vocab_size=VOCAB, num_layers=1, d_model=16, num_heads=2,
                             head_dim=8, d_ff=32)
  model = lm.DecoderOnlyModel(config=config)
  # A seed for which greedy decoding misses the most likely continuation of two prefixes.
  params = nn.unbox(model.init(jax.random.PRNGKey(5), batch_size=1, length=LENGTH))["params"]
  return model, params


def _prefix_batch(prefixes: list[list[int]]) -> dict:
  """LM batches: decoding continues after each prefix (causal attention)."""
  targets = np.zeros((len(prefixes), LENGTH), np.int32)
  for i, p in enumerate(prefixes):
    targets[i, :len(p)] = p
  inputs = np.concatenate([np.zeros((len(prefixes), 1), np.int32), targets[:, :-1]], 1)
  return {"decoder_input_tokens": inputs, "decoder_target_tokens": targets}


def _log_likelihoods(model, params, prefix: list[int], continuations) -> dict:
  """{continuation: log p(continuation | prefix)}, token by token with the model itself (one
  jitted call over all of them)."""
  conts = [tuple(c) for c in continuations]
  x = np.zeros((len(conts), LENGTH), np.int32)
  for i, c in enumerate(conts):
    seq = list(prefix) + list(c)
    x[i, 1:len(seq)] = seq[:-1]
  logits = jax.jit(lambda p, x: model.module.apply({"params": p}, x))(params, x)
  logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), -1))
  n = len(prefix)
  return {c: float(sum(logp[i, n + j, t] for j, t in enumerate(c)))
          for i, c in enumerate(conts)}


PREFIXES = [[2, 5], [3], [7, 4, 6], [5, 5]]


def _decode(model, params, **kw):
  fn = jax.jit(lambda p, b: model.predict_batch(p, b, max_decode_length=STEPS, **kw))
  return np.asarray(fn(params, _prefix_batch(PREFIXES)))


def test_one_beam_is_greedy(model_and_params):
  model, params = model_and_params
  batch = _prefix_batch(PREFIXES)
  plen = jnp.asarray([len(p) + 1 for p in PREFIXES], jnp.int32)
  idx = np.arange(LENGTH)[None, :]
  buf = jnp.where(idx < plen[:, None], batch["decoder_input_tokens"], 0)
  for eos in (-1, 1):
    for cached in (True, False):
      one_beam = jax.jit(lambda p, b, e=eos, c=cached: model._beam_search(
          lm._Decoder(model, p, None, c), b, plen, num_beams=1, max_decode_length=STEPS,
          eos_id=e, alpha=0.6))(params, buf)
      np.testing.assert_array_equal(np.asarray(one_beam), _decode(model, params, eos_id=eos))


def test_the_returned_beam_is_finished_when_one_is_and_length_penalized():
  eos = 1
  out = jnp.asarray([[[4, 5, 6], [4, eos, 0], [3, 3, eos]],      # cut, short, long
                     [[4, 5, 6], [2, 2, 2], [3, 3, 3]]], jnp.int32)  # none finished
  scores = jnp.asarray([[-1.0, -3.0, -3.3], [-2.0, -1.5, -np.inf]], jnp.float32)
  # alpha 0: the more likely finished beam, not the cut one with the best score.
  got = np.asarray(lm.pick_beam(out, scores, eos_id=eos, alpha=0.0))
  np.testing.assert_array_equal(got, [[4, eos, 0], [2, 2, 2]])
  # A length penalty favours the longer finished beam: -3.3 / (8/6)^a beats -3 / (7/6)^a.
  got = np.asarray(lm.pick_beam(out, scores, eos_id=eos, alpha=2.0))
  np.testing.assert_array_equal(got[0], [3, 3, eos])


def test_wide_enough_beams_find_the_most_likely_continuation(model_and_params):
  # Without an EOS (eos_id outside the vocabulary) and with VOCAB ** (STEPS - 1) beams,
  # beam search keeps every prefix of every length and so must return the continuation
  # with the highest log-likelihood of all VOCAB ** STEPS; greedy decoding does not always.
  model, params = model_and_params
  beams = _decode(model, params, num_beams=VOCAB ** (STEPS - 1), eos_id=-1,
                  length_penalty_alpha=0.0)
  greedy = _decode(model, params, eos_id=-1)
  worse = 0
  for i, prefix in enumerate(PREFIXES):
    scored = _log_likelihoods(model, params, prefix,
                              itertools.product(range(VOCAB), repeat=STEPS))
    best = max(scored, key=scored.get)
    assert tuple(beams[i]) == best, (prefix, beams[i], best)
    assert scored[tuple(greedy[i])] <= scored[best] + 1e-5
    worse += scored[tuple(greedy[i])] < scored[best] - 1e-4
  assert worse >= 1  # the model is one where beam search matters


def test_wide_enough_beams_find_the_best_finished_continuation_by_penalized_score(
    model_and_params):
  # With EOS in the vocabulary, a length penalty (alpha 0.6 favours longer answers), and
  # as many beams as the longest unfinished prefixes (VOCAB - 2 tokens are neither padding
  # nor EOS), every unfinished prefix stays alive. Each step ranks its 2k best extensions,
  # which here hold every EOS extension that matters (not guaranteed in general: t5x's
  # beam search is not exhaustive either), so the answer must be the best finished
  # continuation by log-likelihood / ((5 + length) / 6) ** 0.6 of them all.
  model, params = model_and_params
  eos, alpha = 1, 0.6
  beams = _decode(model, params, num_beams=(VOCAB - 2) ** (STEPS - 1), eos_id=eos,
                  length_penalty_alpha=alpha)
  body = [t for t in range(VOCAB) if t not in (0, eos)]
  for i, prefix in enumerate(PREFIXES):
    finished = [c + (eos,) for n in range(STEPS) for c in itertools.product(body, repeat=n)]
    scored = _log_likelihoods(model, params, prefix, finished)
    ranked = {c: v / ((5.0 + len(c)) / 6.0) ** alpha for c, v in scored.items()}
    best = max(ranked, key=ranked.get)
    got = tuple(int(t) for t in beams[i] if t)
    assert got == best, (prefix, got, best, ranked[best], ranked.get(got))


def test_rows_whose_buffer_fills_stop_there(model_and_params):
  # A prefix of LENGTH - 2 tokens leaves room for 2 of the STEPS tokens: the second one
  # does not fit in the buffer, so, as in t5x, nothing follows it (0, no EOS) instead of
  # tokens predicted without it. With every prefix kept (VOCAB ** (STEPS - 1) beams, no
  # EOS), beam search returns the best (c0, c1) by log p6(c0) + log p7(c1 | c0), and it is
  # not always greedy's (asserted below: the beams are scored jointly).
  model, params = model_and_params
  rng = np.random.default_rng(0)
  prefixes = [list(rng.integers(1, VOCAB, LENGTH - 2)) for _ in range(8)]
  apply = jax.jit(lambda p, x: model.module.apply({"params": p}, x))
  wants, greedy_wants, detours = [], [], 0
  for prefix in prefixes:
    x = np.zeros((VOCAB, LENGTH), np.int32)
    x[:, 1:LENGTH - 1] = prefix
    x[:, LENGTH - 1] = np.arange(VOCAB)  # c0 at the last position
    logp = np.asarray(jax.nn.log_softmax(apply(params, x).astype(jnp.float32), -1))
    scored = {(c0, c1): logp[c0, LENGTH - 2, c0] + logp[c0, LENGTH - 1, c1]
              for c0, c1 in itertools.product(range(1, VOCAB), repeat=2)}  # no padding
    wants.append(max(scored, key=scored.get) + (0,))
    g0 = int(np.argmax(logp[0, LENGTH - 2]))
    greedy_wants.append((g0, int(np.argmax(logp[g0, LENGTH - 1])), 0))
    detours += wants[-1][0] != int(np.argmax(logp[0, LENGTH - 2, 1:])) + 1
  assert detours >= 1
  for kw, want in ((dict(num_beams=VOCAB ** (STEPS - 1), length_penalty_alpha=0.0), wants),
                   (dict(), greedy_wants)):
    for use_cache in (True, False):
      fn = jax.jit(lambda p, b: model.predict_batch(
          p, b, max_decode_length=STEPS, eos_id=-1, use_cache=use_cache, **kw))
      got = [tuple(int(t) for t in row)
             for row in np.asarray(fn(params, _prefix_batch(prefixes)))]
      assert got == want, (kw, use_cache)


class _MarkovDecoder:
  """A decoder (as `lm._Decoder`) whose next-token probabilities depend on the last token
  only: 0 padding, 1 EOS. First: EOS 0.4, 2 0.35, 3 0.25. After 2: 4 (0.99); after 4: EOS
  (0.99); after 3: EOS (0.9)."""

  VOCAB = 5

  def _logits(self, last_token):
    table = np.full((self.VOCAB, self.VOCAB), 1e-9)
    table[2, 4], table[4, 1], table[3, 1] = 0.99, 0.99, 0.9
    table[3, 2] = table[3, 4] = 0.05
    table[1, 2] = table[0, 2] = 1.0  # after EOS / padding: never used
    return jnp.log(jnp.asarray(table, jnp.float32))[last_token]

  def start(self, buf, plen):
    first = jnp.log(jnp.asarray([1e-9, 0.4, 0.35, 0.25, 1e-9], jnp.float32))
    return jnp.tile(first, (buf.shape[0], 1)), jnp.zeros((buf.shape[0], 1))

  def advance(self, state, tok, pos):
    return self._logits(tok), state

  def reorder(self, state, rows):
    return state[rows]


@pytest.mark.parametrize("alpha,want", [(0.0, [1, 0, 0, 0]), (0.6, [2, 4, 1, 0])])
def test_a_finished_beam_does_not_take_the_place_of_an_alive_one(alpha, want):
  # One beam: EOS is the most likely first token ([EOS]: log 0.4 = -0.92), but with the
  # length penalty [2, 4, EOS] ranks higher (log(0.35 * 0.99 * 0.99) / (8/6) ** 0.6 =
  # -0.90). A beam search whose only beam had finished with [EOS] would never see it.
  model = lm.DecoderOnlyModel(config=models.PaLMConfig(
      vocab_size=5, num_layers=1, d_model=8, num_heads=1, head_dim=8, d_ff=8))
  buf, plen = jnp.zeros((2, 4), jnp.int32), jnp.ones((2,), jnp.int32)
  got = model._beam_search(_MarkovDecoder(), buf, plen, num_beams=1, max_decode_length=4,
                           eos_id=1, alpha=alpha)
  np.testing.assert_array_equal(np.asarray(got), [want, want])


def test_beams_stop_at_eos_and_pad_after_it(model_and_params):
  model, params = model_and_params
  # EOS = the greedy first token of the first example, so that its best beam ends at once.
  eos = int(_decode(model, params, eos_id=-1)[0, 0])
  out = _decode(model, params, num_beams=4, eos_id=eos)
  for row in out:
    hits = np.nonzero(row == eos)[0]
    if len(hits):
      assert not row[hits[0] + 1:].any(), row


def test_beam_search_refuses_sampling(model_and_params):
  model, params = model_and_params
  with pytest.raises(ValueError, match="beam search is deterministic"):
    model.predict_batch(params, _prefix_batch(PREFIXES), max_decode_length=2, num_beams=2,
                        temperature=1.0)

"""The decoder-only model as the trainer sees it: loss, scoring and decoding over seqio batches.

Batches are what seqio's LM / PrefixLM feature converters produce: `decoder_input_tokens`,
`decoder_target_tokens`, `decoder_loss_weights`, optionally `decoder_segment_ids`,
`decoder_positions` (packed blocks) and `decoder_causal_attention` (prefix LM).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from palmflow.trainer import losses, models
from palmflow.trainer.models import DTYPES, PaLMConfig, PaLMDecoder, logits_scale

Batch = Mapping[str, jax.Array]


def default_loss_chunk_tokens() -> int:
  """Tokens whose logits the loss computes at a time (`DecoderOnlyModel.loss_chunk_tokens`
  0), or -1 for the whole logits at once.

  On one device: 512 on CPU, where a chunk's [tokens, vocab] logits should stay in cache
  (palm_small bf16: the output projection and loss, forward and backward, 1.3-1.9x faster
  than over the whole batch at once; about 5% of a training step), 4096 on an accelerator.
  On several devices the whole logits, as t5x does: with the batch sharded over devices,
  each chunk's partial kernel gradient ([embed, vocab]) would be all-reduced inside the
  chunk loop, once a chunk instead of once a step. A positive `loss_chunk_tokens` asks for
  chunks anyway.
  """
  if jax.device_count() > 1:
    return -1
  return 512 if jax.default_backend() == "cpu" else 4096


@dataclasses.dataclass(frozen=True)
class DecoderOnlyModel:
  """A PaLM decoder with its loss and decoding settings (t5x `DecoderOnlyModel` analogue).

  Attributes:
    config: the architecture.
    optimizer: the optax optimizer used to train it.
    label_smoothing: LABEL_SMOOTHING.
    z_loss: Z_LOSS (PaLM: 1e-4).
    loss_normalizing_factor: a `losses.LossNormalizingFactor` name (default
      "NUM_REAL_TARGET_TOKENS": per real target token), a number, or None (t5x's None: the
      summed loss, not divided).
    attend_across_documents: False confines attention to one document of a packed block.
    loss_chunk_tokens: tokens of the batch whose logits the loss computes at a time;
      smaller chunks stay in cache, larger ones keep an accelerator busy. Negative: the
      whole [batch, length, vocab] logits, then the loss (as `score_batch` does). 0: see
      `default_loss_chunk_tokens` (chunks on one device, whole logits on several).
  """

  config: PaLMConfig
  optimizer: optax.GradientTransformation | None = None
  label_smoothing: float = 0.0
  z_loss: float = 1e-4
  loss_normalizing_factor: Any = "NUM_REAL_TARGET_TOKENS"
  attend_across_documents: bool = False
  loss_chunk_tokens: int = 0

  @property
  def module(self) -> PaLMDecoder:
    return PaLMDecoder(self.config)

  def init(self, rng: jax.Array, *, batch_size: int, length: int):
    """Boxed variables (with logical axis names) for inputs of this shape."""
    tokens = jnp.zeros((batch_size, length), jnp.int32)
    return self.module.init({"params": rng}, tokens)

  def _logits(self, params, batch: Batch, *, dropout_rng=None, return_hidden=False):
    seg = None if self.attend_across_documents else batch.get("decoder_segment_ids")
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    return self.module.apply(
        {"params": params}, batch["decoder_input_tokens"], segment_ids=seg,
        positions=batch.get("decoder_positions"),
        causal_attention_mask=batch.get("decoder_causal_attention"),
        deterministic=dropout_rng is None, rngs=rngs, return_hidden=return_hidden)

  def loss_fn(self, params, batch: Batch, dropout_rng=None):
    """(loss, metrics sums) for one batch; dropout when `dropout_rng` is given.

    With chunks (`loss_chunk_tokens`), the logits are never materialised: the final hidden
    states go to `losses.projected_cross_entropy_loss` with the output weights, which
    projects and scores them a chunk of positions at a time.
    """
    chunk_tokens = self.loss_chunk_tokens or default_loss_chunk_tokens()
    if chunk_tokens < 0:  # the logits in whole, then the loss
      logits = self._logits(params, batch, dropout_rng=dropout_rng)
      loss, z, stats = losses.cross_entropy_loss(
          logits, batch["decoder_target_tokens"], weights=batch["decoder_loss_weights"],
          label_smoothing=self.label_smoothing, z_loss=self.z_loss,
          loss_normalizing_factor=self.loss_normalizing_factor,
          segment_ids=batch.get("decoder_segment_ids"))
      return loss, dict(stats, z_loss=z)
    hidden = self._logits(params, batch, dropout_rng=dropout_rng, return_hidden=True)
    c = self.config
    kernel = params["embedding"] if c.shared_embedding else params["logits_kernel"]
    loss, z, stats = losses.projected_cross_entropy_loss(
        hidden, kernel, batch["decoder_target_tokens"],
        weights=batch["decoder_loss_weights"], vocab_major=c.shared_embedding,
        scale=float(logits_scale(c)), dtype=DTYPES[c.dtype],
        label_smoothing=self.label_smoothing, z_loss=self.z_loss,
        loss_normalizing_factor=self.loss_normalizing_factor,
        chunk_tokens=chunk_tokens, segment_ids=batch.get("decoder_segment_ids"))
    stats = dict(stats, z_loss=z)
    return loss, stats

  def score_batch(self, params, batch: Batch) -> jax.Array:
    """Sum of target-token log-likelihoods per example ([batch] float32)."""
    logits = self._logits(params, batch)
    logp = jax.nn.log_softmax(logits, axis=-1)
    tok = jnp.take_along_axis(logp, batch["decoder_target_tokens"][..., None], -1)[..., 0]
    return jnp.sum(tok * batch["decoder_loss_weights"], axis=-1)

  def score_options(self, params, batch: Batch, options: jax.Array) -> jax.Array:
    """Log-likelihood of every option after every example's prefix: [batch, options].

    ``batch`` holds the prefixes alone in prefix-LM layout (`decoder_input_tokens`,
    `decoder_causal_attention`: `eval_lib.prefix_batch`); ``options`` is
    [options, width] token ids, 0 after each option's end. The same sums as `score_batch`
    of each prefix followed by each option, from one prefill per example whose cache is
    shared by its options, then one cached step per option token: a rank classification
    with N options costs about one forward pass instead of N. An option token that would
    fall past the end of the row counts nothing, as in `score_batch`.
    """
    buf, plen, mask = _prefixes(batch)
    b, length = buf.shape
    n, width = options.shape
    decoder = _Decoder(self, params, mask, use_cache=True)
    last, state = decoder.start(buf, plen)
    rows = jnp.repeat(jnp.arange(b), n)  # row r: example r // n, option r % n
    last, state, plen = last[rows], decoder.reorder(state, rows), plen[rows]
    opts = jnp.tile(jnp.asarray(options, jnp.int32), (b, 1))

    def add(j, last, total):
      tok = opts[:, j]
      logp = jax.nn.log_softmax(last.astype(jnp.float32), axis=-1)
      here = jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]
      return total + jnp.where((tok > 0) & (plen - 1 + j < length), here, 0.0)

    def step(j, carry):  # option token j - 1 goes in at plen + j - 1; its logits score j
      state, total = carry
      last, state = decoder.advance(state, opts[:, j - 1], plen + j - 1)
      return state, add(j, last, total)

    total = add(0, last, jnp.zeros((b * n,), jnp.float32))
    _, total = jax.lax.fori_loop(1, width, step, (state, total))
    return total.reshape(b, n)

  def predict_batch(self, params, batch: Batch, *, max_decode_length: int,
                    eos_id: int = 1, temperature: float = 0.0, top_k: int = 0,
                    rng: jax.Array | None = None, num_beams: int = 1,
                    length_penalty_alpha: float = 0.6, use_cache: bool = True) -> jax.Array:
    """Decodes after each example's prefix (greedy, temperature sampling with top-k, or beam
    search with `num_beams` > 1: see `_beam_search`).

    The prefix is where `decoder_causal_attention` is 1 (prefix LM: the inputs, attended
    bidirectionally as in training); without it (LM) the whole non-padding target sequence is
    the prefix and attention stays causal. Decoding is cached, as in t5x: one pass over the
    prefixes fills every layer's keys and values, then each step runs the model on one new
    token per example against them. ``use_cache=False`` re-runs the model on the whole
    buffer every step instead (the same tokens; kept as a reference). Sampling with
    `temperature` > 0 keeps the `top_k` most likely tokens (0: all) and is reproducible for
    a given `rng`; top_k=1 is greedy decoding. A row whose buffer fills up before
    `max_decode_length` tokens ends there, as t5x's decoding stops at the end of its buffer:
    the token predicted at the buffer's last position is the row's last, and 0 follows it.

    Returns:
      [batch, max_decode_length] int32 tokens: the EOS, then 0 after it.
    """
    if max_decode_length < 1:
      raise ValueError(f"max_decode_length must be >= 1, got {max_decode_length}")
    buf, plen, mask = _prefixes(batch)
    b, length = buf.shape
    decoder = _Decoder(self, params, mask, use_cache)
    if num_beams > 1:
      if temperature > 0:
        raise ValueError("beam search is deterministic: use temperature 0 with num_beams > 1")
      return self._beam_search(decoder, buf, plen, num_beams=num_beams,
                               max_decode_length=max_decode_length, eos_id=eos_id,
                               alpha=length_penalty_alpha)
    rng = jax.random.PRNGKey(0) if rng is None else rng

    def choose(last, rng):
      rng, sub = jax.random.split(rng)
      if temperature > 0:
        scaled = last / temperature
        if top_k:
          kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
          scaled = jnp.where(scaled < kth, -1e10, scaled)
        return jax.random.categorical(sub, scaled).astype(jnp.int32), rng
      return jnp.argmax(last, axis=-1).astype(jnp.int32), rng

    def step(i, carry):
      # Token i - 1 goes to position plen + i - 1; its logits give token i. A token that
      # does not fit in the buffer ends its row.
      state, out, done, rng = carry
      pos = plen + i - 1
      last, state = decoder.advance(state, out[:, i - 1], pos)
      nxt, rng = choose(last, rng)
      done = done | (pos >= length)
      nxt = jnp.where(done, 0, nxt)
      return state, out.at[:, i].set(nxt), done | (nxt == eos_id), rng

    last, state = decoder.start(buf, plen)
    first, rng = choose(last, rng)
    out = jnp.zeros((b, max_decode_length), jnp.int32).at[:, 0].set(first)
    carry = (state, out, first == eos_id, rng)
    return jax.lax.fori_loop(1, max_decode_length, step, carry)[1]

  def _beam_search(self, decoder: "_Decoder", buf: jax.Array, plen: jax.Array, *,
                   num_beams: int, max_decode_length: int, eos_id: int,
                   alpha: float) -> jax.Array:
    """Beam search as t5x's: the `num_beams` most likely unfinished continuations of each
    prefix (the alive beams) and, apart from them, the `num_beams` best finished ones (that
    emitted EOS), ranked by log-likelihood divided by the length penalty
    ((5 + length) / 6) ** alpha (alpha 0: the most likely one).

    Each step extends the alive beams by their 2 * `num_beams` most likely tokens (at most
    one of a beam's extensions is EOS, so enough stay unfinished): the finished extensions
    compete with the finished set, the others become the new alive beams. A finished beam
    never takes an alive beam's place. The best finished beam is returned, or when none
    finished within `max_decode_length` steps, the best alive (cut) one. Alive beams never
    emit the padding id 0 (it would be dropped from the text), except where the buffer is
    full: there the alive beams stop, as t5x's decoding does at the end of its buffer, and
    take 0 with their scores unchanged.
    """
    b, length = buf.shape
    k = num_beams
    # One prefill per example, its cache (or buffer) then repeated for each beam.
    last, state = decoder.start(buf, plen)
    rows = jnp.repeat(jnp.arange(b), k)
    last, state = last[rows], decoder.reorder(state, rows)
    plen = plen[rows]
    steps = max_decode_length
    # Only the first beam of each example is alive at first, so the first step's best
    # tokens all continue it.
    alive_scores = jnp.tile(jnp.asarray([0.0] + [-jnp.inf] * (k - 1), jnp.float32), (b, 1))
    alive = jnp.zeros((b, k, steps), jnp.int32)
    finished = jnp.zeros((b, k, steps), jnp.int32)
    finished_scores = jnp.full((b, k), -jnp.inf, jnp.float32)  # log-likelihoods
    finished_ranks = jnp.full((b, k), -jnp.inf, jnp.float32)   # ... / length penalty

    def extend(i, full, last, state, alive, alive_scores, finished, finished_scores,
               finished_ranks):
      logp = jax.nn.log_softmax(last.astype(jnp.float32), axis=-1).reshape(b, k, -1)
      vocab = logp.shape[-1]
      # A full row's beams can only take 0, at no cost.
      stop = jnp.full((vocab,), -jnp.inf, jnp.float32).at[0].set(0.0)
      logp = jnp.where(full.reshape(b, k, 1), stop, logp.at[..., 0].set(-jnp.inf))
      cand = alive_scores[..., None] + logp
      top, flat = jax.lax.top_k(cand.reshape(b, k * vocab), min(2 * k, k * vocab))
      src, tok = flat // vocab, (flat % vocab).astype(jnp.int32)
      seqs = jnp.take_along_axis(alive, src[..., None], axis=1).at[:, :, i].set(tok)
      is_eos = tok == eos_id
      # Finished: the EOS extensions join the finished set, which keeps its best k.
      ranks = jnp.where(is_eos, top / ((5.0 + (i + 1)) / 6.0) ** alpha, -jnp.inf)
      all_ranks = jnp.concatenate([finished_ranks, ranks], axis=1)
      best_ranks, keep = jax.lax.top_k(all_ranks, k)
      finished = jnp.take_along_axis(jnp.concatenate([finished, seqs], axis=1),
                                     keep[..., None], axis=1)
      finished_scores = jnp.take_along_axis(
          jnp.concatenate([finished_scores, jnp.where(is_eos, top, -jnp.inf)], axis=1),
          keep, axis=1)
      # Alive: the best k extensions that are not EOS (top_k keeps their order).
      alive_scores, pick = jax.lax.top_k(jnp.where(is_eos, -jnp.inf, top), k)
      alive = jnp.take_along_axis(seqs, pick[..., None], axis=1)
      source = jnp.take_along_axis(src, pick, axis=1)
      rows = (source + jnp.arange(b)[:, None] * k).reshape(b * k)
      # The state moves with its beams.
      return (decoder.reorder(state, rows), alive, alive_scores, finished, finished_scores,
              best_ranks)

    def step(i, carry):
      state, alive = carry[:2]
      pos = plen + i - 1
      last, state = decoder.advance(state, alive[:, :, i - 1].reshape(b * k), pos)
      return extend(i, pos >= length, last, state, alive, *carry[2:])

    carry = extend(0, jnp.zeros((b * k,), bool), last, state, alive, alive_scores, finished,
                   finished_scores, finished_ranks)
    carry = jax.lax.fori_loop(1, steps, step, carry)
    _, alive, alive_scores, finished, finished_scores, _ = carry
    return pick_beam(jnp.concatenate([finished, alive], axis=1),
                     jnp.concatenate([finished_scores, alive_scores], axis=1),
                     eos_id=eos_id, alpha=alpha)


def _prefixes(batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """(decoder inputs with 0 after each prefix, prefix lengths [batch], prefix mask or None).

  The prefix is where `decoder_causal_attention` is 1 (prefix LM); without it (LM), the
  non-padding targets and the position before them.
  """
  tokens = batch["decoder_input_tokens"]
  length = tokens.shape[1]
  mask = batch.get("decoder_causal_attention")
  if mask is not None:
    # decoder inputs [0, x_1..x_n] at the n + 1 prefix positions predict the first target.
    plen = jnp.sum(mask, axis=-1).astype(jnp.int32)
  else:
    # decoder inputs [0, t_1..t_n]: n targets, so n + 1 positions.
    plen = jnp.minimum(jnp.sum(batch["decoder_target_tokens"] > 0, axis=-1) + 1, length)
    plen = plen.astype(jnp.int32)
  idx = jnp.arange(length)[None, :]
  return jnp.where(idx < plen[:, None], tokens, 0), plen, mask


class _Decoder:
  """Next-token logits, one position at a time, for `DecoderOnlyModel.predict_batch` and
  `score_options`.

  With a cache, the state is every layer's (keys, values) ([layers, batch, length, ...]);
  without, the token buffer ([batch, length]) that the model re-runs on whole, and the
  prefix mask.
  """

  def __init__(self, model: DecoderOnlyModel, params, mask: jax.Array | None,
               use_cache: bool):
    self._model, self._params, self._mask, self._cached = model, params, mask, use_cache

  def _apply(self, tokens, **kwargs):
    return self._model.module.apply({"params": self._params}, tokens, **kwargs)

  def start(self, buf: jax.Array, plen: jax.Array):
    """(logits at each row's last prefix position [batch, vocab], state). A row with no
    prefix (a padding row of a prefix-LM batch) reads position 0."""
    def at(x, pos):
      pos = jnp.maximum(pos, 0)
      return jnp.take_along_axis(x, pos[:, None, None], axis=1)[:, 0]
    if not self._cached:
      logits = self._apply(buf, causal_attention_mask=self._mask)
      return at(logits, plen - 1), {"buf": buf, "mask": self._mask}
    hidden, cache = self._apply(buf, causal_attention_mask=self._mask, return_hidden=True,
                                return_cache=True)
    return self._project(at(hidden, plen - 1)), cache

  def _project(self, hidden: jax.Array) -> jax.Array:
    """[batch, d_model] final states -> [batch, vocab] float32 logits, as the model's own
    output projection computes them (keep in step with the end of `PaLMDecoder.__call__`;
    the cached-decoding tests compare the two)."""
    c = self._model.config
    if c.shared_embedding:
      return models.matmul(hidden, self._params["embedding"], True, DTYPES[c.dtype],
                           jnp.float32) * logits_scale(c)
    return models.matmul(hidden, self._params["logits_kernel"], False, DTYPES[c.dtype],
                         jnp.float32)

  def advance(self, state, tok: jax.Array, pos: jax.Array):
    """Puts `tok` ([batch]) at `pos` ([batch]) and returns (its logits, the new state). A row
    whose `pos` is past the buffer cannot grow: its logits mean nothing, and every caller
    masks them (the row has ended, or its option tokens count nothing)."""
    length = state[0].shape[2] if self._cached else state["buf"].shape[1]
    if self._cached:
      logits, state = self._apply(tok[:, None], cache=state, cache_index=pos)
      logits = logits[:, 0]
    else:
      idx = jnp.arange(length)[None, :]
      buf = jnp.where(idx == pos[:, None], tok[:, None], state["buf"])
      state = dict(state, buf=buf)
      logits = self._apply(buf, causal_attention_mask=state["mask"])
      logits = jnp.take_along_axis(logits, jnp.minimum(pos, length - 1)[:, None, None],
                                   axis=1)[:, 0]
    return logits, state

  def reorder(self, state, rows: jax.Array):
    """The state of the rows `rows` (beam search's survivors)."""
    axis = 1 if self._cached else 0
    return jax.tree.map(lambda a: jnp.take(a, rows, axis=axis), state)


def pick_beam(out: jax.Array, scores: jax.Array, *, eos_id: int, alpha: float) -> jax.Array:
  """The beam to return per example ([batch, beams, steps] tokens, [batch, beams] summed
  log-likelihoods): the best score / ((5 + length) / 6) ** alpha among the finished beams
  (with an EOS), or among all when none finished."""
  steps = out.shape[-1]
  is_eos = out == eos_id
  lengths = jnp.where(jnp.any(is_eos, -1), jnp.argmax(is_eos, -1) + 1, steps)
  penalty = ((5.0 + lengths.astype(jnp.float32)) / 6.0) ** alpha
  ranked = scores / penalty
  finished = jnp.any(is_eos, -1) & jnp.isfinite(scores)
  ranked = jnp.where(jnp.any(finished, -1, keepdims=True) & ~finished, -jnp.inf, ranked)
  best = jnp.argmax(ranked, axis=-1)
  return jnp.take_along_axis(out, best[:, None, None], axis=1)[:, 0]

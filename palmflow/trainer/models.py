"""PaLM-style decoder-only language model (flax.linen), free of gin.

The architecture follows the PaLM paper (Chowdhery et al., 2022, section 2): SwiGLU feed-forward,
the parallel block formulation ``y = x + attn(ln(x)) + mlp(ln(x))``, multi-query attention,
rotary position embeddings, shared input/output embeddings (pre-softmax logits scaled by
``1/sqrt(d_model)``), no biases, and layer norms without bias.

Every parameter carries logical axis names (``vocab``, ``embed``, ``mlp``, ``heads``, ``kv``,
``layers``) so that ``palmflow.trainer.partitioning`` maps it onto a ``data`` x ``model`` mesh.
Layers are stacked with ``nn.scan``: one layer is traced whatever the depth, so
``jax.eval_shape`` of PaLM 540B takes well under a second; shallow stacks are unrolled when
compiled (`PaLMConfig.scan_unroll`).

Speed on CPU (XLA:CPU) shapes how the products are written: tokens are flattened to
``[batch * length, ...]`` and every product goes through `matmul`, whose forward and
backward products all contract the minor axis of their left operand, with bf16 operands
and float32 accumulation. That is the form XLA:CPU hands to its bf16 kernels (AMX /
AVX512-BF16); any other form is upcast to float32 or copied through a transpose
(``bench/bench_train.py`` measures it).

Local check (CPU)::

        python -c "import jax, jax.numpy as jnp; from palmflow.trainer import models; \
c = models.PaLMConfig(vocab_size=512, num_layers=2, d_model=64, num_heads=4, head_dim=16, \
d_ff=256); m = models.PaLMDecoder(config=c); t = jnp.zeros((2, 8), jnp.int32); \
print(m.apply(m.init(jax.random.key(0), t), t).shape)"

On an accelerator the same code runs unchanged; the mesh comes from ``partitioning.Partitioner``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

DTYPES: dict[str, Any] = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}

# Finite "minus infinity" for masked attention logits (computed in float32).
_MASK_VALUE = -1e10

# Deepest stack that `PaLMConfig.scan_unroll` = 0 unrolls (PaLM 8B has 32 layers).
MAX_UNROLLED_LAYERS = 32


@dataclasses.dataclass(frozen=True)
class PaLMConfig:
  """Shape and numerics of a PaLM decoder.

  The paper's sizes (Table 1) live in ``gin/models/palm_{8b,62b,540b}.gin``.
  """

  vocab_size: int
  """Number of token ids (rows of the embedding matrix); PaLM uses 256k SentencePiece pieces."""
  num_layers: int
  """Number of decoder layers."""
  d_model: int
  """Width of the residual stream (embedding size)."""
  num_heads: int
  """Number of query heads."""
  head_dim: int
  """Size of each attention head (PaLM: 256). Must be even (rotary embeddings rotate pairs)."""
  d_ff: int
  """Hidden width of the SwiGLU feed-forward (PaLM: 4 * d_model)."""
  multi_query: bool = True
  """True: one key/value head shared by all query heads (PaLM). False: multi-head attention."""
  parallel_block: bool = True
  """True: ``y = x + attn(ln(x)) + mlp(ln(x))`` with one layer norm (PaLM). False: serial
  pre-norm block ``x = x + attn(ln1(x)); y = x + mlp(ln2(x))``."""
  dropout_rate: float = 0.0
  """Dropout on the attention and MLP outputs when ``deterministic=False`` (PaLM pretraining: 0;
  t5x finetuning default: 0.1)."""
  dtype: str = "float32"
  """Activation/compute dtype: "float32", "bfloat16" or "float16". Softmax, layer-norm statistics
  and logits are always float32."""
  param_dtype: str = "float32"
  """Dtype parameters are stored in (cast to ``dtype`` for compute)."""
  rope_max_wavelength: float = 10000.0
  """Longest wavelength of the rotary position embedding."""
  remat: bool = False
  """Rematerialise each layer's activations in the backward pass (saves memory, costs compute)."""
  shared_embedding: bool = True
  """True: logits = final_norm(x) @ embedding^T / sqrt(d_model) (PaLM). False: a separate
  ``logits_kernel`` ("embed", "vocab") without scaling."""
  scan_unroll: int = 0
  """Layers applied per iteration of the compiled layer loop (``nn.scan``'s ``unroll``). 0
  (default): the whole stack for models of at most `MAX_UNROLLED_LAYERS` layers, one layer
  for deeper ones. An unrolled loop keeps each layer's activations in their own buffers
  instead of stacking them for the backward pass (palm_small trains ~1.5x faster on a CPU);
  compile time grows with the depth. Parameters are stacked along ``layers`` either way."""

  attention_blocks: int = 0
  """Causal attention is computed in this many blocks of query positions, each against
  the keys up to its own end only, skipping the blocks above the diagonal that the causal
  mask would drop whole (palm_small's attention forward + backward at length 512 on a CPU:
  1.7x faster with 2 blocks, 1.9x with 4). 0 (default): 4 for lengths of at least 256, else
  1. A length it does not divide, and prefix-LM attention (bidirectional over the inputs),
  use one block."""

  def __post_init__(self) -> None:
    for name in ("vocab_size", "num_layers", "d_model", "num_heads", "head_dim", "d_ff"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"PaLMConfig.{name} must be a positive int, got {value!r}.")
    if self.head_dim % 2:
      raise ValueError(
          f"PaLMConfig.head_dim must be even for rotary embeddings, got {self.head_dim}.")
    for name in ("dtype", "param_dtype"):
      value = getattr(self, name)
      if value not in DTYPES:
        raise ValueError(
            f"PaLMConfig.{name} must be one of {sorted(DTYPES)}, got {value!r}.")
    if isinstance(self.scan_unroll, bool) or not isinstance(
            self.scan_unroll, (int, np.integer)) or self.scan_unroll < 0:
      raise ValueError(
          f"PaLMConfig.scan_unroll must be an int >= 0, got {self.scan_unroll!r}.")
    if isinstance(self.attention_blocks, bool) or not isinstance(
            self.attention_blocks, (int, np.integer)) or self.attention_blocks < 0:
      raise ValueError(
          f"PaLMConfig.attention_blocks must be an int >= 0, got {self.attention_blocks!r}.")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(
          f"PaLMConfig.dropout_rate must be in [0, 1), got {self.dropout_rate!r}.")
    if self.rope_max_wavelength <= 0:
      raise ValueError(
          f"PaLMConfig.rope_max_wavelength must be > 0, got {self.rope_max_wavelength!r}.")

  def causal_blocks(self, length: int) -> int:
    """The query blocks of causal attention over `length` positions (see
    `attention_blocks`)."""
    blocks = self.attention_blocks or (4 if length >= 256 else 1)
    return blocks if blocks <= length and length % blocks == 0 else 1

  @property
  def layers_per_loop_iteration(self) -> int:
    """The ``unroll`` of the layer loop that `scan_unroll` asks for."""
    if self.scan_unroll:
      return min(self.scan_unroll, self.num_layers)
    return self.num_layers if self.num_layers <= MAX_UNROLLED_LAYERS else 1

  @property
  def num_kv_heads(self) -> int:
    """Number of key/value heads: 1 for multi-query attention, else ``num_heads``."""
    return 1 if self.multi_query else self.num_heads

  def num_params(self) -> int:
    """Returns the number of parameters; see `count_params`."""
    return count_params(self)


def count_params(config: PaLMConfig) -> int:
  """Counts the parameters of `PaLMDecoder` analytically (no tracing).

  Args:
      config: the model configuration.

  Returns:
      The number of scalar parameters, equal to the size of ``PaLMDecoder(config).init(...)``.
  """
  d, h, k, f = config.d_model, config.num_heads, config.head_dim, config.d_ff
  attention = d * h * k + 2 * d * config.num_kv_heads * k + h * k * d
  mlp = 3 * d * f
  norms = (1 if config.parallel_block else 2) * d
  per_layer = attention + mlp + norms
  embeddings = config.vocab_size * d * (1 if config.shared_embedding else 2)
  return config.num_layers * per_layer + embeddings + d  # + final norm


def _kernel_init(in_axis: int | tuple[int, ...], out_axis: int | tuple[int, ...]):
  """PaLM's "fan-in variance scaling": W ~ N(0, 1/n_in)."""
  return nn.initializers.variance_scaling(
      1.0, "fan_in", "normal", in_axis=in_axis, out_axis=out_axis)


def _transposed(x: Array) -> Array:
  """``swapaxes(x, -1, -2)`` materialised row-major, so a product can read it as its left operand.

  XLA:CPU hands a bf16 product to its bf16 kernels (AMX / AVX512-BF16 through YNNPACK) only
  when the left operand's contracted axis is its minor one; otherwise it upcasts both
  operands to float32 and runs at the float32 rate. A plain transpose is folded into the
  product's dimension numbers (or given a column-major layout) before that decision, so it
  does not help; a trailing unit axis makes XLA copy the data into row-major order, with its
  tiled transpose ([4096, 512] bf16: 0.9 ms; with the unit axis between m and k, as this
  was written before, the generic loop took 5.6 ms alone and ~10 ms inside a step).
  """
  *lead, m, k = x.shape
  return jnp.swapaxes(x.reshape(*lead, m, k, 1), -2, -3).reshape(*lead, k, m)


def _mm(a: Array, b: Array, transpose_b: bool) -> Array:
  """``a @ b`` (or ``a @ b^T``) over the last two axes, accumulating in float32."""
  dims = (((a.ndim - 1,), (b.ndim - 1 if transpose_b else b.ndim - 2,)),
          (tuple(range(a.ndim - 2)), tuple(range(b.ndim - 2))))
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def matmul(a: Array, b: Array, transpose_b: bool, dtype: Any, out_dtype: Any) -> Array:
  """``a @ b`` (``a @ b^T`` if ``transpose_b``) with ``dtype`` operands and float32 accumulation.

  ``a`` is [..., m, k]; ``b`` is [..., k, n] (or [..., n, k]) with the same leading (batch)
  axes. Forward and backward, every product multiplies ``dtype`` operands (the cotangent is
  cast to ``dtype`` too, except a float32 one under float16) into a float32 accumulator. On
  CPU each product is arranged so that its left operand is contracted along its minor axis:
  the form XLA:CPU runs on its bf16 units (AMX / AVX512-BF16), which needs no transposed
  copy of a large activation either. Where a gradient needs ``x^T @ y``, the smaller of the
  two operands is transposed (see `_transposed`). Gradients come back in the dtypes of
  ``a`` and ``b``: float32 parameters get float32-accumulated gradients.

  Args:
      a: [..., m, k], any float dtype (cast to ``dtype``).
      b: [..., k, n], or [..., n, k] with ``transpose_b``.
      transpose_b: multiply by the transpose of ``b``.
      dtype: the operands' compute dtype.
      out_dtype: the result's dtype.

  Returns:
      [..., m, n] in ``out_dtype``.
  """
  return _mm(a.astype(dtype), b.astype(dtype), transpose_b).astype(out_dtype)


def _matmul_fwd(a, b, transpose_b, dtype, out_dtype):
  return matmul(a, b, transpose_b, dtype, out_dtype), (a, b)


def _matmul_bwd(transpose_b, dtype, out_dtype, residuals, ct):
  del out_dtype
  a, b = residuals
  if jnp.dtype(dtype) == jnp.float16:
    # float16 lacks float32's exponent range: a float32 cotangent (of the logits) stays
    # float32 rather than underflow; loss scaling takes care of the float16 ones.
    dtype = jnp.promote_types(ct.dtype, dtype)
  ct, ac, bc = ct.astype(dtype), a.astype(dtype), b.astype(dtype)
  # d a = ct @ b^T (b: [k, n]) or ct @ b (b: [n, k]).
  da = _mm(ct, bc, not transpose_b)
  # d b = a^T @ ct ([k, n]) or its transpose ([n, k]): transpose whichever of a ([m, k]) and
  # ct ([m, n]) is cheaper, and the (weight-sized) result if it comes out the other way. The
  # barrier keeps XLA from folding that last transpose back into the product (which would
  # make it a transposed-left-operand product again).
  m, k = a.shape[-2:]
  n = ct.shape[-1]
  if jax.default_backend() != "cpu":
    # GPU/TPU libraries read transposed operands directly: contract the m axis in place.
    batch = tuple(range(a.ndim - 2))
    x, y = (ct, ac) if transpose_b else (ac, ct)
    db = jax.lax.dot_general(x, y, (((x.ndim - 2,), (y.ndim - 2,)), (batch, batch)),
                             preferred_element_type=jnp.float32)
  elif m * k + (k * n if transpose_b else 0) <= m * n + (0 if transpose_b else k * n):
    db = _mm(_transposed(ac), ct, False)  # [k, n]
    if transpose_b:
      db = jnp.swapaxes(jax.lax.optimization_barrier(db), -1, -2)
  else:
    db = _mm(_transposed(ct), ac, False)  # [n, k]
    if not transpose_b:
      db = jnp.swapaxes(jax.lax.optimization_barrier(db), -1, -2)
  return da.astype(a.dtype), db.astype(b.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


@jax.custom_vjp
def swiglu(gate: Array, lin: Array) -> Array:
  """``silu(gate) * lin``, computed in float32 (at least) and returned in the inputs' dtype.

  XLA:CPU evaluates a bf16 expression one operation at a time, rounding every intermediate
  to bf16 and converting it back, which made this product and its gradient the slowest
  elementwise passes of a bf16 step (2x the float32 expression, measured on [4096, 2048]).
  The gradient is written out: one float32 pass over the bf16 inputs (the residuals),
  rather than autodiff of the float32 expression, which would keep float32 intermediates.
  """
  out = jnp.result_type(gate, lin)
  wide = jnp.promote_types(out, jnp.float32)  # float32, or float64 for float64 inputs
  g = gate.astype(wide)
  return (g * jax.nn.sigmoid(g) * lin.astype(wide)).astype(out)


def _swiglu_fwd(gate, lin):
  return swiglu(gate, lin), (gate, lin)


def _swiglu_bwd(residuals, ct):
  gate, lin = residuals
  wide = jnp.promote_types(jnp.result_type(gate, lin), jnp.float32)
  g, x, c = gate.astype(wide), lin.astype(wide), ct.astype(wide)
  s = jax.nn.sigmoid(g)
  # d/dg [g s(g)] = s (1 + g (1 - s))
  return ((c * x * s * (1 + g * (1 - s))).astype(gate.dtype),
          (c * g * s).astype(lin.dtype))


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def logits_scale(config: PaLMConfig) -> np.float32:
  """What the output projection's logits are multiplied by: ``1 / sqrt(d_model)`` with
  shared embeddings (PaLM), else 1."""
  return np.float32(1.0 / np.sqrt(config.d_model) if config.shared_embedding else 1.0)


class LayerNorm(nn.Module):
  """Layer normalisation with a scale and no bias; statistics in float32.

  Attributes:
      dtype: output dtype.
      param_dtype: dtype of the scale parameter.
      epsilon: added to the variance.
  """

  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Normalises over the last axis.

    Args:
        x: [..., embed].

    Returns:
        The normalised and scaled ``x`` in ``dtype``.
    """
    scale = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        (x.shape[-1],), self.param_dtype)
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
    y = centred * jax.lax.rsqrt(var + self.epsilon)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


def rotary_sin_cos(positions: Array, *, head_dim: int,
                   max_wavelength: float) -> tuple[Array, Array]:
  """Sine and cosine tables of the rotary embedding.

  Args:
      positions: [batch, length] integer positions.
      head_dim: size of a head (even).
      max_wavelength: longest wavelength.

  Returns:
      (sin, cos), each [batch, length, head_dim // 2] float32.
  """
  half = head_dim // 2
  timescale = max_wavelength ** (jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions.astype(jnp.float32)[..., None] / timescale
  return jnp.sin(angles), jnp.cos(angles)


def _materialized_rotary_tables(positions: Array, *, head_dim: int,
                                max_wavelength: float) -> tuple[Array, Array]:
  """`rotary_sin_cos`, computed once per step on a CPU.

  XLA:CPU fuses the sine and cosine into every consumer, so without a boundary they are
  recomputed for every head of every layer, forward and backward (about 5x the cost of the
  rotation itself). ``optimization_barrier`` is expanded away before fusion on CPU; a
  conditional (both branches the same) is a boundary XLA keeps. Other backends compute
  the tables directly.
  """
  def tables(p: Array) -> tuple[Array, Array]:
    return rotary_sin_cos(p, head_dim=head_dim, max_wavelength=max_wavelength)
  if jax.default_backend() != "cpu":
    return tables(positions)
  return jax.lax.cond(positions[0, 0] >= 0, tables, tables, positions)


def apply_rotary(x: Array, sin: Array, cos: Array) -> Array:
  """Rotates the halves of the last axis of ``x`` by position-dependent angles.

  Args:
      x: [batch, length, ..., head_dim].
      sin: [batch, length, head_dim // 2].
      cos: [batch, length, head_dim // 2].

  Returns:
      The rotated ``x``, same shape and dtype.
  """
  extra = x.ndim - sin.ndim
  shape = sin.shape[:2] + (1,) * extra + sin.shape[2:]
  sin, cos = sin.reshape(shape), cos.reshape(shape)
  first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
  return rotated.astype(x.dtype)


def make_attention_mask(*, batch: int, length: int, segment_ids: Array | None = None,
                        causal_attention_mask: Array | None = None) -> Array:
  """Which key positions each query position may attend to.

  Args:
      batch: batch size.
      length: sequence length.
      segment_ids: optional [batch, length] packed-document ids (0 = padding); attention stays
          inside a document.
      causal_attention_mask: optional [batch, length], 1 on prefix (input) positions; attention
          among prefix positions is bidirectional (prefix LM).

  Returns:
      [batch, 1, length, length] bool, True where query i may attend to key j.
  """
  idx = jnp.arange(length)
  mask = jnp.broadcast_to(idx[:, None] >= idx[None, :], (batch, length, length))
  if causal_attention_mask is not None:
    prefix = causal_attention_mask.astype(bool)
    mask = mask | (prefix[:, :, None] & prefix[:, None, :])
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
  return mask[:, None, :, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def masked_softmax(logits: Array, mask: Array, dtype: Any) -> Array:
  """``softmax(logits + where(mask, 0, -1e10))`` over the last axis in float32, as ``dtype``.

  The backward pass reads only the returned probabilities (``p * (g - sum(p * g))``, zero
  where masked): no float32 copy of the probabilities and no select are kept per layer,
  which is most of the memory traffic of attention on a CPU.

  The mask is applied as an additive bias of 0 or -1e10, computed at the mask's own shape and
  broadcast over the heads. A masked score becomes -1e10 in float32 for any score under 512
  in size, as with a select; unlike a select, a masked inf or NaN score still spoils its
  row, and a row with every key masked (which `make_attention_mask` never makes: the
  diagonal is always allowed) follows its scores. XLA:CPU's softmax (YNNPACK) then reads
  the scores once, where a select of the full [..., heads, keys] scores was written out
  first (palm_small's largest block: 2.7 ms instead of 3.8 ms).

  Args:
      logits: [..., keys] float32 scores.
      mask: bool, broadcastable to ``logits``; False drops a key.
      dtype: dtype of the result (the compute dtype).

  Returns:
      Probabilities shaped like ``logits``, in ``dtype``.
  """
  bias = jnp.where(mask, np.float32(0.0), np.float32(_MASK_VALUE))
  return jax.nn.softmax(logits + bias, axis=-1).astype(dtype)


def _masked_softmax_fwd(logits, mask, dtype):
  probs = masked_softmax(logits, mask, dtype)
  return probs, probs


def _masked_softmax_bwd(dtype, probs, g):
  del dtype
  p = probs.astype(jnp.float32)
  g = g.astype(jnp.float32)
  return p * (g - jnp.sum(p * g, axis=-1, keepdims=True)), None


masked_softmax.defvjp(_masked_softmax_fwd, _masked_softmax_bwd)


class Attention(nn.Module):
  """Multi-query (or multi-head) causal self-attention with rotary embeddings, no biases.

  Projections multiply flattened tokens ([batch * length, embed]) with the kernels viewed as
  matrices, and multi-query attention folds the heads into the query axis
  ([batch, length * heads, kv] against one [batch, length, kv] key), so every product,
  forward and backward, contracts one axis (see `matmul`).

  Attributes:
      config: the model configuration.
  """

  config: PaLMConfig
  blocks: int = 1
  """Query blocks (`PaLMConfig.causal_blocks`): >1 only for a causal mask (each block
  attends to the keys up to its end)."""

  @nn.compact
  def __call__(self, x: Array, mask: Array, sin: Array, cos: Array,
               cache: tuple[Array, Array] | None = None,
               write: Array | None = None) -> tuple[Array, tuple[Array, Array]]:
    """Attends: over the whole sequence, or (with ``cache``) one new position per example
    against the keys and values of the positions before it (cached decoding).

    Args:
        x: [batch, length, embed] normalised input in the compute dtype; with ``cache``,
            [batch, 1, embed] (the new position of each example).
        mask: [batch, 1, length, length] bool from `make_attention_mask`; with ``cache``,
            [batch, 1, 1, max_length]: the cached positions the new one attends to.
        sin: [batch, length, head_dim // 2] from `rotary_sin_cos` (of the new position with
            ``cache``).
        cos: same shape as ``sin``.
        cache: optional (keys, values) of every position, [batch, max_length, kv] each for
            multi-query attention, else [batch, max_length, heads, kv], in the compute dtype.
        write: with ``cache``, [batch, max_length] bool, True at the new position (where its
            key and value are written).

    Returns:
        ([batch, length, embed] in the compute dtype, (keys, values)): the keys (after the
        rotary embedding) and values of the sequence, or with ``cache`` the updated cache.
    """
    c = self.config
    dtype, param_dtype = DTYPES[c.dtype], DTYPES[c.param_dtype]
    d, h, k = c.d_model, c.num_heads, c.head_dim
    batch, length = x.shape[:2]
    tokens = x.reshape(batch * length, d)

    def project(name: str, shape: tuple[int, ...], names: tuple[str, ...],
                in_axis, out_axis, out_dtype=dtype) -> Array:
      init = nn.with_logical_partitioning(_kernel_init(in_axis, out_axis), names)
      kernel = self.param(name, init, shape, param_dtype)
      out = matmul(tokens, kernel.reshape(d, -1), False, dtype, out_dtype)
      return out.reshape((batch, length) + shape[1:])

    heads_names = ("embed", "heads", "kv")
    # Queries and keys stay float32 until the rotary embedding has been applied (one pass).
    query = project("query", (d, h, k), heads_names, 0, (1, 2), jnp.float32)
    if c.multi_query:
      key = project("key", (d, k), ("embed", "kv"), 0, 1, jnp.float32)
      value = project("value", (d, k), ("embed", "kv"), 0, 1)
      kv_names = ("batch", "length", "kv")
    else:
      key = project("key", (d, h, k), heads_names, 0, (1, 2), jnp.float32)
      value = project("value", (d, h, k), heads_names, 0, (1, 2))
      kv_names = ("batch", "length", "heads", "kv")
    query = nn.with_logical_constraint(query, ("batch", "length", "heads", "kv"))
    key = nn.with_logical_constraint(key, kv_names)
    value = nn.with_logical_constraint(value, kv_names)

    query = (apply_rotary(query, sin, cos) * np.float32(k ** -0.5)).astype(dtype)
    key = apply_rotary(key, sin, cos).astype(dtype)

    if cache is not None:
      key, value = _cache_write(cache, key, value, write)
      context = _attend_cached(query, key, value, mask, multi_query=c.multi_query,
                               dtype=dtype)
    else:
      context = self._attend(query, key, value, mask)
    context = nn.with_logical_constraint(context.reshape(batch, length, h, k),
                                         ("batch", "length", "heads", "kv"))

    out_kernel = self.param(
        "out", nn.with_logical_partitioning(_kernel_init((0, 1), 2), ("heads", "kv", "embed")),
        (h, k, d), param_dtype)
    out = matmul(context.reshape(batch * length, h * k), out_kernel.reshape(h * k, d), False,
                 dtype, dtype)
    return nn.with_logical_constraint(out.reshape(batch, length, d),
                                      ("batch", "length", "embed")), (key, value)

  def _attend(self, query: Array, key: Array, value: Array, mask: Array) -> Array:
    """Attention of every position, by blocks of queries: [batch, length, heads, kv]."""
    c = self.config
    dtype = DTYPES[c.dtype]
    h, k = c.num_heads, c.head_dim
    batch, length = query.shape[:2]
    if length % self.blocks:
      raise ValueError(f"Attention.blocks={self.blocks} must divide the length {length}.")
    step = length // self.blocks

    def by_head(t: Array) -> Array:  # multi-head: heads become a batch axis
      return jnp.swapaxes(t, 1, 2).reshape(batch * h, t.shape[1], k)

    parts = []
    for i in range(self.blocks):  # query block i against keys [0, end): causal, by blocks
      start, end = i * step, (i + 1) * step
      q_i = query[:, start:end]
      if c.multi_query:
        # [batch, step * heads, kv] x [batch, end, kv]: one batched matmul per example.
        logits = matmul(q_i.reshape(batch, step * h, k), key[:, :end], True, dtype,
                        jnp.float32)
        probs = masked_softmax(logits.reshape(batch, step, h, end),
                               mask[:, 0, start:end, None, :end], dtype)
        part = matmul(probs.reshape(batch, step * h, end), value[:, :end], False, dtype,
                      dtype).reshape(batch, step, h, k)
      else:  # [batch * heads, step, kv] x [batch * heads, end, kv]
        logits = matmul(by_head(q_i), by_head(key[:, :end]), True, dtype, jnp.float32)
        probs = masked_softmax(logits.reshape(batch, h, step, end),
                               mask[:, :, start:end, :end], dtype)
        part = matmul(probs.reshape(batch * h, step, end), by_head(value[:, :end]), False,
                      dtype, dtype)
        part = jnp.swapaxes(part.reshape(batch, h, step, k), 1, 2)
      parts.append(part)
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)


def _cache_write(cache: tuple[Array, Array], key: Array, value: Array,
                 write: Array) -> tuple[Array, Array]:
  """The cache with each example's new key and value ([batch, 1, ...]) at its position
  (``write``: [batch, max_length] bool)."""
  def put(old: Array, new: Array) -> Array:
    where = write.reshape(write.shape + (1,) * (old.ndim - 2))
    return jnp.where(where, new.astype(old.dtype), old)
  return put(cache[0], key), put(cache[1], value)


def _attend_cached(query: Array, keys: Array, values: Array, mask: Array, *,
                   multi_query: bool, dtype: Any) -> Array:
  """One new position per example against the cache: [batch, 1, heads, kv].

  Args:
      query: [batch, 1, heads, kv] (rotated and scaled) in the compute dtype.
      keys: [batch, max_length, kv] (multi-query) or [batch, max_length, heads, kv].
      values: shaped like ``keys``.
      mask: [batch, 1, 1, max_length] bool: the positions attended to.
      multi_query: the cache's layout.
      dtype: the compute dtype.
  """
  batch, _, h, k = query.shape
  if multi_query:  # [batch, heads, kv] x [batch, max_length, kv]
    logits = matmul(query.reshape(batch, h, k), keys, True, dtype, jnp.float32)
    probs = masked_softmax(logits, mask[:, 0], dtype)
    return matmul(probs, values, False, dtype, dtype).reshape(batch, 1, h, k)
  by_head = jnp.swapaxes(query, 1, 2)  # [batch, heads, 1, kv] x [batch, heads, max_length, kv]
  logits = matmul(by_head, jnp.swapaxes(keys, 1, 2), True, dtype, jnp.float32)
  probs = masked_softmax(logits, mask, dtype)
  context = matmul(probs, jnp.swapaxes(values, 1, 2), False, dtype, dtype)
  return jnp.swapaxes(context, 1, 2)


class SwiGLU(nn.Module):
  """Feed-forward ``(swish(x W_gate) * (x W_in)) W_out`` without biases.

  Attributes:
      config: the model configuration.
  """

  config: PaLMConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Applies the feed-forward.

    Args:
        x: [batch, length, embed] in the compute dtype.

    Returns:
        [batch, length, embed] in the compute dtype.
    """
    c = self.config
    dtype, param_dtype = DTYPES[c.dtype], DTYPES[c.param_dtype]
    batch, length = x.shape[:2]
    tokens = x.reshape(batch * length, c.d_model)

    def kernel(name: str, shape: tuple[int, int], names: tuple[str, str]) -> Array:
      return self.param(name, nn.with_logical_partitioning(_kernel_init(0, 1), names),
                        shape, param_dtype)

    wi_shape, wi_names = (c.d_model, c.d_ff), ("embed", "mlp")
    gate = matmul(tokens, kernel("wi_gate", wi_shape, wi_names), False, dtype, dtype)
    lin = matmul(tokens, kernel("wi", wi_shape, wi_names), False, dtype, dtype)
    hidden = nn.with_logical_constraint(swiglu(gate, lin).reshape(batch, length, c.d_ff),
                                        ("batch", "length", "mlp"))
    out = matmul(hidden.reshape(batch * length, c.d_ff),
                 kernel("wo", (c.d_ff, c.d_model), ("mlp", "embed")), False, dtype, dtype)
    return nn.with_logical_constraint(out.reshape(batch, length, c.d_model),
                                      ("batch", "length", "embed"))


class DecoderLayer(nn.Module):
  """One PaLM block (parallel or serial formulation), shaped for ``nn.scan``.

  Attributes:
      config: the model configuration.
      deterministic: disables dropout.
      attention_blocks: query blocks of the (causal) attention; see `Attention.blocks`.
  """

  config: PaLMConfig
  deterministic: bool = True
  attention_blocks: int = 1
  return_kv: bool = False
  """Return the attention's keys and values (to fill a decoding cache)."""

  @nn.compact
  def __call__(self, x: Array, mask: Array, sin: Array, cos: Array,
               cache: tuple[Array, Array] | None = None,
               write: Array | None = None) -> tuple[Array, Any]:
    """Applies the block.

    Args:
        x: [batch, length, embed] residual stream in the compute dtype.
        mask: [batch, 1, length, length] bool attention mask.
        sin: rotary table, [batch, length, head_dim // 2].
        cos: rotary table, [batch, length, head_dim // 2].
        cache, write: cached decoding of one position (see `Attention`).

    Returns:
        (new residual stream, per-layer output): the scan carry, and the attention's
        (keys, values) with ``cache`` or ``return_kv``, else None.
    """
    c = self.config
    dtype, param_dtype = DTYPES[c.dtype], DTYPES[c.param_dtype]
    dropout = nn.Dropout(rate=c.dropout_rate, deterministic=self.deterministic)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    attention = Attention(config=c, blocks=self.attention_blocks, name="attention")
    if c.parallel_block:
      normed = LayerNorm(dtype=dtype, param_dtype=param_dtype, name="pre_norm")(x)
      attn, kv = attention(normed, mask, sin, cos, cache, write)
      mlp = SwiGLU(config=c, name="mlp")(normed)
      y = x + dropout(attn) + dropout(mlp)
    else:
      normed = LayerNorm(dtype=dtype, param_dtype=param_dtype, name="pre_attention_norm")(x)
      attn, kv = attention(normed, mask, sin, cos, cache, write)
      x = x + dropout(attn)
      normed = LayerNorm(dtype=dtype, param_dtype=param_dtype, name="pre_mlp_norm")(x)
      y = x + dropout(SwiGLU(config=c, name="mlp")(normed))
    y = nn.with_logical_constraint(y, ("batch", "length", "embed"))
    return y, (kv if self.return_kv or cache is not None else None)


class PaLMDecoder(nn.Module):
  """PaLM decoder-only language model.

  Parameters (logical axes): ``embedding`` (vocab, embed); ``layers/...`` stacked along a leading
  ``layers`` axis: ``attention/query`` (embed, heads, kv), ``attention/key|value`` (embed, kv)
  for multi-query else (embed, heads, kv), ``attention/out`` (heads, kv, embed),
  ``mlp/wi_gate|wi`` (embed, mlp), ``mlp/wo`` (mlp, embed), norm ``scale`` (embed,);
  ``final_norm/scale``; ``logits_kernel`` (embed, vocab) only without shared embeddings.

  Attributes:
      config: the model configuration.
  """

  config: PaLMConfig

  @nn.compact
  def __call__(self, tokens: Array, *, segment_ids: Array | None = None,
               positions: Array | None = None, causal_attention_mask: Array | None = None,
               deterministic: bool = True, return_hidden: bool = False,
               return_cache: bool = False, cache: tuple[Array, Array] | None = None,
               cache_index: Array | None = None) -> Any:
    """Computes next-token logits (or the hidden states they are projected from).

    Cached decoding (as t5x's decoders do) takes two kinds of call. ``return_cache=True``
    (the prefill) also returns every layer's keys and values of the sequence: (keys,
    values), each [layers, batch, length, kv] (multi-query) or [layers, batch, length,
    heads, kv], in the compute dtype. A call with that ``cache`` and ``cache_index``
    ([batch] int) runs one new token per example (``tokens`` [batch, 1]) at that position:
    it attends to the cached positions up to and including its own, writes its key and
    value there, and returns (logits, updated cache). The logits are those the whole
    sequence would give at that position, without recomputing it (one position per layer
    instead of the whole length, and keys and values read once).

    Args:
        tokens: [batch, length] int token ids (decoder input tokens), each < vocab_size
            (an out-of-range id yields NaN logits rather than an error under jit).
        segment_ids: optional [batch, length] ids of packed documents (0 = padding);
            attention is confined to the query's own document.
        positions: optional [batch, length] positions for the rotary embedding; for packed
            blocks pass the per-document positions (seqio's ``decoder_positions``).
            Default: 0..length-1 in every row.
        causal_attention_mask: optional [batch, length], 1 on prefix positions (seqio's
            ``decoder_causal_attention``); attention is bidirectional among them (prefix LM).
        deterministic: if False, applies dropout (needs the "dropout" rng).
        return_hidden: return the final hidden states instead of the logits: the loss then
            projects them itself (`losses.projected_cross_entropy_loss`, with `embedding`
            or `logits_kernel` and `logits_scale`).

        return_cache: also return the keys and values (prefill of cached decoding).
        cache: the (keys, values) of a prefill, to decode one position with.
        cache_index: with ``cache``, [batch] int position of each example's token.

    Returns:
        [batch, length, vocab_size] float32 logits; with ``return_hidden``, [batch, length,
        d_model] hidden states (after the final norm) in the compute dtype. With
        ``return_cache`` or ``cache``: (that, cache).
    """
    c = self.config
    dtype, param_dtype = DTYPES[c.dtype], DTYPES[c.param_dtype]
    batch, length = tokens.shape
    write = None
    if cache is not None:
      if cache_index is None or length != 1 or segment_ids is not None \
          or causal_attention_mask is not None:
        raise ValueError("decoding with a cache takes one token per example and its "
                         "cache_index, without segment_ids or causal_attention_mask")
      max_length = cache[0].shape[2]
      slots = jnp.arange(max_length)[None, :]
      write = slots == cache_index[:, None]
      mask = (slots <= cache_index[:, None])[:, None, None, :]
      positions = cache_index[:, None].astype(jnp.int32)
    else:
      if positions is None:
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
      mask = make_attention_mask(batch=batch, length=length, segment_ids=segment_ids,
                                 causal_attention_mask=causal_attention_mask)
    sin, cos = _materialized_rotary_tables(positions, head_dim=c.head_dim,
                                           max_wavelength=c.rope_max_wavelength)

    # PaLM: no layer norm on the embeddings, so they are initialised N(0, 1).
    embedding = self.param(
        "embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                  ("vocab", "embed")),
        (c.vocab_size, c.d_model), param_dtype)
    x = jnp.take(embedding, tokens, axis=0).astype(dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    layer_cls = DecoderLayer
    if c.remat and cache is None and not return_cache:
      layer_cls = nn.remat(layer_cls, prevent_cse=False)
    bcast = nn.broadcast
    stack = nn.scan(
        layer_cls,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        # The cache is scanned over (each layer gets its own keys and values).
        in_axes=(bcast, bcast, bcast) if cache is None else (bcast, bcast, bcast, 0, bcast),
        length=c.num_layers,
        unroll=c.layers_per_loop_iteration,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    blocks = c.causal_blocks(length) if causal_attention_mask is None else 1
    layers = stack(config=c, deterministic=deterministic, attention_blocks=blocks,
                   return_kv=return_cache, name="layers")
    args = (x, mask, sin, cos) if cache is None else (x, mask, sin, cos, cache, write)
    x, new_cache = layers(*args)

    def out(value: Array) -> Any:
      return (value, new_cache) if cache is not None or return_cache else value

    x = LayerNorm(dtype=dtype, param_dtype=param_dtype, name="final_norm")(x)
    if not c.shared_embedding:
      init = nn.with_logical_partitioning(_kernel_init(0, 1), ("embed", "vocab"))
      kernel = self.param("logits_kernel", init, (c.d_model, c.vocab_size), param_dtype)
    if return_hidden:
      return out(x)
    tokens_out = x.reshape(batch * length, c.d_model)
    if c.shared_embedding:
      logits = matmul(tokens_out, embedding, True, dtype, jnp.float32) * logits_scale(c)
    else:
      logits = matmul(tokens_out, kernel, False, dtype, jnp.float32)
    logits = logits.reshape(batch, length, c.vocab_size)
    return out(nn.with_logical_constraint(logits, ("batch", "length", "vocab")))

"""Optimizers and schedules against hand computations; gradient accumulation over microbatches.

Hand computations use numpy in float64 and the formulas of the PaLM paper (section 5) and of
t5x's factor-style schedules; the optax-based implementations must match them to float32
precision.
"""

import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from palmflow.trainer import lm, models, optimizers, train_lib


def _sched(**kw):
  s = optimizers.create_learning_rate_scheduler(**kw)
  return lambda step: float(s(step))


# ---------------------------------------------------------------- schedules


def test_constant_linear_warmup_rsqrt_decay():
  s = _sched(factors="constant * linear_warmup * rsqrt_decay", base_learning_rate=2.0,
             warmup_steps=100)
  # 2 * min(1, step / 100) / sqrt(max(step, 100))
  for step, want in [(0, 0.0), (25, 2 * 0.25 / 10), (100, 0.2), (400, 0.1), (10000, 0.02)]:
    assert s(step) == pytest.approx(want, rel=1e-6), step


def test_cosine_and_linear_decay_after_warmup_and_floor():
  cos = _sched(factors="constant * linear_warmup * cosine_decay", base_learning_rate=2.0,
               warmup_steps=10, decay_steps=100)
  # warmup, then 2 * 0.5 * (1 + cos(pi * (step - 10) / 100)), 0 after the decay
  for step, want in [(5, 1.0), (10, 2.0), (35, 1.0 + math.cos(math.pi / 4)), (60, 1.0),
                     (110, 0.0), (500, 0.0)]:
    assert cos(step) == pytest.approx(want, abs=1e-6), step
  lin = _sched(factors="constant * linear_decay", base_learning_rate=2.0, warmup_steps=10,
               decay_steps=100, min_learning_rate=0.1)
  for step, want in [(0, 2.0), (10, 2.0), (35, 1.5), (100, 0.2), (110, 0.1), (300, 0.1)]:
    assert lin(step) == pytest.approx(want, rel=1e-6), step
  rsqrt_norm = _sched(factors="constant * rsqrt_normalized_decay", base_learning_rate=1.0,
                      warmup_steps=100)
  assert rsqrt_norm(50) == pytest.approx(1.0) and rsqrt_norm(400) == pytest.approx(0.5)


def test_t5x_schedule_arguments_decay_every_cyclic_cosine_and_step_offset():
  every = _sched(factors="constant * decay_every", base_learning_rate=1.0, decay_factor=0.5,
                 steps_per_decay=10)
  assert [every(s) for s in (0, 9, 10, 25)] == pytest.approx([1.0, 1.0, 0.5, 0.25])
  cyclic = _sched(factors="constant * cosine_decay", base_learning_rate=2.0, warmup_steps=0,
                  steps_per_cycle=100)
  # restarts every 100 steps (t5x's), where decay_steps' cosine stays at 0
  for step, want in [(0, 2.0), (50, 1.0), (99, 1.0 + math.cos(math.pi * 0.99)), (100, 2.0),
                     (150, 1.0)]:
    assert cyclic(step) == pytest.approx(want, abs=1e-5), step
  offset = _sched(factors="constant * linear_warmup", base_learning_rate=1.0,
                  warmup_steps=10, step_offset=100)
  assert [offset(s) for s in (50, 100, 105, 110)] == pytest.approx([0.0, 0.0, 0.5, 1.0])


def test_unknown_factor_is_named():
  with pytest.raises(ValueError, match="'cosine'.*known: constant"):
    optimizers.create_learning_rate_scheduler(factors="constant * cosine")


# ---------------------------------------------------------------- Adafactor


def _rms(x):
  return np.sqrt(np.mean(np.square(x)))


def _adafactor_reference(params, grads_seq, lrs, *, factored_keys=(), clip_norm=1.0,
                         decay_exponent=0.8, eps=1e-30, wd_exponent=2.0):
  """PaLM's Adafactor in numpy (float64): global-norm clip, β2 = 1 - k^-0.8, factored second
  moments for `factored_keys`, update clipping at RMS 1, parameter scaling, decay lr**2.
  Returns (parameters, how many updates the RMS clipping shrank)."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  clipped = 0
  v = {k: None for k in p}
  for k_step, (grads, lr) in enumerate(zip(grads_seq, lrs), start=1):
    g = {k: np.asarray(x, np.float64) for k, x in grads.items()}
    norm = math.sqrt(sum(np.sum(x ** 2) for x in g.values()))
    if clip_norm is not None and norm > clip_norm:
      g = {k: x * clip_norm / norm for k, x in g.items()}
    beta2 = 1.0 - k_step ** -decay_exponent
    new_p = {}
    for k, gk in g.items():
      g2 = gk ** 2 + eps
      if k in factored_keys:  # rows: mean over the last (larger) axis; columns: over the first
        r, c = g2.mean(axis=1), g2.mean(axis=0)
        if v[k] is not None:
          r, c = beta2 * v[k][0] + (1 - beta2) * r, beta2 * v[k][1] + (1 - beta2) * c
        v[k] = (r, c)
        vhat = np.outer(r, c) / r.mean()
      else:
        v[k] = g2 if v[k] is None else beta2 * v[k] + (1 - beta2) * g2
        vhat = v[k]
      u = gk / np.sqrt(vhat)
      clipped += _rms(u) > 1.0
      u = u / max(1.0, _rms(u) / 1.0)
      new_p[k] = p[k] - lr * max(_rms(p[k]), 1e-3) * u - lr ** wd_exponent * p[k]
    p = new_p
  return p, clipped


def _run_with_state(tx, params, grads_seq):
  """(parameters, optimizer state) after applying `tx` to each gradient in turn (jitted:
  one compilation)."""
  @jax.jit
  def run(params, grads_seq):
    state = tx.init(params)
    for g in grads_seq:
      updates, state = tx.update(g, state, params)
      params = optax.apply_updates(params, updates)
    return params, state
  return run(params, grads_seq)


def _run(tx, params, grads_seq):
  """Parameters after applying `tx` to each gradient in turn."""
  return _run_with_state(tx, params, grads_seq)[0]


def _grads(shapes, n, seed=0, scale=3.0):
  rng = np.random.default_rng(seed)
  return [{k: jnp.asarray(rng.normal(size=s) * scale, jnp.float32) for k, s in shapes.items()}
          for _ in range(n)]


def test_adafactor_first_step_is_sign_times_param_rms_plus_lr_squared_decay():
  # k = 1: β2 = 0, so V = G² and U = sign(G) (RMS 1, unclipped); the step is
  # -lr * RMS(W) * sign(G) - lr² * W, whatever the global-norm clipping did to |G|.
  params = {"w": jnp.asarray([[0.5, -1.0, 2.0], [1.0, 0.25, -0.5]], jnp.float32),
            "b": jnp.asarray([3.0, -4.0], jnp.float32)}
  grads = {"w": jnp.asarray([[1.0, -2.0, 0.5], [-3.0, 4.0, 1.0]]), "b": jnp.asarray([7., -1.])}
  lr = 0.1
  out = _run(optimizers.adafactor(learning_rate=lr), params, [grads])
  for k in params:
    p = np.asarray(params[k], np.float64)
    want = p - lr * _rms(p) * np.sign(np.asarray(grads[k])) - lr ** 2 * p
    np.testing.assert_allclose(out[k], want, rtol=1e-6)


@pytest.mark.parametrize("factored", [False, True])
def test_adafactor_three_steps_match_the_palm_formulas(factored):
  shapes = {"w": (4, 6), "v": (5,), "tiny": (3,)}
  rng = np.random.default_rng(1)
  params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
  params["tiny"] = jnp.asarray([1e-5, -2e-5, 0.0], jnp.float32)  # parameter scale floor 1e-3
  grads_seq = _grads(shapes, 3)  # global norm ~ 3 * sqrt(32) > 1: clipped
  schedule = lambda step: 0.01 * (step + 1.0)  # lr(k - 1) at step k: decay uses it squared
  tx = optimizers.adafactor(learning_rate=schedule, factored=factored, min_dim_size_to_factor=4)
  out = _run(tx, params, grads_seq)
  want, clipped = _adafactor_reference(params, grads_seq, [0.01, 0.02, 0.03],
                                       factored_keys=("w",) if factored else ())
  assert clipped >= 1  # update clipping took part
  for k in params:
    np.testing.assert_allclose(out[k], want[k], rtol=2e-5, atol=1e-9, err_msg=k)


def test_adafactor_factors_only_large_matrices_and_optional_settings():
  params = {"big": jnp.zeros((128, 256)), "small": jnp.zeros((64, 256)), "vec": jnp.zeros(300)}
  inner = optimizers.adafactor(learning_rate=0.1).init(params)[1][0]  # after the clip
  assert inner.v_row["big"].shape == (128,) and inner.v_col["big"].shape == (256,)
  assert inner.v["small"].shape == (64, 256) and inner.v["vec"].shape == (300,)
  unfactored = optimizers.adafactor(learning_rate=0.1, factored=False).init(params)[1][0]
  assert unfactored.v["big"].shape == (128, 256)
  # No weight decay, no global clip, no update clip, no parameter scaling: plain sign step.
  bare = optimizers.adafactor(learning_rate=0.5, weight_decay_exponent=None,
                              global_norm_clip=None, clipping_threshold=None,
                              multiply_by_parameter_scale=False)
  p = {"x": jnp.asarray([1.0, 2.0])}
  out = _run(bare, p, [{"x": jnp.asarray([-3.0, 0.1])}])
  np.testing.assert_allclose(out["x"], [1.5, 1.5], rtol=1e-6)


_ADAFACTOR_SETTINGS = {
    "t5x_defaults": {},
    "palm": {"factored": False, "momentum": 0.9},  # gin/models/palm_base.gin's
    "unfactored": {"factored": False},
    "momentum": {"momentum": 0.9},
    "momentum_no_update_clip_no_scaling": {"momentum": 0.9, "clipping_threshold": None,
                                           "multiply_by_parameter_scale": False},
    "no_clips_no_scaling_no_decay": {"clipping_threshold": None, "global_norm_clip": None,
                                     "multiply_by_parameter_scale": False,
                                     "weight_decay_exponent": None},
    "small_global_clip": {"global_norm_clip": 0.01, "clipping_threshold": 0.5},
    "constant_lr": {"learning_rate": 0.03},
    "under_the_global_clip": {"global_norm_clip": 1e6},
}


@pytest.mark.parametrize("name", sorted(_ADAFACTOR_SETTINGS))
def test_adafactor_update_equals_the_optax_chain(name):
  # The fused update against the chain of optax transformations it replaces, over four
  # steps, on the shapes the model has: stacked matrices factored over their last two axes
  # (the larger first or last), an embedding-like matrix whose larger axis is the major one,
  # a stacked 4-D kernel with a short axis (unfactored), vectors and a scalar.
  shapes = {"mlp": (3, 130, 260), "wo": (3, 260, 130), "emb": (300, 130), "q": (3, 130, 2, 16),
            "norm": (3, 130), "final": (130,), "s": ()}
  settings = {"learning_rate": lambda step: 0.05 / (1.0 + step), **_ADAFACTOR_SETTINGS[name]}
  rng = np.random.default_rng(7)
  params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
  grads_seq = _grads(shapes, 4, seed=3, scale=0.2)
  grads_seq[2] = jax.tree.map(lambda g: g * 50.0, grads_seq[2])  # some updates RMS-clipped

  got = _run_with_state(optimizers.adafactor(**settings), params, grads_seq)
  want = _run_with_state(optimizers.adafactor_chain(**settings), params, grads_seq)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  got_leaves = jax.tree_util.tree_flatten_with_path(got)[0]
  for (path, got_leaf), want_leaf in zip(got_leaves, jax.tree.leaves(want)):
    assert got_leaf.dtype == want_leaf.dtype, jax.tree_util.keystr(path)
    np.testing.assert_allclose(got_leaf, want_leaf, rtol=2e-5, atol=1e-7,
                               err_msg=jax.tree_util.keystr(path))
  moved = max(float(jnp.max(jnp.abs(got[0][k] - params[k]))) for k in params)
  assert moved > 1e-3  # the steps did change the parameters


@pytest.mark.parametrize("magnitude", [1e17, 1e30])
def test_adafactor_huge_finite_gradients_give_a_clipped_step_not_nan(magnitude):
  # The global-norm clip scales G by s ~ 1/|G|: s² underflows float32 where s G does not.
  params = {"w": jnp.ones((128, 128)), "b": jnp.ones((128,))}
  grads = {"w": jnp.full((128, 128), magnitude), "b": jnp.full((128,), -magnitude)}
  for tx in (optimizers.adafactor(learning_rate=0.01),
             optimizers.adafactor_chain(learning_rate=0.01)):
    updates, _ = tx.update(grads, tx.init(params), params)
    for k, u in updates.items():
      assert np.all(np.isfinite(np.asarray(u))), (tx, k)
  fused = optimizers.adafactor(learning_rate=0.01).update(
      grads, optimizers.adafactor(learning_rate=0.01).init(params), params)[0]
  chain = optimizers.adafactor_chain(learning_rate=0.01).update(
      grads, optimizers.adafactor_chain(learning_rate=0.01).init(params), params)[0]
  for k in params:
    np.testing.assert_allclose(fused[k], chain[k], rtol=1e-5, atol=1e-9, err_msg=k)


def test_adafactor_bfloat16_parameters_update_like_the_chain():
  params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(130, 140)), jnp.bfloat16)}
  grads = {"w": params["w"] * 0.5}
  schedule = optimizers.create_learning_rate_scheduler(base_learning_rate=0.05,
                                                       warmup_steps=1)
  fused_tx = optimizers.adafactor(learning_rate=schedule)
  chain_tx = optimizers.adafactor_chain(learning_rate=schedule)
  fused = fused_tx.update(grads, fused_tx.init(params), params)[0]["w"]
  chain = chain_tx.update(grads, chain_tx.init(params), params)[0]["w"]
  assert fused.dtype == chain.dtype
  np.testing.assert_allclose(np.asarray(fused, np.float32), np.asarray(chain, np.float32),
                             rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_adafactor_on_stacked_layers_steps_each_layer_as_its_own_matrix(seed):
  # The model stacks its layers' matrices along a leading axis (under "layers"). PaLM keeps
  # them apart: the chain run on the layers taken apart is the reference for the stacked
  # update, over four steps, with layers of very different scales (their parameter scales,
  # their update clipping, their factored moments differ).
  layer_shapes = {"mlp": (130, 260), "wo": (260, 130), "q": (130, 2, 16), "norm": (130,),
                  "gain": ()}
  rng = np.random.default_rng(seed)
  n = 3
  scales = np.array([0.01, 1.0, 30.0])
  stacked = {"layers": {k: jnp.asarray(rng.normal(size=(n,) + s)
                                       * scales.reshape((n,) + (1,) * len(s)), jnp.float32)
                        for k, s in layer_shapes.items()},
             "emb": jnp.asarray(rng.normal(size=(300, 130)), jnp.float32)}
  grads_seq = []
  for i in range(4):
    g = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), stacked)
    # One layer's gradients 100x the others' on one step: its update is RMS-clipped.
    g["layers"] = jax.tree.map(lambda x: x.at[i % n].multiply(100.0), g["layers"])
    grads_seq.append(g)

  def apart(tree):
    out = {"emb": tree["emb"]}
    for k, x in tree["layers"].items():
      for i in range(n):
        out[f"{k}_{i}"] = x[i]
    return out

  settings = {"learning_rate": lambda step: 0.05 / (1.0 + step)}
  got, got_state = _run_with_state(optimizers.adafactor(**settings), stacked, grads_seq)
  want, want_state = _run_with_state(optimizers.adafactor_chain(**settings), apart(stacked),
                                     [apart(g) for g in grads_seq])
  for k, x in apart(got).items():  # float32 rounding: relative to the layer's scale
    np.testing.assert_allclose(x, want[k], rtol=2e-5, atol=1e-7 * float(jnp.max(jnp.abs(x))),
                               err_msg=k)
  moments, want_moments = got_state[1][0], want_state[1][0]
  for field in ("v_row", "v_col", "v"):
    for k in layer_shapes:
      per_layer = np.stack([getattr(want_moments, field)[f"{k}_{i}"] for i in range(n)])
      if per_layer.shape[1:] == (1,):  # a placeholder: the moment is held the other way
        assert getattr(moments, field)["layers"][k].shape == (1,)
        continue
      np.testing.assert_allclose(getattr(moments, field)["layers"][k], per_layer,
                                 rtol=2e-5, atol=1e-30, err_msg=f"{field} {k}")
  assert moments.v_row["layers"]["mlp"].shape == (n, 130)  # factored within each layer
  # Statistics over the whole stack (stacked_layers_key=None) take a different step.
  whole = _run(optimizers.adafactor(stacked_layers_key=None, **settings), stacked, grads_seq)
  assert not np.allclose(whole["layers"]["mlp"], got["layers"]["mlp"], rtol=1e-3)


def test_adafactor_factors_by_logical_axes_as_t5x_rules_say():
  # With the parameters' logical axes, a stacked query kernel (layers, embed, heads, kv)
  # is factored per layer into embed (rows) and heads x kv (columns), whatever their sizes:
  # the same step as the chain on each layer's [embed, heads * kv] matrix (factored there
  # because both axes reach min_dim_size_to_factor, heads * kv the larger). A small
  # multi-query key (layers, embed, kv) is factored too; a norm's scale (layers, embed)
  # has no column axis and keeps a full moment; the embedding (vocab, embed) follows the
  # size heuristic, as in t5x.
  n, e, h, k, vocab = 3, 24, 4, 8, 40
  rng = np.random.default_rng(0)
  scales = np.array([0.01, 1.0, 30.0])
  shapes = {"query": (e, h, k), "key": (e, k), "scale": (e,)}
  names = {"layers": {"query": ("layers", "embed", "heads", "kv"),
                      "key": ("layers", "embed", "kv"), "scale": ("layers", "embed")},
           "embedding": ("vocab", "embed")}
  params = {"layers": {name: jnp.asarray(rng.normal(size=(n,) + shape)
                                         * scales.reshape((n,) + (1,) * len(shape)),
                                         jnp.float32) for name, shape in shapes.items()},
            "embedding": jnp.asarray(rng.normal(size=(vocab, e)), jnp.float32)}
  grads_seq = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32),
                            params) for _ in range(3)]
  settings = {"learning_rate": lambda step: 0.05 / (1.0 + step), "min_dim_size_to_factor": 8}
  tx = optimizers.with_param_axes(optimizers.adafactor(**settings), names)
  got, state = _run_with_state(tx, params, grads_seq)
  moments = state[1][0]
  assert moments.v_row["layers"]["query"].shape == (n, e)
  assert moments.v_col["layers"]["query"].shape == (n, h, k)
  assert moments.v_col["layers"]["key"].shape == (n, k)
  assert moments.v["layers"]["scale"].shape == (n, e)
  # The heuristic: v_row over the second largest axis, the mean over the largest.
  assert moments.v_row["embedding"].shape == (e,)

  def apart(tree):
    out = {"embedding": tree["embedding"]}
    for name, x in tree["layers"].items():
      for i in range(n):
        out[f"{name}_{i}"] = x[i].reshape(e, -1) if name == "query" else x[i]
    return out

  want = _run(optimizers.adafactor_chain(**settings), apart(params),
              [apart(g) for g in grads_seq])
  for key, x in apart(got).items():
    np.testing.assert_allclose(x, want[key], rtol=2e-5,
                               atol=1e-7 * float(jnp.max(jnp.abs(x))), err_msg=key)
  # Without the axis names, the heuristic per layer factors the query's two largest axes
  # (24 and 8) instead: a different step.
  heuristic = _run(optimizers.adafactor(**settings), params, grads_seq)
  assert not np.allclose(heuristic["layers"]["query"], got["layers"]["query"], rtol=1e-4)


def test_adafactor_factor_rules_name_what_is_wrong():
  params = {"w": jnp.ones((4, 3, 2))}
  tx = optimizers.with_param_axes(optimizers.adafactor(learning_rate=0.1),
                                  {"w": ("layers", "experts", "mlp")})
  with pytest.raises(ValueError, match=r"\['w'\] axis 1 has logical name 'experts'"):
    tx.init(params)
  with pytest.raises(ValueError, match="'embed'.*'rows'.*row, column, batch, none"):
    optimizers.adafactor(learning_rate=0.1, logical_factor_rules={"embed": "rows"})
  # A rule for the new name makes it work; AdamW takes no axes and is returned as it is.
  rules = dict(optimizers.T5X_FACTOR_RULES, experts="batch")
  tx = optimizers.with_param_axes(
      optimizers.adafactor(learning_rate=0.1, logical_factor_rules=rules),
      {"w": ("layers", "experts", "mlp")})
  assert tx.init(params)[1][0].v["w"].shape == (4, 3, 2)  # batch, batch, column: full
  adamw = optimizers.adamw(learning_rate=0.1)
  assert optimizers.with_param_axes(adamw, {"w": ("mlp",)}) is adamw


@pytest.mark.parametrize("stacked", [False, True, "with axes"])
def test_adafactor_update_writes_out_only_the_new_parameters_and_moments(stacked):
  # Memory passes, checked in the compiled update of one factored and one unfactored
  # parameter (as ``train`` compiles it): the only arrays of a factored parameter's size
  # that the step writes are the new parameters (a G², an outer product of the factors, a
  # broadcast or the update written out in full would be another); an unfactored one's
  # step writes its new second moment and its update too. Stacked layers (per-layer
  # statistics) or not.
  # With logical axes (as `train` gives them) the 4-D kernel is factored too.
  params = {"w": jnp.ones((4, 256, 512)), "q": jnp.ones((4, 256, 8, 16))}
  axes = None
  if stacked:
    params = {"layers": params}
  if stacked == "with axes":
    axes = {"layers": {"w": ("layers", "embed", "mlp"),
                       "q": ("layers", "embed", "heads", "kv")}}
  grads = jax.tree.map(lambda p: p * 0.5, params)
  for global_norm_clip in (1.0, None):  # with and without a clipping factor s
    tx = optimizers.adafactor(learning_rate=0.1, global_norm_clip=global_norm_clip,
                              param_axes=axes)

    def step(params, state, grads, tx=tx):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    state = tx.init(params)
    hlo = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile().as_text()
    for name, want in (("f32[4,256,512]", 1), ("f32[4,256,8,16]", 1 if axes else 3)):
      written = [line for line in hlo.splitlines() if re.match(
          rf"\s*(ROOT )?%\S+ = {re.escape(name)}\{{[^}}]*\}} fusion\(", line)]
      assert len(written) == want, (global_norm_clip, name, written)


# ---------------------------------------------------------------- AdamW and clipping


def test_adamw_two_steps_match_hand_computation():
  p0 = np.array([1.0, -2.0, 0.5])
  g1, g2 = np.array([0.1, -0.2, 0.0]), np.array([0.3, 0.1, -0.4])  # norms < 1: not clipped
  lr, b1, b2, eps, wd = 0.1, 0.9, 0.99, 1e-8, 0.01
  tx = optimizers.adamw(learning_rate=lr, b1=b1, b2=b2, eps=eps, weight_decay=wd)
  out = _run(tx, {"p": jnp.asarray(p0, jnp.float32)},
             [{"p": jnp.asarray(g1, jnp.float32)}, {"p": jnp.asarray(g2, jnp.float32)}])
  p, m, v = p0.copy(), 0.0, 0.0
  for t, g in enumerate([g1, g2], start=1):
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g ** 2
    mhat, vhat = m / (1 - b1 ** t), v / (1 - b2 ** t)
    p = p - lr * (mhat / (np.sqrt(vhat) + eps) + wd * p)
  np.testing.assert_allclose(out["p"], p, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scale,clipped", [(0.1, False), (10.0, True)])
def test_global_norm_clipping_rescales_all_gradients_together(scale, clipped):
  grads = {"a": jnp.asarray([3.0, 0.0]) * scale, "b": jnp.asarray([[4.0]]) * scale}  # norm 5s
  params = jax.tree.map(jnp.zeros_like, grads)
  for tx in (optimizers.adamw(learning_rate=0.1, global_norm_clip=1.0),
             optimizers.adafactor(learning_rate=0.1, global_norm_clip=1.0)):
    state = tx.update(grads, tx.init(params), params)[1]
    factor = 1.0 / (5 * scale) if clipped else 1.0
    if isinstance(state[1][0], optax.ScaleByAdamState):  # mu = (1 - b1) * clipped g
      seen = state[1][0].mu
      jax.tree.map(lambda s, g: np.testing.assert_allclose(s, 0.1 * g * factor, rtol=1e-6),
                   seen, grads)
    else:  # Adafactor's first second moment is the clipped g² (+1e-30)
      seen = state[1][0].v
      jax.tree.map(lambda s, g: np.testing.assert_allclose(s, (g * factor) ** 2, rtol=1e-5,
                                                           atol=1e-20),
                   seen, grads)


# ---------------------------------------------------------------- microbatches

MB_CONFIG = models.PaLMConfig(vocab_size=64, num_layers=1, d_model=32, num_heads=4, head_dim=8,
                              d_ff=64)


def _padded_batch():
  """8 rows of 16 positions; row i has 16 - 2 * i real target tokens, so the 4 microbatches
  of 2 rows hold 30, 22, 14 and 6 real tokens."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(2, 64, size=(8, 17)).astype(np.int32)
  lengths = 16 - 2 * np.arange(8)
  weights = (np.arange(16)[None] < lengths[:, None]).astype(np.float32)
  targets = np.where(weights > 0, tokens[:, 1:], 0).astype(np.int32)
  inputs = np.where(weights > 0, tokens[:, :-1], 0).astype(np.int32)
  return {"decoder_input_tokens": inputs, "decoder_target_tokens": targets,
          "decoder_loss_weights": weights}


@pytest.mark.parametrize("normalizer", ["NUM_REAL_TARGET_TOKENS", 50.0, None])
def test_microbatches_give_the_large_batch_update(normalizer):
  # Per real target token (the microbatches' token counts differ); 50.0: a fixed divisor,
  # which must not be summed over microbatches; None: the summed loss (t5x's None).
  # (AVERAGE_PER_SEQUENCE adds up like the per-token one: each microbatch contributes its
  # sum of per-sequence means and its sequence count.)
  # SGD with lr 1: the update is minus the gradient, so parameters compare gradients exactly
  # (Adafactor's first step is sign(G), which would hide differences).
  model = lm.DecoderOnlyModel(config=MB_CONFIG, optimizer=optax.sgd(1.0),
                              loss_normalizing_factor=normalizer)
  init = jax.jit(functools.partial(model.init, batch_size=1, length=16))
  params = nn.unbox(init(jax.random.PRNGKey(0)))["params"]
  batch = _padded_batch()
  steps = {n: train_lib.make_train_step(model, model.optimizer, num_microbatches=n,
                                        dropout_seed=0, learning_rate_fn=None) for n in (1, 4)}

  @jax.jit  # one compilation for the three computations
  def run(params, batch):
    state = model.optimizer.init(params)
    loss, grad = jax.value_and_grad(lambda p: model.loss_fn(p, batch)[0])(params)
    return steps[1](params, state, batch, 0), steps[4](params, state, batch, 0), loss, grad

  (p1, _, m1), (p4, _, m4), loss, grad = run(params, batch)
  # The summed loss's gradient is 72 tokens' worth: its float rounding is 72x larger too.
  tol = dict(rtol=2e-5, atol=2e-7) if normalizer is not None else dict(rtol=1e-4, atol=2e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **tol), p1, p4)
  for k in ("loss", "cross_ent_loss", "accuracy", "grad_norm", "target_tokens"):
    np.testing.assert_allclose(m1[k], m4[k], rtol=2e-5, err_msg=k)
  assert float(m1["target_tokens"]) == 72
  # The gradient really is that of the whole batch's loss.
  jax.tree.map(lambda p, g, q: np.testing.assert_allclose(p - q, g, rtol=2e-4, atol=1e-6),
               params, grad, p4)
  assert float(m4["loss"]) == pytest.approx(float(loss), rel=1e-5)


@pytest.mark.parametrize("make", [
    lambda lr: optimizers.adafactor(learning_rate=lr),
    lambda lr: optimizers.adamw(learning_rate=lr, weight_decay=0.1)])
def test_fine_tuning_schedules_continue_at_the_checkpoint_step(make):
  """A fresh optimizer state for fine-tuning from step 100: the learning rate (and
  Adafactor's lr² weight decay) is the schedule's at step 100, as logged, not a warm-up
  from 0 again; the moments' own counts start at 0 (their statistics are new)."""
  schedule = lambda count: 1e-3 * (1.0 + count)
  tx = make(schedule)
  params = {"w": jnp.full((4, 4), 0.5)}
  grads = {"w": jnp.linspace(-1.0, 1.0, 16).reshape(4, 4)}
  fresh = tx.init(params)
  moved = optimizers.start_schedules_at(fresh, 100)
  has_count = lambda n: hasattr(n, "_fields") and "count" in n._fields
  nodes = [n for n in jax.tree.leaves(moved, is_leaf=has_count) if has_count(n)]
  schedules = [n for n in nodes if isinstance(n, optax.ScaleByScheduleState)]
  assert [int(n.count) for n in schedules] == [100]
  assert all(int(n.count) == 0 for n in nodes  # the moments' counts (β2, bias correction)
             if not isinstance(n, optax.ScaleByScheduleState) and "LrSquared" not in
             type(n).__name__)
  u_fresh, _ = tx.update(grads, fresh, params)
  u_moved, _ = tx.update(grads, moved, params)
  # The same moments, a learning rate 101 times larger (plus weight decay's share).
  assert float(jnp.abs(u_moved["w"]).mean()) > 50 * float(jnp.abs(u_fresh["w"]).mean())

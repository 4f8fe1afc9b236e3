"""Our Pallas MQA/GQA flash attention (interpret mode on CPU) against the XLA reference and
JAX's splash kernels, inside the model, and compiled ahead of time for TPU with libtpu."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import init_params_one_compile
from model import ModelConfig, Transformer
from model.attention import resolve, splash_attention, xla_attention
from model.flash_attention import flash_attention


def _inputs(b, t, s, n, k, h, dtype, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(keys[0], (b, t, n, h), jnp.float32).astype(dtype)
  kk = jax.random.normal(keys[1], (b, s, k, h), jnp.float32).astype(dtype)
  v = jax.random.normal(keys[2], (b, s, k, h), jnp.float32).astype(dtype)
  do = jax.random.normal(keys[3], (b, t, n, h), jnp.float32).astype(dtype)
  return q, kk, v, do


def _segments(b, length, packed):
  if not packed:
    return jnp.ones((b, length), jnp.int32)
  # Example 0: three packed sequences; example 1: left padding (segment 0) then one sequence.
  pos = jnp.arange(length)
  first = jnp.where(pos < length // 3, 1, jnp.where(pos < 2 * length // 3, 2, 3))
  second = jnp.where(pos < length // 4, 0, 1)
  return jnp.stack([first, second] + [first] * (b - 2))[:b].astype(jnp.int32)


# Jitted: one program per case (run op by op, the many small compiles of the eager XLA
# reference took longer than the computation).
@functools.partial(jax.jit, static_argnums=0)
def _vjp(fn, q, k, v, do):
  out, pullback = jax.vjp(fn, q, k, v)
  return (out, *pullback(do))


CASES = {
  # name: (B, T, S, N, K, H, causal, packed segments, dtype)
  "mqa_causal_h64": (2, 200, 200, 4, 1, 64, True, False, jnp.float32),
  "gqa_causal_segments_h128": (2, 200, 200, 8, 4, 128, True, True, jnp.float32),
  "mha_noncausal_segments": (2, 160, 160, 2, 2, 64, False, True, jnp.float32),
  "mqa_queries_end_keys_s_gt_t": (2, 100, 300, 4, 1, 64, True, False, jnp.float32),
  "mqa_causal_segments_bf16_h128": (2, 200, 200, 4, 1, 128, True, True, jnp.bfloat16),
  "gqa_noncausal_bf16": (2, 130, 130, 8, 4, 64, False, False, jnp.bfloat16),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_gradients_match_xla(case):
  b, t, s, n, k, h, causal, packed, dtype = CASES[case]
  q, kk, v, do = _inputs(b, t, s, n, k, h, dtype)
  q_seg = _segments(b, t, packed)
  kv_seg = _segments(b, s, packed) if s == t else jnp.ones((b, s), jnp.int32)
  scale = h**-0.5

  def ours(q, k, v):  # block 128: T and S span several blocks and are not multiples of them
    return flash_attention(
      q, k, v, causal=causal, segment_ids=(q_seg, kv_seg), sm_scale=scale, block_q=128, block_k=128
    )

  def ref(q, k, v):
    return xla_attention(
      q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg, causal=causal, sm_scale=scale
    )

  got, want = _vjp(ours, q, kk, v, do), _vjp(ref, q, kk, v, do)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
    assert x.dtype == y.dtype == dtype, name
    np.testing.assert_allclose(
      np.asarray(x, np.float32),
      np.asarray(y, np.float32),
      atol=tol,
      rtol=tol,
      err_msg=f"{case}: {name}",
    )


def test_agrees_with_splash_mqa():
  b, t, n, h = 2, 256, 4, 128
  q, kk, v, do = _inputs(b, t, t, n, 1, h, jnp.float32, seed=1)
  seg = _segments(b, t, True)
  ours = _vjp(
    lambda q, k, v: flash_attention(
      q, k, v, causal=True, segment_ids=seg, block_q=128, block_k=128
    ),
    q,
    kk,
    v,
    do,
  )
  splash = _vjp(
    lambda q, k, v: splash_attention(
      q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=True, sm_scale=h**-0.5, block=128
    ),
    q,
    kk,
    v,
    do,
  )
  for name, x, y in zip(("out", "dq", "dk", "dv"), ours, splash):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-4, rtol=1e-4, err_msg=name)


def _tiny(attention, **kw):
  shape = dict(
    vocab_size=128,
    max_position_embeddings=256,
    num_layers=2,
    embed_dim=64,
    num_heads=4,
    num_kv_heads=1,
    mlp_dim=128,
    dtype="float32",
  )
  return ModelConfig(**{**shape, **kw}, attention=attention)


# StarCoder2's pieces: RoPE, GQA (K=2) and a window shorter than the sequence and the block
STARCODER2_LIKE = dict(
  family="starcoder2", position_embedding="rope", num_kv_heads=2, sliding_window=40
)


@pytest.mark.parametrize("arch", [{}, STARCODER2_LIKE], ids=["gpt_bigcode", "starcoder2"])
def test_tiny_model_pallas_equals_xla_logits_and_grads(arch):
  params = init_params_one_compile(_tiny("xla", **arch), 0)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 150), 0, 128)
  mask = jnp.ones_like(tokens).at[1, :37].set(0)  # left padding

  def loss(p, impl):
    logits = Transformer(_tiny(impl, **arch)).apply({"params": p}, tokens, mask)
    return (jax.nn.log_softmax(logits) * mask[..., None]).mean(), logits

  # one program each, not op by op
  grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (l_x, logits_x), g_x = grad(params, "xla")
  (l_p, logits_p), g_p = grad(params, "pallas")
  np.testing.assert_allclose(logits_p, logits_x, atol=1e-5)
  np.testing.assert_allclose(l_p, l_x, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g_x), jax.tree.leaves(g_p)):
    np.testing.assert_allclose(b, a, atol=1e-6, rtol=1e-5)


def test_sharded_model_with_pallas_equals_xla():
  """On 8 fake devices (data=2, fsdp=2, tensor=2) the kernel runs under shard_map over batch and
  heads."""
  from model.sharding import LOGICAL_RULES, batch_sharding, logical_to_sharding, make_mesh
  from model import abstract_params

  cfg = _tiny("pallas")
  # The parameters do not depend on the attention implementation: the XLA config's initialiser,
  # compiled once for this file, gives them (init_params(cfg) would compile the kernel too).
  params = init_params_one_compile(cfg.replace(attention="xla"), 2)
  tokens = jax.random.randint(jax.random.PRNGKey(3), (4, 40), 0, 128)
  expected = Transformer(cfg.replace(attention="xla")).apply({"params": params}, tokens)
  mesh = make_mesh("data=2,fsdp=2,tensor=2")
  with nn.logical_axis_rules(LOGICAL_RULES):
    shardings = logical_to_sharding(abstract_params(cfg), mesh)
  fwd = jax.jit(
    lambda p, t: Transformer(cfg).apply({"params": p}, t),
    in_shardings=(shardings, batch_sharding(mesh)),
  )
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    got = fwd(jax.device_put(params, shardings), tokens)
    assert "shard_map" in str(
      jax.make_jaxpr(lambda p, t: Transformer(cfg).apply({"params": p}, t))(params, tokens)
    )
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)


def test_unavailable_choices_fail_with_one_line():
  assert (
    resolve("auto", "tpu") == "pallas"
    and resolve("auto", "cpu") == "xla"
    and resolve("auto", "gpu") == "xla"
  )
  with pytest.raises(ValueError, match="attention='pallas' is a TPU .* cannot run on gpu"):
    resolve("pallas", "gpu")
  with pytest.raises(ValueError, match="is not available"):
    resolve("flash", "tpu")
  with pytest.raises(ValueError, match="multiple of 8 kv heads"):
    q = jnp.zeros((1, 8, 4, 16))
    flash_attention(q, jnp.zeros((1, 8, 8, 16)), jnp.zeros((1, 8, 8, 16)))


@pytest.mark.parametrize(
  "topology,mesh_spec",
  [("v5e:2x2", "tensor=4"), ("v5p:2x2x1", "tensor=4"), ("v5e:2x2", "data=4")],
  ids=["v5e-heads-sharded", "v5p-heads-sharded", "v5e-48-heads-per-chip"],
)
def test_aot_compiles_for_tpu_at_starcoder_shape(topology, mesh_spec):
  """Forward+backward at B=1 (4 with data=4), T=8192, N=48, K=1, H=128, bf16, compiled by libtpu."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from model.attention import dot_product_attention
  from model.sharding import LOGICAL_RULES, make_mesh
  from rrtf_jax.plan import topology_devices

  devices = topology_devices(topology)
  mesh = make_mesh(mesh_spec, devices)
  b = mesh.shape["data"]
  t, n, h = 8192, 48, 128
  batch = "data" if b > 1 else None
  q = jax.ShapeDtypeStruct(
    (b, t, n, h),
    jnp.bfloat16,
    sharding=NamedSharding(mesh, P(batch, None, "tensor" if b == 1 else None, None)),
  )
  kv = jax.ShapeDtypeStruct((b, t, 1, h), jnp.bfloat16, sharding=NamedSharding(mesh, P(batch)))
  seg = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=NamedSharding(mesh, P(batch)))

  def loss(q, k, v, s):
    out = dot_product_attention(
      q, k, v, q_segment_ids=s, kv_segment_ids=s, causal=True, sm_scale=h**-0.5, impl="pallas"
    )
    return jnp.sum(out.astype(jnp.float32) ** 2)

  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    compiled = jax.jit(jax.value_and_grad(loss, (0, 1, 2))).lower(q, kv, kv, seg).compile()
  assert "tpu_custom_call" in compiled.as_text()  # the Mosaic kernels, not an interpreter
  temp = compiled.memory_analysis().temp_size_in_bytes
  heads_per_device = n // mesh.shape["tensor"]
  # the fp32 [N, T, T] scores plain attention would hold per device
  scores = heads_per_device * t * t * 4
  print(
    f"\n{topology} {mesh_spec}: compiled temporaries {temp / 2**20:.1f} MiB per device; "
    f"the [N={heads_per_device}, T, T] fp32 scores it avoids: {scores / 2**30:.1f} GiB"
  )
  q_bytes = b // mesh.shape["data"] * t * heads_per_device * h * 2
  # linear in T (layout copies of q and dO at most), no T x T tensor
  assert temp < 4 * q_bytes < scores / 10


# ---- sliding window --------------------------------------------------------------------------
WINDOW_CASES = {
  # name: (B, T, S, N, K, H, causal, packed segments, dtype, window, block_q, block_k)
  # window < block: query block i visits key blocks i - 1 and i only, 2 of 4 skipped per row
  "w100_t512_gqa": (1, 512, 512, 4, 2, 64, True, False, jnp.float32, 100, 128, 128),
  "w128_t512_gqa_segments": (2, 512, 512, 4, 2, 64, True, True, jnp.float32, 128, 128, 128),
  # T = 500 not a block multiple, block_q != block_k
  "w200_t500_gqa_bq256_bk128": (1, 500, 500, 4, 2, 64, True, False, jnp.float32, 200, 256, 128),
  "w_eq_t200_mqa_segments": (2, 200, 200, 4, 1, 64, True, True, jnp.float32, 200, 128, 128),
  "w_gt_t200_gqa": (1, 200, 200, 4, 2, 64, True, False, jnp.float32, 1000, 128, 128),
  # S - T = 200 >= window: no query reaches key block 0 (dk, dv there are zero)
  "w50_s_gt_t_mqa": (1, 100, 300, 4, 1, 64, True, False, jnp.float32, 50, 128, 128),
  "w70_gqa_segments_bf16_h128": (2, 200, 200, 4, 2, 128, True, True, jnp.bfloat16, 70, 128, 128),
  "w30_noncausal_segments": (1, 200, 200, 2, 1, 64, False, True, jnp.float32, 30, 128, 128),
}


@pytest.mark.parametrize("case", list(WINDOW_CASES))
def test_window_forward_and_gradients_match_xla(case):
  b, t, s, n, k, h, causal, packed, dtype, window, bq, bk = WINDOW_CASES[case]
  q, kk, v, do = _inputs(b, t, s, n, k, h, dtype, seed=2)
  q_seg = _segments(b, t, packed)
  kv_seg = _segments(b, s, packed) if s == t else jnp.ones((b, s), jnp.int32)
  scale = h**-0.5

  def ours(q, k, v):
    return flash_attention(
      q,
      k,
      v,
      causal=causal,
      window=window,
      segment_ids=(q_seg, kv_seg),
      sm_scale=scale,
      block_q=bq,
      block_k=bk,
    )

  def ref(q, k, v, window=window):
    return xla_attention(
      q,
      k,
      v,
      q_segment_ids=q_seg,
      kv_segment_ids=kv_seg,
      causal=causal,
      sm_scale=scale,
      window=window,
    )

  got, want = _vjp(ours, q, kk, v, do), _vjp(ref, q, kk, v, do)
  if window < t:  # the window matters here: without it the reference differs
    full = jax.jit(functools.partial(ref, window=None))(q, kk, v)
    assert np.abs(np.asarray(full, np.float32) - np.asarray(want[0], np.float32)).max() > 0.1
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
    assert x.dtype == y.dtype == dtype, name
    np.testing.assert_allclose(
      np.asarray(x, np.float32),
      np.asarray(y, np.float32),
      atol=tol,
      rtol=tol,
      err_msg=f"{case}: {name}",
    )


def test_window_splash_matches_xla():
  b, t, n, k, h, window = 2, 256, 4, 2, 64, 100
  q, kk, v, do = _inputs(b, t, t, n, k, h, jnp.float32, seed=3)
  seg = _segments(b, t, True)
  kw = dict(q_segment_ids=seg, kv_segment_ids=seg, causal=True, sm_scale=h**-0.5, window=window)
  splash = _vjp(lambda q, k, v: splash_attention(q, k, v, block=128, **kw), q, kk, v, do)
  ref = _vjp(lambda q, k, v: xla_attention(q, k, v, **kw), q, kk, v, do)
  full = jax.jit(lambda q, k, v: xla_attention(q, k, v, **{**kw, "window": None}))(q, kk, v)
  assert np.abs(np.asarray(full) - np.asarray(ref[0])).max() > 0.1  # the window matters
  for name, x, y in zip(("out", "dq", "dk", "dv"), splash, ref):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=1e-5, err_msg=name)


def _visited(t, s, bq, bk, causal, window):
  """Brute force: [nq, nk] bool, whether query block i and key block j share a (query, key)
  pair that passes the causal and window masks (positions of padded rows included)."""
  tp, sp = -(-t // bq) * bq, -(-s // bk) * bk
  qpos = np.arange(tp)[:, None] + (s - t)
  kpos = np.arange(sp)[None, :]
  ok = np.ones((tp, sp), bool)
  if causal:
    ok &= qpos >= kpos
  if window is not None:
    ok &= qpos - kpos < window
  return ok.reshape(tp // bq, bq, sp // bk, bk).any(axis=(1, 3))


GEOMETRIES = [  # (T, S, bq, bk)
  (512, 512, 128, 128),
  (500, 500, 256, 128),
  (384, 384, 128, 256),
  (200, 200, 128, 128),
  (100, 300, 128, 128),
  (300, 1000, 128, 256),
]


def test_window_visited_block_ranges_match_brute_force():
  from model.flash_attention import _visits, visited_kv_blocks, visited_q_blocks

  checked_skips = 0
  for t, s, bq, bk in GEOMETRIES:
    for causal in (True, False):
      for window in (None, 1, 50, 100, 127, 128, 129, 256, 300, 1000):
        vis = _visited(t, s, bq, bk, causal, window)
        nq, nk = vis.shape
        kw = dict(bq=bq, bk=bk, offset=s - t, causal=causal, window=window)
        for i in range(nq):
          first, last = visited_kv_blocks(i, num_k_blocks=nk, **kw)
          assert list(range(first, last + 1)) == list(np.flatnonzero(vis[i])), (t, s, kw, i)
          for j in range(nk):
            assert bool(_visits(i, j, **kw)) == vis[i, j], (t, s, kw, i, j)
        for j in range(nk):
          first, last = visited_q_blocks(j, num_q_blocks=nq, **kw)
          assert list(range(first, last + 1)) == list(np.flatnonzero(vis[:, j])), (t, s, kw, j)
        checked_skips += (
          window is not None and (~vis).sum() > (~_visited(t, s, bq, bk, causal, None)).sum()
        )
  assert checked_skips > 20  # the window skips blocks in most of these


def _pallas_calls(jaxpr):
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      yield eqn.params
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _pallas_calls(sub)


@pytest.mark.parametrize(
  "t,s,bq,bk,window",
  [(512, 512, 128, 128, 100), (500, 500, 256, 128, 200), (100, 300, 128, 128, 50)],
  ids=["t512_w100", "t500_bq256_bk128_w200", "s_gt_t_w50"],
)
def test_window_skipped_blocks_fetch_nothing_new_and_cost_counts_visited(t, s, bq, bk, window):
  """The kernels' own index maps (from the traced pallas_calls of forward and backward): at a
  skipped grid step every operand's block index is that of the nearest visited step of the same
  row (the previous one, or the first for leading skipped steps), so Pallas issues no DMA for it;
  and the pl.CostEstimate counts the visited tiles only."""
  b, n, k, h = 1, 4, 2, 64
  q, kk, v, do = _inputs(b, t, s, n, k, h, jnp.float32)

  def fn(q, k, v):
    return flash_attention(q, k, v, window=window, block_q=bq, block_k=bk)

  jaxpr = jax.make_jaxpr(lambda q, k, v, do: jax.vjp(fn, q, k, v)[1](do))(q, kk, v, do)
  calls = {p["name"]: p for p in _pallas_calls(jaxpr.jaxpr)}
  assert set(calls) == {"mqa_flash_fwd", "mqa_flash_dq", "mqa_flash_dkv"}
  vis = _visited(t, s, bq, bk, True, window)  # [nq, nk]
  assert not vis.all()
  matmuls = {"mqa_flash_fwd": 2, "mqa_flash_dq": 3, "mqa_flash_dkv": 4}
  for name, params in calls.items():
    grid = params["grid_mapping"].grid
    # rows: the outer block axis (grid dim 2), steps: the inner one (grid dim 3)
    rows = vis if name != "mqa_flash_dkv" else vis.T
    assert grid == (b, k, *rows.shape), name
    idx = np.stack(np.meshgrid(*(np.arange(d) for d in grid[2:]), indexing="ij"), -1).reshape(-1, 2)
    zeros = np.zeros(len(idx), np.int32)
    for m, bm in enumerate(params["grid_mapping"].block_mappings):
      fn_map = jax.vmap(jax.extend.core.jaxpr_as_fun(bm.index_map_jaxpr))
      blocks = np.stack(fn_map(zeros, zeros, *idx.T.astype(np.int32)), -1)
      blocks = blocks.reshape(*rows.shape, -1)  # [rows, steps, block index dims]
      for r in range(rows.shape[0]):
        visited = np.flatnonzero(rows[r])
        for step in range(rows.shape[1]):
          if len(visited) == 0:  # no step computes: one block, fetched once
            nearest = 0
          else:
            before = visited[visited <= step]
            nearest = before[-1] if len(before) else visited[0]
          np.testing.assert_array_equal(
            blocks[r, step], blocks[r, nearest], err_msg=f"{name} operand {m} row {r} step {step}"
          )
    pairs = b * n * int(vis.sum()) * bq * bk
    assert params["cost_estimate"].flops == 2 * h * matmuls[name] * pairs, name


def test_window_kernels_compute_only_visited_blocks(monkeypatch):
  """A counter in the masked-tile code, which every kernel runs once per computed grid step:
  forward, dq and dk/dv each compute exactly the visited (block, block) pairs, B * K times."""
  import model.flash_attention as fa

  calls = []
  mask = fa._mask

  def counting_mask(*args, **kw):
    jax.debug.callback(lambda: calls.append(1))
    return mask(*args, **kw)

  monkeypatch.setattr(fa, "_mask", counting_mask)
  b, t, n, k, h, window = 1, 512, 4, 2, 64, 100
  q, kk, v, do = _inputs(b, t, t, n, k, h, jnp.float32)
  fn = functools.partial(flash_attention, window=window, block_q=128, block_k=128)
  jax.block_until_ready(jax.jit(lambda *a: jax.vjp(fn, *a[:3])[1](a[3]))(q, kk, v, do))
  jax.effects_barrier()
  tiles = int(_visited(t, t, 128, 128, True, window).sum())
  assert tiles == 7  # of 16, 10 causally
  assert len(calls) == 3 * b * k * tiles


@pytest.mark.parametrize("window", [0, -3, 2.5, True])
def test_window_must_be_a_positive_int(window):
  q = jnp.zeros((1, 8, 4, 16))
  kv = jnp.zeros((1, 8, 1, 16))
  with pytest.raises(ValueError, match="window must be an int >= 1"):
    flash_attention(q, kv, kv, window=window)


def test_aot_compiles_windowed_for_tpu_at_starcoder2_shape():
  """StarCoder2-15B's attention (N=48, K=4, H=128, bf16, window 4096) at T=16384, forward and
  backward compiled by libtpu on v5p tensor=4 (12 query heads and 1 kv head per device): Mosaic
  kernels, temporaries linear in T, and XLA's FLOPs are the visited tiles' (48% of causal)."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from model.attention import dot_product_attention
  from model.flash_attention import default_block_sizes, visited_kv_blocks
  from model.sharding import LOGICAL_RULES, make_mesh
  from rrtf_jax.plan import topology_devices

  mesh = make_mesh("tensor=4", topology_devices("v5p:2x2x1"))
  t, n, kh, h, window = 16384, 48, 4, 128, 4096
  heads = NamedSharding(mesh, P(None, None, "tensor", None))
  q = jax.ShapeDtypeStruct((1, t, n, h), jnp.bfloat16, sharding=heads)
  kv = jax.ShapeDtypeStruct((1, t, kh, h), jnp.bfloat16, sharding=heads)
  seg = jax.ShapeDtypeStruct((1, t), jnp.int32, sharding=NamedSharding(mesh, P()))

  def loss(q, k, v, s):
    out = dot_product_attention(
      q, k, v, q_segment_ids=s, kv_segment_ids=s, sm_scale=h**-0.5, window=window, impl="pallas"
    )
    return jnp.sum(out.astype(jnp.float32) ** 2)

  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    compiled = jax.jit(jax.value_and_grad(loss, (0, 1, 2))).lower(q, kv, kv, seg).compile()
  assert "tpu_custom_call" in compiled.as_text()
  n_dev = n // 4
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < 4 * t * n_dev * h * 2  # no T x T or T x window tensor
  cost = compiled.cost_analysis()
  flops = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
  bq, bk = default_block_sizes(n // kh)

  def tiles(window):
    ranges = [
      visited_kv_blocks(i, bq=bq, bk=bk, offset=0, causal=True, window=window, num_k_blocks=t // bk)
      for i in range(t // bq)
    ]
    return sum(last - first + 1 for first, last in ranges)

  kernels = 2 * h * (2 + 3 + 4) * n_dev * tiles(window) * bq * bk  # fwd, dq, dk/dv matmuls
  print(f"\nwindowed fwd+bwd: {flops:.3e} FLOPs/device ({kernels:.3e} in the kernels), temp {temp}")
  assert kernels <= flops <= 1.02 * kernels
  assert tiles(window) < 0.5 * tiles(None)

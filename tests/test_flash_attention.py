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
  return ModelConfig(
    vocab_size=128,
    max_position_embeddings=256,
    num_layers=2,
    embed_dim=64,
    num_heads=4,
    num_kv_heads=1,
    mlp_dim=128,
    dtype="float32",
    attention=attention,
    **kw,
  )


def test_tiny_model_pallas_equals_xla_logits_and_grads():
  params = init_params_one_compile(_tiny("xla"), 0)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 150), 0, 128)
  mask = jnp.ones_like(tokens).at[1, :37].set(0)  # left padding

  def loss(p, impl):
    logits = Transformer(_tiny(impl)).apply({"params": p}, tokens, mask)
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

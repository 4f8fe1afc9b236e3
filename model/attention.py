"""Attention implementations behind one dispatch point (`model.attention` in the config).

Letters: B batch, T query length, S key length, N query heads, K kv heads, G = N // K query
heads per kv head, H head dim.

  xla     plain einsum attention; the reference, and the default off TPU.
  pallas  ours (model/flash_attention.py): flash attention native to MQA/GQA; the default on TPU.
  splash  JAX's splash attention kernels (make_splash_mqa / make_splash_mha).
  auto    pallas on TPU, xla elsewhere.

Masking is expressed the way flash kernels take it: causal by index plus segment ids, and an
optional sliding window (`window`, StarCoder2 / Mistral) by index too. A
padded batch uses segment 0 for padding and 1 for real tokens, so real tokens never attend
to padding; packed sequences use 1, 2, 3, ...

Pallas kernels cannot be partitioned by XLA, so under a mesh they run inside `shard_map`:
batch over the axes `batch` maps to, query heads over the axes `heads` maps to (the tensor
axis); a single shared kv head (MQA) is replicated, several kv heads shard with the queries.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

IMPLEMENTATIONS = ("auto", "xla", "pallas", "splash")


def xla_attention(
  q, k, v, *, q_segment_ids, kv_segment_ids, causal=True, sm_scale=1.0, window=None
):
  """Reference attention with grouped (multi-query) heads, softmax in fp32.

  Args:
    q: [B, T, N, H] queries.
    k, v: [B, S, K, H] keys and values, N % K == 0; never repeated to N heads.
    q_segment_ids: [B, T] int; kv_segment_ids: [B, S] int. Attend only within a segment.
    causal: query t attends to keys s <= t + (S - T) (keys end where queries end).
    sm_scale: multiplies the scores.
    window: sliding window (StarCoder2, Mistral): query t also needs t + (S - T) - s < window,
      i.e. it sees itself and the window - 1 keys before it. None = unlimited.
  Returns:
    [B, T, N, H] in q's dtype.
  """
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = n // kh
  qg = q.reshape(b, t, kh, g, h)  # [B, T, K, G, H]
  scores = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32) * sm_scale
  mask = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]  # [B, T, S]
  q_idx = jnp.arange(t)[:, None] + (s - t)
  if causal:
    mask = mask & (q_idx >= jnp.arange(s)[None, :])[None]
  if window is not None:
    mask = mask & (q_idx - jnp.arange(s)[None, :] < window)[None]
  # A finite minimum, not -inf: a row with no allowed key gives a uniform, finite softmax.
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)  # [B, K, G, T, S] fp32
  out = jnp.einsum("BKGTS,BSKH->BTKGH", probs.astype(v.dtype), v)
  return out.reshape(b, t, n, h)


def cached_attention(q, k_new, v_new, k_cache, v_cache, cache_mask, *, sm_scale=1.0):
  """Decoding attention: T new queries over S cached keys (where `cache_mask`) and, causally,
  the T new keys; one softmax over both parts without concatenating the cache.

  Args:
    q: [B, T, N, H]; k_new, v_new: [B, T, K, H]; k_cache, v_cache: [B, S, K, H];
    cache_mask: [B, S], nonzero where the cache holds a real token.
  Returns:
    [B, T, N, H] in q's dtype.
  """
  b, t, n, h = q.shape
  kh = k_new.shape[2]
  qg = q.reshape(b, t, kh, n // kh, h)  # [B, T, K, G, H]
  neg = jnp.finfo(jnp.float32).min
  s_old = jnp.einsum(
    "BTKGH,BSKH->BKGTS", qg, k_cache.astype(q.dtype), preferred_element_type=jnp.float32
  )
  s_old = jnp.where(cache_mask.astype(bool)[:, None, None, None, :], s_old * sm_scale, neg)
  s_new = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k_new, preferred_element_type=jnp.float32) * sm_scale
  s_new = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s_new, neg)
  m = jnp.maximum(s_old.max(-1, keepdims=True), s_new.max(-1, keepdims=True))
  p_old, p_new = jnp.exp(s_old - m), jnp.exp(s_new - m)
  denom = p_old.sum(-1, keepdims=True) + p_new.sum(-1, keepdims=True)
  out = jnp.einsum(
    "BKGTS,BSKH->BTKGH", (p_old / denom).astype(v_new.dtype), v_cache.astype(v_new.dtype)
  ) + jnp.einsum("BKGTS,BSKH->BTKGH", (p_new / denom).astype(v_new.dtype), v_new)
  return out.reshape(b, t, n, h)


def splash_attention(
  q,
  k,
  v,
  *,
  q_segment_ids,
  kv_segment_ids,
  causal=True,
  sm_scale=1.0,
  window=None,
  block=512,
  interpret=None,
):
  """JAX's splash attention kernels (self-attention, T == S), MQA per kv head or MHA.
  `window`: sliding window as in xla_attention (splash's LocalMask), None for none."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa

  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  if s != t:
    raise ValueError(f"attention='splash' supports self-attention only (T == S), got T={t}, S={s}")
  if window is not None and (isinstance(window, bool) or int(window) != window or window < 1):
    raise ValueError(f"splash_attention: window must be an int >= 1 or None, got {window!r}")
  g = n // kh
  blk = min(block, -(-t // 128) * 128)
  tp = -(-t // blk) * blk
  pad = ((0, 0), (0, tp - t))
  q_seg = jnp.pad(q_segment_ids.astype(jnp.int32), pad, constant_values=-(2**31))
  kv_seg = jnp.pad(kv_segment_ids.astype(jnp.int32), pad, constant_values=-(2**31) + 1)
  qt = jnp.pad(
    (q * sm_scale).astype(q.dtype).reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4),
    ((0, 0), (0, 0), (0, 0), (0, tp - t), (0, 0)),
  )  # [B, K, G, Tp, H]
  kt = jnp.pad(k.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, tp - t), (0, 0)))  # [B, K, Tp, H]
  vt = jnp.pad(v.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, tp - t), (0, 0)))
  if window is not None:
    # key in [query - (window - 1), query], or unbounded on the right when not causal
    base = sa.LocalMask((tp, tp), window_size=(int(window) - 1, 0 if causal else None), offset=0)
  else:
    base = sa.CausalMask((tp, tp)) if causal else sa.FullMask((tp, tp))
  sizes = sa.BlockSizes(
    block_q=blk,
    block_kv=blk,
    block_kv_compute=blk,
    block_q_dkv=blk,
    block_kv_dkv=blk,
    block_kv_dkv_compute=blk,
    block_q_dq=blk,
    block_kv_dq=blk,
  )
  if interpret is None:
    from model.flash_attention import target_platform

    interpret = target_platform() != "tpu"
  if kh == n:  # multi-head: one kernel over all heads
    kernel = sa.make_splash_mha_single_device(
      sa.MultiHeadMask([base] * n), block_sizes=sizes, interpret=interpret
    )

    def run(qe, ke, ve, seg):
      return kernel(qe[:, 0], ke, ve, segment_ids=seg)[:, None]

  else:  # multi-query per kv head: q [G, Tp, H] against k, v [Tp, H]
    kernel = sa.make_splash_mqa_single_device(
      sa.MultiHeadMask([base] * g), block_sizes=sizes, interpret=interpret
    )
    run = jax.vmap(
      lambda qe, ke, ve, seg: kernel(qe, ke, ve, segment_ids=seg), in_axes=(0, 0, 0, None)
    )

  def per_example(qe, ke, ve, qs, ks):
    return run(qe, ke, ve, sa.SegmentIds(q=qs, kv=ks))

  out = jax.vmap(per_example)(qt, kt, vt, q_seg, kv_seg)  # [B, K, G, Tp, H]
  return out[:, :, :, :t].transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def resolve(impl: str, platform: str | None = None) -> str:
  """The implementation `impl` means on `platform` (default: the platform being compiled for)."""
  from model.flash_attention import target_platform

  platform = platform or target_platform()
  if impl not in IMPLEMENTATIONS:
    raise ValueError(
      f"attention implementation {impl!r} is not available; choose one of {IMPLEMENTATIONS}"
    )
  if impl == "auto":
    return "pallas" if platform == "tpu" else "xla"
  if impl in ("pallas", "splash") and platform not in ("tpu", "cpu"):
    raise ValueError(
      f"attention={impl!r} is a TPU (Mosaic) kernel and cannot run on {platform}; "
      "use attention='xla' there"
    )
  return impl


def _mesh_specs(mesh, num_kv_heads: int):
  """shard_map specs from the logical rules in force: batch and heads sharded, H and T whole."""
  import flax.linen as nn

  q_spec = nn.logical_to_mesh_axes(("batch", "length", "heads", "head_dim"))
  q_spec = P(q_spec[0], None, q_spec[2], None)
  heads = q_spec[2]
  head_axes = () if heads is None else heads if isinstance(heads, tuple) else (heads,)
  head_shards = math.prod(mesh.shape[ax] for ax in head_axes)
  if num_kv_heads == 1 or head_shards == 1:
    kv_spec = P(q_spec[0], None, None, None)  # the shared kv head replicated over the head shards
  elif num_kv_heads % head_shards == 0:
    kv_spec = P(q_spec[0], None, heads, None)  # kv groups shard with their query heads
  else:
    raise ValueError(
      f"{num_kv_heads} kv heads cannot be split over {head_shards} head shards; "
      "use a tensor axis that divides the kv heads, or attention='xla'"
    )
  return q_spec, kv_spec, P(q_spec[0], None)


def dot_product_attention(
  q, k, v, *, q_segment_ids, kv_segment_ids, causal=True, sm_scale=1.0, window=None, impl="xla"
):
  """Dispatch to the configured implementation; Pallas kernels run under shard_map on a mesh.
  `window`: sliding-window length (see xla_attention), None for none."""
  impl = resolve(impl)
  if impl == "xla":
    return xla_attention(
      q,
      k,
      v,
      q_segment_ids=q_segment_ids,
      kv_segment_ids=kv_segment_ids,
      causal=causal,
      sm_scale=sm_scale,
      window=window,
    )
  if impl == "pallas":
    from model.flash_attention import flash_attention

    def kernel(q, k, v, qs, ks):
      return flash_attention(
        q, k, v, causal=causal, window=window, segment_ids=(qs, ks), sm_scale=sm_scale
      )
  else:

    def kernel(q, k, v, qs, ks):
      return splash_attention(
        q,
        k,
        v,
        q_segment_ids=qs,
        kv_segment_ids=ks,
        causal=causal,
        sm_scale=sm_scale,
        window=window,
      )

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or math.prod(mesh.shape.values()) == 1:
    return kernel(q, k, v, q_segment_ids, kv_segment_ids)
  q_spec, kv_spec, seg_spec = _mesh_specs(mesh, k.shape[2])
  return jax.shard_map(
    kernel,
    mesh=mesh,
    in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec),
    out_specs=q_spec,
    check_vma=False,
  )(q, k, v, q_segment_ids, kv_segment_ids)

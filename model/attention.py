"""Attention implementations behind one dispatch point.

Letters: B batch, T query length, S key length, N query heads, K kv heads, G = N // K query heads
per kv head, H head dim.

Masking is expressed the way flash kernels take it: causal by index plus segment ids. A
padded batch uses segment 0 for padding and 1 for real tokens, so real tokens never attend
to padding; packed sequences use 1, 2, 3, ...
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla",)


def xla_attention(q, k, v, *, q_segment_ids, kv_segment_ids, causal=True, sm_scale=1.0):
  """Reference attention with grouped (multi-query) heads, softmax in fp32.

  Args:
    q: [B, T, N, H] queries.
    k, v: [B, S, K, H] keys and values, N % K == 0; never repeated to N heads.
    q_segment_ids: [B, T] int; kv_segment_ids: [B, S] int. Attend only within a segment.
    causal: query t attends to keys s <= t + (S - T) (keys end where queries end).
    sm_scale: multiplies the scores.
  Returns:
    [B, T, N, H] in q's dtype.
  """
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = n // kh
  qg = q.reshape(b, t, kh, g, h)  # [B, T, K, G, H]
  scores = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32) * sm_scale
  mask = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]  # [B, T, S]
  if causal:
    q_idx = jnp.arange(t)[:, None] + (s - t)
    mask = mask & (q_idx >= jnp.arange(s)[None, :])[None]
  # A finite minimum, not -inf: a row with no allowed key gives a uniform, finite softmax.
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)  # [B, K, G, T, S] fp32
  out = jnp.einsum("BKGTS,BSKH->BTKGH", probs.astype(v.dtype), v)
  return out.reshape(b, t, n, h)


def dot_product_attention(q, k, v, *, q_segment_ids, kv_segment_ids, causal=True, sm_scale=1.0,
                          impl="xla"):
  """Dispatch to the configured implementation (`model.attention` in the config)."""
  if impl == "xla":
    return xla_attention(q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                         causal=causal, sm_scale=sm_scale)
  raise ValueError(f"attention implementation {impl!r} is not available; choose one of {IMPLEMENTATIONS}")

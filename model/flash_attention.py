"""Flash attention in Pallas for TPU (Mosaic), native to multi-query and grouped-query attention.

Letters: B batch, T query length, S key length, N query heads, K kv heads, G = N // K query
heads per kv head, H head dim. bq / bk: query / key block sizes.

Every kernel's grid runs over (batch, kv head, block, block); a program holds one K/V tile in
VMEM and loops over the G query heads of its group, so a K/V tile is fetched once per query
block for all G heads and K/V are never repeated in HBM. Causal blocks above the diagonal
are skipped: no compute, and their index maps repeat the previous block so no DMA is issued.
Padding (T, S up to block multiples) is masked with segment ids that match nothing real.

Sliding window (StarCoder2, Mistral; `window`): query q (in key coordinates, q = t + S - T) also
needs q - k < window. Inside a visited block the window is masked by position; blocks entirely
outside it are skipped like the causal ones: no compute, and their index maps clamp to the
nearest visited block (the first in-window block for blocks before the window), so each
program fetches only the blocks it visits and the work is O(T * window), not O(T^2).
`visited_kv_blocks` / `visited_q_blocks` give the visited range per block.

Forward: online softmax in fp32; the residual for the backward pass is the log-sum-exp
[B, K, G, T], never the probability matrix. Backward: a dq kernel (grid over query blocks,
keys inner) and a dk/dv kernel (grid over key blocks, queries inner, computed transposed so
row statistics broadcast along lanes), wired with jax.custom_vjp.
"""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LANES = 128
SUBLANES = 8
# Finite, so a fully masked row gives exp(0) weights instead of NaN (the rows are padding).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_Q_PAD = -(2**31)  # segment id of padded queries
_KV_PAD = -(2**31) + 1  # segment id of padded keys: never equal to a query's
NT = (((1,), (1,)), ((), ()))  # x @ y.T
NN = (((1,), (0,)), ((), ()))  # x @ y


def _round_up(x: int, m: int) -> int:
  return (x + m - 1) // m * m


def _lanes(x, n: int):
  """[R, 128] lane-broadcast row statistic -> [R, n]."""
  if n == LANES:
    return x
  if n < LANES:
    return x[:, :n]
  return jnp.tile(x, (1, n // LANES))


def _mask(q_seg, kv_seg, q_pos0, k_pos0, shape, causal, transposed, window=None):
  """Boolean mask of a score tile: same segment, key <= query when causal, and query - key <
  window when windowed.

  Normal tiles are [bq, bk] (queries on sublanes); transposed tiles are [bk, bq].
  """
  mask = q_seg == kv_seg
  if causal or window is not None:
    if transposed:
      k_pos = k_pos0 + lax.broadcasted_iota(jnp.int32, shape, 0)
      q_pos = q_pos0 + lax.broadcasted_iota(jnp.int32, shape, 1)
    else:
      q_pos = q_pos0 + lax.broadcasted_iota(jnp.int32, shape, 0)
      k_pos = k_pos0 + lax.broadcasted_iota(jnp.int32, shape, 1)
    if causal:
      mask = jnp.logical_and(mask, q_pos >= k_pos)
    if window is not None:
      mask = jnp.logical_and(mask, q_pos - k_pos < window)
  return mask


# ---- forward --------------------------------------------------------------------------------
def _fwd_kernel(
  q_seg_ref,
  kv_seg_ref,
  q_ref,
  k_ref,
  v_ref,
  o_ref,
  lse_ref,
  m_sc,
  l_sc,
  acc_sc,
  *,
  sm_scale,
  causal,
  window,
  bq,
  bk,
  offset,
  groups,
  num_k_blocks,
):
  i, j = pl.program_id(2), pl.program_id(3)
  head_dim = q_ref.shape[-1]

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  # Causal: skip key blocks that start after this query block's last query; window: and those
  # that end before its first query's window starts.
  run = _visits(i, j, bq=bq, bk=bk, offset=offset, causal=causal, window=window)

  @pl.when(run)
  def _compute():
    k = k_ref[...]  # [bk, H]
    v = v_ref[...]  # [bk, H]
    q_seg = jnp.tile(q_seg_ref[...], (1, bk // LANES))  # [bq, bk]
    mask = _mask(q_seg, kv_seg_ref[:1, :], i * bq + offset, j * bk, (bq, bk), causal, False, window)

    def head(g, carry):
      q = q_ref[g]  # [bq, H]
      s = lax.dot_general(q, k, NT, preferred_element_type=jnp.float32) * sm_scale  # [bq, bk]
      s = jnp.where(mask, s, MASK_VALUE)
      m_prev, l_prev = m_sc[g], l_sc[g]  # [bq, 128] each
      m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # [bq, 128]
      p = jnp.exp(s - _lanes(m_next, bk))  # [bq, bk]
      alpha = jnp.exp(m_prev - m_next)  # [bq, 128]
      l_sc[g] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
      m_sc[g] = m_next
      pv = lax.dot_general(p.astype(v.dtype), v, NN, preferred_element_type=jnp.float32)  # [bq, H]
      acc_sc[g] = acc_sc[g] * _lanes(alpha, head_dim) + pv
      return carry

    lax.fori_loop(0, groups, head, None)

  @pl.when(j == num_k_blocks - 1)
  def _finish():
    def head(g, carry):
      denom = l_sc[g]
      o_ref[g] = (acc_sc[g] / _lanes(denom, head_dim)).astype(o_ref.dtype)
      # Stored with T on lanes ([8, bq], 8 identical rows): 16x less VMEM and HBM than the
      # lane-broadcast [bq, 128] form, and the layout the dk/dv kernel reads.
      lse_ref[g] = jnp.transpose(m_sc[g] + jnp.log(denom))[:SUBLANES, :]
      return carry

    lax.fori_loop(0, groups, head, None)


def _layout_q(x, kh, tp):
  """[B,T,N,H] -> [B,K,G,Tp,H] (queries, outputs and their cotangents), zero-padded to Tp."""
  b, t, n, h = x.shape
  xt = x.reshape(b, t, kh, n // kh, h).transpose(0, 2, 3, 1, 4)
  return jnp.pad(xt, ((0, 0), (0, 0), (0, 0), (0, tp - t), (0, 0)))


def _layout(q, k, v, q_seg, kv_seg, bq, bk):
  """[B,T,N,H] -> [B,K,G,Tp,H]; [B,S,K,H] -> [B,K,Sp,H]; segment ids padded with sentinels."""
  t, s, kh = q.shape[1], k.shape[1], k.shape[2]
  tp, sp = _round_up(t, bq), _round_up(s, bk)
  kt = jnp.pad(k.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, sp - s), (0, 0)))
  vt = jnp.pad(v.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, sp - s), (0, 0)))
  q_seg = jnp.pad(q_seg.astype(jnp.int32), ((0, 0), (0, tp - t)), constant_values=_Q_PAD)
  kv_seg = jnp.pad(kv_seg.astype(jnp.int32), ((0, 0), (0, sp - s)), constant_values=_KV_PAD)
  return _layout_q(q, kh, tp), kt, vt, q_seg, kv_seg


def _last_kv_block(i, bq, bk, offset):
  """The last key block that query block i attends to causally (later ones are skipped)."""
  return (i * bq + bq - 1 + offset) // bk


def _is_array(*xs):
  return any(isinstance(x, jax.Array) for x in xs)  # tracers included


def _imax(a, b):  # on Python ints (cost estimate, tests) and on traced grid indices alike
  return jnp.maximum(a, b) if _is_array(a, b) else max(a, b)


def _imin(a, b):
  return jnp.minimum(a, b) if _is_array(a, b) else min(a, b)


def _first_kv_block(i, bq, bk, offset, window):
  """The first key block within the window of query block i's first query (earlier ones are
  skipped): the block of key i * bq + offset - window + 1."""
  return _imax(i * bq + offset - window + 1, 0) // bk  # numerator >= 0: floor == truncation


def _first_q_block(j, bq, bk, offset):
  """The first query block that attends causally to key block j (earlier ones are skipped)."""
  return _imax(j * bk - offset, 0) // bq


def _last_q_block(j, bq, bk, offset, window):
  """The last query block whose window reaches key block j (later ones are skipped), -1 when
  none does (S - T >= window): the block of query j * bk + bk - 1 + window - 1 - offset."""
  last_q = j * bk + bk + window - 2 - offset
  return (_imax(last_q, -bq) + bq) // bq - 1  # floor division of a non-negative numerator


def visited_kv_blocks(i, *, bq, bk, offset, causal, window, num_k_blocks):
  """(first, last), inclusive: the key blocks query block i computes (forward and dq kernels);
  the others are skipped. offset = S - T; ints or traced scalars."""
  first = 0 if window is None else _first_kv_block(i, bq, bk, offset, window)
  last = _imin(_last_kv_block(i, bq, bk, offset), num_k_blocks - 1) if causal else num_k_blocks - 1
  return first, last


def visited_q_blocks(j, *, bq, bk, offset, causal, window, num_q_blocks):
  """(first, last), inclusive: the query blocks key block j computes (dk/dv kernel); empty
  (last < first) when no query reaches it. offset = S - T; ints or traced scalars."""
  first = _first_q_block(j, bq, bk, offset) if causal else 0
  last = (
    num_q_blocks - 1
    if window is None
    else _imin(_last_q_block(j, bq, bk, offset, window), num_q_blocks - 1)
  )
  return first, last


def _visits(i, j, *, bq, bk, offset, causal, window):
  """Whether grid step (query block i, key block j) computes: some (query, key) pair of the two
  blocks passes the causal and window masks. Python True when nothing is skipped."""
  run = True
  if causal:
    run = j <= _last_kv_block(i, bq, bk, offset)
  if window is not None:
    after = j >= _first_kv_block(i, bq, bk, offset, window)
    run = after if run is True else jnp.logical_and(run, after)
  return run


def _kv_index(i, j, *, bq, bk, offset, causal, window):
  """The key block fetched at step j of query block i (forward, dq): j clamped to the visited
  range, so a skipped step repeats a block fetched anyway and issues no DMA."""
  if causal:
    j = jnp.minimum(j, _last_kv_block(i, bq, bk, offset))
  if window is not None:
    j = jnp.maximum(j, _first_kv_block(i, bq, bk, offset, window))
  return j


def _q_index(j, i, *, bq, bk, offset, causal, window):
  """The query block fetched at step i of key block j (dk/dv): i clamped to the visited range."""
  first = 0
  if causal:
    first = _first_q_block(j, bq, bk, offset)
    i = jnp.maximum(i, first)  # repeat the first needed block
  if window is not None:
    i = jnp.minimum(i, _imax(_last_q_block(j, bq, bk, offset, window), first))  # or the last
  return i


def _unlayout_q(x, t):
  """[B,K,G,Tp,H] -> [B,T,N,H]."""
  b, kh, g, _, h = x.shape
  return x[:, :, :, :t].transpose(0, 3, 1, 2, 4).reshape(b, t, kh * g, h)


def _lane_ids(seg):  # [B, L] -> [B, L, 128]: ids on sublanes
  return jnp.broadcast_to(seg[:, :, None], (*seg.shape, LANES))


def _row_ids(x):  # [..., L] -> [..., 8, L]: ids (or statistics) on lanes
  return jnp.broadcast_to(x[..., None, :], (*x.shape[:-1], SUBLANES, x.shape[-1]))


def target_platform() -> str:
  """The platform being compiled for: the mesh in force (an AOT TPU topology from a CPU host),
  else JAX's default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  return getattr(device, "platform", None) or jax.default_backend()


_DEFAULT_SCOPED_VMEM = 16 << 20  # Mosaic's default scoped-VMEM limit
_MAX_SCOPED_VMEM = 48 << 20  # below every TPU generation's VMEM since v4


def _vmem_bytes(in_specs, out_specs, scratch, args, out_shape) -> int:
  """Double-buffered blocks plus scratch, plus room for a few [bq, bk] fp32 temporaries."""

  def block_bytes(spec, dtype):
    return math.prod(d for d in spec.block_shape if d is not None) * jnp.dtype(dtype).itemsize

  outs = out_specs if isinstance(out_specs, (list, tuple)) else [out_specs]
  oshapes = out_shape if isinstance(out_shape, (list, tuple)) else [out_shape]
  total = sum(2 * block_bytes(s, a.dtype) for s, a in zip(in_specs, args))
  total += sum(2 * block_bytes(s, o.dtype) for s, o in zip(outs, oshapes))
  return total + sum(math.prod(s.shape) * jnp.dtype(s.dtype).itemsize for s in scratch)


def _cost(
  *, b, n, tp, sp, h, bq, bk, offset, causal, window, matmuls, exps, args, outs
) -> pl.CostEstimate:
  """FLOPs of the tiles actually computed (causal and window skipping included), for XLA's cost
  analysis."""
  nq, nk = tp // bq, sp // bk
  tiles = 0
  for i in range(nq):
    first, last = visited_kv_blocks(
      i, bq=bq, bk=bk, offset=offset, causal=causal, window=window, num_k_blocks=nk
    )
    tiles += max(0, last - first + 1)
  pairs = b * n * tiles * bq * bk  # (query, key) score entries computed
  nbytes = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in (*args, *outs))
  return pl.CostEstimate(
    flops=2 * h * matmuls * pairs, transcendentals=exps * pairs, bytes_accessed=nbytes
  )


def _pallas(kernel, *args, interpret, semantics, tile_elems, **kw):
  """pallas_call compiled by Mosaic, or run by Pallas's generic interpreter (CPU tests; the TPU
  interpreter deadlocks under shard_map over several CPU devices).

  The [G, bq, H] blocks of MQA (G = 48 for StarCoder) can pass Mosaic's default 16 MiB of
  scoped VMEM, so the limit is raised to what the blocks need, within every chip's VMEM.
  """
  if interpret:
    return pl.pallas_call(kernel, interpret=True, **kw)(*args)
  need = _vmem_bytes(kw["in_specs"], kw["out_specs"], kw["scratch_shapes"], args, kw["out_shape"])
  need += 6 * tile_elems * 4
  limit = None if need * 5 // 4 <= _DEFAULT_SCOPED_VMEM else min(_MAX_SCOPED_VMEM, need * 5 // 4)
  params = pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=limit)
  return pl.pallas_call(kernel, compiler_params=params, **kw)(*args)


def _forward(q, k, v, q_seg, kv_seg, *, causal, window, sm_scale, bq, bk, interpret):
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = n // kh
  qt, kt, vt, q_seg_p, kv_seg_p = _layout(q, k, v, q_seg, kv_seg, bq, bk)
  tp, sp = qt.shape[3], kt.shape[2]
  nq, nk = tp // bq, sp // bk
  offset = s - t

  # skipped blocks repeat the last (causal) or first (window) needed block: no DMA
  kv_block = functools.partial(_kv_index, bq=bq, bk=bk, offset=offset, causal=causal, window=window)
  kernel = functools.partial(
    _fwd_kernel,
    sm_scale=sm_scale,
    causal=causal,
    window=window,
    bq=bq,
    bk=bk,
    offset=offset,
    groups=g,
    num_k_blocks=nk,
  )
  out, lse = _pallas(
    kernel,
    _lane_ids(q_seg_p),
    _row_ids(kv_seg_p),
    qt,
    kt,
    vt,
    interpret=interpret,
    semantics=("parallel", "parallel", "parallel", "arbitrary"),
    tile_elems=bq * bk,
    grid=(b, kh, nq, nk),
    in_specs=[
      pl.BlockSpec((None, bq, LANES), lambda bi, hi, i, j: (bi, i, 0)),
      pl.BlockSpec((None, SUBLANES, bk), lambda bi, hi, i, j: (bi, 0, kv_block(i, j))),
      pl.BlockSpec((None, None, g, bq, h), lambda bi, hi, i, j: (bi, hi, 0, i, 0)),
      pl.BlockSpec((None, None, bk, h), lambda bi, hi, i, j: (bi, hi, kv_block(i, j), 0)),
      pl.BlockSpec((None, None, bk, h), lambda bi, hi, i, j: (bi, hi, kv_block(i, j), 0)),
    ],
    out_specs=[
      pl.BlockSpec((None, None, g, bq, h), lambda bi, hi, i, j: (bi, hi, 0, i, 0)),
      pl.BlockSpec((None, None, g, SUBLANES, bq), lambda bi, hi, i, j: (bi, hi, 0, 0, i)),
    ],
    out_shape=[
      jax.ShapeDtypeStruct(qt.shape, q.dtype),
      jax.ShapeDtypeStruct((b, kh, g, SUBLANES, tp), jnp.float32),
    ],
    scratch_shapes=[
      pltpu.VMEM((g, bq, LANES), jnp.float32),
      pltpu.VMEM((g, bq, LANES), jnp.float32),
      pltpu.VMEM((g, bq, h), jnp.float32),
    ],
    name="mqa_flash_fwd",
    cost_estimate=_cost(
      b=b,
      n=n,
      tp=tp,
      sp=sp,
      h=h,
      bq=bq,
      bk=bk,
      offset=offset,
      causal=causal,
      window=window,
      matmuls=2,
      exps=1,
      args=(qt, kt, vt),
      outs=(qt,),
    ),
  )
  return _unlayout_q(out, t), lse[..., 0, :]  # [B,T,N,H], [B,K,G,Tp]


# ---- backward -------------------------------------------------------------------------------
def _dq_kernel(
  q_seg_ref,
  kv_seg_ref,
  q_ref,
  k_ref,
  v_ref,
  do_ref,
  lse_ref,
  di_ref,
  dq_ref,
  dq_sc,
  *,
  sm_scale,
  causal,
  window,
  bq,
  bk,
  offset,
  groups,
  num_k_blocks,
):
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  run = _visits(i, j, bq=bq, bk=bk, offset=offset, causal=causal, window=window)

  @pl.when(run)
  def _compute():
    k, v = k_ref[...], v_ref[...]  # [bk, H]
    q_seg = jnp.tile(q_seg_ref[...], (1, bk // LANES))  # [bq, bk]
    mask = _mask(q_seg, kv_seg_ref[:1, :], i * bq + offset, j * bk, (bq, bk), causal, False, window)

    def head(g, carry):
      q, do = q_ref[g], do_ref[g]  # [bq, H]
      lse = jnp.expand_dims(lse_ref[g, 0], -1)  # [bq, 1]
      di = jnp.expand_dims(di_ref[g, 0], -1)  # [bq, 1]
      s = lax.dot_general(q, k, NT, preferred_element_type=jnp.float32) * sm_scale
      p = jnp.exp(jnp.where(mask, s, MASK_VALUE) - lse)  # [bq, bk]
      dp = lax.dot_general(do, v, NT, preferred_element_type=jnp.float32)  # [bq, bk]
      ds = p * (dp - di)
      dq_sc[g] += (
        lax.dot_general(ds.astype(k.dtype), k, NN, preferred_element_type=jnp.float32) * sm_scale
      )
      return carry

    lax.fori_loop(0, groups, head, None)

  @pl.when(j == num_k_blocks - 1)
  def _finish():
    dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def _dkv_kernel(
  kv_seg_ref,
  q_seg_ref,
  q_ref,
  k_ref,
  v_ref,
  do_ref,
  lse_ref,
  di_ref,
  dk_ref,
  dv_ref,
  dk_sc,
  dv_sc,
  *,
  sm_scale,
  causal,
  window,
  bq,
  bk,
  offset,
  groups,
  num_q_blocks,
):
  j, i = pl.program_id(2), pl.program_id(3)

  @pl.when(i == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  # Causal: skip query blocks that end before this key block starts; window: and those that
  # start after its last key's window ends.
  run = _visits(i, j, bq=bq, bk=bk, offset=offset, causal=causal, window=window)

  @pl.when(run)
  def _compute():
    k, v = k_ref[...], v_ref[...]  # [bk, H]
    kv_seg = jnp.tile(kv_seg_ref[...], (1, bq // LANES))  # [bk, bq]
    mask = _mask(q_seg_ref[:1, :], kv_seg, i * bq + offset, j * bk, (bk, bq), causal, True, window)

    def head(g, carry):
      q, do = q_ref[g], do_ref[g]  # [bq, H]
      lse, di = lse_ref[g, :1, :], di_ref[g, :1, :]  # [1, bq]
      st = lax.dot_general(k, q, NT, preferred_element_type=jnp.float32) * sm_scale  # [bk, bq]
      pt = jnp.exp(jnp.where(mask, st, MASK_VALUE) - lse)  # [bk, bq]
      dv_sc[...] += lax.dot_general(pt.astype(do.dtype), do, NN, preferred_element_type=jnp.float32)
      dpt = lax.dot_general(v, do, NT, preferred_element_type=jnp.float32)  # [bk, bq]
      dst = pt * (dpt - di)
      dk_sc[...] += (
        lax.dot_general(dst.astype(q.dtype), q, NN, preferred_element_type=jnp.float32) * sm_scale
      )
      return carry

    lax.fori_loop(0, groups, head, None)

  @pl.when(i == num_q_blocks - 1)
  def _finish():
    dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _backward(q, k, v, q_seg, kv_seg, out, lse, do, *, causal, window, sm_scale, bq, bk, interpret):
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = n // kh
  qt, kt, vt, q_seg_p, kv_seg_p = _layout(q, k, v, q_seg, kv_seg, bq, bk)
  tp, sp = qt.shape[3], kt.shape[2]
  dot, ot = _layout_q(do, kh, tp), _layout_q(out, kh, tp)
  nq, nk = tp // bq, sp // bk
  offset = s - t
  di = jnp.sum(ot.astype(jnp.float32) * dot.astype(jnp.float32), axis=-1)  # [B,K,G,Tp]
  common = dict(
    sm_scale=sm_scale, causal=causal, window=window, bq=bq, bk=bk, offset=offset, groups=g
  )
  kv_block = functools.partial(_kv_index, bq=bq, bk=bk, offset=offset, causal=causal, window=window)

  q_spec = pl.BlockSpec((None, None, g, bq, h), lambda bi, hi, i, j: (bi, hi, 0, i, 0))
  kv_spec = pl.BlockSpec((None, None, bk, h), lambda bi, hi, i, j: (bi, hi, kv_block(i, j), 0))
  col_spec = pl.BlockSpec((None, None, g, 1, bq), lambda bi, hi, i, j: (bi, hi, 0, 0, i))
  # the tiles both backward kernels visit: the forward's (causal and window skipping included)
  cost = functools.partial(
    _cost, b=b, n=n, tp=tp, sp=sp, h=h, bq=bq, bk=bk, offset=offset, causal=causal, window=window
  )
  dq = _pallas(
    functools.partial(_dq_kernel, num_k_blocks=nk, **common),
    _lane_ids(q_seg_p),
    _row_ids(kv_seg_p),
    qt,
    kt,
    vt,
    dot,
    lse[:, :, :, None, :],
    di[:, :, :, None, :],
    interpret=interpret,
    semantics=("parallel", "parallel", "parallel", "arbitrary"),
    tile_elems=bq * bk,
    grid=(b, kh, nq, nk),
    in_specs=[
      pl.BlockSpec((None, bq, LANES), lambda bi, hi, i, j: (bi, i, 0)),
      pl.BlockSpec((None, SUBLANES, bk), lambda bi, hi, i, j: (bi, 0, kv_block(i, j))),
      q_spec,
      kv_spec,
      kv_spec,
      q_spec,
      col_spec,
      col_spec,
    ],
    out_specs=q_spec,
    out_shape=jax.ShapeDtypeStruct(qt.shape, q.dtype),
    scratch_shapes=[pltpu.VMEM((g, bq, h), jnp.float32)],
    name="mqa_flash_dq",
    cost_estimate=cost(
      matmuls=3,
      exps=1,
      args=(qt, kt, vt, dot),
      outs=(qt,),
    ),
  )

  q_block = functools.partial(_q_index, bq=bq, bk=bk, offset=offset, causal=causal, window=window)

  q_spec2 = pl.BlockSpec((None, None, g, bq, h), lambda bi, hi, j, i: (bi, hi, 0, q_block(j, i), 0))
  kv_spec2 = pl.BlockSpec((None, None, bk, h), lambda bi, hi, j, i: (bi, hi, j, 0))
  row_spec = pl.BlockSpec(
    (None, None, g, SUBLANES, bq), lambda bi, hi, j, i: (bi, hi, 0, 0, q_block(j, i))
  )
  dk, dv = _pallas(
    functools.partial(_dkv_kernel, num_q_blocks=nq, **common),
    _lane_ids(kv_seg_p),
    _row_ids(q_seg_p),
    qt,
    kt,
    vt,
    dot,
    _row_ids(lse),
    _row_ids(di),
    interpret=interpret,
    semantics=("parallel", "parallel", "parallel", "arbitrary"),
    tile_elems=bq * bk,
    grid=(b, kh, nk, nq),
    in_specs=[
      pl.BlockSpec((None, bk, LANES), lambda bi, hi, j, i: (bi, j, 0)),
      pl.BlockSpec((None, SUBLANES, bq), lambda bi, hi, j, i: (bi, 0, q_block(j, i))),
      q_spec2,
      kv_spec2,
      kv_spec2,
      q_spec2,
      row_spec,
      row_spec,
    ],
    out_specs=[kv_spec2, kv_spec2],
    out_shape=[jax.ShapeDtypeStruct(kt.shape, k.dtype), jax.ShapeDtypeStruct(vt.shape, v.dtype)],
    scratch_shapes=[pltpu.VMEM((bk, h), jnp.float32), pltpu.VMEM((bk, h), jnp.float32)],
    name="mqa_flash_dkv",
    cost_estimate=cost(
      matmuls=4,
      exps=1,
      args=(qt, kt, vt, dot),
      outs=(kt, vt),
    ),
  )
  return (
    _unlayout_q(dq, t),
    dk[:, :, :s].transpose(0, 2, 1, 3),
    dv[:, :, :s].transpose(0, 2, 1, 3),
  )


# ---- public API -----------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10))
def _flash(q, k, v, q_seg, kv_seg, causal, window, sm_scale, bq, bk, interpret):
  return _forward(
    q,
    k,
    v,
    q_seg,
    kv_seg,
    causal=causal,
    window=window,
    sm_scale=sm_scale,
    bq=bq,
    bk=bk,
    interpret=interpret,
  )[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, causal, window, sm_scale, bq, bk, interpret):
  out, lse = _forward(
    q,
    k,
    v,
    q_seg,
    kv_seg,
    causal=causal,
    window=window,
    sm_scale=sm_scale,
    bq=bq,
    bk=bk,
    interpret=interpret,
  )
  return out, (q, k, v, q_seg, kv_seg, out, lse)


def _flash_bwd(causal, window, sm_scale, bq, bk, interpret, res, do):
  q, k, v, q_seg, kv_seg, out, lse = res
  dq, dk, dv = _backward(
    q,
    k,
    v,
    q_seg,
    kv_seg,
    out,
    lse,
    do,
    causal=causal,
    window=window,
    sm_scale=sm_scale,
    bq=bq,
    bk=bk,
    interpret=interpret,
  )
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def default_block_sizes(groups: int) -> tuple[int, int]:
  """(block_q, block_k). Many query heads per K/V tile already fill the MXU, and VMEM holds
  [G, bq, H] accumulators, so block_q shrinks as G grows."""
  return (128 if groups > 4 else 512), 512


def flash_attention(
  q,
  k,
  v,
  *,
  causal: bool = True,
  window: int | None = None,
  segment_ids=None,
  sm_scale: float | None = None,
  block_q: int | None = None,
  block_k: int | None = None,
  interpret: bool | None = None,
):
  """Multi-/grouped-query flash attention.

  Args:
    q: [B, T, N, H] queries; k, v: [B, S, K, H] with N % K == 0 (K=1: multi-query).
    causal: query t attends to keys s <= t + (S - T).
    window: sliding window (StarCoder2, Mistral), an int >= 1: query t also needs
      t + (S - T) - s < window, i.e. it sees itself and the window - 1 keys before it; key
      blocks entirely outside the window are neither computed nor fetched. None: unlimited.
    segment_ids: None, [B, T] (self-attention, T == S), or a pair ([B, T], [B, S]) of
      non-negative ints; queries attend only to keys of the same segment.
    sm_scale: score scale; default 1/sqrt(H).
    block_q, block_k: tile sizes, multiples of 128 (defaults from `default_block_sizes`);
      clamped to the padded sequence lengths.
    interpret: True: Pallas's interpreter; False: Mosaic; None (default): Mosaic when the
      target platform (`target_platform()`) is TPU, the interpreter otherwise.
  Returns:
    [B, T, N, H] in q's dtype.
  """
  b, t, n, h = q.shape
  if k.ndim != 4 or k.shape != v.shape or k.shape[0] != b or k.shape[3] != h:
    raise ValueError(
      f"flash_attention: k and v must be [B, S, K, H] matching q {q.shape}; "
      f"got {k.shape}, {v.shape}"
    )
  s, kh = k.shape[1], k.shape[2]
  if n % kh:
    raise ValueError(f"flash_attention: {n} query heads are not a multiple of {kh} kv heads")
  if causal and s < t:
    raise ValueError(f"flash_attention: causal attention needs S >= T, got T={t}, S={s}")
  if window is not None:
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1:
      raise ValueError(f"flash_attention: window must be an int >= 1 or None, got {window!r}")
    window = int(window)
  if segment_ids is None:
    q_seg, kv_seg = jnp.zeros((b, t), jnp.int32), jnp.zeros((b, s), jnp.int32)
  elif isinstance(segment_ids, (tuple, list)):
    q_seg, kv_seg = segment_ids
  else:
    if s != t:
      raise ValueError("flash_attention: one segment_ids array needs T == S; pass (q_ids, kv_ids)")
    q_seg = kv_seg = segment_ids
  dq_bq, dq_bk = default_block_sizes(n // kh)
  bq = min(block_q or dq_bq, _round_up(t, LANES))
  bk = min(block_k or dq_bk, _round_up(s, LANES))
  if bq % LANES or bk % LANES:
    raise ValueError(f"flash_attention: block sizes must be multiples of {LANES}, got {bq}, {bk}")
  scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(h)
  if interpret is None:
    interpret = target_platform() != "tpu"
  return _flash(q, k, v, q_seg, kv_seg, causal, window, scale, bq, bk, bool(interpret))

"""Batched autoregressive decoding with a multi-query KV cache.

    dec = Decoder.from_checkpoint("ckpt")
    [g] = dec.generate(["def add(a, b):\\n"], max_new_tokens=64, stop=["\\ndef "])
    g.text, g.finish_reason

Letters: L layers, B decode slots, S cache length per slot, C tokens per decode chunk, G
prompts in one prefill, P their prompt bucket, K kv heads (1 for StarCoder: the cache is N
times smaller than multi-head's), H head dim.

Continuous batching (`Batcher`; `Decoder.generate` and `rrtf serve`'s engine run on it): B
slots over one KV cache [L, B, S, K, H]. Each step of the host loop (1) starts waiting rows
in free slots: their distinct prompts are left-padded to a power-of-two bucket and prefilled
together (`admit`, compiled once per (G, P), never per prompt; positions come from the mask),
and each row copies its prompt's K/V into its slot, so the n samples of one prompt prefill
once; (2) runs one jitted `lax.while_loop` of up to C tokens (`decode_chunk`), every row
finishing on any of the EOS ids (config.eos_ids: Llama 3 and chat models have several) or its
own budget, the loop ending early when every row has; (3) extends each live row's text by its
new tokens (an incremental detokenizer, data/tokenizer.py: never the whole row again) and
checks the stop sequences (strings, which may span tokens and chunks); a row that hit one is
done, its text cut exactly before the first stop sequence. A finished row frees its slot at
that chunk boundary and the next step refills it, so no slot decodes a finished row while
work waits; while rows wait, a chunk also ends as soon as a row hits EOS or its budget
(`DecodeState.refill`). The last prefill is kept (`Prefill`), so samples of a prompt that find
slots later start from it. A chunk runs on the busy slots and the filled cache only
(`decode_window`). A slot's tokens sit from cache index 0 (its prompt, then what it
generated) with its own write index and position, so a row decodes exactly as it would alone.

Every family of model/families.py decodes here: RoPE rotates by the same mask-derived
positions learned tables look up, a sliding window hides the cache slots a new token may no
longer see (`window_mask`; prefill applies it inside the model), and the logits come from the
model's own LM head when it has one (`head_weights`).

Sampling per row: greedy (temperature 0), or temperature then top-k then top-p, with a key
folded from (seed, row seed, the row's own step): a row's tokens depend on its own seed, not
on which other rows share its batch or when it joined.

On CPU the decoder keeps each layer's parameters and KV cache as separate arrays
(`split_layers`, `init_state(per_layer=True)`) and runs the layers as one unrolled call each
(so its compile time grows with depth, unlike the scanned model's): a layer sliced out of the
stacked [L, ...] arrays inside the loop is a copy of its weights (or cache) at every step
there (XLA's CPU backend makes it; benchmarks/decode_step.py). Elsewhere the layers stay
stacked and scanned (`Decoder(split=)`). Under a mesh (`Decoder(..., mesh=)`), parameters keep
their sharding, the slots and cache shard over the batch axes and the model's logical
constraints apply, so a 15B model decodes with its weights spread over a host's chips.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from model.config import ModelConfig
from model.sharding import LOGICAL_RULES
from model.transformer import (
  Block,
  Transformer,
  _gathered,
  _norm,
  head_weights,
  lm_head,
  positions_from_segments,
)

MIN_PROMPT_BUCKET = 16
_CACHE_AXES = ("layers", "batch", "length", "kv", "head_dim")


# The KV cache is one [L, B, S, K, H] array per K and V, or, with the layers' parameters split
# (split_layers), a tuple of L [B, S, K, H] arrays: then no layer's cache is sliced out of the
# stack at every step either (a copy on CPU, like the weights', and S-sized).
def _per_layer(cache) -> bool:
  return isinstance(cache, (tuple, list))


def _constrain(cache):
  if _per_layer(cache):
    return tuple(nn.with_logical_constraint(c, _CACHE_AXES[1:]) for c in cache)
  return nn.with_logical_constraint(cache, _CACHE_AXES)


def _put_rows(cache, new, rows, index):
  """new [L, B, K, H]: row b's entry at cache index index[b] (past the cache: dropped)."""
  if _per_layer(cache):
    return tuple(
      c.at[rows, index].set(new[i].astype(c.dtype), mode="drop") for i, c in enumerate(cache)
    )
  return cache.at[:, rows, index].set(new.astype(cache.dtype), mode="drop")


def _put_slot(cache, slab, slot):
  """slab [L, 1, W, K, H]: slot `slot`'s first W entries."""
  if _per_layer(cache):
    return tuple(
      jax.lax.dynamic_update_slice(c, slab[i].astype(c.dtype), (slot, 0, 0, 0))
      for i, c in enumerate(cache)
    )
  return jax.lax.dynamic_update_slice(cache, slab.astype(cache.dtype), (0, slot, 0, 0, 0))


def _window(cache, rows: int, length: int):
  if _per_layer(cache):
    return tuple(c[:rows, :length] for c in cache)
  return cache[:, :rows, :length]


def _put_window(cache, part):
  if _per_layer(cache):
    return tuple(jax.lax.dynamic_update_slice(c, x, (0,) * c.ndim) for c, x in zip(cache, part))
  return jax.lax.dynamic_update_slice(cache, part, (0,) * cache.ndim)


@dataclasses.dataclass(frozen=True)
class Generation:
  tokens: list[int]  # generated ids, through the one that ended the row (EOS or a stop sequence)
  text: str  # decoded, EOS excluded, cut before the first stop sequence ("" without a tokenizer)
  finish_reason: str  # "stop" (EOS or a stop sequence) | "length" (max_new_tokens)
  prompt_tokens: int


@dataclasses.dataclass(frozen=True)
class Request:
  """One row: a prompt (text or token ids) and how to continue it."""

  prompt: str | Sequence[int]
  max_new_tokens: int = 256
  temperature: float = 0.0  # 0 = greedy
  top_p: float = 1.0
  top_k: int = 0  # 0 = off
  stop: tuple[str, ...] = ()
  seed: int = 0  # the row's seed, folded into the generator's


class DecodeState(struct.PyTreeNode):
  """The device side of B decode slots over one KV cache of S tokens per slot. A slot's tokens
  sit from cache index 0: its prompt (as prefill left it, rotated so the padding comes last,
  masked), then what it generated; `index` is where its next token's K/V go."""

  cache_k: jax.Array  # [L, B, S, K, H], or L arrays [B, S, K, H] (split layers)
  cache_v: jax.Array  # as cache_k
  cache_mask: jax.Array  # [B, S] int32, 1 where the cache holds a real token
  logits: jax.Array  # [B, V] fp32, for the next token
  positions: jax.Array  # [B] position of the next token
  index: jax.Array  # [B] cache index of the next token
  out: jax.Array  # [B, C] tokens generated in the current chunk (row i: its first n_i columns)
  lengths: jax.Array  # [B] tokens generated per row (its sampling step)
  done: jax.Array  # [B] bool: finished or free
  keys: jax.Array  # [B] PRNG keys
  temperature: jax.Array  # [B] fp32
  top_p: jax.Array  # [B] fp32
  top_k: jax.Array  # [B] int32
  max_new: jax.Array  # [B] int32
  step: jax.Array  # () int32, tokens generated in the current chunk (the loop index)
  refill: jax.Array  # () bool: rows wait for a slot, so a chunk ends as soon as a row finishes


def init_state(
  cfg: ModelConfig, *, slots: int, length: int, chunk: int, per_layer: bool = False
) -> DecodeState:
  """B = `slots` free slots (done) over a zeroed cache of `length` tokens each (`per_layer`:
  a tuple of L arrays, for split layers)."""
  b, dtype = slots, jnp.dtype(cfg.dtype)
  shape = (b, length, cfg.num_kv_heads, cfg.head_dim)
  if per_layer:
    cache = _constrain(tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)))
  else:
    cache = _constrain(jnp.zeros((cfg.num_layers, *shape), dtype))
  zeros_i = jnp.zeros((b,), jnp.int32)
  return DecodeState(
    cache_k=cache,
    cache_v=cache,
    cache_mask=jnp.zeros((b, length), jnp.int32),
    logits=nn.with_logical_constraint(
      jnp.zeros((b, cfg.vocab_size), jnp.float32), ("batch", "vocab")
    ),
    positions=zeros_i,
    index=zeros_i,
    out=jnp.zeros((b, chunk), jnp.int32),
    lengths=zeros_i,
    done=jnp.ones((b,), bool),
    keys=jax.random.split(jax.random.key(0), b),
    temperature=jnp.zeros((b,), jnp.float32),
    top_p=jnp.ones((b,), jnp.float32),
    top_k=zeros_i,
    max_new=zeros_i,
    step=jnp.zeros((), jnp.int32),
    refill=jnp.zeros((), bool),
  )


class Prefill(struct.PyTreeNode):
  """G prompts run through the model (`prefill_prompts`), kept so that later rows of the same
  prompts start without running them again: each prompt's K/V rotated so its tokens start at
  index 0 (the padding last, masked), its last logits and its length."""

  k: jax.Array  # [L, G, W, K, H], W = min(P, S)
  v: jax.Array  # [L, G, W, K, H]
  mask: jax.Array  # [G, W] int32
  logits: jax.Array  # [G, V] fp32
  lens: jax.Array  # [G] int32


def prefill_prompts(params, cfg: ModelConfig, tokens, mask, *, width: int) -> Prefill:
  """Runs G left-padded prompts (tokens, mask [G, P]) through the model; keeps the first `width`
  cache entries of each (its tokens and no more need fit). Compiles once per (G, P)."""
  p = tokens.shape[1]
  seg = mask.astype(jnp.int32)
  hidden, (k, v) = _model(params, cfg, tokens, seg, positions_from_segments(seg))
  lens = seg.sum(-1).astype(jnp.int32)
  order = ((jnp.arange(p)[None] + (p - lens)[:, None]) % p)[:, :width]  # [G, W]
  return Prefill(
    k=jnp.take_along_axis(k, order[None, :, :, None, None], axis=2),
    v=jnp.take_along_axis(v, order[None, :, :, None, None], axis=2),
    mask=jnp.take_along_axis(seg, order, axis=1),
    logits=_head(params, cfg, hidden[:, -1]),
    lens=lens,
  )


def insert(
  state: DecodeState, pre: Prefill, src, dst, count, keys, temperature, top_p, top_k, max_new
) -> DecodeState:
  """Starts `count` rows: row r (of src, dst, keys, ... [R], padded past `count` with dst = B,
  which is dropped) copies prompt src[r]'s K/V into slot dst[r] and decodes from its logits.
  The n samples of one prompt share its prefill (src repeats)."""

  def copy(r, carry):
    ck, cv, cm = carry
    s, d = src[r], dst[r]
    ck = _put_slot(ck, jax.lax.dynamic_slice_in_dim(pre.k, s, 1, axis=1), d)
    cv = _put_slot(cv, jax.lax.dynamic_slice_in_dim(pre.v, s, 1, axis=1), d)
    row = jnp.zeros((1, cm.shape[1]), jnp.int32)
    row = jax.lax.dynamic_update_slice(row, jax.lax.dynamic_slice_in_dim(pre.mask, s, 1), (0, 0))
    cm = jax.lax.dynamic_update_slice(cm, row, (d, 0))
    return ck, cv, cm

  cache_k, cache_v, cache_mask = jax.lax.fori_loop(
    0, count, copy, (state.cache_k, state.cache_v, state.cache_mask)
  )

  def put(field, values):
    return getattr(state, field).at[dst].set(values, mode="drop")

  n = pre.lens[src]
  return state.replace(
    cache_k=_constrain(cache_k),
    cache_v=_constrain(cache_v),
    cache_mask=cache_mask,
    logits=put("logits", pre.logits[src]),
    positions=put("positions", n),
    index=put("index", n),
    lengths=put("lengths", jnp.zeros_like(n)),
    done=put("done", jnp.zeros(n.shape, bool)),
    keys=put("keys", keys),
    temperature=put("temperature", temperature),
    top_p=put("top_p", top_p),
    top_k=put("top_k", top_k),
    max_new=put("max_new", max_new),
  )


def admit(params, cfg: ModelConfig, state: DecodeState, tokens, mask, *rows):
  """prefill_prompts then insert, in one call: -> (state, the Prefill, for later rows)."""
  pre = prefill_prompts(
    params, cfg, tokens, mask, width=min(tokens.shape[1], state.cache_mask.shape[1])
  )
  return insert(state, pre, *rows), pre


def window_mask(cache_mask, idx, window: int | None):
  """The cache mask [B, S] a new token at cache index `idx` (scalar or [B]) attends through:
  with a sliding window, only slots s with idx - s < window (it sees itself, passed apart from
  the cache, and the window - 1 tokens before it). A row's cache slots are consecutive positions
  (its prompt, then its generated tokens), so slot distance is position distance."""
  if window is None:
    return cache_mask
  idx = jnp.asarray(idx).reshape(-1, 1)
  slots = jnp.arange(cache_mask.shape[1], dtype=jnp.int32)[None]
  return jnp.where(idx - slots < window, cache_mask, 0)


def decode_chunk(
  params,
  cfg: ModelConfig,
  state: DecodeState,
  *,
  eos_ids: tuple[int, ...],
  pad_id: int,
) -> DecodeState:
  """Generates up to C (= state.out's width) tokens per live row, until the chunk is full,
  every row is done, or (state.refill: rows wait for a slot) a row finishes (a
  `lax.while_loop`); row i's tokens of this chunk are out[i, :n_i], n_i how much lengths[i]
  grew. A row ends on any of `eos_ids` (none: only on its token budget)."""
  b, c = state.out.shape
  rows = jnp.arange(b)

  started = state.done

  def cond(st):
    # with rows waiting, a row that finishes ends the chunk, so its slot is refilled at once
    ended = st.refill & jnp.any(st.done & ~started)
    return (st.step < c) & ~jnp.all(st.done) & ~ended

  def body(st):
    tok = sample_tokens(st.logits, st.keys, st.lengths, st.temperature, st.top_p, st.top_k)
    live = ~st.done
    tok = jnp.where(live, tok, pad_id)
    out = jax.lax.dynamic_update_slice(st.out, tok[:, None], (0, st.step))
    lengths = st.lengths + live.astype(jnp.int32)
    done = st.done | (lengths >= st.max_new)
    for e in eos_ids:
      done = done | (tok == e)
    hidden, (k, v) = _model(
      params,
      cfg,
      tok[:, None],
      jnp.ones((b, 1), jnp.int32),
      st.positions[:, None],
      (st.cache_k, st.cache_v, window_mask(st.cache_mask, st.index, cfg.sliding_window)),
    )
    # each row writes at its own index; a full row's index is past the cache, and dropped
    cache_k = _put_rows(st.cache_k, k[:, :, 0], rows, st.index)
    cache_v = _put_rows(st.cache_v, v[:, :, 0], rows, st.index)
    cache_mask = st.cache_mask.at[rows, st.index].set(live.astype(jnp.int32), mode="drop")
    step_on = live.astype(jnp.int32)
    return st.replace(
      cache_k=_constrain(cache_k),
      cache_v=_constrain(cache_v),
      cache_mask=cache_mask,
      logits=_head(params, cfg, hidden[:, 0]),
      positions=st.positions + step_on,
      index=st.index + step_on,
      out=out,
      lengths=lengths,
      done=done,
      step=st.step + 1,
    )

  return jax.lax.while_loop(cond, body, state.replace(step=jnp.zeros((), jnp.int32)))


def sample_tokens(logits, keys, step, temperature, top_p, top_k):
  """[B, V] fp32 logits -> [B] tokens: greedy where temperature == 0, else temperature, top-k
  (0 = off), top-p (the smallest set of tokens whose probability reaches p), categorical.

  The sort that top-k/top-p need (the costliest part of a small model's step) runs only when
  some row asks for them, and nothing but an argmax runs when every row is greedy."""
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  sampling = temperature > 0

  def draw(_):
    scaled = logits / jnp.where(sampling, temperature, 1.0)[:, None]
    filtered = jax.lax.cond(
      jnp.any(sampling & ((top_p < 1) | (top_k > 0))),
      lambda x: _top_k_top_p(x, top_p, top_k),
      lambda x: x,
      scaled,
    )
    steps = jnp.broadcast_to(jnp.asarray(step, jnp.int32), keys.shape)  # per row, or one for all
    row_keys = jax.vmap(jax.random.fold_in)(keys, steps)
    sampled = jax.vmap(jax.random.categorical)(row_keys, filtered).astype(jnp.int32)
    return jnp.where(sampling, sampled, greedy)

  return jax.lax.cond(jnp.any(sampling), draw, lambda _: greedy, None)


def _top_k_top_p(scaled, top_p, top_k):
  """Logits outside each row's top-k, then outside its top-p nucleus, set to -inf."""
  v = scaled.shape[-1]
  desc = -jnp.sort(-scaled, axis=-1)  # [B, V]
  rank = jnp.arange(v)[None]
  k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)[:, None]
  desc = jnp.where(rank < k, desc, -jnp.inf)
  probs = jax.nn.softmax(desc, axis=-1)
  keep = (jnp.cumsum(probs, axis=-1) - probs < top_p[:, None]) & (rank < k)  # the top token always
  n_keep = jnp.maximum(keep.sum(-1, keepdims=True), 1)
  threshold = jnp.take_along_axis(desc, n_keep - 1, axis=-1)  # [B, 1]
  return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def _head(params, cfg: ModelConfig, hidden):
  """The LM head (the tied `wte` or the model's own `lm_head`) on [B, D] hidden states ->
  [B, V] fp32 logits (as Transformer computes them)."""
  table, scale = head_weights(params)
  logits = lm_head(hidden, table, scale, dtype=jnp.dtype(cfg.dtype))
  return nn.with_logical_constraint(logits, ("batch", "vocab"))


def split_layers(params) -> dict:
  """params with the stacked layer tree `h` ([L, ...] leaves) replaced by a tuple of L per-layer
  trees: the form Decoder keeps. Inside a jitted loop, a layer sliced out of a stacked array is a
  copy of its weights, made again at every step (XLA's CPU backend copies the dynamic slice a
  `scan` takes before each dot); per-layer arrays feed the dots directly. A tree already split
  is returned as it is."""
  h = params["h"]
  if isinstance(h, (tuple, list)):
    return params
  n = jax.tree.leaves(h)[0].shape[0]
  return {**params, "h": tuple(jax.tree.map(lambda x, i=i: _layer(x, i), h) for i in range(n))}


def _layer(x, i: int):
  """Layer i of a stacked leaf; of an abstract one (jax.ShapeDtypeStruct, as `rrtf plan`
  lowers with), the abstract per-layer leaf, its sharding without the layers axis."""
  if not isinstance(x, jax.ShapeDtypeStruct):
    return x[i]
  sharding = x.sharding
  if isinstance(sharding, jax.sharding.NamedSharding):
    sharding = jax.sharding.NamedSharding(
      sharding.mesh, jax.sharding.PartitionSpec(*tuple(sharding.spec)[1:])
    )
  return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sharding)


def stack_layers(params) -> dict:
  """The inverse of split_layers: the stacked tree the model (`Transformer.apply`) takes."""
  h = params["h"]
  if not isinstance(h, (tuple, list)):
    return params
  return {**params, "h": jax.tree.map(lambda *xs: jnp.stack(xs), *h)}


def _forward(params, cfg: ModelConfig, tokens, segment_ids, positions, cache=None):
  """Transformer(cfg)(..., return_hidden=True, return_kv=True) on split params (split_layers):
  the same computation, its layers one Python-unrolled call each, so every dot reads its layer's
  own weight arrays. -> (hidden [B, T, D], (k, v) [L, B, T, K, H] each)."""
  dtype = jnp.dtype(cfg.dtype)
  wte, wte_scale = params["wte"], params.get("wte_scale")
  x = jnp.take(_gathered(wte, "vocab", dtype), tokens, axis=0).astype(dtype)
  if wte_scale is not None:
    x = x * jnp.take(wte_scale.astype(dtype), tokens, axis=0)[..., None]
  if cfg.position_embedding == "learned":
    x = x + jnp.take(_gathered(params["wpe"], "length", dtype), positions, axis=0)
  x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
  block = Block(cfg, return_kv=True)
  ks, vs = [], []
  for i, layer in enumerate(params["h"]):
    cache_kv = None if cache is None else (cache[0][i], cache[1][i])
    x, (k, v) = block.apply(
      {"params": layer}, x, segment_ids, positions, cache_kv, None if cache is None else cache[2]
    )
    ks.append(k)
    vs.append(v)
  x = _norm(cfg, "ln_f").apply({"params": params["ln_f"]}, x)
  return x, (jnp.stack(ks), jnp.stack(vs))


def _model(params, cfg: ModelConfig, tokens, segment_ids, positions, cache=None):
  """(hidden, (k, v)) of the model on stacked or split params."""
  if isinstance(params["h"], (tuple, list)):
    return _forward(params, cfg, tokens, segment_ids, positions, cache)
  return Transformer(cfg).apply(
    {"params": params},
    tokens,
    segment_ids=segment_ids,
    positions=positions,
    cache=cache,
    return_hidden=True,
    return_kv=True,
  )


def decode_window(
  params,
  cfg: ModelConfig,
  state: DecodeState,
  *,
  rows: int,
  length: int,
  eos_ids: tuple[int, ...],
  pad_id: int,
) -> DecodeState:
  """decode_chunk on the first `rows` slots and `length` cache entries only (every live row
  in them, its next chunk fitting), written back in place: a step then costs what the busy
  slots and their lengths need, not the whole cache. Compiles once per (rows, length)."""
  b, s = state.cache_mask.shape
  if (rows, length) == (b, s):
    return decode_chunk(params, cfg, state, eos_ids=eos_ids, pad_id=pad_id)

  def part(x):
    return x if x.ndim == 0 else x[:rows]

  sub = jax.tree.map(part, state).replace(
    cache_k=_window(state.cache_k, rows, length),
    cache_v=_window(state.cache_v, rows, length),
    cache_mask=state.cache_mask[:rows, :length],
  )
  sub = decode_chunk(params, cfg, sub, eos_ids=eos_ids, pad_id=pad_id)

  def back(full, x):
    return x if full.ndim == 0 else jax.lax.dynamic_update_slice(full, x, (0,) * full.ndim)

  out = jax.tree.map(
    back,
    state.replace(cache_k=None, cache_v=None, cache_mask=None),
    sub.replace(cache_k=None, cache_v=None, cache_mask=None),
  )
  return out.replace(
    cache_k=_put_window(state.cache_k, sub.cache_k),
    cache_v=_put_window(state.cache_v, sub.cache_v),
    cache_mask=jax.lax.dynamic_update_slice(state.cache_mask, sub.cache_mask, (0, 0)),
  )


def _bucket(n: int, minimum: int) -> int:
  return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def _cut(text: str, stop: Sequence[str]) -> int | None:
  """Index of the earliest stop sequence in text, or None."""
  hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
  return min(hits) if hits else None


@dataclasses.dataclass(frozen=True)
class Update:
  """What one decode chunk did for one row: `text` so far (held back where a stop sequence may
  still begin; "" unless the row streams or has stop sequences), `new_tokens` it generated, and
  its Generation once it has finished."""

  key: Any
  text: str
  new_tokens: int
  generation: Generation | None = None


@dataclasses.dataclass(eq=False)
class _Row:
  key: Any
  req: Request
  ids: list[int]
  budget: int
  stream: bool
  tokens: list[int] = dataclasses.field(default_factory=list)
  detok: Any = None  # IncrementalDetokenizer, for rows that stream or have stop sequences
  slot: int = -1


class Batcher:
  """Continuous batching over a Decoder: `slots` decode slots over one KV cache of `length`
  tokens per slot. `add` queues a row; each `step` first starts waiting rows in the free slots
  (rows with the same prompt share one prefill), then runs one decode chunk and returns an
  Update per row that ran. A row that ends (EOS, a stop sequence, its budget) or is cancelled
  frees its slot for the next step's waiting rows, so no slot decodes a finished row while
  work waits. A row's tokens do not depend on the other rows (its sampling key is folded from
  its own seed and step, and its cache slot holds only its own tokens)."""

  def __init__(self, decoder: "Decoder", *, slots: int, length: int, max_prefill: int = 8192):
    self.decoder, self.slots, self.length = decoder, int(slots), int(length)
    self.max_prefill = int(max_prefill)  # prompt tokens (batch x bucket) one prefill may take
    self.waiting: collections.deque[_Row] = collections.deque()
    self.running: dict[int, _Row] = {}  # slot -> row
    self._stale: set[int] = set()  # free slots the device still decodes (stopped or cancelled)
    with decoder._context():
      self.state = decoder._init(
        decoder.config,
        slots=self.slots,
        length=self.length,
        chunk=decoder.chunk,
        per_layer=isinstance(decoder.layer_params["h"], tuple),
      )
    self._base = jax.random.key(decoder.seed)
    self._kept = None  # (prompt ids -> row, Prefill) of the last prefill
    self._refill = False  # the state's refill flag, as last set

  @property
  def busy(self) -> int:
    return len(self.running)

  def room(self, request: Request, ids: Sequence[int]) -> int:
    """The row's budget: max_new_tokens, capped where the model's context (or the cache) ends;
    ValueError when its prompt leaves no room."""
    limit = min(self.decoder.config.max_position_embeddings, self.length)
    if len(ids) >= limit:
      raise ValueError(
        f"prompt of {len(ids)} tokens leaves no room in the decoder's {limit} positions"
      )
    return min(request.max_new_tokens, limit - len(ids))

  def add(self, key, request: Request, ids: list[int] | None = None, *, stream: bool = False):
    """Queues one row (ValueError for a request the decoder refuses or this cache cannot hold)."""
    ids = self.decoder.validate(request) if ids is None else ids
    budget = self.room(request, ids)
    want_text = stream or bool(request.stop)
    self.waiting.append(_Row(key, request, list(ids), budget, want_text))

  def cancel(self, keys) -> None:
    """Drops the rows with these keys: from the queue, or from their slots (freed now, and
    no longer decoded from the next step)."""
    keys = set(keys)
    self.waiting = collections.deque(r for r in self.waiting if r.key not in keys)
    for slot, row in list(self.running.items()):
      if row.key in keys:
        del self.running[slot]
        self._stale.add(slot)

  def step(self) -> list[Update]:
    self._admit()
    if not self.running:
      return []
    dec = self.decoder
    with dec._context():
      if self._refill != bool(self.waiting):
        self._refill = bool(self.waiting)
        self.state = self.state.replace(refill=dec._put(np.asarray(self._refill), False))
      if self._stale:
        done = np.array(self.state.done)
        done[list(self._stale)] = True
        self.state = self.state.replace(done=dec._put(done))
        self._stale.clear()
      self.state = dec._decode(
        dec.layer_params,
        dec.config,
        self.state,
        **self._window(),
        eos_ids=dec.eos_ids,
        pad_id=dec.pad_id,
      )
    out, lengths, done = (
      np.asarray(x) for x in (self.state.out, self.state.lengths, self.state.done)
    )
    updates = []
    for slot, row in sorted(self.running.items()):
      new = int(lengths[slot]) - len(row.tokens)
      row.tokens.extend(out[slot, :new].tolist())
      updates.append(self._update(row, new, bool(done[slot])))
      if updates[-1].generation is not None:
        del self.running[slot]
        if not done[slot]:
          self._stale.add(slot)
    return updates

  def _window(self) -> dict:
    """The slots and cache entries the next chunk needs: through the highest busy slot, and
    through the longest busy row's next chunk, each a power of two (so few compile). Under a
    mesh every slot runs (a slice of the sharded batch axis would move rows between devices)."""
    dec = self.decoder
    rows = self.slots
    if dec.mesh is None:
      rows = min(self.slots, _bucket(max(self.running) + 1, 1))
    need = max(len(r.ids) + len(r.tokens) for r in self.running.values()) + dec.chunk
    return {"rows": rows, "length": min(self.length, _bucket(need, MIN_PROMPT_BUCKET))}

  def _update(self, row: _Row, new: int, done: bool) -> Update:
    dec, stop = self.decoder, row.req.stop
    text = ""
    if row.stream and dec.tokenizer is not None:
      if row.detok is None:
        from data.tokenizer import IncrementalDetokenizer

        row.detok = IncrementalDetokenizer(dec.tokenizer)
      toks = row.tokens[:-1] if row.tokens and row.tokens[-1] in dec.eos_ids else row.tokens
      text = row.detok.extend(toks[len(row.detok.ids) :])
    stopped = None
    if stop and _cut(text, stop) is not None:
      stopped = dec._stop_prefix(row.tokens, stop)
    if not (done or stopped is not None):
      hold = max((len(s) for s in stop), default=1) - 1
      safe = text[: len(text) - hold] if hold else text
      return Update(row.key, safe.rstrip("\ufffd"), new)  # an incomplete character waits too
    toks = row.tokens if stopped is None else row.tokens[:stopped]
    full = dec._text(toks)
    cut = _cut(full, stop) if stop else None
    ended = stopped is not None or bool(toks and toks[-1] in dec.eos_ids)
    gen = Generation(
      tokens=toks,
      text=full if cut is None else full[:cut],
      finish_reason="stop" if ended else "length",
      prompt_tokens=len(row.ids),
    )
    return Update(row.key, gen.text, new, gen)

  def _admit(self) -> None:
    """Starts waiting rows in free slots, in queue order. Rows whose prompt the last prefill
    ran start from it (the n samples of a prompt that do not all find a slot at once still
    prefill it once); the others are prefilled together, one group of distinct prompts per call
    (at most max_prefill prompt tokens, unless one prompt alone is longer)."""
    free = [s for s in range(self.slots) if s not in self.running]
    while free and self.waiting:
      kept, pre = self._kept if self._kept is not None else ({}, None)
      rows: list[tuple[_Row, int]] = []
      if tuple(self.waiting[0].ids) in kept:
        while free and self.waiting and tuple(self.waiting[0].ids) in kept:
          row = self.waiting.popleft()
          row.slot = free.pop(0)
          rows.append((row, kept[tuple(row.ids)]))
        self._start(rows, pre=pre)
        continue
      prompts: dict[tuple, int] = {}  # prompt ids -> its row in the prefill batch
      while free and self.waiting:
        row = self.waiting[0]
        key = tuple(row.ids)
        if key not in prompts:
          longest = max([len(row.ids)] + [len(p) for p in prompts])
          g = _bucket(len(prompts) + 1, 1)
          if prompts and g * _bucket(longest, MIN_PROMPT_BUCKET) > self.max_prefill:
            break
          prompts[key] = len(prompts)
        self.waiting.popleft()
        row.slot = free.pop(0)
        rows.append((row, prompts[key]))
      self._start(rows, prompts=list(prompts))

  def _start(self, rows: list[tuple[_Row, int]], *, prompts=None, pre=None) -> None:
    """Rows (row, its prompt's index) into their slots: from `pre` (a kept Prefill), or from a
    prefill of `prompts`, which is then kept."""
    dec = self.decoder
    n = len(rows)
    r = self.slots  # one shape for every admission: rows past `n` go to slot B (dropped)

    def col(values, dtype, fill=0):
      return jnp.asarray(np.array(list(values) + [fill] * (r - n), dtype))

    reqs = [row.req for row, _ in rows]
    seeds = col((q.seed for q in reqs), np.uint32)
    args = (
      col((j for _, j in rows), np.int32),
      col((row.slot for row, _ in rows), np.int32, fill=self.slots),
      jnp.asarray(n, jnp.int32),
      jax.vmap(lambda s: jax.random.fold_in(self._base, s))(seeds),
      col((q.temperature for q in reqs), np.float32),
      col((q.top_p for q in reqs), np.float32, fill=1),
      col((q.top_k for q in reqs), np.int32),
      col((row.budget for row, _ in rows), np.int32),
    )
    with dec._context():
      if pre is not None:
        self.state = dec._insert(self.state, pre, *args)
      else:
        g = _bucket(len(prompts), 1)
        p = min(
          _bucket(max(map(len, prompts)), MIN_PROMPT_BUCKET), dec.config.max_position_embeddings
        )
        tokens = np.full((g, p), dec.pad_id, np.int32)
        mask = np.zeros((g, p), np.int32)
        for i, ids in enumerate(prompts):
          tokens[i, p - len(ids) :] = ids
          mask[i, p - len(ids) :] = 1
        self.state, pre = dec._admit(
          dec.layer_params, dec.config, self.state, dec._put(tokens), dec._put(mask), *args
        )
        self._kept = ({key: i for i, key in enumerate(prompts)}, pre)
    for row, _ in rows:
      self.running[row.slot] = row
      self._stale.discard(row.slot)


class Decoder:
  """Batched generation for one model: jitted prefill and decode loop, host-side stop checks.

  Args:
    config: the model's config (dtype etc. as it should run).
    params: its parameters (sharded already when `mesh` is given), stacked as the model takes
      them or split per layer (`split_layers`); the decoder keeps them as `split` says
      (`layer_params`), and `params` gives them stacked (a copy where they are split).
    tokenizer: data.tokenizer object; needed for text prompts, texts and stop sequences.
    mesh: optional jax Mesh; calls run under it with the logical rules of model/sharding.py.
    chunk: tokens per decode-loop call; stop sequences are checked between calls.
    max_batch: rows decoded together; batches are padded to a power of two up to this.
    seed: the generator's seed; each row folds its own `Request.seed` into it.
    split: keep the layers as separate arrays (`split_layers`); None (the default): where the
      parameters live on CPU, whose XLA backend copies each layer's weights out of the stack at
      every step. On TPU the scanned stack costs no copy (`rrtf plan --decode` measures no
      kernel-sized temporaries), and the unrolled layers' program measured more (34 MiB for
      int8 StarCoder-15B on one v5e, against 1.3 MiB), so the stack stays there.
  """

  def __init__(
    self,
    config: ModelConfig,
    params,
    tokenizer=None,
    *,
    mesh=None,
    chunk: int = 32,
    max_batch: int = 16,
    seed: int = 0,
    split: bool | None = None,
  ):
    self.config, self.tokenizer, self.mesh = config, tokenizer, mesh
    if split is None:
      leaf = jax.tree.leaves(params)[0]
      devices = leaf.devices() if isinstance(leaf, jax.Array) else jax.devices()
      split = all(d.platform == "cpu" for d in devices)
    # split: the layers as separate arrays (split_layers), so no step copies a layer's weights
    self.layer_params = split_layers(params) if split else stack_layers(params)
    self.chunk, self.max_batch, self.seed = int(chunk), int(max_batch), int(seed)
    # Every id that ends a row: the config's (eos_token_id, then extra_eos_token_ids: Llama 3
    # and chat models end a turn on more than one), else the tokenizer's EOS.
    tok_eos = getattr(tokenizer, "eos_id", None)
    self.eos_ids = config.eos_ids or (() if tok_eos is None else (int(tok_eos),))
    self.eos_id = self.eos_ids[0] if self.eos_ids else None  # the first: it pads, by default
    self.pad_id = config.replace(eos_token_id=self.eos_id).pad_id
    self._init = jax.jit(
      init_state, static_argnames=("cfg", "slots", "length", "chunk", "per_layer")
    )
    self._admit = jax.jit(admit, static_argnames=("cfg",), donate_argnums=(2,))
    self._insert = jax.jit(insert, donate_argnums=(0,))
    self._decode = jax.jit(
      decode_window,
      static_argnames=("cfg", "rows", "length", "eos_ids", "pad_id"),
      donate_argnums=(2,),
    )

  @property
  def params(self):
    """The parameters as the model takes them (stacked layers; a copy of the weights)."""
    return stack_layers(self.layer_params)

  @classmethod
  def from_checkpoint(cls, path: str, *, mesh=None, dtype: str | None = None, **kw) -> "Decoder":
    """Loads a checkpoint (sharded over `mesh` when given) and its tokenizer, if it has one."""
    from data.tokenizer import resolve_tokenizer
    from model.checkpoint import load_checkpoint, read_config, tokenizer_path
    from model.sharding import logical_to_sharding
    from model.transformer import abstract_params

    cfg = read_config(path)
    if dtype:
      cfg = cfg.replace(dtype=dtype)
    shardings = None
    if mesh is not None:
      with nn.logical_axis_rules(LOGICAL_RULES):
        shardings = logical_to_sharding(abstract_params(cfg), mesh)
    _, params = load_checkpoint(path, shardings=shardings)
    tok_dir = tokenizer_path(path)  # local or gs://
    return cls(cfg, params, resolve_tokenizer(tok_dir) if tok_dir else None, mesh=mesh, **kw)

  def encode(self, prompt: str | Sequence[int]) -> list[int]:
    if isinstance(prompt, str):
      if self.tokenizer is None:
        raise ValueError(
          "text prompts need a tokenizer; pass token ids or a checkpoint with tokenizer/"
        )
      from data.tokenizer import encode_prompt

      ids = encode_prompt(self.tokenizer, prompt)
    else:
      ids = [int(t) for t in prompt]
    if not ids:  # an empty prompt starts from BOS
      ids = [self.config.bos_token_id if self.config.bos_token_id is not None else self.pad_id]
    limit = self.config.max_position_embeddings
    if len(ids) >= limit:
      raise ValueError(
        f"prompt of {len(ids)} tokens leaves no room in the model's {limit} positions"
      )
    return ids

  def validate(self, r: Request) -> list[int]:
    """Checks one request (ValueError naming what is wrong) and returns its prompt's ids."""
    if r.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be at least 1, got {r.max_new_tokens}")
    if (
      not (math.isfinite(r.temperature) and r.temperature >= 0)
      or not 0 < r.top_p <= 1
      or r.top_k < 0
    ):
      raise ValueError(
        f"bad sampling settings: temperature={r.temperature} (>= 0), top_p={r.top_p} "
        f"(in (0, 1]), top_k={r.top_k} (>= 0)"
      )
    if not 0 <= r.seed < 2**32:
      raise ValueError(f"seed must be in [0, 2**32), got {r.seed}")
    if r.stop and self.tokenizer is None:
      raise ValueError("stop sequences need a checkpoint with a tokenizer")
    ids = self.encode(r.prompt)
    vocab = self.config.vocab_size
    if not all(0 <= t < vocab for t in ids):
      raise ValueError(f"prompt token ids must be in [0, {vocab})")
    return ids

  def generate(
    self,
    requests: Sequence[Request | str],
    *,
    on_chunk: Callable | None = None,
    on_batch: Callable | None = None,
    **defaults,
  ) -> list[Generation]:
    """Generations for `requests` (Request objects, or prompts with `defaults` as Request fields),
    in order, continuously batched (`Batcher`) over min(max_batch, len(requests)) slots, shortest
    prompts first, identical prompts prefilled once. `on_chunk(i, text, finished)` is called
    after every chunk for each live row i with its text so far, held back where a stop sequence
    might still begin (for streaming); `on_batch(rows)` as rows finish (a progress bar)."""
    reqs = [r if isinstance(r, Request) else Request(r, **defaults) for r in requests]
    ids = [self.validate(r) for r in reqs]
    if not reqs:
      return []
    limit = self.config.max_position_embeddings
    need = max(len(row) + min(r.max_new_tokens, limit - len(row)) for r, row in zip(reqs, ids))
    batcher = Batcher(
      self,
      slots=min(_bucket(len(reqs), 1), self.max_batch),
      length=min(_bucket(need, MIN_PROMPT_BUCKET), limit),
    )
    for i in sorted(range(len(reqs)), key=lambda i: (len(ids[i]), ids[i], i)):
      batcher.add(i, reqs[i], ids[i], stream=on_chunk is not None)
    results: list[Generation | None] = [None] * len(reqs)
    while batcher.busy or batcher.waiting:
      finished = 0
      for u in batcher.step():
        if on_chunk is not None:
          on_chunk(u.key, u.text, u.generation is not None)
        if u.generation is not None:
          results[u.key] = u.generation
          finished += 1
      if on_batch is not None and finished:
        on_batch(finished)
    return results

  # ---- device calls ----------------------------------------------------------------------------
  def _put(self, x, batch_axis: bool = True):
    x = jnp.asarray(x)
    if self.mesh is None:
      return x
    from jax.sharding import NamedSharding, PartitionSpec

    with nn.logical_axis_rules(LOGICAL_RULES):
      spec = (
        nn.logical_to_mesh_axes(("batch",) + (None,) * (x.ndim - 1))
        if batch_axis
        else PartitionSpec()
      )
    axes = spec[0] if len(spec) else None
    axes = () if axes is None else axes if isinstance(axes, tuple) else (axes,)
    if x.ndim == 0 or x.shape[0] % math.prod(self.mesh.shape[a] for a in axes):
      spec = PartitionSpec()  # a batch the batch axes do not divide stays replicated
    return jax.device_put(x, NamedSharding(self.mesh, spec))

  def _context(self):
    import contextlib

    stack = contextlib.ExitStack()
    if self.mesh is not None:
      stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nn.logical_axis_rules(LOGICAL_RULES))
    return stack

  def _text(self, tokens: Sequence[int]) -> str:
    if self.tokenizer is None:
      return ""
    if tokens and tokens[-1] in self.eos_ids:
      tokens = tokens[:-1]
    return self.tokenizer.decode(tokens)

  def _stop_prefix(self, toks: list[int], stop: Sequence[str]) -> int:
    """The fewest leading tokens whose text already contains a stop sequence (binary search:
    a longer prefix's text contains a shorter one's)."""
    lo, hi = 1, len(toks)
    while lo < hi:
      mid = (lo + hi) // 2
      if _cut(self._text(toks[:mid]), stop) is not None:
        hi = mid
      else:
        lo = mid + 1
    return hi

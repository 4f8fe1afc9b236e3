"""Batched autoregressive decoding with a multi-query KV cache.

    dec = Decoder.from_checkpoint("ckpt")
    [g] = dec.generate(["def add(a, b):\\n"], max_new_tokens=64, stop=["\\ndef "])
    g.text, g.finish_reason

Letters: L layers, B batch, P prompt bucket, S = P + M cache length, M new-token bucket,
K kv heads (1 for StarCoder: the cache is N times smaller than multi-head's), H head dim.

Prompts are left-padded to a power-of-two length bucket, so prefill compiles once per
(batch bucket, prompt bucket, M) and the decode loop once per (batch bucket, S): never per
prompt. Positions come from the mask (real tokens count from 0, whatever the padding).
One jitted prefill fills the cache; then a jitted `lax.while_loop` generates up to `chunk`
tokens per call, every row finishing on any of the EOS ids (config.eos_ids: Llama 3 and chat
models have several) or its own max_new_tokens, and the loop ends early when every row has.
Between chunks the host extends each live row's text by its new tokens (an incremental
detokenizer, data/tokenizer.py: never the whole row again) and checks the stop sequences (they
are strings, and may span tokens and chunks); a row that hit one is marked done, and its text
is cut exactly before the first stop sequence.

Every family of model/families.py decodes here: RoPE rotates by the same mask-derived
positions learned tables look up, a sliding window hides the cache slots a new token may no
longer see (`window_mask`; prefill applies it inside the model), and the logits come from the
model's own LM head when it has one (`head_weights`).

Sampling per row: greedy (temperature 0), or temperature then top-k then top-p, with a key
folded from (seed, row seed, step): a row's tokens depend on its own seed, not on which
other rows share its batch.

On CPU the decoder keeps each layer's parameters as separate arrays (`split_layers`) and runs
the layers as one unrolled call each (so its compile time grows with depth, unlike the scanned
model's): a layer sliced out of the stacked [L, ...] arrays inside the loop is a copy of its
weights at every step there (XLA's CPU backend makes it; benchmarks/decode_step.py). Elsewhere
the layers stay stacked and scanned (`Decoder(split=)`). Under a mesh
(`Decoder(..., mesh=)`), parameters keep their sharding, the batch and cache shard over the
batch axes and the model's logical constraints apply, so a 15B model decodes with its weights
spread over a host's chips.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

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
  cache_k: jax.Array  # [L, B, S, K, H]
  cache_v: jax.Array  # [L, B, S, K, H]
  cache_mask: jax.Array  # [B, S] int32, 1 where the cache holds a real token
  logits: jax.Array  # [B, V] fp32, for the next token
  positions: jax.Array  # [B] position of the next token
  out: jax.Array  # [B, M] generated tokens
  lengths: jax.Array  # [B] tokens generated per row
  done: jax.Array  # [B] bool
  keys: jax.Array  # [B] PRNG keys
  temperature: jax.Array  # [B] fp32
  top_p: jax.Array  # [B] fp32
  top_k: jax.Array  # [B] int32
  max_new: jax.Array  # [B] int32
  step: jax.Array  # () int32, tokens generated so far (the loop index)
  offset: jax.Array  # () int32, P: where generated tokens start in the cache


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
    row_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
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


_CACHE_AXES = ("layers", "batch", "length", "kv", "head_dim")


def prefill(
  params,
  cfg: ModelConfig,
  tokens,
  mask,
  keys,
  temperature,
  top_p,
  top_k,
  max_new,
  done,
  *,
  new_tokens: int,
) -> DecodeState:
  """Runs the left-padded prompts [B, P] through the model and returns a state whose cache
  holds them, with room for `new_tokens` more."""
  b, p = tokens.shape
  segment_ids = mask.astype(jnp.int32)
  hidden, (k, v) = _model(params, cfg, tokens, segment_ids, positions_from_segments(segment_ids))
  pad = ((0, 0), (0, 0), (0, new_tokens), (0, 0), (0, 0))
  cache_k = nn.with_logical_constraint(jnp.pad(k, pad), _CACHE_AXES)  # [L, B, S, K, H]
  cache_v = nn.with_logical_constraint(jnp.pad(v, pad), _CACHE_AXES)
  mask = mask.astype(jnp.int32)
  return DecodeState(
    cache_k=cache_k,
    cache_v=cache_v,
    cache_mask=jnp.pad(mask, ((0, 0), (0, new_tokens))),
    logits=_head(params, cfg, hidden[:, -1]),
    positions=mask.sum(-1).astype(jnp.int32),
    out=jnp.zeros((b, new_tokens), jnp.int32),
    lengths=jnp.zeros((b,), jnp.int32),
    done=done,
    keys=keys,
    temperature=temperature,
    top_p=top_p,
    top_k=top_k,
    max_new=max_new,
    step=jnp.zeros((), jnp.int32),
    offset=jnp.asarray(p, jnp.int32),
  )


def window_mask(cache_mask, idx, window: int | None):
  """The cache mask [B, S] a new token at cache index `idx` attends through: with a sliding
  window, only slots s with idx - s < window (it sees itself, passed apart from the cache, and
  the window - 1 tokens before it). Cache slots are consecutive positions of each row (left
  padding, then the prompt, then the generated tokens), so slot distance is position distance."""
  if window is None:
    return cache_mask
  slots = jnp.arange(cache_mask.shape[1], dtype=jnp.int32)[None]
  return jnp.where(idx - slots < window, cache_mask, 0)


def decode_chunk(
  params,
  cfg: ModelConfig,
  state: DecodeState,
  stop_at,
  *,
  eos_ids: tuple[int, ...],
  pad_id: int,
) -> DecodeState:
  """Generates tokens until step == stop_at or every row is done (a `lax.while_loop`). A row
  ends on any of `eos_ids` (none: only on its token budget)."""
  b = state.out.shape[0]

  def cond(st):
    return (st.step < stop_at) & ~jnp.all(st.done)

  def body(st):
    tok = sample_tokens(st.logits, st.keys, st.step, st.temperature, st.top_p, st.top_k)
    tok = jnp.where(st.done, pad_id, tok)
    out = jax.lax.dynamic_update_slice(st.out, tok[:, None], (0, st.step))
    lengths = st.lengths + (~st.done).astype(jnp.int32)
    done = st.done | (lengths >= st.max_new)
    for e in eos_ids:
      done = done | (tok == e)
    idx = st.offset + st.step
    hidden, (k, v) = _model(
      params,
      cfg,
      tok[:, None],
      jnp.ones((b, 1), jnp.int32),
      st.positions[:, None],
      (st.cache_k, st.cache_v, window_mask(st.cache_mask, idx, cfg.sliding_window)),
    )
    cache_k = jax.lax.dynamic_update_slice(
      st.cache_k, k.astype(st.cache_k.dtype), (0, 0, idx, 0, 0)
    )
    cache_v = jax.lax.dynamic_update_slice(
      st.cache_v, v.astype(st.cache_v.dtype), (0, 0, idx, 0, 0)
    )
    cache_mask = jax.lax.dynamic_update_slice(st.cache_mask, jnp.ones((b, 1), jnp.int32), (0, idx))
    return st.replace(
      cache_k=nn.with_logical_constraint(cache_k, _CACHE_AXES),
      cache_v=nn.with_logical_constraint(cache_v, _CACHE_AXES),
      cache_mask=cache_mask,
      logits=_head(params, cfg, hidden[:, 0]),
      positions=st.positions + 1,
      out=out,
      lengths=lengths,
      done=done,
      step=st.step + 1,
    )

  return jax.lax.while_loop(cond, body, state)


def _bucket(n: int, minimum: int) -> int:
  return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def _cut(text: str, stop: Sequence[str]) -> int | None:
  """Index of the earliest stop sequence in text, or None."""
  hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
  return min(hits) if hits else None


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
    self._prefill = jax.jit(prefill, static_argnames=("cfg", "new_tokens"))
    self._decode = jax.jit(
      decode_chunk, static_argnames=("cfg", "eos_ids", "pad_id"), donate_argnums=(2,)
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
    in order. Rows are batched by prompt length. `on_chunk(i, text, finished)` is called after
    every chunk for each live row i with its text so far, held back where a stop sequence
    might still begin (for streaming); `on_batch(rows)` after each batch (a progress bar)."""
    reqs = [r if isinstance(r, Request) else Request(r, **defaults) for r in requests]
    ids = [self.validate(r) for r in reqs]
    order = sorted(range(len(reqs)), key=lambda i: (len(ids[i]), i))
    results: list[Generation | None] = [None] * len(reqs)
    for start in range(0, len(order), self.max_batch):
      rows = order[start : start + self.max_batch]
      cb = (
        None if on_chunk is None else (lambda j, text, fin, rows=rows: on_chunk(rows[j], text, fin))
      )
      for i, g in zip(rows, self._run_batch([reqs[i] for i in rows], [ids[i] for i in rows], cb)):
        results[i] = g
      if on_batch is not None:
        on_batch(len(rows))
    return results

  # ---- one batch ---------------------------------------------------------------------------
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

  def _new_text(self, texts: dict, i: int, tokens: list[int]) -> str:
    """Row i's text so far (`_text(tokens)`), decoding only the tokens it has not seen."""
    if self.tokenizer is None:
      return ""
    from data.tokenizer import IncrementalDetokenizer

    inc = texts.setdefault(i, IncrementalDetokenizer(self.tokenizer))
    if tokens and tokens[-1] in self.eos_ids:
      tokens = tokens[:-1]
    return inc.extend(tokens[len(inc.ids) :])

  def _run_batch(
    self, reqs: list[Request], ids: list[list[int]], on_chunk=None
  ) -> list[Generation]:
    n = len(reqs)
    b = min(_bucket(n, 1), max(self.max_batch, n))
    p = min(_bucket(max(map(len, ids)), MIN_PROMPT_BUCKET), self.config.max_position_embeddings)
    limit = self.config.max_position_embeddings
    # no row outgrows the model
    budgets = [min(r.max_new_tokens, limit - len(row)) for r, row in zip(reqs, ids)]
    m = -(-max(budgets) // self.chunk) * self.chunk
    tokens = np.full((b, p), self.pad_id, np.int32)
    mask = np.zeros((b, p), np.int32)
    for i, row in enumerate(ids):
      tokens[i, p - len(row) :] = row
      mask[i, p - len(row) :] = 1
    max_new = np.zeros((b,), np.int32)
    max_new[:n] = budgets

    def col(field, dtype):  # [b] of one Request field; padding rows 0
      return np.array([getattr(r, field) for r in reqs] + [0] * (b - n), dtype)

    row_seeds = col("seed", np.uint32)
    base = jax.random.key(self.seed)
    keys = jax.vmap(lambda s: jax.random.fold_in(base, s))(jnp.asarray(row_seeds))
    done = np.arange(b) >= n  # padding rows are finished from the start
    with self._context():
      state = self._prefill(
        self.layer_params,
        self.config,
        self._put(tokens),
        self._put(mask),
        keys,
        self._put(col("temperature", np.float32)),
        self._put(col("top_p", np.float32)),
        self._put(col("top_k", np.int32)),
        self._put(max_new),
        self._put(done),
        new_tokens=m,
      )
      stopped: dict[int, int] = {}  # row -> tokens through the one that completed a stop sequence
      texts: dict = {}  # row -> its IncrementalDetokenizer: each chunk decodes only new tokens
      live = set(range(n))
      hold = max((len(s) for r in reqs for s in r.stop), default=1) - 1
      while live:
        step = int(state.step)
        state = self._decode(
          self.layer_params,
          self.config,
          state,
          jnp.asarray(min(step + self.chunk, m), jnp.int32),
          eos_ids=self.eos_ids,
          pad_id=self.pad_id,
        )
        out, lengths, done = (np.array(x) for x in (state.out, state.lengths, state.done))
        newly_stopped = []
        for i in sorted(live):
          toks = out[i, : lengths[i]].tolist()
          text = self._new_text(texts, i, toks) if (reqs[i].stop or on_chunk) else ""
          if reqs[i].stop and _cut(text, reqs[i].stop) is not None:
            stopped[i] = self._stop_prefix(toks, reqs[i].stop)
            newly_stopped.append(i)
          finished = bool(done[i]) or i in stopped
          if on_chunk is not None:
            if finished:
              cut = _cut(text, reqs[i].stop)
              on_chunk(i, text if cut is None else text[:cut], True)
            else:
              safe = text[: len(text) - hold] if hold else text
              on_chunk(i, safe.rstrip("\ufffd"), False)  # an incomplete UTF-8 character waits too
          if finished:
            live.discard(i)
        if newly_stopped:
          done[newly_stopped] = True
          state = state.replace(done=self._put(done))
        if int(state.step) >= m:
          break
    results = []
    for i, r in enumerate(reqs):
      toks = out[i, : lengths[i]].tolist()
      if i in stopped:
        toks = toks[: stopped[i]]
      text = self._text(toks)
      cut = _cut(text, r.stop) if r.stop else None
      ended = i in stopped or bool(toks and toks[-1] in self.eos_ids)
      results.append(
        Generation(
          tokens=toks,
          text=text if cut is None else text[:cut],
          finish_reason="stop" if ended else "length",
          prompt_tokens=len(ids[i]),
        )
      )
    return results

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

"""GPTBigCode (StarCoder) decoder in flax.linen.

Letters: B batch, T length, D model dim, N query heads, K kv heads, H head dim, F mlp dim,
V vocab, L layers, P max positions.

Parameters carry logical axis names (`vocab`, `embed`, `heads`, `kv`, `head_dim`, `mlp`,
`length`, `layers`); model/sharding.py maps them to mesh axes. Layers are one scanned block,
so compile time does not grow with depth; parameters of layer i live at index i of the
stacked [L, ...] arrays under `h`.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.attention import cached_attention, dot_product_attention
from model.config import ModelConfig

_INIT = nn.initializers.normal(stddev=0.02)


def _param(module, name, axes, shape, init, dtype):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def _dense(module, name: str, axes, shape, n_in: int, eq: str, x):
  """einsum(eq, x, kernel) for a linear layer's kernel [*in, *out] (its first n_in dims contract
  with x's last ones), in the compute dtype.

  Quantized (config.quant_bits), the parameter `name` holds int8/int4 values and `name`_scale
  [G, *out] the scales of G groups of consecutive (flattened) input rows; the kernel is
  dequantized here, inside the scanned layer that uses it, so the model's weights stay integers
  in memory and no full-precision copy of them is made (what the TPU compiler materialises
  instead is measured by `rrtf plan --decode`; README, "Quantized inference").
  """
  cfg = module.config
  dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
  if not cfg.quant_bits:
    return jnp.einsum(eq, x, _param(module, name, axes, shape, _INIT, param_dtype).astype(dtype))
  groups = cfg.quant_groups(math.prod(shape[:n_in]))
  q = _param(module, name, axes, shape, nn.initializers.zeros, cfg.quant_dtype)
  scale = _param(
    module,
    f"{name}_scale",
    (None,) + tuple(axes[n_in:]),
    (groups,) + tuple(shape[n_in:]),
    nn.initializers.ones,
    param_dtype,
  )
  return jnp.einsum(eq, x, dequantize(q, scale, dtype))


def dequantize(q, scale, dtype):
  """q [*in, *out] integers, scale [G, *out]: each of G groups of consecutive (flattened) input
  rows has its own scale per output -> [*in, *out] in `dtype`."""
  g, out = scale.shape[0], scale.shape[1:]
  w = q.reshape((g, -1) + out).astype(dtype) * scale.astype(dtype)[:, None]
  return w.reshape(q.shape)


def lm_head(x, wte, wte_scale=None, *, dtype):
  """The tied LM head: [..., D] -> [..., V] logits, the one used by the model, the decoder and
  the loss's chunked log-probabilities. Inputs in `dtype` (the compute dtype), fp32
  accumulation and output. An int8 table's per-row scales multiply the logits (exact: one scale
  per vocab row)."""
  logits = jnp.einsum(
    "...D,VD->...V", x.astype(dtype), wte.astype(dtype), preferred_element_type=jnp.float32
  )
  return logits if wte_scale is None else logits * wte_scale.astype(jnp.float32)


def _layer_norm(cfg: ModelConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
    epsilon=cfg.layer_norm_epsilon,
    dtype=jnp.dtype(cfg.dtype),
    param_dtype=jnp.dtype(cfg.param_dtype),
    use_fast_variance=False,  # two-pass variance, as torch computes it
    scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
    name=name,
  )


def positions_from_segments(segment_ids):
  """[B, T] positions that restart at 0 where the segment id changes (padding is a segment)."""
  t = segment_ids.shape[1]
  idx = jnp.broadcast_to(jnp.arange(t), segment_ids.shape)
  starts = jnp.concatenate(
    [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
  )
  start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
  return idx - start_idx


class Attention(nn.Module):
  """Multi-query (or grouped/multi-head) self-attention with a query and a fused K/V projection.

  Queries have N heads that shard over the tensor axis; the K (often 1) kv heads come from one
  fused [D, 2, K, H] projection and stay replicated, so MQA needs no repetition in memory.
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, x, segment_ids, cache=None):
    """x [B, T, D] -> ([B, T, D], (key, value) [B, T, K, H] each, for a KV cache).

    With `cache` = (k [B, S, K, H], v [B, S, K, H], mask [B, S]) the T new tokens attend to the
    cached ones where mask is set, then causally among themselves (decoding).
    """
    cfg = self.config
    d, n, k, h = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    zeros = nn.initializers.zeros
    q_bias = _param(self, "q_bias", ("heads", "head_dim"), (n, h), zeros, param_dtype)
    kv_bias = _param(self, "kv_bias", (None, "kv", "head_dim"), (2, k, h), zeros, param_dtype)
    o_bias = _param(self, "o_bias", ("embed",), (d,), zeros, param_dtype)

    x = x.astype(dtype)
    self.sow("intermediates", "attn_in", x)  # the inputs GPTQ calibrates on (model/quantize.py)
    q = _dense(self, "q_kernel", ("embed", "heads", "head_dim"), (d, n, h), 1, "BTD,DNH->BTNH", x)
    # [B, T, N, H]
    q = nn.with_logical_constraint(
      q + q_bias.astype(dtype), ("batch", "length", "heads", "head_dim")
    )
    kv = _dense(
      self, "kv_kernel", ("embed", None, "kv", "head_dim"), (d, 2, k, h), 1, "BTD,DCKH->CBTKH", x
    )
    kv = kv + kv_bias.astype(dtype)[:, None, None]
    key, value = kv[0], kv[1]  # [B, T, K, H] each
    scale = h**-0.5 if cfg.scale_attn_weights else 1.0
    if cache is None:
      out = dot_product_attention(
        q,
        key,
        value,
        q_segment_ids=segment_ids,
        kv_segment_ids=segment_ids,
        causal=True,
        sm_scale=scale,
        impl=cfg.attention,
      )  # [B, T, N, H]
    else:
      out = cached_attention(q, key, value, *cache, sm_scale=scale)  # [B, T, N, H]
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
    self.sow("intermediates", "o_in", out)
    out = _dense(
      self, "o_kernel", ("heads", "head_dim", "embed"), (n, h, d), 2, "BTNH,NHD->BTD", out
    )
    return out + o_bias.astype(dtype), (key, value)


class Mlp(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    d, f = cfg.embed_dim, cfg.mlp_dim
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    zeros = nn.initializers.zeros
    fc_bias = _param(self, "fc_bias", ("mlp",), (f,), zeros, param_dtype)
    proj_bias = _param(self, "proj_bias", ("embed",), (d,), zeros, param_dtype)
    x = x.astype(dtype)
    self.sow("intermediates", "fc_in", x)
    hid = _dense(self, "fc_kernel", ("embed", "mlp"), (d, f), 1, "BTD,DF->BTF", x) + fc_bias.astype(
      dtype
    )
    hid = nn.with_logical_constraint(hid, ("batch", "length", "mlp"))  # [B, T, F]
    hid = jax.nn.gelu(hid, approximate=cfg.activation != "gelu")
    self.sow("intermediates", "proj_in", hid)
    # [B, T, D]
    return _dense(
      self, "proj_kernel", ("mlp", "embed"), (f, d), 1, "BTF,FD->BTD", hid
    ) + proj_bias.astype(dtype)


class Block(nn.Module):
  """Pre-LayerNorm transformer block; the (carry, _) signature is what nn.scan expects."""

  config: ModelConfig

  return_kv: bool = False

  @nn.compact
  def __call__(self, x, segment_ids, cache_kv=None, cache_mask=None):
    """cache_kv: this layer's cached (k, v) [B, S, K, H] when decoding; returns (x, ys) with ys
    this layer's new (k, v) when `return_kv` (stacked over layers by the scan), else None."""
    cache = None if cache_kv is None else (*cache_kv, cache_mask)
    a, kv = Attention(self.config, name="attn")(
      _layer_norm(self.config, "ln_1")(x), segment_ids, cache
    )
    x = x + a
    x = x + Mlp(self.config, name="mlp")(_layer_norm(self.config, "ln_2")(x))
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))  # [B, T, D]
    return x, (kv if self.return_kv else None)


_REMAT_POLICY = {
  "full": None,  # save nothing, recompute the block
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _gathered(table, axis: str, dtype):
  """An embedding table unsharded over `embed` before a lookup (see Transformer), in `dtype`
  (an int8 table stays int8: its rows are dequantized after the lookup)."""
  if not jnp.issubdtype(table.dtype, jnp.integer):
    table = table.astype(dtype)
  return nn.with_logical_constraint(table, (axis, None))


class Transformer(nn.Module):
  """`Transformer(config)(tokens[B, T], attention_mask[B, T]) -> logits [B, T, V]` in fp32."""

  config: ModelConfig

  @nn.compact
  def __call__(
    self,
    tokens,
    attention_mask=None,
    *,
    segment_ids=None,
    positions=None,
    return_hidden=False,
    cache=None,
    return_kv=False,
  ):
    """Runs the decoder.

    Args:
      tokens: [B, T] int token ids.
      attention_mask: [B, T], 1 for real tokens, 0 for padding (left or right).
      segment_ids: [B, T] int, for packed sequences (0 = padding); overrides attention_mask.
      positions: [B, T] int; by default derived from the mask/segments, so left padding does
        not shift them.
      return_hidden: return the final-LayerNorm hidden states [B, T, D] instead of logits
        (for losses that compute log-probs in chunks).
      cache: decoding: (k [L, B, S, K, H], v [L, B, S, K, H], mask [B, S]) of earlier tokens;
        `tokens` are the next T tokens and `positions` must be given (model/decode.py).
      return_kv: also return this call's keys and values, (k, v) [L, B, T, K, H] each, to
        fill or extend a cache: the result is then (logits or hidden, (k, v)).
    """
    cfg = self.config
    if isinstance(cfg, dict) or not isinstance(cfg, ModelConfig):
      raise TypeError(
        "Transformer needs a model.ModelConfig; use ModelConfig.from_dict(config.model)"
      )
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    if segment_ids is None:
      segment_ids = (jnp.ones_like(tokens) if attention_mask is None else attention_mask).astype(
        jnp.int32
      )
    if positions is None:
      positions = positions_from_segments(segment_ids)  # [B, T]

    if cfg.quant_embedding:  # int8, one scale per vocab row
      wte = _param(
        self,
        "wte",
        ("vocab", "embed"),
        (cfg.vocab_size, cfg.embed_dim),
        nn.initializers.zeros,
        jnp.int8,
      )
      wte_scale = _param(
        self, "wte_scale", ("vocab",), (cfg.vocab_size,), nn.initializers.ones, param_dtype
      )
    else:
      wte = _param(
        self, "wte", ("vocab", "embed"), (cfg.vocab_size, cfg.embed_dim), _INIT, param_dtype
      )
      wte_scale = None
    wpe = _param(
      self,
      "wpe",
      ("length", "embed"),
      (cfg.max_position_embeddings, cfg.embed_dim),
      _INIT,
      param_dtype,
    )
    # Gather the tables over `embed` first, as FSDP does for every weight before use: a lookup
    # into an embed-sharded table yields embed-sharded rows, which SPMD cannot move to the
    # batch-sharded activation layout without replicating them.
    # (An int8 table is gathered as int8 and its rows dequantized.)
    x = jnp.take(_gathered(wte, "vocab", dtype), tokens, axis=0).astype(dtype)  # [B, T, D]
    if wte_scale is not None:
      x = x * jnp.take(wte_scale.astype(dtype), tokens, axis=0)[..., None]
    x = x + jnp.take(_gathered(wpe, "length", dtype), positions, axis=0)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    block = Block
    if cfg.remat != "none" and cache is None:
      block = nn.remat(Block, policy=_REMAT_POLICY[cfg.remat], prevent_cse=False)
    cache_kv, cache_mask = (None, None) if cache is None else (cache[:2], cache[2])
    x, kv = nn.scan(
      block,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      in_axes=(nn.broadcast, 0, nn.broadcast),  # the cache is per layer, the rest shared
      length=cfg.num_layers,
      metadata_params={nn.PARTITION_NAME: "layers"},
    )(cfg, return_kv=return_kv, name="h")(x, segment_ids, cache_kv, cache_mask)
    x = _layer_norm(cfg, "ln_f")(x)  # [B, T, D]
    if return_hidden:
      out = x
    else:
      # [B, T, V]
      out = nn.with_logical_constraint(
        lm_head(x, wte, wte_scale, dtype=dtype), ("batch", "length", "vocab")
      )
    return (out, kv) if return_kv else out


def param_initializer(config: ModelConfig):
  """The one parameter initialiser: `rng -> params` as plain arrays (logical-axis boxes
  removed). Jit it with the output shardings wanted (training places each parameter on its
  devices as it is made)."""

  def init(rng):
    return nn.unbox(Transformer(config).init(rng, jnp.zeros((1, 8), jnp.int32))["params"])

  return init


def init_params(config: ModelConfig, rng):
  """Random parameters as plain arrays, on the default device."""
  return jax.jit(param_initializer(config))(rng)


def abstract_params(config: ModelConfig):
  """Shapes/dtypes of the parameters via jax.eval_shape (allocates nothing), still boxed."""
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  return jax.eval_shape(lambda t: Transformer(config).init(jax.random.PRNGKey(0), t), tokens)[
    "params"
  ]


def count_params(config: ModelConfig) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(abstract_params(config))))

"""The decoder in flax.linen: GPTBigCode (StarCoder), Starcoder2 and the Llama family.

Letters: B batch, T length, D model dim, N query heads, K kv heads, H head dim, F mlp dim,
V vocab, L layers, P max positions.

One network; ModelConfig's switches select each family's pieces: learned positions or RoPE,
LayerNorm or RMSNorm, a GELU or a gated SiLU MLP, which biases exist, per-head q/k RMSNorm,
a tied or separate LM head, a sliding window. A parameter a family does not have is not
created (Llama has no `q_bias`), so each family's tree holds exactly its HF tensors.

Adding a family: if it needs a new piece, add a switch to ModelConfig (a default that leaves
every other family's tree and numbers unchanged), build it here with logical axis names, then
describe the family's HF config and tensor names in model/families.py and add its parity test
to tests/test_families.py.

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
import numpy as np

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


def head_weights(params):
  """(table [V, D], int8 row scales or None) of the LM head: `lm_head` when the model has its
  own, else the tied `wte`."""
  name = "lm_head" if "lm_head" in params else "wte"
  return params[name], params.get(f"{name}_scale")


def lm_head(x, wte, wte_scale=None, *, dtype):
  """The LM head: [..., D] -> [..., V] logits, the one used by the model, the decoder and
  the loss's chunked log-probabilities (`wte` is head_weights(params)[0]). Inputs in `dtype`
  (the compute dtype), fp32 accumulation and output. An int8 table's per-row scales multiply
  the logits (exact: one scale per vocab row)."""
  logits = jnp.einsum(
    "...D,VD->...V", x.astype(dtype), wte.astype(dtype), preferred_element_type=jnp.float32
  )
  return logits if wte_scale is None else logits * wte_scale.astype(jnp.float32)


def _norm(cfg: ModelConfig, name: str, kind: str | None = None, axis: str = "embed"):
  """The config's norm over the last axis: LayerNorm (scale, bias) or RMSNorm (scale)."""
  kw = dict(
    epsilon=cfg.layer_norm_epsilon,
    dtype=jnp.dtype(cfg.dtype),
    param_dtype=jnp.dtype(cfg.param_dtype),
    scale_init=nn.with_logical_partitioning(nn.initializers.ones, (axis,)),
    name=name,
  )
  if (kind or cfg.norm) == "rmsnorm":
    return nn.RMSNorm(**kw)
  return nn.LayerNorm(
    use_fast_variance=False,  # two-pass variance, as torch computes it
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axis,)),
    **kw,
  )


def rope_inverse_frequencies(cfg: ModelConfig) -> np.ndarray:
  """[H/2] fp32 inverse frequencies of RoPE, with HF's `linear` or `llama3` scaling, computed in
  fp32 as transformers computes them (modeling_rope_utils)."""
  dim = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
  inv = inv.astype(np.float32)
  if cfg.rope_scaling == "linear":
    inv = inv / np.float32(cfg.rope_factor)
  elif cfg.rope_scaling == "llama3":
    factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old = cfg.rope_original_max_position_embeddings
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    inv = np.where(medium, smoothed, scaled)
  return inv.astype(np.float32)


def apply_rope(x, positions, inv_freq):
  """Rotates x [B, T, heads, H] by its positions [B, T] (HF's rotate-half layout: the first and
  second halves of each head are the pairs); angles in fp32, result in x's dtype."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, H/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None]  # [B, T, 1, H]
  h = x.shape[-1] // 2
  xf = x.astype(jnp.float32)
  rotated = jnp.concatenate([-xf[..., h:], xf[..., :h]], axis=-1)
  return (xf * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def _activation(cfg: ModelConfig, x):
  if cfg.activation == "silu":
    return jax.nn.silu(x)
  return jax.nn.gelu(x, approximate=cfg.activation != "gelu")


def positions_from_segments(segment_ids):
  """[B, T] positions that restart at 0 where the segment id changes (padding is a segment)."""
  t = segment_ids.shape[1]
  idx = jnp.broadcast_to(jnp.arange(t), segment_ids.shape)
  starts = jnp.concatenate(
    [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
  )
  start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
  return idx - start_idx


def _bias(module, name, axes, shape, on: bool):
  """A bias parameter in the compute dtype, or 0 where the family has none."""
  cfg = module.config
  if not on:
    return 0
  return _param(
    module, name, axes, shape, nn.initializers.zeros, jnp.dtype(cfg.param_dtype)
  ).astype(jnp.dtype(cfg.dtype))


class Attention(nn.Module):
  """Multi-query, grouped-query or multi-head self-attention with a query and a fused K/V
  projection.

  Queries have N heads that shard over the tensor axis; the K kv heads (1 for StarCoder) come
  from one fused [D, 2, K, H] projection, so MQA/GQA never repeat K/V in memory.
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, x, segment_ids, positions, cache=None):
    """x [B, T, D], positions [B, T] -> ([B, T, D], (key, value) [B, T, K, H] each, for a KV
    cache; keys after q/k norm and RoPE).

    With `cache` = (k [B, S, K, H], v [B, S, K, H], mask [B, S]) the T new tokens attend to the
    cached ones where mask is set, then causally among themselves (decoding; the caller's
    mask also leaves out keys outside a sliding window, model/decode.py).
    """
    cfg = self.config
    d, n, k, h = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    dtype = jnp.dtype(cfg.dtype)

    # biases first: parameter creation order fixes each one's init key
    q_bias = _bias(self, "q_bias", ("heads", "head_dim"), (n, h), cfg.qkv_bias)
    kv_bias = _bias(self, "kv_bias", (None, "kv", "head_dim"), (2, k, h), cfg.qkv_bias)
    o_bias = _bias(self, "o_bias", ("embed",), (d,), cfg.attn_out_bias)
    x = x.astype(dtype)
    self.sow("intermediates", "attn_in", x)  # the inputs GPTQ calibrates on (model/quantize.py)
    q = _dense(self, "q_kernel", ("embed", "heads", "head_dim"), (d, n, h), 1, "BTD,DNH->BTNH", x)
    q = q + q_bias  # [B, T, N, H]
    kv = _dense(
      self, "kv_kernel", ("embed", None, "kv", "head_dim"), (d, 2, k, h), 1, "BTD,DCKH->CBTKH", x
    )
    if cfg.qkv_bias:
      kv = kv + kv_bias[:, None, None]
    key, value = kv[0], kv[1]  # [B, T, K, H] each
    if cfg.qk_norm:
      q = _norm(cfg, "q_norm", "rmsnorm", "head_dim")(q)
      key = _norm(cfg, "k_norm", "rmsnorm", "head_dim")(key)
    if cfg.position_embedding == "rope":
      inv_freq = rope_inverse_frequencies(cfg)
      q, key = apply_rope(q, positions, inv_freq), apply_rope(key, positions, inv_freq)
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
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
        window=cfg.sliding_window,
        impl=cfg.attention,
      )  # [B, T, N, H]
    else:
      out = cached_attention(q, key, value, *cache, sm_scale=scale)  # [B, T, N, H]
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
    self.sow("intermediates", "o_in", out)
    out = _dense(
      self, "o_kernel", ("heads", "head_dim", "embed"), (n, h, d), 2, "BTNH,NHD->BTD", out
    )
    return out + o_bias, (key, value)


class Mlp(nn.Module):
  """gelu: proj(act(fc x)) (GPTBigCode, Starcoder2); gated: proj(act(gate x) * up x) (Llama)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    d, f, bias = cfg.embed_dim, cfg.mlp_dim, cfg.mlp_bias
    ins = ("gate", "up") if cfg.mlp == "gated" else ("fc",)
    # biases first: parameter creation order fixes each one's init key
    in_bias = {name: _bias(self, f"{name}_bias", ("mlp",), (f,), bias) for name in ins}
    proj_bias = _bias(self, "proj_bias", ("embed",), (d,), bias)
    x = x.astype(jnp.dtype(cfg.dtype))
    self.sow("intermediates", "fc_in", x)

    def up(name):  # [B, T, F]
      y = _dense(self, f"{name}_kernel", ("embed", "mlp"), (d, f), 1, "BTD,DF->BTF", x)
      return nn.with_logical_constraint(y + in_bias[name], ("batch", "length", "mlp"))

    if cfg.mlp == "gated":
      hid = _activation(cfg, up("gate")) * up("up")
    else:
      hid = _activation(cfg, up("fc"))
    self.sow("intermediates", "proj_in", hid)
    out = _dense(self, "proj_kernel", ("mlp", "embed"), (f, d), 1, "BTF,FD->BTD", hid)
    return out + proj_bias  # [B, T, D]


class Block(nn.Module):
  """Pre-norm transformer block; the (carry, _) signature is what nn.scan expects."""

  config: ModelConfig

  return_kv: bool = False

  @nn.compact
  def __call__(self, x, segment_ids, positions, cache_kv=None, cache_mask=None):
    """cache_kv: this layer's cached (k, v) [B, S, K, H] when decoding; returns (x, ys) with ys
    this layer's new (k, v) when `return_kv` (stacked over layers by the scan), else None."""
    cache = None if cache_kv is None else (*cache_kv, cache_mask)
    a, kv = Attention(self.config, name="attn")(
      _norm(self.config, "ln_1")(x), segment_ids, positions, cache
    )
    x = x + a
    x = x + Mlp(self.config, name="mlp")(_norm(self.config, "ln_2")(x))
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
      positions: [B, T] int (learned positions or RoPE); by default derived from the
        mask/segments, so left padding does not shift them.
      return_hidden: return the final-norm hidden states [B, T, D] instead of logits
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

    wte, wte_scale = self._table("wte", init=_INIT)
    # Gather the tables over `embed` first, as FSDP does for every weight before use: a lookup
    # into an embed-sharded table yields embed-sharded rows, which SPMD cannot move to the
    # batch-sharded activation layout without replicating them.
    # (An int8 table is gathered as int8 and its rows dequantized.)
    x = jnp.take(_gathered(wte, "vocab", dtype), tokens, axis=0).astype(dtype)  # [B, T, D]
    if wte_scale is not None:
      x = x * jnp.take(wte_scale.astype(dtype), tokens, axis=0)[..., None]
    if cfg.position_embedding == "learned":
      wpe = _param(
        self,
        "wpe",
        ("length", "embed"),
        (cfg.max_position_embeddings, cfg.embed_dim),
        _INIT,
        param_dtype,
      )
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
      in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),  # the cache is per layer
      length=cfg.num_layers,
      metadata_params={nn.PARTITION_NAME: "layers"},
    )(cfg, return_kv=return_kv, name="h")(x, segment_ids, positions, cache_kv, cache_mask)
    x = _norm(cfg, "ln_f")(x)  # [B, T, D]
    if not cfg.tie_embeddings:  # the LM head's own [V, D] table, quantized like wte
      wte, wte_scale = self._table("lm_head", init=_INIT)
    if return_hidden:
      out = x
    else:
      # [B, T, V]
      out = nn.with_logical_constraint(
        lm_head(x, wte, wte_scale, dtype=dtype), ("batch", "length", "vocab")
      )
    return (out, kv) if return_kv else out

  def _table(self, name: str, init):
    """A [V, D] table (`wte`, or an untied `lm_head`) and its int8 row scales (None unless
    config.quant_embedding: int8, one scale per vocab row)."""
    cfg = self.config
    shape, param_dtype = (cfg.vocab_size, cfg.embed_dim), jnp.dtype(cfg.param_dtype)
    if not cfg.quant_embedding:
      return _param(self, name, ("vocab", "embed"), shape, init, param_dtype), None
    table = _param(self, name, ("vocab", "embed"), shape, nn.initializers.zeros, jnp.int8)
    scale = _param(
      self, f"{name}_scale", ("vocab",), (cfg.vocab_size,), nn.initializers.ones, param_dtype
    )
    return table, scale


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

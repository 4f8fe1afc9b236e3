"""The HF model families we read and write: each family's `config.json` and tensor names.

  gpt_bigcode  GPTBigCodeForCausalLM   StarCoder, StarCoderBase, SantaCoder-style MQA
  starcoder2   Starcoder2ForCausalLM   StarCoder2: GQA, RoPE, sliding window, LayerNorm, GELU
  llama        LlamaForCausalLM        CodeLlama, DeepSeek-Coder v1, Llama 3 (llama3 RoPE)
  mistral      MistralForCausalLM      Llama with a sliding window
  qwen2        Qwen2ForCausalLM        Qwen2.5-Coder: q/k/v biases
  qwen3        Qwen3ForCausalLM        Qwen3 dense: per-head q/k RMSNorm, free head_dim

A family is three functions over plain dicts and numpy arrays, registered in FAMILIES:
`from_hf(config.json dict) -> ModelConfig kwargs` (refusing, with `UnsupportedError`, any setting
the network does not implement), `to_hf(ModelConfig) -> config.json dict` (refusing what the
HF class cannot express), and `tensors(ModelConfig) -> [Tensor]`, how each HF tensor maps to
a slice of one of our parameters. model/convert.py streams tensors through these both ways;
every mapping is a transpose/reshape/stack, so HF -> ours -> HF is bit-exact.

Adding a family (see also model/transformer.py): write its three functions here, reusing the
Llama-style helpers where its tensors are named like Llama's, and add one tiny random HF model
of it to tests/test_families.py, which checks logits, greedy decoding and the round trip.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from model.config import ACTIVATIONS, FAMILY_NAMES, ModelConfig


class UnsupportedError(ValueError):
  """A config.json we do not convert: says which setting and what is supported."""


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One HF tensor of a layer (names relative to the layer) or of the model.

  hf: its name; shape: its HF shape; targets: ((our path, index), ...) the slices of our
  parameters it fills (index () = the whole parameter; layers add their own leading index);
  to_ours: HF array -> one array per target; to_hf: the targets' arrays -> HF array.
  """

  hf: str
  shape: tuple[int, ...]
  targets: tuple[tuple[tuple[str, ...], tuple], ...]
  to_ours: Callable
  to_hf: Callable


def _same(x):
  return (x,)


def _whole(hf: str, shape, path: tuple[str, ...]) -> Tensor:
  return Tensor(hf, tuple(shape), ((path, ()),), _same, lambda x: x)


def _linear(hf: str, path: tuple[str, ...], d_in: int, out: tuple[int, ...], index=()) -> Tensor:
  """torch Linear weight [prod(out), d_in] <-> our kernel [d_in, *out] (or its `index` slice)."""
  n_out = int(np.prod(out))
  return Tensor(
    hf,
    (n_out, d_in),
    ((path, index),),
    lambda w: (w.T.reshape((d_in,) + tuple(out)),),
    lambda k: k.reshape(d_in, n_out).T,
  )


def _vector(hf: str, path: tuple[str, ...], shape: tuple[int, ...], index=()) -> Tensor:
  """A bias [prod(shape)] <-> ours [*shape] (or its `index` slice)."""
  n = int(np.prod(shape))
  return Tensor(hf, (n,), ((path, index),), lambda b: (b.reshape(shape),), lambda b: b.reshape(n))


# ---- reading config.json ----------------------------------------------------------------------
def _first(hf: Mapping, *keys, default=None):
  for k in keys:
    if hf.get(k) is not None:
      return hf[k]
  return default


def _eos(hf: Mapping) -> dict[str, Any]:
  """eos_token_id may be a list (Llama 3: several ids end a turn): the first is the EOS, the
  rest are extra_eos_token_ids."""
  eos = hf.get("eos_token_id")
  ids = list(eos) if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]
  return dict(
    bos_token_id=hf.get("bos_token_id"),
    eos_token_id=ids[0] if ids else None,
    extra_eos_token_ids=tuple(int(i) for i in ids[1:]),
    pad_token_id=hf.get("pad_token_id"),
  )


def _activation(hf: Mapping, key: str = "hidden_act") -> str:
  act = hf.get(key, "silu")
  if act not in ACTIVATIONS:
    raise UnsupportedError(f"{key}={act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
  return act


_ROPE_TYPES = ("default", "linear", "llama3")


def _rope(hf: Mapping) -> dict[str, Any]:
  """RoPE settings from transformers 5's `rope_parameters` or the older `rope_theta` +
  `rope_scaling`."""
  params = dict(hf.get("rope_parameters") or {})
  scaling = dict(hf.get("rope_scaling") or {})
  theta = _first(params, "rope_theta", default=_first(hf, "rope_theta", default=10000.0))
  merged = {**scaling, **params}
  kind = merged.get("rope_type", merged.get("type", "default"))
  if kind not in _ROPE_TYPES:
    raise UnsupportedError(
      f"rope scaling type {kind!r} is not supported (supported: {', '.join(_ROPE_TYPES)})"
    )
  partial = merged.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if partial != 1.0:
    raise UnsupportedError(f"partial_rotary_factor={partial} is not supported (only 1.0)")
  out = dict(position_embedding="rope", rope_theta=float(theta))
  if kind == "linear":
    out.update(rope_scaling="linear", rope_factor=float(merged["factor"]))
  elif kind == "llama3":
    out.update(
      rope_scaling="llama3",
      rope_factor=float(merged["factor"]),
      rope_low_freq_factor=float(merged["low_freq_factor"]),
      rope_high_freq_factor=float(merged["high_freq_factor"]),
      rope_original_max_position_embeddings=int(merged["original_max_position_embeddings"]),
    )
  return out


def _refuse_keys(hf: Mapping, **why):
  """Refuses a config that sets any of `why`'s keys to something truthy (MoE, quantization)."""
  for key, what in why.items():
    if hf.get(key):
      raise UnsupportedError(f"{key} is set: {what} is not supported")


def _window(hf: Mapping, per_layer_switch: bool) -> int | None:
  """The sliding window, or None. Qwen2/Qwen3 window only when use_sliding_window, and then
  only layers from max_window_layers on: a window on some layers only is refused."""
  window = hf.get("sliding_window")
  if not per_layer_switch:
    return window
  if not hf.get("use_sliding_window"):
    return None
  n = hf.get("num_hidden_layers")
  types = hf.get("layer_types") or [
    "sliding_attention" if i >= hf.get("max_window_layers", 0) else "full_attention"
    for i in range(n)
  ]
  if len(set(types)) > 1:
    raise UnsupportedError(
      "use_sliding_window with a window on some layers only (max_window_layers/layer_types) "
      "is not supported (a window on every layer or on none)"
    )
  return window if types and types[0] == "sliding_attention" else None


# ---- GPTBigCode -------------------------------------------------------------------------------
def _gpt_bigcode_from_hf(hf: Mapping) -> dict[str, Any]:
  n_embd = _first(hf, "n_embd", "hidden_size")
  n_head = _first(hf, "n_head", "num_attention_heads")
  act = _activation(hf, "activation_function") if "activation_function" in hf else None
  return dict(
    vocab_size=hf["vocab_size"],
    max_position_embeddings=_first(hf, "n_positions", "max_position_embeddings"),
    num_layers=_first(hf, "n_layer", "num_hidden_layers"),
    embed_dim=n_embd,
    num_heads=n_head,
    num_kv_heads=1 if hf.get("multi_query", True) else n_head,
    mlp_dim=hf.get("n_inner") or 4 * n_embd,
    layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
    activation=act or "gelu_pytorch_tanh",
    scale_attn_weights=hf.get("scale_attn_weights", True),
    **_eos(hf),
  )


_GPT_BIGCODE = ModelConfig()  # the switches GPTBigCode has


def _same_switches(cfg: ModelConfig, like: ModelConfig, family: str, names):
  for name in names:
    if getattr(cfg, name) != getattr(like, name):
      raise UnsupportedError(
        f"{family} has no {name}={getattr(cfg, name)!r} (it has {getattr(like, name)!r})"
      )


def _gpt_bigcode_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  _same_switches(
    cfg,
    _GPT_BIGCODE,
    "GPTBigCode",
    (
      "position_embedding",
      "norm",
      "mlp",
      "mlp_bias",
      "qkv_bias",
      "attn_out_bias",
      "qk_norm",
      "tie_embeddings",
      "sliding_window",
    ),
  )
  if cfg.num_kv_heads not in (1, cfg.num_heads):
    raise UnsupportedError(
      "GPTBigCode supports only multi-query (K=1) or multi-head (K=N) attention, "
      f"not K={cfg.num_kv_heads}"
    )
  if cfg.head_dim * cfg.num_heads != cfg.embed_dim:
    raise UnsupportedError(f"GPTBigCode has head_dim = embed_dim / num_heads, not {cfg.head_dim}")
  if cfg.activation == "silu":
    raise UnsupportedError("GPTBigCode has no silu activation")
  return {
    "architectures": ["GPTBigCodeForCausalLM"],
    "model_type": "gpt_bigcode",
    "vocab_size": cfg.vocab_size,
    "n_positions": cfg.max_position_embeddings,
    "n_embd": cfg.embed_dim,
    "n_layer": cfg.num_layers,
    "n_head": cfg.num_heads,
    "n_inner": cfg.mlp_dim,
    "multi_query": cfg.num_kv_heads == 1,
    "activation_function": cfg.activation,
    "layer_norm_epsilon": cfg.layer_norm_epsilon,
    "scale_attn_weights": cfg.scale_attn_weights,
    "bos_token_id": cfg.bos_token_id,
    "eos_token_id": list(cfg.eos_ids) if cfg.extra_eos_token_ids else cfg.eos_token_id,
    "pad_token_id": cfg.pad_token_id,
    "attention_softmax_in_fp32": True,
    "scale_attention_softmax_in_fp32": True,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
    "tie_word_embeddings": True,
    "use_cache": True,
  }


def _gpt_bigcode_tensors(cfg: ModelConfig) -> tuple[list[Tensor], list[Tensor]]:
  """HF packs Q, K, V into one `c_attn`: multi-query (K=1) rows [N*H query | H key | H value];
  multi-head (K=N) rows per head [q_h | k_h | v_h], a [N, 3, H] layout."""
  d, n, k, h, f = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  mqa = k == 1 and n != 1
  if k not in (1, n):
    raise UnsupportedError(f"GPTBigCode has K=1 or K=N kv heads, not K={k}")

  def qkv_w_to_ours(w):  # [N*H + 2*K*H, D] -> (q [D, N, H], kv [D, 2, K, H])
    if mqa:
      q, kk, vv = w[: n * h], w[n * h : n * h + h], w[n * h + h :]
      kv = np.stack([kk, vv]).reshape(2, 1, h, d).transpose(3, 0, 1, 2)
      return q.reshape(n, h, d).transpose(2, 0, 1), kv
    w = w.reshape(n, 3, h, d)
    return w[:, 0].transpose(2, 0, 1), w[:, 1:].transpose(3, 1, 0, 2)

  def qkv_w_to_hf(q, kv):
    if mqa:
      return np.concatenate(
        [q.transpose(1, 2, 0).reshape(n * h, d), kv.transpose(1, 2, 3, 0).reshape(2 * h, d)]
      )
    # [N, 3, H, D]
    packed = np.concatenate([q.transpose(1, 2, 0)[:, None], kv.transpose(2, 1, 3, 0)], axis=1)
    return packed.reshape(3 * n * h, d)

  def qkv_b_to_ours(b):  # [N*H + 2*K*H] -> (q [N, H], kv [2, K, H])
    if mqa:
      return b[: n * h].reshape(n, h), b[n * h :].reshape(2, 1, h)
    b = b.reshape(n, 3, h)
    return b[:, 0], b[:, 1:].transpose(1, 0, 2)

  def qkv_b_to_hf(q, kv):
    if mqa:
      return np.concatenate([q.reshape(-1), kv.reshape(-1)])
    return np.concatenate([q[:, None], kv.transpose(1, 0, 2)], axis=1).reshape(-1)

  rows = n * h + 2 * k * h
  qkv = ((("attn", "q_kernel"), ()), (("attn", "kv_kernel"), ()))
  qkv_b = ((("attn", "q_bias"), ()), (("attn", "kv_bias"), ()))
  layer = [
    _whole("ln_1.weight", (d,), ("ln_1", "scale")),
    _whole("ln_1.bias", (d,), ("ln_1", "bias")),
    Tensor("attn.c_attn.weight", (rows, d), qkv, qkv_w_to_ours, qkv_w_to_hf),
    Tensor("attn.c_attn.bias", (rows,), qkv_b, qkv_b_to_ours, qkv_b_to_hf),
    Tensor(
      "attn.c_proj.weight",
      (d, n * h),
      ((("attn", "o_kernel"), ()),),
      lambda w: (w.T.reshape(n, h, d),),
      lambda o: o.reshape(n * h, d).T,
    ),
    _whole("attn.c_proj.bias", (d,), ("attn", "o_bias")),
    _whole("ln_2.weight", (d,), ("ln_2", "scale")),
    _whole("ln_2.bias", (d,), ("ln_2", "bias")),
    _linear("mlp.c_fc.weight", ("mlp", "fc_kernel"), d, (f,)),
    _whole("mlp.c_fc.bias", (f,), ("mlp", "fc_bias")),
    _linear("mlp.c_proj.weight", ("mlp", "proj_kernel"), f, (d,)),
    _whole("mlp.c_proj.bias", (d,), ("mlp", "proj_bias")),
  ]
  model = [
    _whole("transformer.wte.weight", (cfg.vocab_size, d), ("wte",)),
    _whole("transformer.wpe.weight", (cfg.max_position_embeddings, d), ("wpe",)),
    _whole("transformer.ln_f.weight", (d,), ("ln_f", "scale")),
    _whole("transformer.ln_f.bias", (d,), ("ln_f", "bias")),
  ]
  return model, [dataclasses.replace(t, hf=f"transformer.h.{{i}}.{t.hf}") for t in layer]


# ---- Llama-style families: Starcoder2, Llama, Mistral, Qwen2, Qwen3 -----------------------------
def _llama_style_from_hf(hf: Mapping, **switches) -> dict[str, Any]:
  d, n = hf["hidden_size"], hf["num_attention_heads"]
  for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size"):
    if not isinstance(hf.get(key), int) or hf[key] < 1:
      raise UnsupportedError(f"{key} must be a positive integer, got {hf.get(key)!r}")
  _refuse_keys(
    hf,
    num_experts="mixture-of-experts",
    num_local_experts="mixture-of-experts",
    quantization_config="a pre-quantized checkpoint (convert the full-precision one)",
  )
  out = dict(
    vocab_size=hf["vocab_size"],
    max_position_embeddings=hf["max_position_embeddings"],
    num_layers=hf["num_hidden_layers"],
    embed_dim=d,
    num_heads=n,
    num_kv_heads=hf.get("num_key_value_heads") or n,
    head_dim=hf.get("head_dim") or d // n,
    mlp_dim=hf["intermediate_size"],
    layer_norm_epsilon=_first(hf, "rms_norm_eps", "norm_epsilon", default=1e-6),
    activation=_activation(hf) if "hidden_act" in hf else "silu",
    scale_attn_weights=True,
    **_rope(hf),
    **_eos(hf),
  )
  out.update(switches)
  return out


def _llama_style_to_hf(cfg: ModelConfig, arch: str, model_type: str, **extra) -> dict[str, Any]:
  if cfg.position_embedding != "rope":
    raise UnsupportedError(f"{arch} has RoPE, not {cfg.position_embedding} positions")
  if not cfg.scale_attn_weights:
    raise UnsupportedError(f"{arch} scales attention scores by head_dim**-0.5")
  rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling == "linear":
    rope.update(rope_type="linear", factor=cfg.rope_factor)
  elif cfg.rope_scaling == "llama3":
    rope.update(
      rope_type="llama3",
      factor=cfg.rope_factor,
      low_freq_factor=cfg.rope_low_freq_factor,
      high_freq_factor=cfg.rope_high_freq_factor,
      original_max_position_embeddings=cfg.rope_original_max_position_embeddings,
    )
  eos = list(cfg.eos_ids) if cfg.extra_eos_token_ids else cfg.eos_token_id
  return {
    "architectures": [arch],
    "model_type": model_type,
    "vocab_size": cfg.vocab_size,
    "hidden_size": cfg.embed_dim,
    "intermediate_size": cfg.mlp_dim,
    "num_hidden_layers": cfg.num_layers,
    "num_attention_heads": cfg.num_heads,
    "num_key_value_heads": cfg.num_kv_heads,
    "head_dim": cfg.head_dim,
    "hidden_act": cfg.activation,
    "max_position_embeddings": cfg.max_position_embeddings,
    "rope_parameters": rope,
    "rope_theta": cfg.rope_theta,
    "tie_word_embeddings": cfg.tie_embeddings,
    "bos_token_id": cfg.bos_token_id,
    "eos_token_id": eos,
    "pad_token_id": cfg.pad_token_id,
    "attention_dropout": 0.0,
    "use_cache": True,
    **extra,
  }


def _llama_style_tensors(cfg: ModelConfig) -> tuple[list[Tensor], list[Tensor]]:
  """HF Llama naming (model.layers.{i}.self_attn.q_proj ...), which the other families share
  with small differences: Starcoder2's LayerNorm biases and c_fc/c_proj MLP, Qwen3's q/k norm."""
  d, n, k, h, f = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  layer_norm = cfg.norm == "layernorm"
  layer = []

  def norm(hf_name: str, ours: str):
    layer.append(_whole(f"{hf_name}.weight", (d,), (ours, "scale")))
    if layer_norm:
      layer.append(_whole(f"{hf_name}.bias", (d,), (ours, "bias")))

  norm("input_layernorm", "ln_1")
  attn = [
    ("q_proj", ("attn", "q_kernel"), (n, h), (), ("attn", "q_bias")),
    ("k_proj", ("attn", "kv_kernel"), (k, h), (slice(None), 0), ("attn", "kv_bias")),
    ("v_proj", ("attn", "kv_kernel"), (k, h), (slice(None), 1), ("attn", "kv_bias")),
  ]
  for name, path, out, index, bias_path in attn:
    layer.append(_linear(f"self_attn.{name}.weight", path, d, out, index))
    if cfg.qkv_bias:
      layer.append(_vector(f"self_attn.{name}.bias", bias_path, out, index[1:]))
  layer.append(
    Tensor(
      "self_attn.o_proj.weight",
      (d, n * h),
      ((("attn", "o_kernel"), ()),),
      lambda w: (w.T.reshape(n, h, d),),
      lambda o: o.reshape(n * h, d).T,
    )
  )
  if cfg.attn_out_bias:
    layer.append(_whole("self_attn.o_proj.bias", (d,), ("attn", "o_bias")))
  if cfg.qk_norm:
    layer.append(_whole("self_attn.q_norm.weight", (h,), ("attn", "q_norm", "scale")))
    layer.append(_whole("self_attn.k_norm.weight", (h,), ("attn", "k_norm", "scale")))
  norm("post_attention_layernorm", "ln_2")
  if cfg.mlp == "gated":
    mlp = [("gate_proj", "gate", d, f), ("up_proj", "up", d, f), ("down_proj", "proj", f, d)]
  else:
    mlp = [("c_fc", "fc", d, f), ("c_proj", "proj", f, d)]
  for hf_name, ours, d_in, d_out in mlp:
    layer.append(_linear(f"mlp.{hf_name}.weight", ("mlp", f"{ours}_kernel"), d_in, (d_out,)))
    if cfg.mlp_bias:
      layer.append(_whole(f"mlp.{hf_name}.bias", (d_out,), ("mlp", f"{ours}_bias")))
  model = [
    _whole("model.embed_tokens.weight", (cfg.vocab_size, d), ("wte",)),
    _whole("model.norm.weight", (d,), ("ln_f", "scale")),
  ]
  if layer_norm:
    model.append(_whole("model.norm.bias", (d,), ("ln_f", "bias")))
  if not cfg.tie_embeddings:
    model.append(_whole("lm_head.weight", (cfg.vocab_size, d), ("lm_head",)))
  return model, [dataclasses.replace(t, hf=f"model.layers.{{i}}.{t.hf}") for t in layer]


def _check_llama_switches(cfg: ModelConfig, family: str, like: ModelConfig, names=()):
  _same_switches(cfg, like, family, ("norm", "mlp", "qk_norm", *names))


# Starcoder2: LayerNorm (with bias), GELU MLP c_fc/c_proj, use_bias on every linear layer.
def _starcoder2_from_hf(hf):
  bias = bool(hf.get("use_bias", True))
  return _llama_style_from_hf(
    hf,
    family="starcoder2",
    layer_norm_epsilon=hf.get("norm_epsilon", 1e-5),
    activation=_activation(hf) if "hidden_act" in hf else "gelu_pytorch_tanh",
    norm="layernorm",
    mlp="gelu",
    mlp_bias=bias,
    qkv_bias=bias,
    attn_out_bias=bias,
    tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    sliding_window=_window(hf, False),
  )


_STARCODER2 = ModelConfig(norm="layernorm", mlp="gelu", qk_norm=False)


def _starcoder2_to_hf(cfg):
  _check_llama_switches(cfg, "Starcoder2", _STARCODER2)
  if not cfg.mlp_bias == cfg.qkv_bias == cfg.attn_out_bias:
    raise UnsupportedError("Starcoder2 has biases on every linear layer or on none (use_bias)")
  return _llama_style_to_hf(
    cfg,
    "Starcoder2ForCausalLM",
    "starcoder2",
    norm_epsilon=cfg.layer_norm_epsilon,
    use_bias=cfg.mlp_bias,
    sliding_window=cfg.sliding_window,
    residual_dropout=0.0,
    embedding_dropout=0.0,
  )


# Llama / Mistral: RMSNorm, gated MLP, attention_bias on q/k/v/o, mlp_bias.
def _llama_from_hf(hf, family="llama"):
  attn_bias = bool(hf.get("attention_bias", False))
  return _llama_style_from_hf(
    hf,
    family=family,
    norm="rmsnorm",
    mlp="gated",
    mlp_bias=bool(hf.get("mlp_bias", False)),
    qkv_bias=attn_bias,
    attn_out_bias=attn_bias,
    tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    sliding_window=_window(hf, False) if family == "mistral" else None,
  )


_LLAMA = ModelConfig(norm="rmsnorm", mlp="gated", qk_norm=False, mlp_bias=False)


def _llama_to_hf(cfg, arch="LlamaForCausalLM", model_type="llama"):
  _check_llama_switches(cfg, arch, _LLAMA)
  if cfg.qkv_bias != cfg.attn_out_bias:
    raise UnsupportedError(f"{arch} has biases on all of q/k/v/o or on none (attention_bias)")
  extra: dict[str, Any] = {"rms_norm_eps": cfg.layer_norm_epsilon}
  if model_type == "mistral":
    extra["sliding_window"] = cfg.sliding_window
  else:
    if cfg.sliding_window is not None:
      raise UnsupportedError(f"{arch} has no sliding window")
    extra.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias, pretraining_tp=1)
  if model_type == "mistral" and (cfg.qkv_bias or cfg.mlp_bias):
    raise UnsupportedError(f"{arch} has no biases")
  return _llama_style_to_hf(cfg, arch, model_type, **extra)


# Qwen2: Llama with q/k/v biases (no o bias); Qwen3: no biases (attention_bias), q/k norm.
def _qwen_from_hf(hf, family):
  qwen3 = family == "qwen3"
  attn_bias = bool(hf.get("attention_bias", False)) if qwen3 else True
  return _llama_style_from_hf(
    hf,
    family=family,
    norm="rmsnorm",
    mlp="gated",
    mlp_bias=False,
    qkv_bias=attn_bias,
    attn_out_bias=attn_bias and qwen3,
    qk_norm=qwen3,
    tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    sliding_window=_window(hf, True),
  )


def _qwen_to_hf(cfg, family):
  qwen3 = family == "qwen3"
  arch = "Qwen3ForCausalLM" if qwen3 else "Qwen2ForCausalLM"
  _same_switches(cfg, ModelConfig(norm="rmsnorm", mlp="gated", qk_norm=qwen3), arch, ("qk_norm",))
  _same_switches(cfg, _LLAMA, arch, ("norm", "mlp", "mlp_bias"))
  if qwen3 and cfg.qkv_bias != cfg.attn_out_bias:
    raise UnsupportedError(f"{arch} has biases on all of q/k/v/o or on none (attention_bias)")
  if not qwen3 and (not cfg.qkv_bias or cfg.attn_out_bias):
    raise UnsupportedError(f"{arch} has q/k/v biases and no output bias")
  window = cfg.sliding_window
  extra: dict[str, Any] = {
    "rms_norm_eps": cfg.layer_norm_epsilon,
    "use_sliding_window": window is not None,
    "sliding_window": window,
    "max_window_layers": 0 if window is not None else cfg.num_layers,
    "layer_types": ["sliding_attention" if window else "full_attention"] * cfg.num_layers,
  }
  if qwen3:
    extra["attention_bias"] = cfg.qkv_bias
  return _llama_style_to_hf(cfg, arch, family, **extra)


@dataclasses.dataclass(frozen=True)
class Family:
  architecture: str  # the HF class
  from_hf: Callable[[Mapping], dict]
  to_hf: Callable[[ModelConfig], dict]
  tensors: Callable[[ModelConfig], tuple[list[Tensor], list[Tensor]]]  # (model, per layer)


FAMILIES: dict[str, Family] = {
  "gpt_bigcode": Family(
    "GPTBigCodeForCausalLM", _gpt_bigcode_from_hf, _gpt_bigcode_to_hf, _gpt_bigcode_tensors
  ),
  "starcoder2": Family(
    "Starcoder2ForCausalLM", _starcoder2_from_hf, _starcoder2_to_hf, _llama_style_tensors
  ),
  "llama": Family("LlamaForCausalLM", _llama_from_hf, _llama_to_hf, _llama_style_tensors),
  "mistral": Family(
    "MistralForCausalLM",
    lambda hf: _llama_from_hf(hf, "mistral"),
    lambda cfg: _llama_to_hf(cfg, "MistralForCausalLM", "mistral"),
    _llama_style_tensors,
  ),
  "qwen2": Family(
    "Qwen2ForCausalLM",
    lambda hf: _qwen_from_hf(hf, "qwen2"),
    lambda cfg: _qwen_to_hf(cfg, "qwen2"),
    _llama_style_tensors,
  ),
  "qwen3": Family(
    "Qwen3ForCausalLM",
    lambda hf: _qwen_from_hf(hf, "qwen3"),
    lambda cfg: _qwen_to_hf(cfg, "qwen3"),
    _llama_style_tensors,
  ),
}
_BY_ARCHITECTURE = {f.architecture: name for name, f in FAMILIES.items()}
assert tuple(FAMILIES) == FAMILY_NAMES  # ModelConfig checks `family` against FAMILY_NAMES


def detect(hf: Mapping) -> str:
  """The family of an HF config.json dict, from `architectures` (else `model_type`)."""
  supported = ", ".join(sorted(_BY_ARCHITECTURE))
  archs = hf.get("architectures") or []
  if archs:
    if archs[0] not in _BY_ARCHITECTURE:
      raise UnsupportedError(f"architecture {archs[0]} is not supported (supported: {supported})")
    family = _BY_ARCHITECTURE[archs[0]]
    if hf.get("model_type") not in (None, family):
      raise UnsupportedError(
        f"model_type {hf['model_type']!r} does not match architecture {archs[0]} ({family!r})"
      )
    return family
  model_type = hf.get("model_type")
  if model_type not in FAMILIES:
    raise UnsupportedError(
      f"model_type {model_type!r} is not supported (supported: {', '.join(FAMILIES)})"
    )
  return model_type


def config_from_hf(hf: Mapping, **overrides) -> ModelConfig:
  """ModelConfig of an HF config.json dict (UnsupportedError for anything we do not implement)."""
  family = detect(hf)
  kw = FAMILIES[family].from_hf(hf)
  kw.setdefault("family", family)
  kw.update(overrides)
  try:
    return ModelConfig(**kw)
  except TypeError as e:
    raise UnsupportedError(str(e)) from None


def config_to_hf(cfg: ModelConfig, torch_dtype: str = "float32") -> dict[str, Any]:
  """The HF config.json of our config's family (UnsupportedError where that class cannot express a
  setting: it names the setting)."""
  if cfg.quant_bits or cfg.quant_embedding:
    raise UnsupportedError(
      "a quantized checkpoint has no HF form here; export the full-precision one it was "
      "quantized from"
    )
  out = FAMILIES[cfg.family].to_hf(cfg)
  out["torch_dtype"] = out["dtype"] = torch_dtype
  return out


def tensors(cfg: ModelConfig) -> tuple[list[Tensor], list[Tensor]]:
  """(model tensors, per-layer tensors with `{i}` in their names) of cfg's family."""
  return FAMILIES[cfg.family].tensors(cfg)

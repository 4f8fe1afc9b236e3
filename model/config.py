"""Model hyper-parameters: one frozen dataclass shared by the network, conversion and planning.

`ModelConfig` is hashable (a Flax module attribute and a jit static argument) and maps both
ways to an ml_collections `config.model` block and to HF `GPTBigCodeConfig` JSON.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import jax.numpy as jnp

from model.attention import IMPLEMENTATIONS as ATTENTION_IMPLS

ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_new", "gelu")
REMAT_POLICIES = ("none", "full", "dots")
QUANT_BITS = (0, 8, 4)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """GPTBigCode (StarCoder) hyper-parameters. Defaults are bigcode/starcoder's."""

  vocab_size: int = 49152  # V, StarCoder's BPE
  max_position_embeddings: int = 8192  # learned absolute positions = the longest context
  num_layers: int = 40
  embed_dim: int = 6144  # D
  num_heads: int = 48  # N query heads
  num_kv_heads: int = 1  # K: 1 = multi-query attention (StarCoder), N = multi-head
  mlp_dim: int = 24576  # F, HF n_inner (4 * D when null)
  layer_norm_epsilon: float = 1e-5
  activation: str = "gelu_pytorch_tanh"  # gelu with the tanh approximation; or gelu_new, gelu
  scale_attn_weights: bool = True  # scores / sqrt(H)
  bos_token_id: int | None = 0  # <|endoftext|> in StarCoder's vocabulary
  eos_token_id: int | None = 0
  pad_token_id: int | None = None  # None: pad with EOS (pad_id)
  # Numerics and memory.
  # compute dtype of matmuls and activations; softmax, logits and losses are fp32 regardless
  dtype: str = "bfloat16"
  param_dtype: str = "float32"  # master weights, as stored
  attention: str = "auto"  # attention dispatch (model/attention.py): auto = pallas on TPU, else xla
  remat: str = "none"  # none | full | dots (save matmul outputs, recompute the rest)
  # Weight-only quantization (model/quantize.py, `rrtf quantize`): the kernels of every linear
  # layer are stored as int8 or int4 with scales per output channel (quant_group 0) or per group
  # of quant_group input rows, dequantized inside the layer that uses them (transformer._dense).
  quant_bits: int = 0  # 0 (off), 8 or 4
  quant_group: int = 0  # input rows per scale; 0 = one scale per output channel
  quant_embedding: bool = False  # the tied embedding / LM head as int8, one scale per vocab row

  def __post_init__(self):
    if self.embed_dim % self.num_heads:
      raise ValueError(
        f"model.embed_dim={self.embed_dim} is not a multiple of model.num_heads={self.num_heads}"
      )
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"model.num_heads={self.num_heads} is not a multiple of "
        f"model.num_kv_heads={self.num_kv_heads}"
      )
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"model.activation={self.activation!r} is not one of {ACTIVATIONS}")
    if self.attention not in ATTENTION_IMPLS:
      raise ValueError(
        f"model.attention={self.attention!r} is not available; choose one of {ATTENTION_IMPLS}"
      )
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"model.remat={self.remat!r} is not one of {REMAT_POLICIES}")
    if self.quant_bits not in QUANT_BITS:
      raise ValueError(
        f"model.quant_bits={self.quant_bits} is not one of {QUANT_BITS} (0 = not quantized)"
      )
    if self.quant_group < 0 or (self.quant_group and not self.quant_bits):
      raise ValueError(f"model.quant_group={self.quant_group} needs quant_bits and must be >= 0")
    if self.quant_embedding and not self.quant_bits:
      raise ValueError("model.quant_embedding needs quant_bits")
    for field in ("dtype", "param_dtype"):
      try:
        jnp.dtype(getattr(self, field))
      except TypeError:
        raise ValueError(f"model.{field}={getattr(self, field)!r} is not a dtype") from None

  @property
  def pad_id(self) -> int:
    """The id that pads token arrays: pad_token_id, else eos_token_id, else 0 (padding is
    masked everywhere; the id only has to be in the vocabulary)."""
    for i in (self.pad_token_id, self.eos_token_id):
      if i is not None:
        return int(i)
    return 0

  @property
  def head_dim(self) -> int:  # H
    return self.embed_dim // self.num_heads

  @property
  def quant_dtype(self):
    return {8: jnp.int8, 4: jnp.int4}[self.quant_bits]

  def quant_groups(self, d_in: int) -> int:
    """Scales per output channel of a kernel with d_in input rows (flattened): 1 per channel, or
    d_in / quant_group (a group no smaller than d_in means one group)."""
    if not self.quant_group or self.quant_group >= d_in:
      return 1
    if d_in % self.quant_group:
      raise ValueError(
        f"model.quant_group={self.quant_group} does not divide a kernel's {d_in} input rows"
      )
    return d_in // self.quant_group

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    """From a plain dict or an ml_collections ConfigDict; unknown keys are an error."""
    d = dict(d.items())
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown model config field(s): {', '.join(unknown)}")
    return cls(**d)

  # ---- HF GPTBigCodeConfig JSON -------------------------------------------------------------
  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], **overrides) -> "ModelConfig":
    """From the dict of an HF `config.json` with model_type gpt_bigcode."""
    n_embd = hf.get("n_embd", hf.get("hidden_size"))
    n_head = hf.get("n_head", hf.get("num_attention_heads"))
    eos = hf.get("eos_token_id")
    if isinstance(eos, (list, tuple)):
      eos = eos[0] if eos else None
    kw = dict(
      vocab_size=hf["vocab_size"],
      max_position_embeddings=hf.get("n_positions", hf.get("max_position_embeddings")),
      num_layers=hf.get("n_layer", hf.get("num_hidden_layers")),
      embed_dim=n_embd,
      num_heads=n_head,
      num_kv_heads=1 if hf.get("multi_query", True) else n_head,
      mlp_dim=hf.get("n_inner") or 4 * n_embd,
      layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
      activation=hf.get("activation_function", "gelu_pytorch_tanh"),
      scale_attn_weights=hf.get("scale_attn_weights", True),
      bos_token_id=hf.get("bos_token_id"),
      eos_token_id=eos,
      pad_token_id=hf.get("pad_token_id"),
    )
    kw.update(overrides)
    return cls(**kw)

  def to_hf(self, torch_dtype: str = "float32") -> dict[str, Any]:
    """An HF `config.json` dict that transformers' GPTBigCodeForCausalLM loads."""
    if self.quant_bits:
      raise ValueError(
        "a quantized checkpoint has no HF GPTBigCode form; export the full-precision one"
      )
    if self.num_kv_heads not in (1, self.num_heads):
      raise ValueError(
        "GPTBigCode supports only multi-query (K=1) or multi-head (K=N) attention, "
        f"not K={self.num_kv_heads}"
      )
    return {
      "architectures": ["GPTBigCodeForCausalLM"],
      "model_type": "gpt_bigcode",
      "vocab_size": self.vocab_size,
      "n_positions": self.max_position_embeddings,
      "n_embd": self.embed_dim,
      "n_layer": self.num_layers,
      "n_head": self.num_heads,
      "n_inner": self.mlp_dim,
      "multi_query": self.num_kv_heads == 1,
      "activation_function": self.activation,
      "layer_norm_epsilon": self.layer_norm_epsilon,
      "scale_attn_weights": self.scale_attn_weights,
      "bos_token_id": self.bos_token_id,
      "eos_token_id": self.eos_token_id,
      "pad_token_id": self.pad_token_id,
      "attention_softmax_in_fp32": True,
      "scale_attention_softmax_in_fp32": True,
      "resid_pdrop": 0.0,
      "embd_pdrop": 0.0,
      "attn_pdrop": 0.0,
      "tie_word_embeddings": True,
      "use_cache": True,
      "torch_dtype": torch_dtype,
    }

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

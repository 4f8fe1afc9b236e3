"""Model hyper-parameters: one frozen dataclass shared by the network, conversion and planning.

`ModelConfig` is hashable (a Flax module attribute and a jit static argument) and maps both
ways to an ml_collections `config.model` block; model/families.py maps it both ways to the HF
`config.json` of each supported family (GPTBigCode, Starcoder2, Llama, Qwen2, Qwen3, Mistral).

One network, several families: the defaults are StarCoder's (GPTBigCode); the architecture
switches below (positions, norm, MLP, biases, q/k norm, tied head, head_dim, kv heads,
sliding window) describe the others.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import jax.numpy as jnp

from model.attention import IMPLEMENTATIONS as ATTENTION_IMPLS

ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_new", "gelu", "silu")
POSITION_EMBEDDINGS = ("learned", "rope")
ROPE_SCALINGS = ("none", "linear", "llama3")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "gated")
FAMILY_NAMES = ("gpt_bigcode", "starcoder2", "llama", "mistral", "qwen2", "qwen3")
REMAT_POLICIES = ("none", "full", "dots")
QUANT_BITS = (0, 8, 4)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder hyper-parameters. Defaults are bigcode/starcoder's (GPTBigCode)."""

  vocab_size: int = 49152  # V, StarCoder's BPE
  max_position_embeddings: int = 8192  # learned absolute positions = the longest context
  num_layers: int = 40
  embed_dim: int = 6144  # D
  num_heads: int = 48  # N query heads
  num_kv_heads: int = 1  # K: 1 = multi-query (StarCoder), N = multi-head, else grouped (GQA)
  mlp_dim: int = 24576  # F, HF n_inner (4 * D when null)
  layer_norm_epsilon: float = 1e-5  # the eps of every norm (LayerNorm or RMSNorm)
  # gelu_pytorch_tanh = gelu_new (tanh approximation), gelu (exact), silu (the gated MLP's)
  activation: str = "gelu_pytorch_tanh"
  scale_attn_weights: bool = True  # scores / sqrt(H)
  bos_token_id: int | None = 0  # <|endoftext|> in StarCoder's vocabulary
  eos_token_id: int | None = 0
  pad_token_id: int | None = None  # None: pad with EOS (pad_id)
  extra_eos_token_ids: tuple[int, ...] = ()  # more ids that end a generation (Llama 3, Qwen chat)
  # Architecture switches (model/families.py sets them from each family's HF config.json).
  family: str = "gpt_bigcode"  # the HF architecture read and exported (model/families.py)
  head_dim: int | None = None  # H; None: embed_dim // num_heads (Qwen3 sets it freely)
  position_embedding: str = "learned"  # learned: a [P, D] table (StarCoder) | rope
  rope_theta: float = 10000.0
  rope_scaling: str = "none"  # none | linear | llama3, computed as transformers computes them
  rope_factor: float = 1.0  # linear and llama3
  rope_low_freq_factor: float = 1.0  # llama3
  rope_high_freq_factor: float = 4.0  # llama3
  rope_original_max_position_embeddings: int = 8192  # llama3
  norm: str = "layernorm"  # layernorm (scale and bias) | rmsnorm (scale; Llama, Qwen)
  mlp: str = "gelu"  # gelu: proj(act(fc x)) | gated: proj(act(gate x) * up x) (Llama, Qwen)
  mlp_bias: bool = True  # biases of the MLP's linear layers
  qkv_bias: bool = True  # biases of the q, k and v projections (Qwen2: yes, Llama: no)
  attn_out_bias: bool = True  # bias of the attention output projection
  qk_norm: bool = False  # RMSNorm over head_dim of each query and key head, before RoPE (Qwen3)
  tie_embeddings: bool = True  # the LM head is wte; False: its own `lm_head` [V, D]
  sliding_window: int | None = None  # a query sees itself and the window - 1 tokens before it
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
    if self.head_dim is None:
      if self.embed_dim % self.num_heads:
        raise ValueError(
          f"model.embed_dim={self.embed_dim} is not a multiple of model.num_heads="
          f"{self.num_heads}; set model.head_dim"
        )
      object.__setattr__(self, "head_dim", self.embed_dim // self.num_heads)
    object.__setattr__(self, "extra_eos_token_ids", tuple(map(int, self.extra_eos_token_ids)))
    choices = (
      ("family", FAMILY_NAMES),
      ("position_embedding", POSITION_EMBEDDINGS),
      ("rope_scaling", ROPE_SCALINGS),
      ("norm", NORMS),
      ("mlp", MLPS),
    )
    for field, allowed in choices:
      if getattr(self, field) not in allowed:
        raise ValueError(f"model.{field}={getattr(self, field)!r} is not one of {allowed}")
    if self.head_dim < 1 or (self.position_embedding == "rope" and self.head_dim % 2):
      raise ValueError(f"model.head_dim={self.head_dim} must be positive (and even with RoPE)")
    if self.sliding_window is not None and self.sliding_window < 1:
      raise ValueError(f"model.sliding_window={self.sliding_window} must be >= 1 (or None)")
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
  def eos_ids(self) -> tuple[int, ...]:
    """Every id that ends a generation: eos_token_id, then extra_eos_token_ids."""
    first = () if self.eos_token_id is None else (int(self.eos_token_id),)
    return first + tuple(i for i in self.extra_eos_token_ids if i not in first)

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
    derived = self.head_dim == self.embed_dim // self.num_heads
    if derived and "head_dim" not in kw and ({"embed_dim", "num_heads"} & set(kw)):
      kw["head_dim"] = None  # a head_dim derived from D and N follows them
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

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

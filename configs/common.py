"""Pieces shared by the config files: the model block with a comment per field."""

from __future__ import annotations

import ml_collections


def model_block(**overrides) -> ml_collections.ConfigDict:
  """model.ModelConfig fields; defaults are bigcode/starcoder's."""
  m = ml_collections.ConfigDict()
  m.vocab_size = 49152  # V, StarCoder's BPE
  m.max_position_embeddings = 8192  # learned absolute positions = max context
  m.num_layers = 40
  m.embed_dim = 6144  # D
  m.num_heads = 48  # N query heads
  m.num_kv_heads = 1  # K: 1 = multi-query attention (StarCoder); N = multi-head
  m.mlp_dim = 24576  # F = 4 * D
  m.layer_norm_epsilon = 1e-5
  m.activation = "gelu_pytorch_tanh"  # gelu, tanh approximation
  m.scale_attn_weights = True  # scores / sqrt(head_dim)
  m.bos_token_id = 0  # <|endoftext|>
  m.eos_token_id = 0
  m.pad_token_id = ml_collections.config_dict.placeholder(int)
  m.dtype = "bfloat16"  # compute dtype; softmax, logits and losses are fp32 regardless
  m.param_dtype = "float32"  # master weights
  m.attention = "auto"  # auto (pallas on TPU, xla elsewhere) | pallas (ours) | splash (JAX's) | xla
  m.remat = "none"  # rematerialisation per layer: none | full | dots
  m.update(overrides)
  return m


def base_config(**model_overrides) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = model_block(**model_overrides)
  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.kind = "hf"  # hf (tokenizer.json beside the checkpoint) | sentencepiece
  c.tokenizer.vocab_size = c.model.get_ref("vocab_size")  # trained size for sentencepiece
  c.mesh = ""  # e.g. "data=2,fsdp=-1,tensor=4"; empty = every device on fsdp
  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 512  # global batch in sequences (the paper: 512 prompts)
  c.train.seq_len = 8192  # tokens per sequence
  c.seed = 0
  return c

"""meta-llama/Meta-Llama-3-8B: 32 layers, d 4096, 32 heads, 8 kv heads (GQA), RoPE (theta 5e5),
8192 positions, vocab 128256, RMSNorm, gated SiLU MLP, no biases, its own LM head.

The values are the published config.json's (LlamaForCausalLM); tests/test_configs.py checks
them against model/families.py. The base model ends text with <|end_of_text|> (128001);
Meta-Llama-3-8B-Instruct ends a turn with <|eot_id|> (128009), listed here too so that one
config decodes both.
  rrtf plan --config configs/llama3_8b.py --topology v5p:2x2x2
"""

from configs.common import base_config


def get_config():
  c = base_config(
    family="llama",
    vocab_size=128256,
    max_position_embeddings=8192,
    num_layers=32,
    embed_dim=4096,
    num_heads=32,
    num_kv_heads=8,
    mlp_dim=14336,
    layer_norm_epsilon=1e-5,  # rms_norm_eps
    activation="silu",
    bos_token_id=128000,  # <|begin_of_text|>
    eos_token_id=128001,  # <|end_of_text|>
    extra_eos_token_ids=(128009,),  # <|eot_id|>, the Instruct model's end of turn
    position_embedding="rope",
    rope_theta=500000.0,
    rope_scaling="none",  # Llama 3.1 adds llama3 scaling; Llama 3 has none
    norm="rmsnorm",
    mlp="gated",
    mlp_bias=False,
    qkv_bias=False,  # attention_bias: false
    attn_out_bias=False,
    qk_norm=False,
    tie_embeddings=False,
    sliding_window=None,
    remat="full",
  )
  c.train.batch_size = 512
  c.train.responses = 4
  c.train.seq_len = 2048
  c.train.microbatches = 8
  c.train.learning_rate = 2e-5
  return c

"""Qwen/Qwen2.5-Coder-7B: 28 layers, d 3584, 28 heads, 4 kv heads (GQA), RoPE (theta 1e6),
32768 positions, vocab 152064, RMSNorm, gated SiLU MLP, q/k/v biases only, its own LM head.

The values are the published config.json's (Qwen2ForCausalLM); tests/test_configs.py checks
them against model/families.py. config.json names a sliding_window but sets
use_sliding_window false: every layer attends to the whole context.
  rrtf plan --config configs/qwen2_5_coder_7b.py --topology v5p:2x2x2
"""

from configs.common import base_config


def get_config():
  c = base_config(
    family="qwen2",
    vocab_size=152064,
    max_position_embeddings=32768,
    num_layers=28,
    embed_dim=3584,
    num_heads=28,
    num_kv_heads=4,
    mlp_dim=18944,
    layer_norm_epsilon=1e-6,  # rms_norm_eps
    activation="silu",
    bos_token_id=151643,
    eos_token_id=151643,  # <|endoftext|>
    position_embedding="rope",
    rope_theta=1000000.0,
    norm="rmsnorm",
    mlp="gated",
    mlp_bias=False,
    qkv_bias=True,  # Qwen2: biases on q, k and v, none on o
    attn_out_bias=False,
    qk_norm=False,
    tie_embeddings=False,
    sliding_window=None,  # use_sliding_window: false
    remat="full",
  )
  c.train.batch_size = 512
  c.train.responses = 4
  c.train.seq_len = 2048
  c.train.microbatches = 8
  c.train.learning_rate = 2e-5
  return c

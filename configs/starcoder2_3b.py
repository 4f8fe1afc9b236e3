"""bigcode/starcoder2-3b: 30 layers, d 3072, 24 heads, 2 kv heads (GQA), RoPE, a 4096-token
sliding window, 16384 positions, vocab 49152, LayerNorm, GELU, biases everywhere, tied LM head.

The values are the published config.json's (Starcoder2ForCausalLM); tests/test_configs.py
checks them against model/families.py. A single-host size:
  rrtf plan --config configs/starcoder2_3b.py --topology v5e:2x4
"""

from configs.common import base_config


def get_config():
  c = base_config(
    family="starcoder2",
    vocab_size=49152,
    max_position_embeddings=16384,
    num_layers=30,
    embed_dim=3072,
    num_heads=24,
    num_kv_heads=2,
    mlp_dim=12288,
    layer_norm_epsilon=1e-5,  # norm_epsilon
    activation="gelu_pytorch_tanh",
    bos_token_id=0,
    eos_token_id=0,
    position_embedding="rope",
    rope_theta=999999.4420358813,  # as published (not 1e6)
    norm="layernorm",
    mlp="gelu",
    mlp_bias=True,  # use_bias: every linear layer
    qkv_bias=True,
    attn_out_bias=True,
    qk_norm=False,
    tie_embeddings=True,  # no tie_word_embeddings in config.json: Starcoder2Config's default
    sliding_window=4096,
    remat="full",
  )
  c.train.batch_size = 64
  c.train.responses = 4
  c.train.seq_len = 2048
  c.train.microbatches = 2
  c.train.learning_rate = 2e-5
  return c

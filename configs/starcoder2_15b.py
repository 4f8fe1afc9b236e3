"""bigcode/starcoder2-15b: 40 layers, d 6144, 48 heads, 4 kv heads (GQA), RoPE, a 4096-token
sliding window, 16384 positions, vocab 49152, LayerNorm, GELU, biases everywhere, its own LM head.

The values are the published config.json's (Starcoder2ForCausalLM); tests/test_configs.py
builds transformers' Starcoder2Config from them and checks that model/families.py reads it as
this model block. Training as configs/starcoder_15b.py (512 prompts x 4 responses x 2048
tokens in 8 micro-batches). At the full 16384-token context the step fits 64 v5p chips (71.9 of
95 GiB per chip); on 256 v5e chips the compiler refuses it (40.7 GiB of temporaries for 16): a
chip holds at least one prompt's 4 sequences, whose 40 layer inputs kept for the backward pass
are 30 GiB alone (benchmarks/results/plan_starcoder2_15b_*):
  rrtf plan --config configs/starcoder2_15b.py --topology v5p:4x4x4 --seq-len 16384
"""

from configs.common import base_config


def get_config():
  c = base_config(
    family="starcoder2",
    vocab_size=49152,
    max_position_embeddings=16384,
    num_layers=40,
    embed_dim=6144,
    num_heads=48,
    num_kv_heads=4,
    mlp_dim=24576,
    layer_norm_epsilon=1e-5,  # norm_epsilon
    activation="gelu_pytorch_tanh",
    bos_token_id=0,
    eos_token_id=0,
    position_embedding="rope",
    rope_theta=100000.0,
    norm="layernorm",
    mlp="gelu",  # c_fc -> gelu -> c_proj
    mlp_bias=True,  # use_bias: every linear layer
    qkv_bias=True,
    attn_out_bias=True,
    qk_norm=False,
    tie_embeddings=False,  # tie_word_embeddings: false (the 3B and 7B tie theirs)
    sliding_window=4096,
    remat="full",
  )
  c.train.batch_size = 512
  c.train.responses = 4
  c.train.seq_len = 2048
  c.train.microbatches = 8
  c.train.learning_rate = 2e-5
  return c

"""Qwen/Qwen2.5-Coder-32B: 64 layers, d 5120, 40 heads, 8 kv heads (GQA), RoPE (theta 1e6),
32768 positions, vocab 152064, RMSNorm, gated SiLU MLP, q/k/v biases only, its own LM head.

The values are the published config.json's (Qwen2ForCausalLM); tests/test_configs.py checks
them against model/families.py. Training as configs/starcoder_15b.py (512 prompts x 4
responses x 2048 tokens in 8 micro-batches). Plans (benchmarks/results/plan_qwen2_5_coder_32b_*):
fits 64 v5p chips as is; on 256 v5e chips the 152064-row embedding and LM head need the tensor
axis (every chip on fsdp, in 2 micro-batches, needs 19.7 of 16 GiB); int4 serving at batch 16
and 8192 tokens needs 8 v5e chips:
  rrtf plan --config configs/qwen2_5_coder_32b.py --topology v5p:4x4x4
  rrtf plan --config configs/qwen2_5_coder_32b.py --topology v5e:16x16 --mesh fsdp=64,tensor=4
  rrtf plan --config configs/qwen2_5_coder_32b.py --topology v5e:2x4 --decode --quant int4 \\
      --batch-size 16 --seq-len 8192
"""

from configs.common import base_config


def get_config():
  c = base_config(
    family="qwen2",
    vocab_size=152064,
    max_position_embeddings=32768,
    num_layers=64,
    embed_dim=5120,
    num_heads=40,
    num_kv_heads=8,
    mlp_dim=27648,
    # rms_norm_eps: 1e-5 in the 32B base models' config.json (Qwen2.5-32B, Qwen2.5-Coder-32B);
    # the 7B and the -Instruct models publish 1e-6
    layer_norm_epsilon=1e-5,
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

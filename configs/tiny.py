"""Tiny config: trains on a laptop CPU; the tokenizer is trained from shipped text.

rrtf demo                                   # uses this config
rrtf plan --config configs/tiny.py --topology v5e:2x2
"""

from configs.common import base_config


def get_config():
  c = base_config(
    vocab_size=1024,
    max_position_embeddings=512,
    num_layers=2,
    embed_dim=64,
    num_heads=4,
    num_kv_heads=1,
    mlp_dim=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=3,
    dtype="float32",
  )  # fp32 compute on CPU: bf16 matmuls are slow there
  c.tokenizer.kind = "sentencepiece"  # trained by data.tokenizer.train_sentencepiece
  c.train.batch_size = 8
  c.train.seq_len = 256
  c.train.steps = 20
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 2
  c.train.log_every = 1
  c.train.checkpoint_every = 5
  c.train.logprob_chunk = 64
  return c

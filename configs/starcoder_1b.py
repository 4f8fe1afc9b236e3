"""About 1.1B parameters: bigcode/starcoderbase-1b's shape (24 layers, d 2048, 16 heads, MQA).

A middle size between tiny and 15B, for single-host TPU runs and quick pod experiments:
  rrtf plan --config configs/starcoder_1b.py --topology v5e:2x2 --mesh fsdp=4
"""

from configs.common import base_config


def get_config():
  c = base_config(
    num_layers=24, embed_dim=2048, num_heads=16, num_kv_heads=1, mlp_dim=8192, remat="dots"
  )
  c.train.batch_size = 64
  c.train.seq_len = 2048
  return c

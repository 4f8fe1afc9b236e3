"""bigcode/starcoder (15.5B): 40 layers, d 6144, 48 heads, 1 kv head, 8192 positions, vocab 49152.

The paper's RRTF run: global batch 512 prompts. Convert the HF checkpoint, then check the fit:
  rrtf convert --hf-dir starcoder/ --out gs://BUCKET/starcoder --dtype bfloat16
  rrtf plan --config configs/starcoder_15b.py --topology v5p:4x4x4 --mesh fsdp=64
"""

from configs.common import base_config


def get_config():
  c = base_config(remat="full")
  c.train.batch_size = 512
  c.train.seq_len = 8192
  return c

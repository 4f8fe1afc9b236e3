"""bigcode/starcoder (15.5B): 40 layers, d 6144, 48 heads, 1 kv head, 8192 positions, vocab 49152.

The paper's RRTF run: global batch 512 prompts. Here each prompt brings R=4 responses of at most
2048 tokens (prompt included), and the batch runs as 8 micro-batches of 64 prompts. Convert the
HF checkpoint, then check the fit and train:
  rrtf convert --hf-dir starcoder/ --out gs://BUCKET/starcoder --dtype bfloat16
  rrtf plan --config configs/starcoder_15b.py --topology v5p:4x4x4
  rrtf train --config configs/starcoder_15b.py --workdir gs://BUCKET/run1 \\
      --config.init_from=gs://BUCKET/starcoder --config.data.dir=gs://BUCKET/prepared
"""

from configs.common import base_config


def get_config():
  c = base_config(remat="full")
  c.train.batch_size = 512
  c.train.responses = 4
  c.train.seq_len = 2048
  c.train.microbatches = 8
  c.train.learning_rate = 2e-5
  return c

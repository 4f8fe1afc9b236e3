"""Pieces shared by the config files: the model block (from model.ModelConfig) and the rest of
the config with a comment per field."""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections.config_dict import placeholder

from model.config import ModelConfig


def model_block(**overrides) -> ml_collections.ConfigDict:
  """The `config.model` block: every model.ModelConfig field with its default (the class,
  model/config.py, documents each field: bigcode/starcoder's shape), `overrides` applied."""
  block = ml_collections.ConfigDict()
  for field in dataclasses.fields(ModelConfig):
    value = overrides.pop(field.name, field.default)
    # A field that may be None keeps its type for `--config.model.X=` overrides.
    block[field.name] = placeholder(int) if value is None else value
  if overrides:
    raise ValueError(f"unknown model config field(s): {', '.join(sorted(overrides))}")
  return block


def base_config(**model_overrides) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = model_block(**model_overrides)
  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.kind = "hf"  # hf (tokenizer.json beside the checkpoint) | sentencepiece
  c.tokenizer.vocab_size = c.model.get_ref("vocab_size")  # trained size for sentencepiece
  c.mesh = ""  # e.g. "data=2,fsdp=-1,tensor=4"; empty = every device on fsdp
  c.init_from = ""  # a converted model checkpoint (rrtf convert) to start from; empty = random init
  c.data = ml_collections.ConfigDict()
  c.data.dir = ""  # the prepared dataset (rrtf prepare), local or gs://
  c.data.window = 8  # batches sorted by length together (bucketing), then shuffled
  c.data.buckets = ""  # batch lengths, e.g. "512,1024,2048"; empty = powers of 2 up to seq_len
  # Parts the data is cut into, each read by one host (0 = one per process). Fix it (a multiple
  # of every host count you will use) to keep the same global batches on slices of other sizes.
  c.data.splits = 0
  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 512  # global batch in prompts per optimizer step (the paper: 512)
  c.train.responses = 4  # R responses per prompt, ranked against each other
  c.train.seq_len = 2048  # tokens per response sequence (prompt + response), at most
  c.train.microbatches = 1  # gradient accumulation: the batch runs in this many pieces per step
  c.train.steps = 1000  # optimizer steps
  c.train.learning_rate = 2e-5  # peak
  c.train.schedule = "cosine"  # after warmup: cosine | linear | constant
  c.train.warmup_steps = 50
  c.train.end_lr_fraction = 0.1  # final learning rate as a fraction of the peak
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.eps = 1e-8
  c.train.weight_decay = 0.0  # AdamW, on kernels and embeddings only
  c.train.grad_clip = 1.0  # global-norm clipping; 0 = off
  c.train.weighting = "gap"  # pair weights: gap (PanGu-Coder2, r_j - r_i) | uniform (RRHF)
  c.train.pair_loss = "hinge"  # hinge (PanGu-Coder2, max(0, p_i - p_j)) | logistic (SimPO)
  c.train.beta = 2.0  # logistic only: -log sigmoid(beta * (p_j - p_i) - gamma); beta > 0
  c.train.gamma = 0.5  # logistic only: the target margin (SimPO's gamma)
  c.train.ft_normalization = "sum"  # L_ft over the best response: sum (paper) | mean per token
  c.train.ft_weight = 1.0  # lambda in L = L_rank + lambda * L_ft
  c.train.rank_weight = 1.0  # factor of L_rank; 0 = fine-tune on the best response only (ablation)
  c.train.logprob_chunk = 256  # positions per chunk of the [N, C, V] logits
  c.train.log_every = 10  # steps between metric writes (TensorBoard) and non-finite checks
  c.train.checkpoint_every = 100  # steps between checkpoints
  c.train.keep_checkpoints = 3  # newest checkpoints kept
  c.train.async_checkpoints = True  # save in the background while training goes on
  c.seed = 0
  return c

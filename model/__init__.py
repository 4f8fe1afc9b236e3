"""The network: GPTBigCode/StarCoder in flax.linen, attention, sharding, checkpoints, conversion.

Public API:
  ModelConfig, Transformer(config)(tokens[B, T], attention_mask) -> logits [B, T, V]
  load_checkpoint(path) -> (config, params); save_checkpoint(path, config, params)
"""

from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import ModelConfig
from model.transformer import Transformer, abstract_params, count_params, init_params

__all__ = ["ModelConfig", "Transformer", "abstract_params", "count_params", "init_params",
           "load_checkpoint", "save_checkpoint"]

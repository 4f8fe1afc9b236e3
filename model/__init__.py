"""The network: GPTBigCode/StarCoder in flax.linen, attention, sharding, checkpoints, conversion.

Public API:
  ModelConfig, Transformer(config)(tokens[B, T], attention_mask) -> logits [B, T, V]
  load_checkpoint(path) -> (config, params); save_checkpoint(path, config, params)

The names are re-exported on first use (PEP 562), so a light submodule (model.paths) does not
pull in JAX and orbax.
"""

import importlib
import os

# orbax reaches gs:// through etils.epath, which prefers tf.io.gfile whenever TensorFlow is
# installed; route it through fsspec/gcsfs like every other path in the project instead (one
# GCS client and one set of credentials; tf.io.gfile also cannot reach a GCS emulator). Set
# here, when any part of `model` is first imported, before anything uses orbax.
os.environ.setdefault("EPATH_USE_TF", "false")

_EXPORTS = {
  "ModelConfig": "model.config",
  "Transformer": "model.transformer",
  "abstract_params": "model.transformer",
  "count_params": "model.transformer",
  "init_params": "model.transformer",
  "load_checkpoint": "model.checkpoint",
  "save_checkpoint": "model.checkpoint",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'model' has no attribute {name!r}")
  return getattr(importlib.import_module(_EXPORTS[name]), name)

"""`rrtf params`: a training run's checkpoint -> a model checkpoint (parameters only), what
serve, sample, evaluate, quantize and export read."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp

from model import ModelConfig, abstract_params
from model.paths import join
from rrtf_jax.stages.train import CHECKPOINT_DIR
from rrtf_jax.train_step import TrainError


def save_model(
  workdir: str,
  out: str,
  *,
  step: int | None = None,
  dtype: str | None = None,
  tokenizer: str | None = None,
) -> tuple[str, int]:
  """A training run's parameters at `step` (default: its newest checkpoint) -> a model checkpoint
  (`rrtf params`), what serve, sample, evaluate and export read. Only the parameters are read,
  onto this host's CPU, whatever topology wrote them. The tokenizer comes from `tokenizer`, else
  from the run's config.init_from checkpoint. Returns (path, step)."""
  import fsspec
  import orbax.checkpoint as ocp

  from model import save_checkpoint
  from model.checkpoint import tokenizer_path

  cfg_path = join(workdir, "config.json")
  try:
    with fsspec.open(cfg_path, "r") as f:
      config = json.load(f)
  except FileNotFoundError:
    raise TrainError(f"{workdir}: not a training workdir (no config.json)") from None
  if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
    raise TrainError(f"{cfg_path}: not an `rrtf train` config (no model section)")
  model_cfg = ModelConfig.from_dict(config["model"])
  mngr = ocp.CheckpointManager(
    join(workdir, CHECKPOINT_DIR), item_handlers={"state": ocp.PyTreeCheckpointHandler()}
  )
  try:
    steps = sorted(mngr.all_steps())
    if not steps:
      raise TrainError(f"{workdir}: no training checkpoints in {CHECKPOINT_DIR}/")
    step = steps[-1] if step is None else step
    if step not in steps:
      raise TrainError(f"{workdir}: no checkpoint of step {step} (there are {steps})")
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    try:
      want = jnp.dtype(dtype or model_cfg.param_dtype)
    except TypeError:
      raise TrainError(f"--dtype {dtype}: not a dtype") from None
    target = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, want, sharding=cpu),
      nn.unbox(abstract_params(model_cfg)),
    )
    args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=cpu, dtype=want), target)
    restored = mngr.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
          {"params": target}, restore_args={"params": args}, partial_restore=True
        )
      ),
    )
  finally:
    mngr.close()
  if dtype:
    model_cfg = model_cfg.replace(param_dtype=str(want))
  tok = tokenizer or (tokenizer_path(config["init_from"]) if config.get("init_from") else None)
  return save_checkpoint(out, model_cfg, restored["state"]["params"], tokenizer_dir=tok), step

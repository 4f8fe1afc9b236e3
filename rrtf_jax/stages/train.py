"""`rrtf train`: the training loop around the RRTF train step (rrtf_jax/train_step.py).

Letters: B prompts (global batch), b prompts on this host, R responses per prompt, T tokens.

  train_and_evaluate(config, workdir)           # `rrtf train`

The loop reads the prepared dataset (data/loader.py) with a per-host split, builds global
arrays with `jax.make_array_from_process_local_data`, keeps orbax checkpoints (async, the
newest N, the data position saved with the step), resumes from the newest one in the
workdir, and saves at the current step on SIGTERM (what a TPU VM gets before preemption);
with several hosts, at a step they all agree on (`_Preemption`), whichever host got it.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import threading
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from model.transformer import param_initializer
from model.paths import join
from model.sharding import LOGICAL_RULES, make_mesh
from rrtf_jax import multihost
from rrtf_jax.metric_logger import MetricLogger
from rrtf_jax.train_step import (
  BATCH_DTYPES,
  NETWORK_FIELDS,
  TrainError,
  TrainState,
  batch_shardings,
  check_batch_layout,
  check_param_layout,
  jit_train_step,
  make_optimizer,
  state_shardings,
  validate_config,
)

CHECKPOINT_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"
DATA_READ_DIR = "data_read"

# ---- the loop ------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainResult:
  step: int  # optimizer steps done
  resumed_from: int | None  # checkpoint step the run started from
  preempted: bool  # stopped by SIGTERM after saving
  history: list[dict]  # per-step metrics of this run (host floats)
  params: Any = None  # final parameters (jax arrays)


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True, devices=None
) -> TrainResult:
  """Trains `config` in `workdir`, resuming from its newest checkpoint; see the module docstring.

  The name follows the Flax examples' convention; evaluation (HumanEval pass@k) is `rrtf
  evaluate`, run on a model checkpoint that `rrtf params` makes of this run's checkpoints.
  """
  multihost.initialize()  # a no-op unless this is one of several processes (rrtf_jax/multihost.py)
  model_cfg = validate_config(config)
  train_cfg = config.train
  _check_data_dir(config.data.dir)
  mesh = make_mesh(config.mesh or None, devices)
  check_batch_layout(train_cfg, mesh, jax.process_count())
  tx = make_optimizer(train_cfg)
  abstract, shard = state_shardings(model_cfg, tx, mesh)
  check_param_layout(abstract, mesh)
  if jax.process_index() == 0:
    _write_config(workdir, config)
  mngr = _checkpoint_manager(workdir, train_cfg)
  try:
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
      state, data_state, resumed_from = _restore_or_init(
        mngr, config, model_cfg, tx, abstract, shard
      )
      step_fn = jit_train_step(model_cfg, train_cfg, tx, mesh, shard)
    start = step = int(jax.device_get(state.step))
    batches = _train_batches(config, model_cfg, data_state)
    logger = _metric_logger(workdir, train_cfg, start, progress, mngr)
    preemption, preempted = _Preemption(start), False
    steps, log_every = int(train_cfg.steps), int(train_cfg.log_every)
    batch_size, b_shard = int(train_cfg.batch_size), batch_shardings(mesh)
    with logger, preemption, jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
      while step < steps:
        local, data_state = next(batches)
        _check_token_ids(local, model_cfg.vocab_size, config.data.dir)
        state, metrics = step_fn(state, _global_batch(local, batch_size, b_shard))
        step += 1
        logger.add(step, metrics, local)
        if step % log_every == 0 or step == steps:
          logger.flush()
        if preemption.reached(step):
          logger.flush()
          _save(mngr, step, state, data_state, force=True)
          preempted = True
          break
        if mngr.should_save(step) or step == steps:
          logger.flush()  # never save a step whose loss was not checked
          _save(mngr, step, state, data_state, force=step == steps)
      logger.flush()
    mngr.wait_until_finished()
    _write_data_read(workdir, batches, start, step)
    batches.close()
    return TrainResult(
      step=step,
      resumed_from=resumed_from,
      preempted=preempted,
      history=logger.history,
      params=state.params,
    )
  finally:
    mngr.wait_until_finished()
    mngr.close()


class _Preemption:
  """Whether to save and stop after a step: SIGTERM (a TPU VM's preemption notice) reached a
  process. Every process gets the same answer at the same step: one that left the loop alone
  would wait in the collective save while the others wait in the next step.

  One process: a Python SIGTERM handler sets a flag, read after each step.
  Several (jax.distributed): JAX's preemption sync point alone. jax.distributed.initialize()
  installs JAX's own SIGTERM handler (C++, polled each second); on a notice at any process
  every process reports the step it is at, and the sync point is the step after the largest,
  the same on all. No Python handler then: signal.signal would replace JAX's, its notice would
  never come, and only the process that got the signal would stop. JAX's step counters start
  at 0, so it is given steps of this run (1, 2, ...): a notice during restore or compiling
  then stops after the run's first step (with the checkpoint's step it would never come).
  A notice that comes too late for a step before the last one lets the run finish instead.
  """

  def __init__(self, start: int):
    self.start = start
    self.stop = threading.Event()
    self.old_handler = None

  def __enter__(self) -> _Preemption:
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self.old_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc) -> None:
    if self.old_handler is not None:
      signal.signal(signal.SIGTERM, self.old_handler)

  def _on_sigterm(self, signum, frame) -> None:
    self.stop.set()

  def reached(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.stop.is_set()
    from jax.experimental import multihost_utils

    return multihost_utils.reached_preemption_sync_point(step - self.start)


# ---- the steps of a run ------------------------------------------------------------------------


def _check_data_dir(data_dir: str) -> None:
  """A missing or wrong data dir fails before anything is built."""
  from data.prepared import open_prepared

  if not data_dir:
    raise TrainError(
      "config.data.dir is empty: pass --config.data.dir=DIR (a dataset from `rrtf prepare`)"
    )
  open_prepared(data_dir)


def _checkpoint_manager(workdir: str, train_cfg):
  import orbax.checkpoint as ocp

  from model.checkpoint import use_ocdbt

  opts = ocp.CheckpointManagerOptions(
    max_to_keep=int(train_cfg.keep_checkpoints),
    save_interval_steps=int(train_cfg.checkpoint_every),
    enable_async_checkpointing=bool(train_cfg.async_checkpoints),
  )
  handlers = {
    "state": ocp.StandardCheckpointHandler(use_ocdbt=use_ocdbt()),
    "data": ocp.JsonCheckpointHandler(),
  }
  return ocp.CheckpointManager(join(workdir, CHECKPOINT_DIR), options=opts, item_handlers=handlers)


def _restore_or_init(mngr, config, model_cfg, tx, abstract, shard):
  """(train state, data position, its checkpoint step) from the newest checkpoint in the
  workdir; without one, the initial state at the start of the data (and step None)."""
  import orbax.checkpoint as ocp

  from data.loader import DataState

  latest = mngr.latest_step()
  if latest is None:
    return _initial_state(config, model_cfg, tx, shard), DataState(), None
  restored = mngr.restore(
    latest,
    args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()),
  )
  return restored["state"], DataState(**restored["data"]), latest


def _initial_state(config, model_cfg, tx, shard) -> TrainState:
  if config.init_from:
    params = _init_from_checkpoint(config.init_from, model_cfg, shard)
  else:
    init = jax.jit(param_initializer(model_cfg), out_shardings=shard.params)
    params = init(jax.random.PRNGKey(int(config.seed)))
  opt_state = jax.jit(tx.init, out_shardings=shard.opt_state)(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), shard.step)
  return TrainState(step=step, params=params, opt_state=opt_state)


def _init_from_checkpoint(path: str, model_cfg, shard):
  """The parameters of a model checkpoint (config.init_from) of the config's network (every
  NETWORK_FIELDS field: a Llama checkpoint needs a config whose model block is Llama's)."""
  from model import load_checkpoint
  from model.checkpoint import is_checkpoint, read_config

  if not is_checkpoint(path):
    raise TrainError(f"config.init_from={path}: not a model checkpoint")
  src = read_config(path)
  if src.quant_bits:
    raise TrainError(
      f"config.init_from={path}: a quantized checkpoint cannot be trained; start "
      "from the full-precision one it was quantized from"
    )
  diff = [f for f in NETWORK_FIELDS if getattr(src, f) != getattr(model_cfg, f)]
  if diff:
    which = ", ".join(f"{f} ({getattr(src, f)} vs {getattr(model_cfg, f)})" for f in diff)
    raise TrainError(f"config.init_from={path}: the model differs from config.model in {which}")
  _, params = load_checkpoint(path, shardings=shard.params, dtype=jnp.dtype(model_cfg.param_dtype))
  return params


def _train_batches(config, model_cfg, start):
  """This host's [b, R, T] batches from the data position `start` (data/loader.py)."""
  from data.loader import train_batches

  train_cfg, n_proc = config.train, jax.process_count()
  buckets = [int(x) for x in str(config.data.buckets).split(",") if x.strip()] or None
  return train_batches(
    config.data.dir,
    batch_size=int(train_cfg.batch_size) // n_proc,
    responses=int(train_cfg.responses),
    seq_len=int(train_cfg.seq_len),
    pad_id=model_cfg.pad_id,
    seed=int(config.seed),
    start=start,
    buckets=buckets,
    window=int(config.data.window),
    process_index=jax.process_index(),
    process_count=n_proc,
    splits=int(config.data.get("splits", 0)) or None,
    agree_length=_agree_length,
  )


def _agree_length(t: int) -> int:
  """Every host must compile the same batch length: the longest any host asked for."""
  if jax.process_count() == 1:
    return t
  from jax.experimental import multihost_utils

  return int(np.max(multihost_utils.process_allgather(np.int32(t))))


def _metric_logger(workdir: str, train_cfg, start: int, progress: bool, mngr) -> MetricLogger:
  """Every process checks its metrics; process 0 writes TensorBoard and shows the bar."""
  first = jax.process_index() == 0
  return MetricLogger(
    join(workdir, TENSORBOARD_DIR) if first else None,
    start=start,
    steps=int(train_cfg.steps),
    progress=progress and first,
    process_count=jax.process_count(),
    newest_checkpoint=mngr.latest_step,
  )


def _check_token_ids(local: dict, vocab_size: int, data_dir: str) -> None:
  if local["inputs"].size and int(local["inputs"].max()) >= vocab_size:
    raise TrainError(
      f"{data_dir}: token id {int(local['inputs'].max())} is outside the model's "
      f"vocabulary ({vocab_size}); prepare the data with this model's tokenizer"
    )


def _global_batch(local: dict, batch_size: int, shardings: dict) -> dict:
  """This host's [b, ...] rows -> global [B, ...] arrays (each host gives its own rows)."""
  return {
    k: jax.make_array_from_process_local_data(
      shardings[k], np.asarray(local[k], BATCH_DTYPES[k]), (batch_size,) + local[k].shape[1:]
    )
    for k in BATCH_DTYPES
  }


def _save(mngr, step: int, state: TrainState, data_state, *, force: bool = False) -> None:
  """A checkpoint of `step`: the train state and the data position after it (JSON)."""
  import orbax.checkpoint as ocp

  data = ocp.args.JsonSave(dataclasses.asdict(data_state))
  mngr.save(
    step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=data), force=force
  )


def _write_data_read(workdir: str, batches, start: int, step: int) -> None:
  """What this host read in this run (its data parts and the task ids of the prompts it
  trained on): data_read/process-I-of-N.json, rewritten by every run."""
  import fsspec

  n, i = jax.process_count(), jax.process_index()
  fs, root = fsspec.core.url_to_fs(join(workdir, DATA_READ_DIR))
  fs.makedirs(root, exist_ok=True)
  with fs.open(f"{root}/process-{i}-of-{n}.json", "w") as f:
    json.dump(
      {
        "process_index": i,
        "process_count": n,
        "parts": batches.parts,
        "steps": [start, step],
        "task_ids": sorted(batches.task_ids_read),
      },
      f,
    )


def _write_config(workdir: str, config) -> None:
  import fsspec

  fs, _ = fsspec.core.url_to_fs(workdir)
  fs.makedirs(workdir, exist_ok=True)
  with fsspec.open(join(workdir, "config.json"), "w") as f:
    f.write(json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str))

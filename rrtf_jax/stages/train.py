"""`rrtf train`: the training loop around the RRTF train step (rrtf_jax/train_step.py).

Letters: B prompts (global batch), b prompts on this host, R responses per prompt, T tokens.

  train_and_evaluate(config, workdir)           # `rrtf train`

The loop reads the prepared dataset (data/loader.py) with a per-host split, builds global
arrays with `jax.make_array_from_process_local_data`, keeps orbax checkpoints (async, the
newest N, the data position saved with the step), resumes from the newest one in the
workdir, and saves at the current step on SIGTERM (what a TPU VM gets before preemption);
with several hosts, at a step they all agree on (`_preempted`), whichever host got it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import signal
import threading
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from model.transformer import param_initializer
from model.sharding import LOGICAL_RULES, make_mesh
from rrtf_jax import multihost
from rrtf_jax.train_step import (BATCH_DTYPES, SHAPE_FIELDS, TrainError, TrainState, batch_shardings,
                                 check_batch_layout, jit_train_step, make_optimizer, state_shardings,
                                 validate_config)

CHECKPOINT_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"

# ---- the loop ------------------------------------------------------------------------------------

@dataclasses.dataclass
class TrainResult:
  step: int  # optimizer steps done
  resumed_from: int | None  # checkpoint step the run started from
  preempted: bool  # stopped by SIGTERM after saving
  history: list[dict]  # per-step metrics of this run (host floats)
  params: Any = None  # final parameters (jax arrays)


def _agree_length(t: int) -> int:
  """Every host must compile the same batch length: the longest any host asked for."""
  if jax.process_count() == 1:
    return t
  from jax.experimental import multihost_utils
  return int(np.max(multihost_utils.process_allgather(np.int32(t))))


def _preempted(stop: threading.Event, start: int, step: int) -> bool:
  """Whether to save and stop after `step`: SIGTERM (a TPU VM's preemption notice) reached a
  process. Every process must get the same answer at the same step: one that left the loop
  alone would wait in the collective save while the others wait in the next step.

  One process: the Python SIGTERM handler's flag. Several (jax.distributed): JAX's preemption
  sync point alone. jax.distributed.initialize() installs JAX's own SIGTERM handler (C++,
  polled each second); on a notice at any process, every process reports the step it is at
  and the sync point is the step after the largest, the same on all. So no Python handler
  then: signal.signal would replace JAX's, whose notice would never come. JAX's counters
  start at 0, so it is given this run's steps (1, 2, ...): a notice during restore or
  compiling stops after the run's first step, where the checkpoint's steps would never meet it.
  """
  if jax.process_count() == 1:
    return stop.is_set()
  from jax.experimental import multihost_utils
  return multihost_utils.reached_preemption_sync_point(step - start)


def _checkpoint_manager(workdir: str, tc):
  import orbax.checkpoint as ocp

  from model.checkpoint import use_ocdbt
  opts = ocp.CheckpointManagerOptions(max_to_keep=int(tc.keep_checkpoints),
                                      save_interval_steps=int(tc.checkpoint_every),
                                      enable_async_checkpointing=bool(tc.async_checkpoints))
  handlers = {"state": ocp.StandardCheckpointHandler(use_ocdbt=use_ocdbt()), "data": ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(_join(workdir, CHECKPOINT_DIR), options=opts, item_handlers=handlers)


class _ObjectStoreEventFile:
  """An event file on an object store (gs://) for tensorboardX, through fsspec/gcsfs like every
  other path here (tensorboardX's own gs:// writer needs google-cloud-storage). Objects cannot
  be appended to, so each flush uploads the whole file; metrics files stay small."""

  def __init__(self, path: str):
    self.path, self.buffer = path, io.BytesIO()

  def write(self, data: bytes) -> None:
    self.buffer.write(data)

  def flush(self) -> None:
    import fsspec
    with fsspec.open(self.path, "wb") as f:
      f.write(self.buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _ObjectStoreEventFiles:
  def open(self, path: str) -> _ObjectStoreEventFile:
    return _ObjectStoreEventFile(path)

  def directory_check(self, path: str) -> None:  # object stores need no directories
    pass


def _summary_writer(logdir: str, purge_step: int | None):
  from tensorboardX import SummaryWriter
  from tensorboardX.record_writer import register_writer_factory
  if "://" in logdir:
    register_writer_factory(logdir.split("://", 1)[0], _ObjectStoreEventFiles())
  return SummaryWriter(logdir, purge_step=purge_step)


def _join(a: str, b: str) -> str:
  return f"{a.rstrip('/')}/{b}"


def _initial_state(config, model_cfg, tx, abstract, shard, mesh) -> TrainState:
  if config.init_from:
    from model import load_checkpoint
    from model.checkpoint import is_checkpoint, read_config
    if not is_checkpoint(config.init_from):
      raise TrainError(f"config.init_from={config.init_from}: not a model checkpoint")
    src = read_config(config.init_from)
    if src.quant_bits:
      raise TrainError(f"config.init_from={config.init_from}: a quantized checkpoint cannot be trained; start "
                       "from the full-precision one it was quantized from")
    diff = [f for f in SHAPE_FIELDS if getattr(src, f) != getattr(model_cfg, f)]
    if diff:
      raise TrainError(f"config.init_from={config.init_from}: model shape differs from the config in "
                       + ", ".join(f"{f} ({getattr(src, f)} vs {getattr(model_cfg, f)})" for f in diff))
    _, params = load_checkpoint(config.init_from, shardings=shard.params, dtype=model_cfg.weight_dtype)
  else:
    params = jax.jit(param_initializer(model_cfg), out_shardings=shard.params)(jax.random.PRNGKey(int(config.seed)))
  opt_state = jax.jit(tx.init, out_shardings=shard.opt_state)(params)
  return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), shard.step), params=params, opt_state=opt_state)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True,
                       devices=None) -> TrainResult:
  """Trains `config` in `workdir`, resuming from its newest checkpoint; see the module docstring.

  The name follows the Flax examples' convention; evaluation (pass@k of checkpoints) belongs to
  `rrtf evaluate`, which is not built yet.
  """
  import orbax.checkpoint as ocp
  from tqdm import tqdm

  from data.loader import DataState, padding_fraction, train_batches
  from data.prepared import open_prepared

  multihost.initialize()  # a no-op unless this is one of several processes (rrtf_jax/multihost.py)
  model_cfg = validate_config(config)
  tc = config.train
  if not config.data.dir:
    raise TrainError("config.data.dir is empty: pass --config.data.dir=DIR (a dataset from `rrtf prepare`)")
  open_prepared(config.data.dir)  # a wrong data dir fails before anything is built
  mesh = make_mesh(config.mesh or None, devices)
  n_proc, proc = jax.process_count(), jax.process_index()
  check_batch_layout(tc, mesh, n_proc)
  tx = make_optimizer(tc)
  abstract, shard = state_shardings(model_cfg, tx, mesh)
  b_shard = batch_shardings(mesh)
  buckets = [int(x) for x in str(config.data.buckets).split(",") if x.strip()] or None

  mngr = _checkpoint_manager(workdir, tc)
  if proc == 0:
    _write_config(workdir, config)
  writer = None
  try:
    latest = mngr.latest_step()
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
      if latest is not None:
        restored = mngr.restore(latest, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
        state, data_state = restored["state"], DataState(**restored["data"])
      else:
        state, data_state = _initial_state(config, model_cfg, tx, abstract, shard, mesh), DataState()
      step_fn = jit_train_step(model_cfg, tc, tx, mesh, shard)
    start = int(jax.device_get(state.step))
    batches = train_batches(
        config.data.dir, batch_size=int(tc.batch_size) // n_proc, responses=int(tc.responses),
        seq_len=int(tc.seq_len), pad_id=model_cfg.pad_id, seed=int(config.seed), start=data_state, buckets=buckets,
        window=int(config.data.window), process_index=proc, process_count=n_proc,
        splits=int(config.data.get("splits", 0)) or None, agree_length=_agree_length)

    if proc == 0:
      writer = _summary_writer(_join(workdir, TENSORBOARD_DIR), purge_step=start + 1 if start else None)
    stop = threading.Event()
    old_handler = None
    if n_proc == 1 and threading.current_thread() is threading.main_thread():  # (see _preempted)
      old_handler = signal.signal(signal.SIGTERM, lambda *_: stop.set())

    history: list[dict] = []
    pending: list[tuple[int, dict, dict]] = []  # (step, device metrics, host stats) not yet fetched
    last = time.perf_counter()
    bar = tqdm(total=int(tc.steps), initial=start, desc="train", unit="step", disable=not progress or proc != 0,
               dynamic_ncols=True)

    def flush():
      """Fetches pending metrics, stops on a non-finite loss, writes TensorBoard and the bar."""
      nonlocal last
      if not pending:
        return
      fetched = jax.device_get([m for _, m, _ in pending])
      now = time.perf_counter()
      tokens = sum(h["tokens"] for _, _, h in pending)
      for (s, _, host), m in zip(pending, fetched):
        row = {k: float(v) for k, v in m.items()}
        if not math.isfinite(row["loss"]):
          raise TrainError(f"non-finite loss ({row['loss']}) at step {s}; stopping without saving this step "
                           f"(the newest checkpoint is step {mngr.latest_step()})")
        row.update(step=s, padding_fraction=host["padding_fraction"], seq_len=host["seq_len"])
        history.append(row)
        if writer is not None:
          for k, v in row.items():
            if k != "step":
              writer.add_scalar(f"train/{k}", v, s)
      rate = tokens / max(now - last, 1e-9)
      last = now
      if writer is not None:
        writer.add_scalar("train/tokens_per_second", rate, pending[-1][0])
        writer.flush()
      r = history[-1]
      bar.set_postfix_str(f"loss {r['loss']:.4f} rank {r['rank_loss']:.4f} ft {r['ft_loss']:.2f} "
                          f"acc {r['ranking_accuracy']:.2f} tok/s {rate:,.0f} pad {r['padding_fraction']:.2f}",
                          refresh=False)
      bar.update(pending[-1][0] - bar.n)
      pending.clear()

    def save(step: int, force: bool = False) -> None:
      mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                              data=ocp.args.JsonSave(dataclasses.asdict(data_state))), force=force)

    step = start
    preempted = False
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
      while step < int(tc.steps):
        local, data_state = next(batches)
        if local["inputs"].size and int(local["inputs"].max()) >= model_cfg.vocab_size:
          raise TrainError(f"{config.data.dir}: token id {int(local['inputs'].max())} is outside the model's "
                           f"vocabulary ({model_cfg.vocab_size}); prepare the data with this model's tokenizer")
        batch = {k: jax.make_array_from_process_local_data(
            b_shard[k], np.asarray(local[k], BATCH_DTYPES[k]),
            (int(tc.batch_size),) + local[k].shape[1:]) for k in BATCH_DTYPES}
        state, metrics = step_fn(state, batch)
        step += 1
        seg = local["segment_ids"]
        pending.append((step, metrics, {"tokens": int(seg.sum()) * n_proc, "seq_len": seg.shape[-1],
                                        "padding_fraction": padding_fraction(local)}))
        if step % int(tc.log_every) == 0 or step == int(tc.steps):
          flush()
        if _preempted(stop, start, step):
          flush()
          save(step, force=True)
          preempted = True
          break
        if mngr.should_save(step) or step == int(tc.steps):
          flush()  # never save a step whose loss was not checked
          save(step, force=step == int(tc.steps))
      flush()
    mngr.wait_until_finished()
    bar.close()
    _write_data_read(workdir, batches, start, step)
    batches.close()
    if old_handler is not None:
      signal.signal(signal.SIGTERM, old_handler)
    return TrainResult(step=step, resumed_from=latest, preempted=preempted, history=history, params=state.params)
  finally:
    mngr.wait_until_finished()
    mngr.close()
    if writer is not None:
      writer.close()


DATA_READ_DIR = "data_read"


def _write_data_read(workdir: str, batches, start: int, step: int) -> None:
  """What this host read in this run (its data parts and the task ids drawn from them):
  data_read/process-I-of-N.json, rewritten by every run."""
  import fsspec
  n, i = jax.process_count(), jax.process_index()
  fs, root = fsspec.core.url_to_fs(_join(workdir, DATA_READ_DIR))
  fs.makedirs(root, exist_ok=True)
  with fs.open(f"{root}/process-{i}-of-{n}.json", "w") as f:
    json.dump({"process_index": i, "process_count": n, "parts": batches.parts, "steps": [start, step],
               "task_ids": sorted(batches.task_ids_read)}, f)


def _write_config(workdir: str, config) -> None:
  import fsspec
  fs, _ = fsspec.core.url_to_fs(workdir)
  fs.makedirs(workdir, exist_ok=True)
  with fsspec.open(_join(workdir, "config.json"), "w") as f:
    f.write(json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str))

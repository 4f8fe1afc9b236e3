"""RRTF training: one jitted, sharded train step and the loop around it.

Letters: B prompts (global batch), b prompts on this host, M micro-batches, R responses per
prompt, T tokens.

  state, metrics = train_step(state, batch)     # pure; jitted with explicit shardings
  train_and_evaluate(config, workdir)           # `rrtf train`

The step runs the model on the B*R (prompt + response) sequences, takes per-token
log-probabilities from the hidden states in chunks (never the full [B*R, T, V] logits),
and applies the RRTF loss (rrtf_jax/loss.py). Parameters are fp32 master weights; matmuls
run in `model.dtype` (bf16 on TPU). Gradients of M micro-batches are summed in a scan before
one AdamW update (clipped by global norm), so the paper's 512 prompts fit any pod.

The loop reads the prepared dataset (data/pipeline.py) with a per-host split, builds global
arrays with `jax.make_array_from_process_local_data`, keeps orbax checkpoints (async, the
newest N, the data position saved with the step), resumes from the newest one in the
workdir, and saves at the current step on SIGTERM (what a TPU VM gets before preemption).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import signal
import threading
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from model import ModelConfig, Transformer, abstract_params
from model.sharding import LOGICAL_RULES, batch_sharding, logical_to_sharding, make_mesh, replicated
from rrtf_jax import multihost
from rrtf_jax.loss import rrtf_loss, token_logprobs

SCHEDULES = ("cosine", "linear", "constant")
CHECKPOINT_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"
# Model fields that decide parameter shapes: an init_from checkpoint must agree on them.
SHAPE_FIELDS = ("vocab_size", "max_position_embeddings", "num_layers", "embed_dim", "num_heads",
                "num_kv_heads", "mlp_dim")


class TrainError(ValueError):
  """A training run cannot start or go on; the message is one line."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # optimizer updates done
  params: Any
  opt_state: Any


# ---- optimizer ---------------------------------------------------------------------------------

def learning_rate_schedule(tc: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then cosine or linear decay to end_lr_fraction * peak."""
  peak, warm, steps = float(tc.learning_rate), int(tc.warmup_steps), int(tc.steps)
  end = peak * float(tc.end_lr_fraction)
  if tc.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, warm, max(steps, warm + 1), end)
  if tc.schedule == "linear":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warm), optax.linear_schedule(peak, end, max(steps - warm, 1))], [warm])
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), optax.constant_schedule(peak)], [warm])


def _decays(path, _) -> bool:
  """Weight decay on kernels and embeddings; not on biases or LayerNorm scales."""
  name = str(getattr(path[-1], "key", path[-1]))
  return not (name.endswith("bias") or name == "scale")


def make_optimizer(tc: ml_collections.ConfigDict) -> optax.GradientTransformation:
  parts = [optax.clip_by_global_norm(float(tc.grad_clip))] if tc.grad_clip else []
  parts.append(optax.adamw(learning_rate_schedule(tc), b1=tc.b1, b2=tc.b2, eps=tc.eps,
                           weight_decay=tc.weight_decay,
                           mask=lambda params: jax.tree_util.tree_map_with_path(_decays, params)))
  return optax.chain(*parts)


# ---- the step ----------------------------------------------------------------------------------

def make_loss_fn(model_cfg: ModelConfig, tc: ml_collections.ConfigDict) -> Callable:
  """loss_fn(params, batch) -> (loss, rrtf_loss metrics), with the batch layout of make_train_step."""
  model = Transformer(model_cfg)

  def loss_fn(params, batch):
    b, r, t = batch["inputs"].shape
    flat = lambda x: x.reshape(b * r, t)  # noqa: E731
    hidden = model.apply({"params": params}, flat(batch["inputs"]), segment_ids=flat(batch["segment_ids"]),
                         return_hidden=True)  # [B*R, T, D]
    logp = token_logprobs(hidden, params["wte"], flat(batch["targets"]), chunk=int(tc.logprob_chunk))
    return rrtf_loss(logp.reshape(b, r, t), batch["loss_mask"], batch["scores"], batch["is_teacher"],
                     weighting=tc.weighting, ft_weight=float(tc.ft_weight), rank_weight=float(tc.rank_weight))

  return loss_fn


def ranking_metrics(model_cfg: ModelConfig, tc: ml_collections.ConfigDict, params: dict, data_dir: str, *,
                    responses: int) -> dict:
  """One pass over a prepared dataset for each of several parameter sets (name -> params), a
  prompt at a time with up to `responses` responses each: the fraction of scored pairs
  (better, worse) where the model gives the better response the higher length-normalised
  log-probability (what the ranking loss trains), and the mean fine-tuning loss of the best
  response. tc gives seq_len and logprob_chunk. Returns name -> metrics.
  """
  from data.pipeline import train_batches
  loss_fn = make_loss_fn(model_cfg, tc)
  metrics_fn = jax.jit(lambda p, b: loss_fn(p, b)[1])
  pad_id = next((i for i in (model_cfg.pad_token_id, model_cfg.eos_token_id) if i is not None), 0)
  batches = train_batches(data_dir, batch_size=1, responses=responses, seq_len=int(tc.seq_len), pad_id=pad_id,
                          window=1, process_index=0, process_count=1)
  try:
    data = [next(batches)[0] for _ in range(batches.batches_per_epoch)]
  finally:
    batches.close()
  out = {}
  for name, p in params.items():
    correct = pairs = ft = 0.0
    for batch in data:
      m = jax.device_get(metrics_fn(p, batch))
      correct += float(m["ranking_accuracy"]) * float(m["pairs"])
      pairs += float(m["pairs"])
      ft += float(m["ft_loss"])
    out[name] = {"ranking_accuracy": correct / max(pairs, 1.0), "pairs": int(pairs), "prompts": len(data),
                 "ft_loss": ft / max(len(data), 1)}
  return out


def make_train_step(model_cfg: ModelConfig, tc: ml_collections.ConfigDict,
                    tx: optax.GradientTransformation) -> Callable:
  """train_step(state, batch) -> (state, metrics), pure.

  batch: inputs, targets [B, R, T] int32; loss_mask [B, R, T] (1 on response targets);
  segment_ids [B, R, T] int32 (1 real, 0 padding); scores [B, R] float32; is_teacher [B, R] bool.
  """
  micro = int(tc.microbatches)
  schedule = learning_rate_schedule(tc)
  loss_fn = make_loss_fn(model_cfg, tc)

  def grads_and_metrics(params, batch):
    (_, m), g = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    pairs = m["pairs"].astype(jnp.float32)
    # sums over micro-batches: per-prompt means add, pair statistics are weighted by their pairs
    sums = {"loss": m["loss"], "rank_loss": m["rank_loss"], "ft_loss": m["ft_loss"],
            "correct_pairs": m["ranking_accuracy"] * jnp.maximum(pairs, 1.0),
            "margin_sum": m["margin"] * jnp.maximum(pairs, 1.0), "pairs": pairs,
            "response_tokens": m["response_tokens"]}
    return g, sums

  def train_step(state: TrainState, batch: dict):
    if micro == 1:
      grads, sums = grads_and_metrics(state.params, batch)
    else:
      # Micro-batch m takes prompts m, m+M, m+2M, ...: every device keeps its own rows.
      split = jax.tree.map(lambda x: jnp.moveaxis(x.reshape(x.shape[0] // micro, micro, *x.shape[1:]), 1, 0), batch)
      first = jax.tree.map(lambda x: x[0], split)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(grads_and_metrics, state.params, first))

      def body(acc, mb):
        out = grads_and_metrics(state.params, mb)
        return jax.tree.map(jnp.add, acc, out), None

      (grads, sums), _ = jax.lax.scan(body, zeros, split)
      grads = jax.tree.map(lambda g: g / micro, grads)
      sums = dict(sums, loss=sums["loss"] / micro, rank_loss=sums["rank_loss"] / micro,
                  ft_loss=sums["ft_loss"] / micro)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    pairs = jnp.maximum(sums["pairs"], 1.0)
    metrics = {
        "loss": sums["loss"], "rank_loss": sums["rank_loss"], "ft_loss": sums["ft_loss"],
        "ranking_accuracy": sums["correct_pairs"] / pairs, "margin": sums["margin_sum"] / pairs,
        "pairs": sums["pairs"], "response_tokens": sums["response_tokens"],
        "grad_norm": optax.global_norm(grads), "param_norm": optax.global_norm(params),
        "update_norm": optax.global_norm(updates), "learning_rate": schedule(state.step),
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


# ---- shardings and abstract values ---------------------------------------------------------------

def state_shardings(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh):
  """(abstract TrainState of ShapeDtypeStructs with shardings, TrainState of NamedShardings)."""
  boxed = abstract_params(model_cfg)
  with nn.logical_axis_rules(LOGICAL_RULES):
    p_shard = logical_to_sharding(boxed, mesh)
  p_abs = nn.unbox(boxed)
  opt_abs = jax.eval_shape(tx.init, p_abs)
  rep = replicated(mesh)
  # Optimizer moments mirror the parameters and take their shardings; counters replicate.
  opt_shard = optax.tree_map_params(tx, lambda _, s: s, opt_abs, p_shard, transform_non_params=lambda _: rep)
  shard = TrainState(step=rep, params=p_shard, opt_state=opt_shard)
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=p_abs, opt_state=opt_abs)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shard)
  return abstract, shard


BATCH_DTYPES = {"inputs": jnp.int32, "targets": jnp.int32, "loss_mask": jnp.float32, "segment_ids": jnp.int32,
                "scores": jnp.float32, "is_teacher": jnp.bool_}
TOKEN_FIELDS = ("inputs", "targets", "loss_mask", "segment_ids")  # [B, R, T]; the rest are [B, R]


def batch_shardings(mesh) -> dict:
  return {k: batch_sharding(mesh, 3 if k in TOKEN_FIELDS else 2) for k in BATCH_DTYPES}


def abstract_batch(batch_size: int, responses: int, seq_len: int, mesh) -> dict:
  shard = batch_shardings(mesh)
  return {k: jax.ShapeDtypeStruct((batch_size, responses) + ((seq_len,) if k in TOKEN_FIELDS else ()), dt,
                                  sharding=shard[k]) for k, dt in BATCH_DTYPES.items()}


def jit_train_step(model_cfg: ModelConfig, tc, tx, mesh, state_shard):
  step = make_train_step(model_cfg, tc, tx)
  return jax.jit(step, in_shardings=(state_shard, batch_shardings(mesh)),
                 out_shardings=(state_shard, replicated(mesh)), donate_argnums=0)


def check_batch_layout(tc, mesh, process_count: int = 1) -> None:
  """The global batch must split into micro-batches, hosts and data-parallel devices."""
  b, m = int(tc.batch_size), int(tc.microbatches)
  if m < 1 or b % m:
    raise TrainError(f"train.batch_size={b} is not a multiple of train.microbatches={m}")
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  if (b // m) % dp:
    raise TrainError(f"a micro-batch of {b // m} prompts (train.batch_size / train.microbatches) does not split "
                     f"over data*fsdp = {dp} devices of mesh {dict(mesh.shape)}")
  if b % process_count:
    raise TrainError(f"train.batch_size={b} does not split over {process_count} hosts")


def validate_config(config: ml_collections.ConfigDict) -> ModelConfig:
  model_cfg = ModelConfig.from_dict(config.model)
  if model_cfg.quant_bits:
    raise TrainError("model.quant_bits: a quantized model is for inference; train the full-precision model "
                     "and quantize the result (rrtf quantize)")
  tc = config.train
  if tc.schedule not in SCHEDULES:
    raise TrainError(f"train.schedule={tc.schedule!r} is not one of {SCHEDULES}")
  if tc.weighting not in ("gap", "uniform"):
    raise TrainError(f"train.weighting={tc.weighting!r} is not 'gap' or 'uniform'")
  if tc.seq_len > model_cfg.max_position_embeddings:
    raise TrainError(f"train.seq_len={tc.seq_len} exceeds model.max_position_embeddings="
                     f"{model_cfg.max_position_embeddings}")
  for name in ("steps", "responses", "batch_size", "microbatches", "log_every", "checkpoint_every"):
    if int(tc[name]) < 1:
      raise TrainError(f"train.{name}={tc[name]} must be at least 1")
  return model_cfg


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


def _preempted(stop: threading.Event, step: int) -> bool:
  if jax.process_count() == 1:
    return stop.is_set()
  from jax.experimental import multihost_utils  # all hosts agree on the step (JAX's SIGTERM notice)
  return multihost_utils.reached_preemption_sync_point(step) or stop.is_set()


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
  init_params_fn = lambda rng: nn.unbox(Transformer(model_cfg).init(rng, jnp.zeros((1, 8), jnp.int32))["params"])  # noqa: E731
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
    params = jax.jit(init_params_fn, out_shardings=shard.params)(jax.random.PRNGKey(int(config.seed)))
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

  from data.pipeline import DataState, open_prepared, padding_fraction, train_batches

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
  pad_id = next((i for i in (model_cfg.pad_token_id, model_cfg.eos_token_id) if i is not None), 0)
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
        seq_len=int(tc.seq_len), pad_id=pad_id, seed=int(config.seed), start=data_state, buckets=buckets,
        window=int(config.data.window), process_index=proc, process_count=n_proc,
        splits=int(config.data.get("splits", 0)) or None, agree_length=_agree_length)

    if proc == 0:
      writer = _summary_writer(_join(workdir, TENSORBOARD_DIR), purge_step=start + 1 if start else None)
    stop = threading.Event()
    old_handler = None
    if threading.current_thread() is threading.main_thread():
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
        if _preempted(stop, step):
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


def save_model(workdir: str, out: str, *, step: int | None = None, dtype: str | None = None,
               tokenizer: str | None = None) -> tuple[str, int]:
  """A training run's parameters at `step` (default: its newest checkpoint) -> a model checkpoint
  (`rrtf params`), what serve, sample, evaluate and export read. Only the parameters are read,
  onto this host's CPU, whatever topology wrote them. The tokenizer comes from `tokenizer`, else
  from the run's config.init_from checkpoint. Returns (path, step)."""
  import fsspec
  import orbax.checkpoint as ocp

  from model import save_checkpoint
  from model.checkpoint import tokenizer_path
  cfg_path = _join(workdir, "config.json")
  try:
    with fsspec.open(cfg_path, "r") as f:
      config = json.load(f)
  except FileNotFoundError:
    raise TrainError(f"{workdir}: not a training workdir (no config.json)") from None
  model_cfg = ModelConfig.from_dict(config["model"])
  mngr = ocp.CheckpointManager(_join(workdir, CHECKPOINT_DIR), item_handlers={"state": ocp.PyTreeCheckpointHandler()})
  try:
    steps = sorted(mngr.all_steps())
    if not steps:
      raise TrainError(f"{workdir}: no training checkpoints in {CHECKPOINT_DIR}/")
    step = steps[-1] if step is None else step
    if step not in steps:
      raise TrainError(f"{workdir}: no checkpoint of step {step} (there are {steps})")
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    try:
      want = jnp.dtype(dtype) if dtype else model_cfg.weight_dtype
    except TypeError:
      raise TrainError(f"--dtype {dtype}: not a dtype") from None
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, want, sharding=cpu), nn.unbox(abstract_params(model_cfg)))
    args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=cpu, dtype=want), target)
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        {"params": target}, restore_args={"params": args}, partial_restore=True)))
  finally:
    mngr.close()
  if dtype:
    model_cfg = model_cfg.replace(param_dtype=str(want))
  tok = tokenizer or (tokenizer_path(config["init_from"]) if config.get("init_from") else None)
  return save_checkpoint(out, model_cfg, restored["state"]["params"], tokenizer_dir=tok), step

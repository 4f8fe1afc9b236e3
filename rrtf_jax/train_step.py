"""The RRTF train step: optimizer, loss over a batch, one pure jitted step, its shardings.

Letters: B prompts (global batch), M micro-batches, R responses per prompt, T tokens.

  state, metrics = train_step(state, batch)     # pure; jitted with explicit shardings
  ranking_metrics(model_cfg, train_cfg, params, data)  # the same loss with fixed parameters

The step runs the model on the B*R (prompt + response) sequences, takes per-token
log-probabilities from the hidden states in chunks (never the full [B*R, T, V] logits),
and applies the RRTF loss (rrtf_jax/loss.py). Parameters are fp32 master weights; matmuls
run in `model.dtype` (bf16 on TPU). Gradients of M micro-batches are summed in a scan before
one AdamW update (clipped by global norm), so the paper's 512 prompts fit any pod. The loop
around it is rrtf_jax/stages/train.py; `rrtf plan` compiles it for TPU topologies.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from model import ModelConfig, Transformer, abstract_params
from model.transformer import head_weights
from model.sharding import LOGICAL_RULES, batch_sharding, logical_to_sharding, replicated
from rrtf_jax.loss import LOSS_DEFAULTS, check_loss_settings, rrtf_loss, token_logprobs

SCHEDULES = ("cosine", "linear", "constant")
# Model fields that do not change the network: numerics, quantization (a quantized checkpoint
# is refused anyway) and token ids.
NOT_NETWORK_FIELDS = frozenset(
  {"dtype", "param_dtype", "attention", "remat", "quant_bits", "quant_group", "quant_embedding"}
  | {"bos_token_id", "eos_token_id", "pad_token_id", "extra_eos_token_ids"}
)
# Every other ModelConfig field decides the network (its parameters' shapes and what it
# computes): an init_from checkpoint must agree on them. A new switch is covered by default.
NETWORK_FIELDS = tuple(
  f.name for f in dataclasses.fields(ModelConfig) if f.name not in NOT_NETWORK_FIELDS
)


class TrainError(ValueError):
  """A training run cannot start or go on; the message is one line."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # optimizer updates done
  params: Any
  opt_state: Any


# ---- optimizer ---------------------------------------------------------------------------------


def learning_rate_schedule(train_cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then cosine or linear decay to end_lr_fraction * peak."""
  peak, warm, steps = (
    float(train_cfg.learning_rate),
    int(train_cfg.warmup_steps),
    int(train_cfg.steps),
  )
  end = peak * float(train_cfg.end_lr_fraction)
  if train_cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, warm, max(steps, warm + 1), end)
  if train_cfg.schedule == "linear":
    return optax.join_schedules(
      [
        optax.linear_schedule(0.0, peak, warm),
        optax.linear_schedule(peak, end, max(steps - warm, 1)),
      ],
      [warm],
    )
  return optax.join_schedules(
    [optax.linear_schedule(0.0, peak, warm), optax.constant_schedule(peak)], [warm]
  )


def _decays(path, _) -> bool:
  """Weight decay on kernels and embeddings (wte, wpe, an untied lm_head); not on biases or the
  scales of norms (LayerNorm, RMSNorm and the q/k norms are all `scale`)."""
  name = str(getattr(path[-1], "key", path[-1]))
  return not (name.endswith("bias") or name == "scale")


def make_optimizer(train_cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  parts = [optax.clip_by_global_norm(float(train_cfg.grad_clip))] if train_cfg.grad_clip else []
  parts.append(
    optax.adamw(
      learning_rate_schedule(train_cfg),
      b1=train_cfg.b1,
      b2=train_cfg.b2,
      eps=train_cfg.eps,
      weight_decay=train_cfg.weight_decay,
      mask=lambda params: jax.tree_util.tree_map_with_path(_decays, params),
    )
  )
  return optax.chain(*parts)


# ---- the step ----------------------------------------------------------------------------------


def loss_settings(train_cfg: ml_collections.ConfigDict) -> dict:
  """The train.* fields that choose the loss (weighting, ft_normalization, pair_loss, beta,
  gamma) as rrtf_loss keywords. A config written before a field existed (a user's own file,
  an old run's config.json) gets its default, the paper's loss."""
  return {name: train_cfg.get(name, default) for name, default in LOSS_DEFAULTS.items()}


def make_loss_fn(model_cfg: ModelConfig, train_cfg: ml_collections.ConfigDict) -> Callable:
  """loss_fn(params, batch) -> (loss, rrtf_loss metrics), with the batch layout of
  make_train_step."""
  model = Transformer(model_cfg)

  def loss_fn(params, batch):
    b, r, t = batch["inputs"].shape

    def flat(x):  # [B, R, T] -> [B*R, T]
      return x.reshape(b * r, t)

    hidden = model.apply(
      {"params": params},
      flat(batch["inputs"]),
      segment_ids=flat(batch["segment_ids"]),
      return_hidden=True,
    )  # [B*R, T, D]
    head, _ = head_weights(params)  # the tied wte or an untied lm_head (never quantized here)
    logp = token_logprobs(hidden, head, flat(batch["targets"]), chunk=int(train_cfg.logprob_chunk))
    return rrtf_loss(
      logp.reshape(b, r, t),
      batch["loss_mask"],
      batch["scores"],
      batch["is_teacher"],
      **loss_settings(train_cfg),
      ft_weight=float(train_cfg.ft_weight),
      rank_weight=float(train_cfg.rank_weight),
    )

  return loss_fn


def ranking_metrics(
  model_cfg: ModelConfig,
  train_cfg: ml_collections.ConfigDict,
  params: dict,
  data_dir: str,
  *,
  responses: int,
) -> dict:
  """One pass over a prepared dataset for each of several parameter sets (name -> params), a
  prompt at a time with up to `responses` responses each: the fraction of scored pairs
  (better, worse) where the model gives the better response the higher length-normalised
  log-probability (what the ranking loss trains), and the mean fine-tuning loss of the best
  response. train_cfg gives seq_len and logprob_chunk. Returns name -> metrics.
  """
  from data.loader import train_batches

  loss_fn = make_loss_fn(model_cfg, train_cfg)

  @jax.jit
  def metrics_fn(params, batch):
    return loss_fn(params, batch)[1]

  batches = train_batches(
    data_dir,
    batch_size=1,
    responses=responses,
    seq_len=int(train_cfg.seq_len),
    pad_id=model_cfg.pad_id,
    window=1,
    process_index=0,
    process_count=1,
  )
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
    out[name] = {
      "ranking_accuracy": correct / max(pairs, 1.0),
      "pairs": int(pairs),
      "prompts": len(data),
      "ft_loss": ft / max(len(data), 1),
    }
  return out


def make_train_step(
  model_cfg: ModelConfig, train_cfg: ml_collections.ConfigDict, tx: optax.GradientTransformation
) -> Callable:
  """train_step(state, batch) -> (state, metrics), pure.

  batch: inputs, targets [B, R, T] int32; loss_mask [B, R, T] (1 on response targets);
  segment_ids [B, R, T] int32 (1 real, 0 padding); scores [B, R] float32; is_teacher [B, R] bool.
  """
  micro = int(train_cfg.microbatches)
  schedule = learning_rate_schedule(train_cfg)
  loss_fn = make_loss_fn(model_cfg, train_cfg)

  def grads_and_metrics(params, batch):
    (_, m), g = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    pairs = m["pairs"].astype(jnp.float32)
    # sums over micro-batches: per-prompt means add, pair statistics are weighted by their pairs
    sums = {
      "loss": m["loss"],
      "rank_loss": m["rank_loss"],
      "ft_loss": m["ft_loss"],
      "correct_pairs": m["ranking_accuracy"] * jnp.maximum(pairs, 1.0),
      "margin_sum": m["margin"] * jnp.maximum(pairs, 1.0),
      "pairs": pairs,
      "response_tokens": m["response_tokens"],
    }
    return g, sums

  def train_step(state: TrainState, batch: dict):
    if micro == 1:
      grads, sums = grads_and_metrics(state.params, batch)
    else:
      # Micro-batch m takes prompts m, m+M, m+2M, ...: every device keeps its own rows.
      split = jax.tree.map(
        lambda x: jnp.moveaxis(x.reshape(x.shape[0] // micro, micro, *x.shape[1:]), 1, 0), batch
      )
      first = jax.tree.map(lambda x: x[0], split)
      zeros = jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype),
        jax.eval_shape(grads_and_metrics, state.params, first),
      )

      def body(acc, mb):
        out = grads_and_metrics(state.params, mb)
        return jax.tree.map(jnp.add, acc, out), None

      (grads, sums), _ = jax.lax.scan(body, zeros, split)
      grads = jax.tree.map(lambda g: g / micro, grads)
      sums = dict(
        sums,
        loss=sums["loss"] / micro,
        rank_loss=sums["rank_loss"] / micro,
        ft_loss=sums["ft_loss"] / micro,
      )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    pairs = jnp.maximum(sums["pairs"], 1.0)
    metrics = {
      "loss": sums["loss"],
      "rank_loss": sums["rank_loss"],
      "ft_loss": sums["ft_loss"],
      "ranking_accuracy": sums["correct_pairs"] / pairs,
      "margin": sums["margin_sum"] / pairs,
      "pairs": sums["pairs"],
      "response_tokens": sums["response_tokens"],
      "grad_norm": optax.global_norm(grads),
      "param_norm": optax.global_norm(params),
      "update_norm": optax.global_norm(updates),
      "learning_rate": schedule(state.step),
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
  opt_shard = optax.tree_map_params(
    tx, lambda _, s: s, opt_abs, p_shard, transform_non_params=lambda _: rep
  )
  shard = TrainState(step=rep, params=p_shard, opt_state=opt_shard)
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=p_abs, opt_state=opt_abs)
  abstract = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shard
  )
  return abstract, shard


BATCH_DTYPES = {
  "inputs": jnp.int32,
  "targets": jnp.int32,
  "loss_mask": jnp.float32,
  "segment_ids": jnp.int32,
  "scores": jnp.float32,
  "is_teacher": jnp.bool_,
}
TOKEN_FIELDS = ("inputs", "targets", "loss_mask", "segment_ids")  # [B, R, T]; the rest are [B, R]


def batch_shardings(mesh) -> dict:
  return {k: batch_sharding(mesh, 3 if k in TOKEN_FIELDS else 2) for k in BATCH_DTYPES}


def abstract_batch(batch_size: int, responses: int, seq_len: int, mesh) -> dict:
  shard = batch_shardings(mesh)
  return {
    k: jax.ShapeDtypeStruct(
      (batch_size, responses) + ((seq_len,) if k in TOKEN_FIELDS else ()), dt, sharding=shard[k]
    )
    for k, dt in BATCH_DTYPES.items()
  }


def jit_train_step(model_cfg: ModelConfig, train_cfg, tx, mesh, state_shard):
  step = make_train_step(model_cfg, train_cfg, tx)
  return jax.jit(
    step,
    in_shardings=(state_shard, batch_shardings(mesh)),
    out_shardings=(state_shard, replicated(mesh)),
    donate_argnums=0,
  )


def check_batch_layout(train_cfg, mesh, process_count: int = 1) -> None:
  """The global batch must split into micro-batches, hosts and data-parallel devices."""
  b, m = int(train_cfg.batch_size), int(train_cfg.microbatches)
  if m < 1 or b % m:
    raise TrainError(f"train.batch_size={b} is not a multiple of train.microbatches={m}")
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  if (b // m) % dp:
    raise TrainError(
      f"a micro-batch of {b // m} prompts (train.batch_size / train.microbatches) does not split "
      f"over data*fsdp = {dp} devices of mesh {dict(mesh.shape)}"
    )
  if b % process_count:
    raise TrainError(f"train.batch_size={b} does not split over {process_count} hosts")


def check_param_layout(abstract: TrainState, mesh) -> None:
  """Every parameter must split evenly over the mesh axes its shardings name (JAX's own error
  is a long traceback): e.g. a vocabulary of 97 over tensor=2."""
  for path, a in jax.tree_util.tree_leaves_with_path(abstract.params):
    for dim, axes in zip(a.shape, a.sharding.spec):
      axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      parts = math.prod(mesh.shape[x] for x in axes)
      if dim % parts:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        raise TrainError(
          f"parameter {name} {list(a.shape)}: a dimension of {dim} does not split over mesh "
          f"axes {'*'.join(axes)} = {parts}; choose another config.mesh"
        )


def validate_config(config: ml_collections.ConfigDict) -> ModelConfig:
  model_cfg = ModelConfig.from_dict(config.model)
  if model_cfg.quant_bits:
    raise TrainError(
      "model.quant_bits: a quantized model is for inference; train the full-precision model "
      "and quantize the result (rrtf quantize)"
    )
  train_cfg = config.train
  if train_cfg.schedule not in SCHEDULES:
    raise TrainError(f"train.schedule={train_cfg.schedule!r} is not one of {SCHEDULES}")
  try:
    check_loss_settings(**loss_settings(train_cfg))
  except ValueError as e:
    raise TrainError(str(e)) from None
  if train_cfg.seq_len > model_cfg.max_position_embeddings:
    raise TrainError(
      f"train.seq_len={train_cfg.seq_len} exceeds model.max_position_embeddings="
      f"{model_cfg.max_position_embeddings}"
    )
  for name in ("steps", "responses", "batch_size", "microbatches", "log_every", "checkpoint_every"):
    if int(train_cfg[name]) < 1:
      raise TrainError(f"train.{name}={train_cfg[name]} must be at least 1")
  return model_cfg

"""`rrtf plan`: compile a training step (or, `--decode`, the serving decode step) ahead of time
for a TPU topology, without a TPU.

libtpu's real XLA TPU compiler partitions and compiles the step for an abstract device set
(`jax.experimental.topologies`), and the compiled executable reports its per-chip memory and
FLOPs. Nothing is allocated: parameters and batch are ShapeDtypeStructs with shardings.
The step compiled is the training stage's own (rrtf_jax/train_step.py): the RRTF loss over R
responses per prompt, gradient accumulation over micro-batches, AdamW with fp32 moments,
the state donated, exactly as `rrtf train` jits it. `plan_decode` compiles model/decode.py's
decode loop as `rrtf serve`, `sample` and `evaluate` jit it, with the weights in the compute
dtype or quantized as `rrtf quantize` stores them, and a KV cache of the given length.
Decode plans also give the HBM bytes a step reads per device and the bound that the chip's
published HBM bandwidth puts on tokens/s (DecodePlan.step_bytes, tokens_per_second_bound).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import time

import flax.linen as nn
import jax
import ml_collections

from model import ModelConfig
from model.attention import resolve as resolve_attention
from model.sharding import LOGICAL_RULES, make_mesh

GIB = 1 << 30
# HBM per chip by JAX device_kind (public Cloud TPU specs).
HBM_PER_CHIP = {
  "TPU v2": 16 * GIB,
  "TPU v3": 32 * GIB,
  "TPU v4": 32 * GIB,
  "TPU v4 lite": 8 * GIB,
  "TPU v5 lite": 16 * GIB,
  "TPU v5": 95 * GIB,
  "TPU v5p": 95 * GIB,
  "TPU v6 lite": 32 * GIB,
}
# HBM bandwidth per chip, bytes/s (GB = 1e9 bytes), by JAX device_kind, as Cloud TPU's pages
# give it: https://cloud.google.com/tpu/docs/v5e "HBM bandwidth per chip 819 GBps";
# https://cloud.google.com/tpu/docs/v5p "HBM2e capacity and bandwidth 95GB, 2765 GBps";
# https://cloud.google.com/tpu/docs/v4 "HBM2 capacity and bandwidth 32 GiB, 1200 GBps";
# https://cloud.google.com/tpu/docs/v6e "HBM bandwidth per chip 1638 GBps";
# https://cloud.google.com/tpu/docs/v3 "32 GiB, 900 GBps". The decode plan's tokens/s bound.
HBM_BANDWIDTH_PER_CHIP = {
  "TPU v3": 900e9,
  "TPU v4": 1200e9,
  "TPU v5 lite": 819e9,
  "TPU v5": 2765e9,
  "TPU v5p": 2765e9,
  "TPU v6 lite": 1638e9,
}


class PlanError(ValueError):
  pass


@dataclasses.dataclass(kw_only=True)
class _Memory:
  """What every plan holds: the topology and mesh, and the per-device memory of the compiled
  executable (or the compiler's refusal), with its verdict."""

  topology: str
  device_kind: str
  num_devices: int
  mesh: dict
  params: int
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  hbm_bytes: int | None
  compile_seconds: float
  compiler_error: str | None = None  # why the TPU compiler refused the step (out of HBM or VMEM)
  model: str = ""  # the architecture compiled, in one line (describe_model)

  @property
  def total_bytes(self) -> int:
    return (
      self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes
    )

  @property
  def fits(self) -> bool | None:
    if self.compiler_error:
      return False
    return None if self.hbm_bytes is None else self.total_bytes <= self.hbm_bytes

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d.update(total_bytes=self.total_bytes, fits=self.fits)
    return d

  def _topology_line(self) -> str:
    mesh = ",".join(f"{k}={v}" for k, v in self.mesh.items())
    return (
      f"topology     {self.topology} ({self.num_devices} devices, {self.device_kind}), mesh {mesh}"
    )

  def _memory_lines(self, arguments: str, outputs: str, temporaries: str) -> list[str]:
    g = _bytes
    hbm = g(self.hbm_bytes) if self.hbm_bytes else "   unknown"
    lines = [
      "per device:",
      f"  arguments  {g(self.argument_bytes)}   ({arguments})",
      f"  outputs    {g(self.output_bytes)}   ({outputs})",
    ]
    if self.compiler_error:  # no executable: only what the compiler said, no code size or total
      return lines + [f"  temporaries{g(self.temp_bytes)}   (as the compiler reported them)"]
    return lines + [
      f"  temporaries{g(self.temp_bytes)}   ({temporaries})",
      f"  code       {g(self.code_bytes)}",
      f"  total      {g(self.total_bytes)}   of {hbm} HBM",
    ]

  def _verdict(self, advice: str) -> str:
    hbm = _bytes(self.hbm_bytes).strip() if self.hbm_bytes else "unknown"
    if self.compiler_error and "vmem" in self.compiler_error.lower():
      return (
        f"verdict      DOES NOT COMPILE: a kernel's blocks exceed the chip's on-chip VMEM "
        f"({self.compiler_error}); split the heads over --mesh ...,tensor=N or try "
        "--config.model.attention=splash"
      )
    if self.compiler_error:
      return (
        "verdict      DOES NOT FIT: the TPU compiler ran out of HBM "
        f"({self.compiler_error}); {advice}"
      )
    if self.fits is None:
      return "verdict      unknown: no HBM figure for this chip"
    if self.fits:
      return f"verdict      fits ({self.total_bytes / self.hbm_bytes:.0%} of HBM)"
    return (
      f"verdict      DOES NOT FIT: needs {_bytes(self.total_bytes).strip()} per device, "
      f"the chip has {hbm}; {advice}"
    )


@dataclasses.dataclass(kw_only=True)
class Plan(_Memory):
  batch_size: int  # prompts per optimizer step
  responses: int  # R sequences per prompt
  seq_len: int
  microbatches: int
  attention: str  # the attention implementation compiled (auto resolves to pallas on TPU)
  flops_per_step: float  # analytic model FLOPs of forward+backward
  remat: str = "none"

  def report(self) -> str:
    lines = [
      self._topology_line(),
      f"model        {_model_prefix(self.model)}{_count(self.params)} parameters; "
      f"attention: {self.attention}",
      f"step         RRTF train step (forward, backward, AdamW): {self.batch_size} prompts x "
      f"{self.responses} responses x {self.seq_len} tokens in {self.microbatches} micro-batch(es)",
      f"compiled in  {self.compile_seconds:.1f} s",
    ]
    lines += self._memory_lines(
      "parameters, optimizer state and batch shards",
      "the new state, in place of the donated one, and metrics",
      "activations and workspace",
    )
    lines.append(
      f"FLOPs        {self.flops_per_step:.3e} per step, "
      f"{self.flops_per_step / self.num_devices:.3e} per device "
      "(analytic: 3x forward matmuls and attention)"
    )
    advice = "add chips, shard more (--mesh), raise --config.train.microbatches"
    advice += ", or set --config.model.remat=full" if self.remat != "full" else ""
    lines.append(self._verdict(advice))
    return "\n".join(lines)


@dataclasses.dataclass(kw_only=True)
class DecodePlan(_Memory):
  """The decode step (`model.decode.decode_chunk`, as `rrtf serve`/`sample`/`evaluate` jit it)
  compiled for a topology: one new token per row per loop step against a KV cache."""

  batch_size: int  # rows decoded together
  context: int  # KV-cache length per slot (prompt + new tokens)
  weights: str  # how the linear layers are stored: bfloat16 | int8 | int4 (group G)
  param_bytes: int  # all devices, as stored (int4 two per byte)
  cache_bytes: int  # the K and V caches, all devices
  cache_bytes_per_token: int  # of one row: 2 * L * K * H * bytes (K and V, every layer)
  # One device's shares (quantized weights: the integers plus their scales)
  weight_bytes_per_device: int = 0  # resident: the weights as sharded
  weight_read_bytes_per_device: int = 0  # read per step: fsdp shards gathered, tensor ones not
  cache_bytes_per_device: int = 0  # K and V, every layer, its rows, the full context
  hbm_bandwidth: float | None = None  # bytes/s per device (HBM_BANDWIDTH_PER_CHIP)

  @property
  def step_bytes(self) -> int:
    """HBM bytes one decode step reads per device: the compiled step's arguments once (the
    weights as sharded, the KV cache at its full length, the small decode state), plus the
    rest of each weight an fsdp axis splits: XLA all-gathers those shards (its rows need the
    whole kernel), and the device reads the gathered copy. Only a tensor axis divides the
    weights a device reads. The whole cache, not its filled part: the buffer is static-shaped
    and attention reads every slot, masking the empty ones (also the worst case). Still a
    lower bound: activations and unfused dequantized kernels add traffic."""
    return self.argument_bytes + self.weight_read_bytes_per_device - self.weight_bytes_per_device

  @property
  def step_seconds_bound(self) -> float | None:
    """The fastest a memory-bound step can be: step_bytes at the chip's HBM bandwidth."""
    return self.step_bytes / self.hbm_bandwidth if self.hbm_bandwidth else None

  @property
  def tokens_per_second_bound(self) -> float | None:
    """Upper bound on the topology's decode tokens/s: batch rows per step over the step's
    memory-bound time (every chip steps together, each reading its own step_bytes)."""
    t = self.step_seconds_bound
    return self.batch_size / t if t else None

  def to_dict(self) -> dict:
    d = super().to_dict()
    d.update(
      step_bytes=self.step_bytes,
      step_seconds_bound=self.step_seconds_bound,
      tokens_per_second_bound=self.tokens_per_second_bound,
    )
    return d

  def _bandwidth_lines(self) -> list[str]:
    g = _bytes
    lines = [
      f"bandwidth    a step reads {g(self.step_bytes).strip()} per device: its arguments "
      f"{g(self.argument_bytes).strip()} (weights {g(self.weight_bytes_per_device).strip()}, "
      f"KV cache {g(self.cache_bytes_per_device).strip()} at the full context, decode state)",
    ]
    if self.step_bytes > self.argument_bytes:
      lines.append(
        f"             + {g(self.step_bytes - self.argument_bytes).strip()} of weights gathered "
        f"over fsdp ({g(self.weight_read_bytes_per_device).strip()} of weights read in all)"
      )
    if not self.hbm_bandwidth:
      return lines + ["             no HBM bandwidth figure for this chip: no tokens/s bound"]
    tps = self.tokens_per_second_bound
    return lines + [
      f"             at {self.hbm_bandwidth / 1e9:.0f} GB/s HBM: >= "
      f"{self.step_seconds_bound * 1e3:.3g} ms per step, <= {tps:,.0f} tokens/s for the "
      f"topology ({tps / self.num_devices:,.1f} per device, batch {self.batch_size})",
      "             (memory-bound decode: each step reads the weights and the whole cache once)",
    ]

  def report(self) -> str:
    g = _bytes
    lines = [
      self._topology_line(),
      f"model        {_model_prefix(self.model)}{_count(self.params)} parameters, "
      f"{self.weights} weights: "
      f"{g(self.param_bytes).strip()}",
      "step         decode (one token per row per step, KV cache): "
      f"batch {self.batch_size}, context {self.context} tokens "
      f"(cache {g(self.cache_bytes).strip()}, {g(self.cache_bytes_per_token).strip()} per token)",
      f"compiled in  {self.compile_seconds:.1f} s",
    ]
    lines += self._memory_lines(
      "weights, KV cache and decode state",
      "the new state, in place of the donated one",
      "activations, logits, sampling, dequantized kernels XLA did not fuse",
    )
    lines.append(
      self._verdict(
        "quantize (--quant int8|int4), shorten --seq-len, lower --batch-size, or shard "
        "over more chips (--mesh)"
      )
    )
    lines[-1:-1] = self._bandwidth_lines()
    return "\n".join(lines)


# When compiling for TPU from a machine without one (JAX_PLATFORMS=cpu), these stop libtpu from
# probing for a local TPU and its pod peers, which only prints errors there. Never set on a TPU VM.
_CPU_HOST_LIBTPU_ENV = {
  "TPU_ACCELERATOR_TYPE": "v5litepod-4",
  "TPU_WORKER_HOSTNAMES": "localhost",
  "TPU_SKIP_MDS_QUERY": "1",
  # several compiling processes (tests, parallel plans) may each load libtpu
  "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
}


def _bytes(b: float) -> str:
  for unit, size in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
    if b >= size:
      return f"{b / size:8.2f} {unit}"
  return f"{b:8.0f} B  "


def _count(n: int) -> str:
  return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.3f}M"


def _model_prefix(model: str) -> str:
  return f"{model}; " if model else ""


def describe_model(cfg: ModelConfig) -> str:
  """The architecture in one line: family, shape, attention heads, positions, head, window."""
  kv = {1: "multi-query", cfg.num_heads: "multi-head"}.get(cfg.num_kv_heads, "GQA")
  parts = [
    f"{cfg.family} {cfg.num_layers} layers, d {cfg.embed_dim}",
    f"{cfg.num_heads} heads / {cfg.num_kv_heads} kv ({kv}) of {cfg.head_dim}",
    f"{cfg.mlp} mlp {cfg.mlp_dim}",
    f"vocab {cfg.vocab_size}",
    "RoPE" if cfg.position_embedding == "rope" else "learned positions",
    "tied head" if cfg.tie_embeddings else "untied head",
  ]
  if cfg.sliding_window is not None:
    parts.append(f"window {cfg.sliding_window}")
  return ", ".join(parts)


def topology_devices(topology: str):
  """The abstract devices of a TPU topology ('v5p:2x2x1'), from any host with libtpu."""
  from jax.experimental import topologies

  if os.environ.get("JAX_PLATFORMS", "").strip() == "cpu":
    for k, v in _CPU_HOST_LIBTPU_ENV.items():
      os.environ.setdefault(k, v)
  try:
    try:
      return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    except Exception as e:  # noqa: BLE001
      if "chips_per_host_bounds" not in str(e):
        raise
      # A slice smaller than a host's default 2x2 chips (v5e:1x1, v5e:2x1): the host holds all
      # of it.
      dims = [int(x) for x in topology.split(":")[-1].split("x")]
      return topologies.get_topology_desc(
        platform="tpu", topology_name=topology, chips_per_host_bounds=(dims + [1, 1])[:3]
      ).devices
  except Exception as e:  # noqa: BLE001  (libtpu missing, unknown name)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "tpu" in first.lower() and (
      "not found" in first.lower() or "unknown backend" in first.lower()
    ):
      raise PlanError(
        f"cannot compile for TPU here: {first} (install the tpu extra: pip install -e '.[tpu]')"
      ) from None
    raise PlanError(f"unknown or unsupported topology {topology!r}: {first}") from None


def hbm_per_device(devices) -> int | None:
  kind = devices[0].device_kind
  per_chip = HBM_PER_CHIP.get(kind)
  if per_chip is None:
    return None
  cores = collections.Counter(tuple(getattr(d, "coords", (d.id,))) for d in devices)
  return per_chip // max(cores.values())


def hbm_bandwidth_per_device(devices) -> float | None:
  """A chip's HBM bandwidth, shared by the devices on it (as hbm_per_device shares its HBM)."""
  per_chip = HBM_BANDWIDTH_PER_CHIP.get(devices[0].device_kind)
  if per_chip is None:
    return None
  cores = collections.Counter(tuple(getattr(d, "coords", (d.id,))) for d in devices)
  return per_chip / max(cores.values())


def train_flops(cfg: ModelConfig, batch_size: int, seq_len: int) -> float:
  """Forward+backward FLOPs (3x forward) of the matmuls and attention of `batch_size`
  sequences of `seq_len` tokens, for any family.

  Per token, 2 FLOPs per weight of each linear layer: q (D x N*H), k and v (D x K*H each:
  K < N kv heads under GQA/MQA), o (N*H x D), the MLP's kernels (2 of D x F, or 3 when gated),
  and the LM head (D x V, tied or not: the embedding lookup is a gather, no FLOPs). Attention
  per layer and sequence: QK^T and PV, 2 * 2 * N * H FLOPs per (query, key) pair, with T keys
  per query as if no causal mask (the usual MFU convention; the kernels skip masked blocks),
  or min(T, W) keys under a sliding window of W.

  XLA's own cost analysis counts a scanned layer's body once, so it is not used here.
  """
  d, n, k, h, f, v = (
    cfg.embed_dim,
    cfg.num_heads,
    cfg.num_kv_heads,
    cfg.head_dim,
    cfg.mlp_dim,
    cfg.vocab_size,
  )
  mlp_kernels = 3 if cfg.mlp == "gated" else 2
  layer = d * n * h + d * 2 * k * h + n * h * d + mlp_kernels * d * f
  per_token = cfg.num_layers * 2 * layer + 2 * d * v
  keys = seq_len if cfg.sliding_window is None else min(seq_len, cfg.sliding_window)
  attention = cfg.num_layers * 2 * 2 * seq_len * keys * n * h  # per sequence
  return 3.0 * batch_size * (seq_len * per_token + attention)


def _shard_bytes(tree) -> int:
  """Bytes of one device's shards of a tree of ShapeDtypeStructs (int4 packs two per byte)."""

  def nbytes(x) -> int:
    n = math.prod(x.sharding.shard_shape(x.shape))
    return (n + 1) // 2 if x.dtype == jax.numpy.int4 else n * x.dtype.itemsize

  return sum(nbytes(x) for x in jax.tree.leaves(tree))


def _gathered(tree, mesh, axes: tuple[str, ...]):
  """The tree's ShapeDtypeStructs as sharded with the mesh `axes` gathered (replicated)."""
  from jax.sharding import NamedSharding, PartitionSpec

  def keep(entry):
    names = entry if isinstance(entry, tuple) else (entry,)
    kept = tuple(n for n in names if n is not None and n not in axes)
    return kept[0] if len(kept) == 1 else (kept or None)

  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=NamedSharding(mesh, PartitionSpec(*map(keep, x.sharding.spec)))
    ),
    tree,
  )


def _refused_plan(common: dict, state_abs, error: str, secs: float) -> Plan:
  """The compiler refuses a step that cannot fit; keep its figure for the temporaries."""
  sbytes = _shard_bytes(state_abs)
  return _refused(Plan, common, error, secs, arguments=sbytes, donated=sbytes)


def _refused(cls, common: dict, error: str, secs: float, *, arguments: int, donated: int):
  """A plan without an executable: the argument and donated-state bytes as sharded, and the
  compiler's own figure for the temporaries and what ran out."""
  temp, reason = _refusal(error)
  return cls(
    **common,
    argument_bytes=arguments,
    output_bytes=donated,
    alias_bytes=donated,
    temp_bytes=temp,
    code_bytes=0,
    compile_seconds=secs,
    compiler_error=reason,
  )


def _compile(cls, lowered, common: dict, t0: float, *, arguments: int, donated: int):
  """Compiles `lowered` -> a `cls` plan with the executable's per-device memory, or the
  compiler's refusal for lack of memory (arguments/donated: the bytes to report then)."""
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return _refused(
      cls, common, str(e), time.perf_counter() - t0, arguments=arguments, donated=donated
    )
  mem = compiled.memory_analysis()
  return cls(
    **common,
    argument_bytes=int(mem.argument_size_in_bytes),
    output_bytes=int(mem.output_size_in_bytes),
    alias_bytes=int(mem.alias_size_in_bytes),
    temp_bytes=int(mem.temp_size_in_bytes),
    code_bytes=int(mem.generated_code_size_in_bytes),
    compile_seconds=time.perf_counter() - t0,
  )


def _where(topology: str, devices, mesh) -> dict:
  """The plan fields that say what was compiled for."""
  return dict(
    topology=topology,
    device_kind=devices[0].device_kind,
    num_devices=len(devices),
    mesh=dict(mesh.shape),
    hbm_bytes=hbm_per_device(devices),
  )


def _refusal(error: str) -> tuple[int, str]:
  """(the temporaries' bytes the compiler reported, what ran out) of a RESOURCE_EXHAUSTED error."""
  import re

  msg = " ".join(error.split())
  m = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", msg)
  temp = (
    int(float(m.group(1)) * {"K": 1 << 10, "M": 1 << 20, "G": GIB, "T": 1 << 40}[m.group(2)])
    if m
    else 0
  )
  sentences = msg.split("RESOURCE_EXHAUSTED:", 1)[-1].strip().split(". ")
  # Keep what ran out and by how much ("Ran out of memory in memory space vmem", "Used 16.91M of
  # 16.00M vmem"), not the generic "XLA:TPU compile permanent error", plus the kernel named.
  useful = [x for x in sentences if x.startswith(("Ran out of memory", "Used ", "Exceeded "))][:2]
  reason = ". ".join(useful) or sentences[0]
  kernel = re.search(r"/(\w+)/pallas_call", msg)
  if kernel and "vmem" in reason.lower():
    reason += f" in {kernel.group(1)}"
  return temp, reason


def plan(
  config: ml_collections.ConfigDict,
  topology: str,
  mesh_spec: str | None = None,
  batch_size: int | None = None,
  seq_len: int | None = None,
) -> Plan:
  from rrtf_jax.train_step import (
    TrainError,
    abstract_batch,
    check_batch_layout,
    jit_train_step,
    make_optimizer,
  )
  from rrtf_jax.train_step import state_shardings

  model_cfg = ModelConfig.from_dict(config.model)
  if model_cfg.quant_bits:
    raise PlanError(
      "model.quant_bits: a quantized model is for inference; plan its decode step with "
      "--decode --quant int8|int4"
    )
  train_cfg = config.train.copy_and_resolve_references()
  train_cfg.batch_size = batch_size or train_cfg.batch_size
  train_cfg.seq_len = seq_len or train_cfg.seq_len
  if train_cfg.seq_len > model_cfg.max_position_embeddings:
    raise PlanError(
      f"seq_len {train_cfg.seq_len} exceeds "
      f"model.max_position_embeddings={model_cfg.max_position_embeddings}"
    )
  devices = topology_devices(topology)
  mesh = make_mesh(mesh_spec if mesh_spec is not None else (config.mesh or None), devices)
  try:
    check_batch_layout(train_cfg, mesh)
  except TrainError as e:
    raise PlanError(str(e)) from None

  tx = make_optimizer(train_cfg)
  state_abs, state_shard = state_shardings(model_cfg, tx, mesh)
  batch_abs = abstract_batch(train_cfg.batch_size, train_cfg.responses, train_cfg.seq_len, mesh)
  t0 = time.perf_counter()
  common = dict(
    **_where(topology, devices, mesh),
    batch_size=train_cfg.batch_size,
    responses=train_cfg.responses,
    seq_len=train_cfg.seq_len,
    microbatches=train_cfg.microbatches,
    remat=model_cfg.remat,
    attention=resolve_attention(model_cfg.attention, devices[0].platform),
    model=describe_model(model_cfg),
    params=sum(math.prod(x.shape) for x in jax.tree.leaves(state_abs.params)),
    flops_per_step=train_flops(
      model_cfg, train_cfg.batch_size * train_cfg.responses, train_cfg.seq_len
    ),
  )
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    try:
      lowered = jit_train_step(model_cfg, train_cfg, tx, mesh, state_shard).lower(
        state_abs, batch_abs
      )
    except NotImplementedError as e:  # e.g. a kernel without the model's sliding window
      raise PlanError(f"{e}; plan with --config.model.attention=xla") from None
    sbytes = _shard_bytes(state_abs)
    return _compile(Plan, lowered, common, t0, arguments=sbytes, donated=sbytes)


def decode_config(
  model_cfg: ModelConfig, quant: str = "none", group: int | None = None, embedding: bool = False
) -> ModelConfig:
  """The model as it is served: weights stored in the compute dtype (a converted StarCoder
  checkpoint is bfloat16), or quantized as `rrtf quantize` stores them."""
  cfg = model_cfg.replace(param_dtype=model_cfg.dtype, remat="none")
  if quant == "none":
    if embedding or group is not None:
      raise PlanError("--quant-group and --quant-embedding need --quant int8|int4")
    return cfg
  from model.quantize import quantized_config

  method = {"int8": "int8", "int4": "int4-rtn"}.get(quant)  # GPTQ and RTN store the same format
  if method is None:
    raise PlanError(f"--quant must be none, int8 or int4, got {quant!r}")
  try:
    return quantized_config(cfg, method, group, embedding, dtype=model_cfg.dtype)
  except ValueError as e:
    raise PlanError(str(e)) from None


def plan_decode(
  config: ml_collections.ConfigDict,
  topology: str,
  mesh_spec: str | None = None,
  batch_size: int = 16,
  context: int | None = None,
  quant: str = "none",
  group: int | None = None,
  embedding: bool = False,
  chunk: int = 32,
) -> DecodePlan:
  """Compiles the decode step for `topology` with a KV cache of `context` tokens per slot
  (`batch_size` slots, as the continuous batcher keeps them; `chunk` tokens per loop call) and
  reports per-device memory."""
  from model.checkpoint import param_bytes
  from model.decode import DecodeState, _CACHE_AXES, decode_chunk, init_state
  from model.sharding import logical_to_sharding, replicated
  from model.transformer import abstract_params

  cfg = decode_config(ModelConfig.from_dict(config.model), quant, group, embedding)
  context = context or cfg.max_position_embeddings
  if not 1 < context <= cfg.max_position_embeddings:
    raise PlanError(
      f"context {context} must exceed 1 and be at most "
      f"model.max_position_embeddings={cfg.max_position_embeddings}"
    )
  if batch_size < 1:
    raise PlanError(f"batch size must be at least 1, got {batch_size}")
  devices = topology_devices(topology)
  mesh = make_mesh(mesh_spec if mesh_spec is not None else (config.mesh or None), devices)
  boxed = abstract_params(cfg)
  with nn.logical_axis_rules(LOGICAL_RULES):
    p_shard = logical_to_sharding(boxed, mesh)
    cache_shard = nn.logical_to_mesh_sharding(
      nn.logical_to_mesh_axes(_CACHE_AXES), mesh, LOGICAL_RULES
    )
  p_abs = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), p_shard
  )
  b = batch_size
  state = jax.eval_shape(lambda: init_state(cfg, slots=b, length=context, chunk=chunk))
  rep = replicated(mesh)
  state_shard = DecodeState(
    **{f: (cache_shard if f in ("cache_k", "cache_v") else rep) for f in state.__dataclass_fields__}
  )
  state_abs = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, state_shard
  )
  # [L, B, context, K, H] each for K and V: 2 * L * K * H * itemsize bytes per token and row
  cache_bytes = 2 * math.prod(state.cache_k.shape) * state.cache_k.dtype.itemsize
  common = dict(
    **_where(topology, devices, mesh),
    batch_size=b,
    context=context,
    params=sum(math.prod(x.shape) for x in jax.tree.leaves(p_abs)),
    weights=_weights(cfg),
    model=describe_model(cfg),
    param_bytes=param_bytes(p_abs),
    cache_bytes=cache_bytes,
    cache_bytes_per_token=cache_bytes // (b * context),
    weight_bytes_per_device=_shard_bytes(p_abs),
    weight_read_bytes_per_device=_shard_bytes(_gathered(p_abs, mesh, ("data", "fsdp"))),
    cache_bytes_per_device=_shard_bytes((state_abs.cache_k, state_abs.cache_v)),
    hbm_bandwidth=hbm_bandwidth_per_device(devices),
  )
  step = jax.jit(decode_chunk, static_argnames=("cfg", "eos_ids", "pad_id"), donate_argnums=(2,))
  t0 = time.perf_counter()
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    lowered = step.lower(
      p_abs,
      cfg,
      state_abs,
      eos_ids=cfg.eos_ids,
      pad_id=cfg.pad_token_id or 0,
    )
    state_bytes = _shard_bytes(state_abs)
    return _compile(
      DecodePlan,
      lowered,
      common,
      t0,
      arguments=_shard_bytes(p_abs) + state_bytes,
      donated=state_bytes,
    )


def _weights(cfg: ModelConfig) -> str:
  if not cfg.quant_bits:
    return str(cfg.param_dtype)
  how = f"int{cfg.quant_bits} " + (
    f"(groups of {cfg.quant_group} rows)" if cfg.quant_group else "(per channel)"
  )
  return how + (", int8 embedding" if cfg.quant_embedding else f", {cfg.param_dtype} embedding")

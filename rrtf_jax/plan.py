"""`rrtf plan`: compile a training step ahead of time for a TPU topology, without a TPU.

libtpu's real XLA TPU compiler partitions and compiles the step for an abstract device set
(`jax.experimental.topologies`), and the compiled executable reports its per-chip memory and
FLOPs. Nothing is allocated: parameters and batch are ShapeDtypeStructs with shardings.
The step compiled is the training stage's own (rrtf_jax/train.py): the RRTF loss over R
responses per prompt, gradient accumulation over micro-batches, AdamW with fp32 moments,
the state donated, exactly as `rrtf train` jits it.
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
    "TPU v2": 16 * GIB, "TPU v3": 32 * GIB, "TPU v4": 32 * GIB, "TPU v4 lite": 8 * GIB,
    "TPU v5 lite": 16 * GIB, "TPU v5": 95 * GIB, "TPU v5p": 95 * GIB, "TPU v6 lite": 32 * GIB,
}


class PlanError(ValueError):
  pass


@dataclasses.dataclass
class Plan:
  topology: str
  device_kind: str
  num_devices: int
  mesh: dict
  batch_size: int  # prompts per optimizer step
  responses: int  # R sequences per prompt
  seq_len: int
  microbatches: int
  attention: str  # the attention implementation compiled (auto resolves to pallas on TPU)
  params: int
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  hbm_bytes: int | None
  flops_per_step: float  # analytic model FLOPs of forward+backward
  compile_seconds: float
  compiler_error: str | None = None  # why the TPU compiler refused the step (out of HBM or VMEM)
  remat: str = "none"

  @property
  def total_bytes(self) -> int:
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

  @property
  def fits(self) -> bool | None:
    if self.compiler_error:
      return False
    return None if self.hbm_bytes is None else self.total_bytes <= self.hbm_bytes

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d.update(total_bytes=self.total_bytes, fits=self.fits)
    return d

  def report(self) -> str:
    g = _bytes
    hbm = g(self.hbm_bytes) if self.hbm_bytes else "   unknown"
    mesh = ",".join(f"{k}={v}" for k, v in self.mesh.items())
    lines = [
        f"topology     {self.topology} ({self.num_devices} devices, {self.device_kind}), mesh {mesh}",
        f"model        {_count(self.params)} parameters; attention: {self.attention}",
        f"step         RRTF train step (forward, backward, AdamW): {self.batch_size} prompts x {self.responses} "
        f"responses x {self.seq_len} tokens in {self.microbatches} micro-batch(es)",
        f"compiled in  {self.compile_seconds:.1f} s",
        "per device:",
        f"  arguments  {g(self.argument_bytes)}   (parameters, optimizer state and batch shards)",
        f"  outputs    {g(self.output_bytes)}   (the new state, in place of the donated one, and metrics)",
    ]
    if self.compiler_error:  # no executable: only what the compiler said, no code size or total
      lines.append(f"  temporaries{g(self.temp_bytes)}   (as the compiler reported them)")
    else:
      lines += [f"  temporaries{g(self.temp_bytes)}   (activations and workspace)",
                f"  code       {g(self.code_bytes)}",
                f"  total      {g(self.total_bytes)}   of {hbm} HBM"]
    lines.append(f"FLOPs        {self.flops_per_step:.3e} per step, {self.flops_per_step / self.num_devices:.3e} "
                 "per device (analytic: 3x forward matmuls and attention)")
    advice = "add chips, shard more (--mesh), raise --config.train.microbatches"
    advice += ", or set --config.model.remat=full" if self.remat != "full" else ""
    if self.compiler_error and "vmem" in self.compiler_error.lower():
      lines.append(f"verdict      DOES NOT COMPILE: a kernel's blocks exceed the chip's on-chip VMEM "
                   f"({self.compiler_error}); split the heads over --mesh ...,tensor=N or try "
                   "--config.model.attention=splash")
    elif self.compiler_error:
      lines.append(f"verdict      DOES NOT FIT: the TPU compiler ran out of HBM ({self.compiler_error}); {advice}")
    elif self.fits is None:
      lines.append("verdict      unknown: no HBM figure for this chip")
    elif self.fits:
      lines.append(f"verdict      fits ({self.total_bytes / self.hbm_bytes:.0%} of HBM)")
    else:
      lines.append(f"verdict      DOES NOT FIT: needs {g(self.total_bytes).strip()} per device, the chip has "
                   f"{hbm.strip()}; {advice}")
    return "\n".join(lines)


# When compiling for TPU from a machine without one (JAX_PLATFORMS=cpu), these stop libtpu from
# probing for a local TPU and its pod peers, which only prints errors there. Never set on a TPU VM.
_CPU_HOST_LIBTPU_ENV = {"TPU_ACCELERATOR_TYPE": "v5litepod-4", "TPU_WORKER_HOSTNAMES": "localhost",
                        "TPU_SKIP_MDS_QUERY": "1",
                        # several compiling processes (tests, parallel plans) may each load libtpu
                        "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def _bytes(b: float) -> str:
  for unit, size in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
    if b >= size:
      return f"{b / size:8.2f} {unit}"
  return f"{b:8.0f} B  "


def _count(n: int) -> str:
  return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.3f}M"


def topology_devices(topology: str):
  """The abstract devices of a TPU topology ('v5p:2x2x1'), from any host with libtpu."""
  from jax.experimental import topologies
  if os.environ.get("JAX_PLATFORMS", "").strip() == "cpu":
    for k, v in _CPU_HOST_LIBTPU_ENV.items():
      os.environ.setdefault(k, v)
  try:
    return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
  except Exception as e:  # noqa: BLE001  (libtpu missing, unknown name)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "tpu" in first.lower() and ("not found" in first.lower() or "unknown backend" in first.lower()):
      raise PlanError(f"cannot compile for TPU here: {first} (install the tpu extra: pip install -e '.[tpu]')") from None
    raise PlanError(f"unknown or unsupported topology {topology!r}: {first}") from None


def hbm_per_device(devices) -> int | None:
  kind = devices[0].device_kind
  per_chip = HBM_PER_CHIP.get(kind)
  if per_chip is None:
    return None
  cores = collections.Counter(tuple(getattr(d, "coords", (d.id,))) for d in devices)
  return per_chip // max(cores.values())


def train_flops(cfg: ModelConfig, batch_size: int, seq_len: int) -> float:
  """Forward+backward FLOPs (3x forward) of the matmuls and attention, as XLA computes them.

  XLA's own cost analysis counts a scanned layer's body once, so it is not used here.
  """
  d, n, k, h, f, v = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
  per_token = cfg.num_layers * 2 * (d * n * h + d * 2 * k * h + n * h * d + 2 * d * f) + 2 * d * v
  attention = cfg.num_layers * 2 * 2 * seq_len * seq_len * n * h  # QK^T and PV per sequence, unmasked
  return 3.0 * batch_size * (seq_len * per_token + attention)


def _shard_bytes(tree) -> int:
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _refused_plan(common: dict, state_abs, error: str, secs: float) -> Plan:
  """The compiler refuses a step that cannot fit; keep its figure for the temporaries."""
  import re
  msg = " ".join(error.split())
  m = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", msg)
  temp = int(float(m.group(1)) * {"K": 1 << 10, "M": 1 << 20, "G": GIB, "T": 1 << 40}[m.group(2)]) if m else 0
  sentences = msg.split("RESOURCE_EXHAUSTED:", 1)[-1].strip().split(". ")
  # Keep what ran out and by how much ("Ran out of memory in memory space vmem", "Used 16.91M of
  # 16.00M vmem"), not the generic "XLA:TPU compile permanent error", plus the kernel named.
  useful = [x for x in sentences if x.startswith(("Ran out of memory", "Used ", "Exceeded "))][:2]
  reason = ". ".join(useful) or sentences[0]
  kernel = re.search(r"/(\w+)/pallas_call", msg)
  if kernel and "vmem" in reason.lower():
    reason += f" in {kernel.group(1)}"
  sbytes = _shard_bytes(state_abs)
  return Plan(**common, argument_bytes=sbytes, output_bytes=sbytes, alias_bytes=sbytes, temp_bytes=temp,
              code_bytes=0, compile_seconds=secs, compiler_error=reason)


def plan(config: ml_collections.ConfigDict, topology: str, mesh_spec: str | None = None,
         batch_size: int | None = None, seq_len: int | None = None) -> Plan:
  from rrtf_jax.train import TrainError, abstract_batch, check_batch_layout, jit_train_step, make_optimizer
  from rrtf_jax.train import state_shardings
  model_cfg = ModelConfig.from_dict(config.model)
  tc = config.train.copy_and_resolve_references()
  tc.batch_size = batch_size or tc.batch_size
  tc.seq_len = seq_len or tc.seq_len
  if tc.seq_len > model_cfg.max_position_embeddings:
    raise PlanError(f"seq_len {tc.seq_len} exceeds model.max_position_embeddings={model_cfg.max_position_embeddings}")
  devices = topology_devices(topology)
  mesh = make_mesh(mesh_spec if mesh_spec is not None else (config.mesh or None), devices)
  try:
    check_batch_layout(tc, mesh)
  except TrainError as e:
    raise PlanError(str(e)) from None

  tx = make_optimizer(tc)
  state_abs, state_shard = state_shardings(model_cfg, tx, mesh)
  batch_abs = abstract_batch(tc.batch_size, tc.responses, tc.seq_len, mesh)
  t0 = time.perf_counter()
  common = dict(
      topology=topology, device_kind=devices[0].device_kind, num_devices=len(devices),
      mesh=dict(mesh.shape), batch_size=tc.batch_size, responses=tc.responses, seq_len=tc.seq_len,
      microbatches=tc.microbatches, remat=model_cfg.remat, attention=resolve_attention(model_cfg.attention, devices[0].platform),
      params=sum(math.prod(x.shape) for x in jax.tree.leaves(state_abs.params)), hbm_bytes=hbm_per_device(devices),
      flops_per_step=train_flops(model_cfg, tc.batch_size * tc.responses, tc.seq_len))
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    lowered = jit_train_step(model_cfg, tc, tx, mesh, state_shard).lower(state_abs, batch_abs)
    try:
      compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      return _refused_plan(common, state_abs, str(e), time.perf_counter() - t0)
  mem = compiled.memory_analysis()
  return Plan(**common, argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
              alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
              code_bytes=int(mem.generated_code_size_in_bytes), compile_seconds=time.perf_counter() - t0)

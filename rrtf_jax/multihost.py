"""Which host this is: the work split of per-host stages, and jax.distributed for training.

On a Cloud TPU slice every worker runs the same command (`gcloud ... ssh --worker=all`):

  rrtf train      joins one jax.distributed job: one global mesh over every chip, each
                  host feeding its share of the global batch (rrtf_jax/stages/train.py).
  rrtf sample,    independent processes on each host's own chips; each takes its share of
  rank, prepare,  the input files: shard = this worker's index, num_shards = the number of
  evaluate        workers, unless --shard/--num-shards say otherwise.

Where the index and count come from, first found wins:
  1. explicit flags (--shard/--num-shards; --coordinator-address/--num-processes/--process-id);
  2. JAX_PROCESS_ID and JAX_NUM_PROCESSES (with JAX_COORDINATOR_ADDRESS for training): any
     batch system, and the tests (several processes on 127.0.0.1);
  3. TPU_WORKER_ID and TPU_WORKER_HOSTNAMES (GKE TPU pods);
  4. the TPU VM metadata server (agent-worker-number, worker-network-endpoints), the source
     JAX itself uses on Cloud TPU VMs; only asked on a Google Compute Engine machine;
  5. one process.
"""

from __future__ import annotations

import dataclasses
import os
import sys

METADATA_URL = "http://metadata.google.internal/computeMetadata/v1/instance/attributes/"
DMI_PRODUCT = "/sys/class/dmi/id/product_name"


@dataclasses.dataclass(frozen=True)
class Host:
  index: int
  count: int
  source: str  # where index and count came from

  def __str__(self) -> str:
    return f"process {self.index} of {self.count} ({self.source})"


def _metadata(key: str, timeout: float = 2.0) -> str | None:
  import requests

  try:
    r = requests.get(METADATA_URL + key, headers={"Metadata-Flavor": "Google"}, timeout=timeout)
  except requests.RequestException:
    return None
  return r.text.strip() if r.status_code == 200 else None


def _on_gce() -> bool:
  try:
    with open(DMI_PRODUCT) as f:
      return "Google Compute Engine" in f.read()
  except OSError:
    return False


def _ints(index: str, count: str, source: str) -> Host:
  try:
    host = Host(int(index), int(count), source)
  except ValueError:
    raise ValueError(
      f"{source}: process index {index!r} and count {count!r} must be integers"
    ) from None
  if not 0 <= host.index < host.count:
    raise ValueError(f"{source}: process index {host.index} is not in [0, {host.count})")
  return host


def detect(environ=None) -> Host:
  """This process's index and the process count from the environment (sources 2-5 above)."""
  env = os.environ if environ is None else environ
  if env.get("JAX_NUM_PROCESSES"):
    return _ints(
      env.get("JAX_PROCESS_ID", ""), env["JAX_NUM_PROCESSES"], "JAX_PROCESS_ID/JAX_NUM_PROCESSES"
    )
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  worker = env.get("TPU_WORKER_ID", "").strip()
  # Only a real several-host layout counts: libtpu itself may leave a one-host value, or a
  # warning text in TPU_WORKER_ID, in the environment of a process that compiled for TPU.
  if len(hosts) > 1 and worker.isdigit():
    return _ints(worker, str(len(hosts)), "TPU_WORKER_ID/TPU_WORKER_HOSTNAMES")
  if environ is None and _on_gce():
    worker, endpoints = _metadata("agent-worker-number"), _metadata("worker-network-endpoints")
    if worker is not None and endpoints:
      return _ints(worker, str(len(endpoints.split(","))), "TPU VM metadata")
  return Host(0, 1, "single process")


def work_shard(shard: int | None, num_shards: int | None, *, stage: str) -> tuple[int, int]:
  """(shard, num_shards) of a per-host stage: the flags when given, else this host's index and
  the host count (a line on stderr says so when there are several)."""
  if shard is not None or num_shards is not None:
    return (shard or 0), (num_shards or 1)
  host = detect()
  if host.count > 1:
    print(f"rrtf {stage}: {host}: taking shard {host.index} of {host.count}", file=sys.stderr)
  return host.index, host.count


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> None:
  """jax.distributed.initialize() when this process is one of several; nothing otherwise.

  Explicit arguments win; then JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES, JAX_PROCESS_ID);
  then a TPU slice with several workers, where JAX finds the coordinator itself. On the CPU
  backend the processes' devices form one device set over gloo collectives.
  """
  import jax

  if jax.distributed.is_initialized():
    return
  explicit = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  kw = {}
  if explicit:
    host = detect() if num_processes is None or process_id is None else None
    kw = dict(
      coordinator_address=explicit,
      num_processes=num_processes if num_processes is not None else host.count,
      process_id=process_id if process_id is not None else host.index,
    )
    if kw["num_processes"] == 1:
      return
  elif detect().count == 1:
    return
  if (
    os.environ.get("JAX_PLATFORMS", "") == "cpu"
  ):  # (jax.default_backend() would start the backend too early)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kw)

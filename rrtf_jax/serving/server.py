"""`rrtf serve`: an OpenAI-compatible HTTP server for one of our checkpoints.

    serve_main("ckpt", port=8000, model_name="rrtf-1b")  # prints "serving rrtf-1b on http://127.0.0.1:8000/v1"
    client = TeacherClient("http://127.0.0.1:8000/v1", "rrtf-1b", api="completions")
    client.complete("def add(a, b):\\n")

Endpoints (stdlib `http.server`, JSON shaped like OpenAI's): `GET /health`, `GET /v1/models`,
`POST /v1/completions` and `POST /v1/chat/completions`; the request and response shapes are
rrtf_jax/serving/api.py's, the batching rrtf_jax/serving/engine.py's. Chat messages go through
the chat template of the checkpoint's tokenizer when it ships one (api.chat_prompt).

Streaming sends the new suffix of a row's text after every decode chunk (the decoder holds
back text where a stop sequence may begin), so the deltas concatenate to the non-streamed
text. A client that goes away mid-stream stops receiving; its rows run to the end of their
batch.

Errors: 400 for a bad body or value (a prompt longer than the model's context included), 401
for a missing or wrong bearer key when `api_key_env` names one, 404 for an unknown path or
model. With `request_log`, every POST appends a JSON line (time, path, status, sha256 of the
body, its model and n). The key is never logged.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import hmac
import json
import logging
import os
import queue
import signal
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from model.decode import Generation, Request
from rrtf_jax.serving.api import MAX_BODY, ApiError, choice, parse_request, usage
from rrtf_jax.serving.engine import Engine

log = logging.getLogger(__name__)


# ---- HTTP -------------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
  daemon_threads = True  # a stuck client never holds up shutdown
  engine: Engine
  model_name: str
  api_key: str | None
  default_max_tokens: int
  chat_template = None  # the checkpoint tokenizer's (data/chat_template.py), if it has one
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
      raise ApiError(
        401,
        "missing or incorrect API key: send it as 'Authorization: Bearer <key>'",
        code="invalid_api_key",
      )

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
        raise ApiError(
          413 if length > 0 else 400, f"Content-Length must be in [0, {MAX_BODY}], got {length}"
        )
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
    line = json.dumps(
      {
        "time": round(time.time(), 3),
        "path": path,
        "status": status,
        "sha256": hashlib.sha256(raw).hexdigest(),
        "model": body.get("model"),
        "n": body.get("n", 1) if body else None,
      }
    )
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
      raise ApiError(
        404,
        f"the model {model!r} does not exist; this server serves {self.server.model_name!r}",
        code="model_not_found",
      )
    try:
      rows, n, opts = parse_request(
        body,
        chat=chat,
        default_max_tokens=self.server.default_max_tokens,
        chat_template=self.server.chat_template,
      )
    except ValueError as e:
      raise ApiError(400, str(e)) from None
    meta = {
      "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
      "created": int(time.time()),
      "model": self.server.model_name,
    }
    if opts["stream"]:
      return self._stream(rows, n, chat, meta, opts["include_usage"])
    gens = self._result(self.server.engine.submit(rows))
    choices = [choice(i, g.text, g.finish_reason, chat) for i, g in enumerate(gens)]
    obj = "chat.completion" if chat else "text_completion"
    return self._send(200, {**meta, "object": obj, "choices": choices, "usage": usage(gens, n)})

  @staticmethod
  def _result(fut: concurrent.futures.Future) -> list[Generation]:
    try:
      return fut.result()
    except ValueError as e:  # what the decoder refuses: the request's fault
      raise ApiError(400, str(e)) from None

  def _stream(
    self, rows: list[Request], n: int, chat: bool, meta: dict, include_usage: bool
  ) -> int:
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
      text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
      data = f"data: {text}\n\n"
      data = data.encode("utf-8")
      self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
      self.wfile.flush()

    def chunk(i, text=None, finish=None, role=False) -> None:
      if chat:
        delta = ({"role": "assistant", "content": ""} if role else {}) | (
          {} if text is None else {"content": text}
        )
        choice = {"index": i, "delta": delta}
      else:
        choice = {"index": i, "text": text or ""}
      event(
        {**meta, "object": obj, "choices": [{**choice, "logprobs": None, "finish_reason": finish}]}
      )

    sent = [""] * len(rows)

    def advance(i: int, text: str) -> None:
      if not text.startswith(sent[i]):  # the decoder's held-back text makes this impossible
        log.warning("row %d text changed after it was streamed; the stream will differ", i)
      elif len(text) > len(sent[i]):
        chunk(i, text[len(sent[i]) :])
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
        event({**meta, "object": obj, "choices": [], "usage": usage(gens, n)})
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


def make_server(
  engine: Engine,
  host: str,
  port: int,
  *,
  model_name: str,
  api_key_env: str | None = None,
  request_log: str | None = None,
  default_max_tokens: int = 256,
) -> ThreadingHTTPServer:
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
  tokenizer = getattr(getattr(engine, "decoder", None), "tokenizer", None)
  server.chat_template = getattr(tokenizer, "chat_template", None)
  server.log_lock = threading.Lock()
  if request_log:
    server.log_file = open(request_log, "a", encoding="utf-8")  # noqa: SIM115  (server_close closes it)
  return server


def load_decoder(
  ckpt: str,
  *,
  mesh: str | None = None,
  dtype: str | None = None,
  chunk: int = 32,
  max_batch: int = 16,
  seed: int = 0,
):
  """The Decoder of checkpoint `ckpt`, sharded by the mesh spec `mesh` (e.g. tensor=4) over this
  host's own devices: serving, sampling and evaluating are per-host work (every worker of a
  multi-host slice runs its own copy; jax.devices() there holds the other hosts' devices too).
  `rrtf serve`, `rrtf sample` and `rrtf evaluate` all load their model through it."""
  import jax

  from model.decode import Decoder
  from model.sharding import make_mesh

  local_mesh = make_mesh(mesh, jax.local_devices()) if mesh else None
  return Decoder.from_checkpoint(
    ckpt, mesh=local_mesh, dtype=dtype, chunk=chunk, max_batch=max_batch, seed=seed
  )


def serve_main(
  ckpt: str,
  host: str = "127.0.0.1",
  port: int = 8000,
  *,
  model_name: str | None = None,
  max_batch: int = 16,
  chunk: int = 32,
  api_key_env: str | None = None,
  request_log: str | None = None,
  dtype: str | None = None,
  mesh: str | None = None,
  seed: int = 0,
) -> None:
  """Loads `ckpt` and serves it until SIGINT or SIGTERM (see the module docstring). Prints one
  line, "serving NAME on http://HOST:PORT/v1", once listening (port 0 picks a free one)."""
  decoder = load_decoder(ckpt, mesh=mesh, dtype=dtype, chunk=chunk, max_batch=max_batch, seed=seed)
  name = model_name or os.path.basename(ckpt.rstrip("/")) or "rrtf"
  engine = Engine(decoder)
  try:
    server = make_server(
      engine, host, port, model_name=name, api_key_env=api_key_env, request_log=request_log
    )
  except BaseException:
    engine.close()
    raise
  stop = threading.Event()
  previous = {}
  if threading.current_thread() is threading.main_thread():
    for sig in (signal.SIGINT, signal.SIGTERM):
      previous[sig] = signal.signal(sig, lambda *_: stop.set())
  thread = threading.Thread(
    target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="rrtf-http", daemon=True
  )
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

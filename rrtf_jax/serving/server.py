"""`rrtf serve`: an OpenAI-compatible HTTP server for one of our checkpoints.

    serve_main("ckpt", port=8000, model_name="rrtf-1b")  # prints "serving rrtf-1b on http://127.0.0.1:8000/v1"
    client = TeacherClient("http://127.0.0.1:8000/v1", "rrtf-1b", api="completions")
    client.complete("def add(a, b):\\n")

Endpoints (JSON shaped like OpenAI's): `GET /health`, `GET /metrics` (Prometheus text: the
engine's queue length, busy slots, generated tokens, time to first token; neither needs the
key), `GET /v1/models`, `POST /v1/completions` and `POST /v1/chat/completions`; the request and
response shapes are rrtf_jax/serving/api.py's, the batching rrtf_jax/serving/engine.py's (rows
join the running batch at its next chunk boundary). Chat messages go through the chat template
of the checkpoint's tokenizer when it ships one (api.chat_prompt).

Why aiohttp (pinned in setup.py): the server holds one open request per queued or decoding row,
most of them waiting on the engine, and streams; one asyncio loop holds thousands of those where
`http.server` spent a thread on each, and it notices a client going away (the handler is
cancelled), which threads blocked on a future never did. aiohttp is asyncio-native, already
installed (gcsfs's HTTP stack), has a streamed response for server-sent events and a graceful
shutdown with a timeout; ASGI stacks (uvicorn + starlette) would add two dependencies for the
same.

Streaming (rrtf_jax/serving/stream.py) sends the new suffix of a row's text after each decode
chunk, so the deltas concatenate to the non-streamed text. A client that disconnects, streaming
or not, cancels its request: its rows leave the queue, or their slots free at the next chunk
boundary. The engine's prompt checks and tokenizing run off the event loop.

Errors: 400 for a bad body or value (a prompt longer than the model's context and n larger than
the decode slots included), 401 for a missing or wrong bearer key when `api_key_env` names one,
404 for an unknown path or model, 405 for another method, 413 for a body over api.MAX_BODY,
429 (with Retry-After) when `max_queue` rows already wait for a slot, 503 once the engine has
closed. With `request_log`, every POST appends a JSON line (time, path, status, sha256 of the
body, its model and n; 499 when the client went away first). The key is never logged.

SIGTERM or SIGINT: the listening socket closes (new connections are refused) and idle
keep-alive connections close; requests in flight get up to `drain_timeout` seconds to finish,
then those left are cancelled and answered 503 (a stream's last event); the engine closes and
`serve_main` returns (exit 0). A second signal acts at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import hmac
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from typing import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from model.decode import Generation, Request
from rrtf_jax.serving.api import (
  MAX_BODY,
  ApiError,
  choice,
  generations,
  parse_request,
  shutting_down,
  usage,
)
from rrtf_jax.serving.engine import Engine
from rrtf_jax.serving.stream import Stream

log = logging.getLogger(__name__)

DRAIN_TIMEOUT = 30.0  # seconds in-flight requests get after SIGTERM
_CLOSE_TIMEOUT = 5.0  # seconds handlers get to end once their submissions are cancelled
_COMPLETIONS = ("/v1/completions", "/v1/chat/completions")


class _Post:
  """One POST's request-log line, written once, with the first status given."""

  def __init__(self, server: Server, path: str):
    self.server, self.path, self.raw, self.logged = server, path, b"", False
    self.streaming = False  # once a stream's headers are sent

  def done(self, status: int) -> None:
    if self.logged or self.server.log_file is None:
      return
    self.logged = True
    try:
      body = json.loads(self.raw)
    except ValueError:
      body = None
    body = body if isinstance(body, dict) else {}
    entry = {
      "time": round(time.time(), 3),
      "path": self.path,
      "status": status,
      "sha256": hashlib.sha256(self.raw).hexdigest(),
      "model": body.get("model"),
      "n": body.get("n", 1) if body else None,
    }
    self.server.log_file.write(json.dumps(entry) + "\n")  # only the event loop writes
    self.server.log_file.flush()


class Server:
  """The HTTP side of `rrtf serve` over `engine`, bound at construction (`server_address`
  holds the port); `serve_forever()` runs its event loop in the calling thread until
  `shutdown()` (from another thread) or, with `handle_signals`, SIGTERM/SIGINT."""

  def __init__(
    self,
    engine: Engine,
    host: str,
    port: int,
    *,
    model_name: str,
    api_key: str | None = None,
    request_log: str | None = None,
    default_max_tokens: int = 256,
    drain_timeout: float = DRAIN_TIMEOUT,
  ):
    self.engine, self.model_name, self.api_key = engine, model_name, api_key
    self.default_max_tokens, self.drain_timeout = int(default_max_tokens), float(drain_timeout)
    tokenizer = getattr(getattr(engine, "decoder", None), "tokenizer", None)
    self.chat_template = getattr(tokenizer, "chat_template", None)  # data/chat_template.py's
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    self.socket = socket.create_server((host, port), family=family, backlog=1024)
    self.server_address = self.socket.getsockname()
    self.log_file = open(request_log, "a", encoding="utf-8") if request_log else None  # noqa: SIM115
    self.app = web.Application(client_max_size=MAX_BODY)
    self.app.router.add_route("*", "/{path:.*}", self._dispatch)
    self.loop: asyncio.AbstractEventLoop | None = None
    self._stop: asyncio.Event | None = None
    self._lock = threading.Lock()  # the three below, between serve_forever and shutdown
    self._entered = self._stopping = False
    self._finished = threading.Event()
    self._active = 0  # POST handlers running (the event loop's)
    self._pending: set[concurrent.futures.Future] = set()  # their engine submissions
    self._cut = False  # the drain's time is up: later submissions are cancelled at once

  @property
  def url(self) -> str:
    host, port = self.server_address[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"

  # ---- running and stopping ----

  def serve_forever(
    self, *, ready: Callable[[], None] | None = None, handle_signals: bool = False
  ) -> None:
    """Serves until stopped, then drains (see the module docstring); `ready()` is called once
    listening."""
    with self._lock:
      if self._stopping:
        return
      self._entered = True
    try:
      asyncio.run(self._serve(ready, handle_signals))
    finally:
      self._finished.set()

  def shutdown(self) -> None:
    """Stops `serve_forever` as SIGTERM does and waits for it to return."""
    with self._lock:
      self._stopping = True
      entered, loop = self._entered, self.loop
    if loop is not None:
      with contextlib.suppress(RuntimeError):  # the loop has already closed
        loop.call_soon_threadsafe(self._stop.set)
    if entered:
      self._finished.wait()

  def server_close(self) -> None:
    self.socket.close()
    if self.log_file is not None:
      self.log_file.close()
      self.log_file = None

  async def _serve(self, ready, handle_signals: bool) -> None:
    with self._lock:
      self.loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
      if self._stopping:
        self._stop.set()
    # handler_cancellation: a client that disconnects cancels its handler (and so its rows).
    # The drain is ours (_drain); aiohttp's shutdown then only closes connections.
    runner = web.AppRunner(self.app, handler_cancellation=True, shutdown_timeout=_CLOSE_TIMEOUT)
    await runner.setup()
    signals = (signal.SIGINT, signal.SIGTERM) if handle_signals else ()
    try:
      await web.SockSite(runner, self.socket).start()
      for sig in signals:
        self.loop.add_signal_handler(sig, self._on_signal, sig)
      if ready is not None:
        ready()
      await self._stop.wait()
    finally:
      for sig in signals:  # a second signal acts at once
        self.loop.remove_signal_handler(sig)
      await self._drain(runner)
      await runner.cleanup()

  async def _drain(self, runner: web.AppRunner) -> None:
    """Stops accepting (the listening socket closes; keep-alive connections close once idle),
    waits up to drain_timeout for the requests in flight, then cancels the submissions left:
    their clients get a 503 (as JSON, or as a stream's last event)."""
    for site in list(runner.sites):
      await site.stop()
    runner.server.pre_shutdown()
    log.info("draining %d requests for up to %.1f s", self._active, self.drain_timeout)
    deadline = self.loop.time() + self.drain_timeout
    while self._active and self.loop.time() < deadline:
      await asyncio.sleep(0.02)
    self._cut = True
    if self._pending:
      log.warning("the drain timed out: cancelling %d requests", len(self._pending))
    for fut in list(self._pending):
      self.engine.cancel(fut)

  def _on_signal(self, sig: int) -> None:
    log.warning(
      "%s: no new connections; finishing the requests in flight", signal.Signals(sig).name
    )
    self._stop.set()

  # ---- routing ----

  async def _dispatch(self, request: web.Request) -> web.StreamResponse:
    path = request.path.rstrip("/") or "/"
    if request.method == "POST":
      return await self._post(request, _Post(self, path))
    try:
      if request.method != "GET":
        raise ApiError(405, f"Invalid method ({request.method} {path})", code="method_not_allowed")
      if path == "/health":
        return web.json_response({"status": "ok"})
      if path == "/metrics":
        text = generate_latest(self.engine.registry)
        return web.Response(body=text, headers={"Content-Type": CONTENT_TYPE_LATEST})
      self._auth(request)
      card = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "rrtf"}
      if path == "/v1/models":
        return web.json_response({"object": "list", "data": [card]})
      if path == f"/v1/models/{self.model_name}":
        return web.json_response(card)
      raise ApiError(404, f"Invalid URL (GET {path})", code="unknown_url")
    except ApiError as e:
      return _error(e)

  def _auth(self, request: web.Request) -> None:
    if self.api_key is None:
      return
    header = request.headers.get("Authorization", "")
    token = header[7:].strip() if header[:7].lower() == "bearer " else ""
    if not hmac.compare_digest(token.encode("utf-8"), self.api_key.encode("utf-8")):
      raise ApiError(
        401,
        "missing or incorrect API key: send it as 'Authorization: Bearer <key>'",
        code="invalid_api_key",
      )

  async def _post(self, request: web.Request, post: _Post) -> web.StreamResponse:
    self._active += 1
    try:
      return await self._answer(request, post)
    finally:
      self._active -= 1

  async def _answer(self, request: web.Request, post: _Post) -> web.StreamResponse:
    try:
      if (request.content_length or 0) > MAX_BODY:
        raise ApiError(413, f"the body must be at most {MAX_BODY} bytes")
      try:
        post.raw = await request.read()
      except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"the body must be at most {MAX_BODY} bytes") from None
      self._auth(request)
      if post.path not in _COMPLETIONS:
        raise ApiError(404, f"Invalid URL (POST {post.path})", code="unknown_url")
      return await self._complete(request, post, chat=post.path == _COMPLETIONS[1])
    except ApiError as e:
      post.done(e.status)  # before the answer: a client that has it can read its line
      return _error(e)
    except (asyncio.CancelledError, ConnectionError):
      post.done(499)  # the client went away (or the drain ran out)
      raise
    except Exception:  # noqa: BLE001  (answer 500, keep serving)
      log.exception("%s failed", post.path)
      post.done(500)
      if post.streaming:  # aiohttp ends the connection
        raise
      return _error(ApiError(500, "internal server error", "server_error"))

  # ---- completions ----

  async def _complete(self, request: web.Request, post: _Post, *, chat: bool):
    try:
      body = json.loads(post.raw)
    except ValueError as e:
      raise ApiError(400, f"the body is not valid JSON: {e}") from None
    model = body.get("model") if isinstance(body, dict) else None
    if model is not None and model != self.model_name:
      raise ApiError(
        404,
        f"the model {model!r} does not exist; this server serves {self.model_name!r}",
        code="model_not_found",
      )
    try:
      rows, n, opts = parse_request(
        body,
        chat=chat,
        default_max_tokens=self.default_max_tokens,
        chat_template=self.chat_template,
      )
    except ValueError as e:
      raise ApiError(400, str(e)) from None
    meta = {
      "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
      "created": int(time.time()),
      "model": self.model_name,
    }
    if opts["stream"]:
      return await Stream(self, rows, n, chat, meta, opts["include_usage"]).run(request, post)
    fut = await self.submit(rows)
    try:
      gens = await self._wait(fut)
    finally:
      self._pending.discard(fut)
    choices = [choice(i, g.text, g.finish_reason, chat) for i, g in enumerate(gens)]
    obj = "chat.completion" if chat else "text_completion"
    post.done(200)
    return web.json_response(
      {**meta, "object": obj, "choices": choices, "usage": usage(gens, n)},
      dumps=lambda o: json.dumps(o, ensure_ascii=False),
    )

  async def submit(self, rows: list[Request], on_chunk=None) -> concurrent.futures.Future:
    """`engine.submit` off the event loop (it tokenizes the prompts); a refusal raises ApiError.
    A handler cancelled meanwhile still cancels the submission once it is made."""
    task = self.loop.run_in_executor(None, self.engine.submit, rows, on_chunk)
    try:
      fut = await asyncio.shield(task)
    except asyncio.CancelledError:
      task.add_done_callback(
        lambda t: t.cancelled() or t.exception() is not None or self.engine.cancel(t.result())
      )
      raise
    if fut.done() and not fut.cancelled():
      generations(fut)  # refused at once: answered as JSON (a stream's before it starts)
    if self._cut:  # submitted while the drain was cancelling the rest
      self.engine.cancel(fut)
      raise shutting_down()
    self._pending.add(fut)  # the caller discards it when done with it
    return fut

  async def _wait(self, fut: concurrent.futures.Future) -> list[Generation]:
    """The submission's generations; a cancelled handler (the client gone) cancels it."""
    try:
      await asyncio.shield(asyncio.wrap_future(fut))
    except asyncio.CancelledError:
      if asyncio.current_task().cancelling():
        self.engine.cancel(fut)
        raise
      raise shutting_down() from None
    except Exception:  # noqa: BLE001  (generations below says which)
      pass
    return generations(fut)


def _error(e: ApiError) -> web.Response:
  headers = {"Retry-After": "1"} if e.status in (429, 503) else None
  return web.json_response(e.body(), status=e.status, headers=headers)


def make_server(
  engine: Engine, host: str, port: int, *, api_key_env: str | None = None, **kw
) -> Server:
  """A bound (not yet serving) server over `engine` (`kw`: Server's keyword arguments); call
  `serve_forever()`. With `api_key_env`, requests need `Authorization: Bearer $api_key_env`
  (the variable must be set)."""
  key = None
  if api_key_env:
    key = os.environ.get(api_key_env)
    if not key:
      raise ValueError(f"${api_key_env} is not set: it should hold the API key clients must send")
  return Server(engine, host, port, api_key=key, **kw)


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
  max_queue: int | None = None,
  drain_timeout: float | None = None,
) -> None:
  """Loads `ckpt` and serves it until SIGINT or SIGTERM (see the module docstring). Prints one
  line, "serving NAME on http://HOST:PORT/v1", once listening (port 0 picks a free one).
  `max_queue`: rows waiting for a decode slot before requests get 429 (None: the engine's
  default); `drain_timeout`: seconds in-flight requests get after SIGTERM (None: DRAIN_TIMEOUT)."""
  decoder = load_decoder(ckpt, mesh=mesh, dtype=dtype, chunk=chunk, max_batch=max_batch, seed=seed)
  name = model_name or os.path.basename(ckpt.rstrip("/")) or "rrtf"
  engine = Engine(decoder) if max_queue is None else Engine(decoder, max_queue=max_queue)
  try:
    server = make_server(
      engine,
      host,
      port,
      model_name=name,
      api_key_env=api_key_env,
      request_log=request_log,
      drain_timeout=DRAIN_TIMEOUT if drain_timeout is None else drain_timeout,
    )
    try:
      server.serve_forever(
        ready=lambda: print(f"serving {name} on {server.url}", flush=True),
        handle_signals=threading.current_thread() is threading.main_thread(),
      )
    finally:
      server.server_close()
  finally:
    engine.close(drain=False)  # the drain is over: nobody waits for what is left

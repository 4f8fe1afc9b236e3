"""A streamed completion of `rrtf serve` (rrtf_jax/serving/server.py): server-sent events of
each row's new text as it decodes, OpenAI's chunk shapes (`text_completion` or
`chat.completion.chunk`), then `data: [DONE]`.

The engine reports a row's whole text so far after every decode chunk, from its own thread;
the stream keeps only the latest text per row and sends the new suffix, so a slow reader gets
several chunks' text in one event instead of a backlog, and the deltas concatenate to the
non-streamed text (the decoder holds back text where a stop sequence may begin). A refusal
before the stream starts is answered as JSON by the server; one after it, as an error event.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
from typing import TYPE_CHECKING

from aiohttp import web

from rrtf_jax.serving.api import ApiError, generations, shutting_down, usage

if TYPE_CHECKING:
  from rrtf_jax.serving.server import Server, _Post

log = logging.getLogger(__name__)


class Stream:
  """One streamed completion: server-sent events of each row's new text, as it decodes."""

  def __init__(self, server: Server, rows, n: int, chat: bool, meta: dict, include_usage: bool):
    self.server, self.rows, self.n, self.chat = server, rows, n, chat
    self.meta, self.include_usage = meta, include_usage
    self.obj = "chat.completion.chunk" if chat else "text_completion"
    self.latest = [""] * len(rows)  # each row's text as last reported by the engine
    self.sent = [""] * len(rows)  # what this stream has sent of it
    self.wake = asyncio.Event()

  def _call(self, fn, *args) -> None:  # from the engine's thread
    with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
      self.server.loop.call_soon_threadsafe(fn, *args)

  def _on_chunk(self, j: int, text: str, finished: bool) -> None:
    self._call(self._arrived, j, text)

  def _arrived(self, j: int, text: str) -> None:
    self.latest[j] = text
    self.wake.set()

  async def run(self, request: web.Request, post: _Post) -> web.StreamResponse:
    server = self.server
    fut = await server.submit(self.rows, self._on_chunk)
    try:
      fut.add_done_callback(lambda _: self._call(self.wake.set))
      resp = web.StreamResponse(headers={"Cache-Control": "no-cache"})
      resp.content_type, resp.charset = "text/event-stream", "utf-8"
      await resp.prepare(request)
      post.streaming = True  # too late for an error status: a failure ends the connection
      if self.chat:
        for i in range(len(self.rows)):
          await self._chunk(resp, i, role=True)
      while not fut.done():
        await self.wake.wait()
        self.wake.clear()
        for i in range(len(self.rows)):
          await self._advance(resp, i, self.latest[i])
      status = await self._finish(resp, fut)
    except BaseException:  # the client went away (or a bug): free the rows' slots
      server.engine.cancel(fut)
      raise
    finally:
      server._pending.discard(fut)
    post.done(status)
    await self._event(resp, "[DONE]")
    await resp.write_eof()
    return resp

  async def _finish(self, resp, fut) -> int:
    """The rows' last text and finish reasons (or the error), usage if asked; the status."""
    try:
      gens = generations(fut)
    except ApiError as e:  # the engine refused it late: say so in the stream
      await self._event(resp, e.body())
      return e.status
    except concurrent.futures.CancelledError:  # by the server's drain
      await self._event(resp, shutting_down().body())
      return 503
    except Exception as e:  # noqa: BLE001  (a generation bug: say so in the stream)
      log.exception("generation failed")
      err = ApiError(500, f"generation failed: {type(e).__name__}", "server_error")
      await self._event(resp, err.body())
      return 500
    for i, g in enumerate(gens):
      await self._advance(resp, i, g.text)
      await self._chunk(resp, i, finish=g.finish_reason)
    if self.include_usage:
      await self._event(
        resp, {**self.meta, "object": self.obj, "choices": [], "usage": usage(gens, self.n)}
      )
    return 200

  async def _event(self, resp: web.StreamResponse, payload) -> None:
    text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    await resp.write(f"data: {text}\n\n".encode("utf-8"))

  async def _chunk(self, resp, i: int, text=None, finish=None, role=False) -> None:
    if self.chat:
      delta = ({"role": "assistant", "content": ""} if role else {}) | (
        {} if text is None else {"content": text}
      )
      c = {"index": i, "delta": delta}
    else:
      c = {"index": i, "text": text or ""}
    c |= {"logprobs": None, "finish_reason": finish}
    await self._event(resp, {**self.meta, "object": self.obj, "choices": [c]})

  async def _advance(self, resp, i: int, text: str) -> None:
    sent = self.sent[i]
    if not text.startswith(sent):  # the decoder's held-back text makes this impossible
      log.warning("row %d text changed after it was streamed; the stream will differ", i)
    elif len(text) > len(sent):
      self.sent[i] = text
      await self._chunk(resp, i, text[len(sent) :])

"""The decode engine behind `rrtf serve`: one worker thread continuously batching over a Decoder.

The worker owns a `model.decode.Batcher` (a fixed number of decode slots over one KV cache).
Between decode chunks it moves new submissions into the batcher's queue and drops cancelled
ones; the batcher then starts waiting rows in the slots that rows finished (or cancelled) in
the last chunk, so a request joins the running batch at the next chunk boundary instead of
waiting for a batch to end. The n rows of one submission share their prompt's prefill.

Each row has its own sampling settings and seed, and its tokens do not depend on the rows it
shares the device with. The queue is bounded (`max_queue` rows waiting for a slot): a
submission that would overflow it fails at once with QueueFull, which the server answers
with 429. Metrics (queue length, busy slots, generated tokens, time to first token, requests
by outcome) are kept in a prometheus_client registry, `Engine.registry`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from model.decode import Batcher, Generation, Request

log = logging.getLogger(__name__)


class QueueFull(Exception):  # noqa: N818  (the name the server maps to 429)
  """The engine's queue holds max_queue rows already."""


@dataclasses.dataclass(eq=False)
class _Submission:
  rows: list[Request]
  ids: list[list[int]]
  on_chunk: Callable | None
  future: concurrent.futures.Future
  submitted: float
  gens: list = dataclasses.field(default_factory=list)
  left: int = 0
  started: bool = False  # a first token came

  def row_keys(self):
    return [(self, j) for j in range(len(self.rows))]


class Engine:
  """Owns a `Decoder` and one worker thread that batches continuously (module docstring).

  `submit(rows, on_chunk)` returns a Future of the rows' `Generation`s. It fails at once with
  ValueError for a row the decoder would refuse (bad sampling values, a prompt too long, more
  rows than slots), QueueFull when the queue is full and RuntimeError once the engine is
  closed, so one bad request never reaches the device. `on_chunk(j, text, finished)` gets the
  streaming callbacks of row j of the submission, from the worker thread. `cancel(future)`
  drops a submission: its rows leave the queue, or free their slots at the next chunk boundary.
  """

  def __init__(self, decoder, *, max_queue: int = 256, length: int | None = None):
    if max_queue < 1:
      raise ValueError(f"max_queue must be at least 1, got {max_queue}")
    self.decoder, self.max_queue = decoder, int(max_queue)
    self.slots = int(decoder.max_batch)
    self.length = int(length or decoder.config.max_position_embeddings)
    self._batcher = Batcher(decoder, slots=self.slots, length=self.length)
    self.registry = CollectorRegistry()
    self._queue_gauge = Gauge(
      "rrtf_queue_length", "Rows waiting for a decode slot", registry=self.registry
    )
    self._busy_gauge = Gauge("rrtf_busy_slots", "Decode slots in use", registry=self.registry)
    Gauge("rrtf_slots", "Decode slots", registry=self.registry).set(self.slots)
    self._tokens = Counter(
      "rrtf_generated_tokens", "Tokens generated (all rows)", registry=self.registry
    )
    self._ttft = Histogram(
      "rrtf_time_to_first_token_seconds",
      "Seconds from a request's submission to its first generated token",
      buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
      registry=self.registry,
    )
    self._requests = Counter(
      "rrtf_requests", "Requests by outcome", ["outcome"], registry=self.registry
    )
    self._incoming: collections.deque[_Submission] = collections.deque()
    self._cancelled: list[_Submission] = []
    # what the worker last saw of its batcher (read by callers under the lock): rows waiting in
    # it and busy slots; the queue is those rows and the submissions not yet moved into it
    self._waiting = 0
    self._busy = 0
    self._drop_all = False  # close(drain=False): cancel what runs too
    self._generated = 0
    self._cv = threading.Condition()
    self._closed = False
    self._thread = threading.Thread(target=self._loop, name="rrtf-engine", daemon=True)
    self._thread.start()

  # ---- callers' side -------------------------------------------------------------------------
  def submit(
    self, rows: Sequence[Request], on_chunk: Callable | None = None
  ) -> concurrent.futures.Future:
    fut: concurrent.futures.Future = concurrent.futures.Future()
    try:
      ids = self._check(rows)
    except ValueError as e:
      self._requests.labels("rejected").inc()
      fut.set_exception(e)
      return fut
    if not rows:
      fut.set_result([])
      return fut
    sub = _Submission(list(rows), ids, on_chunk, fut, time.monotonic())
    sub.gens, sub.left = [None] * len(rows), len(rows)
    with self._cv:
      if self._closed:
        fut.set_exception(RuntimeError("the engine is shutting down"))
        return fut
      queued = self._queued()
      if queued + len(rows) > self.max_queue:
        self._requests.labels("queue_full").inc()
        fut.set_exception(
          QueueFull(f"the queue is full ({queued} rows wait for {self.slots} decode slots)")
        )
        return fut
      self._incoming.append(sub)
      self._queue_gauge.set(queued + len(rows))
      self._cv.notify()
    return fut

  def cancel(self, fut: concurrent.futures.Future) -> None:
    """Cancels the submission behind `fut` (a no-op once it has finished)."""
    with self._cv:
      if fut.cancel():
        self._cancelled.append(fut)
        self._cv.notify()

  def stats(self) -> dict:
    with self._cv:
      return {
        "queue": self._queued(),
        "busy": self._busy,
        "slots": self.slots,
        "generated_tokens": self._generated,
      }

  def close(self, drain: bool = True) -> None:
    """Refuses new submissions; with `drain`, finishes what was submitted, else fails what has
    not started and cancels what runs; then stops the worker."""
    with self._cv:
      self._closed = True
      if not drain:
        for sub in self._incoming:
          sub.future.cancel()
          self._cancelled.append(sub.future)
        self._drop_all = True
      self._cv.notify_all()
    self._thread.join()

  def __enter__(self) -> Engine:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _check(self, rows: Sequence[Request]) -> list[list[int]]:
    """The decoder's checks, done here so that they fail one submission, not a batch."""
    if len(rows) > self.slots:
      raise ValueError(
        f"n={len(rows)} is more than the server's {self.slots} decode slots; ask for at most "
        f"{self.slots} choices per request"
      )
    out = []
    for r in rows:
      if not isinstance(r, Request):
        raise TypeError(f"rows must be Request objects, got {type(r).__name__}")
      ids = self.decoder.validate(r)  # ValueError, e.g. a prompt too long for the context
      self._batcher.room(r, ids)  # ValueError for a prompt the cache cannot hold
      out.append(ids)
    return out

  def _queued(self) -> int:
    """Rows submitted and not yet in a slot (the caller holds the lock)."""
    return self._waiting + sum(len(s.rows) for s in self._incoming)

  def _publish(self, batcher: Batcher) -> None:
    """Records what the batcher holds now, for stats() and the gauges."""
    with self._cv:
      self._waiting, self._busy = len(batcher.waiting), batcher.busy
      self._queue_gauge.set(self._queued())
      self._busy_gauge.set(self._busy)

  # ---- the worker ----------------------------------------------------------------------------

  def _loop(self) -> None:
    batcher = self._batcher
    subs: set[_Submission] = set()  # those with rows in the batcher
    while True:
      with self._cv:
        while not (self._incoming or self._cancelled or batcher.busy or batcher.waiting):
          if self._closed:
            self._queue_gauge.set(0)
            self._busy_gauge.set(0)
            return
          self._cv.wait()
        cancelled = {id(f) for f in self._cancelled}
        if self._drop_all:
          cancelled |= {id(s.future) for s in subs}
          for s in subs:
            s.future.cancel()
        self._cancelled.clear()
        while self._incoming:
          sub = self._incoming.popleft()
          if id(sub.future) in cancelled:
            self._requests.labels("cancelled").inc()
            continue
          for key, r, ids in zip(sub.row_keys(), sub.rows, sub.ids):
            batcher.add(key, r, ids, stream=sub.on_chunk is not None)
          subs.add(sub)
        self._waiting = len(batcher.waiting)
      gone = [s for s in subs if id(s.future) in cancelled]
      if gone:
        batcher.cancel(k for s in gone for k in s.row_keys())
        for s in gone:
          subs.discard(s)
          self._requests.labels("cancelled").inc()
      try:
        updates = batcher.step()
      except Exception as e:  # noqa: BLE001  (the worker must survive anything the device raises)
        log.exception("decoding failed; failing the %d requests in flight", len(subs))
        for s in subs:
          if not s.future.done():
            self._finish(s, exc=e)
        subs.clear()
        batcher = self._batcher = Batcher(self.decoder, slots=self.slots, length=self.length)
        self._publish(batcher)
        continue
      self._publish(batcher)
      self._deliver(updates, subs)

  def _deliver(self, updates, subs: set[_Submission]) -> None:
    now = time.monotonic()
    new_tokens = 0
    for u in updates:
      sub, j = u.key
      new_tokens += u.new_tokens
      if sub not in subs:
        continue
      if u.new_tokens and not sub.started:
        sub.started = True
        self._ttft.observe(now - sub.submitted)
      if sub.on_chunk is not None:
        try:
          sub.on_chunk(j, u.text, u.generation is not None)
        except Exception:  # noqa: BLE001  (a listener's failure is its own)
          log.exception("on_chunk failed; the request is cancelled")
          sub.future.cancel()
          self._batcher.cancel(sub.row_keys())
          self._publish(self._batcher)
          subs.discard(sub)
          self._requests.labels("cancelled").inc()
          continue
      if u.generation is not None:
        sub.gens[j] = u.generation
        sub.left -= 1
        if not sub.left:
          subs.discard(sub)
          self._finish(sub, gens=sub.gens)
    self._tokens.inc(new_tokens)
    with self._cv:
      self._generated += new_tokens

  def _finish(self, sub: _Submission, *, gens: list[Generation] | None = None, exc=None) -> None:
    try:
      if exc is not None:
        sub.future.set_exception(exc)
      else:
        sub.future.set_result(gens)
      self._requests.labels("error" if exc is not None else "ok").inc()
    except concurrent.futures.InvalidStateError:  # cancelled meanwhile
      self._requests.labels("cancelled").inc()

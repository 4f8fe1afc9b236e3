"""The decode engine behind `rrtf serve`: one worker thread batching requests over a `Decoder`.

Batching is static: the worker (`Engine`) takes the oldest waiting submission, gathers those
that arrive within `max_batch_wait` up to the decoder's `max_batch` rows, and runs them as one
`Decoder.generate` call; a batch finishes before the next starts, and its answers (a stream's
final chunks too) come when it has. Each row has its own sampling settings and seed, so its
text does not depend on its batch (up to float noise between batch shapes).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Callable, Sequence

from model.decode import Generation, Request

log = logging.getLogger(__name__)


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

  def submit(
    self, rows: list[Request], on_chunk: Callable | None = None
  ) -> concurrent.futures.Future:
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
    # batch row -> (submission, its row)
    owner = [(sub, j) for sub in batch for j in range(len(sub.rows))]
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
    gens = self.decoder.generate(
      rows, on_chunk=on_chunk if any(s.on_chunk for s in batch) else None
    )
    out, start = [], 0
    for sub in batch:
      out.append(gens[start : start + len(sub.rows)])
      start += len(sub.rows)
    return out

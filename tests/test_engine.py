"""The serving engine (rrtf_jax/serving/engine.py): continuous batching from many threads,
cancellation, the bounded queue and its metrics, against the decoder run alone."""

import concurrent.futures
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from model.decode import Decoder, Request
from rrtf_jax.serving.engine import Engine, QueueFull


@pytest.fixture(scope="module")
def decoder(tiny_ckpt):
  return Decoder.from_checkpoint(tiny_ckpt, chunk=4, max_batch=2)


def _metrics(engine) -> dict:
  from prometheus_client import generate_latest

  text = generate_latest(engine.registry).decode()
  return {
    s.name + ("" if not s.labels else str(sorted(s.labels.items()))): s.value
    for fam in text_string_to_metric_families(text)
    for s in fam.samples
  }


def _idle(engine, timeout=30.0) -> dict:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    s = engine.stats()
    if s["queue"] == 0 and s["busy"] == 0:
      return s
    time.sleep(0.01)
  raise AssertionError(f"engine not idle: {engine.stats()}")


def test_concurrent_submissions_equal_decoding_alone(decoder):
  """Twelve submissions from six threads through two slots (n > 1, stop strings, streaming and
  not): each row's generation is the one the decoder gives it alone, streamed text ends at the
  final text, and the engine ends idle with every generated token counted."""
  prompts = ["def add(a, b):\n", "import os\n", "class A:\n", "x = ", "# sort a list\n", "for i"]
  subs = []
  for i, p in enumerate(prompts * 2):
    n = 1 + i % 2
    stop = ("\n\n",) if i % 3 == 0 else ()
    rows = [
      Request(
        p, max_new_tokens=3 + 4 * (i % 4), temperature=0.8 * (i % 2), seed=10 * i + j, stop=stop
      )
      for j in range(n)
    ]
    subs.append(rows)
  streamed: dict = {}
  with Engine(decoder, max_queue=64) as engine:

    def run(k):
      rows = subs[k]
      seen = {}

      def on_chunk(j, text, finished):
        assert text.startswith(seen.get(j, ""))
        seen[j] = text

      fut = engine.submit(rows, on_chunk if k % 2 else None)
      streamed[k] = seen
      return k, fut.result(timeout=300)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
      results = dict(pool.map(run, range(len(subs))))
    stats = _idle(engine)
    m = _metrics(engine)
  total = 0
  for k, rows in enumerate(subs):
    for j, (r, g) in enumerate(zip(rows, results[k])):
      alone = decoder.generate([r])[0]
      assert (g.tokens, g.text, g.finish_reason) == (alone.tokens, alone.text, alone.finish_reason)
      if k % 2:
        assert streamed[k][j] == g.text
      total += len(g.tokens)
  assert stats["generated_tokens"] >= total  # stopped rows may run past their cut in a chunk
  assert m["rrtf_generated_tokens_total"] == stats["generated_tokens"]
  assert m["rrtf_requests_total[('outcome', 'ok')]"] == len(subs)
  assert m["rrtf_time_to_first_token_seconds_count"] == len(subs)
  assert m["rrtf_busy_slots"] == 0 and m["rrtf_queue_length"] == 0 and m["rrtf_slots"] == 2


def test_cancel_frees_the_slot_and_the_queue(decoder):
  """A request cancelled while it decodes leaves its slot at the next chunk boundary, one
  cancelled while it waits leaves the queue; the engine goes idle and keeps serving."""
  with Engine(decoder, max_queue=8) as engine:
    started = threading.Event()
    long = [Request("def f(x):\n", max_new_tokens=400, temperature=1.0, seed=s) for s in (1, 2)]
    running = engine.submit(long, lambda j, text, fin: started.set())
    waiting = engine.submit([Request("import os\n", max_new_tokens=400)])
    assert started.wait(120)
    assert engine.stats()["busy"] == 2
    engine.cancel(waiting)
    engine.cancel(running)
    assert running.cancelled() and waiting.cancelled()
    stats = _idle(engine)
    assert stats["generated_tokens"] < 2 * 400
    after = engine.submit([Request("x = ", max_new_tokens=5)]).result(timeout=120)
    assert after[0].tokens == decoder.generate([Request("x = ", max_new_tokens=5)])[0].tokens
    m = _metrics(engine)
    assert m["rrtf_requests_total[('outcome', 'cancelled')]"] == 2
    assert m["rrtf_requests_total[('outcome', 'ok')]"] == 1


def test_bounded_queue_and_refusals(decoder):
  """Rows waiting for a slot are bounded: past max_queue a submission fails at once with
  QueueFull; more rows than slots, a prompt longer than the context and a closed engine are
  refused without reaching the device, and nothing is left busy."""
  gate = threading.Event()
  engine = Engine(decoder, max_queue=3)
  try:
    blocker = engine.submit(
      [Request("a", max_new_tokens=8)], lambda j, text, fin: gate.wait(60)
    )  # holds the worker in its callback: what follows stays queued
    deadline = time.monotonic() + 60
    while engine.stats()["busy"] == 0 and time.monotonic() < deadline:
      time.sleep(0.01)
    queued = [
      engine.submit([Request("b", max_new_tokens=3)] * 2),
      engine.submit([Request("c", max_new_tokens=3)]),
    ]
    assert engine.stats()["queue"] == 3
    with pytest.raises(QueueFull, match="queue is full"):
      engine.submit([Request("d", max_new_tokens=3)]).result(timeout=1)
    with pytest.raises(ValueError, match="decode slots"):
      engine.submit([Request("e")] * 3).result(timeout=1)
    with pytest.raises(ValueError, match="positions|cache"):
      engine.submit([Request(list(range(5, 600)))]).result(timeout=1)
    gate.set()
    for f in [blocker, *queued]:
      assert f.result(timeout=120)
    _idle(engine)
    assert _metrics(engine)["rrtf_requests_total[('outcome', 'queue_full')]"] == 1
  finally:
    gate.set()
    engine.close()
  with pytest.raises(RuntimeError, match="shutting down"):
    engine.submit([Request("f", max_new_tokens=3)]).result(timeout=1)


def test_close_drains_what_was_submitted(decoder):
  engine = Engine(decoder)
  futs = [engine.submit([Request(p, max_new_tokens=6)]) for p in ("a", "b", "c", "d", "e")]
  engine.close()  # drain: every submission finishes before the worker stops
  assert all(len(f.result(timeout=0)) == 1 for f in futs)

"""`rrtf serve` under load and faults: real `rrtf serve` processes of the tiny checkpoint on
127.0.0.1, driven from one asyncio loop by the official `openai` SDK and raw aiohttp clients.

- 64 concurrent clients, streaming and not, n > 1, stop strings, chat, and clients that
  disconnect mid-stream or before their answer: every other request gets the text that the
  same greedy request got alone, the disconnected ones free their slots (far fewer tokens are
  generated than they asked for), /metrics comes back to idle, and the server keeps serving.
- A full queue answers 429 with OpenAI's error JSON; n above the slots, a prompt longer than
  the context and an unknown model are 400/404; the server is idle after each.
- SIGTERM: requests in flight finish, new connections are refused, the process exits 0 within
  the drain bound; with a short bound, it exits 0 within it even though work is left.

The tiny model decodes fast, so a request that must stay in flight for a while asks for HOLD
tokens one per chunk (`--chunk 1`, a host round trip each), and one that must outlast a drain
bound for LONG. Server starts (a process, its compiles) are most of the time: three here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
import time

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import serving_url

NAME = "tiny"
NEW = 16  # max_tokens of the requests that are answered
LONG = 480  # max_tokens of those that disconnect (the tiny model has 512 positions)
HOLD = 100  # max_tokens of a request that holds a slot for a while (one token per chunk)
PROMPTS = ["def add(a, b):\n", "import os\n", "class A:\n", "x = 1\n"]  # at most 16 tokens
CHAT = [{"role": "user", "content": "Reverse a string."}]


class _Serve:
  """An `rrtf serve` process; `url` is its /v1 base, `root` the server's."""

  def __init__(self, ckpt: str, *args: str):
    cmd = [sys.executable, "-m", "rrtf_jax.cli", "serve", "--ckpt", ckpt, "--port", "0"]
    self.proc = subprocess.Popen(
      [*cmd, "--model-name", NAME, *args],
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    try:
      self.url = serving_url(self.proc, time.time() + 120)
    except BaseException:
      self.close()
      raise
    self.root = self.url.removesuffix("/v1")
    self.port = int(self.root.rsplit(":", 1)[1])

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()


@pytest.fixture(scope="module")
def busy(tiny_ckpt):
  """The load test's server: 4 slots, a queue that never fills here."""
  server = _Serve(tiny_ckpt, "--max-batch", "4", "--chunk", "4", "--max-queue", "1024")
  yield server
  server.close()


async def _metrics(session: aiohttp.ClientSession, root: str) -> dict[str, float]:
  async with session.get(root + "/metrics") as r:
    assert r.status == 200
    text = await r.text()
  return {
    s.name: s.value
    for family in text_string_to_metric_families(text)
    for s in family.samples
    if not s.labels
  }


async def _idle(session, root: str, within: float = 5.0) -> dict[str, float]:
  """/metrics once no row waits or holds a slot; fails after `within` seconds."""
  deadline = time.monotonic() + within
  while True:
    m = await _metrics(session, root)
    if m["rrtf_queue_length"] == 0 and m["rrtf_busy_slots"] == 0:
      return m
    assert time.monotonic() < deadline, f"not idle after {within} s: {m}"
    await asyncio.sleep(0.05)


def _error(status: int, body: dict, want: int) -> dict:
  assert status == want, body
  err = body["error"]
  assert set(err) == {"message", "type", "param", "code"} and err["message"]
  return err


async def _post(session, url: str, body: dict) -> tuple[int, dict]:
  async with session.post(url, json=body) as r:
    return r.status, await r.json()


async def _sse(resp: aiohttp.ClientResponse) -> list:
  """An SSE response's payloads, '[DONE]' last (checked)."""
  assert resp.status == 200, await resp.text()
  assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
  out = []
  async for line in resp.content:
    if line.startswith(b"data: "):
      out.append(line[6:].decode().strip())
  assert out and out[-1] == "[DONE]" and "[DONE]" not in out[:-1]
  return [json.loads(p) for p in out[:-1]]


def _texts(events: list, n: int, chat: bool) -> list[tuple[str, str]]:
  """Each choice's (text, finish_reason) from stream events."""
  texts, finish = [""] * n, [None] * n
  for e in events:
    for c in e["choices"]:
      assert finish[c["index"]] is None  # nothing after a choice's last chunk
      texts[c["index"]] += (c["delta"].get("content") or "") if chat else c["text"]
      finish[c["index"]] = c["finish_reason"]
  return list(zip(texts, finish))


# ---- the storm --------------------------------------------------------------------------------


async def _storm(root: str, url: str) -> None:
  timeout = aiohttp.ClientTimeout(total=120)
  async with (
    aiohttp.ClientSession(timeout=timeout) as session,
    openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120) as sdk,
  ):
    # The references: each greedy request alone, not streamed.
    ref: dict[tuple, tuple[str, str]] = {}

    def body(prompt, stop=None, **kw):
      return {"model": NAME, "prompt": prompt, "temperature": 0, "max_tokens": NEW, "stop": stop}

    for p in PROMPTS:
      status, full = await _post(session, url + "/completions", body(p))
      text = full["choices"][0]["text"]
      ref[p, None] = text, full["choices"][0]["finish_reason"]
      stop = text[3:5] or None  # a stop string the answer meets (or none, if it is short)
      status, cut = await _post(session, url + "/completions", body(p, stop))
      assert status == 200
      ref[p, stop] = cut["choices"][0]["text"], cut["choices"][0]["finish_reason"]
    chat = {"model": NAME, "messages": CHAT, "temperature": 0, "max_tokens": NEW}
    status, full = await _post(session, url + "/chat/completions", chat)
    ref["chat"] = full["choices"][0]["message"]["content"], full["choices"][0]["finish_reason"]
    keys = [k for k in ref if k != "chat"]
    before = await _idle(session, root)

    # The clients: (what they ask, what they must get back or None for a disconnect).
    async def sdk_plain(k, n):
      r = await sdk.completions.create(
        model=NAME, prompt=k[0], stop=k[1], n=n, temperature=0, max_tokens=NEW
      )
      return k, n, [(c.text, c.finish_reason) for c in sorted(r.choices, key=lambda c: c.index)]

    async def sdk_stream(k, n):
      texts, finish = [""] * n, [None] * n
      stream = await sdk.completions.create(
        model=NAME, prompt=k[0], stop=k[1], n=n, temperature=0, max_tokens=NEW, stream=True
      )
      async for event in stream:
        for c in event.choices:
          texts[c.index] += c.text
          finish[c.index] = c.finish_reason or finish[c.index]
      return k, n, list(zip(texts, finish))

    async def sdk_chat(stream):
      if not stream:
        r = await sdk.chat.completions.create(
          model=NAME, messages=CHAT, temperature=0, max_tokens=NEW
        )
        return "chat", 1, [(r.choices[0].message.content, r.choices[0].finish_reason)]
      text, finish = "", None
      async for event in await sdk.chat.completions.create(
        model=NAME, messages=CHAT, temperature=0, max_tokens=NEW, stream=True
      ):
        for c in event.choices:
          text += c.delta.content or ""
          finish = c.finish_reason or finish
      return "chat", 1, [(text, finish)]

    async def raw(k, n, stream):
      b = {**body(*k), "n": n, "stream": stream}
      async with session.post(url + "/completions", json=b) as r:
        if stream:
          return k, n, _texts(await _sse(r), n, chat=False)
        full = await r.json()
      assert r.status == 200, full
      return k, n, [(c["text"], c["finish_reason"]) for c in full["choices"]]

    async def gone_mid_stream(p, n):
      b = {**body(p), "n": n, "max_tokens": LONG, "stream": True}
      # its own connection, closed mid-stream
      async with aiohttp.ClientSession() as own, own.post(url + "/completions", json=b) as r:
        assert r.status == 200
        while not (await r.content.readline()).startswith(b"data: "):
          pass
        r.close()
      return None

    async def gone_before_the_answer(p):
      b = {**body(p), "max_tokens": LONG}
      async with aiohttp.ClientSession() as own:
        with contextlib.suppress(asyncio.TimeoutError):
          async with asyncio.timeout(0.05):
            async with own.post(url + "/completions", json=b) as r:
              await r.read()
      return None

    jobs = []
    for i in range(64):
      k, n = keys[i % len(keys)], 1 + i % 3
      jobs.append(
        [
          lambda: sdk_plain(k, n),
          lambda: sdk_stream(k, n),
          lambda: sdk_chat(i % 2 == 0),
          lambda: raw(k, n, stream=False),
          lambda: raw(k, n, stream=True),
          lambda: gone_mid_stream(k[0], n),
          lambda: raw(k, n, stream=True),
          lambda: gone_before_the_answer(k[0]),
        ][i % 8]()
      )
    results = await asyncio.gather(*jobs)

    # Every answered request got what it got alone; the disconnected ones freed their slots.
    answered = [r for r in results if r is not None]
    assert len(answered) == 48
    for key, n, choices in answered:
      assert choices == [ref[key]] * n, (key, n)
    after = await _idle(session, root)
    generated = after["rrtf_generated_tokens_total"] - before["rrtf_generated_tokens_total"]
    rows = sum(n for _, n, _ in answered)
    assert 0 < generated <= rows * NEW + (len(results) - len(answered)) * 3 * LONG // 4

    # Still serving.
    status, full = await _post(session, url + "/completions", body(PROMPTS[0]))
    assert (full["choices"][0]["text"], full["choices"][0]["finish_reason"]) == ref[
      PROMPTS[0], None
    ]


@pytest.mark.slow
def _rss_mib(pid: int) -> float:
  with open(f"/proc/{pid}/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_64_concurrent_clients(busy):
  """The storm twice: the second compiles nothing new, so the server's memory after it is
  what the first left plus any leak."""
  asyncio.run(_storm(busy.root, busy.url))
  first = _rss_mib(busy.proc.pid)
  asyncio.run(_storm(busy.root, busy.url))
  assert _rss_mib(busy.proc.pid) - first < 64
  assert busy.proc.poll() is None


# ---- a bounded queue and bad input ------------------------------------------------------------


async def _queue_full(root: str, url: str, tokenizer_limit: int = 512) -> None:
  async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
    body = {"model": NAME, "prompt": PROMPTS[0], "temperature": 0, "max_tokens": HOLD}

    async def one():
      async with session.post(url + "/completions", json=body) as r:
        return r.status, await r.json(), r.headers.get("Retry-After")

    # One slot and a queue of two: of 12 requests sent at once, most find the queue full.
    answers = await asyncio.gather(*(one() for _ in range(12)))
    refused = [a for a in answers if a[0] == 429]
    assert refused and len(refused) < 12
    for status, body_, retry_after in refused:
      assert _error(status, body_, 429)["type"] == "rate_limit_error" and retry_after
    for status, body_, _ in answers:
      assert status in (200, 429), body_
    await _idle(session, root)

    # Refused at once, never holding a slot.
    plain = {"model": NAME, "prompt": PROMPTS[0], "max_tokens": NEW}
    long = " ".join(f"w{i}" for i in range(600))  # over the tiny model's 512 positions
    for bad, want in (
      ({**plain, "n": 2}, 400),  # more rows than the one slot
      ({**plain, "n": 2, "stream": True}, 400),
      ({**plain, "prompt": long}, 400),
      ({**plain, "prompt": long, "stream": True}, 400),
      ({**plain, "model": "gpt-4"}, 404),
      ({**plain, "temperature": -1}, 400),
    ):
      _error(*(await _post(session, url + "/completions", bad)), want)
      await _idle(session, root, within=1.0)
    status, full = await _post(session, url + "/completions", plain)
    assert status == 200 and full["choices"][0]["finish_reason"]


# ---- SIGTERM ----------------------------------------------------------------------------------


def _refused(port: int) -> bool:
  try:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
      return False
  except OSError:
    return True


async def _drain(server: _Serve, *, rows: int, max_tokens: int) -> tuple[list, float]:
  """Starts `rows` streams (one decoding, the others queued), sends SIGTERM once the first has
  begun, and checks that new connections are refused meanwhile; the streams' events and the
  time of the signal."""
  body = {
    "model": NAME,
    "prompt": PROMPTS[0],
    "temperature": 0,
    "max_tokens": max_tokens,
    "stream": True,
  }
  async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
    started = asyncio.Event()

    async def stream():
      async with session.post(server.url + "/completions", json=body) as r:
        assert r.status == 200
        events = []
        async for line in r.content:
          started.set()
          if line.startswith(b"data: "):
            events.append(line[6:].decode().strip())
        return events

    tasks = [asyncio.create_task(stream())]
    await started.wait()
    tasks += [asyncio.create_task(stream()) for _ in range(rows - 1)]
    await asyncio.sleep(0.2)  # the others reach the server's queue
    server.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    deadline = signalled + 2
    while not _refused(server.port):
      assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
      await asyncio.sleep(0.02)
    return await asyncio.gather(*tasks, return_exceptions=True), signalled


def test_sigterm_finishes_requests_in_flight(tiny_ckpt):
  server = _Serve(tiny_ckpt, "--max-batch", "1", "--chunk", "1", "--drain-timeout", "30")
  try:
    results, signalled = asyncio.run(_drain(server, rows=3, max_tokens=HOLD))
    for events in results:
      assert not isinstance(events, BaseException), events
      assert events[-1] == "[DONE]"
      last = json.loads(events[-2])["choices"][0]
      assert last["finish_reason"] == "length"
    assert server.proc.wait(timeout=30) == 0
    assert time.monotonic() - signalled < 30
  finally:
    server.close()


def test_full_queue_bad_input_and_a_bounded_drain(tiny_ckpt):
  """One slot, a queue of two and a 0.5 s drain bound: `_queue_full`, then SIGTERM with more
  work in flight than the bound allows (one server start for both: starts are the slow part):
  the process exits 0 within the bound, and the requests it cut get a 503 event."""
  server = _Serve(
    tiny_ckpt, "--max-batch", "1", "--chunk", "1", "--max-queue", "2", "--drain-timeout", "0.5"
  )
  try:
    asyncio.run(_queue_full(server.root, server.url))
    # 3 x 480 one-token chunks (one decoding, two queued): seconds of work even on a fast machine
    results, signalled = asyncio.run(_drain(server, rows=3, max_tokens=LONG))
    assert server.proc.wait(timeout=15) == 0
    assert time.monotonic() - signalled < 0.5 + 6  # the bound, then closing the engine (slack)
    last = []
    for events in results:
      assert not isinstance(events, BaseException), events
      assert events[-1] == "[DONE]"
      last.append(json.loads(events[-2]))
    cut = [e for e in last if "error" in e]
    assert cut  # the bound, not the work, ended the drain
    for e in cut:
      assert _error(503, e, 503)["code"] == "shutting_down"
    for e in last:
      assert "error" in e or e["choices"][0]["finish_reason"] == "length"
  finally:
    server.close()

"""TeacherClient against a real local HTTP server that speaks OpenAI's chat and completions JSON.

Each test scripts the server's replies (429, 5xx, slow, 4xx, ...) and reads back what it
received. Backoff sleeps are recorded instead of slept, except where real waiting matters.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from rrtf_jax.serving import teacher
from rrtf_jax.serving.teacher import TeacherClient, TeacherError

KEY = "sk-test-0123456789abcdef"


def default_reply(body: dict) -> dict:
  """200 with n choices "<prompt>|<i>", listed in reverse index order (clients must sort)."""
  prompt = body["messages"][-1]["content"] if "messages" in body else body["prompt"]
  n = body.get("n", 1)
  if "messages" in body:
    choices = [
      {
        "index": i,
        "message": {"role": "assistant", "content": f"{prompt}|{i}"},
        "finish_reason": "stop",
      }
      for i in range(n)
    ]
  else:
    choices = [{"index": i, "text": f"{prompt}|{i}", "finish_reason": "stop"} for i in range(n)]
  return {"status": 200, "json": {"id": "x", "object": "test", "choices": choices[::-1]}}


class FakeServer:
  """A ThreadingHTTPServer on 127.0.0.1 that replies from `script` (one behaviour per request, then
  `default`); a behaviour is a dict (status, json, headers, sleep) or a callable(body) -> dict."""

  def __init__(self):
    self.script: list = []
    self.default = default_reply
    self.requests: list[dict] = []  # path, headers (lower-case names), body
    self.in_flight = self.max_in_flight = 0
    self.lock = threading.Lock()
    fake = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *args):
        pass

      def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        with fake.lock:
          fake.requests.append(
            {
              "path": self.path,
              "headers": {k.lower(): v for k, v in self.headers.items()},
              "body": body,
            }
          )
          behaviour = fake.script.pop(0) if fake.script else fake.default
          fake.in_flight += 1
          fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
        try:
          b = behaviour(body) if callable(behaviour) else behaviour
          time.sleep(b.get("sleep", 0))
          payload = json.dumps(b["json"]).encode() if "json" in b else b.get("text", "").encode()
          self.send_response(b.get("status", 200))
          for k, v in b.get("headers", {}).items():
            self.send_header(k, v)
          self.send_header("Content-Type", "application/json")
          self.send_header("Content-Length", str(len(payload)))
          self.end_headers()
          self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
          pass  # the client timed out and hung up
        finally:
          with fake.lock:
            fake.in_flight -= 1

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
    self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True)
    self.thread.start()

  def stop(self):
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture
def server():
  s = FakeServer()
  yield s
  s.stop()


@pytest.fixture
def sleeps(monkeypatch):
  """Backoff delays the client chose, recorded and not slept."""
  recorded = []
  monkeypatch.setattr(teacher, "_sleep", lambda delay, cancel: recorded.append(delay))
  return recorded


@pytest.fixture(autouse=True)
def no_key(monkeypatch):
  monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def client(url, **kw) -> TeacherClient:
  return TeacherClient(
    url, "teacher-model", **{"backoff": 0.001, "max_retries": 3, "timeout": 5.0, **kw}
  )


# --- retries ---


def test_429_retry_after_zero_is_honoured(server, sleeps):
  server.script = [
    {"status": 429, "headers": {"Retry-After": "0"}, "json": {"error": {"message": "slow down"}}}
  ]
  with client(server.url, backoff=10.0, max_backoff=30.0) as c:
    assert c.complete("p") == ["p|0"]
    assert (c.stats.requests, c.stats.retries) == (2, 1)
  assert sleeps == [0.0]  # not the 5-10 s that backoff=10 would give


def test_retry_after_is_capped_and_backoff_grows_with_jitter(server, sleeps):
  server.script = [{"status": 429, "headers": {"Retry-After": "120"}, "json": {}}] + [
    {"status": 503, "json": {}}
  ] * 3
  with client(server.url, backoff=1.0, max_backoff=3.0, max_retries=4) as c:
    assert c.complete("p") == ["p|0"]
    assert c.stats.retries == 4
  assert sleeps[0] == 3.0  # Retry-After 120 capped at max_backoff
  # attempts 1, 2, 3: backoff * 2**attempt (2, 4 -> 3, 8 -> 3) with jitter in [d/2, d]
  for got, d in zip(sleeps[1:], [2.0, 3.0, 3.0]):
    assert d / 2 <= got <= d
  assert len(sleeps) == 4


def test_500_then_200(server):
  server.script = [{"status": 500, "text": "<html>Internal Server Error</html>"}]
  with client(server.url) as c:
    assert c.complete("q") == ["q|0"]
    assert (c.stats.requests, c.stats.retries) == (2, 1)


def test_5xx_exhausts_retries(server, sleeps):
  server.default = lambda body: {
    "status": 502,
    "json": {"error": {"message": "bad gateway upstream"}},
  }
  with client(server.url, max_retries=2) as c, pytest.raises(TeacherError) as e:
    c.complete("q")
  msg = str(e.value)
  assert server.url + "/chat/completions" in msg and "502" in msg and "3 attempts" in msg
  assert "bad gateway upstream" in msg
  assert len(server.requests) == 3 and len(sleeps) == 2


def test_timeout_then_200(server):
  server.script = [{"sleep": 0.5, **default_reply({"prompt": "late"})}]
  with client(server.url, api="completions", timeout=0.2) as c:
    assert c.complete("r") == ["r|0"]
    assert c.stats.retries == 1


def test_always_slow_times_out(server):
  server.default = lambda body: {"sleep": 0.4, **default_reply(body)}
  t0 = time.monotonic()
  with client(server.url, timeout=0.2, max_retries=2) as c, pytest.raises(TeacherError) as e:
    c.complete("r")
  msg = str(e.value)
  assert server.url + "/chat/completions" in msg and "timed out" in msg and "3 attempts" in msg
  assert len(server.requests) == 3
  assert time.monotonic() - t0 < 2.0


def test_connection_refused():
  with socket.socket() as s:  # a free port with nothing listening
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url = f"http://127.0.0.1:{port}/v1"
  with client(url, max_retries=2) as c, pytest.raises(TeacherError) as e:
    c.complete("x")
  msg = str(e.value)
  assert f"{url}/chat/completions" in msg and "unreachable" in msg and "3 attempts" in msg
  assert (c.stats.requests, c.stats.retries) == (3, 2)


# --- errors that a retry cannot fix ---


def test_401_no_retry_and_key_not_leaked(server, monkeypatch, sleeps):
  monkeypatch.setenv("MY_TEACHER_KEY", KEY)
  # a server that echoes the key back must not get it into our message either
  server.script = [
    {"status": 401, "json": {"error": {"message": f"Incorrect API key provided: {KEY}"}}}
  ]
  with client(server.url, api_key_env="MY_TEACHER_KEY") as c, pytest.raises(TeacherError) as e:
    c.complete("x")
  msg = str(e.value)
  assert "401" in msg and "$MY_TEACHER_KEY" in msg and server.url + "/chat/completions" in msg
  assert KEY not in msg and KEY not in repr(c)
  assert len(server.requests) == 1 and sleeps == []
  assert server.requests[0]["headers"]["authorization"] == f"Bearer {KEY}"
  assert KEY not in json.dumps(server.requests[0]["body"])


def test_no_key_no_authorization_header(server):
  with client(server.url) as c:
    c.complete("x")
  assert "authorization" not in server.requests[0]["headers"]


def test_403_no_retry(server, monkeypatch):
  monkeypatch.setenv("OPENAI_API_KEY", KEY)
  server.script = [{"status": 403, "json": {"error": {"message": "forbidden"}}}]
  with client(server.url) as c, pytest.raises(TeacherError, match=r"403.*\$OPENAI_API_KEY"):
    c.complete("x")
  assert len(server.requests) == 1


def test_404_names_url_and_suggests_v1(server):
  server.script = [{"status": 404, "json": {"detail": "Not Found"}}]
  with client(server.url + "/", api="completions") as c, pytest.raises(TeacherError) as e:
    c.complete("x")
  msg = str(e.value)
  assert (
    server.url + "/completions" in msg and "404" in msg and "/v1" in msg and "teacher-model" in msg
  )
  assert len(server.requests) == 1


def test_400_includes_server_message_truncated(server):
  long = "maximum context length is 8192 tokens. " + "x" * 1000
  server.script = [
    {"status": 400, "json": {"error": {"message": long, "type": "invalid_request_error"}}}
  ]
  with client(server.url) as c, pytest.raises(TeacherError) as e:
    c.complete("x")
  msg = str(e.value)
  assert "400" in msg and "maximum context length is 8192 tokens" in msg
  assert len(msg) < 500 and len(server.requests) == 1


@pytest.mark.parametrize(
  "reply, match",
  [
    ({"choices": []}, "no choices"),
    ({"object": "error", "error": {"message": "model overloaded"}}, "no choices.*model overloaded"),
    (default_reply({"prompt": "p", "n": 1})["json"], "n=2 but the response has 1 choices"),
  ],
)
def test_200_without_enough_choices(server, reply, match):
  server.script = [{"status": 200, "json": reply}]
  with client(server.url, api="completions") as c, pytest.raises(TeacherError, match=match):
    c.complete("p", n=2)
  assert len(server.requests) == 1


# --- request shape ---


def test_chat_body_and_choice_order(server):
  url = server.url + "/chat/completions"  # a full endpoint URL is accepted too
  with client(url, system="You are a careful programmer.") as c:
    texts = c.complete(
      "write f", n=3, temperature=0.5, top_p=0.9, max_tokens=64, stop=["\nclass"], seed=7
    )
  assert texts == ["write f|0", "write f|1", "write f|2"]  # server listed them 2, 1, 0
  req = server.requests[0]
  assert req["path"] == "/v1/chat/completions"
  assert req["body"] == {
    "model": "teacher-model",
    "n": 3,
    "temperature": 0.5,
    "top_p": 0.9,
    "max_tokens": 64,
    "stop": ["\nclass"],
    "seed": 7,
    "messages": [
      {"role": "system", "content": "You are a careful programmer."},
      {"role": "user", "content": "write f"},
    ],
  }


def test_completions_body(server):
  with client(server.url + "/completions", api="completions") as c:
    assert c.complete("def f():", n=2) == ["def f():|0", "def f():|1"]
  req = server.requests[0]
  assert req["path"] == "/v1/completions"
  assert req["body"] == {
    "model": "teacher-model",
    "prompt": "def f():",
    "n": 2,
    "temperature": 0.8,
    "top_p": 0.95,
    "max_tokens": 512,
  }  # None stop/seed are omitted


# --- cache ---


def test_cache(server, tmp_path, monkeypatch):
  monkeypatch.setenv("OPENAI_API_KEY", KEY)
  cache = tmp_path / "cache"
  with client(server.url, cache_dir=str(cache)) as c:
    first = c.complete("p", n=2, seed=1)
    assert len(server.requests) == 1
    assert c.complete("p", n=2, seed=1) == first  # a hit: no request
    assert len(server.requests) == 1 and c.stats.cache_hits == 1
    c.complete("p", n=2, seed=2)  # different args: a miss
    assert len(server.requests) == 2
  files = sorted(cache.rglob("*.json"))
  assert len(files) == 2 and not list(cache.rglob(".tmp-*"))
  for f in files:
    assert f.parent.name == f.name[:2]
    text = f.read_text()
    assert KEY not in text and "Bearer" not in text
    entry = json.loads(text)
    assert set(entry) == {"request", "texts"} and entry["request"]["messages"][-1]["content"] == "p"
  # a new client (a rerun) reads the cache
  with client(server.url, cache_dir=str(cache)) as c:
    assert c.complete("p", n=2, seed=1) == first
    assert c.stats.requests == 0 and c.stats.cache_hits == 1
  # the key covers the endpoint: the completions API does not reuse chat answers
  with client(server.url, api="completions", cache_dir=str(cache)) as c:
    c.complete("p", n=2, seed=1)
    assert c.stats.requests == 1


def test_corrupt_cache_entry_is_a_miss(server, tmp_path):
  with client(server.url, cache_dir=str(tmp_path)) as c:
    c.complete("p")
    (entry,) = tmp_path.rglob("*.json")
    good = entry.read_text()
    entry.write_text(good[: len(good) // 2])  # as if killed mid-write
    assert c.complete("p") == ["p|0"]
    assert len(server.requests) == 2 and c.stats.cache_hits == 0
    assert entry.read_text() == good  # overwritten with the full answer
    assert c.complete("p") == ["p|0"] and c.stats.cache_hits == 1


def test_cache_written_before_a_later_failure(server, tmp_path):
  bad = {"status": 400, "json": {"error": {"message": "bad"}}}
  server.script = [default_reply({"messages": [{"content": "a"}]}), bad]
  with (
    client(server.url, cache_dir=f"file://{tmp_path}", concurrency=1) as c,
    pytest.raises(TeacherError, match="bad"),
  ):
    c.map([{"prompt": "a"}, {"prompt": "b"}])
  assert len(list(tmp_path.rglob("*.json"))) == 1


# --- map ---


def test_map_order_concurrency_and_progress(server):
  # later prompts answer sooner, so completion order is the reverse of input order
  server.default = lambda body: {
    "sleep": 0.01 * (12 - int(body["messages"][-1]["content"])),
    **default_reply(body),
  }
  done = []
  reqs = [{"prompt": str(i), "n": 1 + i % 2} for i in range(12)]
  with client(server.url, concurrency=3) as c:
    out = c.map(reqs, on_done=lambda: done.append(1))
  assert out == [[f"{i}|{j}" for j in range(1 + i % 2)] for i in range(12)]
  assert len(done) == 12 and len(server.requests) == 12
  assert server.max_in_flight == 3  # reached, never exceeded


def test_map_first_error_cancels_the_rest(server):
  server.script = [{"status": 401, "json": {}}]
  done = []
  with client(server.url, concurrency=1) as c, pytest.raises(TeacherError, match="401"):
    c.map([{"prompt": str(i)} for i in range(5)], on_done=lambda: done.append(1))
  assert len(server.requests) == 1 and done == []


def test_map_error_stops_in_flight_retries(server):
  # request "bad" fails at once; "slow" keeps getting 503 and must stop retrying
  server.default = lambda body: (
    {"status": 400, "json": {"error": {"message": "nope"}}, "sleep": 0.05}
    if body["messages"][-1]["content"] == "bad"
    else {"status": 503, "json": {}}
  )
  t0 = time.monotonic()
  with (
    client(server.url, concurrency=2, backoff=0.2, max_backoff=0.2, max_retries=50) as c,
    pytest.raises(TeacherError, match="nope"),
  ):
    c.map([{"prompt": "slow"}, {"prompt": "bad"}])
  assert time.monotonic() - t0 < 2.0
  assert len(server.requests) < 6


def test_map_empty_and_bad_request_key(server):
  with client(server.url) as c:
    assert c.map([]) == []
    with pytest.raises(TypeError):
      c.map([{"prompt": "a", "temprature": 0.1}])
  assert server.requests == []


def test_import_is_light():
  code = (
    "import sys, rrtf_jax.serving.teacher; "
    "assert not {'jax', 'fsspec'} & set(sys.modules), sys.modules.keys()"
  )
  subprocess.run(
    [sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__))
  )

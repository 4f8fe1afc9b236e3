"""`rrtf serve` (rrtf_jax/serving/server.py): the real HTTP server in a thread over the tiny
checkpoint, driven by TeacherClient and raw HTTP and compared with `Decoder.generate` called
directly; plus one `serve_main` subprocess stopped by SIGTERM.

Compiles are the cost here: every request asks for NEW tokens and uses a prompt of at most 16
tokens, and the decoder's batch is at most 4, so only a few (batch, prompt, M) shapes compile.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import pytest
import requests
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from conftest import serving_url
from model.decode import Decoder, Request
from rrtf_jax.serving import api
from rrtf_jax.serving.server import make_server
from rrtf_jax.serving.engine import Engine
from rrtf_jax.serving.teacher import TeacherClient, TeacherError

NAME = "tiny"
NEW = 12  # max_tokens of every request: one decode buffer size (chunks of 4: 3 stream events)
PROMPT = "def add(a, b):\n"  # 10 tokens
QUESTION = "Reverse a string."  # 12 tokens once in prompt_text


def _serve(server) -> str:
  threading.Thread(target=server.serve_forever, daemon=True).start()
  return server.url


@pytest.fixture(scope="module")
def stack(tiny_ckpt, tmp_path_factory):
  decoder = Decoder.from_checkpoint(tiny_ckpt, chunk=4, max_batch=4)
  engine = Engine(decoder)
  log_path = tmp_path_factory.mktemp("serve") / "requests.jsonl"
  server = make_server(
    engine, "127.0.0.1", 0, model_name=NAME, request_log=str(log_path), default_max_tokens=NEW
  )
  yield types.SimpleNamespace(url=_serve(server), engine=engine, decoder=decoder, log=log_path)
  server.shutdown()
  server.server_close()
  engine.close()


def _post(stack, path, body, **kw):
  return requests.post(stack.url + path, json=body, timeout=60, **kw)


def _greedy(stack, prompt):
  return stack.decoder.generate([Request(prompt, max_new_tokens=NEW)])[0]


def _events(r) -> list:
  """An SSE response -> its data payloads (JSON decoded, '[DONE]' as is)."""
  assert r.status_code == 200 and r.headers["Content-Type"] == "text/event-stream; charset=utf-8"
  blocks = r.content.decode("utf-8").split("\n\n")
  assert blocks[-1] == "" and all(b.startswith("data: ") for b in blocks[:-1])
  payloads = [b[len("data: ") :] for b in blocks[:-1]]
  assert payloads[-1] == "[DONE]" and "[DONE]" not in payloads[:-1]
  return [json.loads(p) for p in payloads[:-1]]


def test_completions_through_teacher_client(stack):
  with TeacherClient(stack.url, NAME, api="completions", max_retries=0) as client:
    texts = client.complete(PROMPT, n=3, temperature=1.0, max_tokens=NEW, seed=7)
    assert len(texts) == 3 and len(set(texts)) > 1  # three samples, not one thrice
    assert client.complete(PROMPT, n=3, temperature=1.0, max_tokens=NEW, seed=7) == texts
    assert client.complete(PROMPT, n=3, temperature=1.0, max_tokens=NEW, seed=8) != texts
    assert client.complete(PROMPT, temperature=0.0, max_tokens=NEW) == [_greedy(stack, PROMPT).text]


def test_chat_through_teacher_client(stack):
  with TeacherClient(stack.url, NAME, api="chat", max_retries=0) as client:
    texts = client.complete(QUESTION, n=3, temperature=1.0, max_tokens=NEW, seed=7)
    assert (
      len(texts) == 3
      and client.complete(QUESTION, n=3, temperature=1.0, max_tokens=NEW, seed=7) == texts
    )
    greedy = client.complete(QUESTION, temperature=0.0, max_tokens=NEW)
  assert greedy == [_greedy(stack, '"""\nReverse a string.\n"""\n').text]
  r = _post(
    stack,
    "/chat/completions",
    {
      "model": NAME,
      "messages": [{"role": "user", "content": QUESTION}],
      "temperature": 0,
      "max_tokens": NEW,
    },
  )
  body = r.json()
  assert (
    body["object"] == "chat.completion"
    and body["model"] == NAME
    and body["id"].startswith("chatcmpl-")
  )
  [choice] = body["choices"]
  assert (
    choice["message"] == {"role": "assistant", "content": greedy[0]} and choice["logprobs"] is None
  )
  g = _greedy(stack, api.chat_prompt([{"role": "user", "content": QUESTION}]))
  assert choice["finish_reason"] == g.finish_reason
  assert body["usage"] == {
    "prompt_tokens": g.prompt_tokens,
    "completion_tokens": len(g.tokens),
    "total_tokens": g.prompt_tokens + len(g.tokens),
  }


def test_chat_template():
  messages = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "Sum."}]},  # content parts
    {"role": "assistant", "content": "def sum_"},
  ]  # the answer's start, to continue
  assert api.chat_prompt(messages) == '"""\nBe brief.\n\nSum.\n"""\ndef sum_'
  for bad in (
    [],
    [{"role": "tool", "content": "x"}],
    [{"role": "assistant", "content": "x"}],
    [{"content": "x"}],
  ):
    with pytest.raises(ValueError):
      api.chat_prompt(bad)


def test_concurrent_requests_answer_as_alone(stack):
  """Requests decoded together (joining one another's batch) answer as each does alone."""
  prompts = ["import os\n", "class A:\n", "x = 1\n", PROMPT]

  def body(prompt):
    return {"model": NAME, "prompt": prompt, "temperature": 0, "max_tokens": NEW}

  alone = [_post(stack, "/completions", body(p)).json()["choices"][0]["text"] for p in prompts]
  barrier, together = threading.Barrier(len(prompts)), [None] * len(prompts)

  def send(i):
    barrier.wait()
    together[i] = _post(stack, "/completions", body(prompts[i])).json()["choices"][0]["text"]

  threads = [threading.Thread(target=send, args=(i,)) for i in range(len(prompts))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert together == alone


def test_streamed_completions_equal_the_unstreamed(stack):
  body = {
    "model": NAME,
    "prompt": PROMPT,
    "n": 3,
    "temperature": 1.0,
    "max_tokens": NEW,
    "seed": 11,
  }
  full = _post(stack, "/completions", body).json()
  events = _events(_post(stack, "/completions", {**body, "stream": True}, stream=True))
  assert {e["id"] for e in events} == {events[0]["id"]} and events[0]["object"] == "text_completion"
  texts, finish, deltas = ["", "", ""], [None] * 3, [0] * 3
  for e in events:
    [c] = e["choices"]
    assert finish[c["index"]] is None  # nothing after a choice's final chunk
    texts[c["index"]] += c["text"]
    deltas[c["index"]] += bool(c["text"])
    finish[c["index"]] = c["finish_reason"]
  assert texts == [c["text"] for c in full["choices"]]
  assert finish == [c["finish_reason"] for c in full["choices"]]
  assert max(deltas) >= 2  # text arrived in several events, not once at the end


def test_streamed_chat_equals_the_unstreamed(stack):
  body = {
    "model": NAME,
    "messages": [{"role": "user", "content": QUESTION}],
    "temperature": 1.0,
    "max_tokens": NEW,
    "seed": 3,
  }
  full = _post(stack, "/chat/completions", body).json()
  streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
  events = _events(_post(stack, "/chat/completions", streamed, stream=True))
  assert all(e["object"] == "chat.completion.chunk" for e in events)
  assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
  *chunks, usage = events
  assert usage["choices"] == [] and usage["usage"] == full["usage"]
  assert chunks[-1]["choices"][0]["delta"] == {}
  assert chunks[-1]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
  assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
  text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
  assert text == full["choices"][0]["message"]["content"]


def test_stop_sequences_cut_before_the_stop(stack):
  text = _greedy(stack, PROMPT).text
  assert len(text) > 8
  stop = text[5:8]
  body = {
    "model": NAME,
    "prompt": PROMPT,
    "temperature": 0,
    "max_tokens": NEW,
    "stop": ["never-seen", stop],
  }
  [choice] = _post(stack, "/completions", body).json()["choices"]
  assert choice["text"] == text[: text.index(stop)] and choice["finish_reason"] == "stop"
  events = _events(_post(stack, "/completions", {**body, "stream": True}, stream=True))
  assert "".join(e["choices"][0]["text"] for e in events) == choice["text"]
  assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_errors(stack):
  def error(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err

  url = stack.url + "/completions"
  error(
    requests.post(url, data=b"{not json", headers={"Content-Type": "application/json"}, timeout=10),
    400,
  )
  for body in (
    {"model": NAME},
    {"prompt": 5},
    {"prompt": PROMPT, "temperature": -1},
    {"prompt": PROMPT, "n": 0},
    {"prompt": PROMPT, "top_p": 0},
    {"prompt": PROMPT, "stop": [1]},
    {"prompt": PROMPT, "logprobs": 1},
    {"prompt": [10**6]},
  ):
    error(_post(stack, "/completions", body), 400)
  error(_post(stack, "/chat/completions", {"model": NAME}), 400)
  long = " ".join(f"w{i}" for i in range(600))  # over the tiny model's 512 positions
  assert (
    "positions"
    in error(_post(stack, "/completions", {"prompt": long, "max_tokens": NEW}), 400)["message"]
  )
  assert (
    error(_post(stack, "/completions", {"prompt": long, "stream": True}), 400)["type"]
    == "invalid_request_error"
  )
  assert (
    error(_post(stack, "/completions", {"model": "gpt-4", "prompt": PROMPT}), 404)["code"]
    == "model_not_found"
  )
  for stream in (False, True):  # more rows than decode slots (4): refused, never queued
    r = _post(stack, "/completions", {"prompt": PROMPT, "n": 5, "stream": stream})
    assert "slots" in error(r, 400)["message"]
  error(_post(stack, "/nope", {"prompt": PROMPT}), 404)
  error(requests.get(stack.url + "/nope", timeout=10), 404)
  error(requests.put(url, json={"prompt": PROMPT}, timeout=10), 405)
  with pytest.raises(TeacherError, match="404"):
    TeacherClient(stack.url, "other", api="completions", max_retries=0).complete(
      PROMPT, max_tokens=NEW
    )
  # Still serving after all that.
  assert requests.get(stack.url + "/models", timeout=10).json()["data"][0]["id"] == NAME
  assert requests.get(stack.url.removesuffix("/v1") + "/health", timeout=10).json() == {
    "status": "ok"
  }
  r = _post(
    stack, "/completions", {"model": NAME, "prompt": PROMPT, "temperature": 0, "max_tokens": NEW}
  )
  assert r.json()["choices"][0]["text"] == _greedy(stack, PROMPT).text
  _assert_idle(stack.engine)


def _assert_idle(engine, within: float = 5.0) -> None:
  """No row waits or holds a slot (within a few seconds: cancelled rows free theirs at the next
  chunk boundary)."""
  deadline = time.time() + within
  while (stats := engine.stats())["queue"] or stats["busy"]:
    assert time.time() < deadline, stats
    time.sleep(0.05)


def test_health_and_metrics(stack):
  base = stack.url.removesuffix("/v1")
  r = requests.get(base + "/health", timeout=10)
  assert r.status_code == 200 and r.json() == {"status": "ok"}
  body = {"model": NAME, "prompt": PROMPT, "temperature": 0, "max_tokens": NEW}
  assert _post(stack, "/completions", body).status_code == 200
  r = requests.get(base + "/metrics", timeout=10)
  assert r.status_code == 200 and r.headers["Content-Type"] == CONTENT_TYPE_LATEST
  samples = {
    s.name: s.value
    for family in text_string_to_metric_families(r.text)
    for s in family.samples
    if not s.labels
  }
  assert samples["rrtf_queue_length"] == 0 and samples["rrtf_busy_slots"] == 0
  assert samples["rrtf_slots"] == 4
  assert samples["rrtf_generated_tokens_total"] >= 1
  assert samples["rrtf_time_to_first_token_seconds_count"] >= 1


def test_api_key(stack, monkeypatch):
  monkeypatch.delenv("RRTF_TEST_KEY", raising=False)
  with pytest.raises(ValueError, match="RRTF_TEST_KEY"):
    make_server(stack.engine, "127.0.0.1", 0, model_name=NAME, api_key_env="RRTF_TEST_KEY")
  monkeypatch.setenv("RRTF_TEST_KEY", "s3cret-key")
  server = make_server(stack.engine, "127.0.0.1", 0, model_name=NAME, api_key_env="RRTF_TEST_KEY")
  try:
    url = _serve(server)
    body = {"model": NAME, "prompt": PROMPT, "temperature": 0, "max_tokens": NEW}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key"}):
      r = requests.post(url + "/completions", json=body, headers=headers, timeout=10)
      assert r.status_code == 401 and "s3cret" not in r.text
    assert requests.get(url + "/models", timeout=10).status_code == 401
    with TeacherClient(
      url, NAME, api="completions", api_key_env="RRTF_TEST_KEY", max_retries=0
    ) as client:
      assert client.complete(PROMPT, temperature=0.0, max_tokens=NEW) == [
        _greedy(stack, PROMPT).text
      ]
    monkeypatch.setenv("RRTF_WRONG_KEY", "nope")
    with pytest.raises(TeacherError, match="401"):
      TeacherClient(
        url, NAME, api="completions", api_key_env="RRTF_WRONG_KEY", max_retries=0
      ).complete(PROMPT)
  finally:
    server.shutdown()
    server.server_close()


def test_ipv6_host(stack):
  server = make_server(stack.engine, "::1", 0, model_name=NAME)
  try:
    url = _serve(server)
    assert url == f"http://[::1]:{server.server_address[1]}/v1"
    body = {"model": NAME, "prompt": PROMPT, "temperature": 0, "max_tokens": NEW}
    r = requests.post(url + "/completions", json=body, timeout=60)
    assert r.json()["choices"][0]["text"] == _greedy(stack, PROMPT).text
  finally:
    server.shutdown()
    server.server_close()


def test_request_log(stack):
  raw = json.dumps(
    {"model": NAME, "prompt": PROMPT, "n": 3, "temperature": 1.0, "max_tokens": NEW, "seed": 1}
  ).encode()
  assert requests.post(stack.url + "/completions", data=raw, timeout=60).status_code == 200
  bad = b'{"model": "tiny", "prompt": '
  assert requests.post(stack.url + "/completions", data=bad, timeout=60).status_code == 400
  lines = [json.loads(line) for line in stack.log.read_text().splitlines()]
  by_hash = {line["sha256"]: line for line in lines}
  ok = by_hash[hashlib.sha256(raw).hexdigest()]
  assert (ok["path"], ok["status"], ok["model"], ok["n"]) == ("/v1/completions", 200, NAME, 3)
  assert by_hash[hashlib.sha256(bad).hexdigest()]["status"] == 400
  assert all(line["path"] != "/v1/models" for line in lines)  # GETs are not logged


def test_client_gone_mid_stream(stack):
  host, port = stack.url.removeprefix("http://").removesuffix("/v1").split(":")
  conn = http.client.HTTPConnection(host, int(port), timeout=30)
  body = {
    "model": NAME,
    "prompt": "import os\n",
    "n": 3,
    "temperature": 1.0,
    "max_tokens": NEW,
    "stream": True,
  }
  conn.request(
    "POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"}
  )
  resp = conn.getresponse()
  assert resp.status == 200 and resp.fp.readline()  # the first event's chunk size
  conn.sock.close()  # gone, with the stream unfinished
  conn.close()
  _assert_idle(stack.engine)  # its rows freed their slots
  r = _post(
    stack, "/completions", {"model": NAME, "prompt": PROMPT, "temperature": 0, "max_tokens": NEW}
  )
  assert r.json()["choices"][0]["text"] == _greedy(stack, PROMPT).text


def test_serve_main_subprocess(tiny_ckpt, tmp_path):
  code = (
    "from rrtf_jax.serving.server import serve_main; "
    f"serve_main({tiny_ckpt!r}, '127.0.0.1', 0, model_name='sub', "
    f"max_batch=1, chunk=4, request_log={str(tmp_path / 'log.jsonl')!r})"
  )
  proc = subprocess.Popen(
    [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )
  try:
    url = serving_url(proc, time.time() + 120)
    with TeacherClient(url, "sub", api="completions", max_retries=0) as client:
      [text] = client.complete(PROMPT, temperature=0.0, max_tokens=4)
    assert isinstance(text, str)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert json.loads((tmp_path / "log.jsonl").read_text())["status"] == 200
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def test_serve_in_a_two_process_job_uses_its_own_devices(tiny_ckpt):
  """`rrtf serve` in each process of a two-process JAX job (joined by jax.distributed, 2 CPU
  devices each: jax.devices() lists 4, jax.local_devices() 2), process 0 with --mesh tensor=2,
  process 1 unsharded: each loads the model onto its own devices, as sample and evaluate do, and
  both answer greedily alike. A mesh over jax.devices() does not fit 4 devices, and unsharded
  parameters on jax.devices()[0] would be on process 0's device, out of process 1's reach."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  join = (
    "import sys, jax; jax.distributed.initialize(coordinator_address=sys.argv[1], "
    "num_processes=2, process_id=int(sys.argv[2])); "
    "from rrtf_jax.cli import main; sys.exit(main(sys.argv[3:]))"
  )
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  # float32: the sharded and the one-device decode agree exactly
  serve = [
    "serve",
    "--ckpt",
    tiny_ckpt,
    "--port",
    "0",
    "--model-name",
    "sub",
    "--max-batch",
    "1",
    "--chunk",
    "4",
    "--dtype",
    "float32",
  ]
  coordinator = f"127.0.0.1:{port}"
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", join, coordinator, str(i), *serve, *mesh],
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      env=env,
    )
    for i, mesh in enumerate((["--mesh", "tensor=2"], []))
  ]
  try:
    deadline = time.time() + 120
    urls = [serving_url(proc, deadline) for proc in procs]
    texts = []
    for url in urls:
      with TeacherClient(url, "sub", api="completions", max_retries=0) as client:
        texts += client.complete(PROMPT, temperature=0.0, max_tokens=NEW)
    assert texts[0] == texts[1] and texts[0]
    for proc in procs:
      proc.send_signal(signal.SIGTERM)
    assert [proc.wait(timeout=60) for proc in procs] == [0, 0]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()

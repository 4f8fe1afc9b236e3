"""Batched greedy decoding on CPU: our `model.decode.Decoder` vs HF transformers' `generate`.

A benchmark, never pass/fail. Both sides decode the same prompts with the same weights in fp32,
greedy, KV cache on, in one run:

ours  `Decoder.generate` (jitted prefill, then a jitted `lax.while_loop` of `chunk` tokens per
      call, host checks between calls), from a checkpoint made by `model.convert.convert_hf`
      and loaded with `Decoder.from_checkpoint(dir, dtype="float32")`; JAX_PLATFORMS=cpu.
      Timed at every `--chunks` value (Decoder's default is 32): fewer chunks = fewer host round
      trips, the same compiled loop body.
HF    `GPTBigCodeForCausalLM.generate(do_sample=False, use_cache=True)`, torch CPU, with
      torch.set_num_threads(os.cpu_count()) (XLA's CPU client uses every core by default).

The model is a random HF GPTBigCode, multi-query (StarCoder's shape), its weights perturbed as
tests/conftest.py `make_hf_model` does (so no bias or norm is trivial), saved with safetensors
and converted. The prompts are random ids with lengths drawn in [3/4, 1] x --prompt-len (the
longest is --prompt-len), left-padded with an attention mask for HF; ours pads them itself to
a power-of-two bucket. EOS is off on both sides (eos_token_id None in the config), so every row
generates --new-tokens tokens; the tokens counted are the ones each side returns.

Reported per batch size: the median seconds of --repeats timed calls after one untimed warm-up
call (which for ours includes JAX compilation, recorded as `first_call_s`), the timed calls of
all sides interleaved so background load hits them alike; generated tokens/s; the ratio ours/HF;
how many rows' greedy tokens agree exactly between the sides (and where the first difference
falls). Then a profile of ours: one extra call per batch and chunk with prefill and each loop
call timed (blocked on), the rest being host work; the cost of the sampling step the loop runs
every step (`model.decode.sample_tokens` at temperature 0) against a bare argmax on the same
[B, V] logits: greedy rows should cost no more than the argmax.

Run from the repo root:
  python benchmarks/decode.py                      # small: D512 L8 N8 MQA V8192, B 1 and 16
  python benchmarks/decode.py --size tiny          # smoke run
  python benchmarks/decode.py --report-only        # rewrite decode.md from decode.json
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
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
import results_io  # noqa: E402  (benchmarks/, this script's directory)
from model.convert import convert_hf  # noqa: E402
from model.decode import Decoder, sample_tokens  # noqa: E402

RESULTS = os.path.join(REPO, "benchmarks", "results", "decode.json")

# GPTBigCodeConfig fields per --size; n_inner defaults to 4 * n_embd
SIZES = {
  "tiny": dict(n_embd=128, n_layer=2, n_head=4, vocab_size=1024, n_positions=1024),
  "small": dict(n_embd=512, n_layer=8, n_head=8, vocab_size=8192, n_positions=1024),
}
PAD_ID = 0


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
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=RESULTS, help="JSON path; Markdown goes beside it (.md)")
  p.add_argument(
    "--report-only", action="store_true", help="rewrite the Markdown from --out's JSON, run nothing"
  )
  return p.parse_args()


def _ver(pkg: str) -> str | None:
  try:
    return version(pkg)
  except PackageNotFoundError:
    return None


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
  """One call with prefill and every decode-loop call blocked on and timed; the rest is host."""
  calls = {"prefill": [], "decode": []}

  def timed(fn, name):
    def wrapped(*args, **kw):
      t0 = time.perf_counter()
      out = jax.block_until_ready(fn(*args, **kw))
      calls[name].append(time.perf_counter() - t0)
      return out

    return wrapped

  # instance attributes (jax.jit objects): wrapped for this call only
  jitted = dec._prefill, dec._decode
  dec._prefill, dec._decode = timed(dec._prefill, "prefill"), timed(dec._decode, "decode")
  try:
    t0 = time.perf_counter()
    dec.generate(prompts, max_new_tokens=new_tokens)
    total = time.perf_counter() - t0
  finally:
    dec._prefill, dec._decode = jitted
  return {
    "total_s": total,
    "prefill_s": calls["prefill"][0],
    "decode_calls_s": calls["decode"],
    "decode_s": sum(calls["decode"]),
    "decode_s_per_step": sum(calls["decode"]) / new_tokens,
    "host_s": total - calls["prefill"][0] - sum(calls["decode"]),
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


def run(a) -> dict:
  code_at_start = code_info()
  torch.set_num_threads(os.cpu_count())
  chunks = list(dict.fromkeys(a.chunks))
  with tempfile.TemporaryDirectory() as tmp:
    hf, decoders = build(a.size, a.seed, tmp, chunks, max(a.batches))
  cfg = decoders[chunks[0]].config
  n_params = sum(p.numel() for p in hf.parameters())
  print(
    f"[{a.size}] L={cfg.num_layers} D={cfg.embed_dim} N={cfg.num_heads} K={cfg.num_kv_heads} "
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
          f"[B={b}] profile chunk {c}: total {pr['total_s']:.3f} s = prefill {pr['prefill_s']:.3f} "
          f"+ {len(pr['decode_calls_s'])} loop calls {pr['decode_s']:.3f} "
          f"({1e3 * pr['decode_s_per_step']:.2f} ms/step) + host {pr['host_s']:.3f}",
          flush=True,
        )
      sp = row["profile"]["sampling"]
      print(
        f"[B={b}] sampling step alone: sample_tokens {sp['sample_tokens_ms']:.2f} ms vs argmax "
        f"{sp['argmax_ms']:.3f} ms",
        flush=True,
      )
  env = env_info()
  if env["code"]["model_decode_py_sha256"] != code_at_start["model_decode_py_sha256"]:
    # someone edited decode.py meanwhile: figures mixed
    env["code"]["changed_during_run_from"] = code_at_start
    print("warning: model/decode.py changed during the run", flush=True)
  return {
    "benchmark": "decode: batched greedy decoding tokens/s, ours (JAX Decoder) vs HF generate, "
    "fp32 CPU",
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
      "repeats": a.repeats,
      "seed": a.seed,
      "eos": None,
      "hf_attn_implementation": getattr(hf.config, "_attn_implementation", None),
      "timing": "one untimed call per side, then repeats interleaved; median",
    },
    "batches": rows,
    "env": env,
  }


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
  s, env = result["settings"], result["env"]
  chunks, c0 = s["chunks"], s["headline_chunk"]
  m = s["model"]
  lines = [
    "# Batched greedy decoding, CPU fp32",
    "",
    f"Ours: `model.decode.Decoder.generate` (JAX {env['jax']}); HF: "
    f"`GPTBigCodeForCausalLM.generate` (transformers {env['transformers']}, torch {env['torch']}, "
    f"{env['torch_num_threads']} threads, attention {s['hf_attn_implementation']}). "
    f"{env['cpu_count']} CPUs, {env['date']}. Model `{s['size']}`: D{m['n_embd']} L{m['n_layer']} "
    f"N{m['n_head']} MQA V{m['vocab_size']}, {s['params'] / 1e6:.1f}M params, same random weights; "
    f"prompts up to {s['prompt_len']} tokens, {s['new_tokens']} new tokens per row, EOS off. "
    f"Median of {s['repeats']} interleaved calls after one untimed call; tok/s = generated tokens "
    "/ wall seconds of the whole `generate` call (prefill included). "
    f"{_code_line(env.get('code'))}",
    "",
    "| batch | "
    + " | ".join(f"ours tok/s (chunk {c})" for c in chunks)
    + " | HF tok/s | "
    + " | ".join(f"ours/HF (chunk {c})" for c in chunks)
    + " | identical rows | ours first call s | load after |",
    "|---" * (5 + 2 * len(chunks)) + "|",
  ]
  for b, r in result["batches"].items():
    ag = r["agreement_ours_vs_hf"]
    lines.append(
      f"| {b} | "
      + " | ".join(f"{r[f'ours_chunk{c}']['tokens_per_s']:,.1f}" for c in chunks)
      + f" | {r['hf']['tokens_per_s']:,.1f} | "
      + " | ".join(f"{r[f'ours_chunk{c}']['ratio_over_hf']:.2f}x" for c in chunks)
      + f" | {ag['identical_rows']}/{ag['rows']} | {r[f'ours_chunk{c0}']['first_call_s']:.1f} | "
      f"{r['load_after']} |"
    )
  lines += [
    "",
    "Load is the 1/5/15-minute load average, this benchmark's own threads included (about 2 while "
    "it runs).",
  ]
  prof = [(b, r["profile"]) for b, r in result["batches"].items() if "profile" in r]
  if prof:
    lines += [
      "",
      "Profile of ours (one extra call, each jitted call blocked on): seconds of the call, of the "
      "prefill, of the decode-loop calls (and per generated step), and of host work between them; "
      "and the jitted greedy sampling step `sample_tokens` alone against a bare argmax on the "
      "same logits.",
      "",
      "| batch | chunk | total s | prefill s | loop calls | loop s | ms/step | host s | "
      "sample_tokens ms | argmax ms |",
      "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for b, p in prof:
      for c in chunks:
        pr = p[f"chunk{c}"]
        lines.append(
          f"| {b} | {c} | {pr['total_s']:.3f} | {pr['prefill_s']:.3f} | "
          f"{len(pr['decode_calls_s'])} | {pr['decode_s']:.3f} | "
          f"{1e3 * pr['decode_s_per_step']:.2f} | {pr['host_s']:.3f} | "
          f"{p['sampling']['sample_tokens_ms']:.2f} | {p['sampling']['argmax_ms']:.3f} |"
        )
  lines.append("")
  return "\n".join(lines)


def main():
  a = parse_args()
  if a.report_only:
    results_io.rewrite_markdown(a.out, markdown)
  else:
    results_io.write(a.out, run(a), markdown)


if __name__ == "__main__":
  main()

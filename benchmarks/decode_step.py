"""The jitted decode step (model/decode.py's decode_chunk) on CPU: its time per token and what
the optimized HLO copies inside the generation loop; and the host's detokenisation.

A benchmark, never pass/fail. A mid-size random model (L4 D512 N8 K1 F2048 V8192, fp32 like
benchmarks/train_step.py's "mid"), batch 1 and 4 (one result each), a 64-token prompt bucket,
64 new tokens, all greedy. Reported: the median seconds of one decode_chunk call of `--chunk`
tokens, per token, and the in-loop instructions that write a layer-weight-sized f32 buffer (a
dynamic-slice out of a stacked parameter, or a transposing copy of one). `--baseline REV` also
times decode_chunk as of git revision REV in the same process (interleaved, and the ratio of
each back-to-back pair), so the two share the machine's load, and checks that the greedy
tokens of the chunk are identical. Each version's state comes from its own prefill: `admit`
into `init_state`'s slots (a chunk of C = `--chunk` tokens per call, the state's `out` width)
where the module has it, else the static `prefill` (and decode_chunk's `stop_at` argument).
`detokenize`: the host seconds to keep one row's text current, chunk after chunk, by decoding
the whole row (before) or incrementally (data/tokenizer.IncrementalDetokenizer).

benchmarks/decode.py runs this (against d01333f, whose layers are stacked and whose rows are
re-decoded whole) and reports it in benchmarks/results/decode.md; alone:

  python benchmarks/decode_step.py --baseline d01333f
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from model import decode  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.transformer import init_params  # noqa: E402

CFG = ModelConfig(
  vocab_size=8192,
  max_position_embeddings=1024,
  num_layers=4,
  embed_dim=512,
  num_heads=8,
  num_kv_heads=1,
  mlp_dim=2048,
  dtype="float32",
)


def load_rev(rev: str, name: str = "decode_baseline"):
  """model/decode.py as of git `rev`, imported as the separate module `name` (on this
  checkout's model/transformer.py and the rest)."""
  src = subprocess.check_output(["git", "-C", REPO, "show", f"{rev}:model/decode.py"], text=True)
  path = os.path.join(tempfile.mkdtemp(), f"{name}.py")
  with open(path, "w") as f:
    f.write(src)
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  sys.modules[name] = mod  # dataclasses look their module up
  spec.loader.exec_module(mod)
  return mod


def _state(mod, cfg, params, b: int, p: int, m: int, chunk: int):
  """The state after prefilling b random prompts of p tokens, with room for m new tokens."""
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(1, cfg.vocab_size, (b, p)), jnp.int32)
  mask = jnp.ones((b, p), jnp.int32)
  keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(0), s))(jnp.arange(b))
  z, zi = jnp.zeros((b,), jnp.float32), jnp.zeros((b,), jnp.int32)
  max_new = jnp.full((b,), m, jnp.int32)
  if hasattr(mod, "admit"):  # continuous batching: b slots of p + m tokens, chunk-wide `out`
    st = mod.init_state(cfg, slots=b, length=p + m, chunk=chunk)
    rows = jnp.arange(b, dtype=jnp.int32)
    admit = jax.jit(mod.admit, static_argnames=("cfg",))
    st = admit(params, cfg, st, tokens, mask, rows, rows, b, keys, z, z + 1, zi, max_new)
    return st[0] if isinstance(st, tuple) else st  # later admit also returns the kept prefill
  return jax.jit(mod.prefill, static_argnames=("cfg", "new_tokens"))(
    params, cfg, tokens, mask, keys, z, z + 1, zi, max_new, jnp.zeros((b,), bool), new_tokens=m
  )


def _chunk_call(mod, chunk: int):
  """-> (jitted decode_chunk, its positional arguments after the state): one call of `chunk`
  tokens from the state's start, as the module's signature has it (the continuous-batching
  one takes the chunk from the state; the one before took `stop_at`)."""
  fn = jax.jit(mod.decode_chunk, static_argnames=("cfg", "eos_ids", "pad_id"))
  return fn, (() if hasattr(mod, "admit") else (jnp.int32(chunk),))


def weight_copies(hlo: str, params) -> list[str]:
  """Instructions of the compiled module's non-fused computations (the loops' bodies) whose
  result is one layer's weight, by element count: a dynamic-slice, copy or fusion that writes
  a layer's weights out of the stacked [L, ...] parameter."""
  sizes = {
    x.size // x.shape[0] for x in jax.tree.leaves(params["h"]) if x.size // x.shape[0] >= 4096
  }
  out, fused = [], False
  for line in hlo.splitlines():
    if line and not line.startswith(" "):
      fused = line.startswith("%fused") or "fused_computation" in line.split("(")[0]
      continue
    m = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = f32\[([\d,]*)\]\{[^}]*\} ([\w\-]+)\(", line)
    if fused or not m or m.group(2) not in ("copy", "dynamic-slice", "fusion", "slice"):
      continue
    if int(np.prod([int(d) for d in m.group(1).split(",") if d])) in sizes:
      out.append(line.strip()[:160])
  return out


def detok_cost(tokens: int, chunk: int) -> dict:
  """Host seconds to keep one row's text current over `tokens` generated tokens in chunks of
  `chunk`: decoding the whole row after every chunk (before) against IncrementalDetokenizer,
  for the tiny config's SentencePiece tokenizer on tokens of this project's own source."""
  from data.tokenizer import IncrementalDetokenizer, builtin_corpus, train_sentencepiece

  tok = train_sentencepiece(builtin_corpus(), tempfile.mkdtemp(), vocab_size=1024)
  ids = tok.encode("".join(builtin_corpus()))[:tokens]
  t = time.perf_counter()
  for end in range(chunk, len(ids) + chunk, chunk):
    full = tok.decode(ids[:end])
  t_full = time.perf_counter() - t
  t = time.perf_counter()
  inc = IncrementalDetokenizer(tok)
  for end in range(chunk, len(ids) + chunk, chunk):
    text = inc.extend(ids[end - chunk : end])
  t_inc = time.perf_counter() - t
  assert text == full
  return {"tokens": len(ids), "chunk": chunk, "full_redecode_s": t_full, "incremental_s": t_inc}


def run(a) -> dict:
  cfg = getattr(a, "cfg", None) or CFG
  params = init_params(cfg, jax.random.key(0))
  mods = {"this": decode}
  if a.baseline:
    mods["baseline"] = load_rev(a.baseline)
  b, p, m = a.batch, a.prompt, a.new_tokens
  fns, hlos, toks = {}, {}, {}
  for name, mod in mods.items():
    fn, extra = _chunk_call(mod, a.chunk)
    # the params as each version's Decoder passes them (split per layer where it does that)
    mp = getattr(mod, "split_layers", lambda x: x)(params)
    st = _state(mod, cfg, mp, b, p, m, a.chunk)
    kw = dict(eos_ids=(), pad_id=0)
    hlos[name] = fn.lower(mp, cfg, st, *extra, **kw).compile().as_text()
    toks[name] = np.asarray(fn(mp, cfg, st, *extra, **kw).out)[:, : a.chunk]
    fns[name] = (fn, st, mp, extra)
  times = {k: [] for k in mods}
  for _ in range(a.repeats):
    for name, (fn, st, mp, extra) in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(fn(mp, cfg, st, *extra, eos_ids=(), pad_id=0).out)
      times[name].append(time.perf_counter() - t)
  res = {
    "config": _describe(cfg),
    "batch": b,
    "prompt_bucket": p,
    "new_tokens_bucket": m,
    "chunk": a.chunk,
    "repeats": a.repeats,
    "jax": jax.__version__,
    "devices": str(jax.devices()),
  }
  for name in mods:
    med = float(np.median(times[name]))
    copies = weight_copies(hlos[name], params)
    res[name] = {
      "chunk_s_median": med,
      "token_ms": 1e3 * med / a.chunk,
      # instructions in the compiled text (one in a scanned body runs once per layer)
      "weight_slice_ops": sum("dynamic-slice" in c.split("=")[0] for c in copies),
      "weight_transpose_copy_ops": sum("dynamic-slice" not in c.split("=")[0] for c in copies),
      "weight_copy_examples": copies[:6],
    }
  if a.baseline:
    res["baseline_rev"] = subprocess.check_output(
      ["git", "rev-parse", "--short", a.baseline], text=True, cwd=REPO
    ).strip()
    res["ratio_this_over_baseline"] = (
      res["this"]["chunk_s_median"] / res["baseline"]["chunk_s_median"]
    )
    # each repetition times both back to back: the ratio within a pair shares the load
    pairs = np.asarray(times["this"]) / np.asarray(times["baseline"])
    res["ratio_paired"] = {
      "median": float(np.median(pairs)),
      "q25": float(np.quantile(pairs, 0.25)),
      "q75": float(np.quantile(pairs, 0.75)),
    }
    res["tokens_identical"] = bool(np.array_equal(toks["this"], toks["baseline"]))
  res["detokenize"] = detok_cost(a.detok_tokens, a.chunk)
  res["detokenize"]["ratio_full_over_incremental"] = (
    res["detokenize"]["full_redecode_s"] / res["detokenize"]["incremental_s"]
  )
  if a.dump:
    for name, h in hlos.items():
      with open(os.path.join(a.dump, f"decode_{name}.hlo.txt"), "w") as f:
        f.write(h)
  return res


def _describe(cfg) -> str:
  return (
    f"L{cfg.num_layers} D{cfg.embed_dim} N{cfg.num_heads} K{cfg.num_kv_heads} F{cfg.mlp_dim} "
    f"V{cfg.vocab_size} {'fp32' if cfg.dtype == 'float32' else cfg.dtype}"
  )


def run_all(batches, **kw) -> dict:
  """{f"batch{b}": run(...)} for each batch size; `kw` as main's flags (baseline, prompt,
  new_tokens, chunk, repeats, detok_tokens, dump; cfg: another model config)."""
  defaults = dict(baseline=None, prompt=64, new_tokens=64, chunk=32, repeats=15)
  defaults |= dict(detok_tokens=4096, dump=None)
  a = argparse.Namespace(**(defaults | kw))
  return {f"batch{b}": run(argparse.Namespace(**{**vars(a), "batch": b})) for b in batches}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--baseline", default=None, help="git revision to time against")
  ap.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="one run per batch size")
  ap.add_argument("--prompt", type=int, default=64)
  ap.add_argument("--new-tokens", type=int, default=64)
  ap.add_argument("--chunk", type=int, default=32)
  ap.add_argument("--repeats", type=int, default=15)
  ap.add_argument("--detok-tokens", type=int, default=4096)
  ap.add_argument("--dump", default=None, help="folder for the optimized HLO texts")
  ap.add_argument("--out", default=None)
  a = ap.parse_args()
  res = run_all(**{**vars(a), "batches": a.batch, "batch": None})
  text = json.dumps(res, indent=2)
  print(text)
  if a.out:
    with open(a.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()

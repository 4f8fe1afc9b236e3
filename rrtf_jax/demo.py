"""`rrtf demo`: the tiny model through every stage that exists so far, on CPU, in seconds.

Stages today: tokenizer training, model initialisation, checkpoint save/load, export to HF
format and conversion back (checked bit-exact), a forward pass scoring held-out code, and
the ranking engine (the sandbox and scores of `rrtf rank`) on hand-written responses.
Evaluation is a later stage of the pipeline; evolve, sample, serve, prepare and train are
built but not yet run here (the full loop is the demo's next step); the demo says so instead
of pretending.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np

from rrtf_jax.config_loading import load_config

PENDING = ("evaluate (pass@k)",)
# Built, not yet chained into the demo.
NOT_IN_DEMO = ("evolve", "sample", "serve", "prepare", "train (RRTF loss)")

# One problem and responses of every class, including one that tries to fake a pass.
DEMO_PROBLEM = dict(
    task_id="demo/clamp", entry_point="clamp",
    prompt='def clamp(x, lo, hi):\n    """Return x limited to the range [lo, hi]."""\n',
    test="def check(candidate):\n    assert candidate(5, 0, 10) == 5\n    assert candidate(-1, 0, 10) == 0\n"
         "    assert candidate(11, 0, 10) == 10\n    assert candidate(0, 0, 0) == 0\n")
DEMO_RESPONSES = [  # (source, code appended to the prompt)
    ("teacher", "    return max(lo, min(x, hi))\n"),
    ("student", "    return min(x, hi)\n"),
    ("student", "    return max(lo, min(x, hi)\n"),
    ("student", "    import sys\n    sys.exit(0)\n"),
    ("student", "import os\nos._exit(0)\n"),
]


def _step(msg: str):
  print(f"[demo] {msg}", flush=True)


def run_demo(workdir: str, seed: int = 0, quick: bool = False) -> dict:
  from data.tokenizer import builtin_corpus, train_sentencepiece
  from model import ModelConfig, Transformer, init_params, load_checkpoint, save_checkpoint
  from model.convert import convert_hf, export_hf

  t0 = time.perf_counter()
  config = load_config("tiny")
  os.makedirs(workdir, exist_ok=True)
  # Each run rebuilds its outputs from scratch; only finished directories are ever renamed in.
  for name in ("tokenizer", "base", "hf_export", "reconverted"):
    shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)

  corpus = builtin_corpus()
  held_out, train_text = corpus[-1], corpus[:-1]
  tok = train_sentencepiece(train_text, os.path.join(workdir, "tokenizer"), vocab_size=config.tokenizer.vocab_size)
  _step(f"trained a {tok.vocab_size}-piece SentencePiece tokenizer on {sum(map(len, train_text))} characters "
        "of shipped source")

  cfg = ModelConfig.from_dict(config.model)
  params = init_params(cfg, jax.random.PRNGKey(seed))
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  base = save_checkpoint(os.path.join(workdir, "base"), cfg, params, tokenizer_dir=os.path.join(workdir, "tokenizer"))
  _step(f"initialised the tiny model ({n_params / 1e3:.0f}K parameters, {cfg.num_layers} layers, "
        f"{cfg.num_heads} heads, {cfg.num_kv_heads} kv head) and saved {base}")

  hf_dir = export_hf(base, os.path.join(workdir, "hf_export"), progress=False)
  back = convert_hf(hf_dir, os.path.join(workdir, "reconverted"), progress=False)
  _, params2 = load_checkpoint(back)
  same = all(np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)))
  _step(f"exported to HF safetensors ({hf_dir}) and converted back: parameters identical = {same}")

  seq_len = 64 if quick else 256
  ids = tok.encode(held_out)[: seq_len * (2 if quick else 4)]
  rows = len(ids) // seq_len
  tokens = jnp.asarray(np.asarray(ids[: rows * seq_len]).reshape(rows, seq_len))
  logits = jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t))(params, tokens)
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  nll = float(-jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean())
  _step(f"scored {rows}x{seq_len} held-out tokens: loss {nll:.3f} nats/token (untrained: ln V = "
        f"{math.log(cfg.vocab_size):.3f})")

  ranked = _rank_demo()
  for source, outcome, passed, total, score in ranked:
    _step(f"  rank: {source:8s} {outcome:14s} {passed}/{total} tests  score {score:.3f}")

  summary = {
      "stages_run": ["tokenizer", "init", "checkpoint", "export", "convert", "rank"],
      "rank_demo": [dict(zip(("source", "outcome", "tests_passed", "tests_total", "score"), r)) for r in ranked],
      "stages_pending": list(PENDING), "params": n_params, "roundtrip_identical": same,
      "heldout_loss": nll, "seconds": time.perf_counter() - t0, "seed": seed, "quick": quick,
  }
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  _step("not built yet (later stages of the pipeline): " + ", ".join(PENDING))
  _step("built but not run here yet: " + ", ".join(NOT_IN_DEMO) + "; see the README's sampling and training sections")
  _step(f"done in {summary['seconds']:.1f} s; summary in {os.path.join(workdir, 'summary.json')}")
  if not same:
    raise RuntimeError("export/convert round trip changed the parameters")
  return summary


def _rank_demo() -> list[tuple]:
  """Ranks DEMO_RESPONSES through the code path of `rrtf rank` (sandbox, scores)."""
  from rrtf_jax.rank import rank_records
  from rrtf_jax.sandbox import Sandbox
  codes = [code for _, code in DEMO_RESPONSES]
  record = dict(DEMO_PROBLEM, exec_prefix=DEMO_PROBLEM["prompt"], responses=codes, codes=codes,
                sources=[s for s, _ in DEMO_RESPONSES], is_teacher=[int(s == "teacher") for s, _ in DEMO_RESPONSES])
  with Sandbox(workers=2, quiet=True) as box:
    _step(f"ranking {len(codes)} responses to {DEMO_PROBLEM['task_id']} in the sandbox (isolation: {box.isolation})")
    (out, _), = rank_records([record], box)
  return list(zip(out["sources"], out["outcomes"], out["tests_passed"], out["tests_total"], out["scores"]))

"""Our Table 4 (PanGu-Coder2's quantized inference) on the demo's model, plus StarCoder-15B on
one v5e.

A benchmark, never pass/fail. In one run:

1. The model: the RRTF model of an `rrtf demo` workdir (--demo-workdir; default: runs
   `rrtf demo --seed 0` into --workdir first).
2. Variants, all from that checkpoint: fp32 (as trained), bf16 (weights cast), and
   `rrtf quantize` int8 (per output channel), int4-gptq and int4-rtn (groups of --group input
   rows; GPTQ calibrated on the demo's RRTF-training problems, never the held-out ones). The
   embedding / LM head stays floating point (bf16) in the quantized ones, as `rrtf quantize`
   does by default. Every variant computes in the tiny config's float32 on CPU: the rows differ
   in the weights only.
3. Per variant: parameter bytes as an accelerator holds them (int4 two per byte) and the linear
   layers' share; decode ms/token on CPU at batch 1 and 16: the Decoder generating 8 and then
   8 + --new-tokens tokens from held-out prompts (EOS off), the difference divided by
   --new-tokens (prefill cancels), median of --repeats, all variants interleaved per repeat;
   KL(fp32 || variant) of next-token distributions over the held-out problems' prompts and
   reference solutions; held-out greedy pass@1 by `rrtf evaluate` (the demo's settings).
4. `rrtf plan --decode` for StarCoder-15B on one v5e chip (16 GiB HBM, libtpu AOT) for bf16,
   int8 and int4 weights at batch 1 / 2048 tokens and batch 16 / 8192 tokens: per-chip memory,
   whether it fits.

Run from the repo root:
  python benchmarks/quantize.py --demo-workdir /tmp/rrtf-demo-bench/seed0  # reuse a demo run
  python benchmarks/quantize.py                # runs the demo first
  python benchmarks/quantize.py --report-only  # quantize.md from the JSON
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from benchmarks import results_io  # noqa: E402

RESULTS = os.path.join(REPO, "benchmarks", "results", "quantize.json")
VARIANTS = ("fp32", "bf16", "int8", "int4-gptq", "int4-rtn")
PAPER = {  # PanGu-Coder2 Table 4 (StarCoder-15B based, A100): GB, ms/token, HumanEval pass@1
  "float16": (32.36, 75, 62.20),
  "CTranslate2 int8": (16.29, 33, 64.63),
  "GPTQ int8": (16.92, 51, 51.22),
  "GPTQ int4": (9.82, 42, 51.83),
}
AOT_CASES = ((1, 2048), (16, 8192))


def parse_args():
  # The first paragraph of the docstring, as one line.
  p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
  p.add_argument(
    "--demo-workdir",
    default=None,
    help="an `rrtf demo` workdir with models/rrtf (default: run one)",
  )
  p.add_argument(
    "--workdir", default="/tmp/rrtf-quantize-bench", help="where the demo and the variants go"
  )
  p.add_argument(
    "--group", type=int, default=32, help="int4 input rows per scale (the demo model's D is 64)"
  )
  p.add_argument("--new-tokens", type=int, default=128)
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--skip-aot", action="store_true", help="no StarCoder-15B plans (needs libtpu)")
  p.add_argument("--out", default=RESULTS)
  p.add_argument("--report-only", action="store_true")
  return p.parse_args()


def demo_workdir(args) -> str:
  if args.demo_workdir:
    return os.path.abspath(args.demo_workdir)
  demo_dir = os.path.join(args.workdir, "demo")
  if not os.path.exists(os.path.join(demo_dir, "models", "rrtf", "model_config.json")):
    subprocess.run(["rrtf", "demo", "--seed", "0", "--quiet", "--workdir", demo_dir], check=True)
  return demo_dir


def make_variants(demo: str, out: str, group: int) -> dict[str, str]:
  import jax

  from model import load_checkpoint, save_checkpoint
  from model.checkpoint import tokenizer_path
  from rrtf_jax.stages.quantize import quantize_stage

  src = os.path.join(demo, "models", "rrtf")
  paths = {"fp32": src}
  for name in VARIANTS[1:]:
    paths[name] = os.path.join(out, name)
    if os.path.exists(paths[name]):
      shutil.rmtree(paths[name])
  cfg, params = load_checkpoint(src)
  save_checkpoint(
    paths["bf16"],
    cfg.replace(param_dtype="bfloat16"),
    jax.tree.map(lambda a: a.astype("bfloat16"), params),
    tokenizer_dir=tokenizer_path(src),
  )
  calibration = os.path.join(demo, "problems", "train.jsonl")
  quantize_stage(src, "int8", paths["int8"], progress=False)
  for method in ("int4-gptq", "int4-rtn"):
    t0 = time.perf_counter()
    s = quantize_stage(
      src, method, paths[method], calibration=calibration, group=group, progress=False
    )
    print(f"{method}: {time.perf_counter() - t0:.1f} s; {s.text()}", flush=True)
  return paths


def sizes(params) -> dict:
  from model.checkpoint import param_bytes

  linear = {m: {n: a for n, a in d.items() if "kernel" in n} for m, d in params["h"].items()}
  return {"param_bytes": param_bytes(params), "linear_bytes": param_bytes(linear)}


def decode_timings(models: dict, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict:
  """ms per decode step at batch 1 and 16: (t(8 + new) - t(8)) / new, median over repeats;
  models: name -> (config, params)."""
  from model.decode import Decoder

  decoders = {
    name: Decoder(cfg.replace(eos_token_id=None), params, None, chunk=new_tokens + 8, max_batch=16)
    for name, (cfg, params) in models.items()
  }
  times: dict = {name: {b: {8: [], 8 + new_tokens: []} for b in (1, 16)} for name in models}
  for r in range(repeats + 1):  # the first round compiles and is not counted
    for b in (1, 16):
      for name, dec in decoders.items():
        for m in (8, 8 + new_tokens):
          t0 = time.perf_counter()
          out = dec.generate(prompts[:b], max_new_tokens=m)
          dt = time.perf_counter() - t0
          assert all(len(g.tokens) == m for g in out)
          if r:
            times[name][b][m].append(dt)
  result = {}
  for name in models:
    result[name] = {}
    for b in (1, 16):
      long, short = (statistics.median(times[name][b][m]) for m in (8 + new_tokens, 8))
      result[name][f"ms_per_step_b{b}"] = round(1000 * (long - short) / new_tokens, 3)
  return result


def demo_decode_timings(models: dict, tok, demo: str, new_tokens: int, repeats: int) -> dict:
  from rrtf_jax.stages.evaluate import problem_prompt
  from rrtf_jax.stages.sample import load_problems

  prompts = [
    tok.encode(problem_prompt(p, "rrtf"))
    for p in load_problems(os.path.join(demo, "problems", "heldout.jsonl"))
  ]
  return decode_timings(models, prompts, new_tokens, repeats)


MID = dict(
  vocab_size=8192,
  max_position_embeddings=1024,
  num_layers=8,
  embed_dim=512,
  num_heads=8,
  num_kv_heads=1,
  mlp_dim=2048,
  dtype="float32",
)


def mid_size(new_tokens: int, repeats: int) -> dict:
  """Decode timings where the weights are most of each step's memory traffic: a random
  26M-parameter model (benchmarks/decode.py's small size), fp32 / bf16 / int8 / int4 (RTN;
  GPTQ stores the same format, so it decodes at the same speed)."""
  import jax
  import numpy as np

  from model import ModelConfig, init_params
  from model.checkpoint import param_bytes
  from model.quantize import quantize_params

  cfg = ModelConfig(**MID)
  params = jax.tree.map(np.asarray, init_params(cfg, jax.random.PRNGKey(0)))
  models = {
    "fp32": (cfg, params),
    "bf16": (
      cfg.replace(param_dtype="bfloat16"),
      jax.tree.map(lambda a: a.astype("bfloat16"), params),
    ),
  }
  for method in ("int8", "int4-rtn"):
    qcfg, qp, _ = quantize_params(cfg, params, method, dtype="bfloat16")
    models[method] = (qcfg, qp)
  prompts = np.random.default_rng(0).integers(4, cfg.vocab_size, (16, 64)).tolist()
  out = decode_timings(models, prompts, new_tokens, repeats)
  for name, (_, p) in models.items():
    out[name]["param_bytes"] = param_bytes(p)
  return {
    "config": MID,
    "params": sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params)),
    "variants": out,
  }


def kl_to_fp32(models: dict, tok, demo: str) -> dict:
  """Mean KL(fp32 || variant) of next-token distributions over held-out prompt + reference
  tokens."""
  import jax
  import numpy as np

  from data.problems import read_jsonl
  from model.transformer import Transformer
  from rrtf_jax.stages.evaluate import problem_prompt
  from rrtf_jax.stages.sample import load_problems

  refs = {
    r["task_id"]: r["canonical_solution"]
    for _, r in read_jsonl(
      os.path.join(demo, "problems", "heldout.jsonl"), ("task_id", "canonical_solution")
    )
  }
  rows = [
    tok.encode(problem_prompt(p, "rrtf") + refs[p.task_id])[:192]
    for p in load_problems(os.path.join(demo, "problems", "heldout.jsonl"))
  ]
  t = max(map(len, rows))
  tokens, mask = np.zeros((len(rows), t), np.int32), np.zeros((len(rows), t), np.int32)
  for i, r in enumerate(rows):
    tokens[i, : len(r)], mask[i, : len(r)] = r, 1
  logp = {}
  for name, (cfg, params) in models.items():
    fn = jax.jit(
      lambda p, t, m, cfg=cfg: jax.nn.log_softmax(Transformer(cfg).apply({"params": p}, t, m))
    )
    logp[name] = np.concatenate(
      [
        np.asarray(fn(params, tokens[i : i + 32], mask[i : i + 32]))
        for i in range(0, len(rows), 32)
      ]
    )
  ref = logp["fp32"]
  w = mask.astype(bool)
  return {name: float((np.exp(ref) * (ref - lp)).sum(-1)[w].mean()) for name, lp in logp.items()}


def pass_at_1(paths: dict[str, str], models: dict, tok, demo: str, out: str) -> dict:
  from model.decode import Decoder
  from rrtf_jax.stages.evaluate import evaluate

  result = {}
  for name, path in paths.items():
    d = os.path.join(out, "eval", name)
    if os.path.exists(d):
      shutil.rmtree(d)
    s = evaluate(
      path,
      os.path.join(demo, "problems", "heldout.jsonl"),
      d,
      greedy=True,
      max_new_tokens=64,
      seed=0,
      decoder=Decoder(*models[name], tok, chunk=16, max_batch=64),
      progress=False,
    ).summary
    result[name] = {
      "pass@1": s["pass@k"]["pass@1"],
      "passed": s["outcomes"].get("passed", 0),
      "problems": s["problems"],
    }
  return result


def aot() -> list[dict]:
  from rrtf_jax.config_loading import load_config
  from rrtf_jax.plan import plan_decode

  rows = []
  for quant in ("none", "int8", "int4"):
    for b, ctx in AOT_CASES:
      r = plan_decode(
        load_config("starcoder_15b"), "v5e:1x1", batch_size=b, context=ctx, quant=quant
      ).to_dict()
      print(
        f"StarCoder-15B decode on v5e:1x1, {quant}, batch {b}, {ctx} tokens: "
        f"{'fits' if r['fits'] else 'does not fit'}",
        flush=True,
      )
      rows.append(
        {
          "quant": quant,
          **{
            k: r[k]
            for k in (
              "weights",
              "batch_size",
              "context",
              "params",
              "param_bytes",
              "cache_bytes",
              "argument_bytes",
              "temp_bytes",
              "total_bytes",
              "hbm_bytes",
              "fits",
              "compiler_error",
              "compile_seconds",
            )
          },
        }
      )
  return rows


def markdown(r: dict) -> str:
  gib, mib = 1 << 30, 1 << 20
  lines = [
    "# Quantized inference: our Table 4",
    "",
    f"{r['machine']}; {r['date']}. The demo's RRTF model ({r['model']}), its own variants; "
    f"int4 groups of {r['group']} input rows, GPTQ calibrated on {r['calibration']}. Every variant "
    "computes in float32 on CPU (the weights differ, nothing else); decode ms per step = "
    f"(t(8 + {r['new_tokens']} tokens) - t(8)) / {r['new_tokens']}, median of {r['repeats']}, "
    "variants interleaved.",
    "",
    "| weights | params | linear layers | ratio to fp32 | decode ms/step b=1 | b=16 | ratio b=1 | "
    "ratio b=16 | KL to fp32 | held-out pass@1 (greedy) |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  base = r["variants"]["fp32"]
  for name in VARIANTS:
    v = r["variants"][name]
    lines.append(
      f"| {name} | {v['param_bytes'] / 1024:.1f} KiB | {v['linear_bytes'] / 1024:.1f} KiB | "
      f"{v['param_bytes'] / base['param_bytes']:.2f} | {v['ms_per_step_b1']:.2f} | "
      f"{v['ms_per_step_b16']:.2f} | {v['ms_per_step_b1'] / base['ms_per_step_b1']:.2f} | "
      f"{v['ms_per_step_b16'] / base['ms_per_step_b16']:.2f} | {v['kl_to_fp32']:.2e} | "
      f"{v['pass@1']:.3f} ({v['passed']}/{v['problems']}) |"
    )
  lines += [
    "",
    "PanGu-Coder2's Table 4 (StarCoder-15B, GPU): "
    + "; ".join(f"{k} {gb} GB, {ms} ms/token, {p}" for k, (gb, ms, p) in PAPER.items())
    + ".",
  ]
  if r.get("mid_size"):
    m = r["mid_size"]
    c = m["config"]
    lines += [
      "",
      f"## Decode on CPU where the weights dominate: a random {m['params'] / 1e6:.0f}M-parameter "
      f"model ({c['num_layers']} layers, D {c['embed_dim']}, V {c['vocab_size']}, MQA)",
      "",
      "| weights | params | decode ms/step b=1 | b=16 | ratio b=1 | ratio b=16 |",
      "|---|---|---|---|---|---|",
    ]
    mb = m["variants"]["fp32"]
    for name, v in m["variants"].items():
      lines.append(
        f"| {name} | {v['param_bytes'] / 2**20:.1f} MiB | {v['ms_per_step_b1']:.2f} | "
        f"{v['ms_per_step_b16']:.2f} | {v['ms_per_step_b1'] / mb['ms_per_step_b1']:.2f} | "
        f"{v['ms_per_step_b16'] / mb['ms_per_step_b16']:.2f} |"
      )
  if r.get("aot"):
    lines += [
      "",
      "## StarCoder-15B decode on one v5e chip (16 GiB HBM), libtpu AOT (`rrtf plan --decode`)",
      "",
      "| weights | batch | context | weight bytes | KV cache | per-chip total | temporaries "
      "(the compiler's figure when it refuses) | verdict |",
      "|---|---|---|---|---|---|---|---|",
    ]
    for a in r["aot"]:
      total = (
        f"{a['total_bytes'] / gib:.2f} GiB"
        if not a["compiler_error"]
        else "refused by the compiler"
      )
      verdict = "fits" if a["fits"] else "does not fit"
      lines.append(
        f"| {a['weights']} | {a['batch_size']} | {a['context']} | {a['param_bytes'] / gib:.2f} GiB "
        f"| {a['cache_bytes'] / gib:.2f} GiB | {total} | {a['temp_bytes'] / mib:.1f} MiB | "
        f"{verdict} |"
      )
  return "\n".join(lines) + "\n"


def main():
  args = parse_args()
  if args.report_only:
    results_io.rewrite_markdown(args.out, markdown)
    return
  t0 = time.perf_counter()
  demo = demo_workdir(args)
  os.makedirs(args.workdir, exist_ok=True)
  paths = make_variants(demo, os.path.join(args.workdir, "variants"), args.group)
  from data.tokenizer import resolve_tokenizer
  from model import load_checkpoint
  from model.checkpoint import tokenizer_path

  # (config, params), read once
  models = {name: load_checkpoint(path) for name, path in paths.items()}
  tok = resolve_tokenizer(tokenizer_path(paths["fp32"]))
  variants = {name: sizes(params) for name, (_, params) in models.items()}
  for name, v in demo_decode_timings(models, tok, demo, args.new_tokens, args.repeats).items():
    variants[name].update(v)
  for name, kl in kl_to_fp32(models, tok, demo).items():
    variants[name]["kl_to_fp32"] = kl
  for name, v in pass_at_1(paths, models, tok, demo, args.workdir).items():
    variants[name].update(v)
  with open(os.path.join(paths["int4-gptq"], "quantization.json")) as f:
    gptq = json.load(f)
  import jax

  result = {
    "machine": f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), JAX "
    f"{jax.__version__} on {jax.default_backend()}",
    "date": time.strftime("%Y-%m-%d"),
    "demo_workdir": demo,
    "model": "configs/tiny.py: 2 layers, D 64, V 1024",
    "group": args.group,
    "calibration": f"{gptq['calibration_prompts']} RRTF-training problems",
    "gptq_calibration_error": gptq["calibration_error"],
    "rtn_calibration_error": gptq["rtn_calibration_error"],
    "new_tokens": args.new_tokens,
    "repeats": args.repeats,
    "variants": variants,
    "mid_size": mid_size(args.new_tokens, args.repeats),
    "aot": [] if args.skip_aot else aot(),
    "seconds": round(time.perf_counter() - t0, 1),
  }
  results_io.write(args.out, result, markdown)


if __name__ == "__main__":
  main()

"""CPU training-step throughput: our Flax model vs HF transformers' torch model, for three
families: GPTBigCode (StarCoder), Llama and Starcoder2.

A benchmark, never pass/fail. One forward + backward step (gradients w.r.t. all parameters of the
mean next-token cross-entropy over the batch) is timed for both implementations in the same run,
on the same random weights (HF model -> save_pretrained -> model.convert.convert_hf -> ours), both
in float32. The models share L, D, N, F, V, T and B and differ in their family's switches:
  gpt_bigcode  GPTBigCodeForCausalLM: multi-query (--kv-heads), learned positions, LayerNorm,
               GELU MLP, biases, tied head
  llama        LlamaForCausalLM: GQA (--gqa-kv-heads), RoPE, RMSNorm, gated SiLU MLP, no
               biases, untied head
  starcoder2   Starcoder2ForCausalLM: GQA, RoPE, LayerNorm, GELU MLP, biases, tied head, and a
               sliding window (--window) shorter than the sequence
Reported per model: median seconds per step over --steps after --warmup steps (the timed steps of
all six alternate, so background load affects them alike), tokens/s (B * T / step), the ratio
ours/HF, the JAX compile time (lower + compile of the jitted value_and_grad, timed separately
and excluded from the steps) and |loss ours - loss HF|. Torch and JAX threading are left at
their defaults and recorded. Results go to benchmarks/results/model_cpu.json (--quick:
model_cpu_quick.json).

Run from the repo root:
  JAX_PLATFORMS=cpu python benchmarks/model_cpu.py            # 4 layers, D 512, T 512, B 4
  JAX_PLATFORMS=cpu python benchmarks/model_cpu.py --quick    # smaller sizes, smoke run
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from importlib.metadata import version  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model  # noqa: E402
from model.convert import convert_hf  # noqa: E402
from rrtf_jax.plan import describe_model  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "model_cpu.json")


MODELS = ("gpt_bigcode", "llama", "starcoder2")


def parse_args():
  # The first paragraph of the docstring, as one line.
  p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
  p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {MODELS}")
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--d-model", type=int, default=512)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument(
    "--kv-heads", type=int, default=1, help="GPTBigCode: 1 = multi-query, or equal to --heads"
  )
  p.add_argument("--gqa-kv-heads", type=int, default=2, help="Llama and Starcoder2 kv heads")
  p.add_argument("--window", type=int, default=128, help="Starcoder2's sliding window")
  p.add_argument("--mlp", type=int, default=2048)
  p.add_argument("--vocab", type=int, default=49152)
  p.add_argument("--seq", "-T", type=int, default=512)
  p.add_argument("--batch", "-B", type=int, default=4)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--quick",
    action="store_true",
    help="smoke run: defaults become T 128, B 2, 2 layers, window 32, 3 steps, 1 warmup "
    "(flags still win)",
  )
  p.add_argument(
    "--out", default=RESULTS, help="JSON path (--quick writes model_cpu_quick.json by default)"
  )
  if p.parse_known_args()[0].quick:
    p.set_defaults(
      seq=128,
      batch=2,
      layers=2,
      window=32,
      steps=3,
      warmup=1,
      out=RESULTS.replace(".json", "_quick.json"),
    )
  a = p.parse_args()
  a.models = [m.strip() for m in a.models.split(",") if m.strip()]
  unknown = sorted(set(a.models) - set(MODELS))
  if unknown or not a.models:
    p.error(f"--models: unknown {unknown}; choose from {MODELS}")
  if a.kv_heads not in (1, a.heads):
    p.error("GPTBigCode supports --kv-heads 1 (multi-query) or --kv-heads == --heads")
  if a.heads % a.gqa_kv_heads:
    p.error(f"--gqa-kv-heads {a.gqa_kv_heads} must divide --heads {a.heads}")
  if not 0 < a.window < a.seq:
    p.error(f"--window {a.window} must be shorter than the sequence ({a.seq})")
  return a


def hf_config(name: str, a):
  """The HF config of model `name` at the benchmark's sizes (dropout off)."""
  common = dict(vocab_size=a.vocab, bos_token_id=0, eos_token_id=0)
  if name == "gpt_bigcode":
    return transformers.GPTBigCodeConfig(
      n_positions=a.seq,
      n_embd=a.d_model,
      n_layer=a.layers,
      n_head=a.heads,
      n_inner=a.mlp,
      multi_query=a.kv_heads == 1,
      activation_function="gelu_pytorch_tanh",
      resid_pdrop=0.0,
      embd_pdrop=0.0,
      attn_pdrop=0.0,
      tie_word_embeddings=True,
      **common,
    )
  llama_style = dict(
    hidden_size=a.d_model,
    intermediate_size=a.mlp,
    num_hidden_layers=a.layers,
    num_attention_heads=a.heads,
    num_key_value_heads=a.gqa_kv_heads,
    max_position_embeddings=a.seq,
    attention_dropout=0.0,
    **common,
  )
  if name == "llama":
    return transformers.LlamaConfig(
      hidden_act="silu", rms_norm_eps=1e-5, tie_word_embeddings=False, **llama_style
    )
  return transformers.Starcoder2Config(
    hidden_act="gelu_pytorch_tanh",
    norm_epsilon=1e-5,
    use_bias=True,
    sliding_window=a.window,
    residual_dropout=0.0,
    embedding_dropout=0.0,
    tie_word_embeddings=True,
    **llama_style,
  )


HF_CLASSES = {
  "gpt_bigcode": "GPTBigCodeForCausalLM",
  "llama": "LlamaForCausalLM",
  "starcoder2": "Starcoder2ForCausalLM",
}


def build_models(name: str, a, tmp):
  """HF model with random weights, and ours converted from its saved copy (same weights)."""
  torch.manual_seed(a.seed)
  hf = getattr(transformers, HF_CLASSES[name])(hf_config(name, a)).float()
  hf.save_pretrained(os.path.join(tmp, name, "hf"))
  convert_hf(os.path.join(tmp, name, "hf"), os.path.join(tmp, name, "ours"), progress=False)
  cfg, params = model.load_checkpoint(os.path.join(tmp, name, "ours"))
  assert cfg.family == name, (cfg.family, name)
  return hf, cfg.replace(dtype="float32"), params


def time_interleaved(steps_fns, steps, warmup):
  """Warms each step up, then alternates timed steps so background load hits all sides alike."""
  for fn in steps_fns:
    for _ in range(warmup):
      fn()
  times = [[] for _ in steps_fns]
  for _ in range(steps):
    for fn, ts in zip(steps_fns, times):
      t0 = time.perf_counter()
      fn()
      ts.append(time.perf_counter() - t0)
  return times


def hf_step(hf, tokens_np):
  """-> (step fn, first loss)."""
  hf.train()
  tokens = torch.from_numpy(tokens_np).long()
  mask = torch.ones_like(tokens)

  def loss_fn():
    logits = hf(input_ids=tokens, attention_mask=mask, use_cache=False).logits.float()  # [B, T, V]
    return torch.nn.functional.cross_entropy(
      logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)
    )

  def step():
    hf.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss

  return step, float(step().detach())


def ours_step(cfg, params, tokens_np):
  """-> (step fn, first loss, compile seconds)."""
  net = model.Transformer(cfg)
  tokens = jnp.asarray(tokens_np, jnp.int32)
  mask = jnp.ones_like(tokens)

  def loss_fn(p, tok, m):
    logits = net.apply({"params": p}, tok, m)  # [B, T, V] fp32
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jnp.take_along_axis(logp, tok[:, 1:, None], axis=-1).mean()

  t0 = time.perf_counter()
  compiled = jax.jit(jax.value_and_grad(loss_fn)).lower(params, tokens, mask).compile()
  compile_s = time.perf_counter() - t0

  def step():
    return jax.block_until_ready(compiled(params, tokens, mask))

  return step, float(step()[0]), compile_s


def main():
  a = parse_args()
  rng = np.random.default_rng(a.seed)
  tokens_np = rng.integers(0, a.vocab, size=(a.batch, a.seq), dtype=np.int64)
  print(
    f"sizes: L={a.layers} D={a.d_model} N={a.heads} F={a.mlp} V={a.vocab} T={a.seq} B={a.batch}"
    f"  gpt_bigcode K={a.kv_heads}; llama, starcoder2 K={a.gqa_kv_heads}; starcoder2 window="
    f"{a.window}  steps={a.steps} warmup={a.warmup}"
  )
  print(
    f"torch threads: {torch.get_num_threads()} (interop {torch.get_num_interop_threads()})  "
    f"jax devices: {jax.devices()}  os.cpu_count: {os.cpu_count()}"
  )
  runs = {}
  with tempfile.TemporaryDirectory() as tmp:
    for name in a.models:
      hf, cfg, params = build_models(name, a, tmp)
      print(f"[{name}] compiling ours (JAX), first steps ...", flush=True)
      jx_fn, jx_loss, compile_s = ours_step(cfg, params, tokens_np)
      hf_fn, hf_loss = hf_step(hf, tokens_np)
      runs[name] = dict(
        hf=hf, cfg=cfg, fns=(jx_fn, hf_fn), losses=(jx_loss, hf_loss), compile_s=compile_s
      )
  fns = [fn for r in runs.values() for fn in r["fns"]]
  print(
    f"timing {a.warmup} warmup + {a.steps} interleaved steps each of {len(fns)} ...", flush=True
  )
  times = time_interleaved(fns, a.steps, a.warmup)

  tokens = a.batch * a.seq
  models = {}
  rows = [("", "ours step s", "ours tok/s", "HF step s", "HF tok/s", "ours/HF", "|dloss|")]
  for i, (name, r) in enumerate(runs.items()):
    jx_times, hf_times = times[2 * i], times[2 * i + 1]
    jx_med, hf_med = statistics.median(jx_times), statistics.median(hf_times)
    jx_tps, hf_tps = tokens / jx_med, tokens / hf_med
    (jx_loss, hf_loss), hf, cfg = r["losses"], r["hf"], r["cfg"]
    models[name] = {
      "hf_class": HF_CLASSES[name],
      "model": describe_model(cfg),
      "params": sum(p.numel() for p in hf.parameters()),
      "ours": {
        "step_s_median": jx_med,
        "step_s_all": jx_times,
        "tokens_per_s": jx_tps,
        "loss": jx_loss,
        "compile_s": r["compile_s"],
        "attention": cfg.attention,
      },
      "hf": {
        "step_s_median": hf_med,
        "step_s_all": hf_times,
        "tokens_per_s": hf_tps,
        "loss": hf_loss,
        "attn_implementation": getattr(hf.config, "_attn_implementation", None),
      },
      "ratio_ours_over_hf": jx_tps / hf_tps,
      "abs_loss_diff": abs(jx_loss - hf_loss),
    }
    rows.append(
      (
        name,
        f"{jx_med:.3f}",
        f"{jx_tps:,.0f}",
        f"{hf_med:.3f}",
        f"{hf_tps:,.0f}",
        f"{jx_tps / hf_tps:.3f}",
        f"{abs(jx_loss - hf_loss):.1e}",
      )
    )
  w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  print()
  for r in rows:
    print("  ".join(c.ljust(w[0]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)))
  for name, m in models.items():
    print(f"[{name}] {m['model']}; JAX compile {m['ours']['compile_s']:.2f} s")

  result = {
    "benchmark": "model_cpu: forward+backward train step, float32, CPU, ours vs HF per family",
    "config": {
      "models": a.models,
      "layers": a.layers,
      "d_model": a.d_model,
      "heads": a.heads,
      "kv_heads_gpt_bigcode": a.kv_heads,
      "kv_heads_gqa": a.gqa_kv_heads,
      "window_starcoder2": a.window,
      "mlp": a.mlp,
      "vocab": a.vocab,
      "seq": a.seq,
      "batch": a.batch,
      "steps": a.steps,
      "warmup": a.warmup,
      "timing": "interleaved over every model's two steps",
      "quick": a.quick,
      "dtype": "float32",
    },
    "models": models,
    "env": {
      "python": platform.python_version(),
      "platform": platform.platform(),
      "processor": platform.processor(),
      "cpu_count": os.cpu_count(),
      "jax": jax.__version__,
      "jaxlib": version("jaxlib"),
      "flax": version("flax"),
      "torch": torch.__version__,
      "transformers": transformers.__version__,
      "numpy": np.__version__,
      "jax_devices": [str(d) for d in jax.devices()],
      "jax_platforms": os.environ.get("JAX_PLATFORMS"),
      "xla_flags": os.environ.get("XLA_FLAGS"),
      "torch_num_threads": torch.get_num_threads(),
      "torch_num_interop_threads": torch.get_num_interop_threads(),
      "threading": "defaults for both torch and JAX/XLA (nothing set by this script)",
    },
    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
  }
  os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
  with open(a.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {a.out}")


if __name__ == "__main__":
  main()

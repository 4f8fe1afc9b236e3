"""CPU training-step throughput: our Flax GPTBigCode vs HF transformers' torch
GPTBigCodeForCausalLM.

A benchmark, never pass/fail. One forward + backward step (gradients w.r.t. all parameters of the
mean next-token cross-entropy over the batch) is timed for both implementations in the same run,
on the same random weights (HF model -> save_pretrained -> model.convert.convert_hf -> ours), both
in float32. Reported: median seconds per step over --steps after --warmup steps (the timed steps
of the two alternate, so background load affects both alike), tokens/s (B * T / step), the ratio
ours/HF, and the JAX compile time (lower + compile of the jitted value_and_grad, timed separately
and excluded from the steps). Torch and JAX threading are left at their defaults and recorded.
Results go to benchmarks/results/model_cpu.json (--quick: model_cpu_quick.json).

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

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "model_cpu.json")


def parse_args():
  # The first paragraph of the docstring, as one line.
  p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--d-model", type=int, default=512)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--kv-heads", type=int, default=1, help="1 = multi-query, or equal to --heads")
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
    help="smoke run: defaults become T 128, B 2, 2 layers, 3 steps, 1 warmup (flags still win)",
  )
  p.add_argument(
    "--out", default=RESULTS, help="JSON path (--quick writes model_cpu_quick.json by default)"
  )
  if p.parse_known_args()[0].quick:
    p.set_defaults(
      seq=128, batch=2, layers=2, steps=3, warmup=1, out=RESULTS.replace(".json", "_quick.json")
    )
  a = p.parse_args()
  if a.kv_heads not in (1, a.heads):
    p.error("GPTBigCode supports --kv-heads 1 (multi-query) or --kv-heads == --heads")
  return a


def build_models(a, tmp):
  """HF model with random weights, and ours converted from its saved copy (same weights)."""
  hf_cfg = transformers.GPTBigCodeConfig(
    vocab_size=a.vocab,
    n_positions=a.seq,
    n_embd=a.d_model,
    n_layer=a.layers,
    n_head=a.heads,
    n_inner=a.mlp,
    multi_query=a.kv_heads == 1,
    activation_function="gelu_pytorch_tanh",
    bos_token_id=0,
    eos_token_id=0,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    tie_word_embeddings=True,
  )
  torch.manual_seed(a.seed)
  hf = transformers.GPTBigCodeForCausalLM(hf_cfg).float()
  hf.save_pretrained(os.path.join(tmp, "hf"))
  convert_hf(os.path.join(tmp, "hf"), os.path.join(tmp, "ours"), progress=False)
  cfg, params = model.load_checkpoint(os.path.join(tmp, "ours"))
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
  with tempfile.TemporaryDirectory() as tmp:
    hf, cfg, params = build_models(a, tmp)
  n_params = sum(p.numel() for p in hf.parameters())
  print(
    f"config: L={a.layers} D={a.d_model} N={a.heads} K={a.kv_heads} F={a.mlp} V={a.vocab} "
    f"T={a.seq} B={a.batch}  params={n_params / 1e6:.1f}M  steps={a.steps} warmup={a.warmup}"
  )
  print(
    f"torch threads: {torch.get_num_threads()} (interop {torch.get_num_interop_threads()})  "
    f"jax devices: {jax.devices()}  os.cpu_count: {os.cpu_count()}"
  )

  print("compiling ours (JAX), first steps ...", flush=True)
  jx_fn, jx_loss, compile_s = ours_step(cfg, params, tokens_np)
  hf_fn, hf_loss = hf_step(hf, tokens_np)
  print(f"timing {a.warmup} warmup + {a.steps} interleaved steps each ...", flush=True)
  jx_times, hf_times = time_interleaved([jx_fn, hf_fn], a.steps, a.warmup)

  tokens = a.batch * a.seq
  hf_med, jx_med = statistics.median(hf_times), statistics.median(jx_times)
  hf_tps, jx_tps = tokens / hf_med, tokens / jx_med
  rows = [
    ("", "step s (median)", "tokens/s", "loss"),
    ("ours (JAX/Flax)", f"{jx_med:.3f}", f"{jx_tps:,.0f}", f"{jx_loss:.5f}"),
    ("HF torch", f"{hf_med:.3f}", f"{hf_tps:,.0f}", f"{hf_loss:.5f}"),
  ]
  w = [max(len(r[i]) for r in rows) for i in range(4)]
  print()
  for r in rows:
    print("  ".join(c.ljust(w[0]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)))
  print(f"ratio ours/HF (tokens/s): {jx_tps / hf_tps:.3f}")
  print(f"JAX compile (lower+compile): {compile_s:.2f} s")
  print(f"|loss ours - loss HF|: {abs(jx_loss - hf_loss):.2e}")

  result = {
    "benchmark": "model_cpu: forward+backward train step, float32, CPU",
    "config": {
      "layers": a.layers,
      "d_model": a.d_model,
      "heads": a.heads,
      "kv_heads": a.kv_heads,
      "mlp": a.mlp,
      "vocab": a.vocab,
      "seq": a.seq,
      "batch": a.batch,
      "steps": a.steps,
      "warmup": a.warmup,
      "timing": "interleaved",
      "quick": a.quick,
      "params": n_params,
      "dtype": "float32",
    },
    "ours": {
      "step_s_median": jx_med,
      "step_s_all": jx_times,
      "tokens_per_s": jx_tps,
      "loss": jx_loss,
      "compile_s": compile_s,
    },
    "hf": {
      "step_s_median": hf_med,
      "step_s_all": hf_times,
      "tokens_per_s": hf_tps,
      "loss": hf_loss,
      "attn_implementation": getattr(hf.config, "_attn_implementation", None),
    },
    "ratio_ours_over_hf": jx_tps / hf_tps,
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

"""The RRTF train step: CPU throughput and MFU estimate, and StarCoder-15B TPU plans from libtpu.

A benchmark, never pass/fail. Two parts, one JSON (benchmarks/results/train_step.json, plus a
Markdown summary beside it):

cpu  The real jitted train step of rrtf_jax/train_step.py (forward, backward over the RRTF loss,
     AdamW; state donated) on one CPU device, mesh fsdp=1, random init, for
       tiny: configs/tiny.py as shipped (L2 D64 N4 K1 F256 V1024, fp32), B=8 prompts, R=4, T=256;
       mid:  tiny with L4 D512 N8 F2048 V8192, B=1 prompt, R=4, T=512 (fp32, 15M parameters),
             learning rate 1e-3 (tiny's 3e-3 is too high at this width).
     A synthetic batch: per prompt T/2 prompt tokens shared by its R responses, each sequence
     real for a length drawn uniformly in [0.8T, T] (~90% real), random tokens, scores, response
     0 a teacher. The same batch every step, so the loss must fall (memorisation: a sanity check).
     Reported: compile seconds (lower + compile), the median step of --steps timed steps after
     --warmup (block_until_ready on the metrics), tokens/s over all B*R*T positions and over the
     real ones, analytic model FLOPs per step (rrtf_jax.plan.train_flops over every position:
     the step computes padding too) and an MFU estimate = achieved FLOP/s / the CPU's measured
     fp32 matmul FLOP/s: a jitted N x N @ N x N (the baseline), --matmul-reps of them timed
     after every timed step, so that background load on this shared 2-CPU machine hits both
     alike; each config's MFU uses the median of the matmuls interleaved with its own steps.
     Not a vendor peak: a ratio to what this machine's XLA does on one large matmul.

tpu  `rrtf plan` (libtpu AOT compile, no TPU needed) of configs/starcoder_15b.py (512 prompts x
     R=4 x 2048 tokens, remat full, bf16 compute, fp32 master weights and AdamW moments) on
     v4-64 (v4:2x4x4, 32 chips, 64 devices), v5e-256 (v5e:16x16) and v5p-128 (v5p:4x4x4, 64
     chips), all devices on fsdp. train.microbatches per topology so a micro-batch splits over
     the devices. Reported: analytic FLOPs per step and per chip, the compiled executable's
     per-device bytes (arguments, temporaries, total) against HBM, fits, compile seconds, and
     an ideal step time = FLOPs / (chips x public peak bf16 FLOP/s): a lower bound at 100% MFU,
     not a measurement. A topology whose compiler refuses keeps its verdict and message; v4-64
     gets two labelled variants too: JAX's splash attention, and a fsdp=16,tensor=4 mesh (what
     the compiler said of each is in results/train_step.md).

Run from the repo root (the TPU part compiles the 15.5B-parameter step once per target):
  python benchmarks/train_step.py                 # both parts
  python benchmarks/train_step.py --only cpu      # or --skip-tpu; keeps the file's tpu part
  python benchmarks/train_step.py --only tpu      # keeps the file's cpu part
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # CPU steps; TPU plans compile from this host

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from importlib.metadata import PackageNotFoundError, version  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import results_io  # noqa: E402  (benchmarks/, this script's directory)
from model.sharding import LOGICAL_RULES, make_mesh  # noqa: E402
from rrtf_jax import train_step as train  # noqa: E402
from rrtf_jax.config_loading import load_config  # noqa: E402
from rrtf_jax.plan import train_flops  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "train_step.json")

# name -> (config, overrides); B, T and R come from the overrides (R is the config's: 4)
CPU_CONFIGS = {
  "tiny": ("tiny", []),
  "mid": (
    "tiny",
    [
      "model.num_layers=4",
      "model.embed_dim=512",
      "model.num_heads=8",
      "model.mlp_dim=2048",
      "model.vocab_size=8192",
      "train.seq_len=512",
      "train.batch_size=1",
      "train.learning_rate=1e-3",
    ],
  ),  # tiny's 3e-3 is too high at D512
}
# name -> (topology, train.microbatches, public peak bf16 FLOP/s per chip, further overrides)
TPU_TARGETS = {
  "v4-64": ("v4:2x4x4", 8, 275e12, []),
  "v5e-256": ("v5e:16x16", 2, 197e12, []),
  "v5p-128": ("v5p:4x4x4", 8, 459e12, []),
  # the same step with JAX's splash kernels, for when our Pallas kernel does not fit v4's VMEM
  "v4-64 splash": ("v4:2x4x4", 8, 275e12, ["model.attention=splash"]),
  # and with 4-way tensor parallelism, 32 micro-batches, for when one prompt per device does not fit
  "v4-64 tensor=4": ("v4:2x4x4", 32, 275e12, ["mesh=fsdp=16,tensor=4"]),
}
TPU_CONFIG = "starcoder_15b"


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument(
    "--only", choices=("cpu", "tpu"), help="run one part; the other is kept from --out if there"
  )
  p.add_argument("--skip-tpu", action="store_true", help="same as --only cpu")
  p.add_argument("--configs", nargs="+", default=list(CPU_CONFIGS), choices=list(CPU_CONFIGS))
  p.add_argument("--targets", nargs="+", default=list(TPU_TARGETS), choices=list(TPU_TARGETS))
  p.add_argument(
    "--steps", type=int, default=7, help="timed steps per CPU config (median reported)"
  )
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
  p.add_argument("--matmul", type=int, default=2048, help="N of the N x N fp32 matmul baseline")
  p.add_argument("--matmul-reps", type=int, default=2, help="timed matmuls after each timed step")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=RESULTS, help="JSON path; Markdown goes beside it (.md)")
  p.add_argument(
    "--report-only", action="store_true", help="rewrite the Markdown from --out's JSON, run nothing"
  )
  a = p.parse_args()
  if a.skip_tpu:
    if a.only == "tpu":
      p.error("--skip-tpu contradicts --only tpu")
    a.only = "cpu"
  return a


def _ver(pkg: str) -> str | None:
  try:
    return version(pkg)
  except PackageNotFoundError:
    return None


def env_info() -> dict:
  return {
    "python": platform.python_version(),
    "platform": platform.platform(),
    "processor": platform.processor(),
    "cpu_count": os.cpu_count(),
    "jax": jax.__version__,
    "jaxlib": _ver("jaxlib"),
    "flax": _ver("flax"),
    "optax": _ver("optax"),
    "libtpu": _ver("libtpu"),
    "numpy": np.__version__,
    "jax_devices": [str(d) for d in jax.devices()],
    "jax_platforms": os.environ.get("JAX_PLATFORMS"),
    "xla_flags": os.environ.get("XLA_FLAGS"),
    "threading": "XLA defaults (nothing set by this script)",
    "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
  }


# ---- part 1: CPU -------------------------------------------------------------------------------


def matmul_timer(n: int):
  """-> timer(reps): seconds per jitted fp32 n x n @ n x n, each blocked on (compiled and warmed
  here)."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(1))
  a = jax.random.normal(k1, (n, n), jnp.float32)
  b = jax.random.normal(k2, (n, n), jnp.float32)
  f = jax.jit(jnp.matmul)
  f(a, b).block_until_ready()
  f(a, b).block_until_ready()

  def timer(reps: int) -> list[float]:
    out = []
    for _ in range(reps):
      t0 = time.perf_counter()
      f(a, b).block_until_ready()
      out.append(time.perf_counter() - t0)
    return out

  return timer


def synthetic_batch(b: int, r: int, t: int, vocab: int, seed: int) -> dict:
  """Prompt = first t/2 tokens (shared by a prompt's responses); real length ~U[0.8t, t]."""
  rng = np.random.default_rng(seed)
  prompt_len = t // 2
  seqs = rng.integers(4, vocab, size=(b, r, t + 1), dtype=np.int32)  # ids 0-3 are special in tiny
  seqs[:, :, :prompt_len] = seqs[:, :1, :prompt_len]
  lengths = rng.integers(int(0.8 * t), t + 1, size=(b, r))  # real input positions per sequence
  pos = np.arange(t)
  real = pos[None, None, :] < lengths[:, :, None]
  inputs = np.where(real, seqs[:, :, :t], 0).astype(np.int32)
  targets = np.where(real, seqs[:, :, 1:], 0).astype(np.int32)
  loss_mask = (real & (pos[None, None, :] >= prompt_len - 1)).astype(np.float32)  # response targets
  # distinct per prompt
  scores = np.stack([rng.permutation(r) for _ in range(b)]).astype(np.float32)
  is_teacher = np.zeros((b, r), bool)
  is_teacher[:, 0] = True
  return {
    "inputs": inputs,
    "targets": targets,
    "loss_mask": loss_mask,
    "segment_ids": real.astype(np.int32),
    "scores": scores,
    "is_teacher": is_teacher,
  }


def run_cpu_config(name: str, cfg_name: str, overrides: list[str], a, matmul) -> dict:
  config = load_config(cfg_name, [f"--config.{o}" for o in overrides])
  model_cfg = train.validate_config(config)
  train_cfg = config.train
  b, r, t = int(train_cfg.batch_size), int(train_cfg.responses), int(train_cfg.seq_len)
  mesh = make_mesh("fsdp=1", jax.devices()[:1])
  train.check_batch_layout(train_cfg, mesh)
  tx = train.make_optimizer(train_cfg)
  abstract, shard = train.state_shardings(model_cfg, tx, mesh)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
  print(
    f"[{name}] {cfg_name} {' '.join(overrides) or '(as shipped)'}: L={model_cfg.num_layers} "
    f"D={model_cfg.embed_dim} N={model_cfg.num_heads} K={model_cfg.num_kv_heads} "
    f"F={model_cfg.mlp_dim} V={model_cfg.vocab_size} {model_cfg.dtype}; B={b} R={r} T={t} "
    f"M={train_cfg.microbatches}; {n_params / 1e6:.2f}M params",
    flush=True,
  )
  host = synthetic_batch(b, r, t, model_cfg.vocab_size, a.seed)
  b_shard = train.batch_shardings(mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    state = train._initial_state(config, model_cfg, tx, abstract, shard, mesh)
    batch = {
      k: jax.device_put(np.asarray(v, train.BATCH_DTYPES[k]), b_shard[k]) for k, v in host.items()
    }
    jax.block_until_ready((state, batch))
    t0 = time.perf_counter()
    step = train.jit_train_step(model_cfg, train_cfg, tx, mesh, shard).lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    losses, times, mm = [], [], []
    for i in range(a.warmup + a.steps):
      t0 = time.perf_counter()
      state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
      dt = time.perf_counter() - t0
      losses.append(float(metrics["loss"]))
      if i >= a.warmup:
        times.append(dt)
        mm += matmul(a.matmul_reps)
    last = {k: float(v) for k, v in metrics.items()}
  med = statistics.median(times)
  tokens, real_tokens = b * r * t, int(host["segment_ids"].sum())
  flops = train_flops(model_cfg, b * r, t)
  mm_flops = 2.0 * a.matmul**3
  mm_med = statistics.median(mm)
  mfu = flops / med / (mm_flops / mm_med)
  print(
    f"[{name}] compile {compile_s:.2f} s; step median {med:.4f} s (min {min(times):.4f}, max "
    f"{max(times):.4f}); {tokens / med:,.0f} tokens/s ({real_tokens / med:,.0f} real); {flops:.3e} "
    f"FLOPs/step = {flops / med / 1e9:.2f} GFLOP/s; matmul baseline {mm_flops / mm_med / 1e9:.2f} "
    f"GFLOP/s; MFU estimate {mfu:.1%}; loss {losses[0]:.4f} -> {losses[-1]:.4f}",
    flush=True,
  )
  return {
    "config": cfg_name,
    "overrides": overrides,
    "params": n_params,
    "model": {
      k: getattr(model_cfg, k)
      for k in (
        "num_layers",
        "embed_dim",
        "num_heads",
        "num_kv_heads",
        "mlp_dim",
        "vocab_size",
        "dtype",
        "param_dtype",
        "remat",
      )
    },
    "attention": str(model_cfg.attention),
    "batch_size": b,
    "responses": r,
    "seq_len": t,
    "microbatches": int(train_cfg.microbatches),
    "logprob_chunk": int(train_cfg.logprob_chunk),
    "tokens_per_step": tokens,
    "real_tokens_per_step": real_tokens,
    "response_tokens_per_step": int(host["loss_mask"].sum()),
    "compile_s": compile_s,
    "warmup": a.warmup,
    "steps": a.steps,
    "step_s_median": med,
    "step_s_all": times,
    "tokens_per_s": tokens / med,
    "real_tokens_per_s": real_tokens / med,
    "flops_per_step": flops,
    "achieved_flops_per_s": flops / med,
    "matmul_s_interleaved": mm,
    "matmul_flops_per_s": mm_flops / mm_med,
    "mfu_estimate": mfu,
    "loss_per_step": losses,
    "loss_fell": losses[-1] < losses[0],
    "last_metrics": last,
  }


def run_cpu(a) -> dict:
  n = a.matmul
  matmul = matmul_timer(n)
  configs = {name: run_cpu_config(name, *CPU_CONFIGS[name], a, matmul) for name in a.configs}
  mm_flops = 2.0 * n**3
  every = [s for c in configs.values() for s in c["matmul_s_interleaved"]]
  med = statistics.median(every)
  print(
    f"matmul baseline over all configs: {mm_flops / med / 1e9:.2f} GFLOP/s (median of "
    f"{len(every)}: {med * 1e3:.1f} ms; fastest {mm_flops / min(every) / 1e9:.2f} GFLOP/s)",
    flush=True,
  )
  return {
    "device": str(jax.devices()[0]),
    "mesh": "fsdp=1 (one CPU device)",
    "batch": "synthetic: prompt = first T/2 tokens shared by its R responses; real length "
    "~U[0.8T, T]; random tokens; distinct scores per prompt; response 0 the teacher; the same "
    "batch every step",
    "flops": "rrtf_jax.plan.train_flops(model, B*R, T): 3x forward matmuls + unmasked attention "
    "over every position (padding is computed too)",
    "matmul_baseline": {
      "n": n,
      "dtype": "float32",
      "flops": mm_flops,
      "reps_after_each_step": a.matmul_reps,
      "s_median_all": med,
      "flops_per_s_all": mm_flops / med,
      "flops_per_s_fastest": mm_flops / min(every),
    },
    "mfu_definition": "achieved model FLOP/s (analytic FLOPs / median step) / the matmul FLOP/s "
    "(median of the matmuls interleaved with that config's timed steps)",
    "configs": configs,
    "env": env_info(),
  }


# ---- part 2: TPU plans -------------------------------------------------------------------------


def _keep_compiler_errors(raw: list[str]) -> None:
  """rrtf_jax.plan keeps one phrase of a refusal; wrap its _refused_plan to keep the whole message
  too."""
  import rrtf_jax.plan as plan_mod

  refused = plan_mod._refused_plan

  def keep(common, state_abs, error, secs):
    raw.append(" ".join(str(error).split()))
    return refused(common, state_abs, error, secs)

  plan_mod._refused_plan = keep


def run_tpu(a) -> dict:
  from rrtf_jax.plan import PlanError, plan, topology_devices

  out, raw = {}, []
  _keep_compiler_errors(raw)
  for name in a.targets:
    topology, micro, peak, extra = TPU_TARGETS[name]
    config = load_config(
      TPU_CONFIG, [f"--config.train.microbatches={micro}"] + [f"--config.{o}" for o in extra]
    )
    devices = topology_devices(topology)
    chips = len({tuple(getattr(d, "coords", (d.id,))) for d in devices})
    print(
      f"[{name}] planning {TPU_CONFIG} on {topology} ({len(devices)} devices, {chips} chips), "
      f"microbatches={micro} ...",
      flush=True,
    )
    row = {
      "topology": topology,
      "chips": chips,
      "microbatches": micro,
      "overrides": extra,
      "peak_bf16_flops_per_chip": peak,
    }
    raw.clear()
    try:
      p = plan(config, topology)
    except PlanError as e:
      row.update(error=str(e))
      print(f"[{name}] plan error: {e}", flush=True)
      out[name] = row
      continue
    print(p.report(), flush=True)
    if p.compiler_error and raw:
      row["compiler_message"] = raw[-1][:4000]
      print(f"[{name}] the compiler's message: {row['compiler_message']}", flush=True)
    d = p.to_dict()
    ideal = p.flops_per_step / (chips * peak)
    row.update(
      d,
      flops_per_chip=p.flops_per_step / chips,
      flops_per_device=p.flops_per_step / p.num_devices,
      prompts_per_device_per_microbatch=p.batch_size // micro // p.num_devices,
      ideal_step_s_lower_bound=ideal,
      ideal_tokens_per_s_upper_bound=p.batch_size * p.responses * p.seq_len / ideal,
    )
    print(
      f"[{name}] ideal step at {peak / 1e12:.0f} TFLOP/s x {chips} chips (100% MFU, a lower "
      f"bound): {ideal:.2f} s\n",
      flush=True,
    )
    out[name] = row
  return {
    "config": TPU_CONFIG,
    "targets": out,
    "ideal_step_note": "ideal_step_s_lower_bound = flops_per_step / (chips * public peak bf16 "
    "FLOP/s per chip): the step at 100% MFU, a lower bound, not a measurement (no TPU was used)",
    "bytes_note": "argument/output/alias/temp/code/total/hbm bytes are per device, from the "
    "compiled executable's memory_analysis (libtpu AOT); v4 has 2 devices (TensorCores) per chip",
    "env": env_info(),
  }


# ---- report ------------------------------------------------------------------------------------


def _gib(x: float) -> str:
  return f"{x / (1 << 30):.2f} GiB"


def _verdict(r: dict) -> str:
  if r["fits"]:
    return f"yes ({r['total_bytes'] / r['hbm_bytes']:.0%})"
  if not r.get("compiler_error"):
    return "no (over HBM)"
  import re

  msg = r.get("compiler_message", r["compiler_error"])
  used = re.search(
    r"Ran out of memory in memory space (\w+)\. (Used [^.]+\.\d+\w? of [^.]+\.\d+\w? \w+)", msg
  )
  op = re.search(r'op_name="[^"]*/(\w+)/pallas_call"', msg)
  if used:
    return f"no, compiler refused: out of {used.group(1)}, {used.group(2)}" + (
      f" in {op.group(1)}" if op else ""
    )
  return f"no, compiler refused: {r['compiler_error']}"


def markdown(result: dict) -> str:
  lines = ["# RRTF train step", ""]
  cpu = result.get("cpu")
  if cpu:
    mm = cpu["matmul_baseline"]
    lines += [
      f"CPU, one device ({cpu['env']['cpu_count']} CPUs, jax {cpu['env']['jax']}, "
      f"{cpu['env']['date']}). Baseline in the same run: jitted fp32 {mm['n']}x{mm['n']} matmul, "
      f"{mm['reps_after_each_step']} timed after every timed step. MFU estimate = analytic model "
      "FLOP/s / the median matmul FLOP/s interleaved with that config's steps (a ratio to this "
      "machine's matmul, not a vendor peak).",
      "",
      "| config | params | B x R x T | compile s | step s (median) | tokens/s | real tokens/s | "
      "FLOPs/step | GFLOP/s | matmul GFLOP/s | MFU est. | loss first -> last |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in cpu["configs"].items():
      m = c["model"]
      desc = (
        f"{name} (L{m['num_layers']} D{m['embed_dim']} N{m['num_heads']} F{m['mlp_dim']} "
        f"V{m['vocab_size']} {m['dtype']})"
      )
      lines.append(
        f"| {desc} | {c['params'] / 1e6:.2f}M | {c['batch_size']} x {c['responses']} x "
        f"{c['seq_len']} | {c['compile_s']:.1f} | {c['step_s_median']:.3f} | "
        f"{c['tokens_per_s']:,.0f} | {c['real_tokens_per_s']:,.0f} | {c['flops_per_step']:.3e} | "
        f"{c['achieved_flops_per_s'] / 1e9:.1f} | {c['matmul_flops_per_s'] / 1e9:.1f} | "
        f"{c['mfu_estimate']:.0%} | "
        f"{c['loss_per_step'][0]:.3f} -> {c['loss_per_step'][-1]:.3f} |"
      )
    lines.append("")
  tpu = result.get("tpu")
  if tpu:
    lines += [
      f"TPU plans of `{tpu['config']}` (libtpu {tpu['env']['libtpu']} AOT from this CPU host, "
      f"{tpu['env']['date']}). Bytes per device (v4: 2 devices per chip, 16 GiB HBM each). The "
      "ideal step is FLOPs / (chips x public peak bf16), a lower bound at 100% MFU, not a "
      "measurement.",
      "",
      "| target | topology | chips (devices) | mesh | micro-batches | attention | FLOPs/step | "
      "FLOPs/chip | args | temps | total | HBM | fits | compile s | ideal step s (lower bound) |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in tpu["targets"].items():
      if "error" in r:
        lines.append(
          f"| {name} | {r['topology']} | {r['chips']} | {r['microbatches']} | plan error: "
          f"{r['error']} |"
        )
        continue
      refused = bool(r["compiler_error"])
      mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1)
      lines.append(
        f"| {name} | {r['topology']} | {r['chips']} ({r['num_devices']}) | {mesh} | "
        f"{r['microbatches']} | {r['attention']} | {r['flops_per_step']:.3e} | "
        f"{r['flops_per_chip']:.3e} | {_gib(r['argument_bytes'])} | "
        f"{'-' if refused else _gib(r['temp_bytes'])} | "
        f"{'-' if refused else _gib(r['total_bytes'])} | "
        f"{_gib(r['hbm_bytes']) if r['hbm_bytes'] else '?'} | {_verdict(r)} | "
        f"{r['compile_seconds']:.0f} | {r['ideal_step_s_lower_bound']:.2f} |"
      )
    lines.append("")
  return "\n".join(lines)


def main():
  a = parse_args()
  if a.report_only:
    results_io.rewrite_markdown(a.out, markdown)
    return
  result = {
    "benchmark": "train_step: RRTF train step, CPU tokens/s and MFU estimate; StarCoder-15B TPU "
    "plans"
  }
  if a.only and os.path.exists(a.out):
    with open(a.out) as f:
      old = json.load(f)
    result.update({k: old[k] for k in ("cpu", "tpu") if k in old})
  if a.only in (None, "cpu"):
    result["cpu"] = run_cpu(a)
  if a.only in (None, "tpu"):
    result["tpu"] = run_tpu(a)
  result["env"] = env_info()
  results_io.write(a.out, result, markdown)


if __name__ == "__main__":
  main()

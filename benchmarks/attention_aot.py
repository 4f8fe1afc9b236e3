"""Attention on TPU, compiled ahead of time from a CPU host: memory, FLOPs and compile time.

A benchmark, never pass/fail. For each sequence length T (--seq-lens, default 2048 4096 8192)
and each implementation of `model.attention.dot_product_attention` -- pallas (ours, Mosaic),
splash (JAX's splash kernels) and xla (plain einsum reference) -- the forward + backward pass
(jax.value_and_grad w.r.t. q, k, v of sum(out.astype(f32)**2)) at StarCoder's attention shape
(B=1, N=48 query heads, K=1 kv head, H=128, bf16, causal, segment ids all ones) is lowered and
compiled with libtpu for an abstract TPU topology (--topology, default v5p:2x2x1, 4 devices) on a
mesh tensor=4: q sharded over heads, k/v/segment ids replicated; Pallas kernels run under the
dispatch's shard_map. No TPU is needed or used. Reported per implementation: XLA's
memory_analysis (temporaries, arguments, outputs; per device), cost_analysis FLOPs (per device;
our kernels carry a pl.CostEstimate), compile seconds, whether the compiled HLO holds a Mosaic
kernel ("tpu_custom_call"), next to the [N/4, T, T] fp32 score bytes per device that plain
attention would materialise. A compile failure (e.g. out of HBM) is recorded as one line.

Then, informational only: CPU wall time of our kernel in Pallas *interpret mode* (B=1, T=512,
N=8, K=1, H=64, fp32, causal), forward and forward+backward, median of 3 after a warm-up, with
model.attention.xla_attention on the same inputs as a same-run baseline. Interpret-mode time says
nothing about TPU speed.

Run from the repo root:
  python benchmarks/attention_aot.py            # results/attention_aot.{md,json}
  python benchmarks/attention_aot.py --quick    # T=2048 only, no CPU timing; *_quick.{md,json}
"""

import os

# compile for TPU from this host; topology_devices quiets libtpu
os.environ["JAX_PLATFORMS"] = "cpu"

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
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import attention, sharding  # noqa: E402
from model.flash_attention import flash_attention  # noqa: E402
from rrtf_jax.plan import topology_devices  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
IMPLS = tuple(i for i in attention.IMPLEMENTATIONS if i != "auto")  # each kernel, not the dispatch
B, N, K, H = 1, 48, 1, 128


def _ver(pkg):
  try:
    return version(pkg)
  except PackageNotFoundError:
    return None


def _loss(impl):
  def f(q, k, v, seg):
    out = attention.dot_product_attention(
      q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=True, sm_scale=H**-0.5, impl=impl
    )
    return jnp.sum(out.astype(jnp.float32) ** 2)

  return jax.value_and_grad(f, argnums=(0, 1, 2))


def aot_one(impl, t, mesh):
  rep = NamedSharding(mesh, P())
  args = (
    jax.ShapeDtypeStruct(
      (B, t, N, H), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, None, "tensor", None))
    ),
    jax.ShapeDtypeStruct((B, t, K, H), jnp.bfloat16, sharding=rep),
    jax.ShapeDtypeStruct((B, t, K, H), jnp.bfloat16, sharding=rep),
    jax.ShapeDtypeStruct((B, t), jnp.int32, sharding=rep),
  )
  shards = mesh.shape["tensor"]
  row = dict(T=t, impl=impl, score_bytes_per_device=(N // shards) * t * t * 4 * B)
  t0 = time.perf_counter()
  try:
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
      compiled = jax.jit(_loss(impl)).lower(*args).compile()
  except Exception as e:  # noqa: BLE001  (recorded, not raised: e.g. out of HBM)
    msg = f"{type(e).__name__}: {str(e).strip()}"
    row.update(
      error=msg.splitlines()[0][:300], error_full=msg[:4000], compile_s=time.perf_counter() - t0
    )
    return row
  row["compile_s"] = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  for key in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes"):
    row[key] = getattr(mem, key, None) if mem is not None else None
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  row["flops_per_device"] = (cost or {}).get("flops")
  row["mosaic_kernel"] = "tpu_custom_call" in compiled.as_text()
  return row


def _median_s(fn, *args, reps=3):
  jax.block_until_ready(fn(*args))  # warm-up (and compile)
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times), times


def cpu_interpret_timing():
  b, t, n, kh, h = 1, 512, 8, 1, 64
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(ks[0], (b, t, n, h), jnp.float32)
  k, v = (jax.random.normal(x, (b, t, kh, h), jnp.float32) for x in ks[1:])
  seg = jnp.ones((b, t), jnp.int32)
  fns = {
    "pallas_interpret": lambda q, k, v: flash_attention(q, k, v, causal=True),
    "xla": lambda q, k, v: attention.xla_attention(
      q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=True, sm_scale=h**-0.5
    ),
  }
  res = dict(
    shape=dict(B=b, T=t, N=n, K=kh, H=h, dtype="float32", causal=True),
    reps=3,
    warmup=1,
    note="Pallas interpret mode on CPU: says nothing about TPU speed",
  )
  for name, f in fns.items():
    grad = jax.jit(
      jax.value_and_grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) ** 2), argnums=(0, 1, 2))
    )
    fwd_s, fwd_all = _median_s(jax.jit(f), q, k, v)
    bwd_s, bwd_all = _median_s(grad, q, k, v)
    res[name] = dict(fwd_s=fwd_s, fwd_s_all=fwd_all, fwd_bwd_s=bwd_s, fwd_bwd_s_all=bwd_all)
  res["ratio_pallas_interpret_over_xla"] = {
    m: res["pallas_interpret"][m] / res["xla"][m] for m in ("fwd_s", "fwd_bwd_s")
  }
  return res


def _mib(x):
  return "-" if x is None else f"{x / 2**20:,.1f} MiB"


def markdown(rows, topo, shards):
  out = [
    f"AOT compile for TPU `{topo}` (mesh tensor={shards}), fwd+bwd, B={B} N={N} K={K} H={H} bf16 "
    "causal; bytes and FLOPs per device.",
    "",
    "| T | impl | temp | args | outputs | FLOPs/device | compile s | Mosaic kernel | avoided "
    "scores [N/4,T,T] f32 |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    if "error" in r:
      cells = [f"FAILED: {r['error'].replace('|', '/')}", "", "", "", f"{r['compile_s']:.1f}", "-"]
    else:
      fl = r["flops_per_device"]
      cells = [
        _mib(r["temp_size_in_bytes"]),
        _mib(r["argument_size_in_bytes"]),
        _mib(r["output_size_in_bytes"]),
        "-" if fl is None else f"{fl:.3e}",
        f"{r['compile_s']:.1f}",
        "yes" if r["mosaic_kernel"] else "no",
      ]
    out.append(
      "| " + " | ".join([str(r["T"]), r["impl"], *cells, _mib(r["score_bytes_per_device"])]) + " |"
    )
  out += [
    "",
    "FLOPs are XLA's cost_analysis: a Pallas kernel without a pl.CostEstimate (splash's) counts "
    "as 0, so splash's figure covers only the XLA ops around its kernels. Ours counts the tiles "
    "it computes.",
  ]
  return "\n".join(out) + "\n"


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096, 8192])
  p.add_argument("--topology", default="v5p:2x2x1")
  p.add_argument("--quick", action="store_true", help="T=2048 only, skip the CPU interpret timing")
  a = p.parse_args()
  seq_lens = [2048] if a.quick else a.seq_lens
  devices = topology_devices(a.topology)
  mesh = sharding.make_mesh(f"tensor={len(devices)}", devices)
  shards = mesh.shape["tensor"]
  print(
    f"topology {a.topology}: {len(devices)} devices ({devices[0].device_kind}); mesh "
    f"{dict(mesh.shape)}"
  )
  rows = []
  for t in seq_lens:
    for impl in IMPLS:
      r = aot_one(impl, t, mesh)
      rows.append(r)
      print(
        f"  T={t} {impl}: "
        + (
          f"FAILED {r['error']}"
          if "error" in r
          else f"temp {_mib(r['temp_size_in_bytes'])}, flops {r['flops_per_device']}, "
          f"{r['compile_s']:.1f}s, mosaic={r['mosaic_kernel']}"
        ),
        flush=True,
      )
  md = markdown(rows, a.topology, shards)
  timing = None
  if not a.quick:
    timing = cpu_interpret_timing()
    pi, xl, ra = (
      timing["pallas_interpret"],
      timing["xla"],
      timing["ratio_pallas_interpret_over_xla"],
    )
    md += (
      "\nCPU wall time, informational only -- Pallas interpret mode says nothing about TPU speed "
      f"(B=1 T=512 N=8 K=1 H=64 fp32 causal, median of 3 after a warm-up):\n\n"
      "| | fwd s | fwd+bwd s |\n|---|---|---|\n"
      f"| pallas (interpret) | {pi['fwd_s']:.4f} | {pi['fwd_bwd_s']:.4f} |\n"
      f"| xla | {xl['fwd_s']:.4f} | {xl['fwd_bwd_s']:.4f} |\n"
      f"| ratio pallas/xla | {ra['fwd_s']:.1f}x | {ra['fwd_bwd_s']:.1f}x |\n"
    )
  print("\n" + md)
  env = dict(
    python=platform.python_version(),
    jax=jax.__version__,
    jaxlib=_ver("jaxlib"),
    libtpu=_ver("libtpu"),
    flax=_ver("flax"),
    topology=a.topology,
    device_kind=devices[0].device_kind,
    num_devices=len(devices),
    mesh=dict(mesh.shape),
    host_cpus=os.cpu_count(),
    host=platform.platform(),
  )
  result = dict(
    benchmark="attention_aot: AOT TPU compile of attention fwd+bwd from a CPU host",
    config=dict(
      B=B,
      N=N,
      K=K,
      H=H,
      dtype="bfloat16",
      causal=True,
      segment_ids="all ones",
      seq_lens=seq_lens,
      impls=list(IMPLS),
      quick=a.quick,
      loss="value_and_grad wrt q,k,v of sum(out.astype(f32)**2)",
      units="bytes and FLOPs per device (SPMD-partitioned module)",
    ),
    env=env,
    aot=rows,
    cpu_interpret_timing=timing,
  )
  stem = "attention_aot_quick" if a.quick else "attention_aot"
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, stem + ".json"), "w") as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(RESULTS, stem + ".md"), "w") as f:
    f.write(md)
  print(f"wrote {os.path.join(RESULTS, stem)}.{{md,json}}")


if __name__ == "__main__":
  main()
